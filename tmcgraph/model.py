"""Declared models: latents with priors and proposals, observations, plates.

A :class:`Model` is declared once.  Its structure (who depends on whom, which
plates) is resolved when an estimator is built; the distributions are built by
the user's functions at every evaluation, from the samples of their parents.

Tensor layout
-------------
Every value an estimator hands to a user function (a parent's samples, an
observed value) and every distribution such a function returns uses one
positional layout, like Pyro's enumeration dims::

    (*data_batch, *index dims, *plate dims, *event dims)

* ``data_batch``: the leading batch dims of the data (several datasets at once);
  each element gets its own independent samples.
* ``index dims``: one dim per sample index (TMC: one per latent, in
  topological order; IWAE and SMC: one shared particle dim, plus one per
  enumerated latent).  A latent's samples have size K along their own index dim
  and size 1 along every other index dim.
* ``plate dims``: one dim per plate, in declaration order (the last declared
  plate is the rightmost batch dim); size 1 where a value is not in the plate.

So a parameter that varies over plate ``"N"`` alone (the only plate) has shape
``(N,)``; with plates ``"N", "T"`` a per-``N`` parameter has shape ``(N, 1)``.
Vector-valued latents need event dims (``Independent(Normal(...), 1)``,
``MultivariateNormal``); a distribution whose batch shape does not fit the layout
is an error naming the site.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple, Union

import networkx as nx
import torch
from torch.distributions import Distribution, constraints

from .errors import TMCError
from .graph import FactorGraph, _check_name, _check_size, check_plate_list

if TYPE_CHECKING:
    from .estimators import TMC

DistFn = Callable[..., Distribution]


@dataclass(frozen=True)
class Site:
    """One declared site.

    Attributes:
        name: the site's name (also the argument name children use for it).
        kind: ``"latent"`` or ``"observed"``.
        fn: the prior (latent) or likelihood (observed) function.
        parents: the sites ``fn`` takes, in call order.
        plates: plates the site is replicated over.
        proposal: the proposal function (``None``: enumerated, or observed).
        proposal_parents: the sites ``proposal`` takes (latents or observations).
        enumerate: summed exactly over its support instead of sampled.
        event_dim: number of event dims of an observed value.
    """

    name: str
    kind: str
    fn: DistFn
    parents: Tuple[str, ...]
    plates: Tuple[str, ...]
    proposal: Optional[DistFn] = None
    proposal_parents: Tuple[str, ...] = ()
    enumerate: bool = False
    event_dim: int = 0


def _arg_names(owner: str, fn: object, explicit: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """The parent names of ``fn``: ``explicit`` if given, else its argument names."""
    if not callable(fn):
        raise TMCError(f"{owner}: expected a function returning a torch Distribution, got {type(fn).__name__}")
    if explicit is not None:
        if isinstance(explicit, str):
            raise TMCError(f"{owner}: parents must be a list of site names, got the string {explicit!r}")
        names = tuple(explicit)
        if len(set(names)) != len(names):
            raise TMCError(f"{owner}: a parent appears twice in {list(names)}")
        return names
    names = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TMCError(f"{owner}: cannot read parent names from *args/**kwargs; pass parents=[...] explicitly")
        if p.default is p.empty:
            names.append(p.name)
    return tuple(names)


class Model:
    """A probabilistic model declared site by site, compiled into estimators.

    Example::

        m = Model()
        m.plate("N", 5)
        m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.0, 2.0))
        m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda mu: Normal(mu, 1.5), plates=["N"])
        m.latent("c", prior=lambda: Bernoulli(0.3), enumerate=True, plates=["N"])
        m.observe("x", lambda z, c: Normal(z + 2.0 * c, 1.0), plates=["N"])
        est = m.compile(K=16)
        log_p = est.log_marginal({"x": x})      # x: (5,) or (*batch, 5)

    Parents are named by the argument names of the functions (arguments with
    defaults are not parents), or explicitly with ``parents=[...]`` (then the
    function is called positionally).  Sites may be declared in any order;
    unknown names, cycles and plate mismatches are reported when the parent is
    known (at declaration, or at compile time for forward references).
    See the module docstring for the tensor layout the functions see.
    """

    def __init__(self) -> None:
        self._plates: Dict[str, int] = {}
        self._sites: Dict[str, Site] = {}
        self._order: Optional[Tuple[List[str], List[str], List[str]]] = None  # resolved structure, cached
        self._version = 0  # bumped by every declaration; estimators check it

    # -- declaration ---------------------------------------------------------
    def plate(self, name: str, size: int) -> "Model":
        """Declare a plate of ``size`` conditionally independent replicas."""
        _check_name("plate", name)
        if name in self._plates or name in self._sites:
            raise TMCError(f"plate {name!r}: the name is already declared")
        self._plates[name] = _check_size(f"plate {name!r}", size)
        self._order = None
        self._version += 1
        return self

    def latent(
        self,
        name: str,
        prior: DistFn,
        proposal: Optional[DistFn] = None,
        *,
        plates: Sequence[str] = (),
        enumerate: bool = False,
        parents: Optional[Sequence[str]] = None,
        proposal_parents: Optional[Sequence[str]] = None,
    ) -> "Model":
        """Declare a latent variable.

        Args:
            name: site name; children name it as an argument.
            prior: ``f(*parents) -> Distribution`` over the latent given its
                parents (latents only).
            proposal: ``q(*parents) -> Distribution`` to sample it from; its
                parents may be latents (a mixture over their samples, appendix C)
                or observations (amortised proposals).  Default: the prior.
            plates: plates the latent is replicated over.
            enumerate: sum exactly over the prior's support (discrete latents,
                appendix D) instead of sampling; no proposal is allowed.
            parents, proposal_parents: explicit parent names (the functions are
                then called positionally).
        """
        self._check_new(name)
        owner = f"latent {name!r}"
        plates = self._check_plates(owner, plates)
        prior_parents = _arg_names(f"{owner} prior", prior, parents)
        if enumerate:
            if proposal is not None:
                raise TMCError(f"{owner}: enumerate=True sums over the support exactly; do not give a proposal")
            q, q_parents = None, ()
        elif proposal is None:
            q, q_parents = prior, prior_parents
        else:
            q, q_parents = proposal, _arg_names(f"{owner} proposal", proposal, proposal_parents)
        site = Site(name, "latent", prior, prior_parents, plates, q, q_parents, bool(enumerate))
        self._check_site_edges(site, known_only=True)
        self._sites[name] = site
        self._order = None
        self._version += 1
        return self

    def observe(
        self,
        name: str,
        likelihood: DistFn,
        *,
        plates: Sequence[str] = (),
        event_dim: int = 0,
        parents: Optional[Sequence[str]] = None,
    ) -> "Model":
        """Declare an observed variable; its value is given at evaluation.

        Args:
            name: key of the value in the data mapping.
            likelihood: ``f(*parents) -> Distribution`` (parents are latents).
            plates: plates it is replicated over.  Its value has shape
                ``(*batch, *plate sizes in this order, *event)``.
            event_dim: number of event dims of one observation (the
                likelihood's ``event_shape`` must have this many).
            parents: explicit parent names.
        """
        self._check_new(name)
        owner = f"observation {name!r}"
        plates = self._check_plates(owner, plates)
        if isinstance(event_dim, bool) or not isinstance(event_dim, int) or event_dim < 0:
            raise TMCError(f"{owner}: event_dim must be a non-negative int, got {event_dim!r}")
        site = Site(name, "observed", likelihood, _arg_names(f"{owner} likelihood", likelihood, parents), plates,
                    event_dim=event_dim)
        self._check_site_edges(site, known_only=True)
        self._sites[name] = site
        self._order = None
        self._version += 1
        return self

    def _check_new(self, name: str) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise TMCError(f"site name must be a Python identifier (children name it as an argument), got {name!r}")
        if name in self._sites or name in self._plates:
            raise TMCError(f"site {name!r}: the name is already declared")

    def _check_plates(self, owner: str, plates: Sequence[str]) -> Tuple[str, ...]:
        return check_plate_list(owner, plates, self._plates)

    def _check_site_edges(self, site: Site, *, known_only: bool) -> None:
        kind = "latent" if site.kind == "latent" else "observation"
        for role, names in (("prior" if site.kind == "latent" else "likelihood", site.parents),
                            ("proposal", site.proposal_parents)):
            for p in names:
                if p == site.name:
                    raise TMCError(f"{kind} {site.name!r}: its {role} names itself as a parent")
                parent = self._sites.get(p)
                if parent is None:
                    if known_only:
                        continue
                    raise TMCError(
                        f"{kind} {site.name!r}: {role} argument {p!r} is not a declared site; "
                        f"declared: {sorted(self._sites)}"
                    )
                if parent.kind == "observed" and role != "proposal":
                    raise TMCError(
                        f"{kind} {site.name!r}: {role} argument {p!r} is an observation; only proposals may "
                        "depend on observed values"
                    )
                if parent.kind == "latent" and not set(parent.plates) <= set(site.plates):
                    raise TMCError(
                        f"{kind} {site.name!r} (plates {list(site.plates)}): its {role} depends on latent {p!r} "
                        f"in plates {list(parent.plates)}; a site must be in every plate of its latent parents"
                    )

    # -- structure -------------------------------------------------------------
    @property
    def plates(self) -> Mapping[str, int]:
        """Plate name -> size, in declaration order."""
        return dict(self._plates)

    @property
    def sites(self) -> Mapping[str, Site]:
        """Site name -> :class:`Site`, in declaration order."""
        return dict(self._sites)

    def latents(self) -> List[str]:
        """Latent names in a topological order of the prior and proposal dependencies."""
        return list(self._resolve()[1])

    def observations(self) -> List[str]:
        """Observation names in declaration order."""
        return list(self._resolve()[2])

    def order(self) -> List[str]:
        """All sites, topologically sorted (ties in declaration order).

        Raises:
            TMCError: an unknown parent, a plate mismatch, or a cycle (listed).
        """
        return list(self._resolve()[0])

    def _resolve(self) -> Tuple[List[str], List[str], List[str]]:
        if self._order is None:
            order = self._topological_order()
            self._order = (order, [n for n in order if self._sites[n].kind == "latent"],
                           [n for n in self._sites if self._sites[n].kind == "observed"])
        return self._order

    def _topological_order(self) -> List[str]:
        if not any(s.kind == "latent" for s in self._sites.values()):
            raise TMCError("the model declares no latent variable")
        g = nx.DiGraph()
        for site in self._sites.values():
            self._check_site_edges(site, known_only=False)
            g.add_node(site.name)
            for p in site.parents + site.proposal_parents:
                if self._sites[p].kind == "latent":
                    g.add_edge(p, site.name)
        try:
            cycle = nx.find_cycle(g)
        except nx.NetworkXNoCycle:
            cycle = None
        if cycle:
            path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
            raise TMCError(f"the model has a cycle: {path}")
        position = {n: k for k, n in enumerate(self._sites)}
        return list(nx.lexicographical_topological_sort(g, key=position.__getitem__))

    def compile(
        self,
        K: Union[int, Mapping[str, int]] = 16,
        *,
        optimize: str = "auto",
        memory_limit: Optional[int] = None,
    ) -> "TMC":
        """Build the TMC estimator: the factor graph of sample indices, compiled once.

        Args:
            K: samples per latent: an int for all, or ``{latent: K}`` for every
                sampled latent (enumerated latents use their support size).
            optimize, memory_limit: as in :meth:`tmcgraph.FactorGraph.compile`.

        Returns:
            a :class:`tmcgraph.TMC` estimator.
        """
        from .estimators import TMC

        return TMC(self, K, optimize=optimize, memory_limit=memory_limit)

    def __repr__(self) -> str:
        lat = [n for n, s in self._sites.items() if s.kind == "latent"]
        obs = [n for n, s in self._sites.items() if s.kind == "observed"]
        return f"Model(plates={self._plates}, latents={lat}, observations={obs})"


# ---------------------------------------------------------------------------
# layout: the positional dims of one evaluation
# ---------------------------------------------------------------------------
def call_site_fn(owner: str, fn: Callable, args: Sequence[torch.Tensor]) -> Distribution:
    """``fn(*args)``; an exception it raises is re-raised as a :class:`TMCError` naming ``owner``."""
    try:
        return fn(*args)
    except TMCError:
        raise
    except Exception as err:  # name the site whose function failed
        raise TMCError(f"{owner}: the function raised {type(err).__name__}: {err}") from err


# ---------------------------------------------------------------------------
# index slots
# ---------------------------------------------------------------------------
def index_slots(model: Model, index_of: Mapping[str, str]) -> Dict[str, int]:
    """Assign sample indices to positional dims, recycling dims like Pyro's enumeration.

    Two indices need different dims only if some function sees both (a site's own
    index and its prior and proposal parents' indices); otherwise they share a
    dim, so a model with hundreds of latents needs only as many dims as its
    largest such group (greedy colouring of the conflict graph).
    """
    g = nx.Graph()
    g.add_nodes_from(dict.fromkeys(index_of.values()))
    for site in model._sites.values():
        group = [index_of[site.name]] if site.kind == "latent" else []
        group += [index_of[p] for p in site.parents + site.proposal_parents if p in index_of]
        group = list(dict.fromkeys(group))
        for a, b in ((a, b) for k, a in enumerate(group) for b in group[k + 1:]):
            g.add_edge(a, b)
    colours = nx.greedy_color(g, strategy="largest_first")
    return {i: colours[i] for i in g.nodes}


class Layout:
    """Dim positions of one evaluation (see the module docstring).

    Args:
        model: the model.
        index_of: latent -> name of the sample index it lives on.
        index_sizes: index name -> size.
        batch: the data batch shape.
        slots: index name -> index dim (0 = leftmost); default
            :func:`index_slots` (recycled dims).
        probed: a set shared across evaluations that records which functions'
            coincidence check (:meth:`density`) has run.
    """

    def __init__(self, model: Model, index_of: Mapping[str, str], index_sizes: Mapping[str, int],
                 batch: Tuple[int, ...], slots: Optional[Mapping[str, int]] = None,
                 probed: Optional[Set[tuple]] = None) -> None:
        self.model = model
        # the (function, batch, index sizes) whose index-dim variation was checked (see density());
        # an estimator passes the same set to every evaluation so each check runs once
        self.probed: Set[tuple] = set() if probed is None else probed
        self.index_of = dict(index_of)
        self.index_sizes = dict(index_sizes)
        self.batch = tuple(batch)
        self.plate_names = tuple(model._plates)
        slots = dict(index_slots(model, index_of) if slots is None else slots)
        n_slots = max(slots.values(), default=-1) + 1
        n_pl = len(self.plate_names)
        self.ndim = n_slots + n_pl
        self.slot_names = ["|".join(i for i, s in slots.items() if s == k) for k in range(n_slots)]
        self.index_pos = {name: -self.ndim + slots[name] for name in self.index_sizes}
        self.plate_pos = {name: -n_pl + k for k, name in enumerate(self.plate_names)}

    def template(self, indices: Sequence[str], plates: Sequence[str]) -> Tuple[int, ...]:
        """The batch shape of a value varying along ``indices`` and ``plates``."""
        shape = [1] * self.ndim
        for i in indices:
            shape[self.index_pos[i]] = self.index_sizes[i]
        for p in plates:
            shape[self.plate_pos[p]] = self.model._plates[p]
        return self.batch + tuple(shape)

    def describe(self, shape: Sequence[int]) -> str:
        names = ["batch"] * (len(shape) - self.ndim) + [f"index {i}" for i in self.slot_names]
        names += [f"plate {p}" for p in self.plate_names]
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, shape)) + ")"

    def density(self, owner: str, fn: Callable, args: Sequence[torch.Tensor], arg_event_dims: Sequence[int],
                indices: Sequence[str], plates: Sequence[str], *,
                sample_index: Optional[str] = None) -> Distribution:
        """Call a site's function and check the distribution it returns against the layout.

        Args:
            owner: e.g. ``"latent 'z' prior"``, named in errors.
            fn: the user's function; ``args`` its arguments in layout, each with
                ``arg_event_dims`` event dims.
            indices: the index dims the distribution may vary along (those of
                its arguments); ``plates``: the site's plates.
            sample_index: the latent's own index (proposals): the result is
                expanded along it, but may vary along it only through its
                arguments.

        Returns:
            the distribution expanded to the template of ``indices`` (and
            ``sample_index``) and ``plates``.

        Raises:
            TMCError: naming ``owner``, when the batch shape does not broadcast
                to the template, or when it varies along an index dim by itself
                (a parameter whose size coincides with an index's K: called
                again with every argument reduced to one sample, the batch
                shape must be 1 along every index dim).
        """
        d = call_site_fn(owner, fn, args)
        full = list(indices) + ([sample_index] if sample_index is not None and sample_index not in indices else [])
        out = self.fit(d, owner, indices, plates, expand_to=full)
        n_slots = self.ndim - len(self.plate_names)
        bs = tuple(d.batch_shape)
        lead = len(bs) - self.ndim
        varies = any(lead + s >= 0 and bs[lead + s] > 1 for s in range(n_slots))
        key = (owner, self.batch, tuple(self.index_sizes.items()))
        if varies and key not in self.probed:
            self._probe(owner, fn, args, arg_event_dims, bs)
            self.probed.add(key)
        return out

    def _probe(self, owner: str, fn: Callable, args: Sequence[torch.Tensor], arg_event_dims: Sequence[int],
               shape: Tuple[int, ...]) -> None:
        """Call ``fn`` with every argument narrowed to one sample along every index dim; its batch shape
        must then be 1 along every index dim."""
        n_slots = self.ndim - len(self.plate_names)
        narrowed = []
        for a, e in zip(args, arg_event_dims):
            for s in range(n_slots):
                d = a.dim() - e - self.ndim + s
                if d >= 0 and a.shape[d] > 1:
                    a = a.narrow(d, 0, 1)
            narrowed.append(a)
        try:
            probe = fn(*narrowed)
            bs = tuple(probe.batch_shape)
        except Exception:  # the function needs its full arguments; the check cannot be made
            return
        lead = len(bs) - self.ndim
        full = self.template(list(self.index_sizes), self.plate_names)
        for s in range(n_slots):
            if lead + s >= 0 and bs[lead + s] > 1:
                raise TMCError(
                    f"{owner}: the distribution's batch shape {shape} varies along index dim "
                    f"{s - self.ndim} ({self.slot_names[s]}) by itself: called with one sample of each argument, "
                    f"its batch shape is still {bs}. A density may vary along a sample index only through its "
                    f"arguments; a parameter shaped for a plate or for another dim sits in the index dims. The layout "
                    f"(*data batch, *index dims, *plates, *event) is {self.describe(full)}; give per-plate "
                    "parameters the plate's dim (e.g. (N, 1) for plate N when a plate follows it)"
                )

    def fit(self, d: Distribution, owner: str, indices: Sequence[str], plates: Sequence[str], *,
            expand_to: Optional[Sequence[str]] = None) -> Distribution:
        """Check that ``d`` varies only along ``indices``/``plates`` and expand it to the template of
        ``expand_to`` (default ``indices``) and ``plates``; an error names ``owner`` and the dim at fault."""
        if not isinstance(d, Distribution):
            raise TMCError(f"{owner}: the function must return a torch.distributions.Distribution, "
                           f"got {type(d).__name__}")
        allowed = self.template(indices, plates)
        template = allowed if expand_to is None else self.template(expand_to, plates)
        bs = tuple(d.batch_shape)
        bad = [k for k, (b, t) in enumerate(zip(bs[::-1], allowed[::-1]), start=1) if b != 1 and b != t]
        if len(bs) > len(allowed) or bad:
            names = self.describe(allowed)[1:-1].split(", ")
            if len(bs) > len(allowed):
                what = f"it has {len(bs)} batch dims, more than the layout's {len(allowed)}"
            else:
                name, size = names[len(names) - bad[0]].rsplit("=", 1)
                what = f"dim {-bad[0]} ({name}) has size {bs[-bad[0]]}, expected {size}" + (
                    " or 1" if size != "1" else "")
                if name.startswith("index ") and size == "1":
                    what += (" (a density varies along a sample index only through its arguments, never along "
                             "its own)")
            raise TMCError(
                f"{owner}: the distribution's batch shape {bs} does not fit the layout: {what}. Expected a shape "
                f"that broadcasts to {self.describe(allowed)}, laid out (*data batch, *index dims, *plates, "
                "*event); use Independent(..., 1) for vector-valued sites, and give per-plate parameters the "
                "plate's dim"
            )
        return d if bs == template else d.expand(torch.Size(template))

    def to_factor(self, t: torch.Tensor, owner: str, indices: Sequence[str],
                  plates: Sequence[str]) -> torch.Tensor:
        """``(*batch, layout dims)`` log-density -> factor tensor ``(*batch, *plates, *indices)``."""
        if t.dim() < self.ndim:
            t = t.reshape((1,) * (self.ndim - t.dim()) + tuple(t.shape))
        nb = t.dim() - self.ndim
        keep_idx = [nb + self.ndim + self.index_pos[i] for i in indices]
        keep_pl = [nb + self.ndim + self.plate_pos[p] for p in plates]
        keep = set(keep_idx) | set(keep_pl)
        for d in range(nb, t.dim()):
            if d not in keep and t.shape[d] != 1:
                raise TMCError(
                    f"{owner}: its log-density varies along {self.describe(t.shape)[1:-1].split(', ')[d]}, "
                    "which it does not depend on (check the function's parameter shapes)"
                )
        target = list(t.shape)
        for i, d in zip(indices, keep_idx):
            target[d] = self.index_sizes[i]
        for p, d in zip(plates, keep_pl):
            target[d] = self.model._plates[p]
        t = t.expand(target)
        drop = tuple(d for d in range(nb, t.dim()) if d not in keep)
        order = list(range(nb)) + keep_pl + keep_idx
        # permute the kept dims into place, the dropped (size-1) dims last, then view them away
        t = t.permute(order + list(drop))
        return t.reshape(t.shape[: len(order)]) if drop else t

    def site_view(self, value: torch.Tensor, latent: str, event_dim: int) -> torch.Tensor:
        """Samples in layout -> ``(*batch, *plates of latent, K, *event)``."""
        site = self.model._sites[latent]
        index = self.index_of[latent]
        full = self.template([index], site.plates)
        value = value.expand(full + tuple(value.shape[value.dim() - event_dim:]))
        nb = len(self.batch)
        pl = [nb + self.ndim + self.plate_pos[p] for p in site.plates]
        ix = nb + self.ndim + self.index_pos[index]
        rest = [d for d in range(nb, nb + self.ndim) if d not in pl and d != ix]
        ev = list(range(nb + self.ndim, value.dim()))
        value = value.permute(list(range(nb)) + pl + [ix] + rest + ev)
        shape = value.shape
        return value.reshape(shape[: nb + len(pl) + 1] + shape[nb + self.ndim:])

    def data_value(self, name: str, value: object) -> torch.Tensor:
        """An observed value ``(*batch, *its plates, *event)`` -> layout."""
        site = self.model._sites[name]
        if not isinstance(value, torch.Tensor):
            value = torch.as_tensor(value)
        n_pl, e = len(site.plates), site.event_dim
        if value.dim() < n_pl + e:
            raise TMCError(
                f"observation {name!r}: value has shape {tuple(value.shape)}, expected "
                f"(*batch, {', '.join(f'{p}={self.model._plates[p]}' for p in site.plates)}"
                f"{', ' if site.plates else ''}*event with {e} dim(s))"
            )
        nb = value.dim() - n_pl - e
        for k, p in enumerate(site.plates):
            if value.shape[nb + k] != self.model._plates[p]:
                raise TMCError(
                    f"observation {name!r}: dim {nb + k} (plate {p!r}) has size {value.shape[nb + k]}, "
                    f"expected {self.model._plates[p]}; value shape {tuple(value.shape)}"
                )
        order = sorted(range(n_pl), key=lambda k: self.plate_names.index(site.plates[k]))
        value = value.permute(list(range(nb)) + [nb + k for k in order] + list(range(nb + n_pl, value.dim())))
        shape = list(value.shape[:nb]) + [1] * (self.ndim - len(self.plate_names))
        for p in self.plate_names:
            shape.append(self.model._plates[p] if p in site.plates else 1)
        return value.reshape(shape + list(value.shape[nb + n_pl:]))


def data_batch_shape(model: Model, data: Mapping[str, object]) -> Tuple[int, ...]:
    """Check the data mapping and return the broadcast batch shape of the values."""
    if not isinstance(data, Mapping):
        raise TMCError(f"data must be a mapping from observation name to value, got {type(data).__name__}")
    obs = model.observations()
    missing = [n for n in obs if n not in data]
    if missing:
        raise TMCError(f"no value given for observation(s) {missing}")
    unknown = [n for n in data if n not in obs]
    if unknown:
        raise TMCError(f"value(s) given for {unknown}, which are not observations; observations: {obs}")
    shapes: List[Tuple[int, ...]] = []
    nan_flags: List[Tuple[str, torch.Tensor]] = []
    for n in obs:
        site = model._sites[n]
        raw = data[n]
        v = raw if isinstance(raw, torch.Tensor) else torch.as_tensor(raw)
        shapes.append(tuple(v.shape[: max(0, v.dim() - len(site.plates) - site.event_dim)]))
        if v.is_floating_point() or v.is_complex():
            nan_flags.append((n, torch.isnan(v).any()))
    if nan_flags and bool(torch.stack([f.to("cpu") for _, f in nan_flags]).any()):  # one sync for all of them
        bad = [n for n, f in nan_flags if bool(f)]
        raise TMCError(f"observation(s) {bad}: the observed value contains NaN; a missing observation must be "
                       "removed from the data, not marked with NaN")
    try:
        return tuple(torch.broadcast_shapes(*shapes)) if shapes else ()
    except RuntimeError:
        raise TMCError(f"the batch shapes of the observed values do not broadcast: {dict(zip(obs, shapes))}") from None


# ---------------------------------------------------------------------------
# checks on distributions
# ---------------------------------------------------------------------------
def _support_key(c: constraints.Constraint) -> tuple:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    attrs = []
    for k, v in sorted(vars(c).items()):
        if isinstance(v, (int, float)):
            attrs.append((k, v))
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            attrs.append((k, float(v)))
    return (type(c), tuple(attrs))


def check_proposal(name: str, prior: Distribution, proposal: Distribution) -> None:
    """A proposal must have the prior's support and event shape (else the weights are wrong)."""
    if tuple(prior.event_shape) != tuple(proposal.event_shape):
        raise TMCError(
            f"latent {name!r}: the proposal's event shape {tuple(proposal.event_shape)} differs from the "
            f"prior's {tuple(prior.event_shape)}"
        )
    try:
        same = _support_key(prior.support) == _support_key(proposal.support)
    except NotImplementedError:
        return
    if not same:
        raise TMCError(
            f"latent {name!r}: the proposal's support {proposal.support} differs from the prior's "
            f"{prior.support}; importance weights need a proposal with the prior's support"
        )


def build_graph(model: Model, index_of: Mapping[str, str], index_sizes: Mapping[str, int],
                index_plates: Mapping[str, Tuple[str, ...]]) -> FactorGraph:
    """The factor graph of a model under an index assignment.

    One factor per site, named after it: a latent's factor spans its own index
    and its prior parents' indices; an observation's its parents' indices.
    """
    g = FactorGraph()
    for p, n in model._plates.items():
        g.plate(p, n)
    for i, size in index_sizes.items():
        g.index(i, size, plates=index_plates[i])
    for name in model.order():
        g.factor(name, factor_indices(model, index_of, name), plates=model._sites[name].plates)
    return g


def factor_indices(model: Model, index_of: Mapping[str, str], name: str) -> List[str]:
    """The indices of a site's factor: its own (latents), then its prior parents'."""
    site = model._sites[name]
    idx = [index_of[name]] if site.kind == "latent" else []
    for p in site.parents:
        if index_of[p] not in idx:
            idx.append(index_of[p])
    return idx

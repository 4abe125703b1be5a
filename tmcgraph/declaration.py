"""Declaring a model: sites (latents with priors and proposals, observations), plates and families.

`ModelBase` holds everything a model declares; `tmcgraph.Model` (`tmcgraph.model`) adds ``compile``.
The estimators, the trace and the layout read a model through this module only, so none of them imports
`tmcgraph.model`, which imports them.  The tensor layout the site functions see is described in
`tmcgraph.model`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, TypeVar

import networkx as nx
import torch
from torch.distributions import Distribution

from .errors import TMCError
from .graph import _check_name, _check_size, check_plate_list

__all__ = ["DistFn", "Family", "ModelBase", "Site"]

_M = TypeVar("_M", bound="ModelBase")

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
        batch: ``"no"``, or how a site declared in `Model.batch_sites` is batched
            with the sites that share its functions (``"verify"`` or ``"trust"``).
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
    batch: str = "no"


@dataclass(frozen=True)
class Family:
    """A vectorised family of sites (`Model.markov`, `Model.observe_each`).

    Attributes:
        name: the family's name; its members are ``f"{name}_{t}"``.
        kind: ``"markov"`` (latents ``z_t | z_{t-1}``) or ``"observed"`` (``x_t | z_t``).
        members: the member sites, in step order.
        fn: the transition (markov) or the likelihood (observed), called once for all steps.
        init: the first member's prior (markov).
        proposal: the factorised proposal of every member (markov).
        of: the markov family an observed family observes.
        takes_t: per function (``fn``, ``init``, ``proposal``): whether it takes the step ``t``.
    """

    name: str
    kind: str
    members: Tuple[str, ...]
    fn: DistFn
    init: Optional[DistFn] = None
    proposal: Optional[DistFn] = None
    of: Optional[str] = None
    takes_t: Tuple[bool, bool, bool] = (False, False, False)


def _family_fn(owner: str, fn: object, n_parents: int) -> bool:
    """Check a family function's signature: ``n_parents`` positional parents and an optional ``t`` (the step).

    Returns whether it takes ``t``.
    """
    if not callable(fn):
        raise TMCError(f"{owner}: expected a function returning a torch Distribution, got {type(fn).__name__}")
    params = list(inspect.signature(fn).parameters.values())
    takes_t = any(p.name == "t" for p in params)
    required = [p.name for p in params if p.default is p.empty and p.name != "t"
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if len(required) != n_parents:
        what = "no argument" if n_parents == 0 else f"{n_parents} argument (the previous step's value)"
        raise TMCError(f"{owner}: expected a function of {what} and optionally the step t, got arguments "
                       f"{required}")
    return takes_t


def _member_fn(fn: DistFn, takes_t: bool, t: int) -> DistFn:
    """A family function as one member's site function: the step is passed as a 0-d ``t``."""
    if not takes_t:
        return fn
    step = torch.tensor(t)
    return lambda *args: fn(*args, t=step)


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
    found: List[str] = []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            raise TMCError(f"{owner}: cannot read parent names from *args/**kwargs; pass parents=[...] explicitly")
        if p.default is p.empty:
            found.append(p.name)
    return tuple(found)


class ModelBase:
    """Everything a model declares (`tmcgraph.Model` is this with ``compile``; see it for an example)."""

    def __init__(self) -> None:
        self._plates: Dict[str, int] = {}
        self._sites: Dict[str, Site] = {}
        self._families: Dict[str, Family] = {}
        self._plates_view = MappingProxyType(self._plates)
        self._sites_view = MappingProxyType(self._sites)
        self._order: Optional[Tuple[List[str], List[str], List[str]]] = None  # resolved structure, cached
        self._version = 0  # bumped by every declaration; estimators check it
        self._batch = "no"  # inside batch_sites(): "verify" or "trust"

    # -- declaration ---------------------------------------------------------
    def plate(self: _M, name: str, size: int) -> _M:
        """Declare a plate of ``size`` conditionally independent replicas."""
        _check_name("plate", name)
        if name in self._plates or name in self._sites:
            raise TMCError(f"plate {name!r}: the name is already declared")
        self._plates[name] = _check_size(f"plate {name!r}", size)
        self._order = None
        self._version += 1
        return self

    def latent(
        self: _M,
        name: str,
        prior: DistFn,
        proposal: Optional[DistFn] = None,
        *,
        plates: Sequence[str] = (),
        enumerate: bool = False,
        parents: Optional[Sequence[str]] = None,
        proposal_parents: Optional[Sequence[str]] = None,
    ) -> _M:
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
            parents: explicit parent names of ``prior`` (it is then called
                positionally).
            proposal_parents: explicit parent names of ``proposal``.
        """
        self._check_new(name)
        owner = f"latent {name!r}"
        plates = self._check_plates(owner, plates)
        prior_parents = _arg_names(f"{owner} prior", prior, parents)
        if enumerate:
            if proposal is not None:
                raise TMCError(f"{owner}: enumerate=True sums over the support exactly; do not give a proposal")
            q: Optional[DistFn] = None
            q_parents: Tuple[str, ...] = ()
        elif proposal is None:
            q, q_parents = prior, prior_parents
        else:
            q, q_parents = proposal, _arg_names(f"{owner} proposal", proposal, proposal_parents)
        site = Site(name, "latent", prior, prior_parents, plates, q, q_parents, bool(enumerate), batch=self._batch)
        self._check_site_edges(site, known_only=True)
        self._sites[name] = site
        self._order = None
        self._version += 1
        return self

    def observe(
        self: _M,
        name: str,
        likelihood: DistFn,
        *,
        plates: Sequence[str] = (),
        event_dim: int = 0,
        parents: Optional[Sequence[str]] = None,
    ) -> _M:
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
                    event_dim=event_dim, batch=self._batch)
        self._check_site_edges(site, known_only=True)
        self._sites[name] = site
        self._order = None
        self._version += 1
        return self

    @contextlib.contextmanager
    def batch_sites(self: _M, *, verify: bool = True) -> Iterator[_M]:
        """Declare sites that may be evaluated in batched calls (a loop of sites sharing functions).

        Sites declared inside the block whose function (prior, proposal or likelihood) shares one
        code object, closure and defaults (``int`` defaults such as ``t=t`` of proposals may differ)
        are evaluated by `tmcgraph.TMC` in one call, their arguments stacked along a new
        leftmost batch dim (`tmcgraph.vectorise`).  Sites declared anywhere else are evaluated
        one by one, always.  Example::

            with m.batch_sites():
                for t in range(1, T):
                    m.latent(f"z{t}", prior=lambda prev: Normal(0.9 * prev, 0.5), parents=[f"z{t - 1}"],
                             proposal=lambda t=t: Normal(loc[t], scale[t]), proposal_parents=[])

        By declaring them here you promise that these functions follow the layout contract: they
        broadcast over leading batch dims, never read an argument's shape or leading dims, never
        combine values across that dim (``prev.mean()``, a branch on ``prev``), and have no side
        effects.  With ``verify=True`` (default) the first evaluation of every new input layout
        (data batch shape, index sizes, the data's dtypes and devices) computes every group both
        site by site and batched, and a disagreement beyond float rounding, or a batched call that
        fails, is a `TMCError` naming the sites; ``verify=False`` trusts the promise from the
        first evaluation on (no double work, as for `markov` families, and none of the checks
        made site by site, such as the proposal-support rule, for the batched roles).

        Args:
            verify: check each new input layout once (see above).
        """
        if self._batch != "no":
            raise TMCError("batch_sites() blocks do not nest")
        self._batch = "verify" if verify else "trust"
        try:
            yield self
        finally:
            self._batch = "no"

    def markov(self: _M, name: str, length: int, *, init: DistFn, transition: DistFn, proposal: DistFn) -> _M:
        """Declare a Markov chain of latents ``name_0 .. name_{length-1}`` as one vectorised family.

        ``name_0 ~ init()``, ``name_t ~ transition(name_{t-1})``, each member proposed from
        ``proposal()`` independently.  The members are ordinary latent sites (one sample index
        each: children name them, every estimator accepts them), but `tmcgraph.TMC`
        evaluates the family in a few batched calls: ``proposal`` once for all steps,
        ``transition`` once for all ``length - 1`` transitions, whose log-factors are built as
        one tensor.  Site by site the same model costs ``length`` calls of each function.

        Vectorised, a function sees the step as the rightmost batch dim (after the data batch
        and the sample index dims; families are not in plates), so a function written for one
        member broadcasts over all of them.  Per-step parameters are read through the optional
        argument ``t``: a 1-D ``LongTensor`` of the steps evaluated (``torch.arange(length)`` for
        the proposal, ``torch.arange(1, length)`` for the transition) when vectorised, a 0-d
        one for a single member, so ``loc[t]`` is right in both.  Example (Pyro's
        ``vectorized_markov`` does the same job)::

            m.markov("z", 50, init=lambda: Normal(0.0, 1.0),
                     transition=lambda prev: Normal(0.9 * prev, 0.4),
                     proposal=lambda t: Normal(loc[t], scale[t]))
            m.observe_each("x", "z", lambda z: Normal(z, 1.0))   # x_t ~ N(z_t, 1)

        Args:
            name: the family's name (members are ``f"{name}_{t}"``).
            length: the number of members, at least 1.
            init: ``f() -> Distribution`` of the first member.
            transition: ``f(prev[, t]) -> Distribution`` of member ``t`` given member ``t - 1``.
            proposal: ``f([t]) -> Distribution``, batch shape ``()`` or ``(len(t),)``: a factorised
                proposal for the members.
        """
        owner = f"markov family {name!r}"
        _check_name("markov family", name)
        length = _check_size(f"{owner} length", length)
        if name in self._families or name in self._sites or name in self._plates:
            raise TMCError(f"{owner}: the name is already declared")
        members = tuple(f"{name}_{t}" for t in range(length))
        for m in members:
            self._check_new(m)
        takes = (_family_fn(f"{owner} transition", transition, 1), _family_fn(f"{owner} init", init, 0),
                 _family_fn(f"{owner} proposal", proposal, 0))
        if takes[1]:
            raise TMCError(f"{owner} init: the first member's prior takes no argument (not even t)")
        for t, m in enumerate(members):
            prior = init if t == 0 else _member_fn(transition, takes[0], t)
            self.latent(m, prior=prior, proposal=_member_fn(proposal, takes[2], t),
                        parents=[] if t == 0 else [members[t - 1]], proposal_parents=[])
        self._families[name] = Family(name, "markov", members, transition, init, proposal, None, takes)
        return self

    def observe_each(self: _M, name: str, of: str, likelihood: DistFn, *, event_dim: int = 0) -> _M:
        """Declare observations ``name_t ~ likelihood(of_t)`` for every member of markov family ``of``.

        The members ``name_0 ..`` are ordinary observed sites (their values are given one by one
        in the data mapping, ``data[f"{name}_{t}"]``); vectorised evaluation calls ``likelihood``
        once for all steps, with the step as the rightmost batch dim and the optional ``t`` as
        in `markov`.

        Args:
            name: the family's name (members are ``f"{name}_{t}"``).
            of: a family declared by `markov`.
            likelihood: ``f(z[, t]) -> Distribution``.
            event_dim: event dims of one observation.
        """
        owner = f"observed family {name!r}"
        _check_name("observed family", name)
        if name in self._families or name in self._sites or name in self._plates:
            raise TMCError(f"{owner}: the name is already declared")
        fam = self._families.get(of)
        if fam is None or fam.kind != "markov":
            known = [f for f, v in self._families.items() if v.kind == "markov"]
            raise TMCError(f"{owner}: {of!r} is not a markov family; declared markov families: {known}")
        members = tuple(f"{name}_{t}" for t in range(len(fam.members)))
        for m in members:
            self._check_new(m)
        takes = _family_fn(f"{owner} likelihood", likelihood, 1)
        for t, (m, z) in enumerate(zip(members, fam.members)):
            self.observe(m, _member_fn(likelihood, takes, t), parents=[z], event_dim=event_dim)
        self._families[name] = Family(name, "observed", members, likelihood, None, None, of, (takes, False, False))
        return self

    @property
    def families(self) -> Mapping[str, Family]:
        """Family name -> `Family`, in declaration order (a read-only view)."""
        return MappingProxyType(self._families)

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
        """Plate name -> size, in declaration order (a read-only view)."""
        return self._plates_view

    @property
    def sites(self) -> Mapping[str, Site]:
        """Site name -> `Site` (frozen), in declaration order (a read-only view)."""
        return self._sites_view

    @property
    def version(self) -> int:
        """Bumped by every declaration; estimators built earlier check it and refuse a changed model."""
        return self._version

    def _with_prior_proposals(self: _M) -> _M:
        """A copy in which every sampled latent is proposed from its prior, given the prior's parents.

        (the bootstrap proposal of `tmcgraph.smc`); this model is unchanged.
        """
        other = self._copy()
        other._sites = {n: dataclasses.replace(s, proposal=s.fn, proposal_parents=s.parents)
                        if s.kind == "latent" and not s.enumerate else s for n, s in self._sites.items()}
        other._sites_view = MappingProxyType(other._sites)
        return other

    def with_proposals(self: _M, proposals: Mapping[str, DistFn]) -> _M:
        """A copy in which the latents named in ``proposals`` are proposed from those functions (no parents).

        Learnable proposals (`tmcgraph.learn.mean_field`) are attached this way; this model is unchanged.

        Args:
            proposals: sampled latent -> a function of no arguments returning its proposal distribution, laid out
                as the model's tensor layout says (`tmcgraph.model`).

        Raises:
            TMCError: a name that is not a sampled latent, or a proposal that is not callable.
        """
        sampled = [n for n in self.latents() if not self._sites[n].enumerate]
        for name, q in proposals.items():
            if name not in sampled:
                raise TMCError(f"with_proposals: {name!r} is not a sampled latent; sampled latents: {sampled}")
            if not callable(q):
                raise TMCError(f"with_proposals: the proposal of latent {name!r} must be callable, got "
                               f"{type(q).__name__}")
        other = self._copy()
        other._sites = {n: dataclasses.replace(s, proposal=proposals[n], proposal_parents=())
                        if n in proposals else s for n, s in self._sites.items()}
        other._sites_view = MappingProxyType(other._sites)
        # a markov family draws its members from the family's proposal in one call: one whose members get other
        # proposals is traced member by member (and so is a family observing it)
        changed = {k for k, f in self._families.items() if set(f.members) & set(proposals)}
        other._families = {k: f for k, f in self._families.items() if k not in changed and f.of not in changed}
        return other

    def _copy(self: _M) -> _M:
        """A shallow copy whose sites, plates and families can be replaced without touching this model."""
        other = copy.copy(self)
        other._sites = dict(self._sites)
        other._sites_view = MappingProxyType(other._sites)
        other._plates = dict(self._plates)
        other._plates_view = MappingProxyType(other._plates)
        other._families = dict(self._families)
        other._order = None
        return other

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

    def __repr__(self) -> str:
        lat = [n for n, s in self._sites.items() if s.kind == "latent"]
        obs = [n for n, s in self._sites.items() if s.kind == "observed"]
        return f"{type(self).__name__}(plates={self._plates}, latents={lat}, observations={obs})"

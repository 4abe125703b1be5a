"""The positional layout of one evaluation, and the checks on what user functions return.

See `tmcgraph.model` for the layout a user's functions see::

    (*data_batch, *index dims, *plate dims, *event dims)

`Layout` places sample indices and plates in that layout, checks every
distribution a site's function returns against it (`Layout.density`) and
turns log-densities into factor tensors ``(*batch, *plates, *indices)``.
`build_graph` gives the `FactorGraph` of a model under an
index assignment.
"""

from __future__ import annotations

import copy
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import networkx as nx
import torch
from torch.distributions import Distribution

from .declaration import ModelBase as Model
from .errors import TMCError
from .graph import FactorGraph

__all__ = ["Layout", "as_data", "build_graph", "call_site_fn", "data_batch_shape", "factor_indices", "index_slots"]


def call_site_fn(owner: str, fn: Callable, args: Sequence[torch.Tensor]) -> Distribution:
    """``fn(*args)``; an exception it raises is re-raised as a `TMCError` naming ``owner``."""
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
    for site in model.sites.values():
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
            `index_slots` (recycled dims).
        probed: a set shared across evaluations that records which functions'
            coincidence check (`density`) has run.
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
        self.plate_names = tuple(model.plates)
        slots = dict(index_slots(model, index_of) if slots is None else slots)
        n_slots = max(slots.values(), default=-1) + 1
        n_pl = len(self.plate_names)
        self.ndim = n_slots + n_pl
        self.slot_names = ["|".join(i for i, s in slots.items() if s == k) for k in range(n_slots)]
        self.index_pos = {name: -self.ndim + slots[name] for name in self.index_sizes}
        self.plate_pos = {name: -n_pl + k for k, name in enumerate(self.plate_names)}

    def copy(self) -> "Layout":
        """A copy with its own ``index_sizes`` (the probed set stays shared)."""
        new = copy.copy(self)
        new.index_sizes = dict(self.index_sizes)
        return new

    @property
    def index_dims(self) -> List[int]:
        """The sample-index dims' positions counted from the right of a batch shape in this layout."""
        return [s - self.ndim for s in range(self.ndim - len(self.plate_names))]

    def template(self, indices: Sequence[str], plates: Sequence[str]) -> Tuple[int, ...]:
        """The batch shape of a value varying along ``indices`` and ``plates``."""
        shape = [1] * self.ndim
        for i in indices:
            shape[self.index_pos[i]] = self.index_sizes[i]
        for p in plates:
            shape[self.plate_pos[p]] = self.model.plates[p]
        return self.batch + tuple(shape)

    def describe(self, shape: Sequence[int]) -> str:
        """The layout's dims named, for error messages: ``(index z=4, plate N=3, ...)``."""
        names = ["batch"] * (len(shape) - self.ndim) + [f"index {i}" for i in self.slot_names]
        names += [f"plate {p}" for p in self.plate_names]
        return "(" + ", ".join(f"{n}={s}" for n, s in zip(names, shape)) + ")"

    def density(self, owner: str, fn: Callable, args: Sequence[torch.Tensor], arg_event_dims: Sequence[int],
                indices: Sequence[str], plates: Sequence[str], *,
                sample_index: Optional[str] = None) -> Distribution:
        """Call a site's function and check the distribution it returns against the layout.

        Args:
            owner: e.g. ``"latent 'z' prior"``, named in errors.
            fn: the user's function.
            args: its arguments, in layout.
            arg_event_dims: the number of event dims of each argument.
            indices: the index dims the distribution may vary along (those of
                its arguments).
            plates: the site's plates.
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
        """Call ``fn`` with every argument narrowed to one sample along every index dim.

        Its batch shape must then be 1 along every index dim.
        """
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
        """Check that ``d`` varies only along ``indices``/``plates``, and expand it.

        And expand it to the template of ``expand_to`` (default ``indices``) and ``plates``; an error names ``owner``
        and the dim at fault.
        """
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
            target[d] = self.model.plates[p]
        t = t.expand(target)
        drop = tuple(d for d in range(nb, t.dim()) if d not in keep)
        order = list(range(nb)) + keep_pl + keep_idx
        # permute the kept dims into place, the dropped (size-1) dims last, then view them away
        t = t.permute(order + list(drop))
        return t.reshape(t.shape[: len(order)]) if drop else t

    def site_view(self, value: torch.Tensor, latent: str, event_dim: int) -> torch.Tensor:
        """Samples in layout -> ``(*batch, *plates of latent, K, *event)``."""
        site = self.model.sites[latent]
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
        site = self.model.sites[name]
        value = as_data(name, value)
        n_pl, e = len(site.plates), site.event_dim
        if value.dim() < n_pl + e:
            raise TMCError(
                f"observation {name!r}: value has shape {tuple(value.shape)}, expected "
                f"(*batch, {', '.join(f'{p}={self.model.plates[p]}' for p in site.plates)}"
                f"{', ' if site.plates else ''}*event with {e} dim(s))"
            )
        nb = value.dim() - n_pl - e
        for k, p in enumerate(site.plates):
            if value.shape[nb + k] != self.model.plates[p]:
                raise TMCError(
                    f"observation {name!r}: dim {nb + k} (plate {p!r}) has size {value.shape[nb + k]}, "
                    f"expected {self.model.plates[p]}; value shape {tuple(value.shape)}"
                )
        order = sorted(range(n_pl), key=lambda k: self.plate_names.index(site.plates[k]))
        value = value.permute(list(range(nb)) + [nb + k for k in order] + list(range(nb + n_pl, value.dim())))
        shape = list(value.shape[:nb]) + [1] * (self.ndim - len(self.plate_names))
        for p in self.plate_names:
            shape.append(self.model.plates[p] if p in site.plates else 1)
        return value.reshape(shape + list(value.shape[nb + n_pl:]))


def as_data(name: str, value: object) -> torch.Tensor:
    """An observed value as a tensor.

    Tensors as they are; numbers, lists and numpy arrays converted, floating point ones to torch's default dtype (never
    silently float64: ``numpy`` makes float64 by default). Bool values are refused, naming the observation (no
    distribution's ``log_prob`` takes them).
    """
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception as err:
            raise TMCError(f"observation {name!r}: cannot make a tensor of the value ({type(value).__name__}): "
                           f"{err}") from None
        if value.is_floating_point():
            value = value.to(torch.get_default_dtype())
    if value.dtype == torch.bool:
        raise TMCError(f"observation {name!r}: the value is a bool tensor; pass it as 0./1. floats (value.float()) "
                       "for a Bernoulli likelihood, or as integers for a Categorical one")
    return value


def data_batch_shape(model: Model, data: Mapping[str, object]) -> Tuple[int, ...]:
    """Check the data mapping (names, NaN and infinite values) and return the broadcast batch shape of the values."""
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
    floating: Dict[Tuple[torch.dtype, torch.device], List[torch.Tensor]] = {}
    for n in obs:
        site = model.sites[n]
        v = as_data(n, data[n])
        shapes.append(tuple(v.shape[: max(0, v.dim() - len(site.plates) - site.event_dim)]))
        if v.is_floating_point() or v.is_complex():
            floating.setdefault((v.dtype, v.device), []).append(v.reshape(-1))
    # all values of one dtype and device in one isfinite, and one sync for all of them; skipped inside
    # torch.compile'd code (the compiled objective checks the data before it runs the program)
    if floating and not torch.compiler.is_compiling():
        finite = [torch.isfinite(torch.cat(vs) if len(vs) > 1 else vs[0]).all().cpu() for vs in floating.values()]
        ok = bool(torch.stack(finite).all()) if len(finite) > 1 else bool(finite[0])
    else:
        ok = True
    if not ok:
        values = {n: as_data(n, data[n]) for n in obs}
        bad = [n for n, v in values.items() if (v.is_floating_point() or v.is_complex())
               and not bool(torch.isfinite(v).all())]
        what = ["NaN" if bool(torch.isnan(values[n]).any()) else "an infinite value" for n in bad]
        raise TMCError(f"observation(s) {bad}: the observed value contains {' or '.join(sorted(set(what)))}; a "
                       "missing observation must be removed from the data, not marked with NaN, and an observed "
                       "value must be finite")
    try:
        return tuple(torch.broadcast_shapes(*shapes)) if shapes else ()
    except RuntimeError:
        raise TMCError(f"the batch shapes of the observed values do not broadcast: {dict(zip(obs, shapes))}") from None


def build_graph(model: Model, index_of: Mapping[str, str], index_sizes: Mapping[str, int],
                index_plates: Mapping[str, Tuple[str, ...]]) -> FactorGraph:
    """The factor graph of a model under an index assignment.

    One factor per site, named after it: a latent's factor spans its own index
    and its prior parents' indices; an observation's its parents' indices.
    """
    g = FactorGraph()
    for p, n in model.plates.items():
        g.plate(p, n)
    for i, size in index_sizes.items():
        g.index(i, size, plates=index_plates[i])
    for name in model.order():
        g.factor(name, factor_indices(model, index_of, name), plates=model.sites[name].plates)
    return g


def factor_indices(model: Model, index_of: Mapping[str, str], name: str) -> List[str]:
    """The indices of a site's factor: its own (latents), then its prior parents'."""
    site = model.sites[name]
    idx = [index_of[name]] if site.kind == "latent" else []
    for p in site.parents:
        if index_of[p] not in idx:
            idx.append(index_of[p])
    return idx

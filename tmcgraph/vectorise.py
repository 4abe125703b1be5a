"""Sites declared in `Model.batch_sites` that share a function, evaluated in one batched call (TMC traces).

A chain written as ``for t in range(T): m.latent(f"z{t}", prior=lambda prev: Normal(0.9 * prev, s), ...)``
creates ``T`` functions with one code object and one closure.  Under the layout contract of
`tmcgraph.model` a site function broadcasts over leading data-batch dims, so such sites can be
evaluated together: their arguments are stacked along a new leftmost batch dim (one per member),
the function is called once, and the log-density is unbound into the members' factors.  Three roles
are batched, each over sites without plates whose latents sit on indices of one size:

* ``"proposal"``: sampled latents with factorised proposals (no parents) of one code and closure;
  defaults that are ``int`` may differ between members (``lambda t=t: Normal(loc[t], s[t])``) and
  are passed as a ``LongTensor`` shaped ``(members, 1, ..., 1)``;
* ``"prior"``: the priors of sampled latents, given their latent parents;
* ``"likelihood"``: observations given their latent parents.

Batching is an optimisation, never a change of meaning, and no check made on some inputs can prove
that a function broadcasts on all of them (a function may read its argument's shape, branch on its
values, or count its calls).  So only sites declared in `Model.batch_sites`, whose author promises
that their functions follow the layout contract, are grouped; every other site is evaluated on its own.
A declared group with ``verify=True`` is computed both ways at the first evaluation of every new input
layout (data batch shape, index sizes, the data's dtypes and devices); a disagreement beyond float
rounding, or a batched call that fails, is a `TMCError` naming the sites, never a silent fallback.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributions import Distribution, constraints

from .declaration import ModelBase as Model
from .errors import TMCError
from .layout import Layout
from .support import Checks, log_prob_in_support, observed_log_prob

__all__ = ["Group", "Groups", "agree", "candidate_groups", "failed"]

_MIN_MEMBERS = 3  # smaller groups are not worth the stacking


@dataclass(frozen=True)
class Group:
    """Sites whose function (of role ``role``) shares code, closure and defaults.

    ``varying``: names of ``int`` defaults that differ between members (proposals only);
    ``mode``: ``"verify"`` or ``"trust"`` (`Model.batch_sites`).
    """

    role: str
    members: Tuple[str, ...]
    varying: Tuple[str, ...] = ()
    mode: str = "verify"


def failed(g: Group, what: str) -> TMCError:
    """The error of a declared group whose batched evaluation failed or disagreed."""
    members = list(g.members)
    shown = ", ".join(repr(m) for m in members[:3]) + (f", ... ({len(members)} sites)" if len(members) > 3 else "")
    return TMCError(
        f"sites {shown}, declared in Model.batch_sites(): {what}. Their {g.role} function does not broadcast over "
        "a new leftmost batch dim as the block promises (it reads an argument's shape or leading dim, combines "
        "values across it, branches on them, or has side effects); declare these sites outside batch_sites()")


def _fn_key(fn: object, *, ints_vary: bool) -> Optional[Tuple[tuple, Tuple[str, ...]]]:
    """(key, names of int defaults) of a plain Python function; ``None`` for anything else."""
    if not isinstance(fn, types.FunctionType):
        return None
    try:
        closure = tuple(id(c.cell_contents) for c in (fn.__closure__ or ()))
    except ValueError:  # an empty cell
        return None
    code = fn.__code__
    defaults = fn.__defaults__ or ()
    names = code.co_varnames[code.co_argcount - len(defaults): code.co_argcount]
    dkey: List[tuple] = []
    varying: List[str] = []
    for name, d in zip(names, defaults):
        if ints_vary and type(d) is int:
            varying.append(name)
            dkey.append(("int", name))
        else:
            dkey.append(("id", id(d)))
    kw = tuple(sorted((k, id(v)) for k, v in (fn.__kwdefaults__ or {}).items()))
    return (code, closure, tuple(dkey), kw, id(fn.__globals__)), tuple(varying)


def candidate_groups(model: Model) -> List[Group]:
    """The groups of a model's sites that could be batched (the layout decides at evaluation)."""
    in_family = {m for f in model.families.values() for m in f.members}
    buckets: Dict[tuple, List[str]] = {}
    varying: Dict[tuple, Tuple[str, ...]] = {}
    for name, site in model.sites.items():
        if name in in_family or site.plates or site.batch == "no":
            continue
        parents_latent = all(model.sites[p].kind == "latent" and not model.sites[p].enumerate for p in site.parents)
        if site.kind == "observed":
            k = _fn_key(site.fn, ints_vary=False)
            if k is not None and site.parents and parents_latent:
                buckets.setdefault(("likelihood", site.batch, k[0], len(site.parents), site.event_dim), []).append(name)
            continue
        if site.enumerate or site.proposal is None:
            continue
        shortcut = site.proposal is site.fn and site.proposal_parents == site.parents  # factor 0, no prior call
        if not site.proposal_parents and not shortcut:
            k = _fn_key(site.proposal, ints_vary=True)
            if k is not None:
                key = ("proposal", site.batch, k[0])
                buckets.setdefault(key, []).append(name)
                varying[key] = k[1]
        if not shortcut and parents_latent:
            k = _fn_key(site.fn, ints_vary=False)
            if k is not None:
                buckets.setdefault(("prior", site.batch, k[0], len(site.parents)), []).append(name)
    return [Group(key[0], tuple(members), varying.get(key, ()), key[1]) for key, members in buckets.items()
            if len(members) >= _MIN_MEMBERS]


def _call(fn: types.FunctionType, args: Sequence[torch.Tensor], kwargs: Dict[str, torch.Tensor]) -> Distribution:
    d = fn(*args, **kwargs)
    if not isinstance(d, Distribution):
        raise TypeError(f"expected a Distribution, got {type(d).__name__}")
    return d


def _fits(shape: Sequence[int], allowed: Sequence[int]) -> bool:
    return len(shape) <= len(allowed) and all(b == 1 or b == a for b, a in zip(shape[::-1], allowed[::-1]))


class Groups:
    """One estimator's batching state.

    The candidate groups and the input layouts each group was verified on (``verified[(role, members, layout key)]``).
    """

    def __init__(self, model: Model) -> None:
        self.groups = candidate_groups(model)
        self.verified: Dict[tuple, bool] = {}
        self.defaults: Dict[tuple, Dict[str, torch.Tensor]] = {}  # a proposal group's stacked int defaults

    def active(self, model: Model, layout: Layout, data: Sequence[torch.Tensor] = ()) -> "Batch":
        """The groups this layout can batch (every member and parent on an index of its own, one size).

        ``data``: the observed values, whose dtypes and devices are part of the input layout.
        """
        key = (layout.batch, tuple(sorted(layout.index_sizes.items())), tuple((v.dtype, v.device) for v in data))
        return Batch(model, layout, [g for g in self.groups if self._fits_layout(model, layout, g)], self, key)

    @staticmethod
    def _fits_layout(model: Model, layout: Layout, g: Group) -> bool:
        shapes = set()
        for m in g.members:
            site = model.sites[m]
            names = ([m] if site.kind == "latent" else []) + list(site.parents)
            idx = [layout.index_of[n] for n in names]
            if len(set(idx)) != len(idx):
                return False
            shapes.add(tuple(layout.index_sizes[i] for i in idx))
        return len(shapes) == 1


class Batch:
    """The batched groups of one evaluation (built by `Groups.active`)."""

    def __init__(self, model: Model, layout: Layout, groups: Sequence[Group], state: Groups, key: tuple) -> None:
        self.model, self.layout, self.state, self.key = model, layout, state, key
        self.of: Dict[Tuple[str, str], Tuple[Group, int]] = {}
        # per group (by identity): batched in this evaluation (trusted, or verified on this layout) or verified now
        self._batched = {id(g): g.mode == "trust" or state.verified.get((g.role, g.members, key), False)
                         for g in groups}
        for g in groups:
            for k, m in enumerate(g.members):
                self.of[(g.role, m)] = (g, k)
        self.sampled: Dict[str, Tuple[torch.Tensor, int]] = {}  # member -> (stacked samples, position)
        self.device: Optional[torch.device] = None  # where stacked int defaults are made (the data's device)
        self.checks = Checks()  # the evaluation's value checks (set by the trace)
        self.supports: Dict[str, constraints.Constraint] = {}  # batched observation -> the support checked
        self.pending: Dict[Tuple[str, Tuple[str, ...]], Group] = {}

    def mode(self, role: str, name: str) -> Optional[str]:
        """``None`` (site by site), ``"batched"`` or ``"verify"`` (site by site, checked against batched)."""
        hit = self.of.get((role, name))
        if hit is None:
            return None
        return "batched" if self._batched[id(hit[0])] else "verify"

    def group(self, role: str, name: str) -> Group:
        return self.of[(role, name)][0]

    # -- batched computations ----------------------------------------------------------------------
    def _canonical(self, value: torch.Tensor, index: str, event_dim: int) -> torch.Tensor:
        """A value that varies along its own index only, moved to the slot of ``index``."""
        events = tuple(value.shape[value.dim() - event_dim:]) if event_dim else ()
        return value.reshape(self.layout.template([index], ()) + events)

    def _int_defaults(self, g: Group, fn: types.FunctionType) -> Dict[str, torch.Tensor]:
        ndim = len(self.layout.batch) + self.layout.ndim
        key = (g.members, ndim, self.device)
        cached = self.state.defaults.get(key)
        if cached is not None:
            return cached
        out = self.state.defaults[key] = {}
        for name in g.varying:
            steps = [inspect.signature(self.model.sites[m].proposal).parameters[name].default  # type: ignore
                     for m in g.members]
            out[name] = torch.tensor(steps, device=self.device).reshape((len(steps),) + (1,) * ndim)
        return out

    def proposal(self, g: Group) -> Tuple[Distribution, Tuple[int, ...]]:
        """The group's proposal, called once: a distribution over ``(members, *template of member 0)``."""
        first = self.model.sites[g.members[0]]
        fn = first.proposal
        assert isinstance(fn, types.FunctionType)
        template = (len(g.members),) + self.layout.template([self.layout.index_of[g.members[0]]], ())
        q = _call(fn, [], self._int_defaults(g, fn))
        if not _fits(q.batch_shape, template):
            raise ValueError(f"batch shape {tuple(q.batch_shape)} does not fit {template}")
        return q.expand(torch.Size(template)), template

    def sample(self, g: Group, rsample: bool) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, int]]:
        """Every member's ``(sample in the layout, log q (*batch, K), event dims)`` from one batched draw."""
        try:
            q, _ = self.proposal(g)
        except TMCError:
            raise
        except Exception as err:
            raise failed(g, f"called once for all of them, the proposal failed ({type(err).__name__}: {err})") from err
        z = q.rsample() if rsample and q.has_rsample else q.sample()
        lq = q.log_prob(z)  # (G, *batch, layout dims): K along member 0's own index only
        ev = len(q.event_shape)
        G, K = len(g.members), self.layout.index_sizes[self.layout.index_of[g.members[0]]]
        lq = lq.reshape((G,) + self.layout.batch + (K,))  # as the members' own factors (*batch, K)
        out = {}
        for k, (m, zk, lqk) in enumerate(zip(g.members, z.unbind(0), lq.unbind(0))):
            out[m] = (self._canonical(zk, self.layout.index_of[m], ev), lqk, ev)
            self.sampled[m] = (z, k)
        return out

    def proposal_log_prob(self, g: Group, values: Dict[str, torch.Tensor], event_dims: Dict[str, int]
                          ) -> List[torch.Tensor]:
        """Log q of given member values under the batched proposal (for verification), in each member's layout."""
        q, _ = self.proposal(g)
        own0 = self.layout.index_of[g.members[0]]
        z = torch.stack([self._canonical(values[m], own0, event_dims[m]) for m in g.members])
        lq = q.log_prob(z)
        return [self._canonical(x, self.layout.index_of[m], 0) for m, x in zip(g.members, lq.unbind(0))]

    def _stacked_parent(self, g: Group, j: int, index: str, values: Dict[str, torch.Tensor],
                        event_dims: Dict[str, int]) -> torch.Tensor:
        return self._stacked([self.model.sites[m].parents[j] for m in g.members], index, values, event_dims)

    def _stacked(self, parents: List[str], index: str, values: Dict[str, torch.Tensor],
                 event_dims: Dict[str, int]) -> torch.Tensor:
        """The values of ``parents`` stacked along a new leading dim.

        Each on the slot of ``index`` (picked from a batched draw in one call when they all come from one).
        """
        evs = {event_dims[p] for p in parents}
        if len(evs) != 1:
            raise ValueError("parents with different event dims")
        ev = evs.pop()
        # runs of consecutive members of one batched draw are sliced from it; any other value is moved alone
        pieces: List[torch.Tensor] = []
        k = 0
        while k < len(parents):
            src = self.sampled.get(parents[k])
            end = k + 1
            if src is not None:
                while end < len(parents):
                    nxt = self.sampled.get(parents[end])
                    if nxt is None or nxt[0] is not src[0] or nxt[1] != src[1] + end - k:
                        break
                    end += 1
                run = src[0].narrow(0, src[1], end - k)
                events = tuple(run.shape[run.dim() - ev:]) if ev else ()
                pieces.append(run.reshape((end - k,) + self.layout.template([index], ()) + events))
            else:
                pieces.append(self._canonical(values[parents[k]], index, ev).unsqueeze(0))
            k = end
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    def log_factors(self, g: Group, values: Dict[str, torch.Tensor], event_dims: Dict[str, int]
                    ) -> List[torch.Tensor]:
        try:
            return self._log_factors(g, values, event_dims)
        except TMCError:
            raise
        except Exception as err:
            raise failed(g, f"called once for all of them, the {g.role} failed ({type(err).__name__}: {err})") from err

    def _log_factors(self, g: Group, values: Dict[str, torch.Tensor], event_dims: Dict[str, int]
                     ) -> List[torch.Tensor]:
        """The members' log-densities (prior or likelihood) from one call.

        As factors ``(*batch, [K own], *K parents)`` (a latent's own index first, then its parents').
        """
        model, layout = self.model, self.layout
        first = model.sites[g.members[0]]
        fn = first.fn
        assert isinstance(fn, types.FunctionType)
        own = [layout.index_of[g.members[0]]] if g.role == "prior" else []
        pidx = [layout.index_of[p] for p in first.parents]
        args = [self._stacked_parent(g, j, i, values, event_dims) for j, i in enumerate(pidx)]
        G = len(g.members)
        template = (G,) + layout.template(own + pidx, ())
        d = _call(fn, args, {})
        if not _fits(d.batch_shape, template):
            raise ValueError(f"batch shape {tuple(d.batch_shape)} does not fit {template}")
        if g.role == "prior":
            x = self._stacked(list(g.members), own[0], values, event_dims)
            lp = log_prob_in_support(d, x)  # a wider proposal's samples: -inf outside the prior's support
        else:
            e = first.event_dim
            if len(d.event_shape) != e:
                raise ValueError("event dims differ from the declaration")
            x = torch.stack(torch.broadcast_tensors(*[values[m] for m in g.members]))
            owner = f"observations {g.members[0]!r}..{g.members[-1]!r}"
            lp, support = observed_log_prob(owner, d, x, layout.index_dims, self.checks)
            if support is not None:
                self.supports.update(dict.fromkeys(g.members, support))
        lp = lp.reshape((1,) * (len(template) - lp.dim()) + tuple(lp.shape)).expand(template)
        nb = len(layout.batch)
        slots = [1 + nb + layout.ndim + layout.index_pos[i] for i in own + pidx]
        rest = [d_ for d_ in range(1 + nb, len(template)) if d_ not in slots]
        lp = lp.permute([0] + list(range(1, 1 + nb)) + slots + rest)
        lp = lp.reshape(lp.shape[: 1 + nb + len(slots)])
        return list(lp.unbind(0))


def agree(batched: torch.Tensor, single: torch.Tensor) -> bool:
    """Whether a batched log-density equals the site-by-site one (within float rounding)."""
    try:
        b, s = torch.broadcast_tensors(batched.detach(), single.detach())
    except RuntimeError:
        return False
    finite = torch.isfinite(s)
    if not torch.equal(finite, torch.isfinite(b)) or not torch.equal(b[~finite], s[~finite]):
        return False
    tol = 1e-5 if s.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-9
    return bool(torch.allclose(b[finite], s[finite], rtol=tol, atol=tol))

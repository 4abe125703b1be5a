"""Sampling and factor building: one draw of every latent and the log-factors over sample indices.

Every estimator builds on :func:`trace`: it visits the sites in topological
order, draws each sampled latent from its proposal (a mixture over its latent
parents' samples when they live on other indices, appendix C of the TMC paper),
and turns prior, proposal and likelihood densities into log-factors
``(*batch, *plates, *indices)``.  What differs between estimators is the index
assignment in the :class:`~tmcgraph.layout.Layout`.  :func:`site_density`, the
checked call of one site's prior or likelihood, is shared with
:class:`~tmcgraph.JointDensity`, which evaluates given values instead of sampling.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Mapping, Optional

import torch
from torch.distributions import Distribution

from .errors import TMCError
from .layout import Layout, call_site_fn, check_proposal, factor_indices
from .model import Model

__all__ = ["Trace", "site_density", "trace"]


def _select(value: torch.Tensor, event_dim: int, src: int, dst: int, choice: torch.Tensor) -> torch.Tensor:
    """Pick, for every position of ``choice``, the sample ``choice`` names along ``src``.

    ``value`` varies along layout dim ``src`` (K_src samples; negative position
    counted before the event dims) and is 1 along ``dst``; ``choice`` holds ints
    in ``[0, K_src)`` and has size K_dst along ``dst`` and 1 along ``src``.
    Returns a tensor with size K_dst along ``dst`` and 1 along ``src``.
    """
    e = event_dim
    v = value.transpose(src - e, dst - e)
    ch = choice.reshape(tuple(choice.shape) + (1,) * e)
    nd = max(v.dim(), ch.dim())
    v = v.reshape((1,) * (nd - v.dim()) + tuple(v.shape))
    ch = ch.reshape((1,) * (nd - ch.dim()) + tuple(ch.shape))
    d = nd + dst - e
    vs = [max(a, b) for a, b in zip(v.shape, ch.shape)]
    cs = list(vs)
    vs[d], cs[d] = v.shape[d], ch.shape[d]
    return torch.gather(v.expand(vs), d, ch.expand(cs))


def _logmeanexp_dims(t: torch.Tensor, ndim: int, dims: List[int]) -> torch.Tensor:
    if not dims:
        return t
    if t.dim() < ndim:
        t = t.reshape((1,) * (ndim - t.dim()) + tuple(t.shape))
    shift = sum(math.log(t.shape[d]) for d in dims)
    return torch.logsumexp(t, dim=dims, keepdim=True) - shift


@dataclass
class Trace:
    """One draw of every latent and the resulting log-factors.

    Attributes:
        layout: the dim layout of ``values``.
        values: site name -> samples (latents) or observed value, in layout.
        factors: site name -> log-factor ``(*batch, *plates, *indices)``.
        event_dims: latent -> number of event dims of its values.
        hat_factors: with ``dregs=True``, the factors whose gradient keeps only
            the path through the reparameterised samples (appendix F's w-hat).
        samples: with ``detach_samples=True``, latent -> the reparameterised
            samples (``values`` then holds detached leaves of them).
    """

    layout: Layout
    values: Dict[str, torch.Tensor]
    factors: Dict[str, torch.Tensor]
    event_dims: Dict[str, int]
    hat_factors: Optional[Dict[str, torch.Tensor]] = None
    samples: Optional[Dict[str, torch.Tensor]] = None


def site_density(layout: Layout, model: Model, name: str, values: Mapping[str, torch.Tensor],
                 event_dims: Mapping[str, int], *, sample_index: Optional[str] = None) -> Distribution:
    """The prior (latent) or likelihood (observation) of site ``name`` given its parents' values.

    Calls the site's function with its parents' values (in the layout) and checks
    the distribution: it may vary along its parents' indices and its plates only
    (:meth:`Layout.density`); errors name the site and the function.

    Args:
        layout: the evaluation's layout.
        model: the model.
        name: a site.
        values: at least the site's parents -> values in the layout.
        event_dims: the same keys -> number of event dims.
        sample_index: expand the result along this index as well (e.g. the
            particle index of :class:`~tmcgraph.JointDensity`).

    Returns:
        the distribution, expanded to the layout.
    """
    site = model.sites[name]
    owner = f"latent {name!r} prior" if site.kind == "latent" else f"observation {name!r} likelihood"
    parent_idx = list(dict.fromkeys(layout.index_of[p] for p in site.parents))
    return layout.density(owner, site.fn, [values[p] for p in site.parents], [event_dims[p] for p in site.parents],
                          parent_idx, site.plates, sample_index=sample_index)


def trace(model: Model, layout: Layout, data: Mapping[str, object], *, dregs: bool = False,
          detach_samples: bool = False,
          rng: Optional[Callable[[str], ContextManager[object]]] = None) -> Trace:
    """Sample every latent in topological order and compute every log-factor.

    Args:
        model: the model.
        layout: index assignment and batch shape; not modified (the returned
            trace's layout is a copy with the enumerated latents' support sizes).
        data: observation name -> value ``(*batch, *plates, *event)``.
        dregs: also build the w-hat factors of the paper's DReGs surrogate.
        detach_samples: every sampled latent's value in ``values`` (and so in
            every factor) is a fresh leaf ``z.detach().requires_grad_()``; the
            reparameterised samples ``z`` themselves go to ``samples``.  The
            factors are then functions of the sample values alone (proposal
            parameters enter only through ``samples``), which is what the TMC
            DReGs surrogate differentiates.
        rng: ``rng(name)`` is a context manager entered around the random draws
            of sampled latent ``name`` (sharded evaluation switches between a
            stream shared by all processes and a per-process one).
    """
    layout = layout.copy()  # enumerated sizes are filled in on the copy, returned in the Trace
    values: Dict[str, torch.Tensor] = {}
    factors: Dict[str, torch.Tensor] = {}
    hats: Optional[Dict[str, torch.Tensor]] = {} if dregs else None
    samples: Optional[Dict[str, torch.Tensor]] = {} if detach_samples else None
    arg_events: Dict[str, int] = {}  # event dims of every value a function may take
    for name in model.observations():
        values[name] = layout.data_value(name, data[name])
        arg_events[name] = model.sites[name].event_dim
    event_dims: Dict[str, int] = {}


    for name in model.order():
        site = model.sites[name]
        if site.kind == "observed":
            owner = f"observation {name!r}"
            d = site_density(layout, model, name, values, arg_events)
            idx = factor_indices(model, layout.index_of, name)
            if len(d.event_shape) != site.event_dim:
                raise TMCError(
                    f"{owner}: the likelihood has event shape {tuple(d.event_shape)} ({len(d.event_shape)} dims) "
                    f"but the observation was declared with event_dim={site.event_dim}"
                )
            lp = d.log_prob(values[name])
            factors[name] = layout.to_factor(lp, owner, idx, site.plates)
            if hats is not None:
                hats[name] = factors[name]
            continue
        owner = f"latent {name!r}"
        own = layout.index_of[name]
        pos = layout.index_pos[own]
        idx = factor_indices(model, layout.index_of, name)
        if site.enumerate:
            d = site_density(layout, model, name, values, arg_events)
            if not getattr(d, "has_enumerate_support", False):
                raise TMCError(
                    f"{owner}: enumerate=True needs a prior with enumerable support (Bernoulli, Categorical, ...), "
                    f"got {type(d).__name__}"
                )
            support = d.enumerate_support(expand=False)
            k = support.shape[0]
            event = tuple(support.shape[1 + len(d.batch_shape):])
            shape = [1] * layout.ndim
            shape[pos] = k
            value = support.reshape(tuple(shape) + event)
            layout.index_sizes[own] = k
            event_dims[name] = arg_events[name] = len(event)
            values[name] = value
            lp = d.log_prob(value)
            factors[name] = layout.to_factor(lp, owner, idx, site.plates)
            if hats is not None:
                hats[name] = factors[name]
            continue
        # sampled latent: draw from the proposal (mixture over parents on other indices)
        proposal = site.proposal
        assert proposal is not None  # a sampled latent always has one (the prior by default)
        args: List[torch.Tensor] = []
        own_args: List[torch.Tensor] = []
        mix: List[int] = []
        with rng(name) if rng is not None else contextlib.nullcontext():
            for p in site.proposal_parents:
                parent = model.sites[p]
                if parent.kind == "observed" or layout.index_of[p] == own:
                    args.append(values[p])
                    own_args.append(values[p])
                    continue
                pidx = layout.index_of[p]
                choice = torch.randint(layout.index_sizes[pidx], layout.template([own], site.plates),
                                       device=values[p].device)
                args.append(_select(values[p], event_dims[p], layout.index_pos[pidx], pos, choice))
                own_args.append(values[p])
                mix.append(layout.index_pos[pidx])
            # a proposal varies along the latent's own index only through its latent parents' selected samples
            latent_parents = any(model.sites[p].kind == "latent" for p in site.proposal_parents)
            q = layout.density(f"{owner} proposal", proposal, args, [arg_events[p] for p in site.proposal_parents],
                               [own] if latent_parents else [], site.plates, sample_index=own)
            if q.has_rsample:
                z = q.rsample()
            else:
                if dregs or detach_samples:
                    raise TMCError(f"{owner}: DReGs needs a reparameterised proposal; {type(q).__name__} has no "
                                   "rsample")
                z = q.sample()
        event_dims[name] = arg_events[name] = len(q.event_shape)
        if samples is not None:
            samples[name] = z
            z = z.detach().requires_grad_()
        values[name] = z
        if (proposal is site.fn and site.proposal_parents == site.parents and not mix and hats is None
                and samples is None):
            # proposal = prior with the same parent values: log p - log q is identically 0 (gradient too)
            factors[name] = layout.to_factor(torch.zeros((), dtype=z.dtype, device=z.device), owner, idx, site.plates)
            continue
        if mix:
            q_all = call_site_fn(f"{owner} proposal", proposal, own_args)
            lq = _logmeanexp_dims(q_all.log_prob(z), layout.ndim, mix)
        else:
            lq = q.log_prob(z)
        prior = site_density(layout, model, name, values, arg_events)
        check_proposal(name, prior, q)
        lp = prior.log_prob(z)
        factors[name] = layout.to_factor(lp - lq, owner, idx, site.plates)
        if hats is not None:
            # cancel the direct dependence of log q on its parameters (appendix F, eq. 59):
            # add log q(detached samples) - stop_gradient(same), which is zero with the score as gradient
            det = [a.detach() for a in (own_args if mix else args)]
            q_det = call_site_fn(f"{owner} proposal", proposal, det)
            lq_det = _logmeanexp_dims(q_det.log_prob(z.detach()), layout.ndim, mix)
            hats[name] = layout.to_factor(lp - lq + (lq_det - lq_det.detach()), owner, idx, site.plates)
    return Trace(layout, values, factors, event_dims, hats, samples)

"""Sampling and factor building: one draw of every latent and the log-factors over sample indices.

Every estimator builds on `trace`: it visits the sites in topological
order, draws each sampled latent from its proposal (a mixture over its latent
parents' samples when they live on other indices, appendix C of the TMC paper),
and turns prior, proposal and likelihood densities into log-factors
``(*batch, *plates, *indices)``.  What differs between estimators is the index
assignment in the `Layout`.  `site_density`, the
checked call of one site's prior or likelihood, is shared with
`JointDensity`, which evaluates given values instead of sampling.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Mapping, Optional, Tuple

import torch
from torch.distributions import Distribution, constraints

from .declaration import Family
from .declaration import ModelBase as Model
from .errors import TMCError
from .layout import Layout, call_site_fn, factor_indices
from .support import Checks, check_proposal, log_prob_in_support, observed_log_prob
from .vectorise import Batch, Groups, agree, failed

__all__ = ["Trace", "Tracer", "site_density", "trace"]


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
        checks: the value checks made (`tmcgraph.support.Checks`); inside ``torch.compile``'d
            code, their flags.
        supports: observation -> the support its value was checked against (when it does not
            depend on the samples).
    """

    layout: Layout
    values: Dict[str, torch.Tensor]
    factors: Dict[str, torch.Tensor]
    event_dims: Dict[str, int]
    hat_factors: Optional[Dict[str, torch.Tensor]] = None
    samples: Optional[Dict[str, torch.Tensor]] = None
    checks: Checks = field(default_factory=Checks)
    supports: Dict[str, constraints.Constraint] = field(default_factory=dict)


def site_density(layout: Layout, model: Model, name: str, values: Mapping[str, torch.Tensor],
                 event_dims: Mapping[str, int], *, sample_index: Optional[str] = None) -> Distribution:
    """The prior (latent) or likelihood (observation) of site ``name`` given its parents' values.

    Calls the site's function with its parents' values (in the layout) and checks
    the distribution: it may vary along its parents' indices and its plates only
    (`Layout.density`); errors name the site and the function.

    Args:
        layout: the evaluation's layout.
        model: the model.
        name: a site.
        values: at least the site's parents -> values in the layout.
        event_dims: the same keys -> number of event dims.
        sample_index: expand the result along this index as well (e.g. the
            particle index of `JointDensity`).

    Returns:
        the distribution, expanded to the layout.
    """
    site = model.sites[name]
    owner = f"latent {name!r} prior" if site.kind == "latent" else f"observation {name!r} likelihood"
    parent_idx = list(dict.fromkeys(layout.index_of[p] for p in site.parents))
    return layout.density(owner, site.fn, [values[p] for p in site.parents], [event_dims[p] for p in site.parents],
                          parent_idx, site.plates, sample_index=sample_index)


def _vectorised_families(model: Model, layout: Layout) -> Dict[str, Family]:
    """Member -> family, for the families this layout evaluates vectorised.

    Every member on its own index of one size (the TMC layout; a shared particle index evaluates site by site).
    """
    out: Dict[str, Family] = {}
    for fam in model.families.values():
        latent = fam if fam.kind == "markov" else model.families[fam.of or ""]
        indices = [layout.index_of[m] for m in latent.members]
        if len(set(indices)) != len(indices) or len({layout.index_sizes[i] for i in indices}) != 1:
            continue
        out.update({m: fam for m in fam.members})
    return {m: fam for m, fam in out.items() if fam.kind == "markov" or model.families[fam.of or ""].members[0] in out}


def _call_family(owner: str, fn: Callable, args: List[torch.Tensor], takes_t: bool, t: torch.Tensor
                 ) -> Distribution:
    d = call_site_fn(owner, fn, args) if not takes_t else call_site_fn(owner, lambda *a: fn(*a, t=t), args)
    if not isinstance(d, Distribution):
        raise TMCError(f"{owner}: the function must return a torch.distributions.Distribution, got {type(d).__name__}")
    return d


def _check_batch(owner: str, d: Distribution, allowed: Tuple[int, ...], what: str) -> None:
    bs = tuple(d.batch_shape)
    if len(bs) > len(allowed) or any(b != 1 and b != a for b, a in zip(bs[::-1], allowed[::-1])):
        raise TMCError(
            f"{owner}: vectorised over the family's steps, the distribution's batch shape {bs} does not broadcast "
            f"to {allowed} ({what}); a family function must broadcast over leading dims, with the step as the "
            "rightmost batch dim (index per-step parameters with the argument t)"
        )


def _trace_markov(model: Model, layout: Layout, fam: Family, values: Dict[str, torch.Tensor],
                  factors: Dict[str, torch.Tensor], event_dims: Dict[str, int], arg_events: Dict[str, int],
                  stacked: Dict[str, torch.Tensor], checks: Checks) -> None:
    """All members of a markov family in batched calls: proposal, init and transition once each.

    Samples ``z`` are ``(*batch, K, T, *event)``; the transition's log-density is one tensor
    ``(*batch, K_prev, K_cur, T - 1)`` unbound into the members' factors ``(*batch, K_t, K_{t-1})``.
    """
    owner = f"markov family {fam.name!r}"
    members, T, nb = fam.members, len(fam.members), len(layout.batch)
    K = layout.index_sizes[layout.index_of[members[0]]]
    take_fn, _, take_q = fam.takes_t
    assert fam.proposal is not None and fam.init is not None
    device = next(iter(values.values())).device if values else None  # the data's: steps index parameters there
    q = _call_family(f"{owner} proposal", fam.proposal, [], take_q, torch.arange(T, device=device))
    _check_batch(f"{owner} proposal", q, (T,), "(steps,)")
    q = q.expand(torch.Size(layout.batch + (K, T)))
    z = q.rsample() if q.has_rsample else q.sample()
    lq = q.log_prob(z)  # (*batch, K, T)
    ev = len(q.event_shape)
    d0 = _call_family(f"{owner} init", fam.init, [], False, torch.arange(1))
    _check_batch(f"{owner} init", d0, (), "()")
    z0 = z.select(nb + 1, 0)
    lp0 = log_prob_in_support(d0, z0) if check_proposal(members[0], d0, q, checks) else d0.log_prob(z0)
    first = [lp0 - lq.select(nb + 1, 0)]  # (*batch, K)
    rest: List[torch.Tensor] = []
    if T > 1:
        prev = z.narrow(nb + 1, 0, T - 1).unsqueeze(nb + 1)  # (*batch, K, 1, T-1, *event)
        cur = z.narrow(nb + 1, 1, T - 1).unsqueeze(nb)  # (*batch, 1, K, T-1, *event)
        d = _call_family(f"{owner} transition", fam.fn, [prev], take_fn, torch.arange(1, T, device=z.device))
        _check_batch(f"{owner} transition", d, layout.batch + (K, 1, T - 1), "(*batch, K_prev, 1, steps)")
        lp = log_prob_in_support(d, cur) if check_proposal(members[1], d, q, checks) else d.log_prob(cur)
        lp = lp - lq.narrow(nb + 1, 1, T - 1).unsqueeze(nb)  # (*batch, K_prev, K_cur, T-1)
        lp = lp.expand(layout.batch + (K, K, T - 1))
        rest = list(lp.permute(nb + 2, *range(nb), nb + 1, nb).unbind(0))  # (*batch, K_t, K_{t-1}) each
    stacked[fam.name] = z
    events = tuple(z.shape[z.dim() - ev:]) if ev else ()
    for m, value, factor in zip(members, z.unbind(nb + 1), first + rest):
        values[m] = value.reshape(layout.template([layout.index_of[m]], ()) + events)
        factors[m] = factor
        event_dims[m] = arg_events[m] = ev


def _trace_observed(model: Model, layout: Layout, fam: Family, values: Dict[str, torch.Tensor],
                    factors: Dict[str, torch.Tensor], event_dims: Dict[str, int], arg_events: Dict[str, int],
                    stacked: Dict[str, torch.Tensor], checks: Checks) -> None:
    """All members of an observed family in one likelihood call: factors ``(*batch, K)`` per member."""
    owner = f"observed family {fam.name!r}"
    of = fam.of or ""
    z = stacked[of]  # (*batch, K, T, *event_z)
    members, T, nb = fam.members, len(fam.members), len(layout.batch)
    K = z.shape[nb]
    e = model.sites[members[0]].event_dim
    xs = [values[m].reshape(values[m].shape[: values[m].dim() - layout.ndim - e] + values[m].shape[
        values[m].dim() - e:]) for m in members]  # (*batch_m, *event)
    x = torch.stack(torch.broadcast_tensors(*xs), dim=-1 - e).unsqueeze(-2 - e)  # (*batch, 1, T, *event)
    d = _call_family(f"{owner} likelihood", fam.fn, [z], fam.takes_t[0], torch.arange(T, device=z.device))
    _check_batch(f"{owner} likelihood", d, layout.batch + (K, T), "(*batch, K, steps)")
    if len(d.event_shape) != e:
        raise TMCError(f"{owner}: the likelihood has event shape {tuple(d.event_shape)} ({len(d.event_shape)} dims) "
                       f"but the family was declared with event_dim={e}")
    lp, _ = observed_log_prob(owner, d, x, [-2], checks)  # the sample index is dim -2 of (*batch, K, T)
    for m, factor in zip(members, lp.unbind(-1)):
        factors[m] = factor


def trace(model: Model, layout: Layout, data: Mapping[str, object], *, dregs: bool = False,
          detach_samples: bool = False,
          rng: Optional[Callable[[str], ContextManager[object]]] = None,
          groups: Optional[Groups] = None) -> Trace:
    """Sample every latent in topological order and compute every log-factor: one pass of a `Tracer`.

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
        groups: an estimator's batching state (`tmcgraph.vectorise`): sites declared in
            `Model.batch_sites` that share a function are evaluated in one call.
    """
    tracer = Tracer(model, layout, data, dregs=dregs, detach_samples=detach_samples, rng=rng, groups=groups)
    for name in model.order():
        tracer.visit(name)
    return tracer.finish()


class Tracer:
    """The state of one pass over a model's sites: samples drawn and log-factors built so far.

    `trace` visits every site in topological order and returns the `Trace`; `tmcgraph.smc` visits the
    sites one resampling step at a time (each latent, then the observations whose last parent it is) and
    resamples ``values`` between steps.  Arguments as in `trace`; ``families=False`` evaluates the sites
    of `Model.markov` families one by one (a stepwise visitor needs them so).

    Attributes:
        layout: the trace's layout (a copy of the given one; enumerated sizes filled in).
        values: site name -> samples (latents) or observed value, in layout.
        factors: site name -> log-factor ``(*batch, *plates, *indices)``.
        event_dims: latent -> number of event dims of its values.
    """

    def __init__(self, model: Model, layout: Layout, data: Mapping[str, object], *, dregs: bool = False,
                 detach_samples: bool = False, rng: Optional[Callable[[str], ContextManager[object]]] = None,
                 groups: Optional[Groups] = None, families: bool = True) -> None:
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
        verify: Dict[str, Dict[str, torch.Tensor]] = {"proposal": {}, "prior": {}, "likelihood": {}}  # verification
        checks = Checks()
        supports: Dict[str, constraints.Constraint] = {}
        vectorised = (_vectorised_families(model, layout) if families and not (dregs or detach_samples or rng)
                      else {})
        stacked: Dict[str, torch.Tensor] = {}  # markov family -> its samples (*batch, K, T, *event)
        batch = None
        if groups is not None and groups.groups and not (dregs or detach_samples or rng):
            batch = groups.active(model, layout, list(values.values()))
            batch.checks = checks
            if values:  # the data's device: stacked int defaults index parameters there
                batch.device = next(iter(values.values())).device
        presampled: Dict[str, tuple] = {}  # batched proposal group member -> (value, log q (*batch, K), event dims)
        deferred: Dict[str, torch.Tensor] = {}  # member of a batched prior group -> its log q (*batch, K)

        self.layout = layout
        self.values = values
        self.factors = factors
        self.hats = hats
        self.samples = samples
        self.arg_events = arg_events
        self.event_dims = event_dims
        self.verify = verify
        self.checks = checks
        self.supports = supports
        self.vectorised = vectorised
        self.stacked = stacked
        self.batch = batch
        self.presampled = presampled
        self.deferred = deferred
        self.model, self.rng = model, rng
        self.dregs, self.detach_samples = dregs, detach_samples

    def visit(self, name: str) -> None:
        """Draw latent ``name`` (or weigh observation ``name``) and build its log-factor.

        Its parents must have been visited.
        """
        model, layout, rng = self.model, self.layout, self.rng
        values, factors, hats, samples = self.values, self.factors, self.hats, self.samples
        arg_events, event_dims, verify, checks = self.arg_events, self.event_dims, self.verify, self.checks
        supports, vectorised, stacked, batch = self.supports, self.vectorised, self.stacked, self.batch
        presampled, deferred, dregs, detach_samples = self.presampled, self.deferred, self.dregs, self.detach_samples
        fam = vectorised.get(name)
        if fam is not None:
            if name == fam.members[0]:
                build = _trace_markov if fam.kind == "markov" else _trace_observed
                build(model, layout, fam, values, factors, event_dims, arg_events, stacked, checks)
            return
        site = model.sites[name]
        if batch is not None and site.kind == "observed" and batch.mode("likelihood", name) == "batched":
            return  # computed with its group after the loop
        if site.kind == "observed":
            owner = f"observation {name!r}"
            d = site_density(layout, model, name, values, arg_events)
            idx = factor_indices(model, layout.index_of, name)
            if len(d.event_shape) != site.event_dim:
                raise TMCError(
                    f"{owner}: the likelihood has event shape {tuple(d.event_shape)} ({len(d.event_shape)} dims) "
                    f"but the observation was declared with event_dim={site.event_dim}"
                )
            lp, checked = observed_log_prob(owner, d, values[name], layout.index_dims, checks)
            if checked is not None:
                supports[name] = checked
            factors[name] = layout.to_factor(lp, owner, idx, site.plates)
            if batch is not None and batch.mode("likelihood", name) == "verify":
                verify["likelihood"][name] = factors[name]
            if hats is not None:
                hats[name] = factors[name]
            return
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
            return
        # sampled latent: draw from the proposal (mixture over parents on other indices)
        pmode = batch.mode("proposal", name) if batch is not None else None
        rmode = batch.mode("prior", name) if batch is not None else None
        if batch is not None and pmode == "batched":
            if name not in presampled:  # the group's first member: one draw for all
                presampled.update(batch.sample(batch.group("proposal", name), rsample=True))
            z, lq, ev = presampled[name]  # lq: (*batch, K), the member's own factor layout
            values[name] = z
            event_dims[name] = arg_events[name] = ev
            if rmode == "batched":
                deferred[name] = lq
                return
            prior = site_density(layout, model, name, values, arg_events)
            # verify mode checked the group's proposal against this prior site by site; trust takes it as declared
            lp = layout.to_factor(log_prob_in_support(prior, z), owner, idx, site.plates)
            factors[name] = lp - lq.reshape(tuple(lq.shape) + (1,) * (lp.dim() - lq.dim()))
            if rmode == "verify":
                verify["prior"][name] = lp
            return
        proposal = site.proposal
        assert proposal is not None  # a sampled latent always has one (the prior by default)
        args: List[torch.Tensor] = []
        own_args: List[torch.Tensor] = []
        mix: List[int] = []
        choices: Dict[str, torch.Tensor] = {}  # parent index -> the ancestor of each sample (one per index: the
        # latents of a group share an index, and a joint sample's members are chosen together)
        with rng(name) if rng is not None else contextlib.nullcontext():
            for p in site.proposal_parents:
                parent = model.sites[p]
                if parent.kind == "observed" or layout.index_of[p] == own:
                    args.append(values[p])
                    own_args.append(values[p])
                    continue
                pidx = layout.index_of[p]
                if pidx not in choices:
                    choices[pidx] = torch.randint(layout.index_sizes[pidx], layout.template([own], site.plates),
                                                  device=values[p].device)
                    mix.append(layout.index_pos[pidx])
                args.append(_select(values[p], event_dims[p], layout.index_pos[pidx], pos, choices[pidx]))
                own_args.append(values[p])
            # a proposal varies along the latent's own index only through its latent parents' selected samples
            latent_parents = any(model.sites[p].kind == "latent" for p in site.proposal_parents)
            # with no proposal given, the prior is the proposal: a failure is the prior's
            q_owner = f"{owner} proposal" if proposal is not site.fn else f"{owner} prior (also its proposal)"
            q = layout.density(q_owner, proposal, args, [arg_events[p] for p in site.proposal_parents],
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
            return
        if mix:
            q_all = call_site_fn(q_owner, proposal, own_args)
            lq = _logmeanexp_dims(q_all.log_prob(z), layout.ndim, mix)
        else:
            lq = q.log_prob(z)
        if pmode == "verify":
            verify["proposal"][name] = lq
        prior = site_density(layout, model, name, values, arg_events)
        masked = check_proposal(name, prior, q, checks)
        if rmode == "batched":
            deferred[name] = layout.to_factor(lq, owner, [own], ())
            return
        lp = log_prob_in_support(prior, z) if masked else prior.log_prob(z)
        factors[name] = layout.to_factor(lp - lq, owner, idx, site.plates)
        if rmode == "verify":
            verify["prior"][name] = layout.to_factor(lp, owner, idx, site.plates)
        if hats is not None:
            # cancel the direct dependence of log q on its parameters (appendix F, eq. 59):
            # add log q(detached samples) - stop_gradient(same), which is zero with the score as gradient
            det = [a.detach() for a in (own_args if mix else args)]
            q_det = call_site_fn(q_owner, proposal, det)
            lq_det = _logmeanexp_dims(q_det.log_prob(z.detach()), layout.ndim, mix)
            hats[name] = layout.to_factor(lp - lq + (lq_det - lq_det.detach()), owner, idx, site.plates)

    def finish(self) -> Trace:
        """The trace of the sites visited: batched groups completed and verified."""
        layout, values, factors, batch = self.layout, self.values, self.factors, self.batch
        supports = self.supports
        if batch is not None:
            _finish_groups(self.model, layout, batch, values, factors, self.arg_events, self.deferred, self.verify)
            supports.update(batch.supports)
        return Trace(layout, values, factors, self.event_dims, self.hats, self.samples, self.checks, supports)


def _finish_groups(model: Model, layout: Layout, batch: Batch, values: Dict[str, torch.Tensor],
                   factors: Dict[str, torch.Tensor], arg_events: Dict[str, int], deferred: Dict[str, torch.Tensor],
                   verify: Dict[str, Dict[str, torch.Tensor]]) -> None:
    """Batched priors and likelihoods of the groups batched in this evaluation.

    Verification of the others (whose site-by-site factors stand for this evaluation) on this input layout.
    """
    done = set()
    for (role, _), (group, _) in batch.of.items():
        key = (role, group.members)
        if key in done:
            continue
        done.add(key)
        if batch.mode(role, group.members[0]) == "verify":  # batched against the site-by-site values
            if role == "proposal":
                got = batch.proposal_log_prob(group, values, arg_events)
            else:
                got = batch.log_factors(group, values, arg_events)
            want = [verify[role][m] for m in group.members]
            bad = [m for m, g, w in zip(group.members, got, want) if not agree(g, w)]
            if bad:
                raise failed(group, f"evaluated in one call, the {role} log-density of {bad[0]!r} differs from its "
                                    "site-by-site value")
            batch.state.verified[(role, group.members, batch.key)] = True
            continue
        if role == "proposal":
            continue  # sampled in the loop
        lps = batch.log_factors(group, values, arg_events)
        for m, lp in zip(group.members, lps):
            if role == "prior":
                lq = deferred[m]  # (*batch, K): the member's own index
                lp = lp - lq.reshape(tuple(lq.shape) + (1,) * (lp.dim() - lq.dim()))
            factors[m] = lp

"""Estimators on a declared :class:`~tmcgraph.Model`: TMC, IWAE, SMC, DReGs, posterior summaries.

All of them share one sampling routine, :func:`trace`, that draws samples in
topological order and turns prior, proposal and likelihood densities into
log-factors over sample indices.  What differs is the index assignment:

* TMC: every sampled latent has its own index of K samples; a proposal whose
  parents are latents is the mixture over the parents' samples (appendix C,
  eqs. 46-47), so each latent's proposal factor depends on its own index only.
* IWAE: every sampled latent shares one particle index (joint samples); a
  proposal takes its parents' values of the same particle.
* Enumerated latents (``enumerate=True``) always get their own index over their
  support, with no proposal and no ``1/K`` (appendix D).

The log-factors go into a :class:`~tmcgraph.FactorGraph` compiled once; the
estimate is ``plan.log_sum(factors) - sum over sampled index copies of log K``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch.distributions import Distribution

from .errors import TMCError
from .graph import FactorGraph
from .model import (
    Layout,
    Model,
    build_graph,
    call_site_fn,
    check_proposal,
    data_batch_shape,
    factor_indices,
    index_slots,
)
from .plan import Plan
from .resampling import SCHEMES, gather, resample

PARTICLES = "@particles"


# ---------------------------------------------------------------------------
# sampling and factors
# ---------------------------------------------------------------------------
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
        hat_factors: with ``dregs=True``, the factors whose gradient keeps only
            the path through the reparameterised samples (appendix F's w-hat).
    """

    layout: Layout
    values: Dict[str, torch.Tensor]
    factors: Dict[str, torch.Tensor]
    event_dims: Dict[str, int]
    hat_factors: Optional[Dict[str, torch.Tensor]] = None
    samples: Optional[Dict[str, torch.Tensor]] = None


def trace(model: Model, layout: Layout, data: Mapping[str, object], *, dregs: bool = False,
          detach_samples: bool = False) -> Trace:
    """Sample every latent in topological order and compute every log-factor.

    Args:
        model: the model.
        layout: index assignment and batch shape (sizes of enumerated indices
            are filled in here).
        data: observation name -> value ``(*batch, *plates, *event)``.
        dregs: also build the w-hat factors of the paper's DReGs surrogate.
        detach_samples: every sampled latent's value in ``values`` (and so in
            every factor) is a fresh leaf ``z.detach().requires_grad_()``; the
            reparameterised samples ``z`` themselves go to ``samples``.  The
            factors are then functions of the sample values alone (proposal
            parameters enter only through ``samples``), which is what the TMC
            DReGs surrogate differentiates.
    """
    values: Dict[str, torch.Tensor] = {}
    factors: Dict[str, torch.Tensor] = {}
    hats: Optional[Dict[str, torch.Tensor]] = {} if dregs else None
    samples: Optional[Dict[str, torch.Tensor]] = {} if detach_samples else None
    arg_events: Dict[str, int] = {}  # event dims of every value a function may take
    for name in model.observations():
        values[name] = layout.data_value(name, data[name])
        arg_events[name] = model._sites[name].event_dim
    event_dims: Dict[str, int] = {}

    def density(role: str, fn: Callable, parents: Sequence[str], arg_values: List[torch.Tensor],
                indices: Sequence[str], **kw) -> Distribution:
        return layout.density(f"{owner} {role}", fn, arg_values, [arg_events[p] for p in parents], indices,
                              site.plates, **kw)

    for name in model.order():
        site = model._sites[name]
        parent_idx = list(dict.fromkeys(layout.index_of[p] for p in site.parents))
        if site.kind == "observed":
            owner = f"observation {name!r}"
            d = density("likelihood", site.fn, site.parents, [values[p] for p in site.parents], parent_idx)
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
            d = density("prior", site.fn, site.parents, [values[p] for p in site.parents], parent_idx)
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
        args, own_args, mix = [], [], []
        for p in site.proposal_parents:
            parent = model._sites[p]
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
        latent_parents = any(model._sites[p].kind == "latent" for p in site.proposal_parents)
        q = density("proposal", site.proposal, site.proposal_parents, args, [own] if latent_parents else [],
                    sample_index=own)
        if q.has_rsample:
            z = q.rsample()
        else:
            if dregs or detach_samples:
                raise TMCError(f"{owner}: DReGs needs a reparameterised proposal; {type(q).__name__} has no rsample")
            z = q.sample()
        event_dims[name] = arg_events[name] = len(q.event_shape)
        if samples is not None:
            samples[name] = z
            z = z.detach().requires_grad_()
        values[name] = z
        if (site.proposal is site.fn and site.proposal_parents == site.parents and not mix and hats is None
                and samples is None):
            # proposal = prior with the same parent values: log p - log q is identically 0 (gradient too)
            factors[name] = layout.to_factor(torch.zeros((), dtype=z.dtype, device=z.device), owner, idx, site.plates)
            continue
        if mix:
            q_all = call_site_fn(f"{owner} proposal", site.proposal, own_args)
            lq = _logmeanexp_dims(q_all.log_prob(z), layout.ndim, mix)
        else:
            lq = q.log_prob(z)
        prior = density("prior", site.fn, site.parents, [values[p] for p in site.parents], parent_idx)
        check_proposal(name, prior, q)
        lp = prior.log_prob(z)
        factors[name] = layout.to_factor(lp - lq, owner, idx, site.plates)
        if hats is not None:
            # cancel the direct dependence of log q on its parameters (appendix F, eq. 59):
            # add log q(detached samples) - stop_gradient(same), which is zero with the score as gradient
            det = [a.detach() for a in (own_args if mix else args)]
            q_det = call_site_fn(f"{owner} proposal", site.proposal, det)
            lq_det = _logmeanexp_dims(q_det.log_prob(z.detach()), layout.ndim, mix)
            hats[name] = layout.to_factor(lp - lq + (lq_det - lq_det.detach()), owner, idx, site.plates)
    return Trace(layout, values, factors, event_dims, hats, samples)


# ---------------------------------------------------------------------------
# estimators built on a factor graph of one index assignment
# ---------------------------------------------------------------------------
class _GraphEstimator:
    """Shared machinery: an index assignment, its factor graph and compiled plan."""

    def __init__(self, model: Model, index_of: Dict[str, str], sizes: Dict[str, Optional[int]],
                 index_plates: Dict[str, Tuple[str, ...]], *, optimize: str, memory_limit: Optional[int],
                 compile_now: bool = True) -> None:
        self.model = model
        self.index_of = index_of
        self._sizes = sizes
        self._index_plates = index_plates
        self.optimize = optimize
        self.memory_limit = memory_limit
        self._plans: Dict[tuple, Tuple[Plan, float]] = {}
        self._graphs: Dict[tuple, Tuple[FactorGraph, float]] = {}
        self._sampled = [n for n in model.latents() if not model._sites[n].enumerate]
        self._slots = index_slots(model, index_of)
        self._probed: set = set()  # layout checks already made (Layout.density)
        self._version = model._version
        if compile_now and all(s is not None for s in sizes.values()):
            self._plan_for(tuple(sizes.items()))

    def _graph_for(self, key: tuple) -> Tuple[FactorGraph, float]:
        """(factor graph, log-normaliser) for the index sizes in ``key``."""
        if key not in self._graphs:
            sizes = dict(key)
            graph = build_graph(self.model, self.index_of, sizes, self._index_plates)
            # 1/K for every copy of every sampled index (enumerated ones have none)
            norm = 0.0
            sampled = self._sampled_indices()
            for i, size in sizes.items():
                if i in sampled:
                    norm += math.log(size) * math.prod(self.model._plates[p] for p in self._index_plates[i])
            self._graphs[key] = (graph, norm)
        self.graph = self._graphs[key][0]
        return self._graphs[key]

    def _plan_for(self, key: tuple) -> Tuple[Plan, float]:
        """(plan, log-normaliser) for the index sizes in ``key``."""
        graph, norm = self._graph_for(key)
        if key not in self._plans:
            self._plans[key] = (graph.compile(optimize=self.optimize, memory_limit=self.memory_limit), norm)
        return self._plans[key]

    def _sampled_indices(self) -> set:
        return {self.index_of[n] for n in self._sampled}

    def _layout(self, data: Mapping[str, object]) -> Layout:
        if self.model._version != self._version:
            raise TMCError("the model was changed (a site or plate declared) after this estimator was built; "
                           "build the estimator again")
        return Layout(self.model, self.index_of, dict(self._sizes), data_batch_shape(self.model, data), self._slots,
                      self._probed)

    def _trace(self, data: Mapping[str, object], **kw) -> Tuple[Trace, Plan, float]:
        tr = trace(self.model, self._layout(data), data, **kw)
        plan, norm = self._plan_for(tuple(tr.layout.index_sizes.items()))
        return tr, plan, norm

    def _trace_only(self, data: Mapping[str, object]) -> Tuple[Trace, FactorGraph, float]:
        tr = trace(self.model, self._layout(data), data)
        graph, norm = self._graph_for(tuple(tr.layout.index_sizes.items()))
        return tr, graph, norm

    @property
    def plan(self) -> Plan:
        """The compiled plan (built at construction, or at the first evaluation
        when an enumerated latent's support size depends on its parents)."""
        if not self._plans:
            raise TMCError("the plan is built at the first evaluation: an enumerated latent's support size "
                           "is known only from its prior")
        return next(reversed(self._plans.values()))[0]


def _check_k(name: str, k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TMCError(f"K for latent {name!r} must be a positive int, got {k!r}")
    return k


def _enumerated_size(model: Model, name: str) -> Optional[int]:
    """Support size of an enumerated latent without parents (else None: known at evaluation)."""
    site = model._sites[name]
    if site.parents:
        return None
    d = call_site_fn(f"latent {name!r} prior", site.fn, [])
    if not getattr(d, "has_enumerate_support", False):
        raise TMCError(
            f"latent {name!r}: enumerate=True needs a prior with enumerable support (Bernoulli, Categorical, ...), "
            f"got {type(d).__name__}"
        )
    return int(d.enumerate_support(expand=False).shape[0])


class TMC(_GraphEstimator):
    """The Tensor Monte Carlo estimator of a model (built by :meth:`Model.compile`).

    ``P_TMC = 1/prod(K) * sum over all combinations of sample indices of
    p(x, z^k) / prod_i Q(z_i^{k_i})``, an unbiased estimate of ``p(x)``, computed
    as one contraction whose cost follows the model's tree-width.

    Attributes:
        K: samples per sampled latent.
        plan: the compiled :class:`~tmcgraph.Plan` (``plan.treewidth``, ``plan.describe()``).
        graph: the :class:`~tmcgraph.FactorGraph` of sample indices.
    """

    def __init__(self, model: Model, K: Union[int, Mapping[str, int]], *, optimize: str = "auto",
                 memory_limit: Optional[int] = None) -> None:
        latents = model.latents()
        sampled = [n for n in latents if not model._sites[n].enumerate]
        if isinstance(K, Mapping):
            unknown = [n for n in K if n not in latents]
            if unknown:
                raise TMCError(f"K given for {unknown}, which are not latents; latents: {latents}")
            enumerated = [n for n in K if model._sites[n].enumerate]
            if enumerated:
                raise TMCError(f"K given for enumerated latent(s) {enumerated}: their K is their support size")
            missing = [n for n in sampled if n not in K]
            if missing:
                raise TMCError(f"K has no entry for sampled latent(s) {missing}")
            self.K = {n: _check_k(n, K[n]) for n in sampled}
        else:
            self.K = {n: _check_k(n, K) for n in sampled}
        sizes = {n: self.K[n] if n in self.K else _enumerated_size(model, n) for n in latents}
        index_of = {n: n for n in latents}
        plates = {n: model._sites[n].plates for n in latents}
        super().__init__(model, index_of, sizes, plates, optimize=optimize, memory_limit=memory_limit)

    def log_marginal(self, data: Mapping[str, object]) -> torch.Tensor:
        """log of the TMC estimate of ``p(x)``; differentiable (reparameterised samples).

        Args:
            data: observation name -> value ``(*batch, *plates, *event)``; each
                batch element gets independent samples.

        Returns:
            tensor ``(*batch,)``.  Its exp is unbiased for ``p(x)``.
        """
        tr, plan, norm = self._trace(data)
        return plan.log_sum(tr.factors) - norm

    def dregs_surrogate(self, data: Mapping[str, object], *, form: str = "tmc") -> torch.Tensor:
        """A surrogate whose gradient w.r.t. the proposal parameters is the DReGs estimator.

        ``form="tmc"`` (default): the doubly-reparameterised gradient of
        ``E[log P_TMC]``, unbiased for any number of latents.  Applying the
        score identity ``E_q[f(z) d log q(z)/dphi] = E_eps[df/dz dz/dphi]`` to
        every sample ``z_i^k`` with ``f = m_i(k)``, the posterior marginal weight
        of sample k of latent i (the share of ``sum_c w_c`` from combinations
        with ``c_i = k``), cancels the score terms against part of the
        reparameterised path and leaves::

            grad = sum_i sum_k m_i(k) * d log P_TMC / d z_i^k * d z_i^k / d phi

        with ``m`` held fixed.  The surrogate's value is ``log P_TMC`` (the same
        number :meth:`log_marginal` gives for this draw); its gradient is the
        sum above.  The weights ``m_i(k)`` and the derivatives ``d log P / dz``
        come from one backward pass through the plan.  Plates: one weight per
        plate element.  For one latent it is IWAE's DReGs (Tucker et al. 2019).
        Proposals must be reparameterised and *factorised*: a proposal with
        latent parents is a mixture over their samples, whose samples are not
        independent, and is refused with a :class:`TMCError` naming the latent.

        ``form="paper"``: appendix F's eq. 60,
        ``1/2 * (sum w_bar^2 / (sum w_bar)^2) * log sum w_hat^2`` over all index
        combinations (eq. 54's weights ``w_c^2 / (sum w)^2``).  It is *biased*
        for more than one latent (each sample of a latent appears in
        ``K^(n-1)`` combinations, so the per-combination weights are not the
        per-sample ones the identity needs); kept to compare with the paper.

        Use the gradient w.r.t. proposal parameters only; for model parameters
        use :meth:`log_marginal`.

        Args:
            data: observation name -> value ``(*batch, *plates, *event)``.
            form: ``"tmc"`` or ``"paper"``.

        Returns:
            tensor ``(*batch,)``.
        """
        if form == "paper":
            tr, plan, _ = self._trace(data, dregs=True)
            return self._paper_dregs_from_trace(tr, plan)
        if form != "tmc":
            raise TMCError(f"form must be 'tmc' or 'paper', got {form!r}")
        model = self.model
        for name in self._sampled:
            mixed = [p for p in model._sites[name].proposal_parents if model._sites[p].kind == "latent"]
            if mixed:
                raise TMCError(
                    f"latent {name!r}: its proposal takes latent parent(s) {mixed}, so TMC samples it from a "
                    "mixture over their samples (appendix C); dregs_surrogate supports factorised proposals "
                    "(parents that are observations, or none). Use the reparameterised gradient of log_marginal"
                )
        tr, plan, norm = self._trace(data, detach_samples=True)
        return self._dregs_from_trace(tr, plan, norm)

    def _dregs_from_trace(self, tr: Trace, plan: Plan, norm: float) -> torch.Tensor:
        assert tr.samples is not None
        layout, sampled = tr.layout, self._sampled
        with torch.enable_grad():
            total = plan.log_sum(tr.factors)
            grads = torch.autograd.grad(total.sum(), [tr.factors[n] for n in sampled] + [tr.values[n] for n in sampled])
        nb = len(layout.batch)
        path: Optional[torch.Tensor] = None
        for name, g_factor, g_value in zip(sampled, grads[: len(sampled)], grads[len(sampled):]):
            # m_i(k) per plate element: the factor's gradient summed over its parents' indices
            extra = len(factor_indices(self.model, layout.index_of, name)) - 1
            m = g_factor.sum(dim=tuple(range(g_factor.dim() - extra, g_factor.dim()))) if extra else g_factor
            event = tr.event_dims[name]
            g = layout.site_view(g_value, name, event)  # (*batch, *plates, K, *event)
            m = m.reshape(tuple(m.shape) + (1,) * event)
            weight = torch.where(m > 0, m * g, torch.zeros((), dtype=g.dtype, device=g.device))
            z = layout.site_view(tr.samples[name], name, event)
            term = (weight * z).sum(dim=tuple(range(nb, z.dim())))
            path = term if path is None else path + term
        value = total.detach() - norm
        if path is None:
            return value
        return value + (path - path.detach())

    @staticmethod
    def _paper_dregs_from_trace(tr: Trace, plan: Plan) -> torch.Tensor:
        assert tr.hat_factors is not None
        with torch.no_grad():
            log_w = plan.log_sum({n: f.detach() for n, f in tr.factors.items()})
            log_w2 = plan.log_sum({n: 2 * f.detach() for n, f in tr.factors.items()})
            ratio = torch.exp(log_w2 - 2 * log_w)
        return 0.5 * ratio * plan.log_sum({n: 2 * f for n, f in tr.hat_factors.items()})

    def posterior(self, data: Mapping[str, object]) -> "Posterior":
        """Draw samples, contract, and return posterior summaries over them.

        Returns:
            a :class:`Posterior` with the per-latent marginal weights over
            samples (autodiff of ``log P_TMC``), posterior means and backward
            sampling through the contraction.
        """
        tr, plan, norm = self._trace(data)
        return Posterior(self, tr, plan, norm)

    def __repr__(self) -> str:
        return f"TMC(K={self.K}, plan={self.plan if self._plans else 'built at first evaluation'})"


class Posterior:
    """Posterior summaries of one TMC draw (built by :meth:`TMC.posterior`).

    Attributes:
        log_marginal: ``(*batch,)`` log P_TMC of this draw.
        samples: latent -> ``(*batch, *plates, K, *event)`` its samples.
        marginals: latent -> ``(*batch, *plates, K)`` posterior probability of
            each sample (the gradient of ``log P_TMC`` with respect to the
            latent's log-factor, summed over the other indices); sums to 1
            over K.
    """

    def __init__(self, est: TMC, tr: Trace, plan: Plan, norm: float) -> None:
        self._est, self._trace, self._plan = est, tr, plan
        layout = tr.layout
        model = est.model
        batch = layout.batch
        core = {s.name: len(s.shape) for s in plan.inputs}
        self._fac = {n: f.detach().expand(batch + tuple(f.shape[f.dim() - core[n]:])) for n, f in tr.factors.items()}
        leaves = {n: f.clone().requires_grad_() for n, f in self._fac.items()}
        with torch.enable_grad():
            total = plan.log_sum(leaves)
            if not bool(torch.isfinite(total).all()):
                raise TMCError("every sample combination has zero weight (log P_TMC = -inf) for some batch element; "
                               "the posterior over samples is undefined")
            grads = torch.autograd.grad(total.sum(), [leaves[n] for n in model.latents()])
        self.log_marginal = total.detach() - norm
        self.samples: Dict[str, torch.Tensor] = {}
        self.marginals: Dict[str, torch.Tensor] = {}
        self._event: Dict[str, int] = {}
        for n, g in zip(model.latents(), grads):
            extra = len(factor_indices(model, layout.index_of, n)) - 1
            w = g.sum(dim=tuple(range(g.dim() - extra, g.dim()))) if extra else g
            self.marginals[n] = w
            self._event[n] = tr.event_dims[n]
            self.samples[n] = layout.site_view(tr.values[n].detach(), n, tr.event_dims[n])

    def mean(self, name: str, fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
        """Posterior expectation ``E[fn(z)]`` of latent ``name`` per plate element.

        Args:
            name: a latent.
            fn: applied to samples ``(*batch, *plates, K, *event)``, returning
                ``(*batch, *plates, K, *out)``; default identity.

        Returns:
            ``(*batch, *plates, *out)``.
        """
        if name not in self.marginals:
            raise TMCError(f"{name!r} is not a latent; latents: {list(self.marginals)}")
        v = self.samples[name]
        if fn is not None:
            v = fn(v)
        w = self.marginals[name]
        extra = v.dim() - w.dim()
        return (w.reshape(tuple(w.shape) + (1,) * extra).to(v.dtype) * v).sum(dim=w.dim() - 1)

    def sample(self, num_samples: int) -> Dict[str, torch.Tensor]:
        """Importance samples drawn through the contraction (backward sampling).

        Draws ``num_samples`` joint index assignments from the TMC posterior over
        sample indices (probability proportional to the product of factors),
        latent by latent: each latent's copies are drawn from their marginals
        conditioned on the latents drawn before (fewer plates first), by one
        contraction with the earlier choices clamped.

        Returns:
            latent -> ``(num_samples, *batch, *plates, *event)`` values, and
            ``"@index:<latent>"`` -> ``(num_samples, *batch, *plates)`` indices.
        """
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise TMCError(f"num_samples must be a positive int, got {num_samples!r}")
        model = self._est.model
        topo = {n: k for k, n in enumerate(model.latents())}
        order = sorted(topo, key=lambda n: (len(model._sites[n].plates), topo[n]))
        fac = {n: f.unsqueeze(0).expand((num_samples,) + tuple(f.shape)) for n, f in self._fac.items()}
        out: Dict[str, torch.Tensor] = {}
        for n in order:
            extra = len(factor_indices(model, self._trace.layout.index_of, n)) - 1
            leaf = fac[n].clone().requires_grad_()
            with torch.enable_grad():
                total = self._plan.log_sum({**fac, n: leaf})
                (g,) = torch.autograd.grad(total.sum(), [leaf])
            w = g.sum(dim=tuple(range(g.dim() - extra, g.dim()))) if extra else g
            k = w.shape[-1]
            flat = w.reshape(-1, k).clamp_min(0)
            pick = torch.multinomial(flat, 1).reshape(w.shape[:-1])
            out["@index:" + n] = pick
            mask = torch.full(w.shape, -math.inf, dtype=fac[n].dtype, device=w.device)
            mask.scatter_(-1, pick.unsqueeze(-1), 0.0)
            fac[n] = fac[n] + mask.reshape(tuple(mask.shape) + (1,) * extra)
            v = self.samples[n]
            ev = self._event[n]
            idx = pick.reshape(tuple(pick.shape) + (1,) + (1,) * ev)
            src = v.unsqueeze(0).expand((num_samples,) + tuple(v.shape))
            idx = idx.expand(tuple(pick.shape) + (1,) + tuple(v.shape[v.dim() - ev:]))
            out[n] = torch.gather(src, pick.dim(), idx).squeeze(pick.dim())
        return out


class IWAE(_GraphEstimator):
    """Importance weighting with joint samples: every sampled latent shares one
    particle index of size K; enumerated latents are still summed exactly."""

    def __init__(self, model: Model, K: int, *, optimize: str = "auto") -> None:
        latents = model.latents()
        K = _check_k("(all)", K)
        index_of = {n: (n if model._sites[n].enumerate else PARTICLES) for n in latents}
        sizes: Dict[str, Optional[int]] = {}
        plates: Dict[str, Tuple[str, ...]] = {}
        if any(not model._sites[n].enumerate for n in latents):
            sizes[PARTICLES], plates[PARTICLES] = K, ()
        for n in latents:
            if model._sites[n].enumerate:
                sizes[n], plates[n] = _enumerated_size(model, n), model._sites[n].plates
        self._enumerates = any(model._sites[n].enumerate for n in latents)
        super().__init__(model, index_of, sizes, plates, optimize=optimize, memory_limit=None,
                         compile_now=self._enumerates)
        self.K = K

    def _sampled_indices(self) -> set:
        return {PARTICLES}

    def log_marginal(self, data: Mapping[str, object]) -> torch.Tensor:
        """``log 1/K sum_k w_k`` over K joint samples; ``(*batch,)``, differentiable."""
        if self._enumerates:
            tr, plan, norm = self._trace(data)
            return plan.log_sum(tr.factors) - norm
        tr, graph, norm = self._trace_only(data)
        # nothing enumerated: log w_k is the sum of all factors (plates summed), no contraction needed
        log_w = None
        for name, f in tr.factors.items():
            spec = graph.factors[name]
            n_pl, n_ix = len(spec.plates), len(spec.indices)
            if n_pl:
                f = f.sum(dim=tuple(range(f.dim() - n_pl - n_ix, f.dim() - n_ix)))
            if not n_ix:  # a factor with no latent parent: constant over particles
                f = f.unsqueeze(-1)
            log_w = f if log_w is None else log_w + f
        if bool(torch.isnan(log_w).any()):
            bad = [n for n, f in tr.factors.items() if bool(torch.isnan(f).any())]
            raise TMCError(f"log-density of {bad} contains NaN")
        return torch.logsumexp(log_w, dim=-1) - norm


def iwae(model: Model, data: Mapping[str, object], K: int, *, chunk_size: Optional[int] = None,
         progress: bool = False) -> torch.Tensor:
    """The importance-weighted estimate ``log 1/K sum_k p(x, z^k) / q(z^k)`` with K joint samples.

    Each joint sample draws every latent from its proposal given the same
    sample's parents (no mixture); enumerated latents are summed exactly.

    Args:
        model: the model.
        data: observation name -> value ``(*batch, *plates, *event)``.
        K: number of joint samples.
        chunk_size: draw and weigh at most this many samples at a time (bounded
            memory for very large K; chunks are combined in the log domain).
        progress: show a tqdm progress bar over the chunks.

    Returns:
        tensor ``(*batch,)``, differentiable.
    """
    K = _check_k("(all)", K)
    if chunk_size is None or chunk_size >= K:
        return IWAE(model, K).log_marginal(data)
    chunk_size = _check_k("(chunk_size)", chunk_size)
    from tqdm.auto import tqdm

    parts = []
    for start in tqdm(range(0, K, chunk_size), disable=not progress, desc="iwae chunks", unit="chunk"):
        k = min(chunk_size, K - start)
        parts.append(IWAE(model, k).log_marginal(data) + math.log(k))
    return torch.logsumexp(torch.stack(parts), dim=0) - math.log(K)


# ---------------------------------------------------------------------------
# SMC
# ---------------------------------------------------------------------------
def smc(model: Model, data: Mapping[str, object], K: int, *, proposal: str = "bootstrap",
        resampling: str = "multinomial") -> torch.Tensor:
    """Sequential Monte Carlo estimate of ``log p(x)`` with K particles.

    Latents are visited in topological order (a chain is the natural case); a
    particle holds every latent drawn so far, across all plate elements.  Each
    step draws one latent (``proposal="bootstrap"``: from its prior;
    ``"guide"``: from the declared proposal given the particle's parents), weighs
    by the new prior/proposal ratio and the observations whose last parent it
    is, adds ``log mean(w)`` to the estimate and resamples all particles.

    Args:
        model: a model without enumerated latents.
        data: observation name -> value ``(*batch, *plates, *event)``.
        K: number of particles.
        proposal: ``"bootstrap"`` or ``"guide"``.
        resampling: ``"multinomial"`` or ``"systematic"``.

    Returns:
        tensor ``(*batch,)``: the log of an unbiased estimate of ``p(x)``.
    """
    K = _check_k("(particles)", K)
    if proposal not in ("bootstrap", "guide"):
        raise TMCError(f"proposal must be 'bootstrap' or 'guide', got {proposal!r}")
    if resampling not in SCHEMES:
        raise TMCError(f"resampling must be one of {sorted(SCHEMES)}, got {resampling!r}")
    latents = model.latents()
    enumerated = [n for n in latents if model._sites[n].enumerate]
    if enumerated:
        raise TMCError(f"smc does not support enumerated latents {enumerated}; use the TMC or IWAE estimator")
    layout = Layout(model, {n: PARTICLES for n in latents}, {PARTICLES: K}, data_batch_shape(model, data))
    batch = layout.batch
    values = {n: layout.data_value(n, data[n]) for n in model.observations()}
    event_dims: Dict[str, int] = {n: model._sites[n].event_dim for n in model.observations()}

    def density(owner: str, fn: Callable, parents: Sequence[str], plates: Sequence[str]) -> Distribution:
        # a density varies along the particles only through its latent parents' values
        along = [PARTICLES] if any(model._sites[p].kind == "latent" for p in parents) else []
        return layout.density(owner, fn, [values[p] for p in parents], [event_dims[p] for p in parents], along,
                              plates, sample_index=PARTICLES)

    last = {}
    order = model.order()
    position = {n: k for k, n in enumerate(order)}
    for n in model.observations():
        parents = model._sites[n].parents
        last[n] = max(parents, key=position.__getitem__) if parents else None
    log_z: Optional[torch.Tensor] = None

    def weigh(name: str, owner: str, lp: torch.Tensor, plates) -> torch.Tensor:
        f = layout.to_factor(lp, owner, [PARTICLES], plates)  # (*b, *plates, K)
        f = f.reshape(tuple(f.shape[: f.dim() - len(plates) - 1]) + (-1, K)).sum(-2) if plates else f
        return f.expand(batch + (K,))

    log_w = None
    pending = [n for n in model.observations() if last[n] is None]
    for n in pending:  # observations with no latent parent: a constant factor
        site = model._sites[n]
        d = density(f"observation {n!r} likelihood", site.fn, [], site.plates)
        lp = d.log_prob(values[n])
        c = layout.to_factor(lp, f"observation {n!r}", [], site.plates)
        c = c.reshape(tuple(c.shape[: c.dim() - len(site.plates)]) + (-1,)).sum(-1) if site.plates else c
        log_z = c.expand(batch) if log_z is None else log_z + c
    for step, name in enumerate(latents):
        site = model._sites[name]
        owner = f"latent {name!r}"
        if log_w is not None:  # resample every particle's history
            anc = resample(log_w, resampling)  # (*b, K)
            for p in latents[:step]:
                v = values[p]
                e = event_dims[p]
                v = v.expand(layout.template([PARTICLES], model._sites[p].plates) + tuple(v.shape[v.dim() - e:]))
                values[p] = gather(v, anc)  # the particle dim follows the batch dims
        prior = density(f"{owner} prior", site.fn, site.parents, site.plates)
        if proposal == "bootstrap":
            q = prior
        else:
            q = density(f"{owner} proposal", site.proposal, site.proposal_parents, site.plates)
            check_proposal(name, prior, q)
        z = q.rsample() if q.has_rsample else q.sample()
        values[name] = z
        event_dims[name] = len(q.event_shape)
        inc = weigh(name, owner, prior.log_prob(z) - q.log_prob(z), site.plates) if q is not prior else None
        for n in model.observations():
            if last[n] == name:
                obs = model._sites[n]
                d = density(f"observation {n!r} likelihood", obs.fn, obs.parents, obs.plates)
                f = weigh(n, f"observation {n!r}", d.log_prob(values[n]), obs.plates)
                inc = f if inc is None else inc + f
        if inc is None:
            inc = torch.zeros(batch + (K,), dtype=z.dtype, device=z.device)
        log_w = inc
        term = torch.logsumexp(inc, -1) - math.log(K)
        log_z = term if log_z is None else log_z + term
    assert log_z is not None
    return log_z

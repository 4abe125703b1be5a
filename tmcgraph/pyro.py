"""Run a Pyro model and guide through tmcgraph: `TMC_ELBO`, an unbiased drop-in for ``TraceTMC_ELBO``.

Needs the optional extra ``pyro`` (``pip install tmcgraph[pyro]``, pyro-ppl >= 1.9).

How a step runs:

1. The guide runs once under Pyro's parallel enumeration with ``num_particles`` samples per sample
   site, each site on a tensor dim of its own left of the plates.  A site whose distribution depends on
   earlier sites' samples draws each of its samples from the *mixture* over their samples (one
   ancestor per parent dim, uniformly: appendix C of Aitchison, NeurIPS 2019), and its proposal
   density is that mixture's, ``logmeanexp`` over the parents' sample dims.
2. The model is replayed against those samples; sites marked ``infer={"enumerate": "parallel"}``
   that the guide lacks are enumerated over their support.
3. Every site's log-density becomes a factor of a `tmcgraph.FactorGraph` whose indices are the sample
   (or support) dims and whose plates are Pyro's plates, and the compiled plan sums over every
   combination of samples.  ``log P = log_sum - sum log K`` (one ``log K`` per sampled index copy).

Pyro's own ``TraceTMC_ELBO`` weights a non-factorised guide by the conditional density at the paired
ancestor instead of the mixture density, which biases ``exp(log P)``; here ``E[exp(log P)] = p(x)``.

Supported: ``pyro.sample`` (``obs=`` included), ``pyro.param``, vectorised ``pyro.plate`` (nested),
``pyro.markov``, ``pyro.factor``, parallel enumeration in the model or the guide, ``poutine.mask``,
subsampled plates (``pyro.plate(..., subsample_size=B)`` of N elements: the plate's product over its
elements, each with its own latents summed, is raised to the power N / B; `tmcgraph.FactorGraph.plate`'s
``scale``), ``poutine.scale`` around the whole model and guide (one scale common to every site scales
``log P``, as Pyro's ELBOs do), and other ``poutine.scale`` on sites whose factor has no latent inside
their plates (the factor raised to the scale, as Pyro's ``TraceTMC_ELBO`` does).

Refused with an error naming the site: ``poutine.scale`` over latents inside the site's plates, sequential
plates, non-reparameterised guide sites, model latents the guide neither samples nor enumerates, guide
latents the model lacks, sequential enumeration, and programs that fail when each latent holds K samples
along a dim of its own (Python control flow on sampled values: the error names the last site reached).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

import torch

try:
    import pyro.poutine as poutine
    from pyro.infer.elbo import ELBO
    from pyro.poutine.enum_messenger import EnumMessenger
except ImportError as err:  # pragma: no cover - the optional extra
    raise ImportError("tmcgraph.pyro needs pyro-ppl >= 1.9: pip install 'tmcgraph[pyro]'") from err

from .errors import TMCError
from .evaluate import Evaluator
from .graph import FactorGraph
from .plan import Plan

__all__ = ["TMC_ELBO"]


_Plate = Tuple[str, int, int, float]  # a vectorised plate: (name, dim, size, scale = full size / size)
_Sizes = Dict[int, Tuple[int, List[_Plate]]]  # variable id -> (its size, its plates)


class _Traced(NamedTuple):
    """One traced run of guide and model, as factors.

    Attributes:
        sites: the factors.
        sizes: variable id -> (its size: K or its support's, its plates).
        sampled: the sampled variables (the others are enumerated).
        latents: variable id -> its site's ``(name, value, dim)``.
        scale: the ``poutine.scale`` common to every site (1 unless a handler scales the whole program):
            ``log P`` is this times the contraction's.
    """

    sites: List["_Site"]
    sizes: _Sizes
    sampled: List[int]
    latents: Dict[int, Tuple[str, torch.Tensor, int]]
    scale: float


class _Site:
    """One factor: a site's log-density laid out over its plates and sample indices."""

    __slots__ = ("name", "log_prob", "plates", "indices")

    def __init__(self, name: str, log_prob: torch.Tensor, plates: List[_Plate],
                 indices: List[Tuple[int, int]]) -> None:  # indices: (tensor dim, variable id), by dim
        self.name, self.log_prob, self.plates, self.indices = name, log_prob, plates, indices


class TMC_ELBO(ELBO):  # noqa: N801 (Pyro's naming)
    """The TMC objective of a Pyro model and guide, usable with ``pyro.infer.SVI``.

    ``loss`` and ``differentiable_loss`` are ``-log P_TMC``, where ``P_TMC`` averages the importance
    weight over every combination of the ``num_particles`` samples of every guide site (`tmcgraph.TMC`'s
    estimator, see the module docstring for how a Pyro program is traced).  ``log_marginal`` is
    ``log P_TMC`` itself.

    Args:
        num_particles: K, the samples per guide sample site.
        max_plate_nesting: the number of plate dims of the model and guide (guessed from one run when
            ``None``, as Pyro's ELBOs do).
        backend: the tmcgraph evaluation backend (``"eager"`` or ``"compiled"``).

    Example::

        >>> import pyro, pyro.distributions as dist, torch
        >>> from tmcgraph.pyro import TMC_ELBO
        >>> def model(x):
        ...     z = pyro.sample("z", dist.Normal(0.0, 1.0))
        ...     pyro.sample("x", dist.Normal(z, 1.0), obs=x)
        >>> def guide(x):
        ...     pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(0.0)), 1.0))
        >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 0.1}), TMC_ELBO(num_particles=8))
        >>> isinstance(svi.step(torch.tensor(1.0)), float)
        True
    """

    def __init__(self, num_particles: int = 16, *, max_plate_nesting: Optional[int] = None,
                 backend: str = "eager") -> None:
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise TMCError(f"TMC_ELBO: num_particles must be a positive int, got {num_particles!r}")
        super().__init__(num_particles=1, max_plate_nesting=float("inf") if max_plate_nesting is None
                         else max_plate_nesting)
        self.K = num_particles
        self.evaluator = Evaluator(backend)
        self._plans: Dict[tuple, Plan] = {}  # factor-graph structure -> its compiled plan

    # -- the estimate ----------------------------------------------------------------------------
    def log_marginal(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``log P_TMC``: a differentiable scalar whose exp is unbiased for the model's ``p(x)``."""
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        t = self._trace_factors(model, guide, args, kwargs)
        return t.scale * (self._log_sum(t.sites, t.sizes) - _log_k(t.sizes, t.sampled))

    def posterior_marginals(self, model: Any, guide: Any, *args: Any, **kwargs: Any
                            ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """Each latent's samples (or support) and their posterior weights under one TMC estimate.

        The weight of a sample is its share of ``P_TMC``: the sum of the importance weights of the
        combinations that use it, over their total (the autodiff of ``log P_TMC`` with respect to a zero
        factor on the latent's index, as `tmcgraph.Posterior` does).  ``sum_k w_k f(z_k)`` estimates the
        posterior expectation of ``f`` (self-normalised: consistent as K grows).

        Returns:
            site name -> ``(values, weights)``: ``values`` as drawn (or enumerated), K along the site's own
            dim; ``weights`` in the same layout without the event dims, non-negative and summing to 1 over
            the site's dim for every element of its plates.
        """
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        sites, sizes, _, latents, _ = self._trace_factors(model, guide, args, kwargs)
        probes = {}
        for var, (size, plates) in sizes.items():
            name, value, d = latents[var]
            probes[var] = _probe(value, d, size, plates)
            sites.append(_Site(f"probe {name}", probes[var], plates, [(d, var)]))
        log_p = self._log_sum(sites, sizes)
        grads = torch.autograd.grad(log_p, list(probes.values()))
        return {latents[var][0]: (latents[var][1], g.detach() / _scale(sizes[var][1]))
                for var, g in zip(probes, grads)}

    def dregs_surrogate(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A scalar whose value is ``log P_TMC`` and whose gradient is the TMC DReGs estimator.

        The same estimator as `tmcgraph.TMC.dregs_surrogate` (``form="tmc"``).  Its gradient w.r.t. the guide's
        parameters is ``sum_i sum_k m_i(k) d log P / d z_i^k d z_i^k / d phi``, where ``m_i(k)`` is sample
        k's share of ``P_TMC`` (`posterior_marginals`).  It is unbiased for ``grad E[log P_TMC]``, with
        lower variance than the reparameterised gradient as K grows.  Use it for the guide's parameters
        only (the model's take the gradient of `log_marginal`).  The guide must be factorised and
        reparameterised: a site whose density depends on other sites' samples is refused, naming it.
        """
        if self.max_plate_nesting == float("inf"):
            self._guess_max_plate_nesting(model, guide, args, kwargs)
        samples: Dict[str, torch.Tensor] = {}
        sites, sizes, sampled, latents, scale = self._trace_factors(model, guide, args, kwargs, samples=samples)
        probes = {v: _probe(latents[v][1], latents[v][2], *sizes[v]) for v in sampled}
        sites = sites + [_Site(f"probe {latents[v][0]}", probes[v], sizes[v][1], [(latents[v][2], v)])
                         for v in sampled]
        with torch.enable_grad():
            total = self._log_sum(sites, sizes)
            leaves = [latents[v][1] for v in sampled]
            grads = torch.autograd.grad(total, list(probes.values()) + leaves)
        path = total.new_zeros(())
        for v, m, g in zip(sampled, grads[: len(sampled)], grads[len(sampled):]):
            name, value, _ = latents[v]
            event = value.dim() - m.dim()
            m = m.reshape(tuple(m.shape) + (1,) * event) / _scale(sizes[v][1])  # sample k's share of its element
            weight = torch.where(m > 0, m * g, torch.zeros((), dtype=g.dtype, device=g.device))
            path = path + (weight * samples[name]).sum()
        return scale * (total.detach() - _log_k(sizes, sampled) + (path - path.detach()))

    def _log_sum(self, sites: List[_Site], sizes: _Sizes) -> torch.Tensor:
        """The contraction of the factors, by the plan of their structure (compiled once per structure)."""
        key = _structure(sites, sizes)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = _graph(sites, sizes).compile()
        return self.evaluator.log_sum(plan, {site.name: _layout(site) for site in sites})

    def differentiable_loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``-log P_TMC`` (a differentiable scalar)."""
        return -self.log_marginal(model, guide, *args, **kwargs)

    def loss(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        """``-log P_TMC`` as a float (no gradient)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model: Any, guide: Any, *args: Any, **kwargs: Any) -> float:
        """``-log P_TMC`` as a float, with its gradient accumulated into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())

    # -- tracing -----------------------------------------------------------------------------------
    def _get_trace(self, model: Any, guide: Any, args: tuple, kwargs: dict, *,
                   samples: Optional[Dict[str, torch.Tensor]] = None) -> Tuple[Any, Any]:
        """``(model_trace, guide_trace)``: one enumerated run of the guide, and the model replayed against it.

        The guide draws ``num_particles`` samples of every sample site (mixtures over the parents' samples),
        each on a dim of its own; the model's sites marked for parallel enumeration are enumerated.  With
        ``samples`` (a dict to fill), every sampled guide site's value in both traces is a detached leaf and
        the reparameterised sample itself goes to ``samples[name]`` (for the DReGs surrogate).
        """
        nesting = int(self.max_plate_nesting)
        guide = poutine.infer_config(guide, self._sample_config)
        guide_trace = self._run("guide", EnumMessenger(first_available_dim=-1 - nesting)(guide), args, kwargs)
        if samples is not None:
            node: Any
            for name, node in guide_trace.nodes.items():
                if node["type"] == "sample" and not node["is_observed"] and node["infer"].get("num_samples"):
                    samples[name] = node["value"]
                    node["value"] = node["value"].detach().requires_grad_()
        model_trace = self._run("model", poutine.replay(EnumMessenger()(model), trace=guide_trace), args, kwargs)
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and name not in model_trace.nodes \
                    and type(site["fn"]).__name__ != "_Subsample":
                raise TMCError(f"latent {name!r}: the guide samples it, but the model has no site of that name "
                               "(a guide site must propose one of the model's latents)")
        return model_trace, guide_trace

    def _run(self, role: str, fn: Any, args: tuple, kwargs: dict) -> Any:
        """Trace one run of ``fn``; an error names the last site it reached and why TMC may have caused it."""
        tracer = poutine.trace(fn)
        try:
            return tracer.get_trace(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            reached = [name for name, site in tracer.msngr.trace.nodes.items() if site["type"] == "sample"]
            where = f"after site {reached[-1]!r}" if reached else "before its first sample site"
            raise TMCError(f"TMC_ELBO: the {role} failed {where} ({type(err).__name__}: {str(err).splitlines()[0]}). "
                           f"Under TMC every latent holds num_particles={self.K} samples (or its support) along a "
                           "tensor dim of its own, left of the plates: the program must be vectorised over them (no "
                           "Python control flow on sampled values, Vindex to index by them), and its site set must not "
                           "depend on sampled values") from err

    def _sample_config(self, site: Any) -> Any:
        """A guide site's enumeration (a ``poutine.infer_config`` function).

        ``num_particles`` samples from the mixture over its parents' samples, or its whole support when it is
        marked ``infer={"enumerate": "parallel"}`` without ``num_samples``.
        """
        if site["type"] != "sample" or site["is_observed"] or type(site["fn"]).__name__ == "_Subsample":
            return {}
        _check_enumerate(site)
        if site["infer"].get("enumerate") == "parallel" and site["infer"].get("num_samples") is None:
            return {}
        return {"enumerate": "parallel", "num_samples": self.K, "tmc": "mixture", "expand": False}

    def _trace_factors(self, model: Any, guide: Any, args: tuple, kwargs: dict, *,
                       samples: Optional[Dict[str, torch.Tensor]] = None) -> _Traced:
        """Run guide and model: their factors, variables and scale (`_Traced`).

        Variables are Pyro's enumeration ids (a dim recycled by ``pyro.markov`` holds several).
        """
        nesting = int(self.max_plate_nesting)
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs, samples=samples)
        sizes: _Sizes = {}
        latents: Dict[int, Tuple[str, torch.Tensor, int]] = {}  # variable id -> its site's name, value and dim
        sampled: List[int] = []
        terms: List[Tuple[str, torch.Tensor, Any]] = []  # (factor name, log-density, its site)
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or type(site["fn"]).__name__ == "_Subsample":
                    continue
                dim = site["infer"].get("_enumerate_dim")
                if role == "model" and name in guide_trace.nodes:
                    continue
                _check_enumerate(site)
                if dim is None:
                    raise TMCError(f"latent {name!r}: the {role} samples it, but the guide does not; sample it in "
                                   "the guide, or mark it infer={'enumerate': 'parallel'} in the model")
                enumerated = site["infer"].get("num_samples") is None  # summed over its support
                if role == "guide" and not enumerated and not site["fn"].has_rsample:
                    raise TMCError(f"latent {name!r}: the guide's {type(site['fn']).__name__} has no rsample; "
                                   "TMC_ELBO needs reparameterised guide sites (enumerate discrete ones in the "
                                   "model instead)")
                value = site["value"]
                var = site["infer"]["_dim_to_id"][dim]
                sizes[var] = (value.shape[dim - site["fn"].event_dim], _plates(site, nesting))
                latents[var] = (name, value, dim)
                if not enumerated:
                    sampled.append(var)
        for name, site in guide_trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or type(site["fn"]).__name__ == "_Subsample":
                continue
            if site["infer"].get("num_samples") is None:
                continue  # enumerated in the guide: summed over its support, no proposal density
            own = site["infer"]["_enumerate_dim"]
            lq = site["fn"].log_prob(site["value"])
            parents = [d for d in range(-lq.dim(), -nesting) if d != own and lq.shape[d] > 1]
            if parents:
                if samples is not None:
                    raise TMCError(f"latent {name!r}: its guide density depends on other sites' samples, so TMC "
                                   "samples it from a mixture over them; dregs_surrogate needs a factorised guide. "
                                   "Use the reparameterised gradient of differentiable_loss")
                lq = _mixture(lq, parents)
            terms.append((f"{name} proposal", -lq, site))
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
                continue
            terms.append((name, site["fn"].log_prob(site["value"]), site))
        # poutine.scale beyond the subsampled plates' own: one scale common to every site (a handler around the
        # whole model and guide) scales log P itself, as Pyro's ELBOs do; other scales raise a site's factor
        plates = [_plates(site, nesting) for _, _, site in terms]
        residual = [_residual(site, p) for (_, _, site), p in zip(terms, plates)]
        common = residual[0] if residual and all(_same(r, residual[0]) for r in residual) else 1.0
        sites = [_site(name, lp, site, p, sizes, nesting, r / common)
                 for (name, lp, site), p, r in zip(terms, plates, residual)]
        return _Traced(sites, sizes, sampled, latents, common)


def _check_enumerate(site: Dict[str, Any]) -> None:
    """Refuse ``infer={"enumerate": "sequential"}`` (and unknown strategies), naming the site."""
    how = site["infer"].get("enumerate")
    if how not in (None, "parallel"):
        raise TMCError(f"latent {site['name']!r}: infer={{'enumerate': {how!r}}} is not supported; TMC_ELBO sums "
                       "over a site's support in one vectorised pass: use 'parallel'")


def _probe(value: torch.Tensor, dim: int, size: int, plates: List[_Plate]) -> torch.Tensor:
    """A zero log-factor on a variable's index, laid out as Pyro lays it out.

    Its gradient in ``log P`` is the posterior weight of each of the variable's samples.
    """
    shape = [1] * max([-dim] + [-p[1] for p in plates])
    shape[dim] = size
    for _, plate_dim, plate_size, _ in plates:
        shape[plate_dim] = plate_size
    dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
    return torch.zeros(shape, dtype=dtype, device=value.device, requires_grad=True)


def _mixture(log_prob: torch.Tensor, parents: List[int]) -> torch.Tensor:
    """The log-density of the mixture over the parents' samples: ``logmeanexp`` over the ``parents`` dims."""
    return torch.logsumexp(log_prob, dim=parents, keepdim=True) - sum(math.log(log_prob.shape[d]) for d in parents)


def _plates(site: Dict[str, Any], nesting: int) -> List[_Plate]:
    """The site's vectorised plates as ``(name, dim, size, scale)``; sequential plates are refused.

    A subsampled plate's size is its subsample size, and its scale the full size over that.
    """
    plates = []
    for frame in site["cond_indep_stack"]:
        if not frame.vectorized:
            raise TMCError(f"site {site['name']!r}: sequential plate {frame.name!r} (a Python loop over "
                           "pyro.plate) is not supported; use a vectorised plate")
        if frame.dim < -nesting:
            raise TMCError(f"site {site['name']!r}: plate {frame.name!r} at dim {frame.dim} is beyond "
                           f"max_plate_nesting={nesting}")
        plates.append((frame.name, frame.dim, frame.size,
                       1.0 if frame.full_size is None else frame.full_size / frame.size))
    return sorted(plates, key=lambda p: p[1])


def _residual(site: Dict[str, Any], plates: List[_Plate]) -> Any:
    """A site's ``poutine.scale`` beyond its subsampled plates' scales: a float, or a tensor over its plates."""
    scale = site["scale"]  # a Python number, or a tensor (Pyro's subsampling makes a 0-dim one, in float32)
    if isinstance(scale, torch.Tensor) and scale.dim() == 0:
        scale = scale.item()
    return scale / _scale(plates)


def _same(a: Any, b: Any) -> bool:
    """Whether two scales are equal Python numbers (up to float32 rounding)."""
    return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6)


def _site(name: str, log_prob: torch.Tensor, site: Dict[str, Any], plates: List[_Plate], sizes: _Sizes,
          nesting: int, scale: Any) -> _Site:
    """Lay ``log_prob`` out as a factor over the site's plates (expanded) and the sample dims it varies along."""
    mask = site["mask"]  # poutine.mask: a masked-out entry contributes nothing (log-density 0)
    if isinstance(mask, torch.Tensor):
        log_prob = torch.where(mask, log_prob, torch.zeros((), dtype=log_prob.dtype, device=log_prob.device))
    elif mask is False:
        log_prob = torch.zeros_like(log_prob)
    ids = site["infer"].get("_dim_to_id", {})
    indices = []
    for d in range(-log_prob.dim(), 0):
        if log_prob.shape[d] == 1 or d in {p[1] for p in plates}:
            continue
        if d >= -nesting or ids.get(d) not in sizes:
            raise TMCError(f"site {site['name']!r}: its log-density varies along dim {d}, which is neither one of "
                           f"its plates {[p[0] for p in plates]} nor a sample dim")
        indices.append((d, ids[d]))
    if not _same(scale, 1.0):  # a site's own scale (what subsampled plates and the common scale leave)
        own = {p[0] for p in plates}
        local = [var for _, var in indices if own & {p[0] for p in sizes[var][1]}]
        if local:
            raise TMCError(f"site {site['name']!r}: a poutine.scale over a latent that lives in the site's plates is "
                           "not supported: the scale must apply to each plate element's marginal, after its own "
                           "latents are summed (subsample the plate instead: pyro.plate(..., subsample_size=...))")
        log_prob = log_prob * scale  # the factor raised to its scale (tempered), as Pyro's TraceTMC_ELBO does
    return _Site(name, log_prob, plates, indices)


def _scale(plates: List[_Plate]) -> float:
    """The product of the plates' scales: how many elements each element of the site's plates stands for."""
    return math.prod(p[3] for p in plates)


def _log_k(sizes: _Sizes, sampled: List[int]) -> float:
    """``sum log K`` over the sampled variables' copies (a subsampled plate's element counts ``scale`` times)."""
    return sum(math.log(sizes[v][0]) * math.prod(p[2] * p[3] for p in sizes[v][1]) for v in sampled)


def _structure(sites: List[_Site], sizes: _Sizes) -> tuple:
    """A hashable key of the factor graph of ``sites`` (its plan is a function of it alone)."""
    return (tuple((var, size, tuple(plates)) for var, (size, plates) in sorted(sizes.items())),
            tuple((s.name, tuple(s.plates), tuple(s.indices)) for s in sites))


def _graph(sites: List[_Site], sizes: _Sizes) -> FactorGraph:
    """The factor graph of the factors, its indices named by their variables' ids."""
    g = FactorGraph()
    for plates in [p for _, p in sizes.values()] + [s.plates for s in sites]:
        for plate, _, size, scale in plates:
            if plate not in g.plates:
                g.plate(plate, size, scale=scale)
    for var in sorted(sizes):
        g.index(f"v{var}", sizes[var][0], plates=[p[0] for p in sizes[var][1]])
    for site in sites:
        g.factor(site.name, [f"v{var}" for _, var in site.indices], plates=[p[0] for p in site.plates])
    return g


def _layout(site: _Site) -> torch.Tensor:
    """The site's log-density as the factor tensor ``(*plates, *indices)`` in its declared orders."""
    t = site.log_prob
    n = max(t.dim(), max((-d for d, _ in site.indices), default=0), max((-p[1] for p in site.plates), default=0))
    t = t.reshape((1,) * (n - t.dim()) + tuple(t.shape))
    target = [1] * n
    for _, dim, size, _ in site.plates:
        target[dim] = size
    for d, _ in site.indices:
        target[d] = t.shape[d]
    t = t.expand(target)
    order = [n + p[1] for p in site.plates] + [n + d for d, _ in site.indices]
    rest = [k for k in range(n) if k not in order]
    return t.permute(order + rest).reshape([target[k - n] for k in order]) if rest else t.permute(order)


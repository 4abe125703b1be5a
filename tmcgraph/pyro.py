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
``pyro.markov``, ``pyro.factor``, parallel enumeration in the model or the guide, ``poutine.mask``, and
scaled sites (``poutine.scale``, a subsampled plate) whose factor has no latent inside their plates (each
element's factor raised to the scale).  Refused with an error naming the site: scaled sites over latents inside
their plates, sequential plates, non-reparameterised guide sites, model latents the guide neither samples nor
enumerates.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Tuple

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


class _Site:
    """One factor: a site's log-density laid out over its plates and sample indices."""

    __slots__ = ("name", "log_prob", "plates", "indices")

    def __init__(self, name: str, log_prob: torch.Tensor, plates: List[Tuple[str, int, int]],
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
        sites, sizes, sampled, _ = self._trace_factors(model, guide, args, kwargs)
        norm = sum(math.log(sizes[d][0]) * math.prod(size for _, _, size in sizes[d][1]) for d in sampled)
        return self._log_sum(sites, sizes) - norm

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
        sites, sizes, sampled, latents = self._trace_factors(model, guide, args, kwargs)
        probes = {}
        for var, (size, plates) in sizes.items():
            name, value, d = latents[var]
            probes[var] = _probe(value, d, size, plates)
            sites.append(_Site(f"probe {name}", probes[var], plates, [(d, var)]))
        log_p = self._log_sum(sites, sizes)
        grads = torch.autograd.grad(log_p, list(probes.values()))
        return {latents[var][0]: (latents[var][1], g.detach()) for var, g in zip(probes, grads)}

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
        sites, sizes, sampled, latents = self._trace_factors(model, guide, args, kwargs, samples=samples)
        norm = sum(math.log(sizes[v][0]) * math.prod(size for _, _, size in sizes[v][1]) for v in sampled)
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
            m = m.reshape(tuple(m.shape) + (1,) * event)
            weight = torch.where(m > 0, m * g, torch.zeros((), dtype=g.dtype, device=g.device))
            path = path + (weight * samples[name]).sum()
        return total.detach() - norm + (path - path.detach())

    def _log_sum(self, sites: List[_Site], sizes: Dict[int, Tuple[int, List[Tuple[str, int, int]]]]
                 ) -> torch.Tensor:
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
        guide_trace = poutine.trace(EnumMessenger(first_available_dim=-1 - nesting)(guide)).get_trace(
            *args, **kwargs)
        if samples is not None:
            node: Any
            for name, node in guide_trace.nodes.items():
                if node["type"] == "sample" and not node["is_observed"] and node["infer"].get("num_samples"):
                    samples[name] = node["value"]
                    node["value"] = node["value"].detach().requires_grad_()
        model_trace = poutine.trace(poutine.replay(EnumMessenger()(model), trace=guide_trace)).get_trace(
            *args, **kwargs)
        return model_trace, guide_trace

    def _sample_config(self, site: Any) -> Any:
        """A guide site's enumeration (a ``poutine.infer_config`` function).

        ``num_particles`` samples from the mixture over its parents' samples, or its whole support when it is
        marked ``infer={"enumerate": "parallel"}`` without ``num_samples``.
        """
        if site["type"] != "sample" or site["is_observed"] or type(site["fn"]).__name__ == "_Subsample":
            return {}
        if site["infer"].get("enumerate") == "parallel" and site["infer"].get("num_samples") is None:
            return {}
        return {"enumerate": "parallel", "num_samples": self.K, "tmc": "mixture", "expand": False}

    def _trace_factors(self, model: Any, guide: Any, args: tuple, kwargs: dict, *,
                       samples: Optional[Dict[str, torch.Tensor]] = None
                       ) -> Tuple[List[_Site], Dict[int, Tuple[int, List[Tuple[str, int, int]]]], List[int],
                                  Dict[int, Tuple[str, torch.Tensor, int]]]:
        """Run guide and model: the factors, each variable's (size, plates), the sampled variables, their sites.

        Variables are Pyro's enumeration ids (a dim recycled by ``pyro.markov`` holds several); a variable's
        site is its ``(name, value, dim)``.
        """
        nesting = int(self.max_plate_nesting)
        model_trace, guide_trace = self._get_trace(model, guide, args, kwargs, samples=samples)
        sizes: Dict[int, Tuple[int, List[Tuple[str, int, int]]]] = {}  # variable id -> (size, plates)
        latents: Dict[int, Tuple[str, torch.Tensor, int]] = {}  # variable id -> its site's name, value and dim
        sampled: List[int] = []
        sites: List[_Site] = []
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample" or site["is_observed"] or type(site["fn"]).__name__ == "_Subsample":
                    continue
                dim = site["infer"].get("_enumerate_dim")
                if role == "model" and name in guide_trace.nodes:
                    continue
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
            sites.append(_site(f"{name} proposal", -lq, site, sizes, nesting))
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample" or type(site["fn"]).__name__ == "_Subsample":
                continue
            sites.append(_site(name, site["fn"].log_prob(site["value"]), site, sizes, nesting))
        return sites, sizes, sampled, latents


def _probe(value: torch.Tensor, dim: int, size: int, plates: List[Tuple[str, int, int]]) -> torch.Tensor:
    """A zero log-factor on a variable's index, laid out as Pyro lays it out.

    Its gradient in ``log P`` is the posterior weight of each of the variable's samples.
    """
    shape = [1] * max([-dim] + [-p[1] for p in plates])
    shape[dim] = size
    for _, plate_dim, plate_size in plates:
        shape[plate_dim] = plate_size
    dtype = value.dtype if value.is_floating_point() else torch.get_default_dtype()
    return torch.zeros(shape, dtype=dtype, device=value.device, requires_grad=True)


def _mixture(log_prob: torch.Tensor, parents: List[int]) -> torch.Tensor:
    """The log-density of the mixture over the parents' samples: ``logmeanexp`` over the ``parents`` dims."""
    return torch.logsumexp(log_prob, dim=parents, keepdim=True) - sum(math.log(log_prob.shape[d]) for d in parents)


def _plates(site: Dict[str, Any], nesting: int) -> List[Tuple[str, int, int]]:
    """The site's vectorised plates as ``(name, dim, size)``; sequential plates are refused.

    A subsampled plate's size is its subsample size.
    """
    plates = []
    for frame in site["cond_indep_stack"]:
        if not frame.vectorized:
            raise TMCError(f"site {site['name']!r}: sequential plate {frame.name!r} (a Python loop over "
                           "pyro.plate) is not supported; use a vectorised plate")
        if frame.dim < -nesting:
            raise TMCError(f"site {site['name']!r}: plate {frame.name!r} at dim {frame.dim} is beyond "
                           f"max_plate_nesting={nesting}")
        plates.append((frame.name, frame.dim, frame.size))
    return sorted(plates, key=lambda p: p[1])


def _site(name: str, log_prob: torch.Tensor, site: Dict[str, Any],
          sizes: Dict[int, Tuple[int, List[Tuple[str, int, int]]]], nesting: int) -> _Site:
    """Lay ``log_prob`` out as a factor over the site's plates (expanded) and the sample dims it varies along."""
    mask = site["mask"]  # poutine.mask: a masked-out entry contributes nothing (log-density 0)
    if isinstance(mask, torch.Tensor):
        log_prob = torch.where(mask, log_prob, torch.zeros((), dtype=log_prob.dtype, device=log_prob.device))
    elif mask is False:
        log_prob = torch.zeros_like(log_prob)
    plates = _plates(site, nesting)
    ids = site["infer"].get("_dim_to_id", {})
    indices = []
    for d in range(-log_prob.dim(), 0):
        if log_prob.shape[d] == 1 or d in {p[1] for p in plates}:
            continue
        if d >= -nesting or ids.get(d) not in sizes:
            raise TMCError(f"site {site['name']!r}: its log-density varies along dim {d}, which is neither one of "
                           f"its plates {[p[0] for p in plates]} nor a sample dim")
        indices.append((d, ids[d]))
    scale = site["scale"]
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        own = {p[0] for p in plates}
        local = [var for _, var in indices if own & {p[0] for p in sizes[var][1]}]
        if local:
            raise TMCError(f"site {site['name']!r}: a scaled log-density (poutine.scale, or a subsampled plate) "
                           "over a latent that lives in the site's plates is not supported: the scale must apply "
                           "to each plate element's marginal, after its own latents are summed")
        log_prob = log_prob * scale  # no local sum between the factor and the plate product: exact semantics
    return _Site(name, log_prob, plates, indices)


def _structure(sites: List[_Site], sizes: Dict[int, Tuple[int, List[Tuple[str, int, int]]]]) -> tuple:
    """A hashable key of the factor graph of ``sites`` (its plan is a function of it alone)."""
    return (tuple((var, size, tuple(plates)) for var, (size, plates) in sorted(sizes.items())),
            tuple((s.name, tuple(s.plates), tuple(s.indices)) for s in sites))


def _graph(sites: List[_Site], sizes: Dict[int, Tuple[int, List[Tuple[str, int, int]]]]) -> FactorGraph:
    """The factor graph of the factors, its indices named by their variables' ids."""
    g = FactorGraph()
    for plates in [p for _, p in sizes.values()] + [s.plates for s in sites]:
        for plate, _, size in plates:
            if plate not in g.plates:
                g.plate(plate, size)
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
    for _, dim, size in site.plates:
        target[dim] = size
    for d, _ in site.indices:
        target[d] = t.shape[d]
    t = t.expand(target)
    order = [n + p[1] for p in site.plates] + [n + d for d, _ in site.indices]
    rest = [k for k in range(n) if k not in order]
    return t.permute(order + rest).reshape([target[k - n] for k in order]) if rest else t.permute(order)


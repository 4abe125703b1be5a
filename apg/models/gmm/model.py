"""The GMM as a tmcgraph model, its Markov blankets, the APG block kernels and samplers, and the KL of eq. 4.

The blocks' incremental weights use the Markov blankets of the compiled
tmcgraph model (`gmm_model`): ``{tau, mu, x}`` for the globals and
``{c, x}`` per point for the assignments.  APG state: ``mu, tau (*B, L, I, D)``,
``c (*B, L, N)``; data ``x (*B, N, D)``.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch.distributions import Categorical, Gamma, Independent, Normal

from tmcgraph import JointDensity, Model

from ...proposals import NormalGamma, NormalGammaParams, kl_categorical, kl_normal_gamma
from ...sampler import Block, Sampler
from .algebra import PAPER, GMMConfig, assignment_logits, global_posterior, prior_params
from .networks import GMMProposals

__all__ = ["CategoricalKernel", "NormalGammaKernel", "apg_sampler", "exact_sampler", "gmm_model", "inclusive_kl"]


def _pick(param: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``param[..., c_n, :]``: ``param (..., I, D)``, ``c (...)`` -> ``(..., D)`` (leading dims broadcast)."""
    shape = torch.broadcast_shapes(param.shape[:-2], c.shape)
    param = param.expand(shape + param.shape[-2:])
    idx = c.expand(shape).unsqueeze(-1).unsqueeze(-1).expand(shape + (1, param.shape[-1]))
    return torch.gather(param, -2, idx).squeeze(-2)


def gmm_model(cfg: GMMConfig = PAPER, num_points: Optional[int] = None,
              dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Model:
    """The GMM as a `tmcgraph.Model`.

    Latents ``tau``, ``mu`` (event ``(I, D)``), ``c`` (plate ``N``); observation ``x`` (plate ``N``, event ``D``).
    ``num_points`` overrides ``cfg.num_points``; the prior's constants are made with ``dtype`` on ``device``.
    """
    shape = (cfg.num_clusters, cfg.dim)
    full = lambda v: torch.full(shape, float(v), dtype=dtype, device=device)  # noqa: E731
    alpha0, beta0, mu0, nu0 = full(cfg.alpha0), full(cfg.beta0), full(cfg.mu0), cfg.nu0
    uniform = torch.zeros(cfg.num_clusters, dtype=dtype, device=device)
    m = Model()
    m.plate("N", num_points or cfg.num_points)
    v: Dict[str, Any] = dict(validate_args=False)  # the samplers produce valid values; validation costs
    m.latent("tau", prior=lambda: Independent(Gamma(alpha0, beta0, **v), 2, **v))
    m.latent("mu", prior=lambda tau: Independent(Normal(mu0, (nu0 * tau).rsqrt(), **v), 2, **v))
    m.latent("c", prior=lambda: Categorical(logits=uniform, **v), plates=["N"])
    m.observe("x", lambda c, mu, tau: Independent(Normal(_pick(mu, c), _pick(tau, c).rsqrt(), **v), 1, **v),
              plates=["N"], event_dim=1)
    return m


_DENSITIES: Dict[tuple, JointDensity] = {}


def _density(cfg: GMMConfig, num_points: int, dtype: torch.dtype,
             device: Optional[torch.device] = None) -> JointDensity:
    # a plain dict rather than functools.lru_cache: torch.compile traces through a dict lookup
    key = (cfg, num_points, dtype, device)
    density = _DENSITIES.get(key)
    if density is None:
        if len(_DENSITIES) >= 32:
            _DENSITIES.clear()
        density = _DENSITIES[key] = JointDensity(gmm_model(cfg, num_points, dtype, device))
    return density


def _blankets(cfg: GMMConfig):
    """``log_joint``, globals blanket ``(*B, L)`` and assignment blanket ``(*B, L, N)`` from the compiled graph."""

    def dens(x):
        return _density(cfg, x.shape[-2], x.dtype, x.device)

    def log_joint_fn(x, s):
        return dens(x).log_prob(s, {"x": x})

    def globals_blanket(x, s):
        d = dens(x)
        return d.log_prob(s, {"x": x}, sites=d.blanket(["mu", "tau"]))

    def assignments_blanket(x, s):
        d = dens(x)
        return d.log_prob(s, {"x": x}, sites=d.blanket(["c"]), keep_plates=["N"])

    return log_joint_fn, globals_blanket, assignments_blanket


class NormalGammaKernel:
    """Kernel over ``{"mu", "tau"}`` from Normal-Gamma parameters ``(*B, L, I, D)``; densities ``(*B, L)``."""

    def __init__(self, params: NormalGammaParams) -> None:
        self.dist = NormalGamma(params)

    def sample(self, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Draw the block's values (no gradient), using ``generator`` if given."""
        mu, tau = self.dist.sample((), generator)
        return {"mu": mu, "tau": tau}

    def log_prob(self, v: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The kernel's log-density of the block's values ``v``."""
        return self.dist.log_prob(v["mu"], v["tau"])


class CategoricalKernel:
    """Kernel over ``{"c"}`` from logits ``(*B, L, N, I)``; per-point densities ``(*B, L, N)``.

    ``normalized=True`` says the logits are already log-probabilities (skips a log-softmax).
    """

    def __init__(self, logits: torch.Tensor, normalized: bool = False) -> None:
        self.logits = logits if normalized else torch.log_softmax(logits, -1)

    def sample(self, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Draw the block's values (no gradient), using ``generator`` if given."""
        with torch.no_grad():  # Gumbel-max
            logits = self.logits
            u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
            u = u.clamp_min(torch.finfo(logits.dtype).tiny)
            return {"c": (self.logits - (-u.log()).log()).argmax(-1)}

    def log_prob(self, v: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The kernel's log-density of the block's values ``v``."""
        return torch.gather(self.logits, -1, v["c"].unsqueeze(-1)).squeeze(-1)


def _sampler(oneshot_params, global_params, c_logits, cfg: GMMConfig, normalized: bool = False) -> Sampler:
    log_joint_fn, globals_blanket, assignments_blanket = _blankets(cfg)

    def init(x, L, generator=None):
        p = oneshot_params(x)  # (*B, I, D)
        p = NormalGammaParams(*(t.unsqueeze(-3).expand(t.shape[:-2] + (L,) + t.shape[-2:]) for t in p))
        k_eta = NormalGammaKernel(p)
        eta = k_eta.sample(generator)
        k_c = CategoricalKernel(c_logits(x, eta["mu"], eta["tau"]), normalized)
        c = k_c.sample(generator)
        state = {**eta, **c}
        return state, k_eta.log_prob(eta) + k_c.log_prob(c).sum(-1)

    blocks = [
        Block("globals", ("mu", "tau"), lambda x, s: NormalGammaKernel(global_params(x, s["c"])), globals_blanket),
        Block("assignments", ("c",), lambda x, s: CategoricalKernel(c_logits(x, s["mu"], s["tau"]), normalized),
              assignments_blanket, local_dims=1),
    ]
    return Sampler(init, blocks if global_params is not None else [], log_joint_fn)


def exact_sampler(cfg: GMMConfig = PAPER) -> Sampler:
    """The APG sampler whose kernels are the exact Gibbs conditionals (every incremental weight is 1).

    One-shot proposal: ``(mu, tau)`` from the prior, then ``c`` from its exact
    conditional.  Data ``x (*B, N, D)``; state ``mu, tau (*B, L, I, D)``, ``c (*B, L, N)``.
    """
    def prior(x):
        return NormalGammaParams(*(t.expand(x.shape[:-2] + t.shape) for t in prior_params(cfg, x)))

    return _sampler(prior, lambda x, c: global_posterior(x.unsqueeze(-3), c, cfg),
                    lambda x, mu, tau: assignment_logits(x.unsqueeze(-3), mu, tau), cfg)


def apg_sampler(nets: GMMProposals) -> Sampler:
    """The APG sampler of the GMM with learned kernels (RWS baselines: the one-shot proposal, no blocks).

    Data ``x (*B, N, D)``; state ``mu, tau (*B, L, I, D)``, ``c (*B, L, N)``.
    The blocks' incremental weights use the Markov blankets of the compiled
    tmcgraph model (`gmm_model`): ``{tau, mu, x}`` for the globals and
    ``{c, x}`` per point for the assignments.
    """
    return _sampler(nets.oneshot_params, nets.global_params if nets.globals is not None else None,
                    nets.assignment_logits, nets.cfg, normalized=True)


def inclusive_kl(nets: GMMProposals, x: torch.Tensor, state: Dict[str, torch.Tensor],
                 log_w: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Inclusive KL of eq. 4 between the exact conditionals and the learned kernels, per dataset.

    ``KL(p(mu, tau | x, c) || q(mu, tau | x, c))`` (summed over clusters and
    dims) and ``KL(p(c | x, mu, tau) || q(c | x, mu, tau))`` (summed over
    points), at the particles of ``state`` (an approximation of
    ``p(z_-b | x)``), averaged with the self-normalised weights ``log_w``
    (uniform if ``None``).

    Returns:
        ``{"globals": (*B,), "assignments": (*B,)}``.
    """
    with torch.no_grad():
        c, mu, tau = state["c"], state["mu"], state["tau"]
        if log_w is None:
            w = torch.full(c.shape[:-1], 1.0 / c.shape[-2], dtype=x.dtype, device=x.device)
        else:
            w = torch.softmax(log_w, -1)
        out = {}
        if nets.globals is not None:
            kl_g = kl_normal_gamma(global_posterior(x.unsqueeze(-3), c, nets.cfg), nets.global_params(x, c))
            out["globals"] = (w * kl_g).sum(-1)
        p_logits = assignment_logits(x.unsqueeze(-3), mu, tau)
        kl_c = kl_categorical(p_logits, nets.assignment_logits(x, mu, tau)).sum(-1)
        out["assignments"] = (w * kl_c).sum(-1)
    return out

"""The Gaussian mixture of the APG paper (Wu et al., ICML 2020, section 5.1): its exact conjugate algebra.

    mu_{i,d}, tau_{i,d} ~ NormalGamma(mu0, nu0, alpha0, beta0)   i < I clusters, d < D dims
    c_n ~ Categorical(1/I)                                         n < N points
    x_{n,d} | c_n = i ~ Normal(mu_{i,d}, 1 / tau_{i,d})

NormalGamma: ``tau ~ Gamma(alpha0, rate=beta0)``, ``mu | tau ~ Normal(mu0, 1 / (nu0 tau))``.
Defaults are the paper's: I=3, N=60, D=2, mu0=0, nu0=0.3, alpha0=2, beta0=2.

Shapes (leading dims broadcast): x ``(..., N, D)``; mu, tau ``(..., I, D)``;
c ``(..., N)`` int64.  The conditional of the globals is the conjugate update
with sufficient statistics ``{1[c_n=i], 1[c_n=i] x_n, 1[c_n=i] x_n^2}``
written with the prior *mean* mu0 where it belongs (the official code used nu0
there, biasing its proposals and its KL metric).

Here: the simulator, the exact conditionals, the log joint, the evidence given
the assignments in closed form, and the exact blocked Gibbs sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch.distributions import Normal

from ...errors import APGError
from ...proposals import NormalGamma, NormalGammaParams, normal_gamma_update

__all__ = ["GMMConfig", "PAPER", "assignment_logits", "gibbs", "global_posterior", "log_evidence_given_c", "log_joint",
           "normal_gamma_log_prob", "prior_params", "sample_categorical", "sample_normal_gamma", "simulate",
           "sufficient_statistics"]


@dataclass(frozen=True)
class GMMConfig:
    """Sizes and Normal-Gamma hyperparameters (the paper's defaults)."""

    num_clusters: int = 3
    num_points: int = 60
    dim: int = 2
    mu0: float = 0.0
    nu0: float = 0.3
    alpha0: float = 2.0
    beta0: float = 2.0


#: the paper's settings
PAPER = GMMConfig()


def prior_params(cfg: GMMConfig, like: torch.Tensor) -> NormalGammaParams:
    """The prior as Normal-Gamma parameters of shape ``(I, D)`` with ``like``'s dtype and device."""
    full = lambda v: torch.full((cfg.num_clusters, cfg.dim), v, dtype=like.dtype, device=like.device)  # noqa: E731
    return NormalGammaParams(full(cfg.mu0), full(cfg.nu0), full(cfg.alpha0), full(cfg.beta0))


def normal_gamma_log_prob(mu: torch.Tensor, tau: torch.Tensor, p: NormalGammaParams) -> torch.Tensor:
    """``log NG(mu, tau; p)`` summed over clusters and dims: ``(...)``."""
    return NormalGamma(p).log_prob(mu, tau)


def sample_normal_gamma(p: NormalGammaParams, sample_shape: Sequence[int] = (),
                        generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(mu, tau)`` of shape ``(*sample_shape, ..., I, D)``."""
    return NormalGamma(p).sample(sample_shape, generator)


def sample_categorical(logits: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One draw per row of ``logits (..., I)``: ``(...)`` int64 (as ``Categorical(logits=...).sample()``)."""
    probs = torch.softmax(logits - logits.logsumexp(-1, keepdim=True), -1)
    draws = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, True, generator=generator)
    return draws.T.reshape(probs.shape[:-1])


def sufficient_statistics(x: torch.Tensor, c: torch.Tensor,
                          num_clusters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s0, s1, s2)``, each ``(..., I, D)``: counts, sums of x and of x^2 per cluster."""
    onehot = torch.nn.functional.one_hot(c, num_clusters).to(x.dtype)  # (..., N, I)
    s1 = onehot.transpose(-1, -2) @ x  # (..., I, D)
    s2 = onehot.transpose(-1, -2) @ (x * x)
    s0 = onehot.sum(-2).unsqueeze(-1).expand_as(s1)
    return s0, s1, s2


def global_posterior(x: torch.Tensor, c: torch.Tensor, cfg: GMMConfig) -> NormalGammaParams:
    """The exact Gibbs conditional ``p(mu, tau | x, c)``: Normal-Gamma parameters ``(..., I, D)``."""
    return normal_gamma_update(prior_params(cfg, x), *sufficient_statistics(x, c, cfg.num_clusters))


def assignment_logits(x: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """Logits ``(..., N, I)`` of the exact Gibbs conditional ``p(c_n | x_n, mu, tau)`` (uniform prior)."""
    lp = Normal(mu.unsqueeze(-3), tau.unsqueeze(-3).rsqrt()).log_prob(x.unsqueeze(-2))  # (..., N, I, D)
    return lp.sum(-1)


def log_joint(x: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor, c: torch.Tensor, cfg: GMMConfig) -> torch.Tensor:
    """``log p(x, mu, tau, c)``: ``(...)``."""
    prior = normal_gamma_log_prob(mu, tau, prior_params(cfg, x))
    logits = assignment_logits(x, mu, tau)  # (..., N, I)
    shape = torch.broadcast_shapes(logits.shape[:-1], c.shape)
    lik = torch.gather(logits.expand(shape + logits.shape[-1:]), -1, c.expand(shape).unsqueeze(-1)).squeeze(-1)
    lik = lik.sum(-1)
    return prior + lik - c.shape[-1] * math.log(cfg.num_clusters)


def log_evidence_given_c(x: torch.Tensor, c: torch.Tensor, cfg: GMMConfig) -> torch.Tensor:
    """``log p(x, c) = log p(c) + log integral p(x | c, mu, tau) p(mu, tau)``, in closed form: ``(...)``."""
    post = global_posterior(x, c, cfg)
    s0 = post.nu - cfg.nu0
    per = (torch.lgamma(post.alpha) - math.lgamma(cfg.alpha0) + cfg.alpha0 * math.log(cfg.beta0)
           - post.alpha * post.beta.log() + 0.5 * (math.log(cfg.nu0) - post.nu.log())
           - 0.5 * s0 * math.log(2 * math.pi))
    return per.sum((-2, -1)) - c.shape[-1] * math.log(cfg.num_clusters)


def simulate(num_datasets: int, cfg: GMMConfig = PAPER, *, seed: int = 0,
             num_points: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """Draw datasets from the model (float32, reproducible from ``seed``).

    Returns:
        ``{"x": (B, N, D), "mu": (B, I, D), "tau": (B, I, D), "c": (B, N)}``.
    """
    g = torch.Generator().manual_seed(seed)
    n = num_points or cfg.num_points
    shape = (num_datasets, cfg.num_clusters, cfg.dim)
    tau = torch._standard_gamma(torch.full(shape, cfg.alpha0, dtype=torch.float64), generator=g) / cfg.beta0
    mu = cfg.mu0 + torch.randn(shape, generator=g, dtype=torch.float64) / (cfg.nu0 * tau).sqrt()
    c = torch.randint(cfg.num_clusters, (num_datasets, n), generator=g)
    loc = torch.gather(mu, 1, c.unsqueeze(-1).expand(-1, -1, cfg.dim))
    scale = torch.gather(tau, 1, c.unsqueeze(-1).expand(-1, -1, cfg.dim)).rsqrt()
    x = loc + scale * torch.randn(num_datasets, n, cfg.dim, generator=g, dtype=torch.float64)
    return {"x": x.float(), "mu": mu.float(), "tau": tau.float(), "c": c}


def gibbs(x: torch.Tensor, num_chains: int, num_sweeps: int, cfg: GMMConfig = PAPER, *,
          generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """The exact blocked Gibbs sampler (the baseline the learned kernels approximate).

    Starts from the prior for ``(mu, tau)``, then alternates ``c ~ p(c | x, mu, tau)``
    and ``(mu, tau) ~ p(mu, tau | x, c)``.

    Args:
        x: ``(..., N, D)`` data.
        num_chains: independent chains per dataset.
        num_sweeps: full sweeps.
        cfg: the model's settings (the paper's by default).
        generator: the random stream (torch's default if ``None``).

    Returns:
        the final state ``{"mu", "tau": (..., L, I, D), "c": (..., L, N)}`` and
        ``"log_joint": (num_sweeps, ..., L)`` after each sweep.
    """
    if num_chains < 1 or num_sweeps < 1:
        raise APGError(f"num_chains and num_sweeps must be >= 1, got {num_chains} and {num_sweeps}")
    xs = x.unsqueeze(-3)  # (..., 1, N, D)
    prior = prior_params(cfg, x)
    mu, tau = sample_normal_gamma(prior, torch.Size(x.shape[:-2]) + (num_chains,), generator)
    trace = []
    for _ in range(num_sweeps):
        c = sample_categorical(assignment_logits(xs, mu, tau), generator)
        mu, tau = sample_normal_gamma(global_posterior(xs, c, cfg), (), generator)
        trace.append(log_joint(xs, mu, tau, c, cfg))
    return {"mu": mu, "tau": tau, "c": c, "log_joint": torch.stack(trace)}

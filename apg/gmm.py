"""The Gaussian mixture model of the APG paper (section 5.1), with its exact conjugate algebra.

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

Also here: the model declared with tmcgraph (:func:`gmm_model`; the APG blocks'
Markov blankets come from its factor graph), the APG sampler with exact kernels
(:func:`exact_sampler`) or learned ones (:class:`GMMProposals`,
:func:`apg_sampler`; appendix E), and the inclusive KL of eq. 4
(:func:`inclusive_kl`).  APG state: ``mu, tau (*B, L, I, D)``, ``c (*B, L, N)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional, Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Gamma, Independent, Normal

from tmcgraph import Model
from tmcgraph.density import JointDensity

from .proposals import (
    NeuralCategorical,
    NeuralNormalGamma,
    NormalGamma,
    NormalGammaParams,
    kl_categorical,
    kl_normal_gamma,
    normal_gamma_update,
)
from .sampler import Block, Sampler

__all__ = [
    "GMMConfig",
    "GMMProposals",
    "NormalGammaParams",
    "apg_sampler",
    "assignment_logits",
    "exact_sampler",
    "gmm_model",
    "inclusive_kl",
    "gibbs",
    "global_posterior",
    "log_evidence_given_c",
    "log_joint",
    "normal_gamma_log_prob",
    "sample_normal_gamma",
    "simulate",
    "sufficient_statistics",
]


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


def prior_params(cfg: GMMConfig, like: torch.Tensor) -> NormalGammaParams:
    """The prior as Normal-Gamma parameters of shape ``(I, D)`` with ``like``'s dtype and device."""
    full = lambda v: torch.full((cfg.num_clusters, cfg.dim), v, dtype=like.dtype, device=like.device)  # noqa: E731
    return NormalGammaParams(full(cfg.mu0), full(cfg.nu0), full(cfg.alpha0), full(cfg.beta0))


def normal_gamma_log_prob(mu: torch.Tensor, tau: torch.Tensor, p: NormalGammaParams) -> torch.Tensor:
    """``log NG(mu, tau; p)`` summed over clusters and dims: ``(...)``."""
    return NormalGamma(p).log_prob(mu, tau)


def sample_normal_gamma(p: NormalGammaParams, sample_shape: Sequence[int] = ()) -> tuple:
    """Draw ``(mu, tau)`` of shape ``(*sample_shape, ..., I, D)``."""
    return NormalGamma(p).sample(sample_shape)


def sufficient_statistics(x: torch.Tensor, c: torch.Tensor, num_clusters: int) -> tuple:
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


def simulate(num_datasets: int, cfg: GMMConfig = GMMConfig(), *, seed: int = 0,
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


def gibbs(x: torch.Tensor, num_chains: int, num_sweeps: int, cfg: GMMConfig = GMMConfig()) -> Dict[str, torch.Tensor]:
    """The exact blocked Gibbs sampler (the baseline the learned kernels approximate).

    Starts from the prior for ``(mu, tau)``, then alternates ``c ~ p(c | x, mu, tau)``
    and ``(mu, tau) ~ p(mu, tau | x, c)``.

    Args:
        x: ``(..., N, D)`` data.
        num_chains: independent chains per dataset.
        num_sweeps: full sweeps.

    Returns:
        the final state ``{"mu", "tau": (..., L, I, D), "c": (..., L, N)}`` and
        ``"log_joint": (num_sweeps, ..., L)`` after each sweep.
    """
    if num_chains < 1 or num_sweeps < 1:
        raise ValueError(f"num_chains and num_sweeps must be >= 1, got {num_chains} and {num_sweeps}")
    xs = x.unsqueeze(-3)  # (..., 1, N, D)
    prior = prior_params(cfg, x)
    mu, tau = sample_normal_gamma(prior, torch.Size(x.shape[:-2]) + (num_chains,))
    trace = []
    for _ in range(num_sweeps):
        c = Categorical(logits=assignment_logits(xs, mu, tau)).sample()
        mu, tau = sample_normal_gamma(global_posterior(xs, c, cfg))
        trace.append(log_joint(xs, mu, tau, c, cfg))
    return {"mu": mu, "tau": tau, "c": c, "log_joint": torch.stack(trace)}


# ---------------------------------------------------------------------------
# the model declared with tmcgraph, and its Markov blankets
# ---------------------------------------------------------------------------
def _pick(param: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``param[..., c_n, :]``: ``param (..., I, D)``, ``c (...)`` -> ``(..., D)`` (leading dims broadcast)."""
    shape = torch.broadcast_shapes(param.shape[:-2], c.shape)
    param = param.expand(shape + param.shape[-2:])
    idx = c.expand(shape).unsqueeze(-1).unsqueeze(-1).expand(shape + (1, param.shape[-1]))
    return torch.gather(param, -2, idx).squeeze(-2)


def gmm_model(cfg: GMMConfig = GMMConfig(), num_points: Optional[int] = None,
              dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Model:
    """The GMM as a :class:`tmcgraph.Model`: latents ``tau``, ``mu`` (event ``(I, D)``), ``c`` (plate ``N``);
    observation ``x`` (plate ``N``, event ``D``).  ``num_points`` overrides ``cfg.num_points``; the
    prior's constants are made with ``dtype`` on ``device``."""
    shape = (cfg.num_clusters, cfg.dim)
    full = lambda v: torch.full(shape, float(v), dtype=dtype, device=device)  # noqa: E731
    alpha0, beta0, mu0, nu0 = full(cfg.alpha0), full(cfg.beta0), full(cfg.mu0), cfg.nu0
    uniform = torch.zeros(cfg.num_clusters, dtype=dtype, device=device)
    m = Model()
    m.plate("N", num_points or cfg.num_points)
    v = dict(validate_args=False)  # the samplers produce valid values; validation is per-call overhead
    m.latent("tau", prior=lambda: Independent(Gamma(alpha0, beta0, **v), 2, **v))
    m.latent("mu", prior=lambda tau: Independent(Normal(mu0, (nu0 * tau).rsqrt(), **v), 2, **v))
    m.latent("c", prior=lambda: Categorical(logits=uniform, **v), plates=["N"])
    m.observe("x", lambda c, mu, tau: Independent(Normal(_pick(mu, c), _pick(tau, c).rsqrt(), **v), 1, **v),
              plates=["N"], event_dim=1)
    return m


@lru_cache(maxsize=32)
def _density(cfg: GMMConfig, num_points: int, dtype: torch.dtype,
             device: Optional[torch.device] = None) -> JointDensity:
    return JointDensity(gmm_model(cfg, num_points, dtype, device))


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


# ---------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------
class NormalGammaKernel:
    """Kernel over ``{"mu", "tau"}`` from Normal-Gamma parameters ``(*B, L, I, D)``; densities ``(*B, L)``."""

    def __init__(self, params: NormalGammaParams) -> None:
        self.dist = NormalGamma(params)

    def sample(self) -> Dict[str, torch.Tensor]:
        mu, tau = self.dist.sample()
        return {"mu": mu, "tau": tau}

    def log_prob(self, v: Dict[str, torch.Tensor]) -> torch.Tensor:
        return self.dist.log_prob(v["mu"], v["tau"])


class CategoricalKernel:
    """Kernel over ``{"c"}`` from logits ``(*B, L, N, I)``; per-point densities ``(*B, L, N)``.

    ``normalized=True`` says the logits are already log-probabilities (skips a log-softmax).
    """

    def __init__(self, logits: torch.Tensor, normalized: bool = False) -> None:
        self.logits = logits if normalized else torch.log_softmax(logits, -1)

    def sample(self) -> Dict[str, torch.Tensor]:
        with torch.no_grad():  # Gumbel-max
            u = torch.rand_like(self.logits).clamp_min(torch.finfo(self.logits.dtype).tiny)
            return {"c": (self.logits - (-u.log()).log()).argmax(-1)}

    def log_prob(self, v: Dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.gather(self.logits, -1, v["c"].unsqueeze(-1)).squeeze(-1)


def _sampler(oneshot_params, global_params, c_logits, cfg: GMMConfig, normalized: bool = False) -> Sampler:
    log_joint_fn, globals_blanket, assignments_blanket = _blankets(cfg)

    def init(x, L):
        p = oneshot_params(x)  # (*B, I, D)
        p = NormalGammaParams(*(t.unsqueeze(-3).expand(t.shape[:-2] + (L,) + t.shape[-2:]) for t in p))
        k_eta = NormalGammaKernel(p)
        eta = k_eta.sample()
        k_c = CategoricalKernel(c_logits(x, eta["mu"], eta["tau"]), normalized)
        c = k_c.sample()
        state = {**eta, **c}
        return state, k_eta.log_prob(eta) + k_c.log_prob(c).sum(-1)

    blocks = [
        Block("globals", ("mu", "tau"), lambda x, s: NormalGammaKernel(global_params(x, s["c"])), globals_blanket),
        Block("assignments", ("c",), lambda x, s: CategoricalKernel(c_logits(x, s["mu"], s["tau"]), normalized),
              assignments_blanket, local_dims=1),
    ]
    return Sampler(init, blocks if global_params is not None else [], log_joint_fn)


def exact_sampler(cfg: GMMConfig = GMMConfig()) -> Sampler:
    """The APG sampler whose kernels are the exact Gibbs conditionals (every incremental weight is 1).

    One-shot proposal: ``(mu, tau)`` from the prior, then ``c`` from its exact
    conditional.  Data ``x (*B, N, D)``; state ``mu, tau (*B, L, I, D)``, ``c (*B, L, N)``.
    """
    def prior(x):
        return NormalGammaParams(*(t.expand(x.shape[:-2] + t.shape) for t in prior_params(cfg, x)))

    return _sampler(prior, lambda x, c: global_posterior(x.unsqueeze(-3), c, cfg),
                    lambda x, mu, tau: assignment_logits(x.unsqueeze(-3), mu, tau), cfg)


# ---------------------------------------------------------------------------
# learned proposals (appendix E) and the baselines' encoders
# ---------------------------------------------------------------------------
class LSTMNormalGamma(nn.Module):
    """RWS-LSTM baseline encoder of the globals: an LSTM reads the points in order; its last hidden state
    gives the Normal-Gamma parameters of every cluster (no sufficient statistics, not permutation invariant)."""

    def __init__(self, cfg: GMMConfig, hidden: int = 32) -> None:
        super().__init__()
        self.cfg = cfg
        self.lstm = nn.LSTM(cfg.dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 4 * cfg.num_clusters * cfg.dim)

    def forward(self, x: torch.Tensor) -> NormalGammaParams:
        lead = x.shape[:-2]
        _, (h, _) = self.lstm(x.reshape((-1,) + x.shape[-2:]))
        out = self.head(h[-1]).reshape(lead + (4, self.cfg.num_clusters, self.cfg.dim))
        sp = nn.functional.softplus
        return NormalGammaParams(out[..., 0, :, :], sp(out[..., 1, :, :]) + 1e-3, sp(out[..., 2, :, :]) + 1e-3,
                                 sp(out[..., 3, :, :]) + 1e-3)


class GMMProposals(nn.Module):
    """The learned proposals of the GMM (appendix E).

    * ``oneshot``: ``q(mu, tau | x)``: neural sufficient statistics of ``x_n``
      (``encoder="mlp"``) or an LSTM over the points (``encoder="lstm"``).
    * ``globals``: ``q(mu, tau | x, c)``: neural sufficient statistics of
      ``[x_n, onehot(c_n)]`` (``None`` for the RWS baselines, ``conditional=False``).
    * ``assignments``: ``q(c | x, mu, tau)``: ``FC32 tanh -> FC1`` on
      ``[x_n, mu_i, tau_i]`` per (point, cluster), softmax over clusters.

    Args:
        cfg: model sizes and prior.
        encoder: ``"mlp"`` or ``"lstm"``.
        conditional: build the block kernel of the globals (APG).
        hidden: hidden units of the assignment MLP (and of the LSTM).
    """

    def __init__(self, cfg: GMMConfig = GMMConfig(), encoder: str = "mlp", conditional: bool = True,
                 hidden: int = 32) -> None:
        super().__init__()
        if encoder not in ("mlp", "lstm"):
            raise ValueError(f"encoder must be 'mlp' or 'lstm', got {encoder!r}")
        k, d = cfg.num_clusters, cfg.dim
        self.cfg, self.encoder = cfg, encoder
        self.oneshot = NeuralNormalGamma(d, k, d) if encoder == "mlp" else LSTMNormalGamma(cfg, hidden)
        self.globals = NeuralNormalGamma(d + k, k, d) if conditional else None
        self.assignments = NeuralCategorical(3 * d, hidden)

    def oneshot_params(self, x: torch.Tensor) -> NormalGammaParams:
        """``x (*B, N, D)`` -> ``q(mu, tau | x)`` parameters ``(*B, I, D)``."""
        return self.oneshot(x, prior_params(self.cfg, x)) if self.encoder == "mlp" else self.oneshot(x)

    def global_params(self, x: torch.Tensor, c: torch.Tensor) -> NormalGammaParams:
        """``x (*B, N, D)``, ``c (*B, L, N)`` -> ``q(mu, tau | x, c)`` parameters ``(*B, L, I, D)``."""
        if self.globals is None:
            raise ValueError("these proposals have no conditional kernel for the globals (an RWS baseline)")
        onehot = nn.functional.one_hot(c, self.cfg.num_clusters).to(x.dtype)
        xs = x.unsqueeze(-3).expand(onehot.shape[:-1] + x.shape[-1:])
        return self.globals(torch.cat([xs, onehot], -1), prior_params(self.cfg, x))

    def assignment_logits(self, x: torch.Tensor, mu: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``x (*B, N, D)``, ``mu, tau (*B, L, I, D)`` -> normalised logits ``(*B, L, N, I)`` of ``q(c | x, mu, tau)``.
        """
        k = mu.shape[-2]
        prior = torch.full((k,), -math.log(k), dtype=x.dtype, device=x.device)
        return self.assignments.forward_pairs(x.unsqueeze(-3), torch.cat([mu, tau], -1), prior)


def apg_sampler(nets: GMMProposals) -> Sampler:
    """The APG sampler of the GMM with learned kernels (RWS baselines: the one-shot proposal, no blocks).

    Data ``x (*B, N, D)``; state ``mu, tau (*B, L, I, D)``, ``c (*B, L, N)``.
    The blocks' incremental weights use the Markov blankets of the compiled
    tmcgraph model (:func:`gmm_model`): ``{tau, mu, x}`` for the globals and
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

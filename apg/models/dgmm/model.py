"""The DGMM as a tmcgraph model with a learned decoder, its block kernels and the APG sampler.

Model (Wu et al., ICML 2020, sec. 5.2)::

    mu_i ~ Normal(0, sigma0^2 I)              latent "mu", event (I, 2)
    c_n ~ Categorical(1 / I)                  latent "c", plate N
    alpha_n ~ Uniform[-pi, pi)                latent "alpha", plate N
    x_n ~ Normal(mu_{c_n} + g_theta(alpha_n), sigma_eps^2 I)   observation "x", plate N, event 2

APG state: ``mu (*B, L, I, 2)``, ``c (*B, L, N)`` int64, ``alpha (*B, L, N)``;
data ``x (*B, N, 2)``.  Blocks: ``{mu}`` (one weight per particle) and
``{c, alpha}`` (per point: the points are conditionally independent given
``mu``), their Markov blankets read off the compiled factor graph.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import torch
from torch.distributions import Categorical, Independent, Normal, Uniform

from tmcgraph import JointDensity, Model

from ...sampler import Block, Sampler
from ..gmm.model import CategoricalKernel
from .data import DGMMConfig
from .networks import AnyDecoder, AnyProposals, CircleDecoder, DGMMProposals

__all__ = ["DGMMDensity", "LocalKernel", "MuKernel", "apg_sampler", "dgmm_model", "exact_sampler", "log_joint",
           "pick"]


def pick(param: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``param[..., c_n, :]``: ``param (..., I, D)``, ``c (..., N)`` -> ``(..., N, D)`` (leading dims broadcast)."""
    shape = torch.broadcast_shapes(param.shape[:-2], c.shape[:-1])
    param = param.expand(shape + param.shape[-2:])
    c = c.expand(shape + c.shape[-1:])
    return torch.gather(param, -2, c.unsqueeze(-1).expand(c.shape + param.shape[-1:]))


def _pick_point(param: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``param[..., c, :]`` for the layouts tmcgraph builds: ``param (..., I, D)``, ``c (...)`` -> ``(..., D)``."""
    shape = torch.broadcast_shapes(param.shape[:-2], c.shape)
    param = param.expand(shape + param.shape[-2:])
    idx = c.expand(shape).unsqueeze(-1).unsqueeze(-1).expand(shape + (1, param.shape[-1]))
    return torch.gather(param, -2, idx).squeeze(-2)


def dgmm_model(cfg: DGMMConfig, decoder: AnyDecoder, num_points: Optional[int] = None,
               dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None) -> Model:
    """The DGMM as a `tmcgraph.Model` whose likelihood calls ``decoder`` (theta).

    Latents ``mu`` (event ``(I, 2)``), ``c`` and ``alpha`` (plate ``N``);
    observation ``x`` (plate ``N``, event 2).  ``num_points`` overrides ``cfg.num_points``.
    """
    k = cfg.num_clusters
    zeros = torch.zeros(k, 2, dtype=dtype, device=device)
    uniform = torch.zeros(k, dtype=dtype, device=device)
    lo = torch.tensor(-math.pi, dtype=dtype, device=device)
    hi = torch.tensor(math.pi, dtype=dtype, device=device)
    v: Dict[str, Any] = dict(validate_args=False)
    m = Model()
    m.plate("N", num_points or cfg.num_points)
    m.latent("mu", prior=lambda: Independent(Normal(zeros, cfg.sigma0, **v), 2, **v))
    m.latent("c", prior=lambda: Categorical(logits=uniform, **v), plates=["N"])
    m.latent("alpha", prior=lambda: Uniform(lo, hi, **v), plates=["N"])
    noise = cfg.likelihood_noise
    m.observe("x", lambda c, alpha, mu: Independent(Normal(_pick_point(mu, c) + decoder(alpha), noise, **v), 1, **v),
              plates=["N"], event_dim=1)
    return m


def log_joint(x: torch.Tensor, mu: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor, decoder: AnyDecoder,
              cfg: DGMMConfig) -> torch.Tensor:
    """``log p_theta(x, mu, c, alpha)`` written out by hand (the reference the declared model is tested against).

    ``x (..., N, 2)``, ``mu (..., I, 2)``, ``c, alpha (..., N)`` -> ``(...)``.
    """
    k = cfg.num_clusters
    lp_mu = Normal(0.0, cfg.sigma0).log_prob(mu).sum((-2, -1))
    n = c.shape[-1]
    lp_c = -n * math.log(k)
    lp_alpha = -n * math.log(2 * math.pi)
    loc = pick(mu, c) + decoder(alpha)
    lp_x = Normal(loc, cfg.likelihood_noise).log_prob(x).sum((-2, -1))
    return lp_mu + lp_c + lp_alpha + lp_x


class DGMMDensity:
    """``log p_theta(x, z)`` and the blocks' Markov blankets.

    From `tmcgraph.JointDensity` of `dgmm_model` (one per number of points, dtype and device, built on first use).
    """

    def __init__(self, cfg: DGMMConfig, decoder: AnyDecoder) -> None:
        self.cfg, self.decoder = cfg, decoder
        self._cache: Dict[Tuple[int, torch.dtype, torch.device], JointDensity] = {}

    def density(self, x: torch.Tensor) -> JointDensity:
        """The `tmcgraph.JointDensity` for datasets shaped like ``x`` ``(*B, N, 2)`` (cached)."""
        key = (x.shape[-2], x.dtype, x.device)
        if key not in self._cache:
            self._cache[key] = JointDensity(dgmm_model(self.cfg, self.decoder, x.shape[-2], x.dtype, x.device))
        return self._cache[key]

    def log_joint(self, x: torch.Tensor, s: Dict[str, torch.Tensor]) -> torch.Tensor:
        """``(*B, L)``."""
        return self.density(x).log_prob(s, {"x": x})

    def mu_blanket(self, x: torch.Tensor, s: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The factors touching ``mu``: ``(*B, L)``."""
        d = self.density(x)
        return d.log_prob(s, {"x": x}, sites=d.blanket(["mu"]))

    def local_blanket(self, x: torch.Tensor, s: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The factors touching ``c`` or ``alpha``, per point: ``(*B, L, N)``."""
        d = self.density(x)
        return d.log_prob(s, {"x": x}, sites=d.blanket(["c", "alpha"]), keep_plates=["N"])


class MuKernel:
    """Kernel over ``{"mu"}``: independent Normals ``(*B, L, I, 2)``; densities ``(*B, L)``."""

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor) -> None:
        self.loc, self.scale = torch.broadcast_tensors(loc, scale)

    def sample(self, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Draw the block's values (no gradient), using ``generator`` if given."""
        with torch.no_grad():
            return {"mu": torch.normal(self.loc, self.scale, generator=generator)}

    def log_prob(self, v: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The kernel's log-density of the block's values ``v``."""
        z = (v["mu"] - self.loc) / self.scale
        return (-0.5 * z * z - self.scale.log() - 0.5 * math.log(2 * math.pi)).sum((-2, -1))


class LocalKernel:
    """Kernel over ``{"c", "alpha"}`` per point.

    ``q(c_n | x_n, mu) q(alpha_n | x_n, mu_{c_n})``; densities ``(*B, L, N)``.
    """

    def __init__(self, nets: AnyProposals, decoder: AnyDecoder, x: torch.Tensor, mu: torch.Tensor) -> None:
        self.nets, self.x, self.mu = nets, x, mu
        with torch.no_grad():
            self.radius = decoder.radius.detach().to(x.dtype)
        self.c_kernel = CategoricalKernel(nets.assignment_logits(x, mu, self.radius), normalized=True)

    def _angle(self, c: torch.Tensor) -> Any:
        return self.nets.angle_dist(self.x, pick(self.mu, c), self.radius)

    def sample(self, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """Draw the block's values (no gradient), using ``generator`` if given."""
        c = self.c_kernel.sample(generator)["c"]
        with torch.no_grad():
            alpha = self._angle(c).sample(generator)
        return {"c": c, "alpha": alpha}

    def log_prob(self, v: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The kernel's log-density of the block's values ``v``."""
        return self.c_kernel.log_prob({"c": v["c"]}) + self._angle(v["c"]).log_prob(v["alpha"])


def apg_sampler(nets: AnyProposals, decoder: AnyDecoder, oneshot: Optional[AnyProposals] = None) -> Sampler:
    """The DGMM's APG sampler (the RWS baseline: the one-shot proposal alone, no blocks).

    One-shot: ``mu ~ q(mu | x)`` (from ``oneshot``'s networks if given, else ``nets``'), then
    ``(c, alpha) ~ q(c, alpha | x, mu)``.
    Blocks: ``"mu"`` (``q(mu | x, c, alpha)``) and ``"local"`` (``q(c, alpha | x, mu)``, per point).
    Data ``x (*B, N, 2)``; state ``mu (*B, L, I, 2)``, ``c, alpha (*B, L, N)``.
    """
    dens = DGMMDensity(nets.cfg, decoder)
    first = nets if oneshot is None else oneshot

    def init(x, L, generator=None):
        loc, scale = first.oneshot_params(x)  # (*B, I, 2)
        expand = lambda t: t.unsqueeze(-3).expand(t.shape[:-2] + (L,) + t.shape[-2:])  # noqa: E731
        k_mu = MuKernel(expand(loc), expand(scale))
        mu = k_mu.sample(generator)
        k_local = LocalKernel(nets, decoder, x, mu["mu"])
        local = k_local.sample(generator)
        state = {**mu, **local}
        return state, k_mu.log_prob(mu) + k_local.log_prob(local).sum(-1)

    blocks = [
        Block("mu", ("mu",), lambda x, s: MuKernel(*nets.mu_params(x, s["c"], s["alpha"], decoder)),
              dens.mu_blanket),
        Block("local", ("c", "alpha"), lambda x, s: LocalKernel(nets, decoder, x, s["mu"]), dens.local_blanket,
              local_dims=1),
    ]
    return Sampler(init, blocks if nets.mu_stats is not None else [], dens.log_joint)


def exact_sampler(nets: AnyProposals, radius: float) -> Sampler:
    """The blocked Gibbs sampler of the true rings (a circle of ``radius``).

    ``nets``'s one-shot proposal, then the exact conditionals of ``{mu}`` and ``{c, alpha}`` (every incremental weight
    is 1).
    The block kernels are those of a `DGMMProposals` whose residuals are zero (see `DGMMProposals`), with
    `CircleDecoder` as the model.
    """
    # fresh residual networks, zeroed below (the kernels of either kind of networks have no exact form otherwise)
    with torch.random.fork_rng(devices=[]):  # building them leaves torch's global stream untouched
        exact = DGMMProposals(nets.cfg, conditional=nets.mu_stats is not None).to(next(nets.parameters()))
    with torch.no_grad():
        for module in (exact.mu_stats, exact.score, exact.angle):
            if module is not None:
                module.zero_residual_()
    return apg_sampler(exact, CircleDecoder(radius), oneshot=nets)

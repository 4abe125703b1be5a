"""The DGMM's learned decoder (theta) and proposals (phi), after appendix E of Wu et al. (ICML 2020).

Decoder ``g_theta(alpha)``: ``[cos alpha, sin alpha] -> FC32 tanh -> FC2``,
normalised to unit length and scaled by a learned radius (the official code's
decoder; its input is ``alpha`` itself, ours the point on the unit circle, so
the learned curve is closed).

Proposals (``DGMMProposals``), all with neural sufficient statistics summed over
the points in the conjugate form of a Normal with known noise: per point a
precision ``r_n > 0`` and a target ``t_n``, grouped by a (soft or hard)
assignment ``gamma_{n,i}``::

    q(mu_i | ...) = Normal(m_i, 1 / p_i),  p_i = p0 + sum_n gamma_{n,i} r_n,
                                           m_i = (p0 m0 + sum_n gamma_{n,i} r_n t_n) / p_i

* one-shot ``q(mu | x)``: ``gamma_n = softmax(FC_I(h_n))``, ``r_n, t_n`` from
  ``h_n = MLP(x_n)`` (appendix E: soft assignments times per-point features, summed).
* ``q(mu | x, c, alpha)``: ``gamma_n = onehot(c_n)``; ``r_n, t_n`` from
  ``[x_n, cos alpha_n, sin alpha_n, x_n - g_theta(alpha_n)]`` as residuals on the
  exact statistics ``r = 1 / sigma_eps^2``, ``t = x_n - g_theta(alpha_n)``
  (``g_theta`` detached: the kernel reads the current decoder, it does not train it).
* ``q(c_n, alpha_n | x_n, mu)``, per point: ``c_n`` from a softmax over clusters
  of a score of ``d_{n,i} = x_n - mu_i``; ``alpha_n | c_n`` von Mises.  Both are
  residuals on the exact conditionals of a circular decoder of the current
  radius ``r`` (the von Mises of mean ``angle(d)`` and concentration
  ``r |d| / sigma_eps^2``, the score ``-(|d|^2 + r^2) / (2 sigma_eps^2) + log I0(r |d| / sigma_eps^2)``);
  the learned parts correct for the decoder's warp of the angle.

The official architecture feeds raw ``[x_n, mu_i]`` and a Beta proposal on
``alpha / 2 pi``, which cannot put mass on both sides of the angle 0 (the
posterior of a point there is split between the interval's ends); the von
Mises lives on the circle.  Sampling uses torch's von Mises sampler, seeded
from the sampler's generator (`von_mises_sample`).

`PaperDGMMProposals` is appendix E's architecture as the official code builds it
(selectable as the ``apg-paper`` method; ``rws-lstm`` is its one-shot LSTM-RWS
baseline):

* ``q(mu | x)`` and ``q(mu | x, c)``: per point, ``v_n = FC16(tanh(FC32(f_n)))`` and
  ``gamma_n = softmax(FC_I(tanh(FC32(f_n))))`` with ``f_n = x_n`` (one-shot) or
  ``[x_n, onehot(c_n)]`` (the kernel: it does not read the angles); per cluster
  the statistic ``sum_n gamma_{n,i} v_n / sum_n gamma_{n,i}`` with the prior's
  mean and standard deviation feeds two heads ``FC2(tanh(FC32(.)))``: the mean
  and the log standard deviation of a Normal over ``mu_i``.  ``encoder="lstm"``
  replaces the one-shot's statistic by an LSTM over the points (LSTM-RWS).
* ``q(c_n | x_n, mu)``: softmax over clusters of ``FC1(relu(FC32(x_n - mu_i)))``.
* ``q(alpha_n | x_n, mu_{c_n})``: ``(alpha_n + pi) / 2 pi ~ Beta(a, b)`` with
  ``log a, log b = FC1(tanh(FC32(x_n - mu_{c_n})))`` each.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
from torch import nn
from torch.distributions import VonMises
from typing_extensions import override

from ...proposals import Tanh
from .data import PAPER, DGMMConfig

__all__ = ["AnyDecoder", "AnyProposals", "BetaAngle", "CircleDecoder", "DGMMProposals", "Decoder", "PaperDGMMProposals",
           "SkipMLP", "VonMisesAngle", "von_mises_log_prob", "von_mises_sample"]


class Decoder(nn.Module):
    """``g_theta(alpha)``: the point of angle ``alpha`` on a learned closed curve of learned radius.

    ``alpha (...)`` -> ``(..., 2)``: ``radius * h / |h|`` with ``h = FC2(tanh(FC32([cos alpha, sin alpha])))``.
    """

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, hidden), Tanh(), nn.Linear(hidden, 2))
        self.log_radius = nn.Parameter(torch.zeros(()))

    @property
    def radius(self) -> torch.Tensor:
        """The learned radius (a scalar tensor)."""
        return self.log_radius.exp()

    @override
    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        h = self.net(torch.stack([alpha.cos(), alpha.sin()], -1))
        return h / h.norm(dim=-1, keepdim=True).clamp_min(1e-6) * self.radius


class CircleDecoder(nn.Module):
    """The true rings' decoder, ``g(alpha) = radius (cos alpha, sin alpha)`` (no learned parameters).

    With it, the zero-residual proposals of a fresh `DGMMProposals` are the
    exact Gibbs conditionals (a test oracle; also the reference log joint of evaluation).
    """

    def __init__(self, radius: float) -> None:
        super().__init__()
        self.r = float(radius)

    @property
    def radius(self) -> torch.Tensor:
        """The radius (a scalar tensor)."""
        return torch.tensor(self.r, dtype=torch.float64)

    @override
    def forward(self, alpha: torch.Tensor) -> torch.Tensor:
        return self.r * torch.stack([alpha.cos(), alpha.sin()], -1)


#: a decoder the model and the kernels accept
AnyDecoder = Union[Decoder, CircleDecoder]


class SkipMLP(nn.Module):
    """``FC_out(tanh(FC_hidden(f))) + FC_out'(f)``: an MLP plus a linear path (``(..., F) -> (..., out)``).

    The output layers start at zero, so the module starts as the zero function
    (a residual on whatever it is added to).
    """

    def __init__(self, in_features: int, out_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.hidden = nn.Linear(in_features, hidden)
        self.out = nn.Linear(hidden, out_features)
        self.skip = nn.Linear(in_features, out_features, bias=False)
        self.act = Tanh()
        self.zero_residual_()

    def zero_residual_(self) -> "SkipMLP":
        """Make the module the zero function again (its initial state), in place."""
        for layer in (self.out, self.skip):
            nn.init.zeros_(layer.weight)
        nn.init.zeros_(self.out.bias)
        return self

    @override
    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.hidden(f))) + self.skip(f)


def von_mises_sample(loc: torch.Tensor, concentration: torch.Tensor,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draws of ``VonMises(loc, concentration)`` in ``[-pi, pi)``, reproducible from ``generator``.

    torch's sampler (Best and Fisher's rejection algorithm) takes no generator:
    it runs on a forked default stream seeded from ``generator``, which leaves
    torch's global stream untouched.
    """
    with torch.no_grad():
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator,
                                 device=generator.device if generator is not None else "cpu"))
        devices = [loc.device] if loc.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            a = VonMises(loc, concentration, validate_args=False).sample()
        a = torch.remainder(a + math.pi, 2 * math.pi) - math.pi
        # the remainder may round up to 2 pi: keep the draws inside the prior's support [-pi, pi)
        return a.clamp(-math.pi, math.nextafter(math.pi, 0.0))


def von_mises_log_prob(value: torch.Tensor, loc: torch.Tensor, concentration: torch.Tensor) -> torch.Tensor:
    """``log VonMises(value; loc, concentration)``, differentiable in ``loc`` and ``concentration``.

    Written with ``i0e`` (``log I0(k) = log i0e(k) + k``), exact for any concentration.
    """
    return concentration * (torch.cos(value - loc) - 1) - math.log(2 * math.pi) - torch.special.i0e(
        concentration).log()


class VonMisesAngle:
    """A von Mises proposal over the angles ``(..., N)`` (`von_mises_sample`, `von_mises_log_prob`)."""

    def __init__(self, loc: torch.Tensor, concentration: torch.Tensor) -> None:
        self.loc, self.concentration = loc, concentration

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draws in ``[-pi, pi)`` (no gradient)."""
        return von_mises_sample(self.loc, self.concentration, generator)

    def log_prob(self, alpha: torch.Tensor) -> torch.Tensor:
        """``log q(alpha)``, elementwise."""
        return von_mises_log_prob(alpha, self.loc, self.concentration)


class BetaAngle:
    """``(alpha + pi) / 2 pi ~ Beta(a, b)``: the official code's angle proposal, over ``[-pi, pi)``."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.a, self.b = a, b

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draws in ``(-pi, pi)`` (no gradient), from two Gamma draws of ``generator``."""
        with torch.no_grad():
            ga = torch._standard_gamma(self.a.detach(), generator=generator)
            gb = torch._standard_gamma(self.b.detach(), generator=generator)
            u = (ga / (ga + gb)).clamp(1e-6, 1 - 1e-6)
            return (2 * u - 1) * math.pi

    def log_prob(self, alpha: torch.Tensor) -> torch.Tensor:
        """``log q(alpha)``, elementwise (the Beta density of ``u`` over the Jacobian ``2 pi``)."""
        u = ((alpha + math.pi) / (2 * math.pi)).clamp(1e-6, 1 - 1e-6)
        return torch.distributions.Beta(self.a, self.b, validate_args=False).log_prob(u) - math.log(2 * math.pi)


class _GroupedNormal(nn.Module):
    """Normal ``(..., I, D)`` in conjugate form from per-point ``(r_n, t_n)`` grouped by ``gamma (..., N, I)``."""

    def forward(self, r: torch.Tensor, t: torch.Tensor, gamma: torch.Tensor, p0: float,
                m0: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
        g = gamma.transpose(-1, -2)  # (..., I, N)
        prec = p0 + g @ r
        loc = (p0 * m0 + g @ (r * t)) / prec
        return loc, prec.rsqrt()


class DGMMProposals(nn.Module):
    """The learned proposals of the DGMM (see the module docstring).

    Args:
        cfg: the model's settings (prior, noise, number of clusters).
        conditional: build the kernel of ``{mu}`` (APG); the RWS baseline has the
            one-shot encoder and the local kernel only.
        hidden: hidden units of the MLPs (32 in the paper; half that for the per-pair score).
    """

    def __init__(self, cfg: DGMMConfig = PAPER, conditional: bool = True, hidden: int = 32) -> None:
        super().__init__()
        k = cfg.num_clusters
        self.cfg = cfg
        self.oneshot_body = nn.Sequential(nn.Linear(2, hidden), Tanh(), nn.Linear(hidden, hidden), Tanh())
        self.oneshot_head = nn.Linear(hidden, k + 4)  # assignment logits, log r (2), t (2)
        self.mu_stats = SkipMLP(8, 4, hidden) if conditional else None
        self.score = SkipMLP(3, 1, hidden // 2)  # per (point, cluster) pair: the iteration's largest layer
        self.angle = SkipMLP(3, 3, hidden)
        self._grouped = _GroupedNormal()

    # -- {mu} ----------------------------------------------------------------------------------
    def oneshot_params(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q(mu | x)``: ``x (*B, N, 2)`` -> ``loc, scale (*B, I, 2)``."""
        k = self.cfg.num_clusters
        h = self.oneshot_head(self.oneshot_body(x))
        gamma = torch.softmax(h[..., :k], -1)
        return self._grouped(h[..., k:k + 2].exp(), h[..., k + 2:], gamma, self.cfg.sigma0 ** -2)

    def mu_params(self, x: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor,
                  decoder: AnyDecoder) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q(mu | x, c, alpha)``: ``x (*B, N, 2)``, ``c, alpha (*B, L, N)`` -> ``loc, scale (*B, L, I, 2)``."""
        assert self.mu_stats is not None, "an RWS baseline has no kernel of {mu}"
        with torch.no_grad():
            g = decoder(alpha)
        xs = x.unsqueeze(-3).expand(g.shape)
        exact_t = xs - g
        f = torch.cat([xs, alpha.cos().unsqueeze(-1), alpha.sin().unsqueeze(-1), exact_t, g], -1)
        h = self.mu_stats(f)
        r = h[..., :2].exp() / self.cfg.likelihood_noise ** 2
        t = exact_t + h[..., 2:]
        gamma = nn.functional.one_hot(c, self.cfg.num_clusters).to(x.dtype)
        return self._grouped(r, t, gamma, self.cfg.sigma0 ** -2)

    # -- {c, alpha} ----------------------------------------------------------------------------
    def _circle(self, d: torch.Tensor, radius: torch.Tensor):
        """``|d|``, the exact concentration ``r |d| / s^2`` and the unit direction of ``d (..., 2)``."""
        norm = d.norm(dim=-1).clamp_min(1e-6)
        kappa = radius * norm / self.cfg.likelihood_noise ** 2
        return norm, kappa, d / norm.unsqueeze(-1)

    def assignment_logits(self, x: torch.Tensor, mu: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """``q(c | x, mu)``: ``x (*B, N, 2)``, ``mu (*B, L, I, 2)`` -> normalised logits ``(*B, L, N, I)``."""
        d = x.unsqueeze(-3).unsqueeze(-2) - mu.unsqueeze(-3)  # (*B, L, N, I, 2)
        norm, kappa, _ = self._circle(d, radius)
        s2 = self.cfg.likelihood_noise ** 2
        exact = -(norm * norm + radius * radius) / (2 * s2) + torch.special.i0e(kappa).log() + kappa
        f = torch.stack([norm / radius, (norm - radius) / self.cfg.likelihood_noise, kappa.log()], -1)
        return torch.log_softmax(exact + self.score(f).squeeze(-1), -1)

    def angle_params(self, x: torch.Tensor, centre: torch.Tensor,
                     radius: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q(alpha | x, mu, c)``.

        ``x (*B, N, 2)``, ``centre = mu_{c_n} (*B, L, N, 2)`` -> von Mises ``loc, concentration (*B, L, N)``.
        """
        d = x.unsqueeze(-3) - centre
        norm, kappa, unit = self._circle(d, radius)
        h = self.angle(torch.cat([unit, ((norm - radius) / self.cfg.likelihood_noise).unsqueeze(-1)], -1))
        u = unit + h[..., :2]
        return torch.atan2(u[..., 1], u[..., 0]), kappa * h[..., 2].exp()

    def angle_dist(self, x: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> VonMisesAngle:
        """``q(alpha | x, mu, c)`` as a distribution over ``(*B, L, N)`` (see `angle_params`)."""
        return VonMisesAngle(*self.angle_params(x, centre, radius))


def _mlp(inp: int, hidden: int, out: int, act: type = nn.Tanh) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), act(), nn.Linear(hidden, out))


class _PaperMuEncoder(nn.Module):
    """Appendix E's ``q(mu | ...)``: per-point features ``f (..., N, F)`` -> Normal ``loc, scale (..., I, 2)``.

    ``lstm``: the LSTM-RWS encoder instead: an LSTM reads the points in order and a head maps its last hidden
    state to every cluster's mean and log standard deviation (not permutation invariant).
    """

    def __init__(self, cfg: DGMMConfig, in_features: int, hidden: int, stats: int, lstm: bool = False) -> None:
        super().__init__()
        self.k, self.is_lstm = cfg.num_clusters, lstm
        if lstm:
            self.lstm = nn.LSTM(in_features, hidden, batch_first=True)
            self.head = _mlp(hidden, hidden, 4 * self.k)
            return
        self.values = _mlp(in_features, hidden, stats)
        self.gamma = _mlp(in_features, hidden, self.k)
        self.loc = _mlp(stats + 4, hidden, 2)
        self.log_scale = _mlp(stats + 4, hidden, 2)
        self.prior: torch.Tensor
        self.register_buffer("prior", torch.tensor([0.0, 0.0, cfg.sigma0, cfg.sigma0]), persistent=False)

    @override
    def forward(self, f: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.is_lstm:
            _, (h, _) = self.lstm(f.reshape((-1,) + f.shape[-2:]))
            out = self.head(h[-1]).reshape(f.shape[:-2] + (self.k, 4))
            return out[..., :2], out[..., 2:].exp()
        gamma = torch.softmax(self.gamma(f), -1).transpose(-1, -2)  # (..., I, N)
        stats = (gamma @ self.values(f)) / (gamma.sum(-1, keepdim=True) + 1e-8)
        inp = torch.cat([stats, self.prior.to(stats).expand(stats.shape[:-1] + (4,))], -1)
        return self.loc(inp), self.log_scale(inp).exp()


class PaperDGMMProposals(nn.Module):
    """Appendix E's proposals of the DGMM, as the official code builds them (see the module docstring).

    Args:
        cfg: the model's settings.
        conditional: build the kernel of ``{mu}`` (APG); ``False``: one-shot only (RWS).
        encoder: the one-shot's statistic, ``"nss"`` (neural sufficient statistics) or ``"lstm"`` (LSTM-RWS).
        hidden: hidden units (32 in the paper); ``stats``: the statistic's size (16).
    """

    def __init__(self, cfg: DGMMConfig = PAPER, conditional: bool = True, encoder: str = "nss", hidden: int = 32,
                 stats: int = 16) -> None:
        super().__init__()
        if encoder not in ("nss", "lstm"):
            raise ValueError(f"encoder must be 'nss' or 'lstm', got {encoder!r}")
        self.cfg, self.encoder = cfg, encoder
        self.oneshot = _PaperMuEncoder(cfg, 2, hidden, stats, lstm=encoder == "lstm")
        self.mu_stats = _PaperMuEncoder(cfg, 2 + cfg.num_clusters, hidden, stats) if conditional else None
        self.score = _mlp(2, hidden, 1, nn.ReLU)
        self.angle_a = _mlp(2, hidden, 1)
        self.angle_b = _mlp(2, hidden, 1)

    def oneshot_params(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q(mu | x)``: ``x (*B, N, 2)`` -> ``loc, scale (*B, I, 2)``."""
        return self.oneshot(x)

    def mu_params(self, x: torch.Tensor, c: torch.Tensor, alpha: torch.Tensor,
                  decoder: AnyDecoder) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q(mu | x, c)``: ``x (*B, N, 2)``, ``c (*B, L, N)`` -> ``loc, scale (*B, L, I, 2)`` (reads no angle)."""
        assert self.mu_stats is not None, "an RWS baseline has no kernel of {mu}"
        onehot = nn.functional.one_hot(c, self.cfg.num_clusters).to(x.dtype)
        return self.mu_stats(torch.cat([x.unsqueeze(-3).expand(onehot.shape[:-1] + (2,)), onehot], -1))

    def assignment_logits(self, x: torch.Tensor, mu: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        """``q(c | x, mu)``: ``x (*B, N, 2)``, ``mu (*B, L, I, 2)`` -> normalised logits ``(*B, L, N, I)``."""
        d = x.unsqueeze(-3).unsqueeze(-2) - mu.unsqueeze(-3)  # (*B, L, N, I, 2)
        return torch.log_softmax(self.score(d).squeeze(-1), -1)

    def angle_dist(self, x: torch.Tensor, centre: torch.Tensor, radius: torch.Tensor) -> BetaAngle:
        """``q(alpha | x, mu, c)``: ``x (*B, N, 2)``, ``centre (*B, L, N, 2)`` -> a `BetaAngle` over ``(*B, L, N)``."""
        d = x.unsqueeze(-3) - centre
        return BetaAngle(self.angle_a(d).squeeze(-1).exp(), self.angle_b(d).squeeze(-1).exp())


#: proposals the DGMM's sampler accepts
AnyProposals = Union[DGMMProposals, PaperDGMMProposals]

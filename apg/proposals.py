"""Exponential-family proposals from prior parameters plus neural sufficient statistics (section 3).

A conjugate Gibbs update adds the data's sufficient statistics to the prior's
parameters.  The learned proposals keep that form and replace the statistics by
a network applied to each element of a plate and *summed* over it, so the
proposal sharpens with the amount of data as the exact conditional does::

    q(z_b | x, z_-b) = p(z_b | lambda + sum_n T_phi(x_n, z_-b,n))          (eq. 10)

* `NormalGamma`: the distribution (independent per element) with
  ``sample`` and ``log_prob``; `normal_gamma_update` is the conjugate
  update of a Normal-Gamma prior by (possibly soft, possibly learned)
  statistics ``(s0, s1, s2)``.
* `NeuralNormalGamma`: per point, a soft assignment ``gamma_n =
  softmax(FC(f_n))`` over the ``I`` components and a feature ``t_n = FC(f_n)``;
  statistics ``s0 = sum_n gamma_n``, ``s1 = sum_n gamma_n t_n``, ``s2 = sum_n
  gamma_n t_n^2`` (appendix E, GMM).
* `NeuralNormal`: a Normal whose precision and precision-weighted mean
  are the prior's plus per-point contributions summed over the plate.
* `NeuralCategorical`: logits = prior logits + an MLP score per
  (element, option) (appendix E, ``q(c | x, mu, tau)``).

Shapes: ``...`` are any leading dims (batch, particles); ``N`` the plate; ``I``
components; ``D`` dims; ``F`` input features.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.distributions import Normal

__all__ = [
    "NeuralCategorical",
    "NeuralNormal",
    "NeuralNormalGamma",
    "NormalGamma",
    "NormalGammaParams",
    "kl_categorical",
    "kl_normal_gamma",
    "normal_gamma_update",
]


class NormalGammaParams(NamedTuple):
    """Parameters of independent Normal-Gamma distributions, each ``(..., I, D)``.

    ``tau ~ Gamma(alpha, rate=beta)``, ``mu | tau ~ Normal(mu, 1 / (nu tau))``.
    """

    mu: torch.Tensor
    nu: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor


class NormalGamma:
    """Independent Normal-Gamma distributions; densities summed over the last two dims ``(I, D)``.

    Args:
        params: `NormalGammaParams`, each ``(..., I, D)``.
    """

    def __init__(self, params: NormalGammaParams) -> None:
        self.params = params

    def sample(self, sample_shape: Sequence[int] = (),
               generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mu, tau)``, each ``(*sample_shape, ..., I, D)`` (not differentiable: the gradient is score-based).

        The same draws as ``Gamma(alpha, beta).sample()`` then ``Normal(mu, 1/sqrt(nu tau)).sample()``
        from ``generator`` (torch's default if ``None``).
        """
        p = self.params
        with torch.no_grad():
            shape = torch.Size(sample_shape) + torch.broadcast_shapes(p.alpha.shape, p.beta.shape)
            tau = torch._standard_gamma(p.alpha.expand(shape), generator=generator) / p.beta.expand(shape)
            tau.clamp_(min=torch.finfo(tau.dtype).tiny)
            loc, scale = torch.broadcast_tensors(p.mu, (p.nu * tau).rsqrt())
            mu = torch.normal(loc, scale, generator=generator)
        return mu, tau

    def log_prob(self, mu: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``log NG(mu, tau)`` summed over ``(I, D)``: ``(...)``."""
        p = self.params
        # Gamma(alpha, beta) and Normal(mu, 1/(nu tau)) log-densities written out (one fused expression)
        log_tau = tau.log()
        lg = p.alpha * p.beta.log() - torch.lgamma(p.alpha) + (p.alpha - 1) * log_tau - p.beta * tau
        prec = p.nu * tau
        ln = 0.5 * (prec.log() - math.log(2 * math.pi)) - 0.5 * prec * (mu - p.mu) ** 2
        return (lg + ln).sum((-2, -1))


def normal_gamma_update(prior: NormalGammaParams, s0: torch.Tensor, s1: torch.Tensor,
                        s2: torch.Tensor) -> NormalGammaParams:
    """Conjugate update of a Normal-Gamma prior by statistics ``(sum w, sum w t, sum w t^2)``, each ``(..., I, D)``.

    With ``w = 1[c_n = i]`` and ``t = x_n`` this is the exact posterior; ``w`` may
    be soft and ``t`` learned.  ``beta`` uses the identity
    ``s2 + nu0 mu0^2 - nu mu^2 = sum w (t - tbar)^2 + nu0 s0 (tbar - mu0)^2 / nu``,
    whose right side is non-negative for any soft statistics.
    """
    nu = prior.nu + s0
    mu = (prior.nu * prior.mu + s1) / nu
    alpha = prior.alpha + 0.5 * s0
    # non-negative form: s2 - s1^2/s0 >= 0 (Cauchy-Schwarz) and the shrinkage term >= 0
    safe = s0.clamp_min(1e-12)
    spread = (s2 - s1 * s1 / safe).clamp_min(0.0)
    shrink = prior.nu * s0 / nu * (s1 / safe - prior.mu) ** 2
    beta = prior.beta + 0.5 * (spread + shrink)
    return NormalGammaParams(mu, nu, alpha, beta)


def kl_normal_gamma(p: NormalGammaParams, q: NormalGammaParams) -> torch.Tensor:
    """``KL(NG_p || NG_q)`` summed over ``(I, D)``: ``(...)``.

    ``KL = KL(Gamma_p || Gamma_q) + E_{tau ~ Gamma_p} KL(N(mu_p, 1/(nu_p tau)) || N(mu_q, 1/(nu_q tau)))``.
    """
    a1, b1, a2, b2 = p.alpha, p.beta, q.alpha, q.beta
    kl_gamma = ((a1 - a2) * torch.digamma(a1) - torch.lgamma(a1) + torch.lgamma(a2)
                + a2 * (b1.log() - b2.log()) + a1 * (b2 - b1) / b1)
    ratio = q.nu / p.nu
    kl_normal = 0.5 * (ratio - 1 - ratio.log() + q.nu * (a1 / b1) * (p.mu - q.mu) ** 2)
    return (kl_gamma + kl_normal).sum((-2, -1))


def kl_categorical(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """``KL(Cat_p || Cat_q)`` over the last dim: ``(...)``.  Zero-probability options of p contribute 0."""
    lp = torch.log_softmax(p_logits, -1)
    lq = torch.log_softmax(q_logits, -1)
    terms = lp.exp() * (lp - lq)
    return torch.where(lp.exp() > 0, terms, torch.zeros_like(terms)).sum(-1)


class NeuralNormalGamma(nn.Module):
    """Normal-Gamma proposal parameters from a prior and neural sufficient statistics (appendix E).

    Per element ``n`` of the plate: ``gamma_n = softmax(FC_I(f_n))`` (a soft
    assignment to the ``I`` components) and ``t_n = FC_D(f_n)``; the statistics
    ``(sum gamma, sum gamma t, sum gamma t^2)`` feed `normal_gamma_update`.
    With ``gamma_n`` the one-hot assignment and ``t_n = x_n`` this is the exact
    conditional of the GMM, so the family contains the target.

    Args:
        in_features: F, features per element (e.g. ``x_n`` or ``[x_n, onehot(c_n)]``).
        num_components: I.
        dim: D.
    """

    def __init__(self, in_features: int, num_components: int, dim: int) -> None:
        super().__init__()
        self.assign = nn.Linear(in_features, num_components)
        self.feature = nn.Linear(in_features, dim)

    def statistics(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``features (..., N, F)`` -> ``(s0, s1, s2)``, each ``(..., I, D)``."""
        gamma = torch.softmax(self.assign(features), -1)  # (..., N, I)
        t = self.feature(features)  # (..., N, D)
        g = gamma.transpose(-1, -2)  # (..., I, N)
        s1 = g @ t
        s2 = g @ (t * t)
        s0 = gamma.sum(-2).unsqueeze(-1).expand_as(s1)
        return s0, s1, s2

    def forward(self, features: torch.Tensor, prior: NormalGammaParams) -> NormalGammaParams:
        """``features (..., N, F)``, prior ``(I, D)`` -> proposal parameters ``(..., I, D)``."""
        return normal_gamma_update(prior, *self.statistics(features))


class NeuralNormal(nn.Module):
    """A Normal proposal ``N(m, 1/p)`` from a Normal prior plus per-element statistics summed over the plate.

    Per element: a precision contribution ``r_n = softplus(FC(f_n)) >= 0`` and a
    target ``t_n = FC(f_n)``; then ``p = p0 + sum_n r_n`` and
    ``m = (p0 m0 + sum_n r_n t_n) / p`` (the known-variance conjugate update).

    Args:
        in_features: F.
        out_features: size of the latent (its last dim).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.precision = nn.Linear(in_features, out_features)
        self.target = nn.Linear(in_features, out_features)

    def forward(self, features: torch.Tensor, prior_loc: torch.Tensor, prior_scale: torch.Tensor) -> Normal:
        """``features (..., N, F)`` -> ``Normal`` with batch shape ``(..., out_features)``."""
        r = nn.functional.softplus(self.precision(features))
        t = self.target(features)
        p0 = prior_scale.pow(-2)
        prec = p0 + r.sum(-2)
        loc = (p0 * prior_loc + (r * t).sum(-2)) / prec
        return Normal(loc, prec.rsqrt())


class Tanh(nn.Module):
    """``tanh(x) = 2 sigmoid(2x) - 1``: the same function, several times faster than ``torch.tanh`` on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.sigmoid(2 * x) - 1


class NeuralCategorical(nn.Module):
    """Categorical logits = prior logits + an MLP score per (element, option) (appendix E).

    ``o_{n,i} = FC_1(tanh(FC_H(f_{n,i})))``; ``q(c_n = i) = softmax_i(log pi_i + o_{n,i})``.

    Args:
        in_features: F, features of one (element, option) pair, e.g. ``[x_n, mu_i, tau_i]``.
        hidden: H (32 in the paper).
    """

    def __init__(self, in_features: int, hidden: int = 32) -> None:
        super().__init__()
        self.score = nn.Sequential(nn.Linear(in_features, hidden), Tanh(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
        """``features (..., N, I, F)``, ``prior_logits (I,)`` -> normalised logits ``(..., N, I)``."""
        return torch.log_softmax(prior_logits + self.score(features).squeeze(-1), -1)

    def forward_pairs(self, element: torch.Tensor, option: torch.Tensor, prior_logits: torch.Tensor) -> torch.Tensor:
        """The same function with the features of pair ``(n, i)`` the concatenation ``[element_n, option_i]``.

        ``element (..., N, Fe)``, ``option (..., I, Fo)`` (``Fe + Fo = F``; leading
        dims broadcast) -> normalised logits ``(..., N, I)``.  The first layer is
        applied to each part once (``N + I`` rows instead of ``N * I``).
        """
        first, last = self.score[0], self.score[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        fe = element.shape[-1]
        a = nn.functional.linear(element, first.weight[:, :fe], first.bias)  # (..., N, H)
        b = nn.functional.linear(option, first.weight[:, fe:])  # (..., I, H)
        lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        o = _PairTanhScore.apply(a.expand(lead + a.shape[-2:]), b.expand(lead + b.shape[-2:]), last.weight[0])
        return torch.log_softmax(prior_logits + o + last.bias, -1)


class _PairTanhScore(torch.autograd.Function):
    """``o[..., n, i] = sum_h w_h tanh(a[..., n, h] + b[..., i, h])`` with a hand-written backward.

    The ``(..., N, I, H)`` hidden layer is the one large tensor of an APG
    iteration; computing it in place and differentiating it by hand keeps the
    number of passes over it (and of allocations) to a few, instead of the
    dozen autograd makes through ``tanh``, broadcasting and a matrix product.
    """

    @staticmethod
    def forward(ctx, a, b, w):
        h = a.unsqueeze(-2) + b.unsqueeze(-3)
        h.mul_(2).sigmoid_().mul_(2).sub_(1)  # tanh, in place (sigmoid is much faster than tanh on CPU)
        ctx.save_for_backward(h, w)
        return h @ w

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.saved_tensors
        g = grad.unsqueeze(-1) * w  # d o / d h
        dw = (h.reshape(-1, h.shape[-1]).t() @ grad.reshape(-1)) if ctx.needs_input_grad[2] else None
        g.mul_(1 - h * h)  # through tanh
        da = g.sum(-2) if ctx.needs_input_grad[0] else None
        db = g.sum(-3) if ctx.needs_input_grad[1] else None
        return da, db, dw

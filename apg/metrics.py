"""Metrics of weighted particles: ESS (eq. 11 of Wu et al., ICML 2020), log-mean-exp, weighted means."""

from __future__ import annotations

import math

import torch

__all__ = ["ess_fraction", "log_mean_exp", "weighted_mean"]


def ess_fraction(log_weights: torch.Tensor) -> torch.Tensor:
    """ESS / L = (sum w)^2 / (L sum w^2) from log-weights ``(*batch, L)``: ``(*batch,)``.

    Example:
        >>> import torch
        >>> ess_fraction(torch.zeros(2, 5))
        tensor([1., 1.])
        >>> ess_fraction(torch.full((1, 10), -4321.5))  # exact for equal weights of any magnitude
        tensor([1.])
    """
    L = log_weights.shape[-1]
    # shifted by the max first: with log-weights of magnitude 1e3-1e4 (a DGMM's), float32 cancellation
    # in 2 lse(w) - lse(2w) would otherwise leave errors of 1e-3 (ESS/L of equal weights 1.0005)
    m = log_weights.detach().amax(-1, keepdim=True)
    w = log_weights - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(2 * torch.logsumexp(w, -1) - torch.logsumexp(2 * w, -1) - math.log(L))


def log_mean_exp(log_weights: torch.Tensor) -> torch.Tensor:
    """``log mean_l exp(log_weights)`` over the last dim: ``(*batch, L) -> (*batch,)``."""
    return torch.logsumexp(log_weights, -1) - math.log(log_weights.shape[-1])


def weighted_mean(log_weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Self-normalised average ``sum_l softmax(log_weights)_l values_l``: ``(*batch, L) -> (*batch,)``."""
    return (torch.softmax(log_weights, -1) * values).sum(-1)

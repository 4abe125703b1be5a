"""Resampling from log-weights: ancestor indices, batched over leading dims.

Used by `tmcgraph.smc` and re-exported as `apg.resampling`.

``resample(log_w, scheme)`` takes log-weights ``(*batch, L)`` (any real
numbers, ``-inf`` for zero weight; only their differences matter) and returns
ancestor indices ``(*batch, L)`` (int64) such that ``P(a = l) = w_l / sum w``
for every draw (multinomial), or with the low-variance systematic scheme.
Use `gather` to apply ancestors to particle tensors.  Randomness comes
from ``generator`` (torch's default generator when ``None``).

Example:
    >>> import torch
    >>> from tmcgraph.resampling import gather, resample
    >>> log_w = torch.tensor([[0.0, -float("inf"), -float("inf")]])  # all weight on particle 0
    >>> resample(log_w, "systematic", generator=torch.Generator().manual_seed(0))
    tensor([[0, 0, 0]])
    >>> gather(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2, 2, 0]]))
    tensor([[3., 3., 1.]])
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

from .errors import TMCError

__all__ = ["SCHEMES", "gather", "multinomial", "resample", "systematic"]


def _normalised(log_w: torch.Tensor) -> torch.Tensor:
    if log_w.dim() < 1 or log_w.shape[-1] < 1:
        raise TMCError(f"log-weights must have shape (*batch, L) with L >= 1, got {tuple(log_w.shape)}")
    if not log_w.is_floating_point():
        raise TMCError(f"log-weights must be floating point, got {log_w.dtype}")
    if torch.compiler.is_compiling():  # value checks sync with the host: the eager path makes them
        return torch.softmax(log_w.detach().double(), dim=-1)
    if bool(torch.isnan(log_w).any()):
        raise TMCError("log-weights contain NaN")
    if bool((log_w == float("inf")).any()):
        raise TMCError("log-weights contain +inf")
    if bool(torch.isneginf(log_w).all(-1).any()):
        raise TMCError("every particle has zero weight (all log-weights -inf) in some batch element")
    return torch.softmax(log_w.detach().double(), dim=-1)


def multinomial(log_w: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """L independent draws from the categorical of normalised weights, per batch element."""
    w = _normalised(log_w)
    L = w.shape[-1]
    return torch.multinomial(w.reshape(-1, L), L, replacement=True, generator=generator).reshape(w.shape)


def systematic(log_w: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Systematic resampling: one uniform offset u, points (u + l) / L through the weight CDF."""
    w = _normalised(log_w)
    L = w.shape[-1]
    flat = w.reshape(-1, L)
    u = (torch.rand(flat.shape[0], 1, dtype=flat.dtype, device=flat.device, generator=generator)
         + torch.arange(L, dtype=flat.dtype, device=flat.device)) / L
    cdf = torch.cumsum(flat, dim=-1)
    cdf[:, -1] = 1.0  # guard against round-off leaving the last bin short
    return torch.searchsorted(cdf, u, right=True).clamp_max(L - 1).reshape(w.shape)


SCHEMES: Dict[str, Callable[[torch.Tensor, Optional[torch.Generator]], torch.Tensor]] = {
    "multinomial": multinomial,
    "systematic": systematic,
}


def resample(log_w: torch.Tensor, scheme: str = "systematic", *,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Ancestor indices ``(*batch, L)`` from log-weights ``(*batch, L)``.

    Args:
        log_w: ``(*batch, L)`` log-weights.
        scheme: ``"multinomial"`` or ``"systematic"``.
        generator: the source of randomness (torch's default generator if ``None``).

    Raises:
        TMCError: an unknown scheme (the valid names are listed), or
            log-weights with NaN / +inf, or all ``-inf`` in a batch element.
    """
    if scheme not in SCHEMES:
        raise TMCError(f"unknown resampling scheme {scheme!r}; valid: {sorted(SCHEMES)}")
    return SCHEMES[scheme](log_w, generator)


def gather(values: torch.Tensor, ancestors: torch.Tensor) -> torch.Tensor:
    """Select particles: ``values (*batch, L, *rest)`` -> ``(*batch, L, *rest)`` at ``ancestors (*batch, L)``."""
    nb = ancestors.dim()
    if tuple(values.shape[:nb]) != tuple(ancestors.shape):
        raise TMCError(
            f"values have leading shape {tuple(values.shape[:nb])}, expected (*batch, L) = {tuple(ancestors.shape)}"
        )
    idx = ancestors.reshape(tuple(ancestors.shape) + (1,) * (values.dim() - nb)).expand_as(values)
    return torch.gather(values, nb - 1, idx)

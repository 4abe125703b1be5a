"""Surrogate losses of the APG objectives (Wu et al., ICML 2020, eqs. 5 and 6), from a run's steps.

* `phi_loss` (eq. 5): ``-sum_steps mean_batch sum_l wbar_l log q_phi(z_b^l | x, z_-b^l)``.
  Its gradient is minus the self-normalised estimate of the inclusive-KL
  gradient for the proposal parameters phi, summed over the one-shot step, the
  blocks and the sweeps.  A block local to a plate weighs each element by its
  own self-normalised incremental weight.
* `theta_loss` (eq. 6): ``-sum_steps mean_batch sum_l wbar_l log p_theta(x, z^l)``.
  Its gradient is minus the estimate of ``grad_theta log p_theta(x)``
  (needs ``learn_model=True`` in `apg.sampler.run`).

The weights ``wbar`` are the steps' incremental weights, detached.  Example::

    result = run(sampler, x, L, K, objective=True, learn_model=True, generator=g)
    loss = phi_loss(result.sweeps) + theta_loss(result.sweeps)
    loss.backward()   # phi and theta each get their own gradient
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch

from .errors import APGError
from .sampler import SweepInfo

__all__ = ["phi_loss", "theta_loss", "weighted_sum"]


def weighted_sum(log_weights: torch.Tensor, terms: torch.Tensor, particle_dim: int) -> torch.Tensor:
    """``sum_l softmax_l(log_weights) * terms``, summed over every non-batch dim, averaged over the batch.

    Args:
        log_weights: ``(*batch, L, *local)`` (detached inside).
        terms: the same shape.
        particle_dim: the (negative) position of L.
    """
    w = torch.softmax(log_weights.detach(), particle_dim)
    nb = terms.dim() + particle_dim  # number of batch dims
    total = (w * terms).sum(tuple(range(nb, terms.dim())))
    return total.mean() if total.dim() else total


def phi_loss(sweeps: Iterable[SweepInfo]) -> torch.Tensor:
    """Eq. 5's surrogate over every recorded step (a scalar)."""
    loss: Optional[torch.Tensor] = None
    for info in sweeps:
        for step in info.steps:
            term = -weighted_sum(step.log_v, step.log_q, -1 - step.local_dims)
            loss = term if loss is None else loss + term
    if loss is None:
        raise APGError("no step was recorded for the objective; run the sampler with objective=True")
    return loss


def theta_loss(sweeps: Iterable[SweepInfo]) -> torch.Tensor:
    """Eq. 6's surrogate over every recorded step (a scalar)."""
    loss: Optional[torch.Tensor] = None
    for info in sweeps:
        for step in info.steps:
            if step.log_joint is None:
                continue
            dims = tuple(range(step.log_v.dim() - step.local_dims, step.log_v.dim()))
            log_v = step.log_v.sum(dims) if dims else step.log_v
            term = -weighted_sum(log_v, step.log_joint, -1)
            loss = term if loss is None else loss + term
    if loss is None:
        raise APGError("no log joint was recorded for the objective; run with objective=True, learn_model=True")
    return loss

"""The APG sampler as a functional core (Algorithms 1-3 of the APG paper).

State is a dict of particle tensors ``(*batch, L, ...)``; log-weights are
``(*batch, L)``.  A sampler is an initial one-shot proposal plus an ordered list
of :class:`Block` kernels.  One sweep visits every block: resample (weights
become their average, Algorithm 2), propose the block's new value from its
kernel given the rest, and multiply the weight by the incremental weight of
eq. 9, in which the same kernel evaluated at the old value is the reverse
kernel::

    v = p(x, z_b', z_-b) q(z_b | x, z_-b) / (p(x, z_b, z_-b) q(z_b' | x, z_-b))

Only the factors of the joint that touch the block (its Markov blanket) are
needed: the others cancel in v.

``log mean_l w_l`` after any step is the sampler's running estimate of
``log p(x)`` (the product of average weights of the SMC sampler).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Tuple

import torch

from .resampling import gather, resample

State = Dict[str, torch.Tensor]


@dataclass(frozen=True)
class Block:
    """One block of latent variables and its kernel.

    Attributes:
        name: block name (metrics are reported per block).
        variables: the state keys the block updates.
        propose: ``(x, state) -> (new values, log q(new))``: draw the block
            given the rest of ``state``; ``log q`` is ``(*batch, L)``.
        log_q: ``(x, state, values) -> (*batch, L)``: the kernel's density of
            ``values`` given the rest of ``state`` (the reverse kernel).
        log_blanket: ``(x, state) -> (*batch, L)``: the terms of
            ``log p(x, z)`` that involve the block (any superset is correct).
    """

    name: str
    variables: Tuple[str, ...]
    propose: Callable[[torch.Tensor, State], Tuple[State, torch.Tensor]]
    log_q: Callable[[torch.Tensor, State, State], torch.Tensor]
    log_blanket: Callable[[torch.Tensor, State], torch.Tensor]


@dataclass
class SweepInfo:
    """What one sweep reports.

    Attributes:
        log_evidence: ``(*batch,)`` running estimate of ``log p(x)`` after the sweep.
        ess: block name -> ``(*batch,)`` ESS / L of the weights right after the block's update (eq. 11).
        log_v: block name -> ``(*batch, L)`` incremental log-weights of the block.
    """

    log_evidence: torch.Tensor
    ess: Dict[str, torch.Tensor] = field(default_factory=dict)
    log_v: Dict[str, torch.Tensor] = field(default_factory=dict)


def ess_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """ESS / L = (sum w)^2 / (L sum w^2) from log-weights ``(*batch, L)``: ``(*batch,)``."""
    L = log_w.shape[-1]
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1) - math.log(L))


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])


def block_update(x: torch.Tensor, state: State, log_w: torch.Tensor, block: Block,
                 scheme: str = "systematic") -> Tuple[State, torch.Tensor, torch.Tensor]:
    """Resample, propose one block, reweigh (eq. 9).

    Returns:
        the new state, the new log-weights ``(*batch, L)`` and the incremental
        log-weights ``log v``.
    """
    anc = resample(log_w, scheme)
    state = {k: gather(v, anc) for k, v in state.items()}
    log_w = log_mean_exp(log_w).unsqueeze(-1).expand_as(log_w)
    old = {k: state[k] for k in block.variables}
    lp_old = block.log_blanket(x, state)
    new, lq_new = block.propose(x, state)
    missing = [k for k in block.variables if k not in new]
    if missing:
        raise ValueError(f"block {block.name!r}: propose returned no value for {missing}")
    lq_old = block.log_q(x, state, old)
    state = {**state, **{k: new[k] for k in block.variables}}
    lp_new = block.log_blanket(x, state)
    log_v = lp_new + lq_old - lp_old - lq_new
    return state, log_w + log_v, log_v


def sweep(x: torch.Tensor, state: State, log_w: torch.Tensor, blocks: List[Block],
          scheme: str = "systematic") -> Tuple[State, torch.Tensor, SweepInfo]:
    """One Gibbs sweep over ``blocks`` (Algorithm 3, lines 8-17)."""
    info = SweepInfo(log_evidence=log_mean_exp(log_w))
    for block in blocks:
        state, log_w, log_v = block_update(x, state, log_w, block, scheme)
        info.ess[block.name] = ess_fraction(log_w)
        info.log_v[block.name] = log_v
    info.log_evidence = log_mean_exp(log_w)
    return state, log_w, info


def run(x: torch.Tensor, init: Callable[[torch.Tensor], Tuple[State, torch.Tensor]], blocks: List[Block],
        num_sweeps: int, scheme: str = "systematic") -> Tuple[State, torch.Tensor, List[SweepInfo]]:
    """The whole sampler: a one-shot proposal, then ``num_sweeps - 1`` sweeps.

    Args:
        x: data ``(*batch, ...)``.
        init: ``x -> (state, log w)``: the one-shot proposal and its importance
            log-weights ``log p(x, z) - log q(z | x)``, ``(*batch, L)``.
        blocks: the block kernels, in sweep order.
        num_sweeps: K of the paper (K = 1 is the one-shot proposal alone).

    Returns:
        final state, final log-weights, and one :class:`SweepInfo` per sweep
        (the first describes the one-shot proposal).
    """
    if num_sweeps < 1:
        raise ValueError(f"num_sweeps must be >= 1, got {num_sweeps}")
    state, log_w = init(x)
    infos = [SweepInfo(log_evidence=log_mean_exp(log_w), ess={"init": ess_fraction(log_w)})]
    for _ in range(num_sweeps - 1):
        state, log_w, info = sweep(x, state, log_w, blocks, scheme)
        infos.append(info)
    return state, log_w, infos


def check_state(state: Mapping[str, torch.Tensor], batch_ndim: int, num_particles: int) -> None:
    """Every state tensor must be ``(*batch, L, ...)`` with the same batch shape."""
    shapes = {k: tuple(v.shape[: batch_ndim + 1]) for k, v in state.items()}
    if len(set(shapes.values())) > 1 or any(s[-1] != num_particles for s in shapes.values()):
        raise ValueError(f"state tensors must share the leading shape (*batch, L={num_particles}); got {shapes}")

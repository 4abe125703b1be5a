"""The APG sampler as a functional core (Algorithms 1-3 of the APG paper).

State is a dict of particle tensors ``(*batch, L, ...)``; log-weights are
``(*batch, L)``.  A :class:`Sampler` is a one-shot proposal ``q(z | x)``, an
ordered list of :class:`Block` kernels ``q(z_b | x, z_-b)`` and the log joint.
:func:`run` is Algorithm 3: the one-shot proposal and its importance weights,
then ``K - 1`` sweeps; each block update resamples (the weights become their
average, Algorithm 2), proposes the block from its kernel given the rest, and
multiplies the weight by the incremental weight of eq. 9, in which the same
kernel evaluated at the old value is the reverse kernel::

    v = p(x, z_b', z_-b) q(z_b | x, z_-b) / (p(x, z_b, z_-b) q(z_b' | x, z_-b))

Only the factors of the joint that touch the block (its Markov blanket) enter
``v``: the others cancel.  A block local to a plate (the GMM assignments, whose
elements are conditionally independent given the rest) returns its kernel and
blanket log-densities per element, ``(*batch, L, *local)``: resampling uses
their sum, while the gradient of eq. 5 weighs each element by its own
self-normalised incremental weight (the paper's local-variable treatment).

``log mean_l w_l`` after any step is the sampler's running estimate of
``log p(x)`` (the product of average weights of the SMC sampler).

With ``objective=True`` :func:`run` also returns the surrogate losses of eqs. 5
and 6 (weights detached):

* ``loss_phi = -sum_steps mean_batch sum_l wbar_l log q_phi(z_b^l | x, z_-b^l)``,
  whose gradient is minus the self-normalised inclusive-KL gradient estimate for
  the proposal parameters, summed over the one-shot step, blocks and sweeps;
* ``loss_theta = -sum_steps mean_batch sum_l wbar_l log p_theta(x, z^l)``, whose
  gradient is minus the estimate of the log-marginal gradient (eq. 6) for
  model parameters (computed only with ``learn_model=True``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .resampling import gather, resample

State = Dict[str, torch.Tensor]

__all__ = ["Block", "Kernel", "Result", "Sampler", "SweepInfo", "ess_fraction", "joint_block", "log_mean_exp",
           "run"]


class Kernel(Protocol):
    """A proposal for one block, already conditioned on ``x`` and the rest of the state."""

    def sample(self) -> State:
        """New values of the block's variables, ``(*batch, L, ...)`` each (no gradient)."""

    def log_prob(self, values: State) -> torch.Tensor:
        """``log q(values | x, z_-b)``: ``(*batch, L, *local)``, differentiable in the proposal's parameters."""


@dataclass(frozen=True)
class Block:
    """One block of latent variables and its learned (or exact) Gibbs kernel.

    Attributes:
        name: block name (metrics are reported per block).
        variables: the state keys the block updates.
        kernel: ``(x, state) -> Kernel``: ``q(z_b | x, z_-b)`` given the rest of
            ``state`` (the block's own current value is ignored).
        log_blanket: ``(x, state) -> (*batch, L, *local)``: the terms of
            ``log p(x, z)`` that involve the block (any superset is correct).
        local_dims: number of trailing per-element dims of the kernel's and the
            blanket's log-densities (0: one weight per particle).
    """

    name: str
    variables: Tuple[str, ...]
    kernel: Callable[[Any, State], Kernel]
    log_blanket: Callable[[Any, State], torch.Tensor]
    local_dims: int = 0


@dataclass(frozen=True)
class Sampler:
    """An APG sampler: one-shot proposal, block kernels, and the model's log joint.

    Attributes:
        init: ``(x, L) -> (state, log q(state | x))``: ``L`` particles per
            batch element from the one-shot proposal; ``log q`` is
            ``(*batch, L)`` and differentiable in the proposal's parameters.
        blocks: the block kernels, in sweep order.
        log_joint: ``(x, state) -> (*batch, L)``: ``log p(x, z)``.
    """

    init: Callable[[Any, int], Tuple[State, torch.Tensor]]
    blocks: Sequence[Block]
    log_joint: Callable[[Any, State], torch.Tensor]


@dataclass
class SweepInfo:
    """What one sweep reports (the first one describes the one-shot proposal).

    Attributes:
        log_evidence: ``(*batch,)`` running estimate of ``log p(x)`` after the sweep.
        ess: block name (``"init"`` for the one-shot step) -> ``(*batch,)`` ESS / L
            of the weights right after the block's update (eq. 11).
        log_v: block name -> ``(*batch, L)`` incremental log-weights.
        log_joint: ``(*batch, L)`` ``log p(x, z)`` of the particles after the
            sweep, and ``log_w`` their log-weights (``None`` unless asked for).
    """

    log_evidence: torch.Tensor
    ess: Dict[str, torch.Tensor] = field(default_factory=dict)
    log_v: Dict[str, torch.Tensor] = field(default_factory=dict)
    log_joint: Optional[torch.Tensor] = None
    log_w: Optional[torch.Tensor] = None

    def mean_log_joint(self) -> torch.Tensor:
        """Self-normalised estimate of ``E[log p(x, z)]`` under the particles: ``(*batch,)``."""
        if self.log_joint is None:
            raise ValueError("the log joint was not recorded; run with record_log_joint=True")
        return (torch.softmax(self.log_w, -1) * self.log_joint).sum(-1)


@dataclass
class Result:
    """The output of :func:`run`.

    Attributes:
        state: final particles; ``log_w``: final log-weights ``(*batch, L)``.
        sweeps: one :class:`SweepInfo` per sweep (``K`` in all).
        loss_phi, loss_theta: the surrogate losses (scalars; ``None`` unless
            ``objective=True``; ``loss_theta`` needs ``learn_model=True``).
        trajectory: the state after every sweep (``record_states=True``).
    """

    state: State
    log_w: torch.Tensor
    sweeps: List[SweepInfo]
    loss_phi: Optional[torch.Tensor] = None
    loss_theta: Optional[torch.Tensor] = None
    trajectory: Optional[List[State]] = None

    @property
    def log_evidence(self) -> torch.Tensor:
        """``(*batch,)`` the final running estimate of ``log p(x)``."""
        return self.sweeps[-1].log_evidence


def ess_fraction(log_w: torch.Tensor) -> torch.Tensor:
    """ESS / L = (sum w)^2 / (L sum w^2) from log-weights ``(*batch, L)``: ``(*batch,)``."""
    L = log_w.shape[-1]
    return torch.exp(2 * torch.logsumexp(log_w, -1) - torch.logsumexp(2 * log_w, -1) - math.log(L))


def log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    """``log mean_l exp(log_w)`` over the last dim."""
    return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])


def _weighted_sum(log_weights: torch.Tensor, terms: torch.Tensor, particle_dim: int) -> torch.Tensor:
    """``sum_l softmax_l(log_weights) * terms`` summed over every non-batch dim, averaged over the batch."""
    w = torch.softmax(log_weights.detach(), particle_dim)
    nb = terms.dim() + particle_dim  # number of batch dims
    total = (w * terms).sum(tuple(range(nb, terms.dim())))
    return total.mean() if total.dim() else total


def _block_update(x: Any, state: State, log_w: torch.Tensor, block: Block, scheme: str, objective: bool):
    anc = resample(log_w.detach(), scheme)
    state = {k: gather(v, anc) for k, v in state.items()}
    log_w = log_mean_exp(log_w).unsqueeze(-1).expand_as(log_w)
    kernel = block.kernel(x, state)
    new = {k: v.detach() for k, v in kernel.sample().items()}
    missing = [k for k in block.variables if k not in new]
    if missing:
        raise ValueError(f"block {block.name!r}: its kernel returned no value for {missing}")
    lq_new = kernel.log_prob(new)
    with torch.no_grad():
        old = {k: state[k] for k in block.variables}
        lq_old = kernel.log_prob(old)
        lp_old = block.log_blanket(x, state)
        state = {**state, **{k: new[k] for k in block.variables}}
        lp_new = block.log_blanket(x, state)
        log_v_local = lp_new + lq_old - lp_old - lq_new.detach()
        if log_v_local.shape != lq_new.shape:
            raise ValueError(f"block {block.name!r}: kernel log-density has shape {tuple(lq_new.shape)} but the "
                             f"blanket's is {tuple(lp_new.shape)}; both must be (*batch, L, *local) with "
                             f"local_dims={block.local_dims}")
        dims = tuple(range(log_v_local.dim() - block.local_dims, log_v_local.dim()))
        log_v = log_v_local.sum(dims) if dims else log_v_local
    loss = None
    if objective:
        loss = -_weighted_sum(log_v_local, lq_new, -1 - block.local_dims)
    return state, log_w + log_v, log_v, loss


def run(sampler: Sampler, x: Any, num_particles: int, num_sweeps: int, *, scheme: str = "systematic",
        objective: bool = False, learn_model: bool = False, record_log_joint: bool = False,
        record_states: bool = False, blocks: Optional[Sequence[Block]] = None) -> Result:
    """Run the APG sampler (Algorithm 3): a one-shot proposal, then ``num_sweeps - 1`` sweeps.

    Args:
        sampler: the :class:`Sampler`.
        x: the data (whatever the sampler's functions take), batch ``(*batch, ...)``.
        num_particles: L.
        num_sweeps: K (K = 1 is the one-shot proposal alone, i.e. RWS).
        scheme: resampling scheme (``apg.resampling.SCHEMES``).
        objective: build the surrogate losses (else everything runs without autograd).
        learn_model: add the eq. 6 term (needs a differentiable ``log_joint``).
        record_log_joint: store ``log p(x, z)`` and ``log w`` after every sweep.
        record_states: keep the state after every sweep (``Result.trajectory``).
        blocks: use these blocks instead of ``sampler.blocks`` (e.g. a
            :func:`joint_block` of them).

    Returns:
        a :class:`Result`.
    """
    if isinstance(num_sweeps, bool) or not isinstance(num_sweeps, int) or num_sweeps < 1:
        raise ValueError(f"num_sweeps must be an int >= 1, got {num_sweeps!r}")
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an int >= 1, got {num_particles!r}")
    blocks = list(sampler.blocks if blocks is None else blocks)
    if num_sweeps > 1 and not blocks:
        raise ValueError("num_sweeps > 1 needs at least one block")
    loss_phi = loss_theta = None
    with torch.set_grad_enabled(objective):
        state, log_q = sampler.init(x, num_particles)
        log_p = sampler.log_joint(x, state)
        if log_p.shape != log_q.shape:
            raise ValueError(f"the one-shot proposal's log q has shape {tuple(log_q.shape)} but the log joint's "
                             f"is {tuple(log_p.shape)}; both must be (*batch, L={num_particles})")
        log_w = (log_p - log_q).detach()
        if objective:
            loss_phi = -_weighted_sum(log_w, log_q, -1)
            if learn_model:
                loss_theta = -_weighted_sum(log_w, log_p, -1)
    state = {k: v.detach() for k, v in state.items()}
    info = SweepInfo(log_evidence=log_mean_exp(log_w), ess={"init": ess_fraction(log_w)})
    if record_log_joint:
        info.log_joint, info.log_w = log_p.detach(), log_w
    infos = [info]
    trajectory = [state] if record_states else None
    for _ in range(num_sweeps - 1):
        info = SweepInfo(log_evidence=info.log_evidence)
        for block in blocks:
            with torch.set_grad_enabled(objective):
                state, log_w, log_v, loss = _block_update(x, state, log_w, block, scheme, objective)
            info.ess[block.name] = ess_fraction(log_w)
            info.log_v[block.name] = log_v
            if objective:
                loss_phi = loss_phi + loss
                if learn_model:
                    with torch.enable_grad():
                        loss_theta = loss_theta - _weighted_sum(log_v, sampler.log_joint(x, state), -1)
        info.log_evidence = log_mean_exp(log_w)
        if record_log_joint:
            with torch.no_grad():
                info.log_joint, info.log_w = sampler.log_joint(x, state), log_w
        infos.append(info)
        if record_states:
            trajectory.append(state)
    return Result(state, log_w, infos, loss_phi, loss_theta, trajectory)


class _JointKernel:
    """Sequential composition of block kernels (see :func:`joint_block`)."""

    def __init__(self, blocks: Sequence[Block], x: Any, state: State) -> None:
        self.blocks, self.x, self.state = blocks, x, state
        self.kernels: List[Kernel] = []

    def sample(self) -> State:
        state, out = dict(self.state), {}
        self.kernels = []
        for block in self.blocks:
            k = block.kernel(self.x, state)
            v = k.sample()
            self.kernels.append(k)
            state.update(v)
            out.update(v)
        return out

    def _sum(self, k: Kernel, block: Block, values: State) -> torch.Tensor:
        lq = k.log_prob({n: values[n] for n in block.variables})
        return lq.sum(tuple(range(lq.dim() - block.local_dims, lq.dim()))) if block.local_dims else lq

    def log_prob(self, values: State) -> torch.Tensor:
        if not self.kernels:
            raise ValueError("a joint block's kernel density is defined after sample() (its kernels condition "
                             "on the new values of the earlier blocks)")
        return sum(self._sum(k, b, values) for k, b in zip(self.kernels, self.blocks))


def joint_block(blocks: Sequence[Block], log_joint: Callable[[Any, State], torch.Tensor],
                name: str = "joint") -> Block:
    """All ``blocks`` as one block: propose them in order, resample once per sweep.

    The forward kernel is ``prod_b q_b(z_b' | x, z'_{<b}, z_{>b})``.  The reverse
    kernel runs the sweep backwards from the new state: ``z_B`` first given
    ``z'_{<B}``, ..., ``z_1`` last given the old ``z_{>1}``; each of its factors
    conditions on exactly what the forward factor of the same block did, so
    ``r(z | z') = prod_b q_b(z_b | x, z'_{<b}, z_{>b})`` reuses the forward
    kernels.  ESS/L of this block is the paper's ``{tau, mu, c}`` column.
    """
    blocks = list(blocks)
    variables = tuple(v for b in blocks for v in b.variables)
    return Block(name, variables, lambda x, s: _JointKernel(blocks, x, s), log_joint, 0)

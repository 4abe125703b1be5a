"""The APG sampler as a functional core (Algorithms 1-3 of Wu et al., ICML 2020).

An APG sampler is a one-shot proposal ``q(z | x)``, an ordered list of
`Block` kernels ``q(z_b | x, z_-b)`` and the log joint ``log p(x, z)``
(`Sampler`).  Particles are a dict of tensors ``(*batch, L, ...)`` with
log-weights ``(*batch, L)`` (`Particles`).  The algorithm is three pure
functions, each taking an explicit ``torch.Generator``:

* `init`: draw L particles from the one-shot proposal and weigh them,
  ``w = p(x, z) / q(z | x)``;
* `sweep`: one Gibbs sweep; each block update resamples (the weights
  become their average, Algorithm 2), proposes the block from its kernel given
  the rest, and multiplies the weight by the incremental weight of eq. 9, in
  which the same kernel evaluated at the old value is the reverse kernel::

      v = p(x, z_b', z_-b) q(z_b | x, z_-b) / (p(x, z_b, z_-b) q(z_b' | x, z_-b))

* `run`: Algorithm 3, `init` then ``num_sweeps - 1`` sweeps.

Only the factors of the joint that touch the block (its Markov blanket) enter
``v``: the others cancel.  A block local to a plate (the GMM assignments, whose
elements are conditionally independent given the rest) returns its kernel and
blanket log-densities per element, ``(*batch, L, *local)``: resampling uses
their sum, while the objective weighs each element by its own self-normalised
incremental weight (the paper's local-variable treatment).

``log mean_l w_l`` after any step is the sampler's running estimate of
``log p(x)`` (the product of average weights of the SMC sampler).  With
``objective=True`` every step also records what the surrogate losses of eqs. 5
and 6 need (`Step`); `apg.objectives` turns them into losses.

Example::

    g = torch.Generator().manual_seed(0)
    result = run(sampler, x, num_particles=10, num_sweeps=5, generator=g)
    result.log_evidence          # (*batch,)
    result.sweeps[-1].ess        # block name -> (*batch,) ESS / L
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Protocol, Sequence, Tuple, Union

import torch

from .errors import APGError
from .metrics import ess_fraction, log_mean_exp
from .resampling import gather, resample

__all__ = ["Block", "Kernel", "Particles", "Result", "Sampler", "State", "Step", "SweepInfo", "init",
           "joint_block", "run", "sweep"]

State = Dict[str, torch.Tensor]


class Kernel(Protocol):
    """A proposal for one block, already conditioned on ``x`` and the rest of the state."""

    def sample(self, generator: Optional[torch.Generator] = None) -> State:
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
        fuse_blanket: evaluate the blanket at the old and the new values in one
            call, the two states stacked along the particle dim (2L particles;
            halves the per-call overhead).  ``log_blanket`` must then treat
            particles independently, as any density does.
    """

    name: str
    variables: Tuple[str, ...]
    kernel: Callable[[Any, State], Kernel]
    log_blanket: Callable[[Any, State], torch.Tensor]
    local_dims: int = 0
    fuse_blanket: bool = True


@dataclass(frozen=True)
class Sampler:
    """An APG sampler: one-shot proposal, block kernels, and the model's log joint.

    Attributes:
        init: ``(x, L, generator) -> (state, log q(state | x))``: ``L`` particles
            per batch element from the one-shot proposal; ``log q`` is
            ``(*batch, L)`` and differentiable in the proposal's parameters.
        blocks: the block kernels, in sweep order.
        log_joint: ``(x, state) -> (*batch, L)``: ``log p(x, z)``.
    """

    init: Callable[[Any, int, Optional[torch.Generator]], Tuple[State, torch.Tensor]]
    blocks: Sequence[Block]
    log_joint: Callable[[Any, State], torch.Tensor]


class Particles(NamedTuple):
    """Weighted particles.

    Attributes:
        values: variable -> ``(*batch, L, ...)`` (detached).
        log_weights: ``(*batch, L)`` (detached).
    """

    values: State
    log_weights: torch.Tensor


class Step(NamedTuple):
    """What one step (the one-shot proposal, or a block update) gives the objectives of eqs. 5 and 6.

    Attributes:
        block: ``"init"`` or the block's name.
        log_q: ``(*batch, L, *local)`` log-density of the proposed values under
            the kernel, differentiable in the proposal's parameters.
        log_v: ``(*batch, L, *local)`` detached incremental log-weights (the
            one-shot step: the importance log-weights).
        local_dims: number of trailing per-element dims of ``log_q`` and ``log_v``.
        log_joint: ``(*batch, L)`` ``log p(x, z)`` after the step, differentiable
            in the model's parameters (``None`` unless ``learn_model=True``).
    """

    block: str
    log_q: torch.Tensor
    log_v: torch.Tensor
    local_dims: int
    log_joint: Optional[torch.Tensor]


class SweepInfo(NamedTuple):
    """What one sweep reports (the first one describes the one-shot proposal).

    Attributes:
        log_evidence: ``(*batch,)`` running estimate of ``log p(x)`` after the sweep.
        ess: block name (``"init"`` for the one-shot step) -> ``(*batch,)`` ESS / L
            of the weights right after the block's update (eq. 11).
        log_v: block name -> ``(*batch, L)`` incremental log-weights.
        log_joint: ``(*batch, L)`` ``log p(x, z)`` after the sweep, and
            ``log_weights`` the particles' log-weights (``None`` unless recorded).
        steps: the objectives' terms, one `Step` per step (empty unless
            ``objective=True``).
    """

    log_evidence: torch.Tensor
    ess: Dict[str, torch.Tensor]
    log_v: Dict[str, torch.Tensor]
    log_joint: Optional[torch.Tensor] = None
    log_weights: Optional[torch.Tensor] = None
    steps: Tuple[Step, ...] = ()

    def mean_log_joint(self) -> torch.Tensor:
        """Self-normalised estimate of ``E[log p(x, z)]`` under the particles: ``(*batch,)``."""
        if self.log_joint is None or self.log_weights is None:
            raise APGError("the log joint was not recorded; run with record_log_joint=True")
        return (torch.softmax(self.log_weights, -1) * self.log_joint).sum(-1)


class Result(NamedTuple):
    """The output of `run`.

    Attributes:
        state: final particle values; ``log_weights``: their log-weights ``(*batch, L)``.
        sweeps: one `SweepInfo` per sweep (``num_sweeps`` in all).
        trajectory: the state after every sweep (``record_states=True``), else ``None``.
    """

    state: State
    log_weights: torch.Tensor
    sweeps: List[SweepInfo]
    trajectory: Optional[List[State]] = None

    @property
    def log_evidence(self) -> torch.Tensor:
        """``(*batch,)`` the final running estimate of ``log p(x)``."""
        return self.sweeps[-1].log_evidence


def _check_count(name: str, value: object, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise APGError(f"{name} must be an int >= 1, got {value!r} ({flag})")
    return value


def _check_learn_model(learn_model: Union[bool, str]) -> None:
    if not isinstance(learn_model, bool) and learn_model not in ("step", "sweep"):
        raise APGError(f"learn_model must be True, False, 'step' or 'sweep', got {learn_model!r}")


def init(sampler: Sampler, x: Any, num_particles: int, *, generator: Optional[torch.Generator] = None,
         objective: bool = False, learn_model: Union[bool, str] = False,
         record_log_joint: bool = False) -> Tuple[Particles, SweepInfo]:
    """Draw ``num_particles`` particles per batch element from the one-shot proposal and weigh them.

    Args:
        sampler: the `Sampler`.
        x: the data (whatever the sampler's functions take), batch ``(*batch, ...)``.
        num_particles: L.
        generator: the source of randomness (torch's default if ``None``).
        objective: record the `Step` the objectives need (with autograd).
        learn_model: also keep ``log p(x, z)`` differentiable (eq. 6).
        record_log_joint: store ``log p(x, z)`` and the log-weights in the info.

    Returns:
        ``(particles, info)``: log-weights ``log p(x, z) - log q(z | x)``; ``info.ess["init"]``.
    """
    _check_count("num_particles", num_particles, "--particles")
    _check_learn_model(learn_model)
    with torch.set_grad_enabled(objective):
        values, log_q = sampler.init(x, num_particles, generator)
        log_p = sampler.log_joint(x, values)
        if log_p.shape != log_q.shape:
            raise APGError(f"the one-shot proposal's log q has shape {tuple(log_q.shape)} but the log joint's "
                           f"is {tuple(log_p.shape)}; both must be (*batch, L={num_particles})")
        log_w = (log_p - log_q).detach()
    steps = (Step("init", log_q, log_w, 0, log_p if learn_model else None),) if objective else ()
    particles = Particles({k: v.detach() for k, v in values.items()}, log_w)
    info = SweepInfo(log_mean_exp(log_w), {"init": ess_fraction(log_w)}, {},
                     log_p.detach() if record_log_joint else None, log_w if record_log_joint else None, steps)
    return particles, info


def _block_update(sampler: Sampler, x: Any, particles: Particles, block: Block, *, scheme: str,
                  generator: Optional[torch.Generator], objective: bool,
                  learn_model: bool) -> Tuple[Particles, torch.Tensor, Optional[Step]]:
    """Resample, propose block ``block``, reweigh: ``(particles, log_v (*batch, L), step or None)``."""
    log_w = particles.log_weights
    anc = resample(log_w.detach(), scheme, generator=generator)
    state = {k: gather(v, anc) for k, v in particles.values.items()}
    log_w = log_mean_exp(log_w).unsqueeze(-1).expand_as(log_w)
    kernel = block.kernel(x, state)
    new = {k: v.detach() for k, v in kernel.sample(generator).items()}
    missing = [k for k in block.variables if k not in new]
    if missing:
        raise APGError(f"block {block.name!r}: its kernel returned no value for {missing}")
    lq_new = kernel.log_prob(new)
    with torch.no_grad():
        old = {k: state[k] for k in block.variables}
        lq_old = kernel.log_prob(old)
        old_state = state
        state = {**state, **{k: new[k] for k in block.variables}}
        if block.fuse_blanket:
            dim = log_w.dim() - 1  # the particle dim of every value: (*batch, L, ...)
            L = log_w.shape[-1]
            both = {k: v if k not in block.variables else torch.cat([old_state[k], state[k]], dim)
                    for k, v in state.items()}
            both = {k: v if k in block.variables else torch.cat([v, v], dim) for k, v in both.items()}
            lp = block.log_blanket(x, both)
            lp_old, lp_new = lp.narrow(dim, 0, L), lp.narrow(dim, L, L)
        else:
            lp_old = block.log_blanket(x, old_state)
            lp_new = block.log_blanket(x, state)
        log_v_local = lp_new + lq_old - lp_old - lq_new.detach()
        if log_v_local.shape != lq_new.shape:
            raise APGError(f"block {block.name!r}: kernel log-density has shape {tuple(lq_new.shape)} but the "
                           f"blanket's is {tuple(lp_new.shape)}; both must be (*batch, L, *local) with "
                           f"local_dims={block.local_dims}")
        dims = tuple(range(log_v_local.dim() - block.local_dims, log_v_local.dim()))
        log_v = log_v_local.sum(dims) if dims else log_v_local
    step = None
    if objective:
        log_joint = None
        if learn_model:
            with torch.enable_grad():
                log_joint = sampler.log_joint(x, state)
        step = Step(block.name, lq_new, log_v_local, block.local_dims, log_joint)
    return Particles(state, log_w + log_v), log_v, step


def sweep(sampler: Sampler, x: Any, particles: Particles, *, generator: Optional[torch.Generator] = None,
          blocks: Optional[Sequence[Block]] = None, scheme: str = "systematic", objective: bool = False,
          learn_model: Union[bool, str] = False, record_log_joint: bool = False) -> Tuple[Particles, SweepInfo]:
    """One Gibbs sweep: every block in turn resampled, proposed and reweighed (eq. 9).

    Args:
        sampler: the `Sampler`.
        x: the data.
        particles: the current `Particles`.
        generator: the source of randomness.
        blocks: these blocks instead of ``sampler.blocks`` (e.g. a `joint_block`).
        scheme: resampling scheme (``apg.resampling.SCHEMES``).
        objective: as in `init`.
        learn_model: as in `init`; ``"sweep"`` records the eq. 6 term after the sweep's last block
            only (one log joint per sweep instead of one per block: for a model whose log joint costs
            O(T), e.g. T frames, a sweep of T blocks then costs O(T), not O(T^2), in eq. 6).
        record_log_joint: as in `init`.

    Returns:
        ``(particles, info)``.
    """
    _check_learn_model(learn_model)
    blocks = list(sampler.blocks if blocks is None else blocks)
    if not blocks:
        raise APGError("a sweep needs at least one block (num_sweeps > 1 with a one-shot sampler)")
    ess: Dict[str, torch.Tensor] = {}
    log_vs: Dict[str, torch.Tensor] = {}
    steps: List[Step] = []
    for k, block in enumerate(blocks):
        learn_here = bool(learn_model) and (learn_model != "sweep" or k == len(blocks) - 1)
        with torch.set_grad_enabled(objective):
            particles, log_v, step = _block_update(sampler, x, particles, block, scheme=scheme, generator=generator,
                                                   objective=objective, learn_model=learn_here)
        ess[block.name] = ess_fraction(particles.log_weights)
        log_vs[block.name] = log_v
        if step is not None:
            steps.append(step)
    log_joint = log_weights = None
    if record_log_joint:
        with torch.no_grad():
            log_joint, log_weights = sampler.log_joint(x, particles.values), particles.log_weights
    return particles, SweepInfo(log_mean_exp(particles.log_weights), ess, log_vs, log_joint, log_weights,
                                tuple(steps))


def run(sampler: Sampler, x: Any, num_particles: int, num_sweeps: int, *,
        generator: Optional[torch.Generator] = None, scheme: str = "systematic", objective: bool = False,
        learn_model: Union[bool, str] = False, record_log_joint: bool = False, record_states: bool = False,
        blocks: Optional[Sequence[Block]] = None) -> Result:
    """Run the APG sampler (Algorithm 3): a one-shot proposal, then ``num_sweeps - 1`` sweeps.

    Args:
        sampler: the `Sampler`.
        x: the data, batch ``(*batch, ...)``.
        num_particles: L.
        num_sweeps: K (K = 1 is the one-shot proposal alone, i.e. RWS).
        generator: the source of randomness (torch's default if ``None``).
        scheme: resampling scheme.
        objective: record the terms of the surrogate losses (see `apg.objectives`).
        learn_model: add the eq. 6 terms (needs a differentiable ``log_joint``): ``True`` (or ``"step"``)
            after every step, ``"sweep"`` after the one-shot step and each sweep's last block.
        record_log_joint: store ``log p(x, z)`` and the log-weights after every sweep.
        record_states: keep the state after every sweep (``Result.trajectory``).
        blocks: use these blocks instead of ``sampler.blocks``.

    Returns:
        a `Result`.
    """
    _check_count("num_sweeps", num_sweeps, "--sweeps")
    _check_count("num_particles", num_particles, "--particles")
    if num_sweeps > 1 and not list(sampler.blocks if blocks is None else blocks):
        raise APGError("num_sweeps > 1 needs at least one block")
    particles, info = init(sampler, x, num_particles, generator=generator, objective=objective,
                           learn_model=learn_model, record_log_joint=record_log_joint)
    infos = [info]
    trajectory = [particles.values] if record_states else None
    for _ in range(num_sweeps - 1):
        particles, info = sweep(sampler, x, particles, generator=generator, blocks=blocks, scheme=scheme,
                                objective=objective, learn_model=learn_model, record_log_joint=record_log_joint)
        infos.append(info)
        if trajectory is not None:
            trajectory.append(particles.values)
    return Result(particles.values, particles.log_weights, infos, trajectory)


class _JointKernel:
    """Sequential composition of block kernels (see `joint_block`)."""

    def __init__(self, blocks: Sequence[Block], x: Any, state: State) -> None:
        self.blocks, self.x, self.state = blocks, x, state
        self.kernels: List[Kernel] = []

    def sample(self, generator: Optional[torch.Generator] = None) -> State:
        state: State = dict(self.state)
        out: State = {}
        self.kernels = []
        for block in self.blocks:
            k = block.kernel(self.x, state)
            v = k.sample(generator)
            self.kernels.append(k)
            state.update(v)
            out.update(v)
        return out

    def _sum(self, k: Kernel, block: Block, values: State) -> torch.Tensor:
        lq = k.log_prob({n: values[n] for n in block.variables})
        return lq.sum(tuple(range(lq.dim() - block.local_dims, lq.dim()))) if block.local_dims else lq

    def log_prob(self, values: State) -> torch.Tensor:
        if not self.kernels:
            raise APGError("a joint block's kernel density is defined after sample() (its kernels condition "
                           "on the new values of the earlier blocks)")
        total = self._sum(self.kernels[0], self.blocks[0], values)
        for k, b in zip(self.kernels[1:], self.blocks[1:]):
            total = total + self._sum(k, b, values)
        return total


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

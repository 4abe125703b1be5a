"""Plate-sharded TMC on ``torch.distributed``: each process holds a shard of one plate.

A plate is a product, a sum of log-values over its elements.  If every process
of a process group holds a shard of plate ``P``'s elements (its data, its
plated parameters) and the *same* samples of the latents outside ``P``, the
compiled plan runs unchanged on every process up to the plate product that
multiplies ``P`` out; there one all-reduce (a sum, over a tensor of the global
latents' sample indices) makes every process hold the product over *all*
elements, and the rest of the contraction (over the global indices only) gives
every process the single-process result, exactly.

Usage (one process per shard, e.g. under ``torchrun``)::

    dist.init_process_group("gloo")
    m = build_model(num_points=len(my_x))          # plate "N" of this process's shard size
    est = m.compile(K=16, shard=Shard("N"))
    log_p = est.log_marginal({"x": my_x})           # the same value on every process
    log_p.sum().backward()
    all_reduce_grads(params)                        # replicated parameters: sum the per-process shares

Randomness: the latents outside ``P`` are drawn from a stream shared by all
processes (seeded from ``seed``, or from a seed rank 0 draws and broadcasts),
the latents inside ``P`` from a per-process stream seeded from the seed and the
rank, so the shards' samples are independent.  The global stream stays in step
as long as every process makes the same calls (the collectives require that
anyway).  Neither touches torch's global random state.

Gradients (autograd runs through the collective):

* tensors of this process's shard (its data, plated parameters) get their
  exact gradient;
* replicated tensors (global proposal and model parameters) get a *share*:
  the path through this shard's elements plus ``1 / world`` of the path
  through the factors outside ``P``.  Summing the shares over the processes
  (`all_reduce_grads`) gives the exact gradient.  (DDP averages instead:
  multiply the loss by the world size to use it.)

`tmcgraph.TMC.posterior` gives the exact marginals of the global latents
on every process and those of this shard's local latents;
`tmcgraph.TMC.dregs_surrogate` follows the gradient rule above.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, Optional

import torch

from .errors import TMCError

__all__ = ["Shard", "all_reduce_grads"]


def _dist():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise TMCError("sharded evaluation needs an initialised torch.distributed process group "
                       "(e.g. torchrun, then torch.distributed.init_process_group('gloo'))")
    return dist


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes.

    The backward passes the gradient through unchanged (every process evaluates the same downstream function of the sum,
    so each receives the same upstream gradient).
    """

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        _dist().all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (exact for ``-inf`` values, unlike ``x/s + x.detach()...``)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class Shard:
    """Plate ``plate`` split across the processes of ``group`` (see the module docstring).

    Args:
        plate: the sharded plate; each process's model declares it with the size of
            its own shard (shards may differ in size).
        group: the process group (default: the world).
        seed: seed of the shared and per-process sampling streams (default: rank 0
            draws one from torch's global generator and broadcasts it, on first use).
    """

    def __init__(self, plate: str, *, group: Optional[Any] = None, seed: Optional[int] = None) -> None:
        if not isinstance(plate, str):
            raise TMCError(f"Shard: plate must be a plate name, got {plate!r}")
        self.plate = plate
        self.group = group
        self._seed = seed
        self._states: Optional[dict] = None

    # -- process group -------------------------------------------------------------
    @property
    def world(self) -> int:
        """Number of processes in the group."""
        return _dist().get_world_size(self.group)

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        return _dist().get_rank(self.group)

    @property
    def seed(self) -> int:
        """The shared seed (broadcast from rank 0 on first use if not given)."""
        if self._seed is None:
            dist = _dist()
            box = [int(torch.randint(0, 2 ** 62, (), dtype=torch.int64)) if self.rank == 0 else None]
            src = dist.get_global_rank(self.group, 0) if self.group is not None else 0
            dist.broadcast_object_list(box, src=src, group=self.group)  # any backend (gloo, NCCL)
            self._seed = int(box[0])  # type: ignore[arg-type]
        return self._seed

    # -- randomness ----------------------------------------------------------------
    def _stream_states(self) -> dict:
        if self._states is None:
            seed = self.seed
            self._states = {True: torch.Generator().manual_seed(seed).get_state(),
                            False: torch.Generator().manual_seed((seed * 1_000_003 + 7919 * (self.rank + 1))
                                                                 % (2 ** 63)).get_state()}
            self._cuda: dict = {}
        return self._states

    @contextlib.contextmanager
    def stream(self, shared: bool) -> Iterator[None]:
        """Run the block on the shared stream (``shared=True``) or this process's own.

        Torch's global random state (CPU, and the current CUDA device's once CUDA is initialised) is restored after.
        """
        states = self._stream_states()
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        saved = torch.get_rng_state()
        saved_cuda = torch.cuda.get_rng_state() if cuda else None
        torch.set_rng_state(states[shared])
        if cuda:
            if shared not in self._cuda:
                g = torch.Generator(device="cuda")
                g.manual_seed(self.seed if shared else self.seed * 1_000_003 + 7919 * (self.rank + 1))
                self._cuda[shared] = g.get_state()
            torch.cuda.set_rng_state(self._cuda[shared])
        try:
            yield
        finally:
            states[shared] = torch.get_rng_state()
            torch.set_rng_state(saved)
            if saved_cuda is not None:
                self._cuda[shared] = torch.cuda.get_rng_state()
                torch.cuda.set_rng_state(saved_cuda)

    # -- collectives ---------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over the processes (autograd: the gradient passes through unchanged)."""
        return _AllReduceSum.apply(x, self.group)

    def replicated_share(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` unchanged, its gradient divided by the world size (a replicated term's share)."""
        return _ScaleGrad.apply(x, 1.0 / self.world)

    def gather_objects(self, obj: object) -> list:
        """Every process's ``obj``, by rank."""
        out: list = [None] * self.world
        _dist().all_gather_object(out, obj, group=self.group)
        return out


def all_reduce_grads(params: Iterable[torch.Tensor], group=None) -> None:
    """Sum the ``.grad`` of replicated tensors over the processes (in place).

    Making each the exact gradient of a sharded objective (`Shard`).  Tensors without a gradient are skipped.
    """
    dist = _dist()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)

"""The compiled backend: a whole plan lowered to one ``torch.compile``'d program.

``plan.log_sum(factors, backend="compiled")`` runs the plan's stages as a single
function compiled by ``torch.compile`` (``fullgraph=True``: no graph breaks, no host
syncs inside).  Each pairwise step is the log-domain fast path of
`tmcgraph._kernels` (shift by the max over the summed labels, exponentiate,
contract, log, restore the shift) without its data-dependent repair: instead, the
program also returns the smallest shifted sum of any step (entries that are zero
by structure excluded).  When that flag is below ``sqrt(tiny)`` some entry may have
lost precision and the evaluation is redone by the eager evaluator, which repairs
exactly; so results are as exact as eager's, and the flag costs one host sync per
evaluation.  Autograd works through the compiled program (AOTAutograd derives the
backward).

Programs are compiled lazily, once per plan and per input shapes, dtype and device
(``dynamic=False``; torch recompiles for a new batch size).  The first call of each
shape pays the compile (seconds to minutes on a CPU; see docs/performance.md);
plans with a ``memory_limit`` (sliced stages) are refused.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import types
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.distributions import Distribution

from ._kernels import align, log_product, log_reduce, shifted_sum, underflow_threshold
from ._runners import run_scan, run_steps
from .errors import TMCError
from .stages import EinsumStage, ProductStage, ScanStage, Stage

__all__ = ["BACKENDS", "CompiledProgram", "check_backend", "compile_function", "distribution_validation", "program"]

#: the evaluation backends of `tmcgraph.Plan.log_sum`
BACKENDS = ("eager", "compiled")
_PROGRAM_IDS = itertools.count()


def check_backend(backend: str) -> str:
    """``backend`` if it is one of `BACKENDS`, else a `TMCError` listing them."""
    if backend not in BACKENDS:
        raise TMCError(f"unknown backend={backend!r}; expected one of {list(BACKENDS)}")
    return backend


def _pair(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fast path of one pairwise step: ``(result, smallest shifted sum of a non-structural-zero entry)``."""
    sum_a = [c for c in la if c not in out]
    sum_b = [c for c in lb if c not in out]
    if not sum_a or not sum_b:
        ka = "".join(c for c in out if c in la)
        kb = "".join(c for c in out if c in lb)
        value = align(log_reduce(a, la, ka), ka, out) + align(log_reduce(b, lb, kb), kb, out)
        return value, torch.full((), math.inf, dtype=value.dtype, device=value.device)
    _, _, total, sa, sb = shifted_sum(a, la, b, lb, out)
    value = torch.log(total.clamp_min(torch.finfo(total.dtype).tiny)) + sa + sb
    # structural zeros (a whole slice -inf: shift -inf) are exact; every other entry must keep precision
    flag = torch.where(sa + sb > -math.inf, total.detach(), math.inf).amin()
    return value, flag


def _program(stages: Sequence[Stage], input_labels: Sequence[str], output_labels: str,
             constant: float) -> Callable[[List[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]:
    """The plan as a pure function of its input tensors: ``(result (*batch,), underflow flag)``."""

    def run(tensors: List[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        batch = torch.broadcast_shapes(*(t.shape[: t.dim() - len(lab)] for t, lab in zip(tensors, input_labels)))
        values = list(tensors)
        flags: List[torch.Tensor] = []

        def contract(operands: Sequence[torch.Tensor], labels: Sequence[str], out: str) -> torch.Tensor:
            if len(operands) == 1:
                return log_reduce(operands[0], labels[0], out)  # exact, sync-free
            value, flag = _pair(operands[0], labels[0], operands[1], labels[1], out)
            flags.append(flag)
            return value

        def pair(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str) -> torch.Tensor:
            value, flag = _pair(a, la, b, lb, out)
            flags.append(flag)
            return value

        for stage in stages:
            operands = [values[k] for k in stage.inputs]
            if isinstance(stage, ScanStage):
                values.append(run_scan(stage, operands, pair))
            elif isinstance(stage, ProductStage):
                values.append(log_product(operands[0], stage.input_labels[0], stage.output_labels))
            else:
                values.append(run_steps(stage, operands, contract))
        result = values[-1]
        flag = torch.stack(flags).amin() if flags else torch.full((), math.inf, dtype=result.dtype,
                                                                    device=result.device)
        result = result.expand(tuple(batch) + tuple(result.shape[result.dim() - len(output_labels):]))
        return (result + constant if constant else result), flag

    return run


def program(stages: Sequence[Stage], input_labels: Sequence[str], output_labels: str, constant: float
            ) -> Callable[[List[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]:
    """A plan as a pure, sync-free function of its input tensors: ``(result (*batch,), underflow flag)``
    (the flag below ``sqrt(tiny)``, or NaN, means: evaluate again with the exact eager kernels)."""
    if any(isinstance(s, EinsumStage) and s.steps and any(len(st.positions) > 2 for st in s.steps) for s in stages):
        raise TMCError("backend='compiled' supports pairwise plans only")
    return _program(stages, input_labels, output_labels, constant)


@contextlib.contextmanager
def distribution_validation(enabled: bool) -> Iterator[None]:
    """``torch.distributions`` argument validation set to ``enabled`` within the block, and the caller's setting
    restored after it.  The setting is process-wide (torch has no other); compiled code runs with validation
    off (its checks would sync inside the traced program), and torch.compile's first use in a process turns
    it off for good (TorchPatcher), which the restore undoes."""
    before = Distribution._validate_args
    Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(before)


def compile_function(fn: Callable, name: str) -> Callable:
    """``torch.compile(fn, dynamic=False, fullgraph=True)`` under a code object of its own.

    torch.compile keeps its cache (and its recompile limit) per code object, and closures share
    their code: each compiled function gets its own, so they neither evict each other nor exhaust
    the limit together.  The user's ``torch.distributions`` validation setting is kept (the first
    ``torch.compile`` of a process turns it off)."""
    code = fn.__code__.replace(co_name=f"tmcgraph_{name}_{next(_PROGRAM_IDS)}")
    fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    with distribution_validation(Distribution._validate_args):
        return torch.compile(fn, dynamic=False, fullgraph=True)


class CompiledProgram:
    """A plan's compiled program (built by `tmcgraph.Plan.log_sum` with ``backend="compiled"``).

    Calling it with validated input tensors returns the result, or ``None`` when the
    underflow flag tripped (the caller then evaluates eagerly, which is exact).
    """

    def __init__(self, stages: Sequence[Stage], input_labels: Sequence[str], output_labels: str,
                 constant: float) -> None:
        self._fn = compile_function(program(stages, input_labels, output_labels, constant), "plan")

    def __call__(self, tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        # torch.compile's first use turns off torch.distributions argument validation for the whole process
        # (TorchPatcher); our programs trace no distribution, so keep the user's setting
        with distribution_validation(Distribution._validate_args):
            result, flag = self._fn(list(tensors))
        if bool(flag < underflow_threshold(result.dtype)):  # the one host sync
            return None
        return result

"""The compiled backend.

The lowered program of a plan (`tmcgraph.evaluate.program.StepProgram.fast`) handed to ``torch.compile``.

``plan.log_sum(factors, backend="compiled")`` runs the program lowered for the input shapes at hand as
one function compiled by ``torch.compile`` (``fullgraph=True``: no graph breaks, no host syncs inside).
Each pairwise step is the fast path of the one kernel (`tmcgraph.evaluate.kernels.pair_forward`)
without its data-dependent repair: the program also returns the smallest shifted sum of any step
(entries that are zero by structure excluded).  When it is below ``sqrt(tiny)`` some entry may have
lost precision and the evaluation is redone by the eager backend, which repairs exactly; so results are
as exact as eager's, and the flag costs one host sync per evaluation.  Autograd works through the
compiled program (AOTAutograd derives the backward).

Programs are compiled lazily, once per plan and per input shapes, dtype and device (``dynamic=False``).
The first call of each shape pays the compile (seconds to minutes on a CPU; see docs/performance.md);
plans with a ``memory_limit`` (sliced stages) and sharded evaluation are refused.
"""

from __future__ import annotations

import contextlib
import itertools
import types
from typing import Callable, Iterator, Optional, Sequence, Tuple

import torch
from torch.distributions import Distribution

from .kernels import underflow_threshold
from .program import StepProgram

__all__ = ["CompiledProgram", "compile_function", "distribution_validation"]

_PROGRAM_IDS = itertools.count()


@contextlib.contextmanager
def distribution_validation(enabled: bool) -> Iterator[None]:
    """``torch.distributions`` argument validation set to ``enabled`` within the block.

    And the caller's setting restored after it.

    The setting is process-wide (torch has no other); compiled code runs with validation off (its checks
    would sync inside the traced program), and torch.compile's first use in a process turns it off for good
    (TorchPatcher), which the restore undoes.
    """
    before = Distribution._validate_args
    Distribution.set_default_validate_args(enabled)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(before)


def compile_function(fn: Callable, name: str) -> Callable:
    """``torch.compile(fn, dynamic=False, fullgraph=True)`` under a code object of its own.

    torch.compile keeps its cache (and its recompile limit) per code object, and closures share their
    code: each compiled function gets its own, so they neither evict each other nor exhaust the limit
    together.  The user's ``torch.distributions`` validation setting is kept (the first ``torch.compile``
    of a process turns it off).
    """
    code = fn.__code__.replace(co_name=f"tmcgraph_{name}_{next(_PROGRAM_IDS)}")
    fn = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    with distribution_validation(Distribution._validate_args):
        return torch.compile(fn, dynamic=False, fullgraph=True)


class CompiledProgram:
    """A lowered program under ``torch.compile``.

    Calling it with validated input tensors returns the result, or ``None`` when an underflow flag tripped
    (the caller then evaluates eagerly, which is exact).

    Args:
        program: the `StepProgram` of the input shapes it will be called with.
        constant: added to the result (the plan's constant).
    """

    def __init__(self, program: StepProgram, constant: float) -> None:
        self.program = program

        def run(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
            result, flag = program.fast(tensors)
            return (result + constant if constant else result), flag

        self._fn = compile_function(run, "plan")

    def raw(self, tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(result, flag)`` of the compiled program, unchecked."""
        # torch.compile's first use turns off torch.distributions argument validation for the whole process
        # (TorchPatcher); our programs trace no distribution, so keep the user's setting
        with distribution_validation(Distribution._validate_args):
            return self._fn(list(tensors))

    def __call__(self, tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
        """The result, or ``None`` when an underflow flag tripped (evaluate eagerly then)."""
        result, flag = self.raw(tensors)
        if not bool(flag >= underflow_threshold(result.dtype)):  # the one host sync (NaN fails it too)
            return None
        return result

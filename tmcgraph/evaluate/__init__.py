"""Evaluating plans: the one evaluation layer every estimator goes through.

A `tmcgraph.Plan` is structure only (frozen); evaluating it on tensors happens here, in three parts:

* `tmcgraph.evaluate.kernels`: the log-semiring kernels, with the one pairwise step (its fast path,
  its exact repair, its one backward) and the one underflow threshold;
* `tmcgraph.evaluate.program`: the lowering of a plan, once per input shapes, to a `StepProgram`
  (pairwise steps, plate products, sharded all-reduces, scans of chains and sliced stages), and its
  runner, whose adaptive state (`RunState`) belongs to the caller;
* backends, registered by name in `BACKENDS`: ``"eager"`` runs the program, ``"compiled"`` hands the
  same program to ``torch.compile`` (`tmcgraph.evaluate.compiled`).

Estimators hold an `Evaluator` (a backend and a `RunState`) and call `Evaluator.log_sum` with their
plan; ``plan.log_sum(factors)`` is the same call with no state kept between evaluations.  Lowered and
compiled programs are pure functions of a plan's structure and the input shapes: they are cached per
plan (least recently used evicted), outside the plan.

Example::

    >>> import torch, tmcgraph
    >>> from tmcgraph.evaluate import Evaluator
    >>> g = tmcgraph.FactorGraph().index("a", 3).index("b", 4)
    >>> plan = g.factor("ab", ["a", "b"]).compile()
    >>> f = {"ab": torch.zeros(3, 4)}
    >>> Evaluator("eager").log_sum(plan, f).item() == plan.log_sum(f).item()  # log(12)
    True
"""

from __future__ import annotations

import functools
import math
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import torch

from ..errors import TMCError
from ..stages import InputSpec
from .program import Lowerable, PlateReduce, RunState, StepProgram

if TYPE_CHECKING:
    from .compiled import CompiledProgram

__all__ = ["BACKENDS", "Backend", "Evaluator", "EvaluablePlan", "RunState", "StepProgram", "check_backend",
           "check_operands", "check_result", "log_sum", "lower", "register_backend", "run"]

#: lowered programs kept per plan (one per distinct input shapes), least recently used evicted
MAX_PROGRAMS = 64


class EvaluablePlan(Lowerable, Protocol):
    """What evaluation reads of a plan (`tmcgraph.Plan` provides it)."""

    constant: float
    memory_limit: Optional[int]

    def plate_label(self, plate: str) -> str:
        """The label of plate ``plate`` in the plan's stages."""


class Backend(Protocol):
    """A backend: evaluates ``plan`` on validated tensors (input order), ``(*batch, *output)``."""

    def __call__(self, plan: EvaluablePlan, tensors: Sequence[torch.Tensor], *, state: Optional[RunState],
                 plate_reduce: Optional[Tuple[str, PlateReduce]]) -> torch.Tensor:
        """Evaluate ``plan`` on validated ``tensors``: ``(*batch, *output)``."""


_programs: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()
_compiled: "weakref.WeakKeyDictionary[object, Dict[tuple, CompiledProgram]]" = weakref.WeakKeyDictionary()


def lower(plan: EvaluablePlan, shapes: Sequence[Tuple[int, ...]], reduce_label: Optional[str] = None
          ) -> StepProgram:
    """The `StepProgram` of ``plan`` for input tensors of full shapes ``shapes`` (cached per plan).

    ``reduce_label``: the label of a sharded plate (`EvaluablePlan.plate_label`).
    """
    key = (tuple(tuple(s) for s in shapes), reduce_label)
    cache = _programs.get(plan)
    if cache is None:
        cache = _programs[plan] = OrderedDict()
    program = cache.get(key)
    if program is None:
        if len(cache) >= MAX_PROGRAMS:
            cache.popitem(last=False)
        batch = torch.broadcast_shapes(*(s[: len(s) - len(spec.labels)] for s, spec in zip(key[0], plan.inputs)))
        stages = plan.stages_for(math.prod(batch))
        program = cache[key] = StepProgram(stages, plan.inputs, plan.output_labels, key[0], reduce_label)
    else:
        cache.move_to_end(key)
    return program


def _eager(plan: EvaluablePlan, tensors: Sequence[torch.Tensor], *, state: Optional[RunState],
           plate_reduce: Optional[Tuple[str, PlateReduce]]) -> torch.Tensor:
    label = plan.plate_label(plate_reduce[0]) if plate_reduce is not None else None
    program = lower(plan, [t.shape for t in tensors], label)
    value = program(tensors, state, plate_reduce=None if plate_reduce is None else plate_reduce[1])
    return value + plan.constant if plan.constant else value


def _compiled_backend(plan: EvaluablePlan, tensors: Sequence[torch.Tensor], *, state: Optional[RunState],
                      plate_reduce: Optional[Tuple[str, PlateReduce]]) -> torch.Tensor:
    if plate_reduce is not None:
        raise TMCError("plate_reduce (sharded evaluation) runs on the eager backend only")
    if plan.memory_limit is not None:
        raise TMCError("backend='compiled' evaluates unsliced: compile the plan without memory_limit")
    from .compiled import CompiledProgram  # the torch.compile machinery only when asked for

    shapes = tuple(tuple(t.shape) for t in tensors)
    cache = _compiled.get(plan)
    if cache is None:
        cache = _compiled[plan] = {}
    compiled = cache.get(shapes)
    if compiled is None:
        compiled = cache[shapes] = CompiledProgram(lower(plan, shapes), plan.constant)
    result = compiled(tensors)
    return _eager(plan, tensors, state=state, plate_reduce=None) if result is None else result


#: the evaluation backends by name (`register_backend` adds one)
BACKENDS: Dict[str, Backend] = {"eager": _eager, "compiled": _compiled_backend}


def register_backend(name: str, backend: Backend) -> None:
    """Make ``backend`` available as ``backend=name`` everywhere a backend is chosen."""
    if not isinstance(name, str) or not name:
        raise TMCError(f"register_backend: name must be a non-empty string, got {name!r}")
    if not callable(backend):
        raise TMCError(f"register_backend: backend {name!r} must be callable, got {type(backend).__name__}")
    BACKENDS[name] = backend


def check_backend(backend: str) -> str:
    """``backend`` if it is registered in `BACKENDS`, else a `TMCError` listing them."""
    if backend not in BACKENDS:
        raise TMCError(f"unknown backend={backend!r}; expected one of {list(BACKENDS)}")
    return backend


def run(plan: EvaluablePlan, tensors: Sequence[torch.Tensor], *, backend: str = "eager",
        state: Optional[RunState] = None, plate_reduce: Optional[Tuple[str, PlateReduce]] = None) -> torch.Tensor:
    """Evaluate ``plan`` on already validated tensors, in input order (no checks): ``(*batch, *output)``."""
    return BACKENDS[check_backend(backend)](plan, tensors, state=state, plate_reduce=plate_reduce)


def log_sum(plan: EvaluablePlan, factors: Mapping[str, torch.Tensor], *, backend: str = "eager",
            state: Optional[RunState] = None, plate_reduce: Optional[Tuple[str, PlateReduce]] = None
            ) -> torch.Tensor:
    """``log sum_{index copies} exp(sum of factor copies)`` of ``plan`` (see `tmcgraph.Plan.log_sum`).

    Args:
        plan: the compiled plan.
        factors: factor name -> tensor ``(*batch, *plates, *indices)`` in the factor's declared orders.
        backend: a name in `BACKENDS`.
        state: the caller's `RunState` (eager), or ``None``: every evaluation decides alone.
        plate_reduce: ``(plate, fn)``: ``fn`` applied to every value right after ``plate`` is multiplied
            out of it (sharded evaluation; eager only).

    Returns:
        tensor ``(*batch,)``: differentiable, ``-inf`` where every term has zero weight.

    Raises:
        TMCError: a missing or unknown factor, a shape that does not match the declaration (names the
            dim), incompatible batch shapes, mixed devices, a non-floating dtype, NaN / +inf in a factor,
            or an unknown backend.
    """
    if not isinstance(factors, Mapping):
        raise TMCError(f"log_sum expects a mapping from factor name to tensor, got {type(factors).__name__}")
    declared = [s.name for s in plan.inputs]
    missing = [name for name in declared if name not in factors]
    if missing:
        raise TMCError(f"no tensor given for factor(s) {missing}; log_sum needs one per declared factor")
    unknown = [name for name in factors if name not in declared]
    if unknown:
        raise TMCError(f"tensor(s) given for undeclared factor(s) {unknown}; declared: {declared}")
    check_backend(backend)
    tensors = check_operands([factors[name] for name in declared], plan.inputs)
    result = run(plan, tensors, backend=backend, state=state, plate_reduce=plate_reduce)
    check_result(result, tensors, plan.inputs)
    return result


class Evaluator:
    """Evaluates plans for one caller: a backend and the caller's adaptive `RunState`.

    Each estimator holds one, so which kernels run never depends on another estimator's evaluations
    (the plans and their lowered programs are shared).

    Args:
        backend: a name in `BACKENDS` (``"eager"`` or ``"compiled"`` unless more are registered).
    """

    def __init__(self, backend: str = "eager") -> None:
        self.backend = check_backend(backend)
        self.state = RunState()

    def log_sum(self, plan: EvaluablePlan, factors: Mapping[str, torch.Tensor], *,
                plate_reduce: Optional[Tuple[str, PlateReduce]] = None, backend: Optional[str] = None
                ) -> torch.Tensor:
        """`log_sum` with this evaluator's backend (or ``backend``) and state: ``(*batch,)``."""
        return log_sum(plan, factors, backend=self.backend if backend is None else backend, state=self.state,
                       plate_reduce=plate_reduce)

    def __repr__(self) -> str:
        return f"Evaluator(backend={self.backend!r})"


def check_operands(tensors: Sequence[torch.Tensor], specs: Sequence[InputSpec]) -> List[torch.Tensor]:
    """Validate shapes, dtypes and devices against the declarations; promote dtypes."""
    for t, spec in zip(tensors, specs):
        if not isinstance(t, torch.Tensor):
            raise TMCError(f"{spec.what}: expected a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TMCError(f"{spec.what}: expected a floating-point tensor of log-values, got dtype {t.dtype}")
        n = len(spec.shape)
        expected = "(*batch, " + ", ".join(f"{d}={s}" for d, s in zip(spec.dims, spec.shape)) + ")"
        if t.dim() < n:
            raise TMCError(f"{spec.what}: expected shape {expected}, got {tuple(t.shape)} (too few dims)")
        for k, (got, want) in enumerate(zip(t.shape[t.dim() - n :], spec.shape)):
            if got != want:
                raise TMCError(
                    f"{spec.what}: dim {t.dim() - n + k} ({spec.dims[k]}) has size {got}, expected {want}; "
                    f"expected shape {expected}, got {tuple(t.shape)}"
                )
    try:
        torch.broadcast_shapes(*(t.shape[: t.dim() - len(s.shape)] for t, s in zip(tensors, specs)))
    except RuntimeError:
        batches = {s.name: tuple(t.shape[: t.dim() - len(s.shape)]) for t, s in zip(tensors, specs)}
        raise TMCError(f"batch shapes (leading dims) do not broadcast: {batches}") from None
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise TMCError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def check_result(result: torch.Tensor, tensors: Sequence[torch.Tensor], specs: Sequence[InputSpec]) -> None:
    """NaN or +inf out means NaN or +inf in (the kernels create neither): name the culprit.

    Checking the result (one reduction, one host sync: a NaN or +inf entry makes the maximum NaN or +inf)
    instead of every input keeps the common path cheap.
    """
    if result.numel() and not bool(result.detach().max() < math.inf):
        for t, spec in zip(tensors, specs):
            if bool(torch.isnan(t).any()):
                raise TMCError(f"{spec.what} contains NaN; log-factors must be finite or -inf")
            if bool((t == math.inf).any()):
                raise TMCError(f"{spec.what} contains +inf; log-factors must be finite or -inf")


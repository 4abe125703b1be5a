"""Plan: runs compiled stages (`tmcgraph.stages`) on tensors and explains itself.

It never parses and never plans: the stages, and the slicing of einsum stages for
a batch size under a memory limit, come from the compiler (`tmcgraph.compile`).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import opt_einsum
import torch
from opt_einsum import paths as oe_paths

from ._kernels import log_product, log_reduce
from ._program import RunState, StepProgram, lowerable
from ._runners import run_scan, run_steps
from .errors import TMCError
from .stages import EinsumStage, InputSpec, ProductStage, ScanStage, Stage

__all__ = ["Plan", "RunState", "StepInfo", "check_operands", "check_result", "run_scan", "run_steps"]

_STACK_LABEL = opt_einsum.get_symbol(100_000)
_MAX_PROGRAMS = 64  # step programs kept per plan (one per distinct input shapes)


@dataclass(frozen=True)
class StepInfo:
    """One pairwise/unary step or plate product of a plan (for ``describe``)."""

    kind: str  # "contract" | "product" | "scan"
    operands: Tuple[int, ...]  # value ids (inputs first, then one per step)
    operand_labels: Tuple[str, ...]
    result_labels: str
    flops: int
    size: int


def _run_sliced(stage: EinsumStage, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    sizes = dict(stage.sizes)
    out = stage.output_labels
    sliced_labels = [label for label, _ in stage.slices]
    starts_per_label = [range(0, sizes[label], chunk) for label, chunk in stage.slices]
    kept = [k for k, label in enumerate(sliced_labels) if label in out]
    partial: Dict[tuple, List[torch.Tensor]] = {}
    for starts in itertools.product(*starts_per_label):
        pieces = []
        for t, labels in zip(operands, stage.input_labels):
            for (label, chunk), start in zip(stage.slices, starts):
                if label in labels:
                    dim = t.dim() - len(labels) + labels.index(label)
                    t = t.narrow(dim, start, min(chunk, sizes[label] - start))
            pieces.append(t)
        partial.setdefault(tuple(starts[k] for k in kept), []).append(run_steps(stage, pieces))
    combined = {
        key: parts[0] if len(parts) == 1 else log_reduce(torch.stack(parts, -1), out + _STACK_LABEL, out)
        for key, parts in partial.items()
    }

    def assemble(level: int, prefix: tuple) -> torch.Tensor:
        if level == len(kept):
            return combined[prefix]
        label = sliced_labels[kept[level]]
        dim = out.index(label) - len(out)
        chunks = [assemble(level + 1, prefix + (s,)) for s in starts_per_label[kept[level]]]
        return torch.cat(chunks, dim=dim)

    return assemble(0, ())


class Plan:
    """A compiled contraction: structure and sizes only, reused across evaluations.

    Built by `tmcgraph.FactorGraph.compile` (or internally by
    `tmcgraph.log_einsum`).  Evaluate with `log_sum`.

    Attributes:
        treewidth: upper bound on the tree-width of the interaction graph of the
            indices (networkx min-fill-in / min-degree); the compiled cost grows
            like ``K ** (treewidth + 1)``.
        flops: FLOPs of the chosen contraction (opt_einsum's count).
        largest_intermediate: elements of the largest intermediate per batch
            element (after slicing, if a memory limit applies).
        path: the whole plan as an opt_einsum linear path over the inputs
            (plate products appear as single-operand steps).
    """

    def __init__(
        self,
        *,
        inputs: Tuple[InputSpec, ...],
        stages: Tuple[Stage, ...],
        output_labels: str,
        label_names: Tuple[Tuple[str, str], ...],
        constant: float,
        treewidth: int,
        log10_naive_flops: float,
        optimize: str,
        memory_limit: Optional[int],
        slicer: Optional[Callable[[int], Tuple[Stage, ...]]] = None,
    ) -> None:
        self.inputs = inputs
        self.stages = stages
        self.output_labels = output_labels
        self._names = dict(label_names)
        self.constant = constant
        self.treewidth = treewidth
        self.log10_naive_flops = log10_naive_flops
        self.optimize = optimize
        self.memory_limit = memory_limit
        self._slicer = slicer  # batch elements -> stages sliced for memory_limit (the compiler's planner)
        self._compiled: Optional[Callable[[Sequence[torch.Tensor]], Optional[torch.Tensor]]] = None
        self._lowerable = lowerable(stages)
        # the lowered programs, per input shapes: pure functions of the structure and the shapes (no state)
        self._programs: "OrderedDict[Tuple[Tuple[int, ...], ...], StepProgram]" = OrderedDict()
        self._input_index = {spec.name: k for k, spec in enumerate(inputs)}
        self.steps, self.path = self._trace()
        self.flops = sum(step.flops for step in self.steps)
        self.largest_intermediate = max((self._stage_largest(s) for s in stages), default=1)

    # -- structure ----------------------------------------------------------
    def _trace(self) -> Tuple[Tuple[StepInfo, ...], List[Tuple[int, ...]]]:
        value_id = list(range(len(self.inputs)))  # plan value -> global ssa id
        next_id = len(self.inputs)
        ssa: List[Tuple[int, ...]] = []
        infos: List[StepInfo] = []
        for stage in self.stages:
            if isinstance(stage, ScanStage):
                scanned = tuple(value_id[k] for k in stage.inputs)
                k = self._sizes_of(stage.chain[:1])[0]
                width = math.prod(self._sizes_of(stage.batch))
                links = len(stage.chain) - 1
                infos.append(StepInfo("scan", scanned, stage.input_labels, stage.output_labels,
                                      2 * links * k ** 3 * width, links * k * k * width))
                ssa.append(scanned)
                value_id.append(next_id)
                next_id += 1
                continue
            if isinstance(stage, ProductStage):
                labels = stage.input_labels[0]
                ids: Tuple[int, ...] = (value_id[stage.inputs[0]],)
                size = math.prod(self._sizes_of(stage.output_labels))
                flops = math.prod(self._sizes_of(labels))
                infos.append(StepInfo("product", ids, (labels,), stage.output_labels, flops, size))
                ssa.append(ids)
                value_id.append(next_id)
                next_id += 1
                continue
            sizes = dict(stage.sizes)
            work = [value_id[k] for k in stage.inputs]
            for step in stage.steps:
                ids = tuple(work[p] for p in sorted(step.positions))
                for p in sorted(step.positions, reverse=True):
                    work.pop(p)
                result = step.result_labels
                touched = set("".join(step.operand_labels))
                flops = opt_einsum.helpers.flop_count(touched, len(touched) > len(result), len(ids), sizes)
                size = math.prod(sizes[c] for c in result)
                infos.append(StepInfo("contract", ids, step.operand_labels, result, flops, size))
                ssa.append(ids)
                work.append(next_id)
                next_id += 1
            value_id.append(work[0])
        return tuple(infos), [tuple(p) for p in oe_paths.ssa_to_linear(ssa)]

    def _sizes_of(self, labels: str) -> List[int]:
        for stage in self.stages:
            if isinstance(stage, EinsumStage):
                sizes = dict(stage.sizes)
                if all(c in sizes for c in labels):
                    return [sizes[c] for c in labels]
        out = []
        for c in labels:  # labels only seen by inputs
            for spec in self.inputs:
                if c in spec.labels:
                    out.append(spec.shape[spec.labels.index(c)])
                    break
        return out

    def _stage_largest(self, stage: Stage) -> int:
        if isinstance(stage, ScanStage):
            k = self._sizes_of(stage.chain[:1])[0]
            return (len(stage.chain) - 1) * k * k * math.prod(self._sizes_of(stage.batch))
        if isinstance(stage, EinsumStage):
            sizes = dict(stage.sizes)
            sizes.update(dict(stage.slices))
            return max((math.prod(sizes[c] for c in step.result_labels) for step in stage.steps), default=1)
        return 1

    def _names_of(self, labels: str) -> str:
        return "[" + ",".join(self._names.get(c, c) for c in labels) + "]"

    def describe(self) -> str:
        """A readable summary: tree-width, chosen and candidate paths, per-step costs,
        naive versus compiled cost."""
        lines = [
            f"tmcgraph Plan: {len(self.inputs)} inputs, {len(self.steps)} steps in {len(self.stages)} stages",
            f"  tree-width (upper bound, min-fill/min-degree): {self.treewidth}",
            f"  compiled cost: {self.flops:.3g} FLOPs, largest intermediate {self.largest_intermediate:,} elements",
            f"  naive cost (every joint assignment of every index copy): ~1e{self.log10_naive_flops:.1f} FLOPs",
        ]
        for k, stage in enumerate(self.stages):
            if isinstance(stage, EinsumStage):
                tried = "; ".join(
                    f"{c.optimizer} {c.cost.flops:.3g} FLOPs ({1e3 * c.seconds:.1f} ms)" for c in stage.candidates
                )
                lines.append(f"  stage {k}: optimizer {stage.candidates[0].optimizer!r} chosen among: {tried}")
                if stage.slices:
                    sliced = ", ".join(f"{self._names.get(c, c)} in chunks of {n}" for c, n in stage.slices)
                    lines.append(f"    sliced for memory_limit={self.memory_limit}: {sliced}")
        lines.append("  steps:")
        for n, step in enumerate(self.steps):
            operands = " * ".join(
                (self.inputs[i].name if i < len(self.inputs) else f"#{i - len(self.inputs)}") + self._names_of(lab)
                for i, lab in zip(step.operands, step.operand_labels)
            )
            verb = {"product": "plate-product", "scan": f"parallel-scan of {len(step.operands)} values"}.get(
                step.kind, "contract")
            lines.append(
                f"    #{n}: {verb} {operands} -> {self._names_of(step.result_labels)}"
                f"   {step.flops:.3g} FLOPs, {step.size:,} elements"
            )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Plan(inputs={len(self.inputs)}, treewidth={self.treewidth}, flops={self.flops:.3g})"

    # -- evaluation ---------------------------------------------------------
    def plate_label(self, plate: str) -> str:
        """The label of plate ``plate`` in this plan's stages (an error names the plan's plates)."""
        for label, name in self._names.items():
            if name == plate:
                return label
        raise TMCError(f"plate {plate!r} is not in this plan; its plates and indices: {sorted(self._names.values())}")

    def run(self, tensors: Sequence[torch.Tensor], *,
            plate_reduce: Optional[Tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
            state: Optional[RunState] = None) -> torch.Tensor:
        """Evaluate on already validated tensors, in input order (no checks).

        ``state``: the caller's `RunState` (see `log_sum`).

        ``plate_reduce=(plate, fn)`` applies ``fn`` to every value right after
        ``plate`` has been multiplied out of it (a plate product: a sum of
        log-values over the plate's elements), expanded to the full batch shape.
        Sharded evaluation (`tmcgraph.distributed`) passes an all-reduce here.
        """
        if plate_reduce is None and self._slicer is None and self._lowerable:
            key = tuple(tuple(t.shape) for t in tensors)
            program = self._programs.get(key)
            if program is None:
                if len(self._programs) >= _MAX_PROGRAMS:  # least recently used first
                    self._programs.popitem(last=False)
                program = self._programs[key] = StepProgram(self.stages, self.inputs, self.output_labels, key)
            else:
                self._programs.move_to_end(key)
            value = program(tensors, state)
            return value + self.constant if self.constant else value
        values: List[torch.Tensor] = list(tensors)
        batch = torch.broadcast_shapes(*(t.shape[: t.dim() - len(s.labels)] for t, s in zip(tensors, self.inputs)))
        stages = self.stages if self._slicer is None else self._slicer(math.prod(batch))
        reduce_label = self.plate_label(plate_reduce[0]) if plate_reduce is not None else None
        for stage in stages:
            operands = [values[k] for k in stage.inputs]
            if isinstance(stage, ScanStage):
                values.append(run_scan(stage, operands))
                continue
            if isinstance(stage, ProductStage):
                value = log_product(operands[0], stage.input_labels[0], stage.output_labels)
                if (plate_reduce is not None and reduce_label is not None and reduce_label in stage.input_labels[0]
                        and reduce_label not in stage.output_labels):
                    core = value.shape[value.dim() - len(stage.output_labels):]
                    value = plate_reduce[1](value.expand(tuple(batch) + tuple(core)))
                values.append(value)
            elif stage.slices:
                values.append(_run_sliced(stage, operands))
            else:
                values.append(run_steps(stage, operands))
        result = values[-1]
        if result.shape[: result.dim() - len(self.output_labels)] != batch:
            result = result.expand(*batch, *result.shape[result.dim() - len(self.output_labels) :])
        return result + self.constant if self.constant else result

    def log_sum(self, factors: Mapping[str, torch.Tensor], *, backend: str = "eager",
                plate_reduce: Optional[Tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
                state: Optional[RunState] = None) -> torch.Tensor:
        """``log sum_{index copies} exp(sum of factor copies)``.

        Args:
            factors: factor name -> tensor ``(*batch, *plates, *indices)`` in the
                factor's declared orders.  Batch shapes broadcast across factors.
            backend: ``"eager"`` (default) or ``"compiled"``: the whole plan as one
                ``torch.compile``'d program (`tmcgraph.compiled`), compiled on
                first use per input shapes; same results (it falls back to eager
                where precision could be lost).
            plate_reduce: ``(plate, fn)``: apply ``fn`` to every value right after
                ``plate`` is multiplied out of it (see `run`; eager only).
            state: a `RunState` the caller keeps across its
                evaluations (eager only): after the fast path lost precision on one, the
                next few start with the exact kernels where it did.  ``None``: every
                evaluation decides alone.  The values are exact either way, and a plan
                (shared by every graph of its structure) holds no such state.

        Returns:
            tensor ``(*batch,)``: differentiable, ``-inf`` where every term has zero
            weight.

        Raises:
            TMCError: a missing or unknown factor, a shape that does not match the
                declaration (names the dim), incompatible batch shapes, mixed
                devices, a non-floating dtype, or NaN / +inf in a factor.
        """
        if not isinstance(factors, Mapping):
            raise TMCError(f"log_sum expects a mapping from factor name to tensor, got {type(factors).__name__}")
        missing = [s.name for s in self.inputs if s.name not in factors]
        if missing:
            raise TMCError(f"no tensor given for factor(s) {missing}; log_sum needs one per declared factor")
        unknown = [name for name in factors if name not in self._input_index]
        if unknown:
            declared = [s.name for s in self.inputs]
            raise TMCError(f"tensor(s) given for undeclared factor(s) {unknown}; declared: {declared}")
        from .compiled import check_backend

        check_backend(backend)
        tensors = [factors[s.name] for s in self.inputs]
        tensors = check_operands(tensors, self.inputs)
        if plate_reduce is not None and backend == "compiled":
            raise TMCError("plate_reduce (sharded evaluation) runs on the eager backend only")
        if backend == "compiled":
            result = self._run_compiled(tensors, state)
        else:
            result = self.run(tensors, plate_reduce=plate_reduce, state=state)
        check_result(result, tensors, self.inputs)
        return result

    def _run_compiled(self, tensors: Sequence[torch.Tensor], state: Optional[RunState] = None) -> torch.Tensor:
        if self.memory_limit is not None:
            raise TMCError("backend='compiled' evaluates unsliced: compile the plan without memory_limit")
        if self._compiled is None:
            from .compiled import CompiledProgram  # torch.compile machinery only when asked for

            self._compiled = CompiledProgram(self.stages, [s.labels for s in self.inputs], self.output_labels,
                                             self.constant)
        result = self._compiled(tensors)
        return self.run(tensors, state=state) if result is None else result


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

    Checking the result (one reduction, one host sync: a NaN or +inf entry makes the maximum NaN or
    +inf) instead of every input keeps the common path cheap."""
    if result.numel() and not bool(result.detach().max() < math.inf):
        for t, spec in zip(tensors, specs):
            if bool(torch.isnan(t).any()):
                raise TMCError(f"{spec.what} contains NaN; log-factors must be finite or -inf")
            if bool((t == math.inf).any()):
                raise TMCError(f"{spec.what} contains +inf; log-factors must be finite or -inf")

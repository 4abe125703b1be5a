"""Plan: a compiled contraction, structure and sizes only, frozen; it explains itself (`Plan.describe`).

It never parses and never plans: the stages, and the slicing of einsum stages for a batch size under a
memory limit, come from the compiler (`tmcgraph.compile`).  It holds no tensors and no state: evaluating
it is `tmcgraph.evaluate`'s job (`Plan.log_sum` is a shortcut to it).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import opt_einsum
import torch
from opt_einsum import paths as oe_paths

from . import evaluate
from .errors import TMCError
from .evaluate import RunState
from .stages import EinsumStage, InputSpec, ProductStage, ScanStage, Stage

__all__ = ["Plan", "StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """One pairwise/unary step or plate product of a plan (for ``describe``)."""

    kind: str  # "contract" | "product" | "scan"
    operands: Tuple[int, ...]  # value ids (inputs first, then one per step)
    operand_labels: Tuple[str, ...]
    result_labels: str
    flops: int
    size: int
    scale: float = 1.0  # a plate product's scale (`tmcgraph.FactorGraph.plate`)


class Plan:
    """A compiled contraction: structure and sizes only, reused across evaluations; immutable.

    Built by `tmcgraph.FactorGraph.compile` (or internally by `tmcgraph.log_einsum`).  Evaluate with
    `log_sum`, or with a `tmcgraph.evaluate.Evaluator` that keeps a caller's state.  The compiler shares
    one plan between graphs of one structure, which is safe because nothing about an evaluation is kept
    in it.

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

    inputs: Tuple[InputSpec, ...]
    stages: Tuple[Stage, ...]
    output_labels: str
    constant: float
    treewidth: int
    log10_naive_flops: float
    optimize: str
    memory_limit: Optional[int]
    steps: Tuple["StepInfo", ...]
    path: List[Tuple[int, ...]]
    flops: int
    largest_intermediate: int
    _names: Dict[str, str]
    _slicer: Optional[Callable[[int], Tuple[Stage, ...]]]

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
        put = functools.partial(object.__setattr__, self)
        put("inputs", inputs)
        put("stages", stages)
        put("output_labels", output_labels)
        put("_names", dict(label_names))
        put("constant", constant)
        put("treewidth", treewidth)
        put("log10_naive_flops", log10_naive_flops)
        put("optimize", optimize)
        put("memory_limit", memory_limit)
        put("_slicer", slicer)  # batch elements -> stages sliced for memory_limit (the compiler's planner)
        steps, path = self._trace()
        put("steps", steps)
        put("path", path)
        put("flops", sum(step.flops for step in steps))
        put("largest_intermediate", max((self._stage_largest(s) for s in stages), default=1))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Plan is immutable (setting {name!r}); compile another plan instead")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"Plan is immutable (deleting {name!r})")

    def stages_for(self, batch_elements: int) -> Tuple[Stage, ...]:
        """The stages to run for ``batch_elements`` data-batch elements.

        Sliced to respect ``memory_limit``, if the plan has one.
        """
        return self.stages if self._slicer is None else self._slicer(batch_elements)

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
                infos.append(StepInfo("product", ids, (labels,), stage.output_labels, flops, size, stage.scale))
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
        """A readable summary: tree-width, chosen and candidate paths, per-step costs, naive versus compiled cost."""
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
            verb = "contract"
            if step.kind == "product":
                verb = "plate-product" + (f" (scale {step.scale:g})" if step.scale != 1.0 else "")
            elif step.kind == "scan":
                verb = f"parallel-scan of {len(step.operands)} values"
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

    def log_sum(self, factors: Mapping[str, torch.Tensor], *, backend: str = "eager",
                plate_reduce: Optional[Tuple[str, Callable[[torch.Tensor], torch.Tensor]]] = None,
                state: Optional[RunState] = None) -> torch.Tensor:
        """``log sum_{index copies} exp(sum of factor copies)``.

        The same as ``tmcgraph.evaluate.log_sum(plan, factors, ...)``.

        Args:
            factors: factor name -> tensor ``(*batch, *plates, *indices)`` in the
                factor's declared orders.  Batch shapes broadcast across factors.
            backend: a name in `tmcgraph.evaluate.BACKENDS`: ``"eager"`` (default) or
                ``"compiled"``: the plan's lowered program under ``torch.compile``
                (`tmcgraph.evaluate.compiled`), compiled on first use per input shapes;
                same results (it falls back to eager where precision could be lost).
            plate_reduce: ``(plate, fn)``: apply ``fn`` to every value right after
                ``plate`` is multiplied out of it (a plate product: a sum of log-values
                over the plate's elements), laid out over the full batch shape.  Sharded
                evaluation (`tmcgraph.distributed`) passes an all-reduce here (eager only).
            state: a `tmcgraph.evaluate.RunState` the caller keeps across its
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
        return evaluate.log_sum(self, factors, backend=backend, state=state, plate_reduce=plate_reduce)

"""The lowering: a plan's stages turned, once per input shapes, into a `StepProgram`.

Every backend runs a plan through the program lowered for the input shapes at hand (`lower`, cached
per plan; programs are pure and immutable).  Lowering does, once, everything that does not depend on
values:

* every data-batch dim becomes a label (size-1 batch dims are dropped), so a value is a tensor with
  one labelled dim per label and nothing else;
* every pairwise step becomes a `tmcgraph.evaluate.kernels.PairLayout`, one ``bmm`` with its
  permutations, shapes and reduction dims precomputed (steps of more operands are folded into pairs);
  each value keeps the label order its producer wrote, and its consumer's shift pass reads it in
  whatever order it needs;
* a chain's scan stage becomes one instruction whose rounds are the same pairwise step on stacked links;
* a stage sliced for a memory limit becomes one instruction holding the program of each chunk shape;
* a plate product whose plate is sharded applies the caller's all-reduce (``reduce_label``).

Running a program, the underflow check of the fast path (appendix E of Aitchison, NeurIPS 2019: the
shifted sum of an entry can fall below ``sqrt(tiny)`` when the maxima of the two operands sit at
far-apart positions; a slice that is ``-inf`` throughout trips it too) is one reduction per step whose
results are checked together, once per evaluation.  When it trips, the evaluation is rerun with the
exact kernels from the first affected step on (and, for a caller that passes a `RunState`, those
steps stay exact for its next few evaluations), so results are exact.  With autograd the whole program
is one `torch.autograd.Function` (`_PlanFunction`): its forward saves each step's blocks, its backward
walks the steps in reverse (pairs: `tmcgraph.evaluate.kernels.pair_backward`; reductions: the softmax;
plate sums: broadcast).  Programs with a scan, a sliced stage or an all-reduce use one Function per
pairwise step and autograd instead.  `StepProgram.fast` is the sync-free program the compiled backend
hands to ``torch.compile``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union

import torch
from opt_einsum import get_symbol

from ..stages import EinsumStage, InputSpec, ProductStage, ScanStage, Stage
from .kernels import (
    BATCH_SYMBOL_BASE,
    SCRATCH_MIN_ELEMENTS,
    PairFunction,
    PairLayout,
    _inverse,
    _scratch,
    align,
    exact_pair_forward,
    log_contract_pair,
    log_reduce,
    lower_call,
    lower_pair,
    pair_backward,
    pair_forward,
    underflow_threshold,
)

__all__ = ["Lowerable", "RunState", "StepProgram"]

#: after an evaluation tripped the underflow check, this many evaluations run the affected steps exactly
EXACT_STICKY = 16
_STACK_LABEL = get_symbol(100_000)

PlateReduce = Callable[[torch.Tensor], torch.Tensor]


class Lowerable(Protocol):
    """What lowering reads of a plan (`tmcgraph.Plan` provides it)."""

    inputs: Tuple[InputSpec, ...]
    output_labels: str

    def stages_for(self, batch_elements: int) -> Tuple[Stage, ...]:
        """The stages to run for ``batch_elements`` data-batch elements (sliced for a memory limit)."""


class _State:
    """One evaluation's mode and collected underflow flags."""

    __slots__ = ("grad", "exact_from", "flags", "saved", "traced", "plate_reduce")

    def __init__(self, exact_from: int, *, saving: bool = False, traced: bool = False,
                 plate_reduce: Optional[PlateReduce] = None) -> None:
        self.grad = torch.is_grad_enabled()
        self.exact_from = exact_from
        self.flags: List[torch.Tensor] = []
        self.saved: Optional[Dict[int, tuple]] = {} if saving else None
        self.traced = traced  # inside torch.compile: plain differentiable ops, structural zeros exact
        self.plate_reduce = plate_reduce


@dataclass(frozen=True)
class _Input:
    """Drop size-1 batch dims: ``x.reshape(shape)``."""

    shape: Tuple[int, ...]

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: _State) -> torch.Tensor:
        t = tensors[k]
        return t if t.shape == self.shape else t.reshape(self.shape)


@dataclass(frozen=True)
class _Reduce:
    """``log_reduce`` of value ``src`` (labels ``labels``) to ``keep``."""

    src: int
    labels: str
    keep: str
    dims: Tuple[int, ...]  # the summed dims
    shape: Tuple[int, ...]  # the result's shape
    scratch: bool  # large enough for the no-grad scratch buffer

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: _State) -> torch.Tensor:
        x = env[self.src]
        if st.grad and x.requires_grad and st.saved is None:  # exact kernels under autograd
            return log_reduce(x, self.labels, self.keep)
        raw = x.amax(dim=self.dims, keepdim=True)
        shift = raw.nan_to_num(neginf=0.0)  # a whole slice -inf: exp(-inf - 0) = 0
        buf = _scratch(0, x) if self.scratch and st.saved is None and not st.traced else None
        e = (x - shift if buf is None else torch.sub(x, shift, out=buf)).exp_()
        # total >= 1 (the max term is exp(0)) unless every term is -inf (total 0): the clamp keeps log finite
        # there and the raw -inf max restores the value
        total = e.sum(dim=self.dims, keepdim=True).clamp_min_(0.5)
        if st.saved is not None:
            st.saved[k] = (e, total)
        return torch.log(total).add_(raw).view(self.shape)


@dataclass(frozen=True)
class _Product:
    """Plate product: plain sum over ``dims`` of value ``src``, times ``scale`` (a subsampled plate's).

    With ``reduce`` (a sharded plate) the sum is laid out as ``full`` (every data-batch label) and handed to the
    caller's all-reduce.
    """

    src: int
    dims: Tuple[int, ...]
    reduce: bool = False
    labels: str = ""  # the sum's labels (with reduce)
    full: str = ""
    full_shape: Tuple[int, ...] = ()
    scale: float = 1.0

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: _State) -> torch.Tensor:
        x = env[self.src]
        value = x.sum(dim=self.dims) if self.dims else x
        if self.scale != 1.0:
            value = value * self.scale
        if self.reduce and st.plate_reduce is not None:
            value = st.plate_reduce(align(value, self.labels, self.full).expand(self.full_shape))
        return value


@dataclass(frozen=True)
class _Outer:
    """No summed label shared: ``a.permute(perm_a).reshape(shape_a) + b.permute(perm_b).reshape(shape_b)``."""

    a: int
    b: int
    perm_a: Tuple[int, ...]
    shape_a: Tuple[int, ...]
    perm_b: Tuple[int, ...]
    shape_b: Tuple[int, ...]

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: _State) -> torch.Tensor:
        return env[self.a].permute(self.perm_a).reshape(self.shape_a) + env[self.b].permute(self.perm_b).reshape(
            self.shape_b)


@dataclass(frozen=True)
class _Pair:
    """A pairwise step.

    Values ``a`` and ``b`` as the left and right operands of ``layout``; ``index``: its position among the program's
    checked steps.
    """

    a: int
    b: int
    layout: PairLayout
    index: int

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: _State) -> torch.Tensor:
        a, b = env[self.a], env[self.b]
        p = self.layout
        if self.index >= st.exact_from:
            if st.grad and (a.requires_grad or b.requires_grad):
                return PairFunction.apply(a, b, p, True)[0]
            return exact_pair_forward(p, a, b, keep=False)[0]
        if st.traced:  # torch.compile derives the backward of plain ops
            value, flag, _ = pair_forward(p, a, b, keep=True, scratch=False, zeros=True, plain=True)
        elif st.saved is not None:  # inside the whole-plan Function: keep the blocks for its backward
            value, flag, saved = pair_forward(p, a, b, keep=True, scratch=False)
            assert saved is not None
            st.saved[k] = saved + (a.shape, b.shape)
        elif st.grad and (a.requires_grad or b.requires_grad):
            value, flag = PairFunction.apply(a, b, p, False)
        else:
            value, flag, _ = pair_forward(p, a, b, keep=False, scratch=True)
        st.flags.append(flag)
        return value


def _round(a: torch.Tensor, b: torch.Tensor, st: Optional[_State], lowered: tuple) -> torch.Tensor:
    """One scan round ``log(exp(a) @ exp(b))`` of stacked links ``(n, *lead, i, j)`` by ``(n, *lead, j, k)``.

    The exact step (``st`` None), or the fast one with its flag appended to ``st.flags``. ``lowered``: the round's
    `tmcgraph.evaluate.kernels.lower_call`.
    """
    if st is None:
        return log_contract_pair(a, "ij", b, "jk", "ik")
    p, sa, sb, _, _, target, shape = lowered
    x, y = a.reshape(sa), b.reshape(sb)
    if p.swap:
        x, y = y, x
    if st.traced:
        value, flag, _ = pair_forward(p, x, y, keep=True, scratch=False, zeros=True, plain=True)
    elif st.grad and (x.requires_grad or y.requires_grad):
        # plain ops: a round's blocks are small (K x K per link), where autograd's own backward is cheaper than
        # a Python one (measured: benchmarks/model_step.py, family T=50, K=16)
        value, flag, _ = pair_forward(p, x, y, keep=True, scratch=False, plain=True)
    else:
        value, flag, _ = pair_forward(p, x, y, keep=False, scratch=False)
    st.flags.append(flag)
    return align(value, p.labels_out, target).reshape(shape)


@dataclass(frozen=True)
class _Scan:
    """A chain's scan stage on values ``srcs`` laid out as ``targets`` (the data-batch labels first).

    The links ``(batch, l_{k-1}, l_k)`` (unary values folded into the link ending at their label) are
    stacked and multiplied pairwise by the one pairwise step, halving the stack each round: ``log2`` of the
    chain's length batched steps instead of one step per link.
    """

    stage: ScanStage
    srcs: Tuple[int, ...]
    labels: Tuple[str, ...]
    targets: Tuple[str, ...]
    index: int
    rounds: Tuple[tuple, ...]  # each round's lowered pairwise step

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: _State) -> torch.Tensor:
        stage = self.stage
        # the data-batch dims lead, unlabelled; the chain's own batch labels follow
        operands = [align(env[src], lab, target) for src, lab, target in zip(self.srcs, self.labels, self.targets)]
        chain, batch = stage.chain, stage.batch
        n = len(chain) - 1
        links = [align(operands[j], stage.input_labels[j], batch + chain[j] + chain[j + 1]) for j in range(n)]
        unary = [align(u, lab, batch + chain[j]) for u, lab, j in zip(operands[n:], stage.input_labels[n:],
                                                                        stage.unary)]
        lead = torch.broadcast_shapes(*(x.shape[:-2] for x in links), *(u.shape[:-1] for u in unary))
        stack = torch.stack([x.expand(lead + x.shape[-2:]) for x in links])
        if unary:  # every unary value added to the link ending at its label, in one call
            us = torch.stack([u.expand(lead + u.shape[-1:]) for u in unary]).unsqueeze(-2)
            where = torch.tensor([j - 1 for j in stage.unary], device=stack.device)
            stack = stack.index_add(0, where, us.to(stack.dtype).expand((len(unary),) + stack.shape[1:]))
        mode = None if self.index >= st.exact_from else st
        first = len(st.flags)
        for lowered in self.rounds:
            half = stack.shape[0] // 2
            merged = _round(stack[0:2 * half:2], stack[1:2 * half:2], mode, lowered)
            stack = torch.cat([merged, stack[2 * half:]]) if stack.shape[0] % 2 else merged
        if mode is not None:  # one flag per checked step: the rounds' smallest (NaN if any is NaN)
            rounds = st.flags[first:]
            del st.flags[first:]
            st.flags.append(torch.stack(rounds).amin() if rounds else stack.new_full((), math.inf))
        return stack[0]


@dataclass(frozen=True)
class _Sliced:
    """An einsum stage sliced for a memory limit.

    Values ``srcs`` laid out as ``targets`` run chunk by chunk through the program of each chunk shape (``programs``,
    keyed by the chunk size of each sliced label); chunks of kept labels are concatenated, chunks of summed labels
    accumulated by logsumexp.
    """

    srcs: Tuple[int, ...]
    labels: Tuple[str, ...]
    targets: Tuple[str, ...]
    slices: Tuple[Tuple[str, int, int], ...]  # (label, chunk, size)
    output: str  # the result's labels: data-batch labels, then the stage's
    programs: Tuple[Tuple[Tuple[int, ...], "StepProgram"], ...]

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: _State) -> torch.Tensor:
        operands = [align(env[src], lab, target) for src, lab, target in zip(self.srcs, self.labels, self.targets)]
        programs = dict(self.programs)
        starts_per_label = [range(0, size, chunk) for _, chunk, size in self.slices]
        kept = [j for j, (label, _, _) in enumerate(self.slices) if label in self.output]
        partial: Dict[tuple, List[torch.Tensor]] = {}
        for starts in itertools.product(*starts_per_label):
            pieces = []
            for t, target in zip(operands, self.targets):
                for (label, chunk, size), start in zip(self.slices, starts):
                    if label in target:
                        t = t.narrow(target.index(label), start, min(chunk, size - start))
                pieces.append(t)
            key = tuple(min(chunk, size - start) for (_, chunk, size), start in zip(self.slices, starts))
            partial.setdefault(tuple(starts[j] for j in kept), []).append(programs[key](pieces))
        out = self.output
        combined = {key: parts[0] if len(parts) == 1 else log_reduce(torch.stack(parts, -1), out + _STACK_LABEL, out)
                    for key, parts in partial.items()}

        def assemble(level: int, prefix: tuple) -> torch.Tensor:
            if level == len(kept):
                return combined[prefix]
            label = self.slices[kept[level]][0]
            chunks = [assemble(level + 1, prefix + (s,)) for s in starts_per_label[kept[level]]]
            return torch.cat(chunks, dim=out.index(label))

        return assemble(0, ())


_Instr = Union[_Input, _Reduce, _Product, _Outer, _Pair, _Scan, _Sliced]


class RunState:
    """The eager evaluator's adaptive state, owned by the caller (an estimator's evaluator holds one), not by a plan.

    After an evaluation of a step program tripped the underflow check, the next evaluations of that program
    by the same caller (``EXACT_STICKY`` of them) run the affected steps exactly from the start, which saves
    the fast pass that would trip again.  Plans and their programs are shared (the compiler caches plans by
    structure), so this state lives with the caller: which kernels run never depends on another model's
    evaluations.  The results are exact either way; only the work differs.
    """

    def __init__(self) -> None:
        self._sticky: "weakref.WeakKeyDictionary[StepProgram, List[int]]" = weakref.WeakKeyDictionary()

    def exact_from(self, program: "StepProgram") -> Optional[int]:
        """The first checked step ``program`` runs exactly in this evaluation (``None``: the fast path); counts it."""
        entry = self._sticky.get(program)
        if entry is None or entry[1] <= 0:
            return None
        entry[1] -= 1
        return entry[0]

    def tripped(self, program: "StepProgram", first: int) -> None:
        """``program`` tripped at checked step ``first``: run from there exactly for the next evaluations."""
        self._sticky[program] = [first, EXACT_STICKY]

    def left(self, program: "StepProgram") -> int:
        """How many more evaluations of ``program`` start exactly."""
        entry = self._sticky.get(program)
        return 0 if entry is None else max(entry[1], 0)


class StepProgram:
    """A plan lowered for one tuple of input shapes (see the module docstring); immutable once built.

    Args:
        stages: the stages to run (`Lowerable.stages_for` the batch size).
        inputs: the plan's input declarations.
        output_labels: the plan's result labels.
        shapes: the input tensors' full shapes ``(*batch_i, *declared)``.
        reduce_label: the label of a sharded plate: its plate products go through the caller's all-reduce.
    """

    def __init__(self, stages: Sequence[Stage], inputs: Sequence[InputSpec], output_labels: str,
                 shapes: Sequence[Tuple[int, ...]], reduce_label: Optional[str] = None) -> None:
        batches = [tuple(s[: len(s) - len(spec.labels)]) for s, spec in zip(shapes, inputs)]
        batch = tuple(torch.broadcast_shapes(*batches))
        nb = len(batch)
        blabels = [get_symbol(BATCH_SYMBOL_BASE + j) for j in range(nb)]
        sizes: Dict[str, int] = {}
        labels: List[str] = []
        program: List[_Instr] = []
        for spec, b, shape in zip(inputs, batches, shapes):
            padded = (1,) * (nb - len(b)) + b
            present = "".join(lab for lab, n in zip(blabels, padded) if n > 1)
            lab = present + spec.labels
            for c, n in zip(lab, [n for n in padded if n > 1] + list(shape[len(b):])):
                sizes[c] = n
            labels.append(lab)
            program.append(_Input(tuple(sizes[c] for c in lab)))
        batch_set = set(blabels)
        full_batch = "".join(c for c, n in zip(blabels, batch) if n > 1)
        checked = 0

        def emit(instr: _Instr, lab: str) -> int:
            program.append(instr)
            labels.append(lab)
            return len(labels) - 1

        def reduce_to(v: int, keep_set: set) -> int:
            lab = labels[v]
            keep = "".join(c for c in lab if c in keep_set)
            if keep == lab:
                return v
            dims = tuple(i for i, c in enumerate(lab) if c not in keep_set)
            big = math.prod(sizes[c] for c in lab) >= SCRATCH_MIN_ELEMENTS
            return emit(_Reduce(v, lab, keep, dims, tuple(sizes[c] for c in keep), big), keep)

        def pair(ia: int, ib: int, kept: set) -> int:
            nonlocal checked
            ia = reduce_to(ia, kept | set(labels[ib]))  # labels summed on one side only: reduced exactly first
            ib = reduce_to(ib, kept | set(labels[ia]))
            la, lb = labels[ia], labels[ib]
            if not any(c in lb and c not in kept for c in la):  # nothing summed: a broadcast sum
                bt = [c for c in la if c in lb]
                ak = [c for c in la if c not in lb]
                bk = [c for c in lb if c not in la]
                shape_a = tuple(sizes[c] for c in bt + ak) + (1,) * len(bk)
                shape_b = tuple(sizes[c] for c in bt) + (1,) * len(ak) + tuple(sizes[c] for c in bk)
                return emit(_Outer(ia, ib, tuple(la.index(c) for c in bt + ak), shape_a,
                                   tuple(lb.index(c) for c in bt + bk), shape_b), "".join(bt + ak + bk))
            layout = lower_pair(la, lb, frozenset(kept), sizes)
            a, b = (ib, ia) if layout.swap else (ia, ib)
            checked += 1
            return emit(_Pair(a, b, layout, checked - 1), layout.labels_out)

        vals = list(range(len(inputs)))  # plan value id -> program index
        for stage in stages:
            srcs = tuple(vals[k] for k in stage.inputs)
            if isinstance(stage, ScanStage):
                dbatch = "".join(c for c in blabels if any(c in labels[v] for v in srcs))
                targets = tuple(dbatch + lab for lab in stage.input_labels)
                lead = tuple(sizes[c] for c in dbatch + stage.batch)
                n, size, rounds = len(stage.chain) - 1, sizes[stage.chain[0]], []
                while n > 1:
                    shape = (n // 2,) + lead + (size, size)
                    rounds.append(lower_call(shape, "ij", shape, "jk", "ik"))
                    n = n // 2 + n % 2
                checked += 1
                vals.append(emit(_Scan(stage, srcs, tuple(labels[v] for v in srcs), targets, checked - 1,
                                       tuple(rounds)),
                                 dbatch + stage.output_labels))
                continue
            if isinstance(stage, ProductStage):
                (v,) = srcs
                lab = labels[v]
                dims = tuple(i for i, c in enumerate(lab) if c not in batch_set and c not in stage.output_labels)
                keep = "".join(c for i, c in enumerate(lab) if i not in dims)
                if reduce_label is not None and reduce_label in lab and reduce_label not in stage.output_labels:
                    full = full_batch + "".join(c for c in keep if c not in batch_set)
                    vals.append(emit(_Product(v, dims, True, keep, full, tuple(sizes[c] for c in full),
                                              stage.scale), full))
                else:
                    vals.append(emit(_Product(v, dims, scale=stage.scale), keep)
                                if dims or stage.scale != 1.0 else v)
                continue
            if stage.slices:
                vals.append(self._sliced(stage, srcs, labels, blabels, sizes, emit))
                continue
            work = list(srcs)
            for step in stage.steps:
                ids = [work[p] for p in sorted(step.positions)]
                for p in sorted(step.positions, reverse=True):
                    work.pop(p)
                kept = set(step.result_labels) | batch_set
                if len(ids) == 1:
                    work.append(reduce_to(ids[0], kept))
                    continue
                value = ids[0]
                for j in range(1, len(ids)):  # more than two operands: folded left to right
                    later = set("".join(labels[i] for i in ids[j + 1:]))
                    value = pair(value, ids[j], kept | later)
                work.append(value)
            (v,) = work
            want = set(stage.output_labels) | (set(labels[v]) & batch_set)
            vals.append(reduce_to(v, want))  # a no-op unless the stage's path left labels to sum
        if vals[-1] != len(labels) - 1:  # the result must be the program's last value
            emit(_Product(vals[-1], ()), labels[vals[-1]])
        self._program = program
        self._labels = labels
        self._n_checked = checked
        self._n_inputs = len(inputs)
        self._target = "".join(c for c in blabels if c in labels[-1]) + output_labels
        self._out_shape = batch + tuple(sizes[c] for c in output_labels)
        self._srcs = [instr.srcs if isinstance(instr, (_Scan, _Sliced)) else tuple(
            getattr(instr, f) for f in ("src", "a", "b") if hasattr(instr, f)) for instr in program]
        # scans, slices and all-reduces: per-step autograd
        self._whole_plan = not any(isinstance(instr, (_Scan, _Sliced)) or (isinstance(instr, _Product) and instr.reduce)
                                   for instr in program)
        self._shapes = [tuple(sizes[c] for c in lab) for lab in labels]
        self._uses = self._last_uses()

    @staticmethod
    def _sliced(stage: EinsumStage, srcs: Tuple[int, ...], labels: List[str], blabels: List[str],
                sizes: Dict[str, int], emit: Callable[[_Instr, str], int]) -> int:
        dbatch = "".join(c for c in blabels if any(c in labels[v] for v in srcs))
        targets = tuple(dbatch + lab for lab in stage.input_labels)
        stage_sizes = dict(stage.sizes)
        slices = tuple((label, chunk, stage_sizes[label]) for label, chunk in stage.slices)
        whole = dataclasses.replace(stage, inputs=tuple(range(len(srcs))), slices=())
        specs = [InputSpec(f"operand {k}", lab, tuple(stage_sizes[c] for c in lab), tuple(lab))
                 for k, lab in enumerate(stage.input_labels)]
        options = [sorted({min(chunk, size - start) for start in range(0, size, chunk)})
                   for _, chunk, size in slices]
        programs = []
        for key in itertools.product(*options):
            chunk_of = {label: n for (label, _, _), n in zip(slices, key)}
            shapes = [tuple(sizes[c] if c in labels[v] else 1 for c in dbatch)
                      + tuple(chunk_of.get(c, stage_sizes[c]) for c in lab) for v, lab in zip(srcs, stage.input_labels)]
            programs.append((key, StepProgram((whole,), specs, stage.output_labels, shapes)))
        return emit(_Sliced(srcs, tuple(labels[v] for v in srcs), targets, slices, dbatch + stage.output_labels,
                            tuple(programs)), dbatch + stage.output_labels)

    def _last_uses(self) -> List[Tuple[int, ...]]:
        """Per instruction, the values it consumes for the last time (freed right after it)."""
        last = {}
        for k, ss in enumerate(self._srcs):
            for src in ss:
                last[src] = k
        return [tuple(src for src in ss if last[src] == k) for k, ss in enumerate(self._srcs)]

    def __call__(self, tensors: Sequence[torch.Tensor], state: Optional[RunState] = None, *,
                 plate_reduce: Optional[PlateReduce] = None) -> torch.Tensor:
        """The plan's value, exact (see the module docstring): ``(*batch, *output)``.

        ``state``: the caller's `RunState` (which steps to run exactly after a trip); ``None``: this
        evaluation decides alone.  ``plate_reduce``: the all-reduce of a program lowered with a
        ``reduce_label``.  With it every step runs exactly from the start: a rerun after a trip would call the
        collective again in this process only, and the others would wait for it forever.
        """
        if plate_reduce is not None:
            return self._evaluate(tensors, 0, plate_reduce=plate_reduce)[0]
        exact_from = state.exact_from(self) if state is not None else None
        if (exact_from is None and self._whole_plan and torch.is_grad_enabled()
                and any(t.requires_grad for t in tensors)):
            value, flags = _PlanFunction.apply(self, *tensors)
            result = self._final(value)
        else:
            start = self._n_checked if exact_from is None else exact_from
            result, st = self._evaluate(tensors, start, plate_reduce=plate_reduce)
            flags = torch.stack(st.flags) if st.flags else None
        if flags is not None:
            bad = ~(flags >= underflow_threshold(result.dtype))  # NaN (a structural zero) counts as tripped
            if bool(bad.any()):  # the one host sync per evaluation
                first = int(bad.nonzero()[0, 0])
                if state is not None:
                    state.tripped(self, first)
                result, _ = self._evaluate(tensors, first, plate_reduce=plate_reduce)
        return result

    def fast(self, tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The program with no host sync and plain differentiable ops, for ``torch.compile``.

        ``(result, flag)``: the smallest flag of any step; below `underflow_threshold`, or NaN, it means: evaluate
        again eagerly (exact).  Structural zeros are exact here and never trip.
        """
        result, st = self._evaluate(tensors, self._n_checked, traced=True)
        flag = torch.stack(st.flags).amin() if st.flags else result.new_full((), math.inf)
        return result, flag.detach()

    def _final(self, value: torch.Tensor) -> torch.Tensor:
        # every batch label reaches the result: the reshape only inserts size-1 dims
        return align(value, self._labels[-1], self._target).reshape(self._out_shape)

    def _evaluate(self, tensors: Sequence[torch.Tensor], exact_from: int, *, saving: bool = False,
                  final: bool = True, traced: bool = False, plate_reduce: Optional[PlateReduce] = None
                  ) -> Tuple[torch.Tensor, _State]:
        """Run the program; checked steps from number ``exact_from`` on take the exact kernels.

        Returns the result (the program's last value, in its own label order, unless ``final``) and the evaluation's
        state.
        """
        st = _State(exact_from, saving=saving, traced=traced, plate_reduce=plate_reduce)
        env: List = [None] * len(self._program)
        for k, (instr, frees) in enumerate(zip(self._program, self._uses)):
            env[k] = instr.run(env, tensors, k, st)
            for src in frees:
                env[src] = None  # free intermediates as soon as they are consumed
        return (self._final(env[-1]) if final else env[-1]), st

    def _backward(self, grad: torch.Tensor, tensors: Sequence[torch.Tensor], needed: Sequence[bool],
                  saved: Dict[int, tuple]) -> List[Optional[torch.Tensor]]:
        """Gradients of the inputs from the gradient of the program's last value (see `_PlanFunction`)."""
        program = self._program
        needs = list(needed) + [False] * (len(program) - len(needed))
        for k in range(len(needed), len(program)):
            needs[k] = any(needs[src] for src in self._srcs[k])
        grads: List[Optional[torch.Tensor]] = [None] * len(program)
        grads[-1] = grad

        def add(src: int, g: torch.Tensor) -> None:
            old = grads[src]
            grads[src] = g if old is None else old + g

        for k in range(len(program) - 1, len(needed) - 1, -1):
            g, instr = grads[k], program[k]
            grads[k] = None
            if g is None or not needs[k]:
                continue
            if isinstance(instr, _Pair):
                *blocks, shape_a, shape_b = saved[k]
                # no mask for T <= tiny: this backward only runs when every T passed the underflow check
                ga, gb = pair_backward(instr.layout, g, tuple(blocks), shape_a, shape_b,
                                       (needs[instr.a], needs[instr.b]), masked=False)
                if ga is not None:
                    add(instr.a, ga)
                if gb is not None:
                    add(instr.b, gb)
            elif isinstance(instr, _Reduce):  # softmax over the summed labels; 0 where all terms are -inf
                e, total = saved[k]  # exp(x - shift) and its sum over the summed labels (clamped >= 0.5)
                add(instr.src, e * (g.reshape(total.shape) / total))
            elif isinstance(instr, _Product):
                shape = self._shapes[instr.src]
                keep_shape = [1 if d in instr.dims else n for d, n in enumerate(shape)]
                add(instr.src, (g if instr.scale == 1.0 else g * instr.scale).reshape(keep_shape).expand(shape))
            elif isinstance(instr, _Outer):  # a broadcast sum: sum the gradient back to each side
                for src, perm, shape in ((instr.a, instr.perm_a, instr.shape_a), (instr.b, instr.perm_b,
                                                                                 instr.shape_b)):
                    if needs[src]:
                        gs = g.sum_to_size(shape).reshape([self._shapes[src][d] for d in perm])
                        add(src, gs.permute(_inverse(perm)))
        out: List[Optional[torch.Tensor]] = []
        # No two returned gradients may share storage, nor share it with the incoming gradient: autograd
        # adopts a returned tensor as a leaf's ``.grad`` and accumulates the next backward into it in place,
        # so two leaves holding views of one buffer would each count the other's gradient (a plate sum or a
        # broadcast sum hands the same ``g`` to both its operands).
        seen = {grad.untyped_storage().data_ptr()}
        for k, (t, need) in enumerate(zip(tensors, needed)):
            g = grads[k]
            if not need:
                out.append(None)
                continue
            if g is None:
                g = torch.zeros_like(t)
            g = g if g.shape == t.shape else g.reshape(t.shape)
            ptr = g.untyped_storage().data_ptr()
            if ptr in seen:
                g = g.clone(memory_format=torch.contiguous_format)
                ptr = g.untyped_storage().data_ptr()
            seen.add(ptr)
            out.append(g)
        return out


class _PlanFunction(torch.autograd.Function):
    """A whole program under autograd.

    Forward without autograd, saving each step's blocks; backward walks the steps in reverse with each step's rule,
    computing only gradients that reach an input that requires one. A second derivative reruns the exact differentiable
    kernels instead.
    """

    @staticmethod
    def forward(ctx, program, *tensors):  # type: ignore[override]
        value, st = program._evaluate(tensors, program._n_checked, saving=True, final=False)
        ctx.program, ctx.saved = program, st.saved
        ctx.save_for_backward(*tensors)
        flags = torch.stack(st.flags) if st.flags else value.new_full((1,), math.inf)
        ctx.mark_non_differentiable(flags)
        return value, flags

    @staticmethod
    def backward(ctx, grad, _flags_grad):  # type: ignore[override]
        program: StepProgram = ctx.program
        tensors = ctx.saved_tensors
        needed = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # double backward: the exact kernels under autograd
            with torch.enable_grad():
                value, _ = program._evaluate(tensors, 0, final=False)
                wrt = [t for t, need in zip(tensors, needed) if need]
                grads = iter(torch.autograd.grad(value, wrt, grad, create_graph=True, allow_unused=True))
            return (None, *(next(grads) if need else None for need in needed))
        return (None, *program._backward(grad, tensors, needed, ctx.saved))

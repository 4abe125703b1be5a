"""The eager evaluator's step programs: a plan lowered once per input shapes.

`tmcgraph.Plan` evaluates through a `StepProgram` built on first use for
the input shapes at hand (cached per plan).  Lowering does, once, everything that
does not depend on values:

* every data-batch dim becomes a label (size-1 batch dims are dropped), so a value is
  a tensor with one labelled dim per label and nothing else;
* every pairwise step is classified into its batch, kept-left, kept-right and summed
  labels, and lowered to one ``bmm`` of a ``(batch, left, summed)`` by a
  ``(batch, summed, right)`` block, with the permutations, shapes and reduction dims
  precomputed; the shift-and-``exp`` of each operand writes straight into the block
  layout (one pass, no einsum permute copies);
* each value keeps the label order its producer wrote (``batch + left + right``); its
  consumer's shift pass reads it in whatever order it needs, so no copy is made to
  restore a declared order;
* the underflow check of the fast path (appendix E of Aitchison, NeurIPS 2019: the
  shifted sum of an entry can fall below ``sqrt(tiny)`` when the maxima of the two
  operands sit at far-apart positions) is one reduction per step whose results are
  checked together, once per evaluation.  When it trips, the evaluation is rerun with
  the exact, repairing kernels of `tmcgraph._kernels` from the first affected step
  on (and, for a caller that passes a `RunState`, those steps stay exact for its
  next few evaluations), so results are exact;
  A slice that is ``-inf`` throughout (a structural zero) trips it too;
* with autograd, the whole program is one `torch.autograd.Function`
  (`_PlanFunction`): its forward saves each step's exponential blocks, its backward
  walks the steps in reverse (pairs: ``dR/da = EA * (g / T) @ EB^T``; reductions: the softmax;
  plate sums: broadcast).  Programs with a scan stage, and the steps that run exactly after a
  trip, use one Function per pairwise step (`_PairFunction`) and autograd instead.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from opt_einsum import get_symbol

from ._kernels import _plain_pair, _scratch, align, log_contract_pair, log_reduce, underflow_threshold
from ._runners import run_scan
from .stages import InputSpec, ProductStage, ScanStage, Stage

__all__ = ["RunState", "StepProgram", "lowerable"]

_BATCH_SYMBOL_BASE = 300_000  # labels of data-batch dims (the compiler's labels are far below)
#: no-grad steps write the exponentials of operands at least this large (32 MB in float32) into reused
#: scratch buffers, decided once per step when lowering: fresh memory of that size page-faults when the
#: allocator has returned it to the system.  Measured (benchmarks/kernels_ab.py): 1.40-1.52x forward on
#: appendix H's 64^4 factors; on the 4.1M-element factor of the global+local graph the difference was
#: noise, in either direction (docs/performance.md).
_SCRATCH_MIN_ELEMENTS = 1 << 23
#: after an evaluation tripped the underflow check, this many evaluations run the affected steps exactly
_EXACT_STICKY = 16


def lowerable(stages: Sequence[Stage]) -> bool:
    """Whether `StepProgram` can run these stages (unsliced, at most pairwise steps)."""
    return all(
        isinstance(s, (ProductStage, ScanStage)) or (not s.slices and all(len(st.positions) <= 2 for st in s.steps))
        for s in stages
    )


@dataclass(frozen=True)
class _Input:
    """Drop size-1 batch dims: ``x.reshape(shape)``."""

    shape: Tuple[int, ...]

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: "_State") -> torch.Tensor:
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

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: "_State") -> torch.Tensor:
        x = env[self.src]
        if st.grad and x.requires_grad and st.saved is None:  # exact kernels under autograd (sticky mode)
            return log_reduce(x, self.labels, self.keep)
        raw = x.amax(dim=self.dims, keepdim=True)
        shift = raw.nan_to_num(neginf=0.0)  # a whole slice -inf: exp(-inf - 0) = 0
        buf = _scratch(0, x, shift) if self.scratch and st.saved is None else None
        e = (x - shift if buf is None else torch.sub(x, shift, out=buf)).exp_()
        # total >= 1 (the max term is exp(0)) unless every term is -inf (total 0): the clamp keeps log finite
        # there and the raw -inf max restores the value
        total = e.sum(dim=self.dims, keepdim=True).clamp_min_(0.5)
        if st.saved is not None:
            st.saved[k] = (e, total)
        return torch.log(total).add_(raw).view(self.shape)


@dataclass(frozen=True)
class _Product:
    """Plate product: plain sum over ``dims`` of value ``src``."""

    src: int
    dims: Tuple[int, ...]

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: "_State") -> torch.Tensor:
        x = env[self.src]
        return x.sum(dim=self.dims) if self.dims else x


@dataclass(frozen=True)
class _Outer:
    """No summed label shared: ``a.permute(perm_a).reshape(shape_a) + b.permute(perm_b).reshape(shape_b)``."""

    a: int
    b: int
    perm_a: Tuple[int, ...]
    shape_a: Tuple[int, ...]
    perm_b: Tuple[int, ...]
    shape_b: Tuple[int, ...]

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: "_State") -> torch.Tensor:
        return env[self.a].permute(self.perm_a).reshape(self.shape_a) + env[self.b].permute(self.perm_b).reshape(
            self.shape_b)


@dataclass(frozen=True)
class _Pair:
    """A pairwise step lowered to ``bmm`` (see the module docstring).

    ``a`` is read as ``a.permute(perm_a)`` (``()``: as it is) with shape ``(*bt, *ak, *s)`` and
    viewed as ``block_a = (|bt|, |ak|, |s|)``; ``b`` as ``(*bt, *s, *bk)`` -> ``(|bt|, |s|, |bk|)``
    (2-D blocks and ``mm`` when ``bt`` is empty).  The result has labels ``labels_out = bt + ak + bk``
    and shape ``shape_out``.
    """

    a: int
    b: int
    la: str
    lb: str
    labels_out: str
    perm_a: Tuple[int, ...]
    perm_b: Tuple[int, ...]
    sum_dims_a: Tuple[int, ...]
    sum_dims_b: Tuple[int, ...]
    block_a: Tuple[int, ...]
    block_b: Tuple[int, ...]
    shift_a: Tuple[int, ...]
    shift_b: Tuple[int, ...]
    shape_out: Tuple[int, ...]
    scratch_a: bool
    scratch_b: bool
    index: int  # this pair's position among the program's pairs

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: "_State") -> torch.Tensor:
        a, b = env[self.a], env[self.b]
        if self.index >= st.exact_from:
            return log_contract_pair(a, self.la, b, self.lb, self.labels_out)
        if st.saved is not None:  # inside the whole-plan Function: keep the blocks for its backward
            value, flag, saved = _pair_forward(self, a, b, keep=True, scratch=False)
            assert saved is not None
            st.saved[k] = saved + (a.shape, b.shape)
        elif st.grad and (a.requires_grad or b.requires_grad):
            value, flag = _PairFunction.apply(a, b, self)
        else:
            value, flag, _ = _pair_forward(self, a, b, keep=False, scratch=True)
        st.flags.append(flag)
        return value


class _State:
    """One evaluation's mode and collected underflow flags."""

    __slots__ = ("grad", "exact_from", "flags", "saved")

    def __init__(self, exact_from: int, saving: bool = False) -> None:
        self.grad = torch.is_grad_enabled()
        self.exact_from = exact_from
        self.flags: List[torch.Tensor] = []
        self.saved: Optional[Dict[int, tuple]] = {} if saving else None


@dataclass(frozen=True)
class _Scan:
    """A scan stage (`tmcgraph._runners.run_scan`, exact kernels) on inputs ``srcs`` laid out as ``targets``
    (the data-batch labels first)."""

    stage: ScanStage
    srcs: Tuple[int, ...]
    labels: Tuple[str, ...]
    targets: Tuple[str, ...]

    def run(self, env: List, tensors: Sequence[torch.Tensor], k: int, st: "_State") -> torch.Tensor:
        operands = [align(env[src], lab, target) for src, lab, target in zip(self.srcs, self.labels, self.targets)]
        return run_scan(self.stage, operands)


_Instr = Union[_Input, _Reduce, _Product, _Outer, _Pair, _Scan]


def _copies(la: str, lb: str, kept: set, sizes: Dict[str, int]) -> int:
    """Elements of the operands that must be permuted when ``la`` is the left operand of a bmm."""
    bt = [c for c in la if c in lb and c in kept]
    s = [c for c in la if c in lb and c not in kept]
    left = [c for c in la if c not in lb]
    right = [c for c in lb if c not in la]
    cost = 0
    if _perm(la, bt + left + s):
        cost += math.prod(sizes[c] for c in la)
    if _perm(lb, bt + s + right):
        cost += math.prod(sizes[c] for c in lb)
    return cost


def _perm(labels: str, order: Sequence[str]) -> Tuple[int, ...]:
    """The permutation taking ``labels`` to ``order``; ``()`` for the identity."""
    perm = tuple(labels.index(c) for c in order)
    return () if perm == tuple(range(len(perm))) else perm


def _inverse(perm: Sequence[int]) -> Tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _exponentials(x: torch.Tensor, perm: Tuple[int, ...], sum_dims: Tuple[int, ...], block: Tuple[int, ...],
                  block_dim: int, shift: Tuple[int, ...], slot: int, scratch: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(exp(x_p - max_p), max_p)`` of ``x_p = x.permute(perm)`` as a contiguous ``block`` (the max
    summed over ``sum_dims`` of ``x_p``, i.e. ``block_dim`` of the block, shaped ``shift``)."""
    # no nan_to_num: where a whole slice is -inf (max -inf) the exponentials are NaN, the step's
    # flag is NaN and the evaluation reruns those steps exactly (structural zeros are rare)
    if not perm and x.is_contiguous():
        x3 = x.view(block)
        raw = x3.amax(dim=block_dim, keepdim=True)
        buf = _scratch(slot, x3, raw) if scratch else None
        return (torch.sub(x3, raw) if buf is None else torch.sub(x3, raw, out=buf)).exp_(), raw
    xp = x.permute(perm) if perm else x
    raw = xp.amax(dim=sum_dims, keepdim=True)
    buf = _scratch(slot, xp, raw) if scratch else None
    if buf is None:
        buf = torch.empty(xp.shape, dtype=xp.dtype, device=xp.device)
    return torch.sub(xp, raw, out=buf).exp_().view(block), raw.view(shift)


def _pair_forward(p: _Pair, a: torch.Tensor, b: torch.Tensor, *, keep: bool, scratch: bool
                  ) -> Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
    """``(result, smallest shifted sum, saved)``: the fast path with no host sync; ``saved`` when ``keep``."""
    ea3, raw_a = _exponentials(a, p.perm_a, p.sum_dims_a, p.block_a, -1, p.shift_a, 0, scratch and p.scratch_a)
    eb3, raw_b = _exponentials(b, p.perm_b, p.sum_dims_b, p.block_b, -2, p.shift_b, 1, scratch and p.scratch_b)
    total = torch.bmm(ea3, eb3) if len(p.block_a) == 3 else torch.mm(ea3, eb3)
    flag = total.amin()
    tiny = torch.finfo(total.dtype).tiny
    result = total.clamp_min(tiny) if keep else total.clamp_min_(tiny)
    result = result.log_().add_(raw_a).add_(raw_b).view(p.shape_out)
    return result, flag, ((ea3, eb3, total) if keep else None)


def _grad_block(x: torch.Tensor, y: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """``(x @ y) * mine``; an outer product (inner size 1) as a broadcast product, which BLAS does slowly."""
    if x.shape[-1] == 1:
        return torch.mul(x, y).mul_(mine)
    return torch.matmul(x, y).mul_(mine)


class _PairFunction(torch.autograd.Function):
    """One lowered pairwise step under autograd; backward ``dA = EA * (g / T) @ EB^T`` from saved blocks.

    Entries with ``T <= tiny`` get zero weight (as through the clamp of the exact path).
    A second derivative recomputes the exact, differentiable path instead."""

    @staticmethod
    def forward(ctx, a, b, p):  # type: ignore[override]
        result, flag, saved = _pair_forward(p, a, b, keep=True, scratch=False)
        assert saved is not None
        ctx.p = p
        ctx.save_for_backward(a, b, *saved)
        ctx.mark_non_differentiable(flag)
        return result, flag

    @staticmethod
    def backward(ctx, grad, _flag_grad):  # type: ignore[override]
        a, b, ea3, eb3, total = ctx.saved_tensors
        p: _Pair = ctx.p
        needed = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # double backward: the exact differentiable path
            with torch.enable_grad():
                result = _plain_pair(a, p.la, b, p.lb, p.labels_out)  # saved inputs carry their graphs
                wrt = [x for x, need in zip((a, b), needed) if need]
                grads = iter(torch.autograd.grad(result, wrt, grad, create_graph=True, allow_unused=True))
            ga, gb = (next(grads) if need else None for need in needed)
            return ga, gb, None
        weight = grad.reshape(total.shape) / total
        weight.masked_fill_(total <= torch.finfo(total.dtype).tiny, 0.0)
        ga = gb = None
        if needed[0]:
            ga3 = _grad_block(weight, eb3.transpose(-1, -2), ea3)
            ga = ga3.view(a.shape) if not p.perm_a else ga3.view([a.shape[d] for d in p.perm_a]).permute(
                _inverse(p.perm_a))
        if needed[1]:
            gb3 = _grad_block(ea3.transpose(-1, -2), weight, eb3)
            gb = gb3.view(b.shape) if not p.perm_b else gb3.view([b.shape[d] for d in p.perm_b]).permute(
                _inverse(p.perm_b))
        return ga, gb, None


class _PlanFunction(torch.autograd.Function):
    """A whole program under autograd: forward without autograd, saving each step's blocks; backward
    walks the steps in reverse with each step's rule (``dA = EA * (g / T) @ EB^T`` for pairs, the
    softmax for reductions, broadcast for plate sums), computing only gradients that reach an input
    that requires one.  A second derivative reruns the exact differentiable kernels instead."""

    @staticmethod
    def forward(ctx, program, *tensors):  # type: ignore[override]
        value, st = program._evaluate(tensors, program._n_pairs, saving=True, final=False)
        ctx.program, ctx.saved = program, st.saved
        ctx.save_for_backward(*tensors)
        flags = torch.stack(st.flags) if st.flags else value.new_full((1,), math.inf)
        ctx.mark_non_differentiable(flags)
        return value, flags

    @staticmethod
    def backward(ctx, grad, _flags_grad):  # type: ignore[override]
        program: "StepProgram" = ctx.program
        tensors = ctx.saved_tensors
        needed = ctx.needs_input_grad[1:]
        if torch.is_grad_enabled():  # double backward: the exact kernels under autograd
            with torch.enable_grad():
                value, _ = program._evaluate(tensors, 0, final=False)
                wrt = [t for t, need in zip(tensors, needed) if need]
                grads = iter(torch.autograd.grad(value, wrt, grad, create_graph=True, allow_unused=True))
            return (None, *(next(grads) if need else None for need in needed))
        return (None, *program._backward(grad, tensors, needed, ctx.saved))


class RunState:
    """The eager evaluator's adaptive state, owned by the caller (an estimator holds one), not by a plan.

    After an evaluation of a step program tripped the underflow check, the next evaluations of that program
    by the same caller (``_EXACT_STICKY`` of them) run the affected steps exactly from the start, which saves
    the fast pass that would trip again.  Plans and their programs are shared (the compiler caches plans by
    structure), so this state lives with the caller: which kernels run never depends on another model's
    evaluations.  The results are exact either way; only the work differs.
    """

    def __init__(self) -> None:
        self._sticky: "weakref.WeakKeyDictionary[StepProgram, List[int]]" = weakref.WeakKeyDictionary()

    def exact_from(self, program: "StepProgram") -> Optional[int]:
        """The first pair ``program`` runs exactly in this evaluation (``None``: the fast path); counts it."""
        entry = self._sticky.get(program)
        if entry is None or entry[1] <= 0:
            return None
        entry[1] -= 1
        return entry[0]

    def tripped(self, program: "StepProgram", first: int) -> None:
        """``program`` tripped at pair ``first``: run from there exactly for the next evaluations."""
        self._sticky[program] = [first, _EXACT_STICKY]

    def left(self, program: "StepProgram") -> int:
        """How many more evaluations of ``program`` start exactly."""
        entry = self._sticky.get(program)
        return 0 if entry is None else max(entry[1], 0)


class StepProgram:
    """A plan's stages lowered for one tuple of input shapes (see the module docstring); immutable once built.

    Args:
        stages: the plan's stages (`lowerable`).
        inputs: the plan's input declarations.
        output_labels: the plan's result labels.
        shapes: the input tensors' full shapes ``(*batch_i, *declared)``.
    """

    def __init__(self, stages: Sequence[Stage], inputs: Sequence[InputSpec], output_labels: str,
                 shapes: Sequence[Tuple[int, ...]]) -> None:
        batches = [tuple(s[: len(s) - len(spec.labels)]) for s, spec in zip(shapes, inputs)]
        batch = tuple(torch.broadcast_shapes(*batches))
        nb = len(batch)
        blabels = [get_symbol(_BATCH_SYMBOL_BASE + j) for j in range(nb)]
        sizes: Dict[str, int] = {}
        labels: List[str] = []
        program: List[_Instr] = []
        for spec, b in zip(inputs, batches):
            padded = (1,) * (nb - len(b)) + b
            present = "".join(lab for lab, n in zip(blabels, padded) if n > 1)
            lab = present + spec.labels
            for c, n in zip(lab, [n for n in padded if n > 1] + list(spec.shape)):
                sizes[c] = n
            labels.append(lab)
            program.append(_Input(tuple(sizes[c] for c in lab)))
        self._n_inputs = len(inputs)
        batch_set = set(blabels)
        pairs = 0

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
            big = math.prod(sizes[c] for c in lab) >= _SCRATCH_MIN_ELEMENTS
            return emit(_Reduce(v, lab, keep, dims, tuple(sizes[c] for c in keep), big), keep)

        vals = list(range(len(inputs)))  # plan value id -> program index
        for stage in stages:
            if isinstance(stage, ScanStage):
                srcs = tuple(vals[k] for k in stage.inputs)
                dbatch = "".join(c for c in blabels if any(c in labels[v] for v in srcs))
                targets = tuple(dbatch + lab for lab in stage.input_labels)
                vals.append(emit(_Scan(stage, srcs, tuple(labels[v] for v in srcs), targets),
                                 dbatch + stage.output_labels))
                continue
            if isinstance(stage, ProductStage):
                v = vals[stage.inputs[0]]
                lab = labels[v]
                dims = tuple(i for i, c in enumerate(lab) if c not in batch_set and c not in stage.output_labels)
                keep = "".join(c for i, c in enumerate(lab) if i not in dims)
                vals.append(emit(_Product(v, dims), keep) if dims else v)
                continue
            work = [vals[k] for k in stage.inputs]
            for step in stage.steps:
                ids = [work[p] for p in sorted(step.positions)]
                for p in sorted(step.positions, reverse=True):
                    work.pop(p)
                kept = set(step.result_labels) | batch_set
                if len(ids) == 1:
                    work.append(reduce_to(ids[0], kept))
                    continue
                ia, ib = ids
                # labels summed on one side only: reduced exactly first
                ia = reduce_to(ia, kept | set(labels[ib]))
                ib = reduce_to(ib, kept | set(labels[ia]))
                if _copies(labels[ib], labels[ia], kept, sizes) < _copies(labels[ia], labels[ib], kept, sizes):
                    ia, ib = ib, ia  # the roles that read more operands in place
                la, lb = labels[ia], labels[ib]
                bt = [c for c in la if c in lb and c in kept]
                ak = [c for c in la if c not in lb]
                bk = [c for c in lb if c not in la]
                s = [c for c in la if c in lb and c not in kept]
                out = "".join(bt + ak + bk)
                size = lambda cs: math.prod(sizes[c] for c in cs)  # noqa: E731
                if not s:
                    perm_a = tuple(la.index(c) for c in bt + ak)
                    perm_b = tuple(lb.index(c) for c in bt + bk)
                    shape_a = tuple(sizes[c] for c in bt + ak) + (1,) * len(bk)
                    shape_b = tuple(sizes[c] for c in bt) + (1,) * len(ak) + tuple(sizes[c] for c in bk)
                    work.append(emit(_Outer(ia, ib, perm_a, shape_a, perm_b, shape_b), out))
                    continue
                nbt, nak = len(bt), len(ak)
                lead = (size(bt),) if bt else ()  # 2-D blocks and mm when nothing is batched
                pair = _Pair(
                    a=ia, b=ib, la=la, lb=lb, labels_out=out,
                    perm_a=_perm(la, bt + ak + s),
                    perm_b=_perm(lb, bt + s + bk),
                    sum_dims_a=tuple(range(nbt + nak, nbt + nak + len(s))),
                    sum_dims_b=tuple(range(nbt, nbt + len(s))),
                    block_a=lead + (size(ak), size(s)),
                    block_b=lead + (size(s), size(bk)),
                    shift_a=lead + (size(ak), 1),
                    shift_b=lead + (1, size(bk)),
                    shape_out=tuple(sizes[c] for c in out),
                    scratch_a=size(la) >= _SCRATCH_MIN_ELEMENTS,
                    scratch_b=size(lb) >= _SCRATCH_MIN_ELEMENTS,
                    index=pairs,
                )
                pairs += 1
                work.append(emit(pair, out))
            (v,) = work
            want = set(stage.output_labels) | (set(labels[v]) & batch_set)
            vals.append(reduce_to(v, want))  # a no-op unless the stage's path left labels to sum
        if vals[-1] != len(labels) - 1:  # the result must be the program's last value
            emit(_Product(vals[-1], ()), labels[vals[-1]])
        self._program = program
        self._labels = labels
        self._n_pairs = pairs
        final = labels[-1]
        self._target = "".join(c for c in blabels if c in final) + output_labels
        self._batch = batch
        self._out_shape = batch + tuple(sizes[c] for c in output_labels)
        self._srcs = [instr.srcs if isinstance(instr, _Scan) else tuple(
            getattr(instr, f) for f in ("src", "a", "b") if hasattr(instr, f)) for instr in program]
        self._whole_plan = not any(isinstance(instr, _Scan) for instr in program)  # scans: per-step autograd
        self._shapes = [tuple(sizes[c] for c in lab) for lab in labels]
        self._uses = self._last_uses()

    def _last_uses(self) -> List[Tuple[int, ...]]:
        """Per instruction, the values it consumes for the last time (freed right after it)."""
        srcs = self._srcs
        last = {}
        for k, ss in enumerate(srcs):
            for src in ss:
                last[src] = k
        return [tuple(src for src in ss if last[src] == k) for k, ss in enumerate(srcs)]

    def __call__(self, tensors: Sequence[torch.Tensor], state: Optional["RunState"] = None) -> torch.Tensor:
        """The plan's value, exact (see the module docstring); ``(*batch, *output)``.

        ``state``: the caller's `RunState` (which steps to run exactly after a trip); ``None``: this
        evaluation decides alone."""
        exact_from = state.exact_from(self) if state is not None else None
        if (exact_from is None and self._whole_plan and torch.is_grad_enabled()
                and any(t.requires_grad for t in tensors)):
            value, flags = _PlanFunction.apply(self, *tensors)
            result = self._final(value)
        else:
            result, st = self._evaluate(tensors, self._n_pairs if exact_from is None else exact_from)
            flags = torch.stack(st.flags) if st.flags else None
        if flags is not None:
            # NaN (a structural zero, see _exponentials) counts as tripped
            bad = ~(flags >= underflow_threshold(result.dtype))
            if bool(bad.any()):  # the one host sync per evaluation
                first = int(bad.nonzero()[0, 0])
                if state is not None:
                    state.tripped(self, first)
                result, _ = self._evaluate(tensors, first)
        return result

    def _final(self, value: torch.Tensor) -> torch.Tensor:
        # every batch label reaches the result: the reshape only inserts size-1 dims
        return align(value, self._labels[-1], self._target).reshape(self._out_shape)

    def _evaluate(self, tensors: Sequence[torch.Tensor], exact_from: int, *, saving: bool = False,
                  final: bool = True) -> Tuple[torch.Tensor, "_State"]:
        """Run the program; pairs from number ``exact_from`` on take the exact kernels.  Returns the result
        (the program's last value, in its own label order, unless ``final``) and the evaluation's state."""
        st = _State(exact_from, saving)
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
                ea3, eb3, total, shape_a, shape_b = saved[k]
                # no mask for T <= tiny: this backward only runs when every T passed the underflow check
                weight = g.reshape(total.shape) / total
                if needs[instr.a]:
                    ga = _grad_block(weight, eb3.transpose(-1, -2), ea3)
                    add(instr.a, ga.view(shape_a) if not instr.perm_a else ga.view(
                        [shape_a[d] for d in instr.perm_a]).permute(_inverse(instr.perm_a)))
                if needs[instr.b]:
                    gb = _grad_block(ea3.transpose(-1, -2), weight, eb3)
                    add(instr.b, gb.view(shape_b) if not instr.perm_b else gb.view(
                        [shape_b[d] for d in instr.perm_b]).permute(_inverse(instr.perm_b)))
            elif isinstance(instr, _Reduce):  # softmax over the summed labels; 0 where all terms are -inf
                e, total = saved[k]  # exp(x - shift) and its sum over the summed labels (clamped >= 0.5)
                add(instr.src, e * (g.reshape(total.shape) / total))
            elif isinstance(instr, _Product):
                shape = self._shapes[instr.src]
                keep_shape = [1 if d in instr.dims else n for d, n in enumerate(shape)]
                add(instr.src, g.reshape(keep_shape).expand(shape))
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

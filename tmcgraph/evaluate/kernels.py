"""Log-semiring tensor kernels: the one place where tensors meet arithmetic.

Every tensor handled here has leading *batch* dims (broadcast like torch) followed by *labelled*
dims, one per character of a label string.  The kernels are

* `log_reduce`: ``log(sum(exp(x)))`` over some labelled dims (stable, exact);
* the **pairwise step** ``log(einsum(exp(a), exp(b)))``, lowered once per labels and sizes to a
  `PairLayout`: one ``bmm`` of a ``(batch, left, summed)`` by a ``(batch, summed, right)`` block.
  `pair_forward` is its fast path (appendix E of Aitchison, NeurIPS 2019: shift each operand by its
  max over the summed labels, exponentiate, multiply, log, restore the shifts) with no host sync: it
  returns the smallest shifted sum as a flag, and an entry whose sum fell below `underflow_threshold`
  may have lost precision.  `exact_pair_forward` checks that flag and recomputes the flagged
  entries exactly (`_repair`).  `pair_backward` is the one backward of both,
  ``dR/da = EA * (g / T) @ EB^T``, and `PairFunction` wraps them for autograd;
  `log_contract_pair` is the exact step on labelled tensors;

``-inf`` (zero probability) is a first-class value: results are ``-inf`` exactly where every term is
``-inf`` and gradients stay finite (zero for terms of zero weight); no kernel produces NaN from
finite or ``-inf`` input.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import torch
from opt_einsum import get_symbol
from typing_extensions import override

__all__ = [
    "PairFunction", "PairLayout", "align", "exact_pair_forward", "log_contract_pair", "lower_call",
    "log_reduce", "lower_pair", "pair_backward", "pair_forward", "release_scratch",
    "underflow_threshold",
]

#: labels of data-batch dims (the compiler's labels are far below)
BATCH_SYMBOL_BASE = 300_000
_REPAIR_BLOCK_ELEMENTS = 1 << 22

#: operands at least this large (32 MB in float32) are shifted and exponentiated into reused scratch
#: memory on the no-grad path: fresh memory of that size page-faults when the allocator has returned it to
#: the system, which costs more than the shift itself.  Smaller blocks come back from the allocator's free
#: lists (glibc serves blocks below its mmap threshold, at most 32 MiB, from the heap).  Measured
#: (benchmarks/kernels_ab.py): 1.40-1.52x forward on appendix H's 64^4 factors (docs/performance.md).
SCRATCH_MIN_ELEMENTS = 1 << 23
_scratch_pool = threading.local()


def _scratch(slot: int, x: torch.Tensor) -> Optional[torch.Tensor]:
    """A reusable buffer shaped like ``x``, or ``None`` (a fresh tensor) for small operands.

    ``slot`` is 0 or 1: the two operands of a step.  The buffers live until `release_scratch`.
    """
    numel = x.numel()
    if numel < SCRATCH_MIN_ELEMENTS:
        return None
    pool = getattr(_scratch_pool, "buffers", None)
    if pool is None:
        pool = _scratch_pool.buffers = {}
    key = (slot, x.dtype, x.device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=x.dtype, device=x.device)
    return buf[:numel].view(x.shape)


def release_scratch() -> None:
    """Free the scratch buffers of the calling thread (they are reallocated when next needed)."""
    _scratch_pool.buffers = {}


def underflow_threshold(dtype: torch.dtype) -> float:
    """The one underflow threshold, ``sqrt(tiny)`` of ``dtype`` (appendix E of Aitchison, NeurIPS 2019).

    The shifted sum ``C = sum_j exp(a_ij - a_i) exp(b_jk - b_k)`` of an entry is at least its largest term,
    and terms are lost only below the denormal threshold (``2**-126`` in float32), so a sum above
    ``sqrt(tiny)`` (``2**-63``) carries full relative precision; a sum below it may not, and its step is
    redone exactly.  Every evaluator checks against this one value.
    """
    return math.sqrt(torch.finfo(dtype).tiny)


def _labelled_dims(ndim: int, labels: str, subset: Sequence[str]) -> Tuple[int, ...]:
    offset = ndim - len(labels)
    return tuple(offset + labels.index(c) for c in subset)


def log_reduce(x: torch.Tensor, labels: str, keep: str) -> torch.Tensor:
    """``log(sum(exp(x)))`` over the labelled dims not in ``keep``; exact and stable.

    Args:
        x: tensor ``(*batch, *labels)``.
        labels: one character per trailing dim of ``x``.
        keep: labels to keep, in the order wanted for the result.

    Returns:
        tensor ``(*batch, *keep)``.  ``-inf`` where every summed term is ``-inf``, with zero (not NaN)
        gradient there.
    """
    summed = [c for c in labels if c not in keep]
    if summed:
        dims = _labelled_dims(x.dim(), labels, summed)
        raw = x.detach().amax(dim=dims, keepdim=True)
        shift = torch.nan_to_num(raw, nan=0.0, neginf=0.0, posinf=0.0)
        total = torch.exp(x - shift).sum(dim=dims, keepdim=True)
        # total is 0 only where every term is -inf, otherwise >= 1: the clamp makes log's gradient finite
        # there and the raw (-inf) max restores the value.
        x = torch.log(total.clamp_min(0.5)) + raw
        x = x.squeeze(dims) if len(dims) > 0 else x
        labels = "".join(c for c in labels if c in keep)
    return align(x, labels, keep)


def align(x: torch.Tensor, labels: str, target: str) -> torch.Tensor:
    """Permute the labelled dims of ``x`` to ``target`` order.

    Labels of ``target`` that ``x`` lacks get size-1 dims.  A view, no copy.
    """
    if labels == target:
        return x
    nbatch = x.dim() - len(labels)
    present = [c for c in target if c in labels]
    perm = list(range(nbatch)) + [nbatch + labels.index(c) for c in present]
    x = x.permute(perm)
    if len(present) != len(target):
        shape = list(x.shape[:nbatch])
        sizes = dict(zip(present, x.shape[nbatch:]))
        shape += [sizes.get(c, 1) for c in target]
        x = x.reshape(shape)
    return x


# -- the pairwise step ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PairLayout:
    """One pairwise step lowered to a (batched) matrix product; built by `lower_pair`.

    The left operand (labels ``la``) is read as ``a.permute(perm_a)`` (``()``: as it is), shaped
    ``(*bt, *ak, *s)`` and viewed as ``block_a = (|bt|, |ak|, |s|)``; the right one as
    ``(*bt, *s, *bk)`` -> ``(|bt|, |s|, |bk|)`` (2-D blocks and ``mm`` when ``bt`` is empty).  ``bt`` are
    the labels both keep, ``ak`` / ``bk`` those only one has, ``s`` the summed ones.  The result has labels
    ``labels_out = bt + ak + bk`` and shape ``shape_out``; ``swap``: the left operand is the second one
    given to `lower_pair` (the roles that read more operands in place).
    """

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
    swap: bool


def _perm(labels: str, order: Sequence[str]) -> Tuple[int, ...]:
    """The permutation taking ``labels`` to ``order``; ``()`` for the identity."""
    perm = tuple(labels.index(c) for c in order)
    return () if perm == tuple(range(len(perm))) else perm


def _inverse(perm: Sequence[int]) -> Tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _copies(la: str, lb: str, kept: frozenset, sizes: Dict[str, int]) -> int:
    """Elements of the operands that must be permuted when ``la`` is the left operand of the product."""
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


def lower_pair(la: str, lb: str, kept: frozenset, sizes: Dict[str, int]) -> PairLayout:
    """The `PairLayout` of ``log(einsum(exp(a), exp(b)))`` keeping the labels in ``kept``.

    Every label of ``la`` and ``lb`` outside ``kept`` must be in both (sum one-sided labels first with
    `log_reduce`), and at least one must be summed.
    """
    swap = _copies(lb, la, kept, sizes) < _copies(la, lb, kept, sizes)
    if swap:
        la, lb = lb, la
    bt = [c for c in la if c in lb and c in kept]
    ak = [c for c in la if c not in lb]
    bk = [c for c in lb if c not in la]
    s = [c for c in la if c in lb and c not in kept]
    if not s:
        raise ValueError(f"lower_pair: {la!r} and {lb!r} share no summed label")

    def size(cs: Sequence[str]) -> int:
        return math.prod(sizes[c] for c in cs)

    nbt, nak = len(bt), len(ak)
    lead = (size(bt),) if bt else ()
    out = "".join(bt + ak + bk)
    return PairLayout(
        la=la, lb=lb, labels_out=out,
        perm_a=_perm(la, bt + ak + s), perm_b=_perm(lb, bt + s + bk),
        sum_dims_a=tuple(range(nbt + nak, nbt + nak + len(s))), sum_dims_b=tuple(range(nbt, nbt + len(s))),
        block_a=lead + (size(ak), size(s)), block_b=lead + (size(s), size(bk)),
        shift_a=lead + (size(ak), 1), shift_b=lead + (1, size(bk)),
        shape_out=tuple(sizes[c] for c in out),
        scratch_a=size(la) >= SCRATCH_MIN_ELEMENTS, scratch_b=size(lb) >= SCRATCH_MIN_ELEMENTS, swap=swap,
    )


def _exponentials(x: torch.Tensor, perm: Tuple[int, ...], sum_dims: Tuple[int, ...], block: Tuple[int, ...],
                  block_dim: int, shift: Tuple[int, ...], slot: int, scratch: bool, zeros: bool,
                  plain: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The shifted exponentials of an operand as a contiguous block, and the shift.

    Returns ``(exp(x_p - max_p), max_p)`` of ``x_p = x.permute(perm)``: the exponentials as a contiguous ``block``, and
    the max over ``sum_dims`` of ``x_p`` (``block_dim`` of the block), shaped ``shift`` and detached.

    Without ``zeros`` a slice that is ``-inf`` throughout gives NaN exponentials (``-inf - -inf``), so the
    step's flag is NaN and the step is redone exactly (structural zeros are rare, and the fast path saves
    a pass); with ``zeros`` such a slice is shifted by 0 and its sum is 0 (the max, ``-inf``, restores the
    value).  Under autograd (or ``plain``: for torch.compile) the exponentials are fresh tensors from plain
    ops; else they are written into a buffer in block order, which may be reused scratch memory.
    """
    differentiable = plain or (torch.is_grad_enabled() and x.requires_grad)
    if not perm and x.is_contiguous():  # already in block order: reduce one dim of the block view
        x3 = x.view(block)
        raw = x3.detach().amax(dim=block_dim, keepdim=True) if differentiable else x3.amax(dim=block_dim,
                                                                                              keepdim=True)
        sub = raw.nan_to_num(neginf=0.0) if zeros else raw
        if differentiable:
            return (x3 - sub).exp(), raw
        buf = _scratch(slot, x3) if scratch else None
        return (torch.sub(x3, sub) if buf is None else torch.sub(x3, sub, out=buf)).exp_(), raw
    xp = x.permute(perm) if perm else x
    raw = xp.detach().amax(dim=sum_dims, keepdim=True)
    sub = raw.nan_to_num(neginf=0.0) if zeros else raw
    if differentiable:
        return (xp - sub).exp().reshape(block), raw.view(shift)
    buf = _scratch(slot, xp) if scratch else None
    if buf is None:  # written in block order, so the block is a view
        buf = torch.empty(xp.shape, dtype=xp.dtype, device=xp.device)
    return torch.sub(xp, sub, out=buf).exp_().view(block), raw.view(shift)


def _mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.bmm(x, y) if x.dim() == 3 else torch.mm(x, y)


def _blocks(p: PairLayout, a: torch.Tensor, b: torch.Tensor, *, scratch: bool, zeros: bool, plain: bool = False
            ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(EA, EB, T = EA @ EB, max_a, max_b)`` in block layout."""
    ea3, raw_a = _exponentials(a, p.perm_a, p.sum_dims_a, p.block_a, -1, p.shift_a, 0, scratch and p.scratch_a,
                               zeros, plain)
    eb3, raw_b = _exponentials(b, p.perm_b, p.sum_dims_b, p.block_b, -2, p.shift_b, 1, scratch and p.scratch_b,
                               zeros, plain)
    if plain and (ea3.shape[-2] == 1 or eb3.shape[-1] == 1):
        # a matrix-vector product is memory-bound: as a product and a sum, torch.compile fuses it with the
        # shift, exp and log around it instead of calling BLAS for it
        return ea3, eb3, (ea3.unsqueeze(-1) * eb3.unsqueeze(-3)).sum(-2), raw_a, raw_b
    return ea3, eb3, _mm(ea3, eb3), raw_a, raw_b


def _log_total(total: torch.Tensor, raw_a: torch.Tensor, raw_b: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """``log(max(T, tiny)) + max_a + max_b``.

    In ``T`` (``inplace``), in one fresh tensor, or (under autograd) by plain ops.
    """
    tiny = torch.finfo(total.dtype).tiny
    if inplace:
        return total.clamp_min_(tiny).log_().add_(raw_a).add_(raw_b)
    if torch.is_grad_enabled() and total.requires_grad:
        return torch.log(total.clamp_min(tiny)) + raw_a + raw_b
    return total.clamp_min(tiny).log_().add_(raw_a).add_(raw_b)


def pair_forward(p: PairLayout, a: torch.Tensor, b: torch.Tensor, *, keep: bool, scratch: bool,
                 zeros: bool = False, plain: bool = False
                 ) -> Tuple[torch.Tensor, torch.Tensor, Optional[Tuple[torch.Tensor, ...]]]:
    """The fast path, with no host sync: ``(result (shape_out), flag, saved)``.

    ``a`` and ``b`` are the left and right operands of ``p`` (already swapped).  ``flag`` is the smallest
    shifted sum: below `underflow_threshold` (or NaN: a structural zero without ``zeros``) the result may
    have lost precision.  With ``zeros`` structural zeros are exact and excluded from the flag (one more
    pass).  ``saved`` (``keep``): the blocks ``(EA, EB, T)`` for `pair_backward`; without ``keep`` ``T`` is
    overwritten by the result.  ``plain``: plain ops only (for torch.compile).
    """
    ea3, eb3, total, raw_a, raw_b = _blocks(p, a, b, scratch=scratch, zeros=zeros, plain=plain)
    t = total.detach() if total.requires_grad else total
    flag = torch.where(raw_a + raw_b > -math.inf, t, math.inf).amin() if zeros else t.amin()
    result = _log_total(total, raw_a, raw_b, inplace=not keep).view(p.shape_out)
    return result, flag, ((ea3, eb3, total) if keep else None)


def exact_pair_forward(p: PairLayout, a: torch.Tensor, b: torch.Tensor, *, keep: bool
                       ) -> Tuple[torch.Tensor, Optional[Tuple[torch.Tensor, ...]], bool]:
    """The exact step.

    `pair_forward` (structural zeros exact), then the entries whose shifted sum fell below `underflow_threshold`
    recomputed by `_repair` (one host sync).  Returns ``(result, saved, repaired)``; differentiable when run under
    autograd.
    """
    ea3, eb3, total, raw_a, raw_b = _blocks(p, a, b, scratch=not keep, zeros=True)
    thr = underflow_threshold(total.dtype)
    flagged = total < thr if total.numel() and bool(total.amin() < thr) else None
    result = _log_total(total, raw_a, raw_b, inplace=not keep)
    repaired = False
    if flagged is not None:
        flagged &= result > -math.inf  # structural zeros (a slice entirely -inf) are already exact
        index = flagged.reshape(-1).nonzero().squeeze(-1)
        if index.numel():
            result = _repair(p, a, b, result, index)
            repaired = True
    return result.view(p.shape_out), ((ea3, eb3, total) if keep else None), repaired


def _repair(p: PairLayout, a: torch.Tensor, b: torch.Tensor, result: torch.Tensor, index: torch.Tensor
            ) -> torch.Tensor:
    """Recompute ``result.flatten()[index]`` exactly.

    For each flagged entry, gather its row of ``a`` and column of ``b`` over the summed labels and take a stable
    logsumexp, in blocks of bounded memory. Differentiable.
    """
    a3 = (a.permute(p.perm_a) if p.perm_a else a).reshape(p.block_a)
    b3 = (b.permute(p.perm_b) if p.perm_b else b).reshape(p.block_b)
    if a3.dim() == 2:
        a3, b3 = a3.unsqueeze(0), b3.unsqueeze(0)
    rows, width = a3.shape[1], a3.shape[2]
    cols = b3.shape[2]
    batch, rest = index // (rows * cols), index % (rows * cols)
    i, j = rest // cols, rest % cols
    block = max(1, _REPAIR_BLOCK_ELEMENTS // max(1, width))
    values = [log_reduce(a3[batch[k:k + block], i[k:k + block]] + b3[batch[k:k + block], :, j[k:k + block]],
                         "nj", "n") for k in range(0, index.numel(), block)]
    fixed = result.reshape(-1).index_put((index,), torch.cat(values))
    return fixed.reshape(result.shape)


def _grad_block(x: torch.Tensor, y: torch.Tensor, mine: torch.Tensor) -> torch.Tensor:
    """``(x @ y) * mine``; an outer product (inner size 1) as a broadcast product, which BLAS does slowly."""
    if x.shape[-1] == 1:
        return torch.mul(x, y).mul_(mine)
    return torch.matmul(x, y).mul_(mine)


def pair_backward(p: PairLayout, grad: torch.Tensor, saved: Tuple[torch.Tensor, ...], shape_a: Sequence[int],
                  shape_b: Sequence[int], needed: Sequence[bool], *, masked: bool = True
                  ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The one backward of the pairwise step: ``dR/da = EA * (g / T) @ EB^T``, ``dR/db = EB * EA^T @ (g / T)``.

    ``saved``: `pair_forward`'s ``(EA, EB, T)``; ``shape_a``, ``shape_b``: the operands' shapes.  Entries
    with ``T <= tiny`` get zero weight (as through the clamp of the forward); ``masked=False`` skips that pass
    where every ``T`` is known to have passed the underflow check.
    """
    ea3, eb3, total = saved
    weight = grad.reshape(total.shape) / total
    if masked:
        weight.masked_fill_(total <= torch.finfo(total.dtype).tiny, 0.0)
    ga = gb = None
    if needed[0]:
        g3 = _grad_block(weight, eb3.transpose(-1, -2), ea3)
        ga = g3.view(shape_a) if not p.perm_a else g3.view([shape_a[d] for d in p.perm_a]).permute(
            _inverse(p.perm_a))
    if needed[1]:
        g3 = _grad_block(ea3.transpose(-1, -2), weight, eb3)
        gb = g3.view(shape_b) if not p.perm_b else g3.view([shape_b[d] for d in p.perm_b]).permute(
            _inverse(p.perm_b))
    return ga, gb


class PairFunction(torch.autograd.Function):
    """The pairwise step under autograd.

    ``(result, flag)`` of `pair_forward` (``exact=False``: sync-free, the caller checks the flag) or of
    `exact_pair_forward` (``exact=True``; the flag is ``+inf``), with `pair_backward` from the saved blocks. After a
    repair, or for a second derivative, the backward recomputes the exact step under autograd instead (exact, slower).
    """

    @staticmethod
    @override
    def forward(ctx, a, b, p, exact):  # type: ignore[override]
        if exact:
            result, saved, repaired = exact_pair_forward(p, a, b, keep=True)
            flag = torch.full((), math.inf, dtype=result.dtype, device=result.device)
        else:
            result, flag, saved = pair_forward(p, a, b, keep=True, scratch=False)
            repaired = False
        assert saved is not None
        ctx.p, ctx.repaired = p, repaired
        ctx.save_for_backward(a, b, *saved)
        ctx.mark_non_differentiable(flag)
        return result, flag

    @staticmethod
    @override
    def backward(ctx, grad, _flag_grad):  # type: ignore[override]
        a, b, *saved = ctx.saved_tensors
        p: PairLayout = ctx.p
        needed = ctx.needs_input_grad[:2]
        if ctx.repaired or torch.is_grad_enabled():  # the exact step under autograd
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                # with create_graph the saved inputs carry their graph; else fresh leaves
                a_, b_ = ((x if create_graph else x.detach().requires_grad_(need)) for x, need in zip((a, b), needed))
                result = exact_pair_forward(p, a_, b_, keep=True)[0]
                wrt = [x for x, need in zip((a_, b_), needed) if need]
                grads = iter(torch.autograd.grad(result, wrt, grad, create_graph=create_graph, allow_unused=True))
            ga, gb = (next(grads) if need else None for need in needed)
            return ga, gb, None, None
        ga, gb = pair_backward(p, grad, tuple(saved), a.shape, b.shape, needed)
        return ga, gb, None, None


@functools.lru_cache(maxsize=4096)
def lower_call(shape_a: Tuple[int, ...], la: str, shape_b: Tuple[int, ...], lb: str, out: str
                  ) -> Tuple[PairLayout, Tuple[int, ...], Tuple[int, ...], str, str, str, Tuple[int, ...]]:
    """`lower_pair` for labelled tensors with broadcasting batch dims.

    The batch dims become labels (size-1 ones dropped). Returns ``(layout, shape of a, shape of b (both without size-1
    batch dims), their labels, the result's labels with every batch label first, the result's full shape)``.
    """
    na, nb = len(shape_a) - len(la), len(shape_b) - len(lb)
    n = max(na, nb)
    blabels = [get_symbol(BATCH_SYMBOL_BASE + k) for k in range(n)]
    sizes: Dict[str, int] = {}

    def labelled(shape: Tuple[int, ...], labels: str, nbatch: int) -> Tuple[Tuple[int, ...], str]:
        batch = (1,) * (n - nbatch) + shape[:nbatch]
        kept = [(c, s) for c, s in zip(blabels, batch) if s > 1] + list(zip(labels, shape[nbatch:]))
        sizes.update(kept)
        return tuple(s for _, s in kept), "".join(c for c, _ in kept)

    sa, lab_a = labelled(shape_a, la, na)
    sb, lab_b = labelled(shape_b, lb, nb)
    batch = torch.broadcast_shapes(shape_a[:na], shape_b[:nb])
    target = "".join(blabels) + out
    kept = frozenset(target)
    return lower_pair(lab_a, lab_b, kept, sizes), sa, sb, lab_a, lab_b, target, tuple(batch) + tuple(
        sizes[c] for c in out)


def log_contract_pair(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str, *,
                      custom_backward: bool = True) -> torch.Tensor:
    """``log(einsum('...la,...lb->...out', exp(a), exp(b)))`` without over/underflow: the exact step.

    Labels of ``a`` or ``b`` missing from ``out`` are summed.  The fast path shifts each operand by its max
    over its summed labels, so every exponential is <= 1 and the product cannot overflow; entries whose sum
    fell below `underflow_threshold` (maxima of the two operands at different, far-apart positions) are
    recomputed exactly.

    Args:
        a: ``(*batch_a, *la)``.
        la: one label per trailing dim of ``a``.
        b: ``(*batch_b, *lb)``.
        lb: one label per trailing dim of ``b``.
        out: labels of the result, each in ``la`` or ``lb``.
        custom_backward: under autograd, `PairFunction` (`pair_backward` from the saved blocks); ``False``:
            autograd through the plain ops (the reference the custom backward reproduces).

    Returns:
        ``(*broadcast(batch_a, batch_b), *out)``.
    """
    a, la = _drop_broadcast(a, la, b, lb)  # a size-1 label against a larger one: that side lacks it
    b, lb = _drop_broadcast(b, lb, a, la)
    other_a, other_b = set(lb) | set(out), set(la) | set(out)
    if any(c not in other_a for c in la):  # labels summed on one side only: reduced exactly first
        keep = "".join(c for c in la if c in other_a)
        a, la = log_reduce(a, la, keep), keep
    if any(c not in other_b for c in lb):
        keep = "".join(c for c in lb if c in other_b)
        b, lb = log_reduce(b, lb, keep), keep
    if not any(c in lb and c not in out for c in la):  # nothing summed: a broadcast sum
        return _outer(a, la, b, lb, out)
    p, sa, sb, lab_a, lab_b, target, shape = lower_call(tuple(a.shape), la, tuple(b.shape), lb, out)
    x, y = a.reshape(sa), b.reshape(sb)
    if p.swap:
        x, y = y, x
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        value = PairFunction.apply(x, y, p, True)[0] if custom_backward else exact_pair_forward(p, x, y, keep=True)[0]
    else:
        value = exact_pair_forward(p, x, y, keep=False)[0]
    return align(value, p.labels_out, target).reshape(shape)


def _drop_broadcast(x: torch.Tensor, lx: str, y: torch.Tensor, ly: str) -> Tuple[torch.Tensor, str]:
    """``x`` without its size-1 labelled dims that ``y`` has larger (torch.einsum broadcasts them)."""
    nx, ny = x.dim() - len(lx), y.dim() - len(ly)
    drop = [k for k, c in enumerate(lx) if x.shape[nx + k] == 1 and c in ly and y.shape[ny + ly.index(c)] > 1]
    if not drop:
        return x, lx
    return x.squeeze(tuple(nx + k for k in drop)), "".join(c for k, c in enumerate(lx) if k not in drop)


def _outer(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str) -> torch.Tensor:
    ka = "".join(c for c in out if c in la)
    kb = "".join(c for c in out if c in lb)
    return align(align(a, la, ka), ka, out) + align(align(b, lb, kb), kb, out)

"""Log-semiring tensor kernels: the only place where tensors meet arithmetic.

Every tensor handled here has leading *batch* dims (broadcast like torch) followed
by *labelled* dims, one per character of a label string.  The kernels are

* `log_reduce`: ``log(sum(exp(x)))`` over some labelled dims (stable, exact);
* `log_contract_pair`: ``log(einsum(exp(a), exp(b)))`` for two operands, by
  the fast path of appendix E (per-operand max shift, ``exp``, BLAS einsum,
  ``log``) followed by a *repair* of the entries where that fast path lost
  precision (they are recomputed with a gathered, blocked logsumexp);
* `log_product`: the plate product, i.e. a plain sum of log-factors over dims.

``-inf`` (zero probability) is a first-class value: results are ``-inf`` exactly
where every term is ``-inf`` and gradients stay finite (zero for terms of zero
weight); no kernel produces NaN from finite or ``-inf`` input.
"""

from __future__ import annotations

import math
import threading
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["align", "log_contract", "log_contract_pair", "log_product", "log_reduce", "release_scratch"]

# Entries of the fast-path sum C = sum_j exp(a_ij - a_i) exp(b_jk - b_k) below
# this fraction of the dtype's range are recomputed.  C >= max term, and terms
# are lost only below the denormal threshold (2**-126 in float32), so C above
# sqrt(tiny) (2**-63 in float32) carries full relative precision.
_REPAIR_BLOCK_ELEMENTS = 1 << 22


#: operands at least this large are shifted and exponentiated into reused scratch memory.  Smaller
#: blocks come back from the allocator's free lists without page faults (glibc serves blocks below its
#: mmap threshold, at most 32 MiB, from the heap), so there a fresh tensor is as fast.
_SCRATCH_MIN_ELEMENTS = 1 << 23
_scratch_pool = threading.local()


def _scratch(slot: int, x: torch.Tensor, shift: torch.Tensor) -> Optional[torch.Tensor]:
    """A reusable buffer shaped like ``x - shift`` (slot 0 or 1: the two operands of a step; ``shift`` is
    ``x``'s max over some dims with keepdim, so the shape is ``x``'s), or ``None`` (a fresh tensor) for
    small operands.

    Fresh allocations of large tensors page-fault on first touch, which costs more than the shift
    itself; the no-grad path writes into one growing buffer per slot and thread instead.  The buffers
    live until `release_scratch`.
    """
    shape = x.shape  # shift is x's own max with keepdim: x - shift has x's shape
    numel = x.numel()
    if numel < _SCRATCH_MIN_ELEMENTS:
        return None
    pool = getattr(_scratch_pool, "buffers", None)
    if pool is None:
        pool = _scratch_pool.buffers = {}
    key = (slot, x.dtype, x.device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        buf = pool[key] = torch.empty(numel, dtype=x.dtype, device=x.device)
    return buf[:numel].view(shape)


def release_scratch() -> None:
    """Free the scratch buffers of the calling thread (they are reallocated when next needed)."""
    _scratch_pool.buffers = {}


def underflow_threshold(dtype: torch.dtype) -> float:
    """The one underflow threshold of the fast paths, ``sqrt(tiny)`` of ``dtype`` (appendix E of Aitchison,
    NeurIPS 2019): a shifted sum below it may have lost precision, so its step is redone exactly.  Every
    evaluator (eager kernels, step programs, scans, compiled programs and objectives) checks against it."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _labelled_dims(ndim: int, labels: str, subset: Sequence[str]) -> Tuple[int, ...]:
    offset = ndim - len(labels)
    return tuple(offset + labels.index(c) for c in subset)


def _max_shift(x: torch.Tensor, dims: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Max over ``dims`` (keepdim, detached): returns (raw, finite) versions.

    ``raw`` keeps ``-inf`` where a whole slice is ``-inf``; ``finite`` has 0 there so
    that ``x - finite`` never produces NaN.
    """
    raw = x.detach().amax(dim=dims, keepdim=True)
    return raw, torch.nan_to_num(raw, nan=0.0, neginf=0.0, posinf=0.0)


def log_reduce(x: torch.Tensor, labels: str, keep: str) -> torch.Tensor:
    """``log(sum(exp(x)))`` over the labelled dims not in ``keep``; exact and stable.

    Args:
        x: tensor ``(*batch, *labels)``.
        labels: one character per trailing dim of ``x``.
        keep: labels to keep, in the order wanted for the result.

    Returns:
        tensor ``(*batch, *keep)``.  ``-inf`` where every summed term is ``-inf``,
        with zero (not NaN) gradient there.
    """
    summed = [c for c in labels if c not in keep]
    if summed:
        dims = _labelled_dims(x.dim(), labels, summed)
        raw, shift = _max_shift(x, dims)
        total = torch.exp(x - shift).sum(dim=dims, keepdim=True)
        # total is 0 only where every term is -inf, otherwise >= 1: the clamp makes
        # log's gradient finite there and the raw (-inf) max restores the value.
        x = torch.log(total.clamp_min(0.5)) + raw
        x = x.squeeze(dims) if len(dims) > 0 else x
        labels = "".join(c for c in labels if c in keep)
    return align(x, labels, keep)


def align(x: torch.Tensor, labels: str, target: str) -> torch.Tensor:
    """Permute the labelled dims of ``x`` to ``target`` order, inserting size-1 dims
    for labels of ``target`` that ``x`` lacks (a view, no copy)."""
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


def log_product(x: torch.Tensor, labels: str, keep: str) -> torch.Tensor:
    """Product over plate dims in the log domain: sum ``x`` over labels not in ``keep``."""
    summed = [c for c in labels if c not in keep]
    if summed:
        x = x.sum(dim=_labelled_dims(x.dim(), labels, summed))
        labels = "".join(c for c in labels if c in keep)
    return align(x, labels, keep)


def _batch_shape(a: torch.Tensor, la: str, b: torch.Tensor, lb: str) -> torch.Size:
    return torch.broadcast_shapes(a.shape[: a.dim() - len(la)], b.shape[: b.dim() - len(lb)])


def log_contract_pair(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str) -> torch.Tensor:
    """``log(einsum('...la,...lb->...out', exp(a), exp(b)))`` without over/underflow.

    Labels of ``a`` or ``b`` missing from ``out`` are summed.  The fast path shifts
    each operand by its max over its summed labels, so every exponential is <= 1
    and the BLAS sum cannot overflow; entries whose sum fell below ``sqrt(tiny)``
    (maxima of the two operands at different, far-apart positions) are detected
    and recomputed exactly by `_repair`.

    Args:
        a: ``(*batch_a, *la)``; b: ``(*batch_b, *lb)``.
        out: labels of the result, each in ``la`` or ``lb``.

    Returns:
        ``(*broadcast(batch_a, batch_b), *out)``.
    """
    sum_a = [c for c in la if c not in out]
    sum_b = [c for c in lb if c not in out]
    if not sum_a or not sum_b:
        # One side has nothing to sum: reduce the other exactly, then broadcast-add.
        ra = log_reduce(a, la, "".join(c for c in out if c in la))
        rb = log_reduce(b, lb, "".join(c for c in out if c in lb))
        ka = "".join(c for c in out if c in la)
        kb = "".join(c for c in out if c in lb)
        return align(ra, ka, out) + align(rb, kb, out)

    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
        return _LogContractPair.apply(a, b, la, lb, out)
    return _fast_pair(a, la, b, lb, out, inplace=True)[0]


def shifted_sum(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str, *, scratch: bool = False
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fast path's sum, with no host sync: ``(EA, EB, T, s_a, s_b)``.

    ``EA = exp(a - max_a)`` and ``EB = exp(b - max_b)`` (maxima over the summed labels),
    ``T = einsum(EA, EB)`` laid out as ``out``, and the raw maxima ``s_a``, ``s_b`` in ``out``'s
    layout (``-inf`` where a whole slice is ``-inf``): ``log T + s_a + s_b`` is the result
    wherever ``T`` kept its precision.  Both sides must have a summed label.  With ``scratch``
    (no autograd) the exponentials are written into reused buffers.
    """
    sum_a = [c for c in la if c not in out]
    sum_b = [c for c in lb if c not in out]
    raw_a, shift_a = _max_shift(a, _labelled_dims(a.dim(), la, sum_a))
    raw_b, shift_b = _max_shift(b, _labelled_dims(b.dim(), lb, sum_b))
    if scratch:  # no autograd: shift and exponentiate into reused scratch memory (no fresh pages)
        ea = torch.sub(a, shift_a, out=_scratch(0, a, shift_a)).exp_()
        eb = torch.sub(b, shift_b, out=_scratch(1, b, shift_b)).exp_()
    else:  # a - shift is a fresh tensor: exponentiate it in place (autograd-safe)
        ea = (a - shift_a).exp_()
        eb = (b - shift_b).exp_()
    total = _einsum(la, lb, out, ea, eb)
    ka = "".join(c for c in la if c not in sum_a)
    kb = "".join(c for c in lb if c not in sum_b)
    sa = align(_squeeze_labels(raw_a, la, sum_a), ka, out)
    sb = align(_squeeze_labels(raw_b, lb, sum_b), kb, out)
    return ea, eb, total, sa, sb


def _fast_pair(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str, *,
               inplace: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The fast path with repair: ``(result, exp(a - shift_a), exp(b - shift_b), total, repaired)``.

    The exponentials and the shifted sum are returned for `_LogContractPair`'s
    backward; with ``inplace`` the sum is overwritten by the result."""
    ea, eb, total, sa, sb = shifted_sum(a, la, b, lb, out, scratch=inplace)
    thr = underflow_threshold(total.dtype)
    needs_repair = total.numel() > 0 and bool(total.amin() < thr)
    flagged = total < thr if needs_repair else None
    tiny = torch.finfo(total.dtype).tiny
    if inplace:
        result = total.clamp_min_(tiny).log_().add_(sa).add_(sb)
    else:
        result = torch.log(total.clamp_min(tiny)) + sa + sb
    repaired = False
    if flagged is not None:
        # Structural zeros (an operand's slice entirely -inf) are already exact:
        # the raw -inf shift made those entries -inf.
        flagged &= result > -math.inf
        index = flagged.reshape(-1).nonzero().squeeze(-1)
        if index.numel():
            result = _repair(a, la, b, lb, out, result, index)
            repaired = True
    return result, ea, eb, total, repaired


class _LogContractPair(torch.autograd.Function):
    """`log_contract_pair` with a backward that reuses the forward's exponentials.

    With ``EA = exp(a - s_a)``, ``EB = exp(b - s_b)`` and ``T = einsum(EA, EB)``, the
    result is ``R = log T + s_a + s_b`` and its gradient is a softmax-weighted
    contraction: ``dR/da = EA * einsum(g / T, EB)`` (and symmetrically for ``b``), two
    BLAS calls instead of autograd's passes through shift, exp, einsum and log.
    Entries of ``T`` at or below ``tiny`` have zero weight (their gradient is 0, as
    through the clamp of the plain path).  When the forward repaired entries, or a
    second derivative is asked for, the backward recomputes the plain differentiable
    path instead (exact, slower).
    """

    @staticmethod
    def forward(ctx, a, b, la, lb, out):  # type: ignore[override]
        with torch.no_grad():
            result, ea, eb, total, repaired = _fast_pair(a, la, b, lb, out, inplace=False)
        ctx.labels = (la, lb, out)
        ctx.repaired = repaired
        ctx.save_for_backward(a, b, ea, eb, total)
        return result

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, b, ea, eb, total = ctx.saved_tensors
        la, lb, out = ctx.labels
        if ctx.repaired or torch.is_grad_enabled():  # exact, differentiable path
            create_graph = torch.is_grad_enabled()
            needed = ctx.needs_input_grad[:2]
            with torch.enable_grad():
                # with create_graph the saved inputs carry their graph; else fresh leaves
                a_, b_ = ((x if create_graph else x.detach().requires_grad_(need)) for x, need in zip((a, b), needed))
                result = _plain_pair(a_, la, b_, lb, out)
                wrt = [x for x, need in zip((a_, b_), needed) if need]
                grads = iter(torch.autograd.grad(result, wrt, grad, create_graph=create_graph, allow_unused=True))
            ga, gb = (next(grads) if need else None for need in needed)
            return ga, gb, None, None, None
        weight = torch.where(total > torch.finfo(total.dtype).tiny, grad / total, torch.zeros((), dtype=grad.dtype))
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = _grad_operand(weight, out, eb, lb, ea, la).sum_to_size(a.shape)
        if ctx.needs_input_grad[1]:
            gb = _grad_operand(weight, out, ea, la, eb, lb).sum_to_size(b.shape)
        return ga, gb, None, None, None


def _grad_operand(weight: torch.Tensor, out: str, other: torch.Tensor, lo: str, mine: torch.Tensor,
                  lm: str) -> torch.Tensor:
    """``mine * einsum(weight, other)`` laid out as ``mine`` (labels ``lm``; those only in ``mine`` broadcast)."""
    target = "".join(c for c in lm if c in out or c in lo)
    # the large operand first: torch.einsum then reduces long sums with the more accurate BLAS layout
    # (as autograd's einsum backward does); the other order loses up to ~10x accuracy in float32
    term = _einsum(lo, out, target, other, weight)
    return mine * align(term, target, lm)


def _plain_pair(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str) -> torch.Tensor:
    """The fast path and repair under ordinary autograd (the reference the custom backward reproduces)."""
    return _fast_pair(a, la, b, lb, out, inplace=False)[0]


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _einsum(la: str, lb: str, out: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``torch.einsum`` with batch ellipsis; labels renamed to letters if needed."""
    if not all(c in _LETTERS for c in la + lb):
        rename = {c: _LETTERS[k] for k, c in enumerate(dict.fromkeys(la + lb))}
        la, lb, out = ("".join(rename[c] for c in s) for s in (la, lb, out))
    return torch.einsum(f"...{la},...{lb}->...{out}", x, y)


def _squeeze_labels(x: torch.Tensor, labels: str, summed: Sequence[str]) -> torch.Tensor:
    dims = _labelled_dims(x.dim(), labels, summed)
    return x.squeeze(dims) if dims else x


def _repair(
    a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str, result: torch.Tensor, index: torch.Tensor
) -> torch.Tensor:
    """Recompute ``result.flatten()[index]`` exactly: for each flagged output entry,
    gather its row of ``a`` and column of ``b`` over the summed labels and take a
    stable logsumexp, in blocks of bounded memory.  Differentiable."""
    # Labels summed on one side only are reduced exactly first.
    shared = [c for c in la if c in lb and c not in out]
    a = log_reduce(a, la, "".join(c for c in la if c in out or c in lb))
    la = "".join(c for c in la if c in out or c in lb)
    b = log_reduce(b, lb, "".join(c for c in lb if c in out or c in la))
    lb = "".join(c for c in lb if c in out or c in la)
    batch = tuple(result.shape[: result.dim() - len(out)])
    out_sizes = dict(zip(out, result.shape[len(batch) :]))
    coords = torch.unravel_index(index, result.shape)

    def rows(x: torch.Tensor, lx: str) -> Tuple[torch.Tensor, torch.Tensor]:
        kept = "".join(c for c in out if c in lx)
        x = align(x, lx, kept + "".join(shared))
        x = x.expand(*batch, *x.shape[x.dim() - len(kept) - len(shared) :])
        kept_sizes = [out_sizes[c] for c in kept]
        x = x.reshape(-1, math.prod(x.shape[len(batch) + len(kept) :]))
        # flat row index over (*batch, *kept)
        row = torch.zeros_like(index)
        for dim, size in zip(range(len(batch)), batch):
            row = row * size + coords[dim]
        for c, size in zip(kept, kept_sizes):
            row = row * size + coords[len(batch) + out.index(c)]
        return x, row

    a2, row_a = rows(a, la)
    b2, row_b = rows(b, lb)
    width = a2.shape[-1]
    block = max(1, _REPAIR_BLOCK_ELEMENTS // max(1, width))
    values = [
        log_reduce(a2[row_a[i : i + block]] + b2[row_b[i : i + block]], "bj", "b")
        for i in range(0, index.numel(), block)
    ]
    fixed = result.reshape(-1).index_put((index,), torch.cat(values))
    return fixed.reshape(result.shape)


def log_contract(operands: Sequence[torch.Tensor], labels: Sequence[str], out: str) -> torch.Tensor:
    """One step of a plan: a unary reduction or a pairwise contraction; more
    operands are folded left to right (plans built here never need it)."""
    if len(operands) == 1:
        return log_reduce(operands[0], labels[0], out)
    x, lx = operands[0], labels[0]
    for i in range(1, len(operands)):
        rest = set("".join(labels[i + 1 :])) | set(out)
        lo = "".join(dict.fromkeys(c for c in lx + labels[i] if c in rest))
        if i == len(operands) - 1:
            lo = out
        x = log_contract_pair(x, lx, operands[i], labels[i], lo)
        lx = lo
    return x

"""The stage runners shared by every evaluator: an einsum stage's pairwise steps and a chain's parallel scan.

`tmcgraph.Plan` (eager), `tmcgraph._program` (the step programs' scan stages) and
`tmcgraph.compiled` (``torch.compile``'d programs) all run stages through these two functions, each
with its own pairwise kernel; this module imports none of them.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from ._kernels import align, log_contract, log_contract_pair, underflow_threshold
from .stages import EinsumStage, ScanStage

__all__ = ["Contract", "Pair", "run_scan", "run_steps"]

Contract = Callable[[Sequence[torch.Tensor], Sequence[str], str], torch.Tensor]


def run_steps(stage: EinsumStage, operands: Sequence[torch.Tensor], contract: Contract = log_contract) -> torch.Tensor:
    """Walk an einsum stage's path: ``contract(operands, their labels, result labels)`` per step."""
    work = list(zip(operands, stage.input_labels))
    for step in stage.steps:
        positions = sorted(step.positions)
        taken = [work[p] for p in positions]
        for p in reversed(positions):
            work.pop(p)
        value = contract([t for t, _ in taken], [lab for _, lab in taken], step.result_labels)
        work.append((value, step.result_labels))
    (value, labels), = work
    return align(value, labels, stage.output_labels)


Pair = Callable[[torch.Tensor, str, torch.Tensor, str, str], torch.Tensor]


def _fast_round(a: torch.Tensor, b: torch.Tensor, la: str, lb: str, out: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """One scan round by the fast path, sync-free: ``(log(exp(a) @ exp(b)), smallest shifted sum)``.
    A slice of zero probability makes the flag NaN (``-inf - -inf``), which counts as tripped."""
    ra = a.detach().amax(-1, keepdim=True)
    rb = b.detach().amax(-2, keepdim=True)
    total = torch.matmul((a - ra).exp(), (b - rb).exp())
    return total.log() + ra + rb, total.detach().amin()


def run_scan(stage: ScanStage, operands: Sequence[torch.Tensor], contract: Optional[Pair] = None) -> torch.Tensor:
    """A scan stage on ``(*batch, *labels)`` operands: ``(*batch, *stage.output_labels)``.

    The links ``(batch, l_{k-1}, l_k)`` (unary values folded into the link ending at their label)
    are stacked and multiplied pairwise in the log semiring by ``contract(a, "ij", b, "jk", "ik")``
    (the stack is the leading batch dim), halving the stack each round.  Without ``contract``,
    the rounds take the sync-free fast path and one check at the end: if any shifted sum lost
    precision, the scan is redone with the exact kernel `log_contract_pair`."""
    chain, batch = stage.chain, stage.batch
    n = len(chain) - 1
    links = [align(operands[k], stage.input_labels[k], batch + chain[k] + chain[k + 1]) for k in range(n)]
    unary = [align(u, labels, batch + chain[k]) for u, labels, k in zip(operands[n:], stage.input_labels[n:],
                                                                          stage.unary)]
    lead = torch.broadcast_shapes(*(x.shape[:-2] for x in links), *(u.shape[:-1] for u in unary))
    stack = torch.stack([x.expand(lead + x.shape[-2:]) for x in links])
    if unary:  # every unary value added to the link ending at its label, in one call
        us = torch.stack([u.expand(lead + u.shape[-1:]) for u in unary]).unsqueeze(-2)
        where = torch.tensor([k - 1 for k in stage.unary], device=stack.device)
        stack = stack.index_add(0, where, us.to(stack.dtype).expand((len(unary),) + stack.shape[1:]))
    if contract is not None:
        return _rounds(stack, contract)
    flags: List[torch.Tensor] = []

    def fast(a: torch.Tensor, la: str, b: torch.Tensor, lb: str, out: str) -> torch.Tensor:
        value, flag = _fast_round(a, b, la, lb, out)
        flags.append(flag)
        return value

    result = _rounds(stack, fast)
    if flags and not bool(torch.stack(flags).min() >= underflow_threshold(stack.dtype)):  # one sync
        result = _rounds(stack, log_contract_pair)
    return result


def _rounds(stack: torch.Tensor, contract: Pair) -> torch.Tensor:
    while stack.shape[0] > 1:
        half = stack.shape[0] // 2
        merged = contract(stack[0:2 * half:2], "ij", stack[1:2 * half:2], "jk", "ik")
        stack = torch.cat([merged, stack[2 * half:]]) if stack.shape[0] % 2 else merged
    return stack[0]

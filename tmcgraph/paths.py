"""Contraction paths: the tree-decomposition path and the optimizer registry.

A *path* here is opt_einsum's linear format: a list of tuples of positions in the
current operand list; the operands at those positions are removed and their
contraction appended.  Every path is scored with the same cost model
(`path_cost`, opt_einsum's FLOP count: the product of the sizes of all
labels a step touches, times the number of terms, plus one for an inner sum), so
paths from different optimizers are comparable.

``"tree"`` (`tree_path`) is ours: a min-fill (and a min-degree) elimination
order of the interaction graph of the summed labels, turned into a pairwise path
that contracts the tensors holding the next label pairwise (smallest result first)
and drops every label as soon as no other tensor holds it (single-operand
pre-reduction: this is what makes a chain cost ``K^2`` per step, not ``K^3``).

``"auto"`` (the default) is the rule documented in ``docs/factor-graphs.md``:

* always the tree path;
* plus opt_einsum ``"optimal"`` for at most 6 operands, ``"dp"`` for at most 12,
  ``"greedy"`` beyond;
* plus cotengra's hyper-optimizer when installed and the best cost so far exceeds
  ``1e10`` FLOPs (there a search of a second or two pays for itself);
* the cheapest by FLOPs wins (ties: smaller largest intermediate).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import opt_einsum
from opt_einsum import paths as oe_paths

from .errors import TMCError

__all__ = ["Candidate", "OPTIMIZERS", "PathCost", "cotengra_available", "elimination_order", "path_cost",
           "path_from_order", "search", "step_outputs", "tree_path"]

Path = List[Tuple[int, ...]]
PathFn = Callable[[List[FrozenSet[str]], FrozenSet[str], Dict[str, int]], Path]

AUTO_EXHAUSTIVE_MAX = 6
AUTO_DP_MAX = 12
AUTO_COTENGRA_FLOPS = 1e10


@dataclass(frozen=True)
class PathCost:
    """FLOPs (opt_einsum's count) and the largest intermediate (elements) of a path."""

    flops: int
    largest_intermediate: int


def step_outputs(inputs: Sequence[str], output: str, path: Path) -> List[Tuple[Tuple[str, ...], str]]:
    """For each step of ``path``: the label strings of its operands and of its result."""
    remaining = list(inputs)
    steps = []
    for positions in path:
        positions = tuple(sorted(positions, reverse=True))
        operands = tuple(remaining[p] for p in sorted(positions))
        for p in positions:
            remaining.pop(p)
        needed = set(output).union(*remaining) if remaining else set(output)
        result = "".join(dict.fromkeys(c for term in operands for c in term if c in needed))
        if not remaining:
            result = output
        steps.append((operands, result))
        remaining.append(result)
    return steps


def path_cost(inputs: Sequence[str], output: str, sizes: Dict[str, int], path: Path) -> PathCost:
    """Score a linear path with opt_einsum's FLOP count and its largest intermediate."""
    flops, largest = 0, 0
    for operands, result in step_outputs(inputs, output, path):
        touched = set().union(*operands)
        inner = len(touched) > len(result)
        flops += opt_einsum.helpers.flop_count(touched, inner, len(operands), sizes)
        largest = max(largest, math.prod(sizes[c] for c in result))
    return PathCost(flops, largest)


def elimination_order(
    inputs: Sequence[str], output: str, sizes: Dict[str, int], *, heuristic: str = "min-fill"
) -> List[str]:
    """Greedy elimination order of the summed labels.

    The interaction graph has a node per label and an edge between labels that
    share an operand.  Kept (output) labels stay in the graph but are never
    eliminated.  ``"min-fill"`` picks the label whose elimination adds the fewest
    edges, ``"min-degree"`` the one with the smallest clique; ties go to the
    smallest clique size (product of label sizes).
    """
    graph: Dict[str, set] = {c: set() for term in inputs for c in term}
    for term in inputs:
        for c in term:
            graph[c].update(d for d in term if d != c)
    candidates = [c for c in graph if c not in output]
    order: List[str] = []
    while candidates:
        best: Optional[str] = None
        best_key: Optional[Tuple[float, float]] = None
        for c in candidates:
            nbrs = graph[c]
            clique = math.log(sizes[c]) + sum(math.log(sizes[d]) for d in nbrs)
            if heuristic == "min-fill":
                fill = sum(len(nbrs - graph[d] - {d}) for d in nbrs) // 2
                key: Tuple[float, float] = (fill, clique)
            else:
                key = (clique, len(nbrs))
            if best_key is None or key < best_key:
                best, best_key = c, key
        assert best is not None
        order.append(best)
        candidates.remove(best)
        nbrs = graph.pop(best)
        for d in nbrs:
            graph[d].discard(best)
            graph[d].update(nbrs - {d})
    return order


def path_from_order(inputs: Sequence[str], output: str, sizes: Dict[str, int], order: Sequence[str]) -> Path:
    """Turn an elimination order into a pairwise linear path (see module doc)."""
    live: Dict[int, str] = dict(enumerate(inputs))
    next_id = len(inputs)
    ssa: List[Tuple[int, ...]] = []
    count = Counter(c for t in inputs for c in set(t))  # live tensors holding each label

    def result_labels(ids: Tuple[int, ...]) -> str:
        local = Counter(c for i in ids for c in set(live[i]))
        return "".join(
            dict.fromkeys(c for i in ids for c in live[i] if c in output or count[c] > local[c])
        )

    def contract(ids: Tuple[int, ...]) -> None:
        nonlocal next_id
        result = result_labels(ids)
        for i in ids:
            count.subtract(set(live.pop(i)))
        count.update(set(result))
        live[next_id] = result
        ssa.append(ids)
        next_id += 1

    def result_size(ids: Tuple[int, ...]) -> int:
        return math.prod(sizes[c] for c in result_labels(ids))

    for label in order:
        bucket = [i for i, t in live.items() if label in t]
        while len(bucket) > 1:
            pairs = [(bucket[x], bucket[y]) for x in range(len(bucket)) for y in range(x + 1, len(bucket))]
            pair = min(pairs, key=result_size)
            contract(pair)
            bucket = [i for i, t in live.items() if label in t]
        if bucket and label in live[bucket[0]]:
            contract((bucket[0],))
    # Only kept labels remain: combine what is left, smallest results first.
    while len(live) > 1:
        smallest = sorted(live, key=lambda i: math.prod(sizes[c] for c in live[i]))[:2]
        contract(tuple(smallest))
    if not ssa or set(live[next(iter(live))]) != set(output):
        contract((next(iter(live)),))  # a final transpose/reduction step
    return oe_paths.ssa_to_linear(ssa)


def tree_path(inputs: List[FrozenSet[str]], output: FrozenSet[str], sizes: Dict[str, int]) -> Path:
    """The tree-decomposition path: the cheaper of min-fill and min-degree orders."""
    terms = ["".join(sorted(t)) for t in inputs]
    out = "".join(sorted(output))
    best: Optional[Tuple[PathCost, Path]] = None
    for heuristic in ("min-fill", "min-degree"):
        path = path_from_order(terms, out, sizes, elimination_order(terms, out, sizes, heuristic=heuristic))
        cost = path_cost(terms, out, sizes, path)
        if best is None or (cost.flops, cost.largest_intermediate) < (best[0].flops, best[0].largest_intermediate):
            best = (cost, path)
    assert best is not None
    return best[1]


def _opt_einsum_fn(name: str) -> PathFn:
    fn = oe_paths.get_path_fn(name)
    return lambda inputs, output, sizes: list(fn(inputs, output, sizes, None))


def _cotengra(inputs: List[FrozenSet[str]], output: FrozenSet[str], sizes: Dict[str, int]) -> Path:
    try:
        import cotengra
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise TMCError("optimize='cotengra' needs the cotengra package: pip install cotengra") from exc
    with warnings.catch_warnings():  # "kahypar not installed": cotengra falls back on its own
        warnings.simplefilter("ignore", UserWarning)
        opt = cotengra.HyperOptimizer(
            max_repeats=64, max_time=2.0, progbar=False, minimize="flops", parallel=False
        )
        return list(opt(inputs, output, sizes))


def cotengra_available() -> bool:
    """Whether the optional cotengra package can be imported (optimizer ``"cotengra"``)."""
    try:
        import cotengra  # noqa: F401
    except ImportError:
        return False
    return True


_OPTIMIZERS: Dict[str, PathFn] = {
    "tree": tree_path,
    "greedy": _opt_einsum_fn("greedy"),
    "dp": _opt_einsum_fn("dp"),
    "optimal": _opt_einsum_fn("optimal"),
    "branch-2": _opt_einsum_fn("branch-2"),
    "auto-hq": _opt_einsum_fn("auto-hq"),
    "opt_einsum-auto": _opt_einsum_fn("auto"),
    "cotengra": _cotengra,
}

OPTIMIZERS: Tuple[str, ...] = ("auto",) + tuple(_OPTIMIZERS)


@dataclass(frozen=True)
class Candidate:
    """A path found by one optimizer, its cost and the seconds the search took."""

    optimizer: str
    path: Tuple[Tuple[int, ...], ...]
    cost: PathCost
    seconds: float


def search(inputs: Sequence[str], output: str, sizes: Dict[str, int], optimize: str = "auto") -> List[Candidate]:
    """Run the optimizer(s) named by ``optimize``; the best candidate comes first.

    Args:
        inputs: label string of each operand.
        output: labels of the result.
        sizes: size of every label.
        optimize: ``"auto"`` or a name from `OPTIMIZERS`.

    Raises:
        TMCError: unknown optimizer name (the message lists the valid ones).
    """
    if optimize != "auto" and optimize not in _OPTIMIZERS:
        raise TMCError(f"unknown optimize={optimize!r}; expected one of {sorted(OPTIMIZERS)}")
    if optimize == "auto":
        n = len(inputs)
        second = "optimal" if n <= AUTO_EXHAUSTIVE_MAX else "dp" if n <= AUTO_DP_MAX else "greedy"
        names = ["tree", second]
    else:
        names = [optimize]
    # Size-1 labels cost nothing and make opt_einsum's dp search loop for ages.
    frozen = [frozenset(c for c in t if sizes[c] > 1) for t in inputs]
    out = frozenset(c for c in output if sizes[c] > 1)

    def run(name: str) -> Candidate:
        start = time.perf_counter()
        if len(inputs) == 1:
            path: Path = [(0,)]
        else:
            path = _OPTIMIZERS[name](frozen, out, sizes)
        cost = path_cost(inputs, output, sizes, path)
        return Candidate(name, tuple(tuple(p) for p in path), cost, time.perf_counter() - start)

    candidates = [run(name) for name in names]
    best = min(candidates, key=lambda c: (c.cost.flops, c.cost.largest_intermediate))
    if optimize == "auto" and best.cost.flops > AUTO_COTENGRA_FLOPS and cotengra_available():
        candidates.append(run("cotengra"))
    candidates.sort(key=lambda c: (c.cost.flops, c.cost.largest_intermediate))
    return candidates

"""The brute-force oracle and random factor graphs, public so users can check their own graphs.

``brute_force_log_sum`` implements the plate semantics of `FactorGraph`
literally: it unrolls every plate, materialises the log-weight of every joint
assignment of every index copy in float64 and takes one logsumexp.  It shares no
code with the compiler.  Cost: ``prod(K ** copies)``, so keep graphs tiny.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .errors import TMCError
from .graph import FactorGraph

__all__ = ["STRUCTURES", "brute_force_log_sum", "random_factor_graph", "random_factors"]

STRUCTURES = ("random", "chain", "tree", "loop", "grid")


def brute_force_log_sum(graph: FactorGraph, factors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``log sum exp`` over every joint assignment of every unrolled index copy, in float64.

    A plate of integer ``scale`` s (`FactorGraph.plate`) is unrolled s times over: its ``s * size``
    elements repeat the factor tensors' ``size`` ones.

    Args:
        graph: the declaration.
        factors: name -> tensor ``(*batch, *plates, *indices)``.

    Returns:
        float64 tensor ``(*batch,)``.

    Raises:
        TMCError: a plate scale that is not an integer, or too many assignments to enumerate.
    """
    unrolled = {}
    for p, size in graph.plates.items():
        scale = graph.plate_scales.get(p, 1.0)
        if scale != int(scale):
            raise TMCError(f"brute force unrolls plate {p!r} scale times over; its scale {scale} is not an integer")
        unrolled[p] = size * int(scale)
    axis: Dict[Tuple[str, Tuple[int, ...]], int] = {}
    sizes: List[int] = []
    for name, index in graph.indices.items():
        for coords in itertools.product(*(range(unrolled[p]) for p in index.plates)):
            axis[(name, coords)] = len(axis)
            sizes.append(index.size)
    n = len(sizes)
    if math.prod(sizes) > 50_000_000:
        raise TMCError(f"brute force would enumerate {math.prod(sizes):.3g} assignments; use a smaller graph")
    batch = torch.broadcast_shapes(
        *(factors[f].shape[: factors[f].dim() - len(s.plates) - len(s.indices)] for f, s in graph.factors.items())
    )
    total = torch.zeros(*batch, *sizes, dtype=torch.float64)
    for fname, spec in graph.factors.items():
        t = factors[fname].to(torch.float64)
        nb = t.dim() - len(spec.plates) - len(spec.indices)
        for pcoords in itertools.product(*(range(unrolled[p]) for p in spec.plates)):
            where = dict(zip(spec.plates, pcoords))
            at = tuple(c % graph.plates[p] for p, c in zip(spec.plates, pcoords))  # the element it repeats
            sub = t[(Ellipsis,) + at + (slice(None),) * len(spec.indices)]
            axes = [axis[(i, tuple(where[p] for p in graph.indices[i].plates))] for i in spec.indices]
            order = sorted(range(len(axes)), key=axes.__getitem__)
            sub = sub.permute(list(range(nb)) + [nb + o for o in order])
            shape = [1] * n
            for a, i in zip(axes, spec.indices):
                shape[a] = graph.indices[i].size
            total = total + sub.reshape(*sub.shape[:nb], *shape)
    return total.reshape(*batch, -1).logsumexp(-1)


def _plated_graph(rng: random.Random, max_size: int) -> FactorGraph:
    g = FactorGraph()
    # a small tree of nested plates: chains are the admissible plate sets
    chains: List[Tuple[str, ...]] = [()]
    for k in range(rng.randint(1, 3)):
        name = f"p{k}"
        g.plate(name, rng.randint(2, 3))
        parent = rng.choice(chains)
        chains.append(parent + (name,))
    index_chain: Dict[str, Tuple[str, ...]] = {}
    copies = 0
    for k in range(rng.randint(2, 5)):
        chain = rng.choice(chains)
        n_copies = math.prod(g.plates[p] for p in chain)
        if copies + n_copies > 7:
            chain, n_copies = (), 1
        copies += n_copies
        name = f"i{k}"
        g.index(name, rng.randint(1, max_size), plates=list(chain))
        index_chain[name] = chain
    names = list(index_chain)
    for k in range(rng.randint(2, 5)):
        chain = rng.choice(chains)
        usable = [i for i in names if chain[: len(index_chain[i])] == index_chain[i]]
        chosen = rng.sample(usable, min(len(usable), rng.randint(1, 3))) if usable else []
        plates = list(chain)
        rng.shuffle(plates)
        rng.shuffle(chosen)
        g.factor(f"f{k}", chosen, plates=plates)
    return g


def _pairs(structure: str, n: int, rng: random.Random) -> List[Tuple[int, ...]]:
    if structure == "chain":
        return [(i, i + 1) for i in range(n - 1)]
    if structure == "loop":
        return [(i, (i + 1) % n) for i in range(n)]
    if structure == "tree":
        return [(rng.randrange(i), i) for i in range(1, n)]
    if structure == "grid":
        side = int(math.isqrt(n))
        at = lambda r, c: r * side + c  # noqa: E731
        return [(at(r, c), at(r, c + 1)) for r in range(side) for c in range(side - 1)] + [
            (at(r, c), at(r + 1, c)) for r in range(side - 1) for c in range(side)
        ]
    # random hypergraph
    return [tuple(rng.sample(range(n), rng.randint(1, min(3, n)))) for _ in range(rng.randint(n - 1, n + 3))]


def random_factor_graph(
    seed: int = 0,
    *,
    structure: str = "random",
    plates: bool = False,
    num_indices: Optional[int] = None,
    max_size: int = 3,
) -> FactorGraph:
    """A seeded random factor graph small enough for `brute_force_log_sum`.

    Args:
        seed: the graph is a function of the seed (and the other arguments).
        structure: one of ``"random"`` (random hyperedges of 1-3 indices),
            ``"chain"``, ``"tree"``, ``"loop"``, ``"grid"`` (pairwise factors plus
            a unary factor on most indices).
        plates: with ``structure="random"``, draw a small tree of nested plates and
            put indices and factors in them (always contractible).
        num_indices: number of indices (default: random, 3-6; a square for grids).
        max_size: index sizes are drawn from ``1..max_size``.
    """
    if structure not in STRUCTURES:
        raise TMCError(f"unknown structure={structure!r}; expected one of {STRUCTURES}")
    rng = random.Random(seed)
    if plates:
        if structure != "random":
            raise TMCError("plates=True is only supported with structure='random'")
        return _plated_graph(rng, max_size)
    n = num_indices if num_indices is not None else (9 if structure == "grid" else rng.randint(3, 6))
    g = FactorGraph()
    for i in range(n):
        g.index(f"i{i}", rng.randint(1, max_size))
    for k, members in enumerate(_pairs(structure, n, rng)):
        g.factor(f"f{k}", [f"i{i}" for i in members])
    for i in range(n):
        if rng.random() < 0.8:
            g.factor(f"u{i}", [f"i{i}"])
    return g


def random_factors(
    graph: FactorGraph,
    *,
    seed: int = 0,
    batch_shape: Sequence[int] = (),
    scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
    neg_inf_prob: float = 0.0,
    requires_grad: bool = False,
) -> Dict[str, torch.Tensor]:
    """Random log-factor tensors for ``graph``.

    ``scale * N(0, 1)`` entries, each ``-inf`` with probability ``neg_inf_prob``; shape ``(*batch_shape, *factor
    shape)``.
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in graph.factors:
        shape = tuple(batch_shape) + graph.factor_shape(name)
        t = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
        if neg_inf_prob > 0:
            t = t.masked_fill(torch.rand(shape, generator=gen, dtype=torch.float64) < neg_inf_prob, -math.inf)
        out[name] = t.to(dtype).requires_grad_(requires_grad)
    return out

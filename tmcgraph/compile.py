"""Structure -> Plan.  Works on labels and sizes only; never touches a tensor.

The compiler turns a `FactorGraph` (or one einsum) into the
stages of `tmcgraph.stages`, and owns the one decision made at run time:
how to slice einsum stages when a batch of a given size must respect a memory
limit (`Slicer`; the plan calls it and never plans itself).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Protocol, Sequence, Tuple

import networkx as nx
from networkx.algorithms.approximation import treewidth_min_degree, treewidth_min_fill_in
from opt_einsum import get_symbol

from . import paths
from .errors import TMCError
from .plan import Plan
from .stages import EinsumStage, InputSpec, ProductStage, ScanStage, Stage, Step

__all__ = ["SCAN_MODES", "GraphStructure", "Slicer", "check_memory_limit", "check_optimize", "check_scan",
           "compile_einsum", "compile_graph", "compile_stages", "find_chains", "label_treewidth", "make_plan"]


class GraphStructure(Protocol):
    """What the compiler reads of a `tmcgraph.FactorGraph`.

    The graph module calls the compiler (``FactorGraph.compile``), so the compiler takes the graph by this shape and
    imports it not even for types.
    """

    @property
    def plates(self) -> Mapping[str, int]:
        """Plate name -> size."""

    @property
    def plate_scales(self) -> Mapping[str, float]:
        """Plate name -> its scale (plates not listed have scale 1)."""

    @property
    def indices(self) -> Mapping[str, Any]:
        """Index name -> its declaration (size and plates)."""

    @property
    def factors(self) -> Mapping[str, Any]:
        """Factor name -> its declaration (indices and plates)."""

    def factor_shape(self, name: str) -> Tuple[int, ...]:
        """The shape of factor ``name``: its plates' sizes, then its indices'."""

    def structure_key(self) -> tuple:
        """A hashable key of the structure and sizes (plans are cached by it)."""


#: ``scan=`` choices of `tmcgraph.FactorGraph.compile`: contract chains by a parallel scan where the
#: cost model says it pays, always, or never
SCAN_MODES = ("auto", "always", "never")
# The cost model of "auto" (forward + backward, per batch element), in units of one sequential link
# (its pairwise step and unary merge, forward and backward), fitted to `python benchmarks/scan.py
# --threads 1` on a 2-core CPU: a scan round costs _ROUND links, stacking _STACK links per link and
# the rounds' matrix products _CUBE links per K**3 per link.  Scan when it is estimated 10% cheaper.
_ROUND = 1.94
_STACK = 0.255
_CUBE = 2.33e-6
_MARGIN = 0.9

def _slice_stage(steps: Sequence[Step], output: str, sizes: Dict[str, int], limit: int) -> Tuple[Tuple[str, int], ...]:
    """Choose chunk sizes so that every intermediate has at most ``limit`` elements.

    Kept labels are chunked first (exact, no extra FLOPs), summed labels after
    (their chunks are accumulated in the log domain).  Best effort: an
    intermediate made only of labels already at chunk 1 cannot shrink further.
    """
    chunk: Dict[str, int] = {}

    def size(labels: str) -> int:
        return math.prod(chunk.get(c, sizes[c]) for c in labels)

    while True:
        worst = max((step.result_labels for step in steps), key=size, default="")
        largest = size(worst)
        if largest <= limit:
            break
        kept = [c for c in worst if c in output and chunk.get(c, sizes[c]) > 1]
        summed = [c for c in worst if c not in output and chunk.get(c, sizes[c]) > 1]
        pool = kept or summed
        if not pool:
            break
        label = max(pool, key=lambda c: chunk.get(c, sizes[c]))
        factor = -(-largest // limit)
        chunk[label] = max(1, chunk.get(label, sizes[label]) // factor)
    return tuple(sorted(chunk.items()))


def compile_einsum(
    inputs: Sequence[str],
    output: str,
    sizes: Dict[str, int],
    *,
    input_ids: Optional[Sequence[int]] = None,
    optimize: str = "auto",
    memory_limit: Optional[int] = None,
) -> EinsumStage:
    """Plan one log-einsum: search paths, expand the winner into steps, slice."""
    candidates = paths.search(inputs, output, sizes, optimize)
    best = candidates[0]
    steps = [
        Step(tuple(positions), tuple(operands), result)
        for (operands, result), positions in zip(paths.step_outputs(inputs, output, list(best.path)), best.path)
    ]
    used = set("".join(inputs)) | set(output)
    stage_sizes = {c: sizes[c] for c in used}
    slices = _slice_stage(steps, output, stage_sizes, memory_limit) if memory_limit is not None else ()
    return EinsumStage(
        inputs=tuple(input_ids if input_ids is not None else range(len(inputs))),
        input_labels=tuple(inputs),
        output_labels=output,
        sizes=tuple(sorted(stage_sizes.items())),
        path=best.path,
        steps=tuple(steps),
        candidates=tuple(candidates),
        slices=slices,
    )


def check_scan(scan: str) -> str:
    """``scan`` if it is ``"auto"``, ``"always"`` or ``"never"``, else a `TMCError` listing them."""
    if scan not in SCAN_MODES:
        raise TMCError(f"unknown scan={scan!r}; expected one of {list(SCAN_MODES)}")
    return scan


Chain = Tuple[List[int], str, List[Tuple[int, int]], str]


def find_chains(terms: Sequence[str], output: str, sizes: Dict[str, int]) -> List[Chain]:
    """Chains of pairwise terms that a `ScanStage` can contract.

    A term is *pairwise* when exactly two of its labels are summed (not in ``output``), of one
    size; its other labels are its batch labels.  A summed label is a *link* when it is in
    exactly two pairwise terms with the same batch labels and otherwise only in *unary* terms
    (whose only summed label it is, with labels within the batch labels and itself).  A chain is
    a path of pairwise terms joined by links, with distinct ends.

    Returns:
        per chain: ``(pairwise term positions in chain order, chain labels l_0..l_n,
        [(unary term position, k)], batch labels)``.
    """
    out = set(output)
    pairs: Dict[int, Tuple[Tuple[str, str], FrozenSet[str]]] = {}
    for pos, t in enumerate(terms):
        free = [c for c in t if c not in out]
        if len(free) == 2 and len(set(t)) == len(t) and sizes[free[0]] == sizes[free[1]] > 1:
            pairs[pos] = ((free[0], free[1]), frozenset(c for c in t if c in out))
    touching: Dict[str, List[int]] = {}
    for pos, t in enumerate(terms):
        for c in set(t):
            touching.setdefault(c, []).append(pos)
    links: Dict[str, Tuple[int, int]] = {}
    for c, where in touching.items():
        if c in out:
            continue
        ps = [p for p in where if p in pairs]
        others = [p for p in where if p not in pairs]
        if len(ps) != 2 or pairs[ps[0]][1] != pairs[ps[1]][1]:
            continue
        kept = pairs[ps[0]][1]
        if all(set(terms[p]) <= kept | {c} for p in others):
            links[c] = (ps[0], ps[1])
    neighbours: Dict[int, List[Tuple[str, int]]] = {}
    for c, (a, b) in links.items():
        neighbours.setdefault(a, []).append((c, b))
        neighbours.setdefault(b, []).append((c, a))
    chains: List[Chain] = []
    seen: set = set()
    for start in sorted(neighbours):
        if start in seen or len(neighbours[start]) != 1:
            continue  # walk from an end of each path (cycles are left to the path search)
        order, inner = [start], []
        prev, (label, here) = start, neighbours[start][0]
        while True:
            order.append(here)
            inner.append(label)
            nxt = [(c, p) for c, p in neighbours[here] if p != prev]
            if not nxt:
                break
            prev, (label, here) = here, nxt[0]
        seen.update(order)
        first_free, last_free = pairs[order[0]][0], pairs[order[-1]][0]
        l0 = next(c for c in first_free if c != inner[0])
        ln = next(c for c in last_free if c != inner[-1])
        if l0 == ln:
            continue
        chain = l0 + "".join(inner) + ln
        unary = [(p, chain.index(c)) for c in inner for p in touching[c] if p not in pairs]
        batch = "".join(c for c in terms[order[0]] if c in out)
        chains.append((order, chain, unary, batch))
    return chains


def _scan_pays(n: int, k: int, scan: str) -> bool:
    if scan != "auto":
        return scan == "always"
    parallel = math.ceil(math.log2(n)) * _ROUND + n * (_STACK + _CUBE * k ** 3)
    return n >= 2 and parallel < _MARGIN * n


def compile_stages(inputs: Sequence[str], output: str, sizes: Dict[str, int], *, input_ids: Sequence[int],
                   first_value: int, optimize: str = "auto", memory_limit: Optional[int] = None,
                   scan: str = "auto") -> List[Stage]:
    """Plan one log-einsum of values ``input_ids`` as stages.

    A `ScanStage` per chain worth scanning (see `find_chains`), then the einsum of what is left. ``first_value`` is the
    value id the first returned stage will get.
    """
    stages: List[Stage] = []
    terms, ids = list(inputs), list(input_ids)
    if scan != "never":
        taken: set = set()
        for order, chain, unary, batch in find_chains(terms, output, sizes):
            if not _scan_pays(len(order), sizes[chain[0]], scan):
                continue
            members = order + [p for p, _ in unary]
            stages.append(ScanStage(inputs=tuple(ids[p] for p in members),
                                    input_labels=tuple(terms[p] for p in members), chain=chain,
                                    unary=tuple(k for _, k in unary), batch=batch,
                                    output_labels=batch + chain[0] + chain[-1]))
            taken.update(members)
        if stages:
            keep = [p for p in range(len(terms)) if p not in taken]
            ids = [ids[p] for p in keep] + [first_value + k for k in range(len(stages))]
            terms = [terms[p] for p in keep] + [st.output_labels for st in stages]
    stages.append(compile_einsum(terms, output, sizes, input_ids=ids, optimize=optimize, memory_limit=memory_limit))
    return stages


def label_treewidth(terms: Sequence[str]) -> int:
    """Upper bound on the tree-width of the interaction graph of ``terms``' labels.

    (the better of networkx's min-fill-in and min-degree heuristics).
    """
    g = nx.Graph()
    for term in terms:
        g.add_nodes_from(term)
        g.add_edges_from((a, b) for i, a in enumerate(term) for b in term[i + 1 :])
    if g.number_of_nodes() == 0:
        return 0
    return min(treewidth_min_fill_in(g)[0], treewidth_min_degree(g)[0])


class Slicer:
    """The slicing planner a `Plan` calls at run time.

    A memory limit counts elements of all batch elements together, so the
    slicing depends on the batch size, known only at evaluation: for a batch of
    ``batch_numel`` elements every einsum stage is re-sliced to
    ``memory_limit // batch_numel`` elements per batch element (cached).
    """

    def __init__(self, stages: Sequence[Stage], memory_limit: int, *, cache_size: int = 32) -> None:
        self.stages = tuple(stages)
        self.memory_limit = memory_limit
        self._cache: "OrderedDict[int, Tuple[Stage, ...]]" = OrderedDict()
        self._cache_size = cache_size

    def __call__(self, batch_numel: int) -> Tuple[Stage, ...]:
        """The stages sliced so that ``batch_numel`` batch elements fit under the memory limit."""
        if batch_numel <= 1:
            return self.stages
        if batch_numel in self._cache:
            self._cache.move_to_end(batch_numel)
            return self._cache[batch_numel]
        limit = max(1, self.memory_limit // batch_numel)
        stages = tuple(
            dataclasses.replace(s, slices=_slice_stage(s.steps, s.output_labels, dict(s.sizes), limit))
            if isinstance(s, EinsumStage)
            else s
            for s in self.stages
        )
        self._cache[batch_numel] = stages
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return stages


def make_plan(*, inputs: Tuple[InputSpec, ...], stages: Tuple[Stage, ...], label_names: Tuple[Tuple[str, str], ...],
              constant: float, treewidth: int, log10_naive_flops: float, optimize: str,
              memory_limit: Optional[int], output_labels: str = "") -> Plan:
    """A `Plan` over ``stages``, with a `Slicer` when a memory limit applies."""
    return Plan(inputs=inputs, stages=stages, output_labels=output_labels, label_names=label_names, constant=constant,
                treewidth=treewidth, log10_naive_flops=log10_naive_flops, optimize=optimize,
                memory_limit=memory_limit, slicer=None if memory_limit is None else Slicer(stages, memory_limit))


def check_optimize(optimize: str) -> None:
    """Raise a `TMCError` listing the valid optimizers unless ``optimize`` is one."""
    if optimize not in paths.OPTIMIZERS:
        raise TMCError(f"unknown optimize={optimize!r}; expected one of {sorted(paths.OPTIMIZERS)}")


def check_memory_limit(memory_limit: Optional[int]) -> None:
    """Raise a `TMCError` unless ``memory_limit`` is ``None`` or a positive int."""
    bad_type = isinstance(memory_limit, bool) or not isinstance(memory_limit, int)
    if memory_limit is not None and (bad_type or memory_limit < 1):
        raise TMCError(f"memory_limit must be None or a positive int (elements), got {memory_limit!r}")


_GRAPH_CACHE: "OrderedDict[tuple, Plan]" = OrderedDict()
_CACHE_SIZE = 128


def compile_graph(graph: GraphStructure, *, optimize: str = "auto", memory_limit: Optional[int] = None,
                  scan: str = "auto") -> Plan:
    r"""Compile a `FactorGraph` into a `Plan`; cached by structure.

    Plates are eliminated by tensor variable elimination (Obermeyer et al. 2019,
    as in Pyro's ``contract_tensor_tree``): take a maximal set of plates L
    present among the factors; within each component of factors in L connected
    by indices whose plates are exactly L, sum those indices out with the plate
    dims as batch dims (one einsum); the remaining indices live in a smaller
    plate set L'; multiply over the plates L \\ L'; repeat until no plate is left,
    then contract what remains.  When L' = L the plates cannot be eliminated
    without unrolling, and compilation fails with an error naming the factors.
    Chains within an einsum are contracted by a parallel scan where ``scan`` says so
    (`compile_stages`).
    """
    check_optimize(optimize)
    check_memory_limit(memory_limit)
    check_scan(scan)
    key = (graph.structure_key(), optimize, memory_limit, scan)
    if key in _GRAPH_CACHE:
        _GRAPH_CACHE.move_to_end(key)
        return _GRAPH_CACHE[key]
    if not graph.factors:
        raise TMCError("the factor graph has no factors; declare at least one with g.factor(...)")

    symbol: Dict[str, str] = {}
    for name in list(graph.plates) + list(graph.indices):
        symbol[name] = get_symbol(len(symbol))
    names = {s: n for n, s in symbol.items()}
    sizes = {symbol[p]: s for p, s in graph.plates.items()}
    sizes.update({symbol[i]: spec.size for i, spec in graph.indices.items()})
    index_plates = {symbol[i]: frozenset(spec.plates) for i, spec in graph.indices.items()}
    plate_order = {symbol[p]: k for k, p in enumerate(graph.plates)}
    scales = graph.plate_scales

    def plate_labels(plates: FrozenSet[str]) -> str:
        return "".join(sorted((symbol[p] for p in plates), key=plate_order.__getitem__))

    inputs = []
    # live values: id -> (labels, ordinal, factor names it came from)
    live: Dict[int, Tuple[str, FrozenSet[str], Tuple[str, ...]]] = {}
    for k, (name, spec) in enumerate(graph.factors.items()):
        labels = "".join(symbol[p] for p in spec.plates) + "".join(symbol[i] for i in spec.indices)
        dims = tuple(f"plate {p!r}" for p in spec.plates) + tuple(f"index {i!r}" for i in spec.indices)
        inputs.append(InputSpec(name, labels, graph.factor_shape(name), dims))
        live[k] = (labels, frozenset(spec.plates), (name,))

    stages: List[Stage] = []

    def add(stage: Stage, ordinal: FrozenSet[str], origin: Tuple[str, ...]) -> None:
        stages.append(stage)
        live[len(inputs) + len(stages) - 1] = (stage.output_labels, ordinal, origin)

    while True:
        ordinals = {o for _, o, _ in live.values()}
        if ordinals <= {frozenset()}:
            break
        leaf = max((o for o in ordinals if not any(o < p for p in ordinals)), key=lambda o: (len(o), sorted(o)))
        level = [k for k, (_, o, _) in live.items() if o == leaf]
        local = {c for k in level for c in live[k][0] if c in index_plates and index_plates[c] == leaf}
        # connected components of the level's values, linked by local indices
        comp = nx.Graph()
        comp.add_nodes_from(level)
        owner: Dict[str, int] = {}
        for k in level:
            for c in live[k][0]:
                if c in local:
                    if c in owner:
                        comp.add_edge(owner[c], k)
                    owner[c] = k
        for members in sorted(nx.connected_components(comp), key=min):
            members = sorted(members)
            origin = tuple(n for k in members for n in live[k][2])
            rest = "".join(
                dict.fromkeys(c for k in members for c in live[k][0] if c in index_plates and c not in local)
            )
            parent = frozenset().union(*(index_plates[c] for c in rest)) if rest else frozenset()
            if parent == leaf:
                culprits = [n for n in origin if any(symbol[i] in rest for i in graph.factors[n].indices)]
                described = ", ".join(f"{names[c]!r} (plates {sorted(index_plates[c])})" for c in rest)
                raise TMCError(
                    f"factor {culprits[0]!r} (plates {sorted(leaf)}) couples indices {described} whose plates are "
                    f"not nested: contracting them would require unrolling a plate. Restructure the model so that "
                    f"the plates of the indices a factor touches are nested (factors involved: {culprits})"
                )
            labels_in = [live[k][0] for k in members]
            value, value_labels = members[0], labels_in[0]
            has_local = any(c in local for c in "".join(labels_in))
            if len(members) > 1 or has_local:
                out = plate_labels(leaf) + rest
                stages.extend(compile_stages(labels_in, out, sizes, input_ids=members,
                                             first_value=len(inputs) + len(stages), optimize=optimize,
                                             memory_limit=memory_limit, scan=scan))
                value, value_labels = len(inputs) + len(stages) - 1, out  # consumed at once by the product
            for k in members:
                del live[k]
            keep = plate_labels(parent) + rest
            scale = math.prod(scales.get(p, 1.0) for p in leaf - parent)
            add(ProductStage((value,), (value_labels,), keep, scale), parent, origin)
    final = sorted(live)
    stages.extend(compile_stages([live[k][0] for k in final], "", sizes, input_ids=final,
                                 first_value=len(inputs) + len(stages), optimize=optimize,
                                 memory_limit=memory_limit, scan=scan))
    untouched = [i for i in graph.indices if not any(i in f.indices for f in graph.factors.values())]
    constant = sum(
        math.log(graph.indices[i].size)
        * math.prod(graph.plates[p] * scales.get(p, 1.0) for p in graph.indices[i].plates)
        for i in untouched
    )
    treewidth = label_treewidth(["".join(symbol[i] for i in f.indices) for f in graph.factors.values()])
    log10_naive = sum(
        math.log10(spec.size) * math.prod(graph.plates[p] for p in spec.plates) for spec in graph.indices.values()
    ) + math.log10(max(1, sum(math.prod(graph.plates[p] for p in f.plates) for f in graph.factors.values())))
    plan = make_plan(
        inputs=tuple(inputs),
        stages=tuple(stages),
        label_names=tuple(sorted(names.items())),
        constant=constant,
        treewidth=treewidth,
        log10_naive_flops=log10_naive,
        optimize=optimize,
        memory_limit=memory_limit,
    )
    _GRAPH_CACHE[key] = plan
    if len(_GRAPH_CACHE) > _CACHE_SIZE:
        _GRAPH_CACHE.popitem(last=False)
    return plan

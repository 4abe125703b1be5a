"""FactorGraph: declare plates, sample indices and log-factors; validated as declared."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping, Optional, Sequence, Tuple

from .errors import TMCError

__all__ = ["FactorGraph", "FactorSpec", "IndexSpec", "check_plate_list"]

if TYPE_CHECKING:
    from .plan import Plan


@dataclass(frozen=True)
class IndexSpec:
    """A sample index: ``size`` values (K), one independent copy per element of ``plates``."""

    size: int
    plates: Tuple[str, ...]


@dataclass(frozen=True)
class FactorSpec:
    """A log-factor over ``indices``, one copy per element of ``plates``.

    Its tensor has shape ``(*batch, *plate sizes in plates order, *index sizes in
    indices order)``.
    """

    indices: Tuple[str, ...]
    plates: Tuple[str, ...]


def _check_name(kind: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise TMCError(f"{kind} name must be a non-empty string, got {name!r}")
    return name


def _check_size(what: str, size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TMCError(f"{what}: size must be a positive int, got {size!r}")
    return size


def check_plate_list(owner: str, plates: Sequence[str], declared: Mapping[str, int]) -> Tuple[str, ...]:
    """Validate a list of plate names against the ``declared`` plates (errors name ``owner``)."""
    if isinstance(plates, str):
        raise TMCError(f"{owner}: plates must be a list of plate names, got the string {plates!r}")
    plates = tuple(plates)
    for p in plates:
        if p not in declared:
            raise TMCError(f"{owner}: plate {p!r} is not declared; declared plates: {sorted(declared)}")
    if len(set(plates)) != len(plates):
        raise TMCError(f"{owner}: a plate appears twice in {list(plates)}")
    return plates


class FactorGraph:
    """A factor graph over sample indices, with plates.

    With plates (conditionally independent replication), compiled once into a `Plan` that evaluates

    ``log_sum = log sum_{all index copies} exp(sum of all factor copies)``.

    Semantics (unrolling, which ``tmcgraph.testing.brute_force_log_sum`` implements
    literally): an index with plates Q has one copy per element of Q; a factor with
    plates P has one copy per element of P and touches, for each of its indices,
    the copy at the projection of its element onto the index's plates.  A factor's
    plates must include the plates of every index it touches.  An index that no
    factor touches contributes ``log K`` per copy.  The sum has no ``1/K``
    normalisation: TMC estimators add ``-log K`` themselves.  A plate declared with
    ``scale=s`` (a subsampled plate) counts each of its elements ``s`` times: for an
    integer ``s``, exactly the plate unrolled ``s`` times over; in general, the plate's
    product over elements (of each element's sum over the index copies local to it) is
    raised to the power ``s``.

    Example::

        g = FactorGraph()
        g.plate("N", 100)
        g.index("theta", 32)                     # K = 32 samples of a global latent
        g.index("z", 16, plates=["N"])           # 16 samples of each local latent
        g.factor("prior", ["theta"])             # tensor (32,)
        g.factor("lik", ["theta", "z"], plates=["N"])   # tensor (100, 32, 16)
        plan = g.compile()
        log_total = plan.log_sum({"prior": t0, "lik": t1})  # shape (): or (*batch,)
    """

    def __init__(self) -> None:
        self._plates: dict = {}
        self._scales: dict = {}
        self._indices: dict = {}
        self._factors: dict = {}

    # -- declaration ---------------------------------------------------------
    def plate(self, name: str, size: int, *, scale: float = 1.0) -> "FactorGraph":
        """Declare a plate (a set of ``size`` conditionally independent replicas).

        Args:
            name: the plate's name.
            size: its number of elements (tensor dims of factors in it have this size).
            scale: the plate stands for ``scale`` times as many elements (a subsample of ``size``
                elements out of ``scale * size``): its product over elements, each element's factors
                with the indices local to it already summed out, is raised to the power ``scale``
                (``scale * sum_i log V_i`` in the log domain).  With an integer ``scale`` that is
                exactly the plate unrolled ``scale`` times over (`tmcgraph.testing.brute_force_log_sum`
                does so).  A positive finite float; ``1.0`` (default) is a plain plate.
        """
        _check_name("plate", name)
        if name in self._plates or name in self._indices:
            kind = "plate" if name in self._plates else "index"
            raise TMCError(f"plate {name!r}: the name is already declared as {kind}")
        size = _check_size(f"plate {name!r}", size)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf:
            raise TMCError(f"plate {name!r}: scale must be a positive finite number, got {scale!r}")
        self._plates[name] = size
        if scale != 1:
            self._scales[name] = float(scale)
        return self

    def index(self, name: str, size: int, *, plates: Sequence[str] = ()) -> "FactorGraph":
        """Declare a sample index with ``size`` values (K), replicated over ``plates``."""
        _check_name("index", name)
        if name in self._plates or name in self._indices:
            kind = "plate" if name in self._plates else "index"
            raise TMCError(f"index {name!r}: the name is already declared as {kind}")
        size = _check_size(f"index {name!r}", size)
        self._indices[name] = IndexSpec(size, self._check_plates(f"index {name!r}", plates))
        return self

    def factor(self, name: str, indices: Sequence[str], *, plates: Sequence[str] = ()) -> "FactorGraph":
        """Declare a log-factor over ``indices`` with one copy per element of ``plates``.

        Tensor layout: ``(*batch, *plates, *indices)`` in the listed orders.
        """
        _check_name("factor", name)
        if name in self._factors:
            raise TMCError(f"factor {name!r} is already declared")
        if isinstance(indices, str):
            raise TMCError(f"factor {name!r}: indices must be a list of index names, got the string {indices!r}")
        indices = tuple(indices)
        plate_names = self._check_plates(f"factor {name!r}", plates)
        for i in indices:
            if i not in self._indices:
                raise TMCError(
                    f"factor {name!r}: index {i!r} is not declared; declared indices: {sorted(self._indices)}"
                )
        if len(set(indices)) != len(indices):
            raise TMCError(f"factor {name!r}: an index appears twice in {list(indices)}")
        for i in indices:
            missing = [p for p in self._indices[i].plates if p not in plate_names]
            if missing:
                raise TMCError(
                    f"factor {name!r}: index {i!r} lives in plates {list(self._indices[i].plates)}, "
                    f"so the factor's plates must include {missing}; got plates={list(plate_names)}"
                )
        self._factors[name] = FactorSpec(indices, plate_names)
        return self

    def _check_plates(self, owner: str, plates: Sequence[str]) -> Tuple[str, ...]:
        return check_plate_list(owner, plates, self._plates)

    # -- read-only views -----------------------------------------------------
    @property
    def plates(self) -> Mapping[str, int]:
        """Plate name -> size."""
        return MappingProxyType(self._plates)

    @property
    def plate_scales(self) -> Mapping[str, float]:
        """Plate name -> its ``scale`` (only plates declared with a scale other than 1)."""
        return MappingProxyType(self._scales)

    @property
    def indices(self) -> Mapping[str, IndexSpec]:
        """Index name -> `IndexSpec`."""
        return MappingProxyType(self._indices)

    @property
    def factors(self) -> Mapping[str, FactorSpec]:
        """Factor name -> `FactorSpec`, in declaration order."""
        return MappingProxyType(self._factors)

    def factor_shape(self, name: str) -> Tuple[int, ...]:
        """The non-batch shape of factor ``name``'s tensor: plate sizes then index sizes."""
        spec = self._factors[name]
        return tuple(self._plates[p] for p in spec.plates) + tuple(self._indices[i].size for i in spec.indices)

    def structure_key(self) -> tuple:
        """A hashable key of the structure and sizes (what a compiled plan depends on)."""
        return (
            tuple(self._plates.items()),
            tuple(self._scales.items()),
            tuple(self._indices.items()),
            tuple(self._factors.items()),
        )

    def compile(self, *, optimize: str = "auto", memory_limit: Optional[int] = None, scan: str = "auto") -> "Plan":
        """Compile the structure into a reusable `Plan` (cached).

        Args:
            optimize: path optimizer: ``"auto"`` (tree decomposition vs opt_einsum,
                cheaper kept) or a name of ``tmcgraph.paths.OPTIMIZERS``.
            memory_limit: bound, in elements per batch element, on the largest
                intermediate; exceeded intermediates are sliced (same value).
            scan: ``"auto"`` (default), ``"always"`` or ``"never"``: contract chains of
                pairwise factors (a Markov chain's transitions) by a parallel scan,
                ``log2(length)`` batched steps instead of one per link
                (`tmcgraph.stages.ScanStage`); ``"auto"`` scans where a cost model
                of per-step dispatch against arithmetic says it pays (small ``K``).

        Raises:
            TMCError: no factor declared, bad option, or a plate structure that
                cannot be contracted without unrolling (names the factor).
        """
        from .compile import compile_graph

        return compile_graph(self, optimize=optimize, memory_limit=memory_limit, scan=scan)

    def __repr__(self) -> str:
        scales = f", plate_scales={dict(self._scales)}" if self._scales else ""
        return (f"FactorGraph(plates={dict(self._plates)}{scales}, indices={len(self._indices)}, "
                f"factors={len(self._factors)})")

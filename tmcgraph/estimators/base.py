"""Shared machinery of the estimators: an index assignment, its factor graph and compiled plans."""

from __future__ import annotations

import math
from typing import Callable, ContextManager, Dict, Mapping, Optional, Tuple

from ..compile import check_scan
from ..declaration import ModelBase as Model
from ..errors import TMCError
from ..evaluate import Evaluator
from ..graph import FactorGraph
from ..layout import Layout, build_graph, call_site_fn, data_batch_shape, index_slots
from ..plan import Plan
from ..trace import Trace, trace
from ..vectorise import Groups

__all__ = ["GraphEstimator", "PARTICLES", "check_k", "enumerated_size"]

#: the one index every sampled latent shares under IWAE and SMC (joint samples, particles)
PARTICLES = "@particles"


class GraphEstimator:
    """Shared machinery: an index assignment, its factor graph and compiled plan."""

    def __init__(self, model: Model, index_of: Dict[str, str], sizes: Dict[str, Optional[int]],
                 index_plates: Dict[str, Tuple[str, ...]], *, optimize: str, memory_limit: Optional[int],
                 compile_now: bool = True, backend: str = "eager", scan: str = "auto") -> None:
        self.model = model
        self.scan = check_scan(scan)
        self.evaluator = Evaluator(backend)  # this estimator's backend and adaptive state (not the plan's)
        self.backend = backend
        if backend == "compiled" and memory_limit is not None:
            raise TMCError("backend='compiled' evaluates unsliced: drop memory_limit")
        self.index_of = index_of
        self._sizes = sizes
        self._index_plates = index_plates
        self.optimize = optimize
        self.memory_limit = memory_limit
        self._plans: Dict[tuple, Tuple[Plan, float]] = {}
        self._graphs: Dict[tuple, Tuple[FactorGraph, float]] = {}
        self._sampled = [n for n in model.latents() if not model.sites[n].enumerate]
        self._slots = index_slots(model, index_of)
        self._probed: set = set()  # layout checks already made (Layout.density)
        self._groups = Groups(model)  # sites sharing a function, batched once verified (tmcgraph.vectorise)
        self._version = model.version
        if compile_now and all(s is not None for s in sizes.values()):
            self._plan_for(tuple(sizes.items()))

    def _graph_for(self, key: tuple) -> Tuple[FactorGraph, float]:
        """(factor graph, log-normaliser) for the index sizes in ``key``."""
        if key not in self._graphs:
            sizes = dict(key)
            graph = build_graph(self.model, self.index_of, sizes, self._index_plates)
            # 1/K for every copy of every sampled index (enumerated ones have none)
            norm = 0.0
            sampled = self._sampled_indices()
            for i, size in sizes.items():
                if i in sampled:
                    norm += math.log(size) * math.prod(self.model.plates[p] for p in self._index_plates[i])
            self._graphs[key] = (graph, norm)
        self.graph = self._graphs[key][0]
        return self._graphs[key]

    def _plan_for(self, key: tuple) -> Tuple[Plan, float]:
        """(plan, log-normaliser) for the index sizes in ``key``."""
        graph, norm = self._graph_for(key)
        if key not in self._plans:
            self._plans[key] = (graph.compile(optimize=self.optimize, memory_limit=self.memory_limit,
                                              scan=self.scan), norm)
        return self._plans[key]

    def _sampled_indices(self) -> set:
        return {self.index_of[n] for n in self._sampled}

    def _layout(self, data: Mapping[str, object]) -> Layout:
        if self.model.version != self._version:
            raise TMCError("the model was changed (a site or plate declared) after this estimator was built; "
                           "build the estimator again")
        # an enumerated latent whose support size is known only from its prior gets it in trace()
        sizes = {i: 1 if s is None else s for i, s in self._sizes.items()}
        return Layout(self.model, self.index_of, sizes, data_batch_shape(self.model, data), self._slots, self._probed)

    #: ``rng(name)``: a context manager around the random draws of latent ``name`` (sharded TMC)
    _rng: Optional[Callable[[str], ContextManager[object]]] = None

    def _trace(self, data: Mapping[str, object], **kw) -> Tuple[Trace, Plan, float]:
        tr = trace(self.model, self._layout(data), data, rng=self._rng, groups=self._groups, **kw)
        plan, norm = self._plan_for(tuple(tr.layout.index_sizes.items()))
        return tr, plan, norm

    def _trace_only(self, data: Mapping[str, object]) -> Tuple[Trace, FactorGraph, float]:
        tr = trace(self.model, self._layout(data), data)
        graph, norm = self._graph_for(tuple(tr.layout.index_sizes.items()))
        return tr, graph, norm

    @property
    def plan(self) -> Plan:
        """The compiled plan.

        (built at construction, or at the first evaluation when an enumerated latent's support size depends on its
        parents).
        """
        if not self._plans:
            raise TMCError("the plan is built at the first evaluation: an enumerated latent's support size "
                           "is known only from its prior")
        return next(reversed(self._plans.values()))[0]


def check_k(name: str, k: object) -> int:
    """``k`` if it is a positive int, else a `TMCError` naming latent ``name``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise TMCError(f"K for latent {name!r} must be a positive int, got {k!r}")
    return k


def enumerated_size(model: Model, name: str) -> Optional[int]:
    """Support size of an enumerated latent without parents (else None: known at evaluation)."""
    site = model.sites[name]
    if site.parents:
        return None
    d = call_site_fn(f"latent {name!r} prior", site.fn, [])
    if not getattr(d, "has_enumerate_support", False):
        raise TMCError(
            f"latent {name!r}: enumerate=True needs a prior with enumerable support (Bernoulli, Categorical, ...), "
            f"got {type(d).__name__}"
        )
    return int(d.enumerate_support(expand=False).shape[0])

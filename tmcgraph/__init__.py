"""tmcgraph: graph-compiled Tensor Monte Carlo for PyTorch.

Factor graphs of sample indices compiled into optimized log-domain contractions.

The public names are loaded on first use (PEP 562), so ``tmcgraph --help`` and ``import tmcgraph.errors``
do not import torch; ``from tmcgraph import Model`` imports what ``Model`` needs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

__version__ = "0.1.0"

#: public name -> the module that defines it
_PUBLIC = {
    "FactorGraph": "graph",
    "FactorSpec": "graph",
    "IWAE": "estimators",
    "IndexSpec": "graph",
    "JointDensity": "density",
    "Model": "model",
    "OPTIMIZERS": "paths",
    "Plan": "plan",
    "Posterior": "estimators",
    "TMC": "estimators",
    "TMCError": "errors",
    "iwae": "estimators",
    "log_einsum": "logeinsum",
    "log_einsum_plan": "logeinsum",
    "smc": "estimators",
}

__all__ = ["FactorGraph", "FactorSpec", "IWAE", "IndexSpec", "JointDensity", "Model", "OPTIMIZERS", "Plan",
           "Posterior", "TMC", "TMCError", "iwae", "log_einsum", "log_einsum_plan", "smc", "__version__"]

if TYPE_CHECKING:  # what the names are, for type checkers and the API reference
    from .density import JointDensity
    from .errors import TMCError
    from .estimators import IWAE, TMC, Posterior, iwae, smc  # type: ignore[no-redef]
    from .graph import FactorGraph, FactorSpec, IndexSpec
    from .logeinsum import log_einsum, log_einsum_plan
    from .model import Model
    from .paths import OPTIMIZERS
    from .plan import Plan


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``tmcgraph.testing``), imported on first use."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_PUBLIC))

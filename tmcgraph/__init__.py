"""tmcgraph: graph-compiled Tensor Monte Carlo for PyTorch.

Factor graphs of sample indices compiled into optimized log-domain contractions.
"""

from .errors import TMCError
from .graph import FactorGraph, FactorSpec, IndexSpec
from .logeinsum import log_einsum, log_einsum_plan
from .paths import OPTIMIZERS
from .plan import Plan

__version__ = "0.1.0"

__all__ = [
    "FactorGraph",
    "FactorSpec",
    "IndexSpec",
    "OPTIMIZERS",
    "Plan",
    "TMCError",
    "log_einsum",
    "log_einsum_plan",
    "__version__",
]

"""tmcgraph: graph-compiled Tensor Monte Carlo for PyTorch.

Factor graphs of sample indices compiled into optimized log-domain contractions.
"""

from .density import JointDensity
from .errors import TMCError
from .estimators import IWAE, TMC, Posterior, iwae, smc
from .graph import FactorGraph, FactorSpec, IndexSpec
from .logeinsum import log_einsum, log_einsum_plan
from .model import Model
from .paths import OPTIMIZERS
from .plan import Plan

__version__ = "0.1.0"

__all__ = [
    "FactorGraph",
    "FactorSpec",
    "IWAE",
    "IndexSpec",
    "JointDensity",
    "Model",
    "OPTIMIZERS",
    "Plan",
    "Posterior",
    "TMC",
    "TMCError",
    "iwae",
    "log_einsum",
    "log_einsum_plan",
    "smc",
    "__version__",
]

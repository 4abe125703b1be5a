"""The TMC paper's experiments, one module each, behind the ``tmcgraph`` command line.

* `.treewidth`: appendix H (TMC vs IWAE on a random sparse linear-Gaussian model).
* `.gaussian`: Fig. 7 (TMC, SMC, IWAE vs the Kalman filter on a chain).
* `.dregs`: the DReGs surrogate (appendix F): gradient signal-to-noise ratio
  against K, and proposals trained with each gradient.
"""

from .dregs import dregs_experiment, dregs_snr, dregs_training, global_local_problem
from .gaussian import chain_data, chain_model, gaussian_experiment, gaussian_point, kalman_log_marginal
from .treewidth import SparseProblem, sparse_data, sparse_model, sparse_problem, treewidth_experiment

__all__ = [
    "SparseProblem",
    "chain_data",
    "chain_model",
    "dregs_experiment",
    "dregs_snr",
    "dregs_training",
    "gaussian_experiment",
    "gaussian_point",
    "global_local_problem",
    "kalman_log_marginal",
    "sparse_data",
    "sparse_model",
    "sparse_problem",
    "treewidth_experiment",
]

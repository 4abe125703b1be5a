"""Learning proposals and parameters from massively parallel importance weights: VI, DReGs, MP-RWS and QEM.

`fit` runs one of `METHODS` on a declared model; `mean_field` builds its learnable exponential-family
proposals (`families`).  See docs/learning.md for the estimators' definitions.
"""

from .families import FAMILIES, Beta, Categorical, Dirichlet, ExpFamily, Gamma, Normal, mean_field
from .fitting import METHODS, FitResult, fit, predictive_log_likelihood

__all__ = ["Beta", "Categorical", "Dirichlet", "ExpFamily", "FAMILIES", "FitResult", "Gamma", "METHODS", "Normal",
           "fit", "mean_field", "predictive_log_likelihood"]

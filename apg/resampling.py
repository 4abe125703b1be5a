"""Resampling from log-weights (the implementation lives in :mod:`tmcgraph.resampling`).

``resample(log_w, scheme)`` -> ancestors ``(*batch, L)``; ``gather(values, ancestors)``;
``SCHEMES`` lists ``"multinomial"`` and ``"systematic"``.
"""

from tmcgraph.resampling import SCHEMES, gather, multinomial, resample, systematic

__all__ = ["SCHEMES", "gather", "multinomial", "resample", "systematic"]

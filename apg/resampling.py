"""Resampling from log-weights (the implementation lives in `tmcgraph.resampling`).

``resample(log_weights, scheme, generator=g)`` -> ancestors ``(*batch, L)``;
``gather(values, ancestors)``; ``SCHEMES`` lists ``"multinomial"`` and ``"systematic"``.
Errors are `tmcgraph.TMCError` (a ``ValueError``, like `apg.APGError`).
"""

from tmcgraph.resampling import SCHEMES, gather, multinomial, resample, systematic

__all__ = ["SCHEMES", "gather", "multinomial", "resample", "systematic"]

"""Resampling from log-weights (the implementation lives in :mod:`tmcgraph.resampling`).

``resample(log_weights, scheme, generator=g)`` -> ancestors ``(*batch, L)``;
``gather(values, ancestors)``; ``SCHEMES`` lists ``"multinomial"`` and ``"systematic"``.
Errors are :class:`tmcgraph.TMCError` (a ``ValueError``, like :class:`apg.APGError`).
"""

from tmcgraph.resampling import SCHEMES, gather, multinomial, resample, systematic

__all__ = ["SCHEMES", "gather", "multinomial", "resample", "systematic"]

"""The one error type of apg."""

__all__ = ["APGError"]


class APGError(ValueError):
    """Bad input to apg (a setting, a model name, a checkpoint, a shape).

    The message says what was expected, what was found and, where there is one, the command-line flag to change.

    It derives from ``ValueError`` as `tmcgraph.TMCError` does, so ``except ValueError`` catches
    both packages' errors (resampling errors come from tmcgraph).
    """

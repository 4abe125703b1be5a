"""The one error type of tmcgraph."""

__all__ = ["TMCError"]


class TMCError(ValueError):
    """Bad input to tmcgraph.

    The message names the factor, index, plate, operand or argument, says what was expected and what was found.
    """

"""argparse types and the help formatter shared by the command lines (``tmcgraph``, ``apg``) and the benchmarks.

Each type turns a bad value into a usage error (exit status 2) that says what was expected, before any work
is done.  The module imports neither torch nor the engine, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from typing import Any, Callable, List

__all__ = ["HelpFormatter", "at_least", "list_of", "non_negative_int", "output_dir", "output_file",
           "positive_float", "positive_int", "probability"]


def _number(convert: Callable[[str], Any], ok: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)`` accepted when ``ok``; else a usage error saying ``what`` was expected."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what
    return parse


positive_int = _number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
positive_float = _number(float, lambda v: v > 0, "a positive number")
probability = _number(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]")


def at_least(n: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least ``n``."""
    return _number(int, lambda v: v >= n, f"an integer of at least {n}")


def _nearest_existing(path: str) -> str:
    """``path`` itself if it exists, else its nearest existing ancestor ('.' for a relative path)."""
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def output_file(text: str) -> str:
    """An argparse type: a file to write (``--plot``).

    Its folder must exist and be writable, and the path must not be a folder, so a bad
    path is a usage error before any work is done.
    """
    folder = os.path.dirname(os.path.abspath(text))
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; expected a file path such as {text.rstrip('/')}/x.png")
    if not os.path.isdir(folder):
        what = "is not a folder" if os.path.lexists(folder) else "does not exist"
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {folder!r} {what}")
    if not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: the folder {folder!r} is not writable")
    return text


def output_dir(text: str) -> str:
    """An argparse type: a folder to write into (``--plots``, ``--out``), created if missing.

    It must be a folder if it exists, and otherwise
    creatable (its nearest existing ancestor a writable folder).
    """
    existing = _nearest_existing(text)
    if os.path.lexists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"cannot create the folder {text!r}: {existing!r} is not a folder")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {existing!r} is not writable")
    return text


def list_of(item: Callable[[str], Any], what: str) -> Callable[[str], List[Any]]:
    """An argparse type: a comma-separated list of ``item`` values."""

    def parse(text: str) -> List[Any]:
        try:
            values = [item(v) for v in text.split(",") if v.strip()]
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {what}, got {text!r}")
        return values

    return parse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's default in its help, unless it has none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "(default" in text or default is None or default is False or default == argparse.SUPPRESS \
                or not action.option_strings:
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown})"

"""The models apg trains and evaluates, by name (``apg train NAME``, ``apg evaluate NAME``).

Each model is a `Problem`; `get` looks one up and
lists the valid names when the name is unknown.
"""

from __future__ import annotations

from typing import Callable, Dict, List

from ..errors import APGError
from .base import Method, Problem

__all__ = ["Method", "Problem", "get", "names", "register"]

_REGISTRY: Dict[str, Callable[[], Problem]] = {}


def register(name: str, factory: Callable[[], Problem]) -> None:
    """Make ``factory()`` the problem called ``name``."""
    if name in _REGISTRY:
        raise APGError(f"a model called {name!r} is already registered")
    _REGISTRY[name] = factory


def names() -> List[str]:
    """The registered model names."""
    return sorted(_REGISTRY)


def get(name: str) -> Problem:
    """The problem called ``name``.

    Raises:
        APGError: an unknown name (the valid ones are listed).
    """
    if name not in _REGISTRY:
        raise APGError(f"unknown model {name!r}; valid: {names()}")
    return _REGISTRY[name]()


def _gmm() -> Problem:
    from .gmm import GMMProblem

    return GMMProblem()


register("gmm", _gmm)


def _dgmm() -> Problem:
    from .dgmm import DGMMProblem

    return DGMMProblem()


register("dgmm", _dgmm)


def _bmnist() -> Problem:
    from .bmnist.problem import BMNISTProblem

    return BMNISTProblem()


register("bmnist", _bmnist)

"""Supports: a proposal's must contain its prior's; observed values must lie in their likelihood's.

Importance weights ``p(z) / q(z)`` are unbiased only if ``q`` puts mass everywhere ``p`` does, so the
rule for a latent is *containment*: the proposal's support must contain the prior's.  A wider
proposal is valid (``Normal`` for a ``HalfNormal`` prior, ``Uniform(0, 2)`` for ``Uniform(0, 1)``):
the prior's log-density is ``-inf`` at samples outside its support (`log_prob_in_support`),
never an exception.  A narrower one is refused, naming the latent.

Supports are compared as ranges: real intervals (``real``, ``positive``, ``nonnegative``,
``interval``, ``unit_interval``, ...) by their bounds, elementwise when the bounds are tensors,
ignoring whether an endpoint is included (a point has no mass under a density, so ``positive``
lies within ``nonnegative`` and the other way round); integer ranges (``boolean``,
``integer_interval``, ``nonnegative_integer``, ...) by their bounds, endpoints included.  A
discrete proposal for a continuous prior (or the reverse) is refused: the weight would divide a
mass by a density.  Other supports (``simplex``, ``positive_definite``, ...) must be equal.

Checks on tensors go through `Checks`: eagerly they raise at once; inside ``torch.compile``'d
code (no host sync there) they are collected as flags that the caller checks once, after the program.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Tuple, Union

import torch
from torch.distributions import Distribution, constraints

from .errors import TMCError

__all__ = ["Checks", "check_proposal", "log_prob_in_support", "observed_log_prob", "observed_support", "unvalidated"]

_Bound = Union[float, torch.Tensor]


@dataclass(frozen=True)
class _Range:
    """A support as a range: ``[lower, upper]`` of reals (``discrete=False``) or of integers."""

    discrete: bool
    lower: _Bound
    upper: _Bound


def _dependent(c: constraints.Constraint) -> bool:
    """``constraints.is_dependent``, which torch.compile does not trace."""
    return isinstance(c, constraints._Dependent)


def _unwrap(c: constraints.Constraint) -> constraints.Constraint:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


def _range(c: constraints.Constraint) -> Optional[_Range]:
    """The range of a support, or ``None`` for a support that is not a range (simplex, ...)."""
    c = _unwrap(c)
    inf = math.inf
    if isinstance(c, constraints._Real):
        return _Range(False, -inf, inf)
    if isinstance(c, (constraints._GreaterThan, constraints._GreaterThanEq)):
        return _Range(False, c.lower_bound, inf)
    if isinstance(c, constraints._LessThan):
        return _Range(False, -inf, c.upper_bound)
    if isinstance(c, (constraints._Interval, constraints._HalfOpenInterval)):
        return _Range(False, c.lower_bound, c.upper_bound)
    if isinstance(c, constraints._Boolean):
        return _Range(True, 0, 1)
    if isinstance(c, constraints._IntegerInterval):
        return _Range(True, c.lower_bound, c.upper_bound)
    if isinstance(c, constraints._IntegerGreaterThan):
        return _Range(True, c.lower_bound, inf)
    if isinstance(c, constraints._IntegerLessThan):
        return _Range(True, -inf, c.upper_bound)
    return None


def _le(a: _Bound, b: _Bound) -> Union[bool, torch.Tensor]:
    """``a <= b`` elementwise: a bool for numbers, a 0-d bool tensor when either is a tensor."""
    if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
        return bool(a <= b)
    # a 0-d tensor made from a number compares with a tensor on any device
    return (torch.as_tensor(a).detach() <= torch.as_tensor(b).detach()).all()


def _same(a: constraints.Constraint, b: constraints.Constraint) -> Union[bool, torch.Tensor]:
    """Equality of two supports that are not ranges: one type, equal attributes."""
    if type(a) is not type(b):
        return False
    va, vb = vars(a), vars(b)
    if va.keys() != vb.keys():
        return False
    verdict: Union[bool, torch.Tensor] = True
    for k in va:
        x, y = va[k], vb[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            try:
                verdict = verdict & (torch.as_tensor(x).detach() == torch.as_tensor(y).detach()).all()
            except RuntimeError:  # shapes that do not broadcast: not the same set
                return False
        elif isinstance(x, constraints.Constraint) and isinstance(y, constraints.Constraint):
            verdict = verdict & _same(x, y)
        elif x != y:
            return False
    return verdict


def _bound(b: _Bound) -> str:
    if isinstance(b, torch.Tensor):
        lo, hi = float(b.min()), float(b.max())
        return f"{lo:g}" if lo == hi else f"{lo:g}..{hi:g}"
    return f"{b:g}"


def describe(c: constraints.Constraint) -> str:
    """A support in words, its tensor bounds summarised: ``"reals in [0, 1]"``, ``"integers in [0, 3]"``."""
    r = _range(c)
    if r is None:
        return str(c)
    return f"{'integers' if r.discrete else 'reals'} in [{_bound(r.lower)}, {_bound(r.upper)}]"


class Checks:
    """The value checks of one evaluation.

    `require` raises a `TMCError` at once when a check fails, eagerly; inside
    ``torch.compile``'d code, where a host sync would break the graph, it records the check's flag
    instead, and `passed` is then the conjunction (a 0-d bool tensor) for the caller to check
    after the program (and to evaluate eagerly again, which raises, when it is false).
    """

    def __init__(self) -> None:
        self.flags: List[torch.Tensor] = []

    def require(self, ok: Union[bool, torch.Tensor], message: Callable[[], str]) -> None:
        """Check ``ok`` (a bool, or a bool tensor that must be true everywhere); ``message()`` is the error."""
        if isinstance(ok, bool):
            if not ok:
                raise TMCError(message())
            return
        if torch.compiler.is_compiling():
            self.flags.append(ok.all())
        elif not bool(ok.all()):
            raise TMCError(message())

    def passed(self) -> Optional[torch.Tensor]:
        """Inside compiled code: whether every recorded check held (``None`` when none was recorded)."""
        if not self.flags:
            return None
        return torch.stack(self.flags).all()


def check_proposal(name: str, prior: Distribution, proposal: Distribution, checks: Checks) -> bool:
    """Check that ``proposal``'s support contains ``prior``'s (see the module docstring).

    Returns:
        whether the prior's log-density must be masked (`log_prob_in_support`): ``False`` only
        when the two supports are the same without looking at tensor values.

    Raises:
        TMCError: naming the latent, when the event shapes differ, the proposal's support does
            not contain the prior's, or one is discrete and the other continuous.
    """
    if tuple(prior.event_shape) != tuple(proposal.event_shape):
        raise TMCError(f"latent {name!r}: the proposal's event shape {tuple(proposal.event_shape)} differs from the "
                       f"prior's {tuple(prior.event_shape)}")
    try:
        inner, outer = prior.support, proposal.support
    except NotImplementedError:
        return True
    if inner is None or outer is None or _dependent(inner) or _dependent(outer):
        return True
    if inner is outer:
        return False
    ri, ro = _range(inner), _range(outer)

    def refuse(why: str) -> Callable[[], str]:
        return lambda: (f"latent {name!r}: the proposal's support ({describe(outer)}) does not contain the prior's "
                        f"({describe(inner)}; {why}); importance weights need a proposal that can draw every value the "
                        "prior can (a wider proposal is fine: the prior's density is zero outside its support)")

    if ri is None or ro is None:
        checks.require(_same(inner, outer) if ri is None and ro is None else False, refuse("different kinds of set"))
        return False
    if ri.discrete != ro.discrete:
        kinds = ("discrete", "continuous") if ro.discrete else ("continuous", "discrete")
        checks.require(False, refuse(f"a {kinds[0]} proposal for a {kinds[1]} prior"))
    checks.require(_le(ro.lower, ri.lower), refuse("its lower bound is above the prior's"))
    checks.require(_le(ri.upper, ro.upper), refuse("its upper bound is below the prior's"))
    tensors = any(isinstance(b, torch.Tensor) for b in (ri.lower, ri.upper, ro.lower, ro.upper))
    return tensors or (ri.lower, ri.upper) != (ro.lower, ro.upper)


@contextlib.contextmanager
def unvalidated(d: Distribution) -> Iterator[None]:
    """Within the block, ``d`` (and the distributions it wraps) skip torch's argument validation of values."""
    touched: List[Tuple[Distribution, object]] = []
    stack = [d]
    while stack:
        x = stack.pop()
        if any(x is y for y, _ in touched):
            continue
        touched.append((x, x.__dict__.get("_validate_args", _MISSING)))
        x._validate_args = False
        stack.extend(v for v in vars(x).values() if isinstance(v, Distribution))
    try:
        yield
    finally:
        for x, old in touched:
            if old is _MISSING:
                del x._validate_args
            else:
                x._validate_args = bool(old)


_MISSING = object()


def log_prob_in_support(d: Distribution, value: torch.Tensor) -> torch.Tensor:
    """``d.log_prob(value)``, ``-inf`` where ``value`` is outside ``d``'s support (a sample of a wider proposal).

    The gradient there is zero.
    """
    try:
        support = d.support
    except NotImplementedError:
        support = None
    if support is None or _dependent(support):
        return d.log_prob(value)
    r = _range(support)
    if (r is not None and not r.discrete and not isinstance(r.lower, torch.Tensor)
            and not isinstance(r.upper, torch.Tensor) and r.lower == -math.inf and r.upper == math.inf):
        return d.log_prob(value)  # the whole real line: nothing to mask (the batched priors' usual case)
    inside = support.check(value)
    with unvalidated(d):
        lp = d.log_prob(value)
    return torch.where(inside, lp, torch.full((), -math.inf, dtype=lp.dtype, device=lp.device))


def observed_support(d: Distribution, index_dims: List[int]) -> Optional[constraints.Constraint]:
    """The support an observed value must lie in, when it does not depend on the latents' samples.

    ``index_dims``: the positions of the layout's sample-index dims, counted from the right of the
    distribution's batch shape.  A support whose tensor bounds vary along one of them (a ``Uniform(0, z)``
    likelihood) depends on the samples: a value outside it has probability zero under those samples,
    not a mistake, so ``None`` is returned (and the log-density is masked instead).
    """
    try:
        support = d.support
    except NotImplementedError:
        return None
    if support is None or _dependent(support):
        return None
    base = _unwrap(support)
    e = len(d.event_shape)
    for v in vars(base).values():
        if not isinstance(v, torch.Tensor):
            continue
        for pos in index_dims:
            dim = v.dim() - e + pos
            if 0 <= dim < v.dim() and v.shape[dim] > 1 and v.stride(dim) != 0:
                return None
    return support


def observed_log_prob(owner: str, d: Distribution, value: torch.Tensor, index_dims: List[int], checks: Checks
                      ) -> Tuple[torch.Tensor, Optional[constraints.Constraint]]:
    """The likelihood's log-density of an observed value, after checking the value.

    The value's event shape must be the likelihood's (nothing is broadcast into it), and a value outside a
    support that does not depend on the samples (`observed_support`) is an error naming the
    observation; under a support that does, the log-density is ``-inf`` there.  A likelihood built with
    ``validate_args=False`` (or with torch's validation switched off) is taken at its word, as torch
    does: its value is not checked (a ``Bernoulli`` of grey levels in ``[0, 1]``, say).

    Args:
        owner: the observation, as errors name it (``"observation 'x'"``).
        d: its likelihood, in the layout.
        value: the value in the layout ``(*batch, *layout dims, *event)``.
        index_dims: the sample-index dims' positions from the right of the batch shape.
        checks: where a check on values goes (`Checks`).

    Returns:
        ``(log-density, the support checked or None)``.
    """
    e = len(d.event_shape)
    got = tuple(value.shape[value.dim() - e:]) if e else ()
    if value.dim() < e or got != tuple(d.event_shape):
        raise TMCError(f"{owner}: the value's event shape {got} differs from the likelihood's "
                       f"{tuple(d.event_shape)} ({type(d).__name__}); the value is laid out (*batch, *plates, *event)")
    if not d._validate_args:  # validation switched off (validate_args=False): the user's call, as in torch
        return d.log_prob(value), None
    support = observed_support(d, index_dims)
    if support is None:
        return log_prob_in_support(d, value), None
    ok = support.check(value)

    def message() -> str:
        v = value.detach()
        bad = v[~ok].flatten()[:3].tolist() if ok.shape == v.shape[: v.dim() - e] and e == 0 else []
        example = f" (e.g. {', '.join(f'{x:g}' for x in bad)})" if bad else ""
        return (f"{owner}: the value lies outside the support ({describe(support)}) of its likelihood "
                f"{type(d).__name__}"
                f"{example}; observed values must be possible under the model")

    checks.require(ok, message)
    return d.log_prob(value), support

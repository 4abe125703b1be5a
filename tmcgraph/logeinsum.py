"""``log_einsum``: einsum in the log semiring, planned like opt_einsum."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from opt_einsum import get_symbol

from .compile import check_memory_limit, check_optimize, compile_stages, label_treewidth, make_plan
from .errors import TMCError
from .evaluate import check_operands, check_result, run
from .plan import Plan
from .stages import InputSpec

__all__ = ["ParsedEquation", "log_einsum", "log_einsum_plan", "parse_equation"]

_ELLIPSIS_BASE = 1000  # opt_einsum symbols from here on are never letters


@dataclass(frozen=True)
class ParsedEquation:
    """An equation with ellipses expanded into labels, diagonals taken and size-1 broadcast dims removed.

    What the planner sees.

    Attributes:
        terms: label string per operand, after normalisation.
        output: labels of the result.
        sizes: size of every label.
        diagonals: per operand, the pairs of dims to take a diagonal of (in order).
        squeeze: per operand, dims of size 1 to drop (broadcast along their label).
        names: label -> how the user wrote it (a letter, or ``...k`` for ellipsis dims).
    """

    terms: Tuple[str, ...]
    output: str
    sizes: Tuple[Tuple[str, int], ...]
    diagonals: Tuple[Tuple[Tuple[int, int], ...], ...]
    squeeze: Tuple[Tuple[int, ...], ...]
    names: Tuple[Tuple[str, str], ...]


def _split_term(term: str, where: str) -> Tuple[str, bool]:
    has_ellipsis = "..." in term
    if term.count("...") > 1:
        raise TMCError(f"{where}: '...' may appear at most once, got {term!r}")
    letters = term.replace("...", "")
    bad = [c for c in letters if not c.isalpha() or not c.isascii()]
    if bad:
        raise TMCError(f"{where}: labels must be ASCII letters or '...', got {bad[0]!r} in {term!r}")
    return term, has_ellipsis


@functools.lru_cache(maxsize=512)
def parse_equation(equation: str, shapes: Tuple[Tuple[int, ...], ...]) -> ParsedEquation:
    """Parse ``equation`` against operand ``shapes`` (see `ParsedEquation`).

    Raises:
        TMCError: no explicit ``->``, wrong number of operands, a term whose label
            count does not match its tensor, mismatched sizes (names both operands).
    """
    eq = equation.replace(" ", "")
    if eq.count("->") != 1:
        raise TMCError(f"equation {equation!r} must have exactly one explicit '->' (e.g. 'ij,jk->ik')")
    lhs, rhs = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise TMCError(f"equation {equation!r} has {len(terms)} operand terms but {len(shapes)} tensors were given")
    n_ellipsis = 0
    expanded: List[str] = []
    raw = []
    for k, (term, shape) in enumerate(zip(terms, shapes)):
        term, has_ellipsis = _split_term(term, f"operand {k}")
        letters = term.replace("...", "")
        extra = len(shape) - len(letters)
        if (not has_ellipsis and extra != 0) or extra < 0:
            raise TMCError(
                f"operand {k}: term {term!r} has {len(letters)} labels but the tensor has {len(shape)} dims "
                f"(shape {tuple(shape)})"
            )
        raw.append((term, extra if has_ellipsis else 0))
        n_ellipsis = max(n_ellipsis, extra if has_ellipsis else 0)
    ellipsis = [get_symbol(_ELLIPSIS_BASE + j) for j in range(n_ellipsis)]
    names = {s: f"...{j}" for j, s in enumerate(ellipsis)}
    for term, extra in raw:
        expanded.append(term.replace("...", "".join(ellipsis[n_ellipsis - extra :])))
    rhs, out_has_ellipsis = _split_term(rhs, "output")
    output = rhs.replace("...", "".join(ellipsis)) if out_has_ellipsis else rhs
    if len(set(output)) != len(output):
        raise TMCError(f"output {rhs!r}: a label appears twice")
    for c in output:
        if not any(c in t for t in expanded):
            raise TMCError(f"output label {names.get(c, c)!r} does not appear in any operand")

    # diagonals (repeated labels within a term)
    diagonals: List[Tuple[Tuple[int, int], ...]] = []
    shapes_now: List[List[int]] = []
    terms_now: List[str] = []
    for k, (term, given) in enumerate(zip(expanded, shapes)):
        dims_k = list(given)
        pairs = []
        while len(set(term)) != len(term):
            c = next(c for c in term if term.count(c) > 1)
            i = term.index(c)
            j = term.index(c, i + 1)
            if dims_k[i] != dims_k[j]:
                raise TMCError(f"operand {k}: repeated label {c!r} has sizes {dims_k[i]} and {dims_k[j]}")
            pairs.append((i, j))
            size = dims_k[i]
            term = term[:i] + term[i + 1 : j] + term[j + 1 :] + c
            dims_k = dims_k[:i] + dims_k[i + 1 : j] + dims_k[j + 1 :] + [size]
        diagonals.append(tuple(pairs))
        shapes_now.append(dims_k)
        terms_now.append(term)

    sizes: Dict[str, int] = {}
    owner: Dict[str, int] = {}
    for k, (term, dims) in enumerate(zip(terms_now, shapes_now)):
        for c, size in zip(term, dims):
            if size == 0:
                raise TMCError(f"operand {k}: label {names.get(c, c)!r} has size 0; empty dims are not supported")
            if c in sizes and size != sizes[c] and 1 not in (size, sizes[c]):
                raise TMCError(
                    f"operand {k}: label {names.get(c, c)!r} has size {size} but operand {owner[c]} has size "
                    f"{sizes[c]}; sizes must match or be 1 (broadcast)"
                )
            if size > sizes.get(c, 0):
                sizes[c], owner[c] = size, k
    squeeze: List[Tuple[int, ...]] = []
    final_terms = []
    for term, dims in zip(terms_now, shapes_now):
        drop = tuple(i for i, (c, size) in enumerate(zip(term, dims)) if size == 1 and sizes[c] > 1)
        squeeze.append(drop)
        final_terms.append("".join(c for i, c in enumerate(term) if i not in drop))
    for c in set(output) - set("".join(final_terms)):  # size-1 everywhere, yet dropped: impossible
        raise AssertionError(c)
    return ParsedEquation(
        terms=tuple(final_terms),
        output=output,
        sizes=tuple(sorted(sizes.items())),
        diagonals=tuple(diagonals),
        squeeze=tuple(squeeze),
        names=tuple(sorted(names.items())),
    )


@functools.lru_cache(maxsize=512)
def _plan(parsed: ParsedEquation, optimize: str, memory_limit: Optional[int]) -> Plan:
    sizes = dict(parsed.sizes)
    stages = compile_stages(list(parsed.terms), parsed.output, sizes, input_ids=range(len(parsed.terms)),
                            first_value=len(parsed.terms), optimize=optimize, memory_limit=memory_limit)
    inputs = tuple(
        InputSpec(str(k), term, tuple(sizes[c] for c in term), tuple(f"label {c!r}" for c in term), kind="operand")
        for k, term in enumerate(parsed.terms)
    )
    names = dict(parsed.names)
    names.update({c: c for c in sizes if c not in names})
    log10_naive = sum(math.log10(s) for s in sizes.values()) + math.log10(max(1, len(parsed.terms)))
    return make_plan(
        inputs=inputs,
        stages=tuple(stages),
        output_labels=parsed.output,
        label_names=tuple(sorted(names.items())),
        constant=0.0,
        treewidth=label_treewidth(parsed.terms),
        log10_naive_flops=log10_naive,
        optimize=optimize,
        memory_limit=memory_limit,
    )


def log_einsum_plan(
    equation: str, *shapes: Sequence[int], optimize: str = "auto", memory_limit: Optional[int] = None
) -> Plan:
    """The (cached) `Plan` that `log_einsum` would run for operands of these shapes.

    Inspect ``plan.describe()``, ``plan.flops``, ``plan.path``.
    """
    return _parse_and_plan(equation, tuple(tuple(int(d) for d in s) for s in shapes), optimize, memory_limit)[1]


def _parse_and_plan(
    equation: str, shapes: Tuple[Tuple[int, ...], ...], optimize: str, memory_limit: Optional[int]
) -> Tuple[ParsedEquation, Plan]:
    check_optimize(optimize)
    check_memory_limit(memory_limit)
    parsed = parse_equation(equation, shapes)
    return parsed, _plan(parsed, optimize, memory_limit)


def log_einsum(
    equation: str, *log_operands: torch.Tensor, optimize: str = "auto", memory_limit: Optional[int] = None
) -> torch.Tensor:
    """Einsum in the log semiring: ``log(einsum(equation, *[exp(x) for x in log_operands]))``.

    Computed without overflow or underflow along a path planned once per equation
    and shapes (cached).  Each pairwise step shifts both operands by their maxima
    over the summed labels, exponentiates, contracts with BLAS and takes the log
    (appendix E of the TMC paper); the entries where that loses precision are
    detected and recomputed with a blocked logsumexp.

    The following are equivalent (up to rounding, where the right side does not
    overflow)::

        log_einsum("ij,jk->ik", a, b)
        torch.einsum("ij,jk->ik", a.exp(), b.exp()).log()

    Args:
        equation: numpy/torch einsum syntax with an explicit ``->``; ``...``
            broadcasts as in ``torch.einsum`` (and is summed if absent from the
            output); a label repeated in one term takes a diagonal.
        *log_operands: floating tensors of log-values; ``-inf`` means zero.
        optimize: path optimizer: ``"auto"`` (tree decomposition vs opt_einsum,
            cheaper kept), or one of ``tmcgraph.paths.OPTIMIZERS``.
        memory_limit: largest intermediate allowed, in elements; bigger ones are
            computed in slices (kept labels first, then summed ones accumulated
            by logsumexp); the value is unchanged.

    Returns:
        the log-domain result, shaped by the output labels.  ``-inf`` exactly
        where every term is ``-inf``; gradients are finite (zero for terms of zero
        weight).

    Example::

        >>> a, b = torch.randn(3, 4), torch.randn(4, 5)
        >>> torch.allclose(log_einsum("ij,jk->ik", a, b), (a[:, :, None] + b).logsumexp(1))
        True
    """
    if not log_operands:
        raise TMCError("log_einsum needs at least one operand")
    for k, t in enumerate(log_operands):
        if not isinstance(t, torch.Tensor):
            raise TMCError(f"operand {k}: expected a torch.Tensor, got {type(t).__name__}")
    shapes = tuple(tuple(t.shape) for t in log_operands)
    parsed, plan = _parse_and_plan(equation, shapes, optimize, memory_limit)
    tensors = []
    for t, pairs, drop in zip(log_operands, parsed.diagonals, parsed.squeeze):
        for i, j in pairs:
            t = t.diagonal(dim1=i, dim2=j)
        if drop:
            t = t.squeeze(drop)
        tensors.append(t)
    tensors = check_operands(tensors, plan.inputs)
    result = run(plan, tensors)
    check_result(result, tensors, plan.inputs)
    return result

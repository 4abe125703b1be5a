"""The plan IR: what the compiler (`tmcgraph.compile`) produces and the evaluation layer (`tmcgraph.evaluate`) runs.

Plain frozen data over labels and sizes; no tensors.

A plan is a sequence of stages over numbered values: the inputs are ``0..n-1``
and every stage appends one value.

* `EinsumStage`: a log-domain einsum of some values, executed as a
  pairwise path (``steps``), optionally sliced to respect a memory limit;
* `ProductStage`: a plate product, i.e. a sum of log-factors over plate dims;
* `ScanStage`: a chain of pairwise values (a Markov chain's transitions) contracted
  by a parallel scan, ``log2`` of its length batched steps instead of one step per link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple, Union

from .paths import Candidate, PathCost

__all__ = ["InputSpec", "Step", "EinsumStage", "ProductStage", "ScanStage", "Stage"]


@dataclass(frozen=True)
class InputSpec:
    """One input of a plan: its name, labels, non-batch shape and a name per dim (for errors)."""

    name: str
    labels: str
    shape: Tuple[int, ...]
    dims: Tuple[str, ...]
    kind: str = "factor"

    @property
    def what(self) -> str:
        """How errors name this input: its kind and name."""
        return f"{self.kind} {self.name!r}"


@dataclass(frozen=True)
class Step:
    """One pairwise (or unary) contraction of an `EinsumStage`.

    Attributes:
        positions: positions, in the stage's current operand list, of the operands
            (opt_einsum's linear path format); they are removed and the result appended.
        operand_labels: the operands' labels.
        result_labels: the result's labels.
    """

    positions: Tuple[int, ...]
    operand_labels: Tuple[str, ...]
    result_labels: str


@dataclass(frozen=True)
class EinsumStage:
    """A log-einsum of values ``inputs`` (labels ``input_labels``) to ``output_labels``.

    ``steps`` follow ``path`` (linear format).  ``slices`` lists ``(label, chunk)``:
    the stage runs once per chunk of each sliced label; chunks of kept labels are
    concatenated, chunks of summed labels accumulated by logsumexp.
    """

    inputs: Tuple[int, ...]
    input_labels: Tuple[str, ...]
    output_labels: str
    sizes: Tuple[Tuple[str, int], ...]
    path: Tuple[Tuple[int, ...], ...]
    steps: Tuple[Step, ...]
    candidates: Tuple[Candidate, ...]
    slices: Tuple[Tuple[str, int], ...]

    @property
    def cost(self) -> PathCost:
        """The chosen path's cost (the first candidate's)."""
        return self.candidates[0].cost


@dataclass(frozen=True)
class ProductStage:
    """Sum the log-value ``inputs[0]`` over the plate dims not in ``output_labels``, times ``scale``.

    ``scale`` is the product of the summed plates' scales (`tmcgraph.FactorGraph.plate`): a subsampled
    plate's product is raised to that power.
    """

    inputs: Tuple[int]
    input_labels: Tuple[str]
    output_labels: str
    scale: float = 1.0


@dataclass(frozen=True)
class ScanStage:
    """Contract a chain ``l_0 - l_1 - ... - l_n`` of pairwise values by a parallel scan.

    The chain's pairwise values carry the labels ``batch + {l_{k-1}, l_k}`` (either order),
    all of one size ``K``; unary values on an interior label ``l_k`` (labels within
    ``batch + l_k``) are folded into the link that ends at it.  The links are stacked into
    one ``(n, ..., K, K)`` tensor and multiplied pairwise in the log semiring, halving the
    stack each round: ``ceil(log2 n)`` batched steps of ``K^3`` work per link, against the
    ``n`` sequential ``K^2`` steps of message passing; it pays where per-step dispatch, not
    arithmetic, bounds the chain (small ``K``, long chains, accelerators).

    Attributes:
        inputs: value ids: the chain's pairwise values in chain order, then its unary values.
        input_labels: their labels.
        chain: ``l_0 .. l_n``.
        unary: for each unary input, the position ``k`` (``1 .. n-1``) of its label in ``chain``.
        batch: the labels every pairwise value carries besides its two chain labels (kept).
        output_labels: ``batch + l_0 + l_n``.
    """

    inputs: Tuple[int, ...]
    input_labels: Tuple[str, ...]
    chain: str
    unary: Tuple[int, ...]
    batch: str
    output_labels: str


Stage = Union[EinsumStage, ProductStage, ScanStage]

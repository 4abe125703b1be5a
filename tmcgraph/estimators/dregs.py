"""DReGs for TMC: an unbiased surrogate and the paper's biased eq. 60.

The surrogate whose gradient w.r.t. proposal parameters is unbiased for ``grad E[log P_TMC]`` with per-sample weights,
and the paper's eq. 60 (Aitchison, NeurIPS 2019, appendix F), which is biased for more than one latent.  The derivation
is in ``docs/estimators/dregs.md`` and in `tmcgraph.TMC.dregs_surrogate`.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch

from ..declaration import ModelBase as Model
from ..errors import TMCError
from ..evaluate import Evaluator
from ..layout import factor_indices
from ..plan import Plan
from ..trace import Trace

__all__ = ["check_factorised", "paper_surrogate", "surrogate"]


def check_factorised(model: Model, sampled: Sequence[str]) -> None:
    """Refuse a latent whose proposal has latent parents (a mixture over their samples), naming it."""
    for name in sampled:
        mixed = [p for p in model.sites[name].proposal_parents if model.sites[p].kind == "latent"]
        if mixed:
            raise TMCError(
                f"latent {name!r}: its proposal takes latent parent(s) {mixed}, so TMC samples it from a "
                "mixture over their samples (appendix C); dregs_surrogate supports factorised proposals "
                "(parents that are observations, or none). Use the reparameterised gradient of log_marginal"
            )


def surrogate(model: Model, tr: Trace, plan: Plan, norm: float, sampled: Sequence[str], *,
              backend: str = "eager", log_sum: Optional[Callable[[Dict[str, torch.Tensor]], torch.Tensor]] = None,
              marginal_scale: Optional[Callable[[str], float]] = None) -> torch.Tensor:
    """The TMC DReGs surrogate of a trace made with ``detach_samples=True`` (see `TMC.dregs_surrogate`).

    Args:
        model: the model.
        tr: the trace; its factors are functions of the detached sample leaves.
        plan: the compiled plan of the trace's index sizes.
        norm: the log-normaliser (``sum log K`` over sampled index copies).
        sampled: the sampled latents.
        backend: the plan's evaluation backend.
        log_sum: evaluates the plan on the factors (default ``plan.log_sum``). Sharded TMC all-reduces
            and divides the replicated factors' gradients by the world size: the derivatives
            ``d log P / d z`` of a replicated latent are then this process's share of the total.
        marginal_scale: ``marginal_scale(latent)`` multiplies the latent factor's gradient back into
            its marginal weights ``m`` (sharded TMC: the world size for replicated latents).

    Returns:
        ``(*batch,)``: value ``log P_TMC``, gradient (w.r.t. proposal parameters)
        ``sum_i sum_k m_i(k) d log P_TMC / d z_i^k d z_i^k / d phi``.
    """
    assert tr.samples is not None
    layout = tr.layout
    with torch.enable_grad():
        total = plan.log_sum(tr.factors, backend=backend) if log_sum is None else log_sum(tr.factors)
        grads = torch.autograd.grad(total.sum(), [tr.factors[n] for n in sampled] + [tr.values[n] for n in sampled])
    nb = len(layout.batch)
    path: Optional[torch.Tensor] = None
    for name, g_factor, g_value in zip(sampled, grads[: len(sampled)], grads[len(sampled):]):
        # m_i(k) per plate element: the factor's gradient summed over its parents' indices
        extra = len(factor_indices(model, layout.index_of, name)) - 1
        m = g_factor.sum(dim=tuple(range(g_factor.dim() - extra, g_factor.dim()))) if extra else g_factor
        if marginal_scale is not None:
            m = m * marginal_scale(name)
        event = tr.event_dims[name]
        g = layout.site_view(g_value, name, event)  # (*batch, *plates, K, *event)
        m = m.reshape(tuple(m.shape) + (1,) * event)
        weight = torch.where(m > 0, m * g, torch.zeros((), dtype=g.dtype, device=g.device))
        z = layout.site_view(tr.samples[name], name, event)
        term = (weight * z).sum(dim=tuple(range(nb, z.dim())))
        path = term if path is None else path + term
    value = total.detach() - norm
    if path is None:
        return value
    return value + (path - path.detach())


def paper_surrogate(tr: Trace, plan: Plan, evaluator: Evaluator) -> torch.Tensor:
    """Appendix F's eq. 60 on a trace made with ``dregs=True`` (biased for more than one latent).

    ``evaluator``: the estimator's `tmcgraph.evaluate.Evaluator`.
    """
    assert tr.hat_factors is not None
    with torch.no_grad():
        log_w = evaluator.log_sum(plan, {n: f.detach() for n, f in tr.factors.items()}, backend="eager")
        log_w2 = evaluator.log_sum(plan, {n: 2 * f.detach() for n, f in tr.factors.items()}, backend="eager")
        ratio = torch.exp(log_w2 - 2 * log_w)
    return 0.5 * ratio * evaluator.log_sum(plan, {n: 2 * f for n, f in tr.hat_factors.items()}, backend="eager")

"""``fit``: learn a model's proposals (and parameters) from massively parallel importance weights.

Four methods, each one step per iteration on a fresh TMC draw of K samples per latent:

* ``"vi"``: gradient ascent on ``log P_TMC`` with reparameterised samples (the TMC bound).
* ``"dregs"``: the proposals by the TMC DReGs surrogate (`tmcgraph.TMC.dregs_surrogate`), the model's
  parameters by ``log P_TMC`` of a draw of their own (the surrogate's gradient is the proposals' only).
* ``"rws"``: massively parallel reweighted wake-sleep (Heap, Leech and Aitchison, UAI 2023).  Wake-phi: the
  proposals ascend ``sum_i sum_k m_i(k) log q_i(z_i^k)``, the TMC posterior's weights ``m`` (held fixed) on the
  samples (held fixed): the inclusive KL's gradient.  Wake-theta: the model's parameters ascend ``log P_TMC`` of
  the same draw (`tmcgraph.Posterior.differentiable_log_marginal`).
* ``"qem"``: QEM (Heap, Bowyer and Aitchison, AABI 2025).  Each exponential-family proposal moves its mean
  parameters towards the TMC posterior's expected sufficient statistics,
  ``m <- (1 - lr) m + lr E_post[T(z)]`` (`tmcgraph.learn.families.ExpFamily.qem_step`); no gradients.  Model
  parameters, if any, take a wake-theta step.

Gradient steps use Adam.  Every step records ``log P_TMC`` of its draw (the estimate the step used) and the
seconds it took; a ``callback`` (held-out evaluation, say) runs outside the timed part.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..errors import TMCError
from ..estimators import TMC
from ..model import Model
from .families import ExpFamily, mean_field

__all__ = ["FitResult", "METHODS", "fit", "predictive_log_likelihood"]

#: the methods of `fit`
METHODS = ("vi", "dregs", "rws", "qem")

#: default step sizes: Adam's learning rate (vi, dregs, rws) and QEM's moving-average step
DEFAULT_LR = {"vi": 0.01, "dregs": 0.01, "rws": 0.01, "qem": 0.1}


@dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        model: the model with the learned proposals attached (`ModelBase.with_proposals`).
        proposals: latent -> its learned proposal.
        estimator: the TMC estimator of ``model`` that ``fit`` used.
        history: ``"elbo"`` (``log P_TMC`` of each step's draw, summed over data batch elements) and
            ``"seconds"`` (each step's time), one entry per step, resumed steps included.
    """

    model: Model
    proposals: Dict[str, ExpFamily]
    estimator: TMC
    history: Dict[str, List[float]] = field(default_factory=lambda: {"elbo": [], "seconds": []})


def fit(model: Model, data: Mapping[str, object], *, method: str = "vi", K: int = 16, steps: int = 1000,
        lr: Optional[float] = None, proposals: Optional[Mapping[str, ExpFamily]] = None,
        model_params: Sequence[torch.nn.Parameter] = (), seed: Optional[int] = 0,
        checkpoint: Optional[str] = None, checkpoint_every: int = 100, progress: bool = True,
        callback: Optional[Callable[[int, "FitResult"], None]] = None,
        estimator_options: Optional[Mapping[str, Any]] = None) -> FitResult:
    """Learn the proposals of ``model`` (and ``model_params``) by ``method`` from TMC draws of K samples per latent.

    Args:
        model: the model; its latents' proposals are replaced by ``proposals``.
        data: observation name -> value ``(*batch, *plates, *event)``, as for `tmcgraph.TMC.log_marginal`.
        method: one of `METHODS`: ``"vi"``, ``"dregs"``, ``"rws"``, ``"qem"`` (module docstring).
        K: samples per latent.
        steps: the total number of steps (a resumed run continues up to it).
        lr: Adam's learning rate, or QEM's moving-average step in ``(0, 1]`` (default `DEFAULT_LR`).
        proposals: latent -> learnable proposal (default ``mean_field(model, data=data)``: a Normal per latent,
            of the latent's event shape).  QEM
            needs every sampled latent's proposal to be an `ExpFamily`.
        model_params: the model's own learnable parameters (wake-theta / ``log P`` gradient).
        seed: seeds torch's generator at the start (``None``: leave it); a resumed run restores the generator's
            state, so it continues exactly as the uninterrupted run would have.
        checkpoint: a file to save to every ``checkpoint_every`` steps, at the end and on ``KeyboardInterrupt``;
            if it exists, the run resumes from it (it must be of the same method, K and seed).
        checkpoint_every: steps between checkpoints.
        progress: show a tqdm progress bar with the latest ``log P``.
        callback: ``callback(step, result)`` after every step, outside the timed part (held-out evaluation).
        estimator_options: keyword arguments of ``Model.compile`` (``groups``, ``optimize``, ``memory_limit``, ...).

    Returns:
        a `FitResult`.

    Raises:
        TMCError: an unknown method, a bad ``lr``/``K``/``steps``, proposals that are not learnable where the
            method needs them, or a checkpoint of another run.
    """
    if method not in METHODS:
        raise TMCError(f"fit: unknown method {method!r}; expected one of {METHODS}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise TMCError(f"fit: steps must be a non-negative int, got {steps!r}")
    lr = DEFAULT_LR[method] if lr is None else lr
    if not (isinstance(lr, (int, float)) and lr > 0) or (method == "qem" and lr > 1):
        raise TMCError(f"fit: lr must be {'in (0, 1]' if method == 'qem' else 'positive'} for method "
                       f"{method!r}, got {lr!r}")
    qs = dict(proposals) if proposals is not None else mean_field(model, data=data)
    sampled = [n for n in model.latents() if not model.sites[n].enumerate]
    if method == "qem":
        missing = [n for n in sampled if not isinstance(qs.get(n), ExpFamily)]
        if missing:
            raise TMCError(f"fit: method 'qem' moment-matches exponential-family proposals; latents {missing} have "
                           "none (give tmcgraph.learn families for every sampled latent, e.g. mean_field(model))")
    fitted = model.with_proposals(qs)
    est = fitted.compile(K=K, **dict(estimator_options or {}))
    result = FitResult(fitted, qs, est)
    q_params = [p for q in qs.values() if isinstance(q, torch.nn.Module) for p in q.parameters()]
    model_params = list(model_params)
    trained = model_params + ([] if method == "qem" else q_params)
    optimizer = torch.optim.Adam(trained, lr=lr) if trained else None
    start = 0
    if seed is not None:
        torch.manual_seed(seed)
    if checkpoint is not None and os.path.exists(checkpoint):
        start = _load(checkpoint, result, optimizer, model_params, method=method, K=K, seed=seed)
    def save(done: int) -> None:
        if checkpoint is not None:
            _save(checkpoint, result, optimizer, model_params, done, method=method, K=K, seed=seed)

    bar = tqdm(total=steps, initial=start, disable=not progress, desc=f"fit {method} K={K}", leave=False)
    try:
        for step in range(start, steps):
            began = time.perf_counter()
            elbo = _step(method, est, data, qs, q_params, model_params, optimizer, lr)
            result.history["seconds"].append(time.perf_counter() - began)
            result.history["elbo"].append(elbo)
            bar.update(1)
            bar.set_postfix(elbo=f"{elbo:.3f}", refresh=False)
            if (step + 1) % checkpoint_every == 0:
                save(step + 1)
            if callback is not None:
                callback(step, result)
    except KeyboardInterrupt:
        save(len(result.history["elbo"]))
        raise
    finally:
        bar.close()
    save(len(result.history["elbo"]))
    return result


def _step(method: str, est: TMC, data: Mapping[str, object], qs: Mapping[str, Any], q_params: Sequence[torch.Tensor],
          model_params: Sequence[torch.Tensor], optimizer: Optional[torch.optim.Optimizer], lr: float) -> float:
    """One step of ``method``; returns ``log P_TMC`` of its draw (summed over data batch elements)."""
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    if method == "vi":
        log_p = est.log_marginal(data).sum()
        (-log_p).backward()
        value = float(log_p.detach())
    elif method == "dregs":
        surrogate = est.dregs_surrogate(data).sum()
        (-surrogate).backward(inputs=list(q_params))  # the proposals' gradient only
        value = float(surrogate.detach())
        if model_params:  # the surrogate's gradient is the proposals' only: the model's take log P's
            (-est.log_marginal(data).sum()).backward(inputs=model_params)
    else:  # rws, qem: the posterior weights of one draw
        post = est.posterior(data, differentiable=bool(model_params))
        value = float(post.log_marginal.sum())
        if method == "rws":
            wake_phi = sum(_weighted_log_q(qs[n], post, n) for n in qs)
            if isinstance(wake_phi, torch.Tensor) and wake_phi.requires_grad:
                (-wake_phi).backward(inputs=q_params)
        else:
            if tuple(post.log_marginal.shape) != ():
                raise TMCError("fit: method 'qem' learns one set of proposals from one dataset; give data without "
                               f"a data batch dim (log P has shape {tuple(post.log_marginal.shape)})")
            for name, q in qs.items():
                q.qem_step(post.mean(name, q.statistics), lr)
        if model_params:  # wake-theta: the model's parameters ascend log P of the same draw
            (-post.differentiable_log_marginal()).backward(inputs=list(model_params))
    if optimizer is not None:
        optimizer.step()
    return value


def _weighted_log_q(q: Any, post: Any, name: str) -> torch.Tensor:
    """``sum_k m(k) log q(z^k)`` over the latent's plate elements and data batch: weights and samples fixed."""
    samples = post.samples[name]
    weights = post.marginals[name]
    if not isinstance(q, ExpFamily):
        raise TMCError(f"fit: method 'rws' needs the proposal of latent {name!r} to be a tmcgraph.learn family "
                       f"(its log-density over posterior samples), got {type(q).__name__}")
    return (weights.detach() * q.log_prob(samples.detach())).sum()


def _state(result: FitResult, optimizer: Optional[torch.optim.Optimizer], model_params: List[torch.nn.Parameter],
           step: int, **run: Any) -> Dict[str, Any]:
    return {"step": step, "run": run, "history": result.history,
            "proposals": {n: q.state_dict() for n, q in result.proposals.items() if isinstance(q, torch.nn.Module)},
            "model_params": [p.detach().clone() for p in model_params],
            "optimizer": None if optimizer is None else optimizer.state_dict(),
            "rng": torch.get_rng_state()}


def _save(path: str, result: FitResult, optimizer: Optional[torch.optim.Optimizer],
          model_params: List[torch.nn.Parameter], step: int, **run: Any) -> None:
    """Write the checkpoint atomically (a temporary file renamed over it)."""
    tmp = f"{path}.tmp"
    torch.save(_state(result, optimizer, model_params, step, **run), tmp)
    os.replace(tmp, path)


def _load(path: str, result: FitResult, optimizer: Optional[torch.optim.Optimizer],
          model_params: List[torch.nn.Parameter], **run: Any) -> int:
    """Restore a checkpoint into ``result``, the optimizer, the parameters and the generator; returns its step."""
    state = torch.load(path, weights_only=True)
    if state["run"] != run:
        raise TMCError(f"fit: checkpoint {path!r} is of another run ({state['run']}, this one is {run}); remove it "
                       "or give another path")
    for name, q in result.proposals.items():
        if isinstance(q, torch.nn.Module):
            q.load_state_dict(state["proposals"][name])
    with torch.no_grad():
        for p, saved in zip(model_params, state["model_params"]):
            p.copy_(saved)
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    result.history = state["history"]
    return int(state["step"])


def predictive_log_likelihood(estimator: TMC, data: Mapping[str, object],
                              test_log_likelihood: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], *,
                              num_samples: int = 1000, latents: Optional[Sequence[str]] = None,
                              chunk_size: Optional[int] = None) -> torch.Tensor:
    """``log (1/N) sum_n p(x_test | z_n)``: held-out data's log-likelihood under N joint posterior samples.

    The samples ``z_n`` are drawn through one TMC draw's contraction (`tmcgraph.Posterior.sample`), the
    definition of the massively parallel learning papers (their "predictive log-likelihood").

    Args:
        estimator: the (fitted) model's estimator.
        data: the training observations.
        test_log_likelihood: ``f(samples) -> (N,)``, samples as latent -> ``(N, *plates, *event)``
            (`tmcgraph.datasets.Dataset.test_log_likelihood`).
        num_samples: N.
        latents: the latents ``test_log_likelihood`` reads (default all): only these are drawn
            (`tmcgraph.Posterior.sample`'s ``latents``; `tmcgraph.datasets.Dataset.test_latents`).
        chunk_size: at most this many samples per pass (memory).

    Returns:
        a 0-dim tensor (no gradient).
    """
    with torch.no_grad():
        samples = estimator.posterior(data).sample(num_samples, latents=latents, chunk_size=chunk_size)
        log_lik = test_log_likelihood({n: v for n, v in samples.items() if not n.startswith("@")})
        if tuple(log_lik.shape) != (num_samples,):
            raise TMCError(f"predictive_log_likelihood: test_log_likelihood returned shape {tuple(log_lik.shape)}, "
                           f"expected ({num_samples},)")
        return log_lik.logsumexp(0) - math.log(num_samples)

"""Sequential Monte Carlo with resampling after every latent (the bootstrap or the declared proposal)."""

from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from ..declaration import ModelBase as Model
from ..errors import TMCError
from ..layout import Layout, data_batch_shape, factor_indices
from ..resampling import SCHEMES, gather, resample
from ..trace import Tracer
from .base import PARTICLES, check_k

__all__ = ["smc"]


def smc(model: Model, data: Mapping[str, object], K: int, *, proposal: str = "bootstrap",
        resampling: str = "multinomial") -> torch.Tensor:
    """Sequential Monte Carlo estimate of ``log p(x)`` with K particles.

    Latents are visited in topological order (a chain is the natural case); a
    particle holds every latent drawn so far, across all plate elements.  Each
    step draws one latent (``proposal="bootstrap"``: from its prior;
    ``"guide"``: from the declared proposal given the particle's parents), weighs
    by the new prior/proposal ratio and the observations whose last parent it
    is, adds ``log mean(w)`` to the estimate and resamples all particles.

    Args:
        model: a model without enumerated latents.
        data: observation name -> value ``(*batch, *plates, *event)``.
        K: number of particles.
        proposal: ``"bootstrap"`` or ``"guide"``.
        resampling: ``"multinomial"`` or ``"systematic"``.

    Returns:
        tensor ``(*batch,)``: the log of an unbiased estimate of ``p(x)``.
    """
    K = check_k("(particles)", K)
    if proposal not in ("bootstrap", "guide"):
        raise TMCError(f"proposal must be 'bootstrap' or 'guide', got {proposal!r}")
    if resampling not in SCHEMES:
        raise TMCError(f"resampling must be one of {sorted(SCHEMES)}, got {resampling!r}")
    latents = model.latents()
    enumerated = [n for n in latents if model.sites[n].enumerate]
    if enumerated:
        raise TMCError(f"smc does not support enumerated latents {enumerated}; use the TMC or IWAE estimator")
    if proposal == "bootstrap":  # every latent drawn from its prior
        model = model._with_prior_proposals()
    layout = Layout(model, {n: PARTICLES for n in latents}, {PARTICLES: K}, data_batch_shape(model, data))
    batch = layout.batch
    # the shared trace, visited one resampling step at a time: each latent, then the observations whose last
    # latent parent it is
    tracer = Tracer(model, layout, data, families=False)
    position = {n: k for k, n in enumerate(model.order())}
    steps: Dict[Optional[str], List[str]] = {None: [], **{n: [] for n in latents}}
    for n in model.observations():
        parents = [p for p in model.sites[n].parents if model.sites[p].kind == "latent"]
        steps[max(parents, key=position.__getitem__) if parents else None].append(n)

    def weight(names: Sequence[str]) -> Optional[torch.Tensor]:
        """The sites' log-factors summed over their plates: ``(*batch, K)`` (or ``(*batch,)`` off the particles)."""
        total = None
        for n in names:
            tracer.visit(n)
            f = tracer.factors[n]  # (*batch, *plates, *indices): the indices are [] or [particles]
            plates, indices = len(model.sites[n].plates), len(factor_indices(model, layout.index_of, n))
            f = f.sum(tuple(range(f.dim() - plates - indices, f.dim() - indices))) if plates else f
            total = f if total is None else total + f
        return total

    log_z = weight(steps[None])  # observations with no latent parent: a constant factor
    log_z = None if log_z is None else log_z.expand(batch)
    log_w: Optional[torch.Tensor] = None
    for step, name in enumerate(latents):
        if log_w is not None:  # resample every particle's history
            anc = resample(log_w, resampling)  # (*b, K)
            for p in latents[:step]:
                v, e = tracer.values[p], tracer.event_dims[p]
                v = v.expand(layout.template([PARTICLES], model.sites[p].plates) + tuple(v.shape[v.dim() - e:]))
                tracer.values[p] = gather(v, anc)  # the particle dim follows the batch dims
        inc = weight([name] + steps[name])
        assert inc is not None
        log_w = inc.expand(batch + (K,))
        term = torch.logsumexp(log_w, -1) - math.log(K)
        log_z = term if log_z is None else log_z + term
    assert log_z is not None
    return log_z

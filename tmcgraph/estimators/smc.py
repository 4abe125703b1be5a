"""Sequential Monte Carlo with resampling after every latent (the bootstrap or the declared proposal)."""

from __future__ import annotations

import math
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from torch.distributions import Distribution

from ..declaration import ModelBase as Model
from ..errors import TMCError
from ..layout import Layout, data_batch_shape
from ..resampling import SCHEMES, gather, resample
from ..support import Checks, check_proposal, log_prob_in_support, observed_log_prob
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
    layout = Layout(model, {n: PARTICLES for n in latents}, {PARTICLES: K}, data_batch_shape(model, data))
    batch = layout.batch
    values = {n: layout.data_value(n, data[n]) for n in model.observations()}
    event_dims: Dict[str, int] = {n: model.sites[n].event_dim for n in model.observations()}

    def density(owner: str, fn: Callable, parents: Sequence[str], plates: Sequence[str]) -> Distribution:
        # a density varies along the particles only through its latent parents' values
        along = [PARTICLES] if any(model.sites[p].kind == "latent" for p in parents) else []
        return layout.density(owner, fn, [values[p] for p in parents], [event_dims[p] for p in parents], along,
                              plates, sample_index=PARTICLES)

    last = {}
    order = model.order()
    position = {n: k for k, n in enumerate(order)}
    for n in model.observations():
        parents = model.sites[n].parents
        last[n] = max(parents, key=position.__getitem__) if parents else None
    log_z: Optional[torch.Tensor] = None
    checks = Checks()

    def weigh(name: str, owner: str, lp: torch.Tensor, plates) -> torch.Tensor:
        f = layout.to_factor(lp, owner, [PARTICLES], plates)  # (*b, *plates, K)
        f = f.reshape(tuple(f.shape[: f.dim() - len(plates) - 1]) + (-1, K)).sum(-2) if plates else f
        return f.expand(batch + (K,))

    log_w = None
    pending = [n for n in model.observations() if last[n] is None]
    for n in pending:  # observations with no latent parent: a constant factor
        site = model.sites[n]
        d = density(f"observation {n!r} likelihood", site.fn, [], site.plates)
        lp, _ = observed_log_prob(f"observation {n!r}", d, values[n], layout.index_dims, checks)
        c = layout.to_factor(lp, f"observation {n!r}", [], site.plates)
        c = c.reshape(tuple(c.shape[: c.dim() - len(site.plates)]) + (-1,)).sum(-1) if site.plates else c
        log_z = c.expand(batch) if log_z is None else log_z + c
    for step, name in enumerate(latents):
        site = model.sites[name]
        owner = f"latent {name!r}"
        if log_w is not None:  # resample every particle's history
            anc = resample(log_w, resampling)  # (*b, K)
            for p in latents[:step]:
                v = values[p]
                e = event_dims[p]
                v = v.expand(layout.template([PARTICLES], model.sites[p].plates) + tuple(v.shape[v.dim() - e:]))
                values[p] = gather(v, anc)  # the particle dim follows the batch dims
        prior = density(f"{owner} prior", site.fn, site.parents, site.plates)
        masked = False
        if proposal == "bootstrap":
            q = prior
        else:
            assert site.proposal is not None  # a sampled latent always has one
            q = density(f"{owner} proposal", site.proposal, site.proposal_parents, site.plates)
            masked = check_proposal(name, prior, q, checks)
        z = q.rsample() if q.has_rsample else q.sample()
        values[name] = z
        event_dims[name] = len(q.event_shape)
        lp = log_prob_in_support(prior, z) if masked else prior.log_prob(z)
        inc = weigh(name, owner, lp - q.log_prob(z), site.plates) if q is not prior else None
        for n in model.observations():
            if last[n] == name:
                obs = model.sites[n]
                d = density(f"observation {n!r} likelihood", obs.fn, obs.parents, obs.plates)
                lp, _ = observed_log_prob(f"observation {n!r}", d, values[n], layout.index_dims, checks)
                f = weigh(n, f"observation {n!r}", lp, obs.plates)
                inc = f if inc is None else inc + f
        if inc is None:
            inc = torch.zeros(batch + (K,), dtype=z.dtype, device=z.device)
        log_w = inc
        term = torch.logsumexp(inc, -1) - math.log(K)
        log_z = term if log_z is None else log_z + term
    assert log_z is not None
    return log_z

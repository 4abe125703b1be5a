"""The DReGs surrogate against the gradient it estimates.

``grad_phi E[log P_TMC]`` is estimated without bias by the reparameterised
gradient of ``log_marginal``.  Each test draws B independent estimates at once:
every proposal parameter has one copy per data-batch element, so one backward
pass gives B per-draw gradients.  Both estimators see the same noise (the same
seed), so their paired difference has a small standard error.
"""

import math

import pytest
import torch
from torch.distributions import Normal, Uniform

import tmcgraph
from tmcgraph import TMCError


def _two_latents(B, grouped=False):
    """a, b ~ N(0, 1), x ~ N(a + b, 0.7); K = 3 (``grouped``: a and b share one index, joint samples)."""
    loc = torch.nn.Parameter(torch.tensor([0.3, -0.2]).repeat(B, 1))
    log_scale = torch.nn.Parameter(torch.tensor([0.1, -0.3]).repeat(B, 1))
    shape = (B, 1) if grouped else (B, 1, 1)  # (batch, index dim of a, index dim of b)
    m = tmcgraph.Model()
    m.latent("a", prior=lambda: Normal(0.0, 1.0),
             proposal=lambda: Normal(loc[:, 0].reshape(shape), log_scale[:, 0].exp().reshape(shape)))
    m.latent("b", prior=lambda: Normal(0.0, 1.0),
             proposal=lambda: Normal(loc[:, 1].reshape(shape), log_scale[:, 1].exp().reshape(shape)))
    m.observe("x", lambda a, b: Normal(a + b, 0.7))
    return m.compile(K=3, groups=[["a", "b"]] if grouped else ()), {"x": torch.full((B,), 1.2)}, [loc, log_scale]


def _chain(B):
    """z1 ~ N(0, 1), z2 ~ N(z1, 0.8^2), z3 ~ N(z2, 0.8^2), x_j ~ N(z_j, 0.6^2); K = 3."""
    loc = torch.nn.Parameter(torch.tensor([0.2, -0.4, 0.5]).repeat(B, 1))
    log_scale = torch.nn.Parameter(torch.tensor([0.0, -0.2, 0.2]).repeat(B, 1))
    shape = (B, 1, 1)  # two index dims suffice: z1 and z3 never meet in one function
    m = tmcgraph.Model()
    for j in range(3):
        def q(j=j):
            return Normal(loc[:, j].reshape(shape), log_scale[:, j].exp().reshape(shape))
        prior = (lambda: Normal(0.0, 1.0)) if j == 0 else (lambda prev: Normal(prev, 0.8))
        m.latent(f"z{j}", prior=prior, proposal=q, parents=[] if j == 0 else [f"z{j - 1}"], proposal_parents=[])
        m.observe(f"x{j}", lambda z: Normal(z, 0.6), parents=[f"z{j}"])
    data = {f"x{j}": torch.full((B,), v) for j, v in enumerate([0.7, 1.4, -0.3])}
    return m.compile(K=3), data, [loc, log_scale]


def _plated(B, K=3, N=5):
    """mu ~ N(0, 1), z_n ~ N(mu, 1), x_n ~ N(z_n, 0.5^2); per-element proposals for z."""
    mu_params = torch.nn.Parameter(torch.tensor([0.0, 0.0]).repeat(B, 1))
    z_loc = torch.nn.Parameter(torch.linspace(-0.5, 0.5, N).repeat(B, 1))
    z_log_scale = torch.nn.Parameter(torch.full((B, N), -0.4))
    m = tmcgraph.Model()
    m.plate("N", N)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0),
             proposal=lambda: Normal(mu_params[:, 0].reshape(B, 1, 1, 1), mu_params[:, 1].exp().reshape(B, 1, 1, 1)))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"],
             proposal=lambda: Normal(z_loc.reshape(B, 1, 1, N), z_log_scale.exp().reshape(B, 1, 1, N)))
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    x = torch.linspace(-1.0, 2.0, N)
    return m.compile(K=K), {"x": x.expand(B, N)}, [mu_params, z_loc, z_log_scale]


MODELS = {"two_latents": (_two_latents, 20000), "chain": (_chain, 20000), "plated": (_plated, 10000),
          "two_latents_grouped": (lambda B: _two_latents(B, grouped=True), 20000)}


def per_draw_gradients(est, data, params, objective, seed=0):
    """(B, number of parameters) gradients of ``objective(est, data)``, one row per draw."""
    torch.manual_seed(seed)
    value = objective(est, data)
    grads = torch.autograd.grad(value.sum(), params)
    return torch.cat([g.reshape(g.shape[0], -1) for g in grads], 1)


def reparam(est, data):
    return est.log_marginal(data)


def ours(est, data):
    return est.dregs_surrogate(data)


def paper(est, data):
    return est.dregs_surrogate(data, form="paper")


def z_scores(model, objective):
    build, B = MODELS[model]
    est, data, params = build(B)
    want = per_draw_gradients(est, data, params, reparam)
    got = per_draw_gradients(est, data, params, objective)
    diff = got - want
    return diff.mean(0) / (diff.std(0) / math.sqrt(B)), got, want


@pytest.mark.parametrize("model", sorted(MODELS))
def test_surrogate_is_unbiased_and_reduces_variance(model):
    z, got, want = z_scores(model, ours)
    assert z.abs().max() < 4.5, z
    # the variance reduction DReGs exists for, on every proposal parameter
    assert (got.var(0) < want.var(0)).all(), (got.var(0), want.var(0))


@pytest.mark.parametrize("model", ["chain", "plated", "two_latents"])  # more than one index
def test_the_papers_form_is_biased(model):
    """Power: the same test rejects eq. 54/60 on every model with more than one latent."""
    z, _, _ = z_scores(model, paper)
    assert z.abs().max() > 20, z


def test_mixture_proposal_is_refused_by_name():
    m = tmcgraph.Model()
    m.latent("mu", prior=lambda: Normal(0.0, 1.0))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda mu: Normal(mu, 1.5))
    m.observe("x", lambda z: Normal(z, 1.0))
    with pytest.raises(TMCError, match=r"latent 'z': its proposal takes latent parent\(s\) \['mu'\]"):
        m.compile(K=3).dregs_surrogate({"x": torch.tensor(0.3)})
    m2 = tmcgraph.Model()  # the default proposal (the prior) with a latent parent is a mixture too
    m2.latent("mu", prior=lambda: Normal(0.0, 1.0))
    m2.latent("z", prior=lambda mu: Normal(mu, 1.0))
    m2.observe("x", lambda z: Normal(z, 1.0))
    with pytest.raises(TMCError, match=r"latent 'z'"):
        m2.compile(K=3).dregs_surrogate({"x": torch.tensor(0.3)})
    with pytest.raises(TMCError, match=r"form must be 'tmc' or 'paper'"):
        m.compile(K=3).dregs_surrogate({"x": torch.tensor(0.3)}, form="iwae")


def test_zero_probability_samples_give_finite_gradients():
    loc = torch.nn.Parameter(torch.tensor(0.4))
    m = tmcgraph.Model()
    m.latent("a", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc, 1.0))
    m.latent("b", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(-loc, 1.0))
    m.observe("x", lambda a, b: Uniform(a + b - 0.2, a + b + 0.2, validate_args=False))
    est = m.compile(K=2)
    data = {"x": torch.full((256,), 0.5)}
    torch.manual_seed(0)
    value = est.dregs_surrogate(data)
    (g,) = torch.autograd.grad(value.sum(), [loc])
    torch.manual_seed(0)
    assert torch.equal(value, est.log_marginal(data).detach())
    assert torch.isinf(value).any() and torch.isfinite(value).any()  # some draws have no sample in support
    assert torch.isfinite(g)

"""Supports (tmcgraph.support): containment of a prior's support in its proposal's, and observed values.

Unbiasedness is checked against closed forms: a wider proposal must leave E[P_TMC] / p(x) = 1, and the
narrower one that the rule refuses is shown to be biased (the test's power).
"""

import math

import numpy as np
import pytest
import torch
from torch.distributions import (
    Bernoulli,
    Beta,
    Binomial,
    Categorical,
    Exponential,
    Gamma,
    HalfNormal,
    Independent,
    LogNormal,
    Normal,
    Poisson,
    Uniform,
)

import tmcgraph
from tmcgraph import TMCError
from tmcgraph.support import Checks, check_proposal


def _uniform_model(prior, proposal):
    m = tmcgraph.Model()
    m.latent("z", prior=prior, proposal=proposal)
    m.observe("x", lambda z: Normal(z, 1.0))
    return m


def _p_x_uniform(x, hi):
    """p(x) = int_0^hi U(z; 0, hi) N(x; z, 1) dz."""
    cdf = Normal(torch.tensor(0.0, dtype=torch.float64), 1.0).cdf
    return ((cdf(torch.tensor(x, dtype=torch.float64)) - cdf(torch.tensor(x - hi, dtype=torch.float64))) / hi).item()


def _ratio(est, x, p, n=40000):
    r = torch.exp(est.log_marginal({"x": torch.full((n,), x, dtype=torch.float64)}).double()) / p
    return r.mean().item(), r.std().item() / math.sqrt(n)


@pytest.mark.parametrize("K", [1, 4])
def test_a_wider_proposal_is_unbiased(K, float64):
    """Uniform(0, 2) proposal for a Uniform(0, 1) prior: the samples above 1 get prior density 0."""
    torch.manual_seed(0)
    est = _uniform_model(lambda: Uniform(0.0, 1.0), lambda: Uniform(0.0, 2.0)).compile(K=K)
    mean, se = _ratio(est, 0.5, _p_x_uniform(0.5, 1.0))
    assert abs(mean - 1.0) < 4.5 * se + 1e-3, (mean, se)


def test_power_a_narrower_proposal_is_refused_and_would_be_biased(float64):
    m = _uniform_model(lambda: Uniform(0.0, 2.0), lambda: Uniform(0.0, 1.0))
    with pytest.raises(TMCError, match=r"latent 'z': the proposal's support \(reals in \[0, 1\]\) does not contain "
                       r"the prior's \(reals in \[0, 2\]; its upper bound is below the prior's\)"):
        m.compile(K=4).log_marginal({"x": torch.tensor(0.5)})
    # what the refusal prevents: the same weights without the check miss half the prior's mass
    torch.manual_seed(1)
    est = m.compile(K=4)
    import tmcgraph.trace as trace_mod

    real = trace_mod.check_proposal
    trace_mod.check_proposal = lambda *a: True
    try:
        mean, se = _ratio(est, 0.5, _p_x_uniform(0.5, 2.0))
    finally:
        trace_mod.check_proposal = real
    assert abs(mean - 1.0) > 10 * se, (mean, se)


@pytest.mark.parametrize("prior, proposal", [
    (lambda: Uniform(0.0, 1.0), lambda: Uniform(0.0, 2.0)),
    (lambda: Beta(2.0, 2.0), lambda: Uniform(0.0, 1.0)),  # interval with float bounds vs tensor bounds
    (lambda: Binomial(3, 0.5), lambda: Binomial(5, 0.5)),
    (lambda: HalfNormal(1.0), lambda: Exponential(1.0)),
    (lambda: Gamma(2.0, 1.0), lambda: LogNormal(0.0, 1.0)),  # positive within nonnegative
    (lambda: Exponential(1.0), lambda: LogNormal(0.0, 1.0)),
    (lambda: Exponential(1.0), lambda: Normal(0.0, 1.0)),  # real contains nonnegative
    (lambda: Poisson(2.0), lambda: Poisson(3.0)),
])
def test_accepted_pairs_give_finite_values_and_gradients(prior, proposal):
    loc = torch.tensor(0.3, requires_grad=True)
    m = tmcgraph.Model()
    m.latent("z", prior=prior, proposal=proposal)
    m.observe("x", lambda z: Normal(z + loc, 1.0))
    out = m.compile(K=8).log_marginal({"x": torch.tensor(0.5)})
    (g,) = torch.autograd.grad(out, [loc])
    assert torch.isfinite(out) and torch.isfinite(g)


@pytest.mark.parametrize("prior, proposal, why", [
    (lambda: Uniform(0.0, 2.0), lambda: Uniform(0.0, 1.0), "upper bound is below"),
    (lambda: Binomial(5, 0.5), lambda: Binomial(3, 0.5), "upper bound is below"),
    (lambda: Normal(0.0, 1.0), lambda: Exponential(1.0), "lower bound is above"),
    (lambda: Poisson(2.0), lambda: Exponential(1.0), "a continuous proposal for a discrete prior"),
    (lambda: Exponential(1.0), lambda: Poisson(2.0), "a discrete proposal for a continuous prior"),
])
def test_refused_pairs_name_the_latent_and_the_reason(prior, proposal, why):
    m = tmcgraph.Model()
    m.latent("z", prior=prior, proposal=proposal)
    m.observe("x", lambda z: Normal(z, 1.0))
    with pytest.raises(TMCError, match=f"latent 'z': the proposal's support .*{why}"):
        m.compile(K=4).log_marginal({"x": torch.tensor(0.5)})


def test_elementwise_tensor_bounds():
    """Bounds are compared element by element, not dropped: one element narrower is refused."""
    hi = torch.tensor([1.0, 2.0, 3.0])
    checks = Checks()
    assert check_proposal("z", Uniform(torch.zeros(3), hi), Uniform(torch.zeros(3), hi + 0.5), checks)
    with pytest.raises(TMCError, match="upper bound is below"):
        check_proposal("z", Uniform(torch.zeros(3), hi), Uniform(torch.zeros(3), torch.tensor([2.0, 2.0, 2.0])),
                       checks)
    assert not check_proposal("z", Normal(0.0, 1.0), Normal(1.0, 2.0), checks)  # the same: no mask needed


@pytest.mark.parametrize("lik, value, message", [
    (lambda z: Bernoulli(logits=z), torch.tensor(2.0), r"observation 'x': the value lies outside the support "
     r"\(integers in \[0, 1\]\) of its likelihood Bernoulli \(e.g. 2\)"),
    (lambda z: Bernoulli(logits=z), torch.tensor(0.5), r"outside the support .* Bernoulli \(e.g. 0.5\)"),
    (lambda z: Poisson(z.exp()), torch.tensor(1.5), r"outside the support \(integers in \[0, inf\]\) .* Poisson"),
    (lambda z: Categorical(logits=torch.stack([z, -z, 0 * z], -1)), torch.tensor(5),
     r"outside the support \(integers in \[0, 2\]\) .* Categorical"),
    (lambda z: Bernoulli(logits=z), torch.tensor(True), r"observation 'x': the value is a bool tensor"),
    (lambda z: Normal(z, 1.0), torch.tensor(math.inf), r"observation\(s\) \['x'\]: the observed value contains an "
     "infinite value"),
    (lambda z: Normal(z, 1.0), torch.tensor(-math.inf), r"contains an infinite value"),
    (lambda z: Normal(z, 1.0), torch.tensor(math.nan), r"contains NaN"),
])
@pytest.mark.parametrize("estimator", ["tmc", "iwae", "smc"])
def test_bad_observed_values_name_the_observation(lik, value, message, estimator):
    m = tmcgraph.Model()
    m.latent("z", prior=lambda: Normal(0.0, 1.0))
    m.observe("x", lik)
    run = {"tmc": lambda d: m.compile(K=4).log_marginal(d), "iwae": lambda d: tmcgraph.iwae(m, d, K=4),
           "smc": lambda d: tmcgraph.smc(m, d, K=4)}[estimator]
    with pytest.raises(TMCError, match=message):
        run({"x": value})


def test_a_wrong_sized_vector_observation_is_named():
    m = tmcgraph.Model()
    m.latent("z", prior=lambda: Normal(0.0, 1.0))
    m.observe("x", lambda z: Independent(Normal(z.unsqueeze(-1).expand(z.shape + (3,)), 1.0), 1), event_dim=1)
    for bad in (torch.zeros(4), torch.zeros(1)):  # (1,) would broadcast silently
        with pytest.raises(TMCError, match=r"observation 'x': the value's event shape \((4|1),\) differs from the "
                           r"likelihood's \(3,\)"):
            m.compile(K=4).log_marginal({"x": bad})


def test_a_support_that_depends_on_the_samples_gives_minus_inf_not_an_error(float64):
    """x ~ Uniform(0, z): a value above some samples of z has probability zero under those samples."""
    m = tmcgraph.Model()
    m.latent("z", prior=lambda: Uniform(0.5, 2.0))
    m.observe("x", lambda z: Uniform(torch.zeros_like(z), z))
    est = m.compile(K=4)
    torch.manual_seed(0)
    out = est.log_marginal({"x": torch.full((2000,), 1.2)})
    # p(x) = int_{1.2}^{2} (1/1.5)(1/z) dz = log(2/1.2)/1.5
    r = out.exp()
    assert torch.isfinite(out).any() and abs(r.mean().item() / (math.log(2 / 1.2) / 1.5) - 1) < 0.05
    assert est.log_marginal({"x": torch.tensor(3.0)}).item() == -math.inf  # above every sample: zero


def test_lists_and_numpy_data_take_torch_s_default_dtype():
    m = tmcgraph.Model()
    m.plate("N", 2)
    m.latent("z", prior=lambda: Normal(0.0, 1.0))
    m.observe("x", lambda z: Normal(z, 1.0), plates=["N"])
    est = m.compile(K=4)
    for data in ([0.5, 1.0], np.array([0.5, 1.0]), np.array([0.5, 1.0], dtype=np.float32)):
        assert est.log_marginal({"x": data}).dtype == torch.float32
    torch.set_default_dtype(torch.float64)  # restored by the conftest fixture
    assert est.log_marginal({"x": np.array([0.5, 1.0])}).dtype == torch.float64
    counts = tmcgraph.Model()
    counts.latent("r", prior=lambda: Gamma(2.0, 1.0))
    counts.observe("n", lambda r: Poisson(r))
    assert torch.isfinite(counts.compile(K=4).log_marginal({"n": np.int64(3)}))


@pytest.mark.parametrize("given", [False, True])
def test_a_failing_prior_is_named_as_the_prior(given):
    m = tmcgraph.Model()
    m.latent("z", prior=lambda: Normal(0.0, -1.0), proposal=(lambda: Normal(0.0, 1.0)) if given else None)
    m.observe("x", lambda z: Normal(z, 1.0))
    name = "latent 'z' prior" + ("" if given else r" \(also its proposal\)")
    with pytest.raises(TMCError, match=f"{name}: the function raised ValueError"):
        m.compile(K=4).log_marginal({"x": torch.tensor(0.5)})

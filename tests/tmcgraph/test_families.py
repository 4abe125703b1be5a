"""Vectorised site families (Model.markov, Model.observe_each) against closed forms and site-by-site evaluation."""

import math

import pytest
import torch
from torch.distributions import Independent, MultivariateNormal, Normal

import tmcgraph
from tmcgraph.layout import factor_indices
from tmcgraph.trace import site_density


def linear_gaussian(T, a=0.9, s=0.5, loc=None, log_scale=None, t_dependent=False):
    """z_0 ~ N(0,1), z_t ~ N(a_t z_{t-1}, s^2), x_t ~ N(z_t, 1)."""
    loc = torch.zeros(T) if loc is None else loc
    log_scale = torch.zeros(T) if log_scale is None else log_scale
    coef = a * torch.ones(T) if not t_dependent else torch.linspace(0.5, 1.0, T)
    m = tmcgraph.Model()
    if t_dependent:
        transition = lambda prev, t: Normal(coef[t] * prev, s)  # noqa: E731
    else:
        transition = lambda prev: Normal(a * prev, s)  # noqa: E731
    m.markov("z", T, init=lambda: Normal(0.0, 1.0), transition=transition,
             proposal=lambda t: Normal(loc[t], log_scale[t].exp()))
    m.observe_each("x", "z", lambda z: Normal(z, 1.0))
    return m, coef


def exact_log_marginal(x, coef, s=0.5):
    T = x.shape[-1]
    var = [1.0]
    for t in range(1, T):
        var.append(coef[t].item() ** 2 * var[-1] + s * s)
    cov = torch.zeros(T, T, dtype=torch.float64)
    for i in range(T):
        for j in range(i, T):
            c = var[i] * math.prod(coef[k].item() for k in range(i + 1, j + 1))
            cov[i, j] = cov[j, i] = c
    return MultivariateNormal(torch.zeros(T, dtype=torch.float64), cov + torch.eye(T, dtype=torch.float64)
                              ).log_prob(x.double()).item()


def assert_unbiased(log_estimates, log_truth):
    r = torch.exp(log_estimates.double() - log_truth)
    mean, se = r.mean().item(), r.std().item() / math.sqrt(r.numel())
    assert abs(mean - 1.0) < 4.5 * se + 1e-3, (mean, se)


@pytest.mark.parametrize("t_dependent", [False, True])
def test_tmc_of_a_family_is_unbiased_for_the_closed_form(t_dependent):
    torch.manual_seed(1)
    T = 5
    m, coef = linear_gaussian(T, t_dependent=t_dependent)
    x = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4])
    data = {f"x_{t}": x[t].expand(40000) for t in range(T)}
    assert_unbiased(m.compile(K=4).log_marginal(data), exact_log_marginal(x, coef))


def test_site_by_site_estimators_accept_family_members():
    """IWAE puts every latent on one particle index: the family is evaluated member by member."""
    torch.manual_seed(2)
    T = 4
    m, coef = linear_gaussian(T, t_dependent=True)
    x = torch.tensor([0.3, -1.2, 0.8, 1.5])
    data = {f"x_{t}": x[t].expand(40000) for t in range(T)}
    assert_unbiased(tmcgraph.IWAE(m, K=8).log_marginal(data), exact_log_marginal(x, coef))


def _per_site_factors(model, tr):
    """Every member's factor from its own site functions, on the trace's values."""
    out = {}
    for name, site in model.sites.items():
        idx = factor_indices(model, tr.layout.index_of, name)
        d = site_density(tr.layout, model, name, tr.values, {**tr.event_dims, **{
            n: s.event_dim for n, s in model.sites.items() if s.kind == "observed"}})
        lp = d.log_prob(tr.values[name])
        if site.kind == "latent":
            lp = lp - site.proposal().log_prob(tr.values[name])
        out[name] = tr.layout.to_factor(lp, name, idx, site.plates)
    return out


@pytest.mark.parametrize("event", [False, True])
def test_vectorised_factors_equal_the_site_by_site_factors(event):
    torch.manual_seed(3)
    T, D = 6, 2
    coef = torch.linspace(0.5, 1.0, T)
    loc, scale = torch.randn(T, D) if event else torch.randn(T), torch.rand(T) + 0.5
    m = tmcgraph.Model()
    if event:
        m.markov("z", T, init=lambda: Independent(Normal(torch.zeros(D), 1.0), 1),
                 transition=lambda prev, t: Independent(Normal(coef[t, None] * prev, 0.5), 1),
                 proposal=lambda t: Independent(Normal(loc[t], scale[t, None]), 1))
        m.observe_each("x", "z", lambda z, t: Independent(Normal(z + coef[t, None], 1.0), 1), event_dim=1)
        data = {f"x_{t}": torch.randn(3, D) for t in range(T)}
    else:
        m.markov("z", T, init=lambda: Normal(0.0, 1.0), transition=lambda prev, t: Normal(coef[t] * prev, 0.5),
                 proposal=lambda t: Normal(loc[t], scale[t]))
        m.observe_each("x", "z", lambda z, t: Normal(z + coef[t], 1.0))
        data = {f"x_{t}": torch.randn(3) for t in range(T)}
    calls = []
    fam = m.families["z"]
    m._families["z"] = type(fam)(**{**fam.__dict__, "fn": lambda *a, **k: calls.append(1) or fam.fn(*a, **k)})
    tr, _, _ = m.compile(K=5)._trace(data)
    assert len(calls) == 1  # one transition call for the T - 1 transitions
    want = _per_site_factors(m, tr)
    assert set(tr.factors) == set(want)
    for name in want:
        assert tr.factors[name].shape == want[name].shape, name
        torch.testing.assert_close(tr.factors[name], want[name], msg=name)
    # power: the transition factors are not symmetric, so a swapped (K_{t-1}, K_t) layout would fail
    assert not torch.allclose(tr.factors["z_2"], want["z_2"].transpose(-1, -2))


def test_gradients_reach_the_proposal_parameters():
    T = 5
    loc = torch.zeros(T, requires_grad=True)
    log_scale = torch.zeros(T, requires_grad=True)
    m, _ = linear_gaussian(T, loc=loc, log_scale=log_scale)
    data = {f"x_{t}": torch.tensor(1.0) for t in range(T)}
    m.compile(K=6).log_marginal(data).backward()
    assert torch.isfinite(loc.grad).all() and (loc.grad != 0).all()
    assert torch.isfinite(log_scale.grad).all() and (log_scale.grad != 0).all()


def test_family_declaration_errors():
    m = tmcgraph.Model()
    with pytest.raises(tmcgraph.TMCError, match="markov family 'z' transition: expected a function of 1 argument"):
        m.markov("z", 3, init=lambda: Normal(0.0, 1.0), transition=lambda a, b: Normal(a, 1.0),
                 proposal=lambda: Normal(0.0, 1.0))
    with pytest.raises(tmcgraph.TMCError, match="length: size must be a positive int"):
        m.markov("z", 0, init=lambda: Normal(0.0, 1.0), transition=lambda p: Normal(p, 1.0),
                 proposal=lambda: Normal(0.0, 1.0))
    m.latent("z_1", prior=lambda: Normal(0.0, 1.0))
    with pytest.raises(tmcgraph.TMCError, match="site 'z_1': the name is already declared"):
        m.markov("z", 3, init=lambda: Normal(0.0, 1.0), transition=lambda p: Normal(p, 1.0),
                 proposal=lambda: Normal(0.0, 1.0))
    assert "z_0" not in m.sites  # nothing half-declared
    with pytest.raises(tmcgraph.TMCError, match="'w' is not a markov family"):
        m.observe_each("x", "w", lambda z: Normal(z, 1.0))


def test_family_shape_errors_name_the_family_function():
    m = tmcgraph.Model()
    m.markov("z", 3, init=lambda: Normal(0.0, 1.0), transition=lambda p: Normal(p, 1.0),
             proposal=lambda: Normal(torch.zeros(4), 1.0))  # 4 steps of parameters for 3 members
    m.observe_each("x", "z", lambda z: Normal(z, 1.0))
    with pytest.raises(tmcgraph.TMCError, match="markov family 'z' proposal: vectorised over the family's steps"):
        m.compile(K=2).log_marginal({f"x_{t}": torch.tensor(0.0) for t in range(3)})

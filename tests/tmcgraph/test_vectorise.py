"""Sites declared one by one that share a function, batched by TMC traces (tmcgraph.vectorise)."""

import contextlib
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

import tmcgraph
from tmcgraph.layout import factor_indices
from tmcgraph.trace import site_density


def site_by_site_chain(T, prior=None, s=0.5, declared=True, verify=True):
    """z_0 ~ N(0,1), z_t ~ N(0.9 z_{t-1}, s^2), x_t ~ N(z_t, 1), declared as users write it (in
    ``Model.batch_sites()`` when ``declared``)."""
    loc = torch.linspace(-0.5, 0.5, T)
    scale = torch.linspace(0.8, 1.2, T)
    prior = prior or (lambda prev: Normal(0.9 * prev, s))
    m = tmcgraph.Model()
    m.latent("z0", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc[0], scale[0]))
    with m.batch_sites(verify=verify) if declared else contextlib.nullcontext():
        for t in range(1, T):
            m.latent(f"z{t}", prior=prior, parents=[f"z{t - 1}"], proposal=lambda t=t: Normal(loc[t], scale[t]),
                     proposal_parents=[])
        for t in range(T):
            m.observe(f"x{t}", lambda z: Normal(z, 1.0), parents=[f"z{t}"])
    return m


def exact(x, a=0.9, s=0.5):
    T = x.shape[-1]
    var = [1.0]
    for _ in range(1, T):
        var.append(a * a * var[-1] + s * s)
    cov = torch.tensor([[a ** abs(i - j) * var[min(i, j)] for j in range(T)] for i in range(T)], dtype=torch.float64)
    return MultivariateNormal(torch.zeros(T, dtype=torch.float64), cov + torch.eye(T, dtype=torch.float64)
                              ).log_prob(x.double()).item()


def per_site_factors(model, tr):
    out = {}
    events = {**tr.event_dims, **{n: s.event_dim for n, s in model.sites.items() if s.kind == "observed"}}
    for name, site in model.sites.items():
        d = site_density(tr.layout, model, name, tr.values, events)
        lp = d.log_prob(tr.values[name])
        if site.kind == "latent":
            lp = lp - site.proposal().log_prob(tr.values[name])
        out[name] = tr.layout.to_factor(lp, name, factor_indices(model, tr.layout.index_of, name), site.plates)
    return out


def _ratio(est, x, n=40000):
    """exp(log P_TMC - log p(x)) over n independent estimates (float64)."""
    data = {f"x{t}": x[t].expand(n) for t in range(x.shape[0])}
    return torch.exp(est.log_marginal(data).double() - exact(x))


def _unbiased(r):
    mean, se = r.mean().item(), r.std().item() / math.sqrt(r.numel())
    return abs(mean - 1.0) < 4.5 * se + 1e-3


def test_only_declared_sites_are_grouped():
    undeclared = site_by_site_chain(6, declared=False).compile(K=4)
    assert undeclared._groups.groups == []
    est = site_by_site_chain(6).compile(K=4)
    roles = sorted((g.role, len(g.members), g.varying) for g in est._groups.groups)
    assert roles == [("likelihood", 6, ()), ("prior", 5, ()), ("proposal", 5, ("t",))]


def test_groups_are_verified_on_every_new_input_layout_then_batched():
    est = site_by_site_chain(6).compile(K=4)
    calls = []
    trace_mod = __import__("tmcgraph.trace", fromlist=["agree"])
    real = trace_mod.agree
    trace_mod.agree = lambda a, b: calls.append(1) or real(a, b)
    try:
        for batch, new in [((), True), ((), False), ((3,), True), ((3,), False), ((2, 3), True), ((), False)]:
            before = len(calls)
            est.log_marginal({f"x{t}": torch.full(batch, 0.1 * t) for t in range(6)})
            assert (len(calls) > before) == new, batch
    finally:
        trace_mod.agree = real
    assert len({k[2] for k in est._groups.verified}) == 3  # (), (3,) and (2, 3): one verification each
    assert set(est._groups.verified.values()) == {True}


def test_batched_chain_is_unbiased_for_the_closed_form():
    torch.manual_seed(0)
    x = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4])
    est = site_by_site_chain(5).compile(K=4)
    _ratio(est, x, 10)  # verifies the groups on another layout
    r = _ratio(est, x)  # verified on this layout at its first evaluation: batched from the second
    r = _ratio(est, x)
    assert _unbiased(r)


def test_batched_factors_equal_the_site_by_site_factors():
    torch.manual_seed(1)
    m = site_by_site_chain(6)
    est = m.compile(K=5)
    data = {f"x{t}": torch.randn(3) for t in range(6)}
    est.log_marginal(data)
    tr, _, _ = est._trace(data)  # batched now
    assert any(k[0] == "prior" for k in est._groups.verified)
    want = per_site_factors(m, tr)
    for name in want:
        torch.testing.assert_close(tr.factors[name].expand_as(want[name]), want[name], msg=name)


def _reads_shape(prev):
    """The auditor's transition: a different scale once a batch dim is added."""
    return Normal(0.9 * prev, 0.5 if prev.dim() < 4 else 0.8)


def test_a_shape_reading_transition_is_exact_site_by_site():
    """Declared outside batch_sites() (the default), a function that reads its argument's shape is called
    site by site on every layout: E[P_TMC] / p(x) = 1 at batch shape (n,) too."""
    torch.manual_seed(2)
    x = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4])
    est = site_by_site_chain(5, prior=_reads_shape, declared=False).compile(K=4)
    _ratio(est, x, 1)
    assert _unbiased(_ratio(est, x))


def test_a_shape_reading_transition_declared_is_an_error_on_the_new_layout():
    est = site_by_site_chain(5, prior=_reads_shape).compile(K=4)
    x = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4])
    est.log_marginal({f"x{t}": x[t] for t in range(5)})  # batch (): one dim fewer, both ways agree
    with pytest.raises(tmcgraph.TMCError, match=r"sites 'z1', 'z2', 'z3', \.\.\. \(4 sites\), declared in "
                       r"Model.batch_sites\(\): evaluated in one call, the prior log-density of 'z1' differs"):
        est.log_marginal({f"x{t}": x[t].expand(4) for t in range(5)})


def test_power_trusted_without_verification_the_same_function_is_biased():
    """verify=False takes the declaration at its word: the shape-reading transition is then wrong at batch
    (n,), which is what the verification and the site-by-site default protect against."""
    torch.manual_seed(3)
    x = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4])
    est = site_by_site_chain(5, prior=_reads_shape, verify=False).compile(K=4)
    r = _ratio(est, x)
    assert not _unbiased(r) and r.mean().item() < 0.9


def test_value_branches_and_side_effects_stay_site_by_site():
    calls = []

    def counted(prev):
        calls.append(prev.shape)
        return Normal(0.9 * prev, 0.5 if float(prev.mean()) > 0 else 0.8)

    torch.manual_seed(4)
    x = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4])
    est = site_by_site_chain(5, prior=counted, declared=False).compile(K=4)
    est.log_marginal({f"x{t}": x[t] for t in range(5)})  # (the first evaluation also probes each function)
    calls.clear()
    for _ in range(3):
        est.log_marginal({f"x{t}": x[t] for t in range(5)})
    assert len(calls) == 3 * 4  # once per site per evaluation
    declared = site_by_site_chain(5, prior=counted).compile(K=4)
    with pytest.raises(tmcgraph.TMCError, match="declared in Model.batch_sites"):
        for _ in range(20):  # the batched mean differs from some member's mean on the first evaluation
            declared.log_marginal({f"x{t}": x[t] for t in range(5)})


def test_a_function_that_does_not_broadcast_is_an_error_when_declared():
    """``flip(0)`` reads the leftmost dim, which batching adds: the verification names the sites."""
    m = site_by_site_chain(5, prior=lambda prev: Normal(0.9 * prev.flip(0), 0.5))
    est = m.compile(K=3)
    with pytest.raises(tmcgraph.TMCError, match="prior log-density of 'z1' differs from its site-by-site value"):
        est.log_marginal({f"x{t}": torch.tensor(0.2) for t in range(5)})


def test_a_declared_group_that_fails_on_new_shapes_is_an_error():
    def prior(prev):
        if prev.dim() > 3:
            raise RuntimeError("this function handles at most 3 dims")
        return Normal(0.9 * prev, 0.5)

    est = site_by_site_chain(5, prior=prior).compile(K=3)
    est.log_marginal({f"x{t}": torch.tensor(0.2) for t in range(5)})  # verified at 2 (site) / 3 (batched) dims
    # a data batch of one dim: site by site still has 3 dims, batched would have 4
    with pytest.raises(tmcgraph.TMCError, match="the prior failed \\(RuntimeError: this function handles"):
        est.log_marginal({f"x{t}": torch.full((2,), 0.2) for t in range(5)})
    assert torch.isfinite(site_by_site_chain(5, prior=prior, declared=False).compile(K=3).log_marginal(
        {f"x{t}": torch.full((2,), 0.2) for t in range(5)})).all()


def test_a_shared_particle_index_is_not_batched():
    """IWAE puts every latent on one particle index: a prior whose parent shares the member's index cannot be
    stacked, so the trace with the estimator's groups evaluates priors and proposals one by one (the
    likelihoods, each of one latent, are batched), and its factors are the site-by-site ones."""
    m = site_by_site_chain(4)
    est = tmcgraph.IWAE(m, K=3)
    assert {g.role for g in est._groups.groups} == {"prior", "proposal", "likelihood"}
    data = {f"x{t}": torch.tensor(0.2) for t in range(4)}
    tr, _, _ = est._trace(data)  # the path with groups (IWAE's own log_marginal needs no contraction)
    assert {k[0] for k in est._groups.verified} == {"likelihood"}
    want = per_site_factors(m, tr)
    for name in want:
        torch.testing.assert_close(tr.factors[name].expand_as(want[name]), want[name], msg=name)


def test_a_prior_group_verified_while_its_proposals_are_batched():
    """The verification of one role runs beside the batched evaluation of another."""
    m = site_by_site_chain(6)
    est = m.compile(K=3)
    data = {f"x{t}": torch.tensor(0.2) for t in range(6)}
    est.log_marginal(data)
    prior_key = next(k for k in est._groups.verified if k[0] == "prior")
    del est._groups.verified[prior_key]  # proposals batched, the prior group checked again
    out = est.log_marginal(data)
    assert torch.isfinite(out) and est._groups.verified[prior_key] is True

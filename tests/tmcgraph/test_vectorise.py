"""Sites declared one by one that share a function, batched by TMC traces (tmcgraph.vectorise)."""

import math

import torch
from torch.distributions import MultivariateNormal, Normal

import tmcgraph
from tmcgraph.layout import factor_indices
from tmcgraph.trace import site_density


def site_by_site_chain(T, prior=None, s=0.5):
    """z_0 ~ N(0,1), z_t ~ N(0.9 z_{t-1}, s^2), x_t ~ N(z_t, 1), declared as users write it."""
    loc = torch.linspace(-0.5, 0.5, T)
    scale = torch.linspace(0.8, 1.2, T)
    prior = prior or (lambda prev: Normal(0.9 * prev, s))
    m = tmcgraph.Model()
    m.latent("z0", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc[0], scale[0]))
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


def test_groups_are_found_and_verified_then_batched():
    m = site_by_site_chain(6)
    est = m.compile(K=4)
    roles = sorted((g.role, len(g.members), g.varying) for g in est._groups.groups)
    assert roles == [("likelihood", 6, ()), ("prior", 5, ()), ("proposal", 5, ("t",))]
    data = {f"x{t}": torch.tensor(0.1 * t) for t in range(6)}
    est.log_marginal(data)
    assert set(est._groups.verified.values()) == {True}


def test_batched_chain_is_unbiased_for_the_closed_form():
    torch.manual_seed(0)
    T = 5
    x = torch.tensor([0.3, -1.2, 0.8, 1.5, -0.4])
    est = site_by_site_chain(T).compile(K=4)
    data = {f"x{t}": x[t].expand(40000) for t in range(T)}
    est.log_marginal(data)  # verifies the groups
    assert set(est._groups.verified.values()) == {True}
    r = torch.exp(est.log_marginal(data).double() - exact(x))
    mean, se = r.mean().item(), r.std().item() / math.sqrt(r.numel())
    assert abs(mean - 1.0) < 4.5 * se + 1e-3, (mean, se)


def test_batched_factors_equal_the_site_by_site_factors():
    torch.manual_seed(1)
    m = site_by_site_chain(6)
    est = m.compile(K=5)
    data = {f"x{t}": torch.randn(3) for t in range(6)}
    est.log_marginal(data)
    tr, _, _ = est._trace(data)  # batched now
    want = per_site_factors(m, tr)
    for name in want:
        torch.testing.assert_close(tr.factors[name].expand_as(want[name]), want[name], msg=name)


def test_a_function_that_does_not_broadcast_stays_site_by_site():
    """``flip(0)`` reads the leftmost dim, which batching adds: the check catches it, the results stay right."""
    m = site_by_site_chain(5, prior=lambda prev: Normal(0.9 * prev.flip(0), 0.5))
    est = m.compile(K=3)
    data = {f"x{t}": torch.tensor(0.2) for t in range(5)}
    est.log_marginal(data)
    prior_key = next(k for k in est._groups.verified if k[0] == "prior")
    assert est._groups.verified[prior_key] is False
    tr, _, _ = est._trace(data)
    want = per_site_factors(m, tr)
    for name in want:
        torch.testing.assert_close(tr.factors[name].expand_as(want[name]), want[name], msg=name)
    # power: batched anyway, the same function gives other factors
    est._groups.verified[prior_key] = True
    tr, _, _ = est._trace(data)
    want = per_site_factors(m, tr)
    assert not all(torch.allclose(tr.factors[n].expand_as(want[n]), want[n]) for n in want)


def test_a_group_that_fails_on_new_shapes_falls_back():
    def prior(prev):
        if prev.dim() > 3:
            raise RuntimeError("this function handles at most 3 dims")
        return Normal(0.9 * prev, 0.5)

    m = site_by_site_chain(5, prior=prior)
    est = m.compile(K=3)
    est.log_marginal({f"x{t}": torch.tensor(0.2) for t in range(5)})  # verified at 2 (site) / 3 (batched) dims
    prior_key = next(k for k in est._groups.verified if k[0] == "prior")
    assert est._groups.verified[prior_key] is True
    # a data batch of one dim: site by site still has 3 dims, batched would have 4
    out = est.log_marginal({f"x{t}": torch.full((2,), 0.2) for t in range(5)})
    assert torch.isfinite(out).all() and est._groups.verified[prior_key] is False


def test_iwae_layout_is_not_batched():
    m = site_by_site_chain(4)
    est = tmcgraph.IWAE(m, K=3)
    est.log_marginal({f"x{t}": torch.tensor(0.2) for t in range(4)})
    assert not any(est._groups.verified.values())


def test_a_prior_group_verified_while_its_proposals_are_batched():
    """The verification of one role runs beside the batched evaluation of another."""
    m = site_by_site_chain(6)
    est = m.compile(K=3)
    data = {f"x{t}": torch.tensor(0.2) for t in range(6)}
    est.log_marginal(data)
    prior_key = next(k for k in est._groups.verified if k[0] == "prior")
    est._groups.verified[prior_key] = None  # proposals batched, the prior group checked again
    out = est.log_marginal(data)
    assert torch.isfinite(out) and est._groups.verified[prior_key] is True

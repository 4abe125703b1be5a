"""Bad model declarations and bad data give errors that name the site and what was expected."""

import pytest
import torch
from torch.distributions import Bernoulli, Gamma, Normal

import tmcgraph
from tmcgraph import TMCError


def base():
    m = tmcgraph.Model()
    m.plate("N", 3)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0))
    return m


def test_unknown_parent_at_compile():
    m = base()
    m.latent("z", prior=lambda nu: Normal(nu, 1.0))
    with pytest.raises(TMCError, match=r"latent 'z': prior argument 'nu' is not a declared site"):
        m.compile()


def test_cycle_is_listed():
    m = tmcgraph.Model()
    m.latent("a", prior=lambda b: Normal(b, 1.0))
    m.latent("b", prior=lambda a: Normal(a, 1.0))
    with pytest.raises(TMCError, match=r"cycle: (a -> b -> a|b -> a -> b)"):
        m.compile()


def test_plate_mismatch_at_declaration():
    m = base()
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"])
    msg = r"latent 'g' \(plates \[\]\): its prior depends on latent 'z' in plates \['N'\]"
    with pytest.raises(TMCError, match=msg):
        m.latent("g", prior=lambda z: Normal(z, 1.0))


def test_plate_mismatch_forward_reference_at_compile():
    m = base()
    m.latent("g", prior=lambda z: Normal(z, 1.0))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"latent 'g'.*depends on latent 'z' in plates \['N'\]"):
        m.compile()


def test_missing_and_unknown_observations():
    m = base()
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    est = m.compile(K=4)
    with pytest.raises(TMCError, match=r"no value given for observation\(s\) \['x'\]"):
        est.log_marginal({})
    with pytest.raises(TMCError, match=r"value\(s\) given for \['y'\], which are not observations"):
        est.log_marginal({"x": torch.zeros(3), "y": torch.zeros(3)})


def test_observation_shape_names_the_plate():
    m = base()
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"observation 'x': dim 0 \(plate 'N'\) has size 4, expected 3"):
        m.compile(K=4).log_marginal({"x": torch.zeros(4)})


def test_proposal_support_must_contain_the_prior_s():
    m = tmcgraph.Model()
    m.latent("s", prior=lambda: Normal(2.0, 1.0), proposal=lambda: Gamma(2.0, 1.0))
    m.observe("x", lambda s: Normal(0.0, s))
    with pytest.raises(TMCError, match=r"latent 's': the proposal's support \(reals in \[0, inf\]\) does not contain "
                       r"the prior's \(reals in \[-inf, inf\]; its lower bound is above the prior's\)"):
        m.compile(K=4).log_marginal({"x": torch.tensor(0.5)})


def test_enumerate_errors():
    m = tmcgraph.Model()
    with pytest.raises(TMCError, match=r"latent 'c': enumerate=True .* do not give a proposal"):
        m.latent("c", prior=lambda: Bernoulli(0.3), proposal=lambda: Bernoulli(0.5), enumerate=True)
    m.latent("n", prior=lambda: Normal(0.0, 1.0), enumerate=True)
    with pytest.raises(TMCError, match=r"latent 'n': enumerate=True needs a prior with enumerable support"):
        m.compile()


def test_prior_may_not_depend_on_observation():
    m = tmcgraph.Model()
    m.observe("x", lambda mu: Normal(mu, 1.0))
    with pytest.raises(TMCError, match=r"latent 'mu': prior argument 'x' is an observation"):
        m.latent("mu", prior=lambda x: Normal(x, 1.0))


def test_distribution_batch_shape_must_fit_layout():
    m = base()
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda: Normal(torch.zeros(5), 1.0), plates=["N"])
    m.observe("x", lambda z: Normal(z, 1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"latent 'z' proposal: the distribution's batch shape \(5,\) does not fit"):
        m.compile(K=4).log_marginal({"x": torch.zeros(3)})


def test_event_dim_mismatch():
    m = base()
    m.observe("x", lambda mu: Normal(mu, 1.0), event_dim=1)
    with pytest.raises(TMCError, match=r"observation 'x': the likelihood has event shape \(\) .* event_dim=1"):
        m.compile(K=4).log_marginal({"x": torch.zeros(2)})


def test_k_errors():
    m = base()
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"K has no entry for sampled latent\(s\) \['z'\]"):
        m.compile(K={"mu": 4})
    with pytest.raises(TMCError, match=r"K given for \['w'\], which are not latents"):
        m.compile(K={"mu": 4, "z": 4, "w": 2})
    with pytest.raises(TMCError, match=r"K for latent 'mu' must be a positive int, got 0"):
        m.compile(K=0)


def test_declaration_errors():
    m = base()
    with pytest.raises(TMCError, match=r"site 'mu': the name is already declared"):
        m.latent("mu", prior=lambda: Normal(0.0, 1.0))
    with pytest.raises(TMCError, match=r"plate 'M' is not declared"):
        m.latent("z", prior=lambda: Normal(0.0, 1.0), plates=["M"])
    with pytest.raises(TMCError, match=r"cannot read parent names from \*args"):
        m.latent("z", prior=lambda *a: Normal(0.0, 1.0))
    with pytest.raises(TMCError, match=r"must be a Python identifier"):
        m.latent("a b", prior=lambda: Normal(0.0, 1.0))
    with pytest.raises(TMCError, match=r"the model declares no latent variable"):
        tmcgraph.Model().compile()


def test_explicit_parents_and_function_errors_name_the_site():
    m = base()
    m.latent("z", prior=lambda loc: Normal(loc, 1.0), parents=["mu"], plates=["N"])
    m.observe("x", lambda z: Normal(z, -1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"observation 'x' likelihood: the function raised ValueError"):
        m.compile(K=4).log_marginal({"x": torch.zeros(3)})


def test_smc_rejects_enumerated():
    m = base()
    m.latent("c", prior=lambda: Bernoulli(0.5), enumerate=True)
    m.observe("x", lambda mu, c: Normal(mu + c, 1.0))
    with pytest.raises(TMCError, match=r"smc does not support enumerated latents \['c'\]"):
        tmcgraph.smc(m, {"x": torch.tensor(0.0)}, 4)


def test_estimator_is_stale_after_a_new_declaration():
    m = base()
    m.observe("x", lambda mu: Normal(mu, 1.0))
    est = m.compile(K=4)
    m.latent("extra", prior=lambda: Normal(0.0, 1.0))
    with pytest.raises(TMCError, match=r"the model was changed .* after this estimator was built"):
        est.log_marginal({"x": torch.tensor(0.0)})

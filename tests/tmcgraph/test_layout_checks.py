"""Wrong parameter shapes raise a TMCError naming the function at fault; they never give a silent wrong answer.

The sweep gives every user function of a model (a sampled latent's prior and
proposal, an enumerated latent's prior, a likelihood) the same per-plate values
in many shapes, with sizes chosen to coincide: K = plate N = plate M = 3.  Each
evaluation must either raise or return exactly what the correctly shaped
parameter returns with the same random draws.
"""

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import tmcgraph
from tmcgraph import TMCError

N = 3
VALUES = {"b": torch.tensor([0.4, -0.3, 1.1]), "q": torch.tensor([0.2, 0.9, -0.5]),
          "probs": torch.tensor([0.2, 0.5, 0.9]), "d": torch.tensor([-0.2, 0.3, 0.6])}
# layout (*data batch, index dims (two: mu and c share one), plate N, plate M); per-N: (3, 1)
CORRECT = (N, 1)
SHAPES = [(N,), (N, 1), (1, N, 1), (N, 1, 1), (N, 1, 1, 1), (N, 1, 1, 1, 1), (1, N), (N, N), (2, 1), (1, 1, N, 1)]
FUNCTIONS = {"b": "latent 'z' prior", "q": "latent 'z' proposal", "probs": "latent 'c' prior",
             "d": "observation 'x' likelihood"}


def build(params):
    """mu global; c (enumerated) and z in plate N; x in N; w in plate M; every function takes one parameter."""
    m = tmcgraph.Model()
    m.plate("N", N)
    m.plate("M", 3)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.0, 1.5))
    m.latent("c", prior=lambda: Bernoulli(params["probs"]), enumerate=True, plates=["N"])
    m.latent("z", prior=lambda mu: Normal(mu + params["b"], 1.0), proposal=lambda: Normal(params["q"], 1.5),
             plates=["N"])
    m.observe("x", lambda z, c: Normal(z + 2.0 * c + params["d"], 0.8), plates=["N"])
    m.observe("w", lambda mu: Normal(mu, 1.0), plates=["M"])
    return m


DATA = {"x": torch.tensor([0.3, 2.5, -0.4]), "w": torch.tensor([0.1, -0.6, 0.8])}


def shaped(name, shape):
    values = VALUES[name]
    if shape == (2, 1):  # wrong plate size
        return values[:2].reshape(shape)
    if shape == (N, N):  # the values repeated along another dim
        return values.reshape(N, 1).expand(N, N).clone() if name != "probs" else values.reshape(1, N).expand(N, N)
    return values.reshape(shape)


def evaluate(estimator, params, data=DATA):
    torch.manual_seed(0)
    m = build(params)
    est = m.compile(K=3) if estimator == "tmc" else tmcgraph.IWAE(m, 3)
    return est.log_marginal(data)


@pytest.mark.parametrize("estimator", ["tmc", "iwae"])
@pytest.mark.parametrize("name", sorted(VALUES))
def test_wrong_shapes_raise_or_give_the_exact_answer(estimator, name):
    correct = {k: v.reshape(CORRECT) for k, v in VALUES.items()}
    reference = evaluate(estimator, correct)
    outcomes = {}
    for shape in SHAPES:
        params = dict(correct, **{name: shaped(name, shape)})
        try:
            got = evaluate(estimator, params)
        except TMCError as err:
            assert FUNCTIONS[name] in str(err), (shape, str(err))  # the function at fault, not a neighbour
            outcomes[shape] = "error"
            continue
        assert got.shape == reference.shape and torch.allclose(got, reference), (shape, got, reference)
        outcomes[shape] = "exact"
    # the correct shape and its left-padded form work; the misplaced ones are errors
    assert outcomes[(N, 1)] == outcomes[(1, N, 1)] == "exact"
    for shape in [(N,), (N, 1, 1), (N, 1, 1, 1), (N, 1, 1, 1, 1), (1, N), (2, 1)]:
        assert outcomes[shape] == "error", (shape, outcomes)


@pytest.mark.parametrize("estimator", ["tmc", "iwae"])
def test_observation_shapes(estimator):
    correct = {k: v.reshape(CORRECT) for k, v in VALUES.items()}
    reference = evaluate(estimator, correct)
    got = evaluate(estimator, correct, {"x": DATA["x"].reshape(1, N), "w": DATA["w"]})  # a batch of one
    assert got.shape == (1,) and torch.allclose(got, reference)
    for bad in [DATA["x"].reshape(N, 1), DATA["x"][:2]]:
        with pytest.raises(TMCError, match=r"observation 'x'"):
            evaluate(estimator, correct, {"x": bad, "w": DATA["w"]})


def test_enumerated_prior_in_the_wrong_layout_is_an_error():
    """A per-element Bernoulli given (N, 1) for plate N: formerly broadcast into a wrong log p(x)."""
    probs = torch.tensor([0.2, 0.5, 0.9])
    x = torch.tensor([0.3, 1.5, -0.2])

    def model(p):
        m = tmcgraph.Model()
        m.plate("N", 3)
        m.latent("c", prior=lambda: Bernoulli(p), enumerate=True, plates=["N"])
        m.observe("x", lambda c: Normal(2.0 * c, 1.0), plates=["N"])
        return m

    exact = torch.logsumexp(torch.stack([torch.log(1 - probs) + Normal(0.0, 1.0).log_prob(x),
                                         torch.log(probs) + Normal(2.0, 1.0).log_prob(x)]), 0).sum()
    assert torch.allclose(model(probs).compile().log_marginal({"x": x}), exact)
    msg = (r"latent 'c' prior: the distribution's batch shape \(3, 1\) does not fit the layout: dim -2 \(index c\) "
           r"has size 3, expected 1 .*\(index c=1, plate N=3\)")
    with pytest.raises(TMCError, match=msg):
        model(probs.reshape(3, 1)).compile().log_marginal({"x": x})


def test_prior_never_varies_along_its_own_sample_index():
    """K == N: a (N, 1) parameter would be read along the latent's own samples (E[P/p] = 0.074, not 1)."""
    loc = torch.arange(4.0)
    m = tmcgraph.Model()
    m.plate("N", 4)
    m.latent("z", prior=lambda: Normal(loc.reshape(4, 1), 1.0), proposal=lambda: Normal(0.0, 2.0), plates=["N"])
    m.observe("x", lambda z: Normal(z, 1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"latent 'z' prior: .*dim -2 \(index z\) has size 4, expected 1"):
        m.compile(K=4).log_marginal({"x": torch.zeros(4)})


def test_a_parameter_on_a_parents_index_is_found_by_the_probe():
    """K == N and the parameter lands on the parent's index dim, where the prior may vary through mu."""
    loc = torch.arange(4.0)
    m = tmcgraph.Model()
    m.plate("N", 4)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0))
    m.latent("z", prior=lambda mu: Normal(mu + loc.reshape(4, 1, 1), 1.0), proposal=lambda: Normal(0.0, 2.0),
             plates=["N"])
    m.observe("x", lambda z: Normal(z, 1.0), plates=["N"])
    with pytest.raises(TMCError, match=r"latent 'z' prior: .* varies along index dim -3 \(mu\) by itself"):
        m.compile(K=4).log_marginal({"x": torch.zeros(4)})
    # smc has one index dim (the particles): the extra dim is found by the shape check itself
    with pytest.raises(TMCError,
                       match=r"latent 'z' prior \(also its proposal\): the distribution's batch shape \(4, 4, 1\)"):
        tmcgraph.smc(m, {"x": torch.zeros(4)}, 4)


def test_joint_density_root_prior_must_not_vary_along_particles():
    loc = torch.arange(5.0)
    m = tmcgraph.Model()
    m.latent("mu", prior=lambda: Normal(loc, 1.0))  # 5 values where one is expected; L = 5 coincides
    m.observe("x", lambda mu: Normal(mu, 1.0))
    dens = tmcgraph.JointDensity(m)
    with pytest.raises(TMCError, match=r"latent 'mu' prior: .*\(index particles\) has size 5, expected 1"):
        dens.log_prob({"mu": torch.zeros(5)}, {"x": torch.tensor(0.0)})


def test_nan_in_observed_data_is_named():
    m = tmcgraph.Model()
    m.plate("N", 3)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0))
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    m.observe("y", lambda mu: Normal(mu, 1.0))
    data = {"x": torch.tensor([0.0, float("nan"), 1.0]), "y": torch.tensor(0.5)}
    for run in (lambda: m.compile(K=3).log_marginal(data), lambda: tmcgraph.iwae(m, data, 3),
                lambda: tmcgraph.smc(m, data, 3)):
        with pytest.raises(TMCError, match=r"observation\(s\) \['x'\]: the observed value contains NaN"):
            run()

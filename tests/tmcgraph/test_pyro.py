"""The Pyro frontend (tmcgraph.pyro) against closed forms, Pyro's exact enumeration, and Pyro's TMC."""

import math

import pytest
import torch

pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
from pyro.infer import SVI, TraceEnum_ELBO, TraceTMC_ELBO, config_enumerate  # noqa: E402

from tmcgraph import TMCError  # noqa: E402
from tmcgraph.pyro import TMC_ELBO  # noqa: E402


def _chain(x):
    z1 = pyro.sample("z1", dist.Normal(0.0, 1.0))
    z2 = pyro.sample("z2", dist.Normal(z1, 1.0))
    pyro.sample("x", dist.Normal(z2, 1.0), obs=x)


def _dependent_guide(x):  # q(z2 | z1): not factorised
    z1 = pyro.sample("z1", dist.Normal(0.5, 1.0))
    pyro.sample("z2", dist.Normal(z1, 0.3))


def test_unbiased_with_a_non_factorised_guide_where_pyros_tmc_is_not():
    """``E[exp(log P)] = p(x)`` (closed form: x ~ N(0, 3)).  Power: by Jensen an unbiased estimator has
    ``E[log P] <= log p(x)``; Pyro's TraceTMC_ELBO (mixture sampling, paired conditional density) lands far
    above it on the same model and guide."""
    pyro.set_rng_seed(0)
    x = torch.tensor(1.5)
    exact = dist.Normal(0.0, math.sqrt(3.0)).log_prob(x).item()
    n, K = 1500, 8
    ours = torch.stack([TMC_ELBO(num_particles=K).log_marginal(_chain, _dependent_guide, x).detach()
                        for _ in range(n)])
    ratio = (ours - exact).exp()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(n)
    assert ours.mean().item() < exact
    guide = config_enumerate(_dependent_guide, default="parallel", num_samples=K, tmc="mixture")
    theirs = torch.stack([-TraceTMC_ELBO(max_plate_nesting=0).differentiable_loss(_chain, guide, x).detach()
                          for _ in range(300)])
    assert theirs.mean().item() > exact + 5 * theirs.std().item() / math.sqrt(300)


def test_the_unbiasedness_test_has_power(monkeypatch):
    """With a wrong proposal density (the mean of the conditional log-densities over the parents' samples,
    not the log of their mean) the estimate is biased upwards, past the Jensen bound the test above checks."""
    import tmcgraph.pyro as frontend

    monkeypatch.setattr(frontend, "_mixture", lambda lq, parents: lq.mean(dim=parents, keepdim=True))
    pyro.set_rng_seed(0)
    x = torch.tensor(1.5)
    exact = dist.Normal(0.0, math.sqrt(3.0)).log_prob(x).item()
    wrong = torch.stack([TMC_ELBO(num_particles=8).log_marginal(_chain, _dependent_guide, x).detach()
                         for _ in range(300)])
    assert wrong.mean().item() > exact + 5 * wrong.std().item() / math.sqrt(300)


def _mixture_model(x):
    """A discrete global and a discrete local per point, both enumerated in the model."""
    probs = torch.tensor([0.2, 0.5, 0.3])
    k = pyro.sample("k", dist.Categorical(probs), infer={"enumerate": "parallel"})
    locs = torch.tensor([-1.0, 0.0, 2.0])
    with pyro.plate("N", x.shape[0]):
        c = pyro.sample("c", dist.Bernoulli(torch.tensor([0.1, 0.6, 0.9])[k]), infer={"enumerate": "parallel"})
        pyro.sample("x", dist.Normal(locs[k] + c, 1.0), obs=x)


def _empty_guide(x):
    pass


def test_model_enumeration_equals_trace_enum_elbo_and_brute_force():
    x = torch.tensor([0.3, -1.2, 2.5, 1.0])
    ours = TMC_ELBO(num_particles=3, max_plate_nesting=1).log_marginal(_mixture_model, _empty_guide, x)
    theirs = -TraceEnum_ELBO(max_plate_nesting=1).loss(_mixture_model, _empty_guide, x)
    assert abs(ours.item() - theirs) < 1e-5
    probs, locs, pc = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([0.1, 0.6, 0.9])
    brute = torch.logsumexp(torch.stack([
        probs[k].log() + sum(torch.logsumexp(torch.stack([
            dist.Bernoulli(pc[k]).log_prob(torch.tensor(float(c))) + dist.Normal(locs[k] + c, 1.0).log_prob(xn)
            for c in (0, 1)]), 0) for xn in x) for k in range(3)]), 0)
    torch.testing.assert_close(ours, brute)


def test_plated_latents_are_unbiased_against_the_linear_gaussian_marginal():
    """A global and per-point latents in a plate, sampled by the guide: exp(log P) is unbiased against the
    linear-Gaussian marginal (mu ~ N(0,1), z_n ~ N(mu, 1), x_n ~ N(z_n, 1))."""
    pyro.set_rng_seed(1)
    x = torch.tensor([0.5, -0.3, 1.2])

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("N", 3):
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        mu = pyro.sample("mu", dist.Normal(0.2, 0.8))
        with pyro.plate("N", 3):
            pyro.sample("z", dist.Normal(0.5 * mu + 0.3 * x, 0.9))

    cov = torch.eye(3) * 2.0 + 1.0
    exact = torch.distributions.MultivariateNormal(torch.zeros(3), cov).log_prob(x).item()
    n = 1500
    vals = torch.stack([TMC_ELBO(num_particles=8).log_marginal(model, guide, x).detach() for _ in range(n)])
    ratio = (vals - exact).exp()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(n)


def test_svi_with_tmc_elbo_learns_the_posterior_mean():
    pyro.clear_param_store()
    pyro.set_rng_seed(2)

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(pyro.param("loc", torch.tensor(-1.0)), 0.7))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), TMC_ELBO(num_particles=8))
    for _ in range(400):
        loss = svi.step(torch.tensor(2.0))
    assert isinstance(loss, float)
    assert abs(pyro.param("loc").item() - 1.0) < 0.2  # the posterior N(1, 1/2)


def _chain_model_one(x):
    z = pyro.sample("z", dist.Normal(0.0, 1.0))
    pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def test_unsupported_constructs_are_named():
    def local_model(x):
        with pyro.plate("N", 10), pyro.poutine.scale(scale=3.0):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def local_guide(x):  # unscaled: the model's scale is the model's alone
        with pyro.plate("N", 10):
            pyro.sample("z", dist.Normal(0.0, 1.0))

    with pytest.raises(TMCError, match=r"site 'z': a poutine.scale over a latent that lives in the site's plates"):
        TMC_ELBO(num_particles=2, max_plate_nesting=1).log_marginal(local_model, local_guide, torch.zeros(10))

    def chain_guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))

    def branching_model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        if z > 0:  # Python control flow on a sampled value: z holds K samples
            pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(TMCError, match=r"the model failed after site 'z' \(RuntimeError: Boolean value.*"
                                       r"num_particles=2 samples"):
        TMC_ELBO(num_particles=2).log_marginal(branching_model, chain_guide, torch.tensor(1.0))

    def extra_guide(x):
        pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("u", dist.Normal(0.0, 1.0))

    with pytest.raises(TMCError, match=r"latent 'u': the guide samples it, but the model has no site"):
        TMC_ELBO(num_particles=2).log_marginal(_chain_model_one, extra_guide, torch.tensor(1.0))

    def sequential_model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        c = pyro.sample("c", dist.Bernoulli(0.5), infer={"enumerate": "sequential"})
        pyro.sample("x", dist.Normal(z + c, 1.0), obs=x)

    with pytest.raises(TMCError, match=r"latent 'c': infer=\{'enumerate': 'sequential'\} is not supported"):
        TMC_ELBO(num_particles=2).log_marginal(sequential_model, chain_guide, torch.tensor(1.0))

    def discrete_guide(x):
        pyro.sample("z", dist.Bernoulli(0.5))

    def discrete_model(x):
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    with pytest.raises(TMCError, match=r"latent 'z': the guide's Bernoulli has no rsample"):
        TMC_ELBO(num_particles=2).log_marginal(discrete_model, discrete_guide, torch.tensor(0.0))
    with pytest.raises(TMCError, match=r"latent 'z1': the model samples it, but the guide does not"):
        TMC_ELBO(num_particles=2).log_marginal(_chain, _empty_guide, torch.tensor(0.0))
    with pytest.raises(TMCError, match="num_particles must be a positive int"):
        TMC_ELBO(num_particles=0)


def _example():
    import runpy
    from pathlib import Path

    return runpy.run_path(str(Path(__file__).resolve().parents[2] / "examples" / "pyro_biases.py"))


def test_model_side_enumeration_is_unbiased_where_pyros_tmc_is_not():
    """The example's mixture (means sampled by the guide, assignments enumerated in the model): our
    ``E[exp(log P)]`` matches the exact ``p(x)`` (a sum over the 3^3 assignments of a Gaussian marginal);
    Pyro's TraceTMC_ELBO is more than ten times too small on the same programs."""
    ex = _example()
    pyro.set_rng_seed(3)
    x = torch.tensor([-1.5, 0.3, 2.2])
    exact = ex["mixture_exact"](x)
    n = 1000
    ours = torch.stack([TMC_ELBO(num_particles=8, max_plate_nesting=1).log_marginal(
        ex["mixture_model"], ex["mixture_guide"], x).detach() for _ in range(n)])
    ratio = (ours - exact).exp()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(n)
    guide = config_enumerate(ex["mixture_guide"], default="parallel", num_samples=8, tmc="mixture")
    theirs = torch.stack([-TraceTMC_ELBO(max_plate_nesting=1).differentiable_loss(ex["mixture_model"], guide, x)
                          .detach() for _ in range(200)])
    assert (theirs - exact).exp().mean().item() < 0.1


def test_the_biases_example_runs():
    ex = _example()
    assert ex["main"](["--runs", "20", "--K", "4"]) == 0


def test_pyro_factor_and_guide_side_enumeration_are_unbiased():
    """``pyro.factor`` adds its log-factor; a discrete site enumerated in the guide is summed over its
    support (no proposal density), and a continuous guide site depending on it proposes from the uniform
    mixture over that support.  Model: z ~ Bernoulli(0.3), y ~ N(z, 1), x ~ N(y + z, 1) with a factor
    ``-0.5 y^2``, checked against numerical integration."""
    pyro.set_rng_seed(4)

    def model(x):
        z = pyro.sample("z", dist.Bernoulli(0.3))
        y = pyro.sample("y", dist.Normal(z, 1.0))
        pyro.factor("f", -0.5 * y ** 2)
        pyro.sample("x", dist.Normal(y + z, 1.0), obs=x)

    def guide(x):
        z = pyro.sample("z", dist.Bernoulli(0.5), infer={"enumerate": "parallel"})
        pyro.sample("y", dist.Normal(0.5 * z, 1.2))

    x = torch.tensor(1.0)
    ys = torch.linspace(-12, 12, 240001, dtype=torch.float64)
    terms = []
    for z, pz in ((0.0, 0.7), (1.0, 0.3)):
        dens = (torch.distributions.Normal(z, 1.0).log_prob(ys) - 0.5 * ys ** 2
                + torch.distributions.Normal(ys + z, 1.0).log_prob(x.double())).exp()
        terms.append(pz * torch.trapezoid(dens, ys))
    exact = math.log(sum(terms).item())
    n = 800
    vals = torch.stack([TMC_ELBO(num_particles=8).log_marginal(model, guide, x).detach() for _ in range(n)])
    ratio = (vals - exact).exp()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(n)


def test_the_compiled_backend_gives_the_eager_value_on_the_same_draw():
    x = torch.tensor(1.5)
    eager, compiled = TMC_ELBO(num_particles=8), TMC_ELBO(num_particles=8, backend="compiled")
    for seed in range(3):
        pyro.set_rng_seed(seed)
        a = eager.log_marginal(_chain, _dependent_guide, x)
        pyro.set_rng_seed(seed)
        b = compiled.log_marginal(_chain, _dependent_guide, x)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_nested_plates_with_enumeration_in_model_and_guide_equal_trace_enum_elbo():
    """Discrete sites in nested plates, enumerated in the model and (one of them) in the guide; the guide's
    enumerated site has a proposal of its own that the exact sum must ignore: the value is ``log p(x)``,
    TraceEnum_ELBO's with an empty guide."""
    x = torch.tensor([[0.5, -1.0, 2.0], [1.5, 0.2, -0.3]])

    def model(x):
        k = pyro.sample("k", dist.Bernoulli(0.4), infer={"enumerate": "parallel"})
        with pyro.plate("A", 2, dim=-2):
            a = pyro.sample("a", dist.Bernoulli(0.2 + 0.5 * k), infer={"enumerate": "parallel"})
            with pyro.plate("B", 3, dim=-1):
                b = pyro.sample("b", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])),
                                infer={"enumerate": "parallel"})
                pyro.sample("x", dist.Normal(a + b - k, 1.0), obs=x)

    def guide(x):
        pyro.sample("k", dist.Bernoulli(0.9), infer={"enumerate": "parallel"})

    ours = TMC_ELBO(num_particles=4, max_plate_nesting=2).log_marginal(model, guide, x)
    theirs = -TraceEnum_ELBO(max_plate_nesting=2).loss(model, _empty_guide, x)
    assert abs(ours.item() - theirs) < 1e-5


def test_posterior_marginals_of_enumerated_sites_are_exact():
    x = torch.tensor([0.3, -1.2, 2.5, 1.0])
    post = TMC_ELBO(num_particles=3, max_plate_nesting=1).posterior_marginals(_mixture_model, _empty_guide, x)
    values, weights = post["k"]
    probs, locs, pc = torch.tensor([0.2, 0.5, 0.3]), torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([0.1, 0.6, 0.9])
    joint = torch.stack([probs[k].log() + sum(torch.logsumexp(torch.stack([
        dist.Bernoulli(pc[k]).log_prob(torch.tensor(float(c))) + dist.Normal(locs[k] + c, 1.0).log_prob(xn)
        for c in (0, 1)]), 0) for xn in x) for k in range(3)])
    torch.testing.assert_close(weights.flatten(), torch.softmax(joint, 0))
    assert values.flatten().tolist() == [0, 1, 2]
    _, wc = post["c"]  # per data point, over c's support
    torch.testing.assert_close(wc.sum(dim=tuple(d for d in range(wc.dim()) if wc.shape[d] == 2)).flatten(),
                               torch.ones(4))


def test_posterior_marginals_of_sampled_sites_estimate_the_conjugate_posterior():
    """z ~ N(0, 1), x ~ N(z, 1), x = 2: the posterior is N(1, 1/2); the weighted samples' mean and second
    moment, averaged over draws, match it."""
    pyro.set_rng_seed(5)

    def model(x):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        pyro.sample("z", dist.Normal(0.5, 1.2))

    elbo = TMC_ELBO(num_particles=64)
    means, seconds = [], []
    for _ in range(200):
        values, weights = elbo.posterior_marginals(model, guide, torch.tensor(2.0))["z"]
        assert torch.isclose(weights.sum(), torch.tensor(1.0))
        means.append((weights * values).sum())
        seconds.append((weights * values ** 2).sum())
    assert abs(torch.stack(means).mean().item() - 1.0) < 0.03
    assert abs(torch.stack(seconds).mean().item() - 1.5) < 0.06


def test_an_hmm_under_pyro_markov_equals_trace_enum_elbo_and_the_forward_algorithm():
    """pyro.markov recycles tensor dims; factors are keyed by Pyro's variable ids, so the chain stays exact."""
    from pyro.ops.indexing import Vindex

    trans = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.25, 0.25, 0.5]])
    locs = torch.tensor([-1.0, 0.5, 2.0])

    def hmm(x):
        s = 0
        for t in pyro.markov(range(len(x))):
            s = pyro.sample(f"s{t}", dist.Categorical(Vindex(trans)[s]), infer={"enumerate": "parallel"})
            pyro.sample(f"x{t}", dist.Normal(Vindex(locs)[s], 1.0), obs=x[t])

    x = torch.tensor([0.1, 1.9, 2.2, -0.7, -1.1, 0.4, 2.5, 0.0])
    ours = TMC_ELBO(num_particles=2, max_plate_nesting=0).log_marginal(hmm, _empty_guide, x).item()
    theirs = -TraceEnum_ELBO(max_plate_nesting=0).loss(hmm, _empty_guide, x)
    alpha = trans[0].log() + dist.Normal(locs, 1.0).log_prob(x[0])
    for t in range(1, len(x)):
        alpha = torch.logsumexp(alpha[:, None] + trans.log(), 0) + dist.Normal(locs, 1.0).log_prob(x[t])
    assert abs(ours - theirs) < 1e-5 and abs(ours - torch.logsumexp(alpha, 0).item()) < 1e-4


def _gaussian_chain(markov):
    steps = pyro.markov if markov else (lambda r: r)

    def model(x):
        z = torch.tensor(0.0)
        for t in steps(range(len(x))):
            z = pyro.sample(f"z{t}", dist.Normal(0.9 * z, 0.7 if t else 1.0))
            pyro.sample(f"x{t}", dist.Normal(z, 1.0), obs=x[t])

    def guide(x):
        z = torch.tensor(0.0)
        for t in steps(range(len(x))):
            z = pyro.sample(f"z{t}", dist.Normal(0.5 * z + 0.4 * x[t], 0.8))

    return model, guide


def test_a_sampled_chain_under_pyro_markov_is_unbiased_and_equals_the_unmarked_chain():
    """A non-factorised guide along a chain: the same draw gives the same value with and without pyro.markov,
    and exp(log P) is unbiased against the Gaussian marginal."""
    x = torch.tensor([0.5, 1.0, -0.3, 0.8, 1.5, 0.2])
    values = []
    for markov in (False, True):
        pyro.set_rng_seed(0)
        values.append(TMC_ELBO(num_particles=8).log_marginal(*_gaussian_chain(markov), x))
    torch.testing.assert_close(values[0], values[1])
    mix = torch.zeros(6, 6)
    for t in range(6):
        for s in range(t + 1):
            mix[t, s] = 0.9 ** (t - s) * (1.0 if s == 0 else 0.7)
    exact = dist.MultivariateNormal(torch.zeros(6), mix @ mix.T + torch.eye(6)).log_prob(x).item()
    pyro.set_rng_seed(6)
    n = 600
    vals = torch.stack([TMC_ELBO(num_particles=8).log_marginal(*_gaussian_chain(True), x).detach()
                        for _ in range(n)])
    ratio = (vals - exact).exp()
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(n)


def test_a_subsampled_plate_of_observations_scales_each_elements_factor():
    """A discrete global enumerated, observations subsampled (given indices, so the value is deterministic):
    ``log sum_k p(k) prod_{i in S} p(x_i | k)^(N / |S|)``."""
    x = torch.tensor([0.3, -1.2, 2.5, 1.0, 0.0, 1.7])
    subsample = torch.tensor([0, 2, 5])
    locs, probs = torch.tensor([-1.0, 2.0]), torch.tensor([0.4, 0.6])

    def model(x):
        k = pyro.sample("k", dist.Categorical(probs), infer={"enumerate": "parallel"})
        with pyro.plate("N", 6, subsample=subsample) as idx:
            pyro.sample("x", dist.Normal(locs[k], 1.0), obs=x[idx])

    got = TMC_ELBO(num_particles=2, max_plate_nesting=1).log_marginal(model, _empty_guide, x)
    want = torch.logsumexp(probs.log() + 2.0 * dist.Normal(locs[:, None], 1.0).log_prob(x[subsample]).sum(-1), 0)
    torch.testing.assert_close(got, want)


def _factorised_guide(x):
    loc = pyro.param("dregs_loc", torch.tensor([0.2, 0.7]))
    pyro.sample("z1", dist.Normal(loc[0], 1.1))
    pyro.sample("z2", dist.Normal(loc[1], 1.0))


def test_the_dregs_surrogate_has_the_value_of_log_p_and_the_reparameterised_gradient_in_expectation():
    """Same draw, same value.  Over 800 draws its gradient w.r.t. the guide's parameters agrees with the
    reparameterised gradient of log P (both unbiased for grad E[log P]) within 4 standard errors, with a
    standard error several times smaller."""
    pyro.clear_param_store()
    x = torch.tensor(1.5)
    elbo = TMC_ELBO(num_particles=8, max_plate_nesting=0)
    pyro.set_rng_seed(1)
    value = elbo.log_marginal(_chain, _factorised_guide, x)
    pyro.set_rng_seed(1)
    torch.testing.assert_close(elbo.dregs_surrogate(_chain, _factorised_guide, x), value)
    loc = pyro.param("dregs_loc")
    pyro.set_rng_seed(7)
    n = 800
    reparam = torch.stack([torch.autograd.grad(elbo.log_marginal(_chain, _factorised_guide, x), loc)[0]
                           for _ in range(n)])
    dregs = torch.stack([torch.autograd.grad(elbo.dregs_surrogate(_chain, _factorised_guide, x), loc)[0]
                         for _ in range(n)])
    se = (reparam.var(0) / n + dregs.var(0) / n).sqrt()
    assert ((reparam.mean(0) - dregs.mean(0)).abs() < 4 * se).all()
    assert (dregs.std(0) * 3 < reparam.std(0)).all()
    with pytest.raises(TMCError, match=r"latent 'z2': its guide density depends on other sites' samples"):
        elbo.dregs_surrogate(_chain, _dependent_guide, x)


def _subsampled_local_model(x, subsample):
    with pyro.plate("N", len(x), subsample=subsample) as idx:
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])


def test_a_subsampled_plate_with_local_latents_scales_each_elements_marginal():
    """On one draw: ``log P = (N / B) sum_{i in S} log mean_k w_ik`` (each element's local sum taken, then its
    log scaled), with ``w_ik = p(z_ik) p(x_i | z_ik) / q(z_ik)``; the posterior weights still sum to 1 per
    element, and the DReGs surrogate has the same value."""
    x = torch.tensor([0.3, -1.2, 2.5, 1.0, 0.0, 1.7, -0.4])
    subsample = torch.tensor([1, 4, 6])
    seen = {}

    def guide(x, subsample):
        loc = pyro.param("sub_loc", torch.zeros(7))
        with pyro.plate("N", len(x), subsample=subsample) as idx:
            seen["q"] = dist.Normal(loc[idx], 0.8)
            seen["z"] = pyro.sample("z", seen["q"])

    K = 5
    elbo = TMC_ELBO(num_particles=K, max_plate_nesting=1)
    pyro.set_rng_seed(3)
    got = elbo.log_marginal(_subsampled_local_model, guide, x, subsample)
    z = seen["z"].reshape(K, 3)
    log_w = dist.Normal(0.0, 1.0).log_prob(z) + dist.Normal(z, 1.0).log_prob(x[subsample]) - seen["q"].log_prob(z)
    want = 7 / 3 * (log_w.logsumexp(0) - math.log(K)).sum()
    torch.testing.assert_close(got, want)
    pyro.set_rng_seed(3)
    torch.testing.assert_close(elbo.dregs_surrogate(_subsampled_local_model, guide, x, subsample), want)
    pyro.set_rng_seed(3)
    _, weights = elbo.posterior_marginals(_subsampled_local_model, guide, x, subsample)["z"]
    torch.testing.assert_close(weights.reshape(K, 3), torch.softmax(log_w, 0))


def test_subsampled_enumerated_locals_equal_trace_enum_elbo_and_the_full_data():
    """A Gaussian mixture with its assignments enumerated and the data subsampled, the component locations a
    sampled global with a point-mass guide: equals Pyro's TraceEnum_ELBO, which scales each element's marginal
    the same way; with the data repeated twice over, half the data subsampled equals the full data."""
    from pyro.ops.indexing import Vindex

    probs = torch.tensor([0.3, 0.7])

    def model(x, subsample):
        locs = pyro.sample("locs", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
        with pyro.plate("N", len(x), subsample=subsample) as idx:
            c = pyro.sample("c", dist.Categorical(probs), infer={"enumerate": "parallel"})
            pyro.sample("x", dist.Normal(Vindex(locs)[..., c], 1.0), obs=x[idx])

    def guide(x, subsample):
        pyro.sample("locs", dist.Delta(torch.tensor([-1.0, 1.5]), event_dim=1))

    half = torch.tensor([0.3, -1.2, 2.5, 1.0, 0.0])
    x = torch.cat([half, half])
    elbo = TMC_ELBO(num_particles=3, max_plate_nesting=1)
    sub = torch.arange(5)
    ours = elbo.log_marginal(model, guide, x, sub)
    theirs = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x, sub)
    assert abs(ours.item() - theirs) < 1e-4
    torch.testing.assert_close(ours, elbo.log_marginal(model, guide, x, torch.arange(10)))
    unscaled = elbo.log_marginal(model, guide, half, sub)  # power: the scale matters
    assert abs(ours.item() - unscaled.item()) > 1.0


# -- the structures of Pyro's own enumeration tests (tests/infer/test_enum.py), written here ---------------------
def _probs(seed, *shape):
    return torch.softmax(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), -1).requires_grad_()


def _two_unrelated_plates(p):  # a -> b in plate M=2; c -> d in plate N=3
    with pyro.plate("a_axis", 2):
        a = pyro.sample("a", dist.Categorical(p[0]))
        pyro.sample("b", dist.Categorical(p[1][a]), obs=torch.tensor([0, 1]))
    with pyro.plate("c_axis", 3):
        c = pyro.sample("c", dist.Categorical(p[2]))
        pyro.sample("d", dist.Categorical(p[3][c]), obs=torch.tensor([0, 0, 1]))


def _global_into_two_plates(p):  # b <- a -> c, b and c in different plates
    a = pyro.sample("a", dist.Categorical(p[0]))
    with pyro.plate("b_axis", 2):
        pyro.sample("b", dist.Categorical(p[1][a]), obs=torch.tensor([0, 1]))
    with pyro.plate("c_axis", 3):
        pyro.sample("c", dist.Categorical(p[2][a]), obs=torch.tensor([0, 0, 1]))


def _global_into_nested_plates(p):  # a -> b, b in two nested plates: two plate contractions in one step
    a = pyro.sample("a", dist.Categorical(p[0]))
    with pyro.plate("outer", 2), pyro.plate("inner", 2):
        pyro.sample("b", dist.Categorical(p[1][a]), obs=torch.tensor([[0, 1], [0, 0]]))


def _chain_through_nested_plates(p):  # a -> b (outer) -> c (outer x inner), c also depends on a
    from pyro.ops.indexing import Vindex

    a = pyro.sample("a", dist.Categorical(p[0]))
    with pyro.plate("outer", 2):
        b = pyro.sample("b", dist.Categorical(p[1][a]))
        with pyro.plate("inner", 2):
            pyro.sample("c", dist.Categorical(Vindex(p[2])[a, b]), obs=torch.tensor([[0, 1], [0, 0]]))


def _batched_hmm(p):  # a plate of 3 sequences, pyro.markov over 4 steps, Gaussian emissions
    x = torch.tensor([[0.1, 1.2, -0.3, 2.0], [1.5, 0.7, 0.2, -1.0], [0.0, 0.3, 2.2, 1.1]])
    with pyro.plate("sequences", 3):
        s = 0
        for t in pyro.markov(range(4)):
            s = pyro.sample(f"s_{t}", dist.Categorical(p[0][s]))
            pyro.sample(f"x_{t}", dist.Normal(p[1][s], 1.0), obs=x[:, t])


def _second_order_hmm(p):  # s_t depends on s_{t-1} and s_{t-2}: pyro.markov(history=2)
    from pyro.ops.indexing import Vindex

    x = torch.tensor([0.1, 1.2, -0.3, 2.0, 0.5])
    s_prev, s = 0, 0
    for t in pyro.markov(range(5), history=2):
        s_prev, s = s, pyro.sample(f"s_{t}", dist.Categorical(Vindex(p[0])[s_prev, s]))
        pyro.sample(f"x_{t}", dist.Normal(p[1][s], 1.0), obs=x[t])


def _factorial_hmm(p):  # two independent chains w, v; each observation depends on both (Pyro's hmm.py model_3)
    from pyro.ops.indexing import Vindex

    x = torch.tensor([0.1, 1.2, -0.3, 2.0])
    w = v = 0
    for t in pyro.markov(range(4)):
        w = pyro.sample(f"w_{t}", dist.Categorical(p[0][w]))
        v = pyro.sample(f"v_{t}", dist.Categorical(p[1][v]))
        pyro.sample(f"x_{t}", dist.Normal(Vindex(p[2])[w, v], 1.0), obs=x[t])


ENUM_MODELS = {
    "two_unrelated_plates": (_two_unrelated_plates, 1, lambda: [_probs(0, 2), _probs(1, 2, 2), _probs(2, 2),
                                                                _probs(3, 2, 2)]),
    "global_into_two_plates": (_global_into_two_plates, 1, lambda: [_probs(0, 2), _probs(1, 2, 2), _probs(2, 2, 2)]),
    "global_into_nested_plates": (_global_into_nested_plates, 2, lambda: [_probs(0, 2), _probs(1, 2, 2)]),
    "chain_through_nested_plates": (_chain_through_nested_plates, 2, lambda: [_probs(0, 2), _probs(1, 2, 2),
                                                                              _probs(2, 2, 2, 2)]),
    "batched_hmm": (_batched_hmm, 1, lambda: [_probs(0, 3, 3), torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)]),
    "second_order_hmm": (_second_order_hmm, 0, lambda: [_probs(0, 3, 3, 3),
                                                        torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)]),
    "factorial_hmm": (_factorial_hmm, 0, lambda: [_probs(0, 2, 2), _probs(1, 3, 3),
                                                  torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
                                                  .requires_grad_()]),
}


@pytest.mark.parametrize("scale", [1.0, 10.0])
@pytest.mark.parametrize("name", list(ENUM_MODELS))
def test_pyros_enumeration_test_models_equal_trace_enum_elbo(name, scale):
    """Every latent enumerated in the model (empty guide): log P is exact and equals TraceEnum_ELBO's, value and
    gradient, also with a poutine.scale around the whole model (Pyro's tests run scale 1 and 10)."""
    body, nesting, make = ENUM_MODELS[name]
    params = make()
    model = pyro.poutine.scale(pyro.infer.config_enumerate(body, default="parallel"), scale=scale)
    ours = TMC_ELBO(num_particles=2, max_plate_nesting=nesting).log_marginal(model, _empty_guide, params)
    theirs = -TraceEnum_ELBO(max_plate_nesting=nesting).differentiable_loss(model, _empty_guide, params)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for a, b in zip(torch.autograd.grad(ours, params), torch.autograd.grad(theirs, params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_subsampled_plate_with_local_latents_converges_to_the_full_data_where_pyros_tmc_does_not():
    """100 identical points, 10 per subsample: the scaled objective's target is the full data's log p(x).  At
    K=64 our mean log P is within 1 nat below it (Jensen); Pyro's TraceTMC_ELBO, which raises each factor to
    N / B before the sum over samples, lands more than 20 nats above."""
    def model(x):
        with pyro.plate("N", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x[idx])

    def guide(x):
        with pyro.plate("N", 100, subsample_size=10):
            pyro.sample("z", dist.Normal(0.5, 1.0))

    pyro.set_rng_seed(4)
    x = torch.full((100,), 1.5)
    exact = 100 * dist.Normal(0.0, math.sqrt(2.0)).log_prob(torch.tensor(1.5)).item()
    ours = torch.stack([TMC_ELBO(num_particles=64, max_plate_nesting=1).log_marginal(model, guide, x).detach()
                        for _ in range(60)])
    assert exact - 1.0 < ours.mean().item() < exact + 3 * ours.std().item() / math.sqrt(60)
    pyro_guide = config_enumerate(guide, default="parallel", num_samples=64, tmc="mixture")
    theirs = torch.stack([-TraceTMC_ELBO(max_plate_nesting=1).differentiable_loss(model, pyro_guide, x).detach()
                          for _ in range(20)])
    assert theirs.mean().item() > exact + 20

"""tmcgraph.learn: exponential-family proposals, and fit's four methods against closed-form posteriors."""

import math

import pytest
import torch
from torch.distributions import Normal

import tmcgraph
from tmcgraph import TMCError
from tmcgraph.learn import FAMILIES, fit, mean_field
from tmcgraph.learn import families as fam


# -- families ------------------------------------------------------------------------------------------------
def _random_family(name, seed):
    gen = torch.Generator().manual_seed(seed)
    q = FAMILIES[name](["N"], [3], ["N"], (4,) if name == "dirichlet" else (),
                       **({"num_categories": 5} if name == "categorical" else {}))
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(0.8 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return q


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_mean_parameters_are_the_expected_statistics_and_moment_matching_inverts_them(name):
    """``mean_parameters`` equals a Monte Carlo average of ``statistics`` over 200k samples, and
    ``set_mean_parameters`` recovers the distribution from them (the moment-matching map is the inverse)."""
    q = _random_family(name, 1)
    with torch.no_grad():
        z = q.site_distribution().sample((200_000,))  # (S, N, 1, *event)
        mc = q.statistics(z).mean(0).squeeze(1)
        m = q.mean_parameters()
        torch.testing.assert_close(mc, m, atol=0.03, rtol=0.03)
        other = _random_family(name, 2)
        other.set_mean_parameters(m)
        torch.testing.assert_close(other.mean_parameters(), m, atol=1e-4, rtol=1e-4)
        if name != "categorical":  # logits are identified only up to a constant
            for a, b in zip(q.params().values(), other.params().values()):
                torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_inverse_digamma():
    x = torch.tensor([1e-3, 0.05, 0.7, 1.0, 3.3, 40.0, 1e4], dtype=torch.float64)
    torch.testing.assert_close(fam.inverse_digamma(torch.digamma(x)), x, rtol=1e-8, atol=0)


def test_qem_step_moves_the_mean_parameters_by_the_moving_average():
    q = _random_family("gamma", 3)
    target = _random_family("gamma", 4).mean_parameters().detach()
    before = q.mean_parameters().detach()
    q.qem_step(target, 0.25)
    torch.testing.assert_close(q.mean_parameters().detach(), 0.75 * before + 0.25 * target, atol=1e-4, rtol=1e-4)
    with pytest.raises(TMCError, match=r"lr must be in \(0, 1\]"):
        q.qem_step(target, 1.5)
    with pytest.raises(TMCError, match=r"posterior statistics of shape \(2,\), expected \(3, 2\)"):
        q.qem_step(torch.zeros(2), 0.5)


def test_a_proposal_is_laid_out_over_the_models_plates():
    m = tmcgraph.Model().plate("N", 3).plate("T", 4)
    m.latent("a", prior=lambda: Normal(torch.zeros(4), 1.0), plates=["T"])
    m.latent("b", prior=lambda: Normal(torch.zeros(3, 4), 1.0), plates=["T", "N"])
    qs = mean_field(m)
    assert qs["a"]().batch_shape == (1, 4) and qs["b"]().batch_shape == (3, 4)
    assert qs["b"].loc.shape == (4, 3)  # the latent's own plate order, as posterior samples are laid out
    with torch.no_grad():
        qs["b"].loc.copy_(torch.arange(12.0).reshape(4, 3))
    torch.testing.assert_close(qs["b"]().mean, torch.arange(12.0).reshape(4, 3).T)
    with pytest.raises(TMCError, match=r"families names \['c'\], which are not sampled latents"):
        mean_field(m, {"c": "normal"})
    with pytest.raises(TMCError, match=r"latent 'a': unknown family 'cauchy'"):
        mean_field(m, {"a": "cauchy"})


# -- fit against a closed-form posterior ---------------------------------------------------------------------
N = 6


def _hierarchical(theta=None):
    """mu ~ N(0, 1); z_n ~ N(mu, 1); x_n ~ N(z_n, 1): a Gaussian posterior over (mu, z) in closed form."""
    m = tmcgraph.Model().plate("N", N)
    if theta is None:
        m.latent("mu", prior=lambda: Normal(0.0, 1.0))
        m.latent("z", prior=lambda mu: Normal(mu, 1.0), plates=["N"])
    else:  # mu a learnable parameter of the model
        m.latent("z", prior=lambda: Normal(theta, 1.0), plates=["N"])
    m.observe("x", lambda z: Normal(z, 1.0), plates=["N"])
    return m


X = torch.tensor([0.4, 2.1, -0.3, 1.7, 0.9, 2.6])


def _exact():
    prec = torch.zeros(N + 1, N + 1, dtype=torch.float64)
    prec[0, 0] = 1 + N
    prec[0, 1:] = prec[1:, 0] = -1
    prec[1:, 1:] = 2 * torch.eye(N, dtype=torch.float64)
    cov = torch.linalg.inv(prec)
    mean = cov @ torch.cat([torch.zeros(1, dtype=torch.float64), X.double()])
    return mean.float(), cov.diagonal().sqrt().float()


def test_one_qem_step_with_lr_1_sets_the_proposals_to_the_posterior_marginals():
    """With lr=1 one step moment-matches each Normal proposal to one TMC draw's posterior moments; averaged over
    eight draws of K=1000 they are the exact marginal means and standard deviations."""
    mean, sd = _exact()
    got_mean, got_sd = [], []
    m = _hierarchical()
    for seed in range(8):
        broad = mean_field(m, init={"mu": {"scale": 2.0}, "z": {"scale": 2.0}})  # covers the posterior
        q = fit(m, {"x": X}, method="qem", K=1000, steps=1, lr=1.0, proposals=broad, progress=False,
                seed=seed).proposals
        got_mean.append(torch.cat([q["mu"].loc.detach().reshape(1), q["z"].loc.detach()]))
        got_sd.append(torch.cat([q["mu"].log_scale.exp().detach().reshape(1), q["z"].log_scale.exp().detach()]))
    torch.testing.assert_close(torch.stack(got_mean).mean(0), mean, atol=0.06, rtol=0)
    torch.testing.assert_close(torch.stack(got_sd).mean(0), sd, atol=0.06, rtol=0)


@pytest.mark.parametrize("method,lr,steps", [("qem", 0.2, 150), ("rws", 0.05, 300)])
def test_inclusive_kl_methods_learn_the_posterior_marginals(method, lr, steps):
    """RWS and QEM minimise the inclusive KL: for a factorised Gaussian family the optimum is the exact marginals,
    means and standard deviations alike."""
    mean, sd = _exact()
    r = fit(_hierarchical(), {"x": X}, method=method, K=16, steps=steps, lr=lr, progress=False, seed=1)
    q = r.proposals
    got_mean = torch.cat([q["mu"].loc.detach().reshape(1), q["z"].loc.detach()])
    got_sd = torch.cat([q["mu"].log_scale.exp().detach().reshape(1), q["z"].log_scale.exp().detach()])
    assert (got_mean - mean).abs().max() < 0.2
    assert (got_sd - sd).abs().max() < 0.15


def test_the_rws_test_has_power(monkeypatch):
    """Wake-phi with its sign flipped (descending the weighted log q) moves the proposals away."""
    import tmcgraph.learn.fitting as fit_module

    right = fit_module._weighted_log_q
    monkeypatch.setattr(fit_module, "_weighted_log_q", lambda q, post, n: -right(q, post, n))
    mean, _ = _exact()
    r = fit(_hierarchical(), {"x": X}, method="rws", K=16, steps=300, lr=0.05, progress=False, seed=1)
    got_mean = torch.cat([r.proposals["mu"].loc.detach().reshape(1), r.proposals["z"].loc.detach()])
    assert (got_mean - mean).abs().max() > 0.5


@pytest.mark.parametrize("method,K,steps", [("vi", 1, 600), ("dregs", 16, 300)])
def test_gradient_methods_learn_the_posterior_means(method, K, steps):
    """The proposals' locations, averaged over the second half of the run, are the posterior means (the optimum of
    the mean-field bound's and of DReGs' means alike).  VI runs at K=1: its reparameterised gradient for the
    proposal loses signal as K grows (Rainforth et al., 2018), which DReGs repairs, so DReGs runs at K=16."""
    mean, _ = _exact()
    seen = []

    def average(step, result):
        if step >= steps // 2:
            seen.append(torch.cat([result.proposals["mu"].loc.detach().reshape(1), result.proposals["z"].loc.detach()]))

    r = fit(_hierarchical(), {"x": X}, method=method, K=K, steps=steps, lr=0.05, progress=False, seed=2,
            callback=average)
    assert (torch.stack(seen).mean(0) - mean).abs().max() < 0.12
    elbo = torch.tensor(r.history["elbo"])
    assert elbo[-50:].mean() > elbo[:20].mean()  # the bound rose
    exact = torch.distributions.MultivariateNormal(torch.zeros(N), torch.eye(N) + 1.0 + torch.eye(N)).log_prob(X)
    assert elbo[-100:].mean() < exact + 0.05  # and stays below log p(x) (Jensen), up to noise


@pytest.mark.parametrize("method", ["rws", "qem", "vi"])
def test_wake_theta_learns_a_model_parameter_by_maximum_likelihood(method):
    """z_n ~ N(theta, 1), x_n ~ N(z_n, 1): the marginal likelihood peaks at theta = mean(x)."""
    theta = torch.nn.Parameter(torch.tensor(-1.0))
    lr = {"qem": 0.3}.get(method, 0.05)
    fit(_hierarchical(theta), {"x": X}, method=method, K=16, steps=300, lr=lr, model_params=[theta],
        progress=False, seed=3)
    assert abs(theta.item() - X.mean().item()) < 0.15


def _mixture(theta, w, scale):
    """mu ~ N(theta, 1) (proposal N(w, scale)); c_n ~ Bernoulli(sigmoid(w)) enumerated; x_n ~ N(c_n mu, 1)."""
    m = tmcgraph.Model().plate("N", N)
    m.latent("mu", prior=lambda: Normal(theta, 1.0), proposal=lambda: Normal(w, scale))
    m.latent("c", prior=lambda: torch.distributions.Bernoulli(logits=w), enumerate=True, plates=["N"])
    m.observe("x", lambda mu, c: Normal(c * mu, 1.0), plates=["N"])
    return m


@pytest.mark.parametrize("data", [{"x": X}, {"x": torch.stack([X, X.flip(0), 2 * X])}], ids=["one", "batch of 3"])
def test_the_differentiable_log_marginal_is_log_p_of_the_same_draw_with_its_gradient(data):
    """``posterior(differentiable=True).differentiable_log_marginal()`` has the value and the gradient (model
    parameter, proposal parameter through log q and the reparameterised samples) of ``log_marginal`` on the
    same draw, for a sampled and an enumerated latent, over repeated draws and a batch of datasets."""
    theta, w = torch.tensor(0.3, requires_grad=True), torch.tensor(-0.2, requires_grad=True)
    est = _mixture(theta, w, 0.8).compile(K=7)
    for seed in range(3):
        torch.manual_seed(seed)
        plain = est.log_marginal(data).sum()
        want = torch.autograd.grad(plain, [theta, w])
        torch.manual_seed(seed)
        post = est.posterior(data, differentiable=True)
        got = post.differentiable_log_marginal()
        torch.testing.assert_close(got, plain)
        torch.testing.assert_close(torch.autograd.grad(got, [theta, w]), want)
        torch.manual_seed(seed + 100)  # a different draw has another gradient: the check can fail
        other = torch.autograd.grad(est.posterior(data, differentiable=True).differentiable_log_marginal(), [theta])
        assert not torch.allclose(other[0], want[0])
    with pytest.raises(TMCError, match=r"differentiable=True"):
        est.posterior(data).differentiable_log_marginal()


def test_the_differentiable_log_marginal_has_finite_gradients_past_zero_probability_samples():
    """x ~ Uniform(u - theta, u + theta) gives the samples u of the wide proposal far from x zero likelihood
    (log-factor -inf, depending on theta): the value and gradient stay those of log_marginal, finite."""
    theta = torch.tensor(1.0, requires_grad=True)
    m = tmcgraph.Model()
    m.latent("u", prior=lambda: Normal(theta, 1.0), proposal=lambda: Normal(0.0, 3.0))
    m.observe("x", lambda u: torch.distributions.Uniform(u - theta, u + theta, validate_args=False))
    est = m.compile(K=50)
    torch.manual_seed(0)
    assert (est.posterior({"x": torch.tensor(0.5)}).samples["u"] - 0.5).abs().gt(1).any()  # some are impossible
    torch.manual_seed(0)
    plain = est.log_marginal({"x": torch.tensor(0.5)})
    (want,) = torch.autograd.grad(plain, [theta])
    torch.manual_seed(0)
    got = est.posterior({"x": torch.tensor(0.5)}, differentiable=True).differentiable_log_marginal()
    (grad,) = torch.autograd.grad(got, [theta])
    assert torch.isfinite(grad) and torch.isfinite(got)
    torch.testing.assert_close((got, grad), (plain, want))


# -- runs: seeds, checkpoints, interruption -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["vi", "qem"])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, method):
    whole = fit(_hierarchical(), {"x": X}, method=method, K=8, steps=20, progress=False, seed=5)
    path = str(tmp_path / "run.pt")
    fit(_hierarchical(), {"x": X}, method=method, K=8, steps=12, progress=False, seed=5, checkpoint=path,
        checkpoint_every=5)
    resumed = fit(_hierarchical(), {"x": X}, method=method, K=8, steps=20, progress=False, seed=5, checkpoint=path)
    assert resumed.history["elbo"] == whole.history["elbo"]
    for n in whole.proposals:
        for a, b in zip(whole.proposals[n].parameters(), resumed.proposals[n].parameters()):
            assert torch.equal(a, b)


def test_an_interrupted_run_saves_and_resumes_without_losing_work(tmp_path):
    whole = fit(_hierarchical(), {"x": X}, method="rws", K=8, steps=15, progress=False, seed=6)
    path = str(tmp_path / "run.pt")

    def interrupt(step, result):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_hierarchical(), {"x": X}, method="rws", K=8, steps=15, progress=False, seed=6, checkpoint=path,
            checkpoint_every=100, callback=interrupt)
    assert torch.load(path, weights_only=False)["step"] == 7  # step 6 finished before the callback raised
    resumed = fit(_hierarchical(), {"x": X}, method="rws", K=8, steps=15, progress=False, seed=6, checkpoint=path)
    assert resumed.history["elbo"] == whole.history["elbo"]
    with pytest.raises(TMCError, match="checkpoint .* is of another run"):
        fit(_hierarchical(), {"x": X}, method="qem", K=8, steps=15, progress=False, seed=6, checkpoint=path)


def test_fit_errors_name_the_argument():
    m = _hierarchical()
    with pytest.raises(TMCError, match="unknown method 'hmc'"):
        fit(m, {"x": X}, method="hmc")
    with pytest.raises(TMCError, match=r"lr must be in \(0, 1\] for method 'qem'"):
        fit(m, {"x": X}, method="qem", lr=2.0)
    with pytest.raises(TMCError, match=r"latents \['z'\] have none"):
        fit(m, {"x": X}, method="qem", proposals={"mu": mean_field(m)["mu"], "z": lambda: Normal(0.0, 1.0)})
    with pytest.raises(TMCError, match="with_proposals: 'x' is not a sampled latent"):
        m.with_proposals({"x": lambda: Normal(0.0, 1.0)})


def test_with_proposals_on_a_markov_family_traces_it_member_by_member():
    """A markov family's members drawn from new proposals: the family is dropped from the copy (its one-call
    draw would use the family's own proposal), and the estimate is the plain chain's on the same draw."""
    m = tmcgraph.Model()
    m.markov("z", 4, init=lambda: Normal(0.0, 1.0), transition=lambda prev: Normal(0.5 * prev, 1.0),
             proposal=lambda: Normal(0.0, 1.0))
    m.observe_each("x", "z", lambda z: Normal(z, 1.0))
    qs = mean_field(m)
    other = m.with_proposals(qs)
    assert not other.families and m.families
    data = {f"x_{t}": torch.tensor(float(t)) for t in range(4)}
    torch.manual_seed(0)
    value = other.compile(K=4).log_marginal(data)
    assert torch.isfinite(value) and value.requires_grad
    value.backward()
    assert all(q.loc.grad is not None for q in qs.values())
    # unbiased for p(x) with the new proposals: x ~ N(0, C + I), C_st = 0.5^|s-t| (1 - 0.25^(min+1)) / 0.75
    idx = torch.arange(4.0)
    lo = torch.minimum(idx[:, None], idx[None, :])
    cov = 0.5 ** (idx[:, None] - idx[None, :]).abs() * (1 - 0.25 ** (lo + 1)) / 0.75 + torch.eye(4)
    exact = torch.distributions.MultivariateNormal(torch.zeros(4), cov).log_prob(torch.arange(4.0))
    est = other.compile(K=4)
    ratio = torch.stack([(est.log_marginal(data).detach() - exact).exp() for _ in range(400)])
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(400)


# -- held-out evaluation and data sets ----------------------------------------------------------------------
def test_predictive_log_likelihood_is_the_closed_form_posterior_predictive():
    """mu ~ N(0, 1), x_n ~ N(mu, 1): the held-out y ~ N(m 1, I + v 11^T) given x, m and v the posterior's."""
    x, y = torch.tensor([0.3, 1.9, 0.8, 1.2, 2.2]), torch.tensor([1.0, -0.4, 2.5])
    m = tmcgraph.Model().plate("N", 5)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0))
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    v = 1.0 / (1 + len(x))
    exact = torch.distributions.MultivariateNormal(v * x.sum() * torch.ones(3), torch.eye(3) + v).log_prob(y)
    torch.manual_seed(0)
    got = tmcgraph.learn.predictive_log_likelihood(
        m.compile(K=4000), {"x": x}, lambda s: Normal(s["mu"][:, None], 1.0).log_prob(y).sum(-1), num_samples=20000)
    assert abs(got.item() - exact.item()) < 0.03
    with pytest.raises(TMCError, match=r"test_log_likelihood returned shape \(20000, 3\), expected \(20000,\)"):
        tmcgraph.learn.predictive_log_likelihood(m.compile(K=10), {"x": x},
                                                 lambda s: Normal(s["mu"][:, None], 1.0).log_prob(y),
                                                 num_samples=20000)


def test_the_radon_data_set_loads_its_model_and_held_out_split():
    from tmcgraph.datasets import radon

    ds = radon.load()
    assert ds.train["log_radon"].shape == ds.test["log_radon"].shape == (4, 150)
    assert ds.train["log_radon"][0, :3].tolist() == pytest.approx([0.875468731, 0.832909107, 1.68639895])
    m = ds.model()
    assert set(m.latents()) == {"global_mean", "global_log_sigma", "state_mean", "state_log_sigma",
                                "beta_uranium", "beta_basement"}
    torch.manual_seed(0)
    r = fit(m, ds.train, method="qem", K=3, steps=2, progress=False)
    assert all(math.isfinite(e) for e in r.history["elbo"])
    samples = r.estimator.posterior(ds.train).sample(7)
    assert ds.test_log_likelihood(samples).shape == (7,)


def test_the_bus_breakdown_data_set():
    from tmcgraph.datasets import bus_breakdown

    ds = bus_breakdown.load()
    assert ds.train["delayed"].shape == ds.test["delayed"].shape == (2, 3, 150)
    assert ds.train["delayed"].mean().item() == pytest.approx(0.6656, abs=1e-4)
    est = ds.model().compile(K=3, groups=ds.groups)
    assert "psi+phi+sigma_beta+mu_beta" in est.graph.indices
    torch.manual_seed(0)
    assert torch.isfinite(est.log_marginal(ds.train))
    samples = est.posterior(ds.train).sample(5)
    assert ds.test_log_likelihood(samples).shape == (5,)


def test_the_bus_breakdown_variant_of_the_qem_papers_figure_has_a_latent_logit_per_incident():
    """``load(latent_delay=True)``: log_delay_ybi ~ N(logits, 1), delayed ~ Bernoulli(logits=log_delay); its joint
    density is the hand-written one, and its held-out likelihood draws the held-out logits."""
    from tmcgraph.datasets import bus_breakdown

    ds = bus_breakdown.load(latent_delay=True)
    m = ds.model()
    assert list(m.sites["log_delay"].plates) == ["years", "boroughs", "incidents"]
    torch.manual_seed(0)
    values = {n: v[0] for n, v in ds.model().compile(K=2, groups=ds.groups).posterior(ds.train).sample(1).items()
              if not n.startswith("@")}
    cols = bus_breakdown._columns()
    logits = bus_breakdown._logits(values["alpha"][..., None], values["phi"], values["psi"],
                                   cols["bus_company"][..., :150], cols["run_type"][..., :150])
    by_hand = (Normal(logits, 1.0).log_prob(values["log_delay"]).sum()
               + torch.distributions.Bernoulli(logits=values["log_delay"]).log_prob(ds.train["delayed"]).sum())
    density = tmcgraph.JointDensity(m)
    got = density.log_prob({n: v[None] for n, v in values.items()}, ds.train, sites=["log_delay", "delayed"])
    torch.testing.assert_close(got.reshape(()), by_hand, rtol=1e-5, atol=1e-3)
    samples = {n: v.expand(4, *v.shape) for n, v in values.items()}
    first, second = ds.test_log_likelihood(samples), ds.test_log_likelihood(samples)
    assert first.shape == (4,) and not torch.equal(first, second)  # the held-out logits are drawn
    assert ds.test_latents == ("alpha", "phi", "psi")


def test_the_occupancy_data_set_and_its_held_out_likelihood_summing_presence_out():
    from tmcgraph.datasets import occupancy

    ds = occupancy.load()
    assert ds.train["seen"].shape == (12, 6, 200, 5) and ds.test["seen"].shape == (12, 6, 100, 5)
    torch.manual_seed(0)
    est = ds.model().compile(K=2, groups=ds.groups)
    assert torch.isfinite(est.log_marginal(ds.train))
    samples = {n: v for n, v in est.posterior(ds.train).sample(2).items() if not n.startswith("@")}
    got = ds.test_log_likelihood(samples)
    # the same sum, site by site, for the first sample: log sum_z p(z) prod_r p(seen_r | z)
    weather, quality = occupancy._columns()["weather"][:, :, 200:], occupancy._columns()["quality"][:, :, 200:]
    total = 0.0
    for b in range(12):
        for y in range(6):
            logit_z = samples["bird_year_mean"][0, b, y] * weather[b, y] * samples["beta"][0, b]
            per_z = []
            for z in (0.0, 1.0):
                logit_seen = samples["alpha"][0, b] * quality[b, y] * z - 10.0 * (1 - z)
                seen = torch.distributions.Bernoulli(logits=logit_seen[:, None]).log_prob(ds.test["seen"][b, y]).sum(-1)
                per_z.append(torch.distributions.Bernoulli(logits=logit_z).log_prob(torch.tensor(z)) + seen)
            total += torch.logsumexp(torch.stack(per_z), 0).sum().item()
    assert got[0].item() == pytest.approx(total, rel=1e-5)


def test_the_chimpanzees_data_set_reads_a_users_file_grouped_by_block(tmp_path, monkeypatch):
    """A file in the rethinking package's format (rows shuffled): trials are grouped by actor and block, ordered
    by trial number, and the last two of each block held out."""
    from tmcgraph.datasets import chimpanzees

    gen = torch.Generator().manual_seed(0)
    rows = []
    for actor in range(1, 8):
        for block in range(1, 7):
            for r in range(12):
                trial = 12 * (block - 1) + r + 1
                pulled = int(torch.randint(2, (1,), generator=gen))
                rows.append(f"{actor};NA;{r % 2};{block};{trial};{(r // 2) % 2};0;{pulled}")
    order = torch.randperm(len(rows), generator=gen).tolist()
    header = '"actor";"recipient";"condition";"block";"trial";"prosoc.left";"chose.prosoc";"pulled.left"'
    (tmp_path / "chimpanzees.csv").write_text("\n".join([header] + [rows[i] for i in order]) + "\n")
    ds = chimpanzees.load(tmp_path)
    want = torch.tensor([float(r.split(";")[-1]) for r in rows]).reshape(7, 6, 12)
    torch.testing.assert_close(ds.train["pulled_left"], want[..., :10])
    torch.testing.assert_close(ds.test["pulled_left"], want[..., 10:])
    monkeypatch.delenv("TMCGRAPH_DATA", raising=False)
    with pytest.raises(TMCError, match="chimpanzees.csv not found in None"):
        chimpanzees.load()
    torch.manual_seed(0)
    est = ds.model().compile(K=3, groups=ds.groups)
    samples = est.posterior(ds.train).sample(4)
    assert ds.test_log_likelihood(samples).shape == (4,)

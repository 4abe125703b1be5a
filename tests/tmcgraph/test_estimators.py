"""Estimators on declared models, proved against closed forms and enumeration."""

import itertools
import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, Independent, MultivariateNormal, Normal

import tmcgraph
from tmcgraph.testing import brute_force_log_sum


def chain2(nonfactorised=True):
    """z1 ~ N(0,1), z2 ~ N(z1,1), x ~ N(z2,1): p(x) = N(x; 0, 3)."""
    m = tmcgraph.Model()
    m.latent("z1", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.3, 1.3))
    if nonfactorised:
        m.latent("z2", prior=lambda z1: Normal(z1, 1.0), proposal=lambda z1: Normal(z1, 0.6))
    else:
        m.latent("z2", prior=lambda z1: Normal(z1, 1.0), proposal=lambda: Normal(0.0, 1.6))
    m.observe("x", lambda z2: Normal(z2, 1.0))
    return m


def global_local(n=3):
    """mu ~ N(0,1), z_i ~ N(mu,1), x_i ~ N(z_i, 0.5^2): x ~ N(0, 11^T + 1.25 I)."""
    m = tmcgraph.Model()
    m.plate("N", n)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.2, 1.5))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda mu: Normal(0.9 * mu, 1.2), plates=["N"])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    return m


def global_local_exact(x):
    n = x.shape[-1]
    cov = torch.ones(n, n, dtype=torch.float64) + 1.25 * torch.eye(n, dtype=torch.float64)
    return MultivariateNormal(torch.zeros(n, dtype=torch.float64), cov).log_prob(x.double()).item()


def assert_unbiased(log_estimates, log_truth):
    """exp(log P - log p) has mean 1; allow 4.5 standard errors."""
    r = torch.exp(log_estimates.double() - log_truth)
    mean, se = r.mean().item(), r.std().item() / math.sqrt(r.numel())
    assert abs(mean - 1.0) < 4.5 * se + 1e-3, (mean, se)


# -- unbiasedness ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [2, 4, 16])
def test_tmc_unbiased_chain_with_nonfactorised_proposal(K):
    torch.manual_seed(K)
    x = torch.tensor(1.7)
    est = chain2().compile(K=K)
    log_p = est.log_marginal({"x": x.expand(100000)})  # 100000 independent estimates in one call
    assert_unbiased(log_p, Normal(0.0, math.sqrt(3.0)).log_prob(x).item())


@pytest.mark.parametrize("K", [2, 4, 16])
def test_tmc_unbiased_plated_global_local(K):
    torch.manual_seed(100 + K)
    x = torch.tensor([0.4, -1.1, 2.0])
    est = global_local().compile(K=K)
    log_p = est.log_marginal({"x": x.expand(30000, 3)})
    assert_unbiased(log_p, global_local_exact(x))


@pytest.mark.parametrize("K", [2, 16])
def test_iwae_unbiased_and_chunked(K):
    torch.manual_seed(7 + K)
    x = torch.tensor([0.4, -1.1, 2.0])
    m = global_local()
    assert_unbiased(tmcgraph.iwae(m, {"x": x.expand(30000, 3)}, K), global_local_exact(x))
    assert_unbiased(tmcgraph.iwae(m, {"x": x.expand(30000, 3)}, K, chunk_size=K // 2 + 1), global_local_exact(x))


@pytest.mark.parametrize("proposal", ["bootstrap", "guide"])
@pytest.mark.parametrize("resampling", ["multinomial", "systematic"])
def test_smc_unbiased_chain(proposal, resampling):
    torch.manual_seed(3)
    x = torch.tensor(1.7)
    log_z = tmcgraph.smc(chain2(), {"x": x.expand(40000)}, 4, proposal=proposal, resampling=resampling)
    assert log_z.shape == (40000,)
    assert_unbiased(log_z, Normal(0.0, math.sqrt(3.0)).log_prob(x).item())


def test_smc_plated_unbiased():
    torch.manual_seed(4)
    x = torch.tensor([0.4, -1.1, 2.0])
    log_z = tmcgraph.smc(global_local(), {"x": x.expand(30000, 3)}, 4, proposal="guide")
    assert_unbiased(log_z, global_local_exact(x))


# -- exact enumeration ----------------------------------------------------------------------------------
def test_all_enumerated_equals_exact_sum():
    torch.manual_seed(0)
    pi = torch.softmax(torch.randn(3, dtype=torch.float64), 0)
    trans = torch.softmax(torch.randn(3, 4, dtype=torch.float64), -1)
    means = torch.randn(4, dtype=torch.float64)
    m = tmcgraph.Model()
    m.plate("N", 3)
    m.latent("a", prior=lambda: Categorical(pi), enumerate=True)
    m.latent("b", prior=lambda a: Categorical(trans[a]), enumerate=True, plates=["N"])
    m.observe("x", lambda b: Normal(means[b], 1.0), plates=["N"])
    x = torch.randn(2, 3, dtype=torch.float64)  # a batch of two datasets
    got = m.compile(K=5).log_marginal({"x": x})
    for j in range(2):
        terms = []
        for a in range(3):
            for bs in itertools.product(range(4), repeat=3):
                t = pi[a].log() + sum(trans[a, b].log() + Normal(means[b], 1.0).log_prob(x[j, n])
                                      for n, b in enumerate(bs))
                terms.append(t)
        assert torch.allclose(got[j], torch.logsumexp(torch.stack(terms), 0), rtol=1e-12, atol=1e-12)
    # IWAE with everything enumerated is the same exact sum
    assert torch.allclose(tmcgraph.iwae(m, {"x": x}, 3), got, rtol=1e-12)


def mixture_model():
    m = tmcgraph.Model()
    m.plate("N", 5)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.0, 2.0))
    m.latent("c", prior=lambda: Bernoulli(0.3), enumerate=True, plates=["N"])
    m.observe("x", lambda mu, c: Normal(mu + 2.0 * c, 1.0), plates=["N"])
    return m


def test_continuous_global_enumerated_locals_converge_to_quadrature():
    x = torch.tensor([0.3, 2.5, -0.4, 1.9, 0.1], dtype=torch.float64)
    mus = torch.linspace(-8, 8, 40001, dtype=torch.float64)
    comp = torch.stack([Normal(mus[:, None], 1.0).log_prob(x) + math.log(0.7),
                        Normal(mus[:, None] + 2, 1.0).log_prob(x) + math.log(0.3)])
    lx = torch.logsumexp(comp, 0).sum(-1) + Normal(0.0, 1.0).log_prob(mus)
    exact = (torch.logsumexp(lx, 0) + math.log(mus[1] - mus[0])).item()
    torch.manual_seed(0)
    errors = {}
    for K in (4, 4096):
        est = mixture_model().compile(K=K)
        errors[K] = (est.log_marginal({"x": x.expand(20, 5)}) - exact).abs().mean().item()
    assert errors[4096] < 0.02
    assert errors[4096] < errors[4] / 5


# -- TMC special cases ----------------------------------------------------------------------------------
def test_k1_is_a_single_importance_sample():
    x = torch.tensor([0.4, -1.1, 2.0])
    est = global_local().compile(K=1)
    torch.manual_seed(0)
    post = est.posterior({"x": x})
    mu, z = post.samples["mu"].reshape(()), post.samples["z"].reshape(3)
    log_w = (Normal(0.0, 1.0).log_prob(mu) - Normal(0.2, 1.5).log_prob(mu)
             + (Normal(mu, 1.0).log_prob(z) - Normal(0.9 * mu, 1.2).log_prob(z)).sum()
             + Normal(z, 0.5).log_prob(x).sum())
    assert torch.allclose(post.log_marginal, log_w, atol=1e-5)


def test_one_latent_tmc_is_iwae():
    m = tmcgraph.Model()
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.5, 0.8))
    m.plate("N", 4)
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    x = torch.tensor([0.1, 0.9, 1.4, 0.3])
    torch.manual_seed(5)
    tmc = m.compile(K=32).log_marginal({"x": x})
    torch.manual_seed(5)
    iw = tmcgraph.iwae(m, {"x": x}, 32)
    assert torch.allclose(tmc, iw, atol=1e-5)
    torch.manual_seed(5)
    mu = Normal(0.5, 0.8).expand((32,)).rsample()
    log_w = Normal(0.0, 1.0).log_prob(mu) - Normal(0.5, 0.8).log_prob(mu)
    log_w = log_w + Normal(mu[:, None], 1.0).log_prob(x).sum(-1)
    assert torch.allclose(tmc, torch.logsumexp(log_w, 0) - math.log(32), atol=1e-5)


def test_matches_brute_force_over_combinations():
    """The contraction equals the literal average over all K^n index combinations."""
    torch.manual_seed(1)
    m = global_local(n=2)
    est = m.compile(K={"mu": 3, "z": 2})
    tr, plan, norm = est._trace({"x": torch.tensor([0.5, -0.2])})
    value = plan.log_sum(tr.factors) - norm
    oracle = brute_force_log_sum(est.graph, {k: v.double() for k, v in tr.factors.items()}) - norm
    assert torch.allclose(value.double(), oracle, atol=1e-5)
    assert est.plan.treewidth == 1


# -- gradients and learning -------------------------------------------------------------------------------
def test_gradients_reach_model_and_proposal_parameters():
    prior_loc = torch.nn.Parameter(torch.tensor(0.0))
    q_loc = torch.nn.Parameter(torch.tensor(0.0))
    m = tmcgraph.Model()
    m.plate("N", 3)
    m.latent("mu", prior=lambda: Normal(prior_loc, 1.0), proposal=lambda: Normal(q_loc, 1.5))
    m.latent("z", prior=lambda mu: Normal(mu, 1.0), proposal=lambda mu: Normal(mu, 1.2), plates=["N"])
    m.observe("x", lambda z: Normal(z, 0.5), plates=["N"])
    m.compile(K=8).log_marginal({"x": torch.tensor([1.0, 2.0, 3.0])}).backward()
    assert prior_loc.grad is not None and torch.isfinite(prior_loc.grad) and prior_loc.grad != 0
    assert q_loc.grad is not None and torch.isfinite(q_loc.grad) and q_loc.grad != 0


def test_optimising_the_proposal_moves_it_to_the_posterior():
    torch.manual_seed(0)
    x = torch.tensor([1.2, 0.8, 2.1, 1.5, 0.9, 1.7, 1.1, 1.4])
    post_mean, post_sd = x.sum().item() / 9, math.sqrt(1 / 9)  # mu ~ N(0,1), x_i ~ N(mu, 1)
    loc = torch.nn.Parameter(torch.tensor(-2.0))
    log_scale = torch.nn.Parameter(torch.tensor(1.0))
    m = tmcgraph.Model()
    m.plate("N", 8)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc, log_scale.exp()))
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    est = m.compile(K=4)
    opt = torch.optim.Adam([loc, log_scale], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        (-est.log_marginal({"x": x.expand(16, 8)}).mean()).backward()
        opt.step()
    assert abs(loc.item() - post_mean) < 0.1
    assert 0.5 * post_sd < log_scale.exp().item() < 1.6 * post_sd


# -- DReGs ----------------------------------------------------------------------------------------------
def _dregs_by_hand(log_w, params):
    """sum_k (w_k / sum w)^2 d log w_k / d phi, log_w built with q's parameters detached."""
    weights = torch.softmax(log_w.detach().reshape(-1), 0) ** 2
    return torch.autograd.grad((weights * log_w.reshape(-1)).sum(), params)


def test_dregs_one_latent_is_iwae_dregs():
    """With one latent TMC is IWAE, and both forms reduce to IWAE's DReGs (Tucker et al. 2019)."""
    a = torch.nn.Parameter(torch.tensor(0.3))
    s = torch.nn.Parameter(torch.tensor(0.2))
    m = tmcgraph.Model()
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(a, s.exp()))
    m.plate("N", 3)
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    x = torch.tensor([0.5, 1.5, 1.0])
    est = m.compile(K=6)
    torch.manual_seed(0)
    got = torch.autograd.grad(est.dregs_surrogate({"x": x}), [a, s])
    torch.manual_seed(0)
    mu = Normal(a, s.exp()).expand((6,)).rsample()
    log_w = (Normal(0.0, 1.0).log_prob(mu) - Normal(a.detach(), s.detach().exp()).log_prob(mu)
             + Normal(mu[:, None], 1.0).log_prob(x).sum(-1))
    want = _dregs_by_hand(log_w, [a, s])
    torch.manual_seed(0)
    paper = torch.autograd.grad(est.dregs_surrogate({"x": x}, form="paper"), [a, s])
    for g, p, w in zip(got, paper, want):
        assert torch.allclose(g, w, atol=1e-5), (g, w)
        assert torch.allclose(p, w, atol=1e-5), (p, w)
    # the surrogate's value is this draw's log P_TMC
    torch.manual_seed(0)
    value = est.dregs_surrogate({"x": x})
    torch.manual_seed(0)
    assert torch.allclose(value, est.log_marginal({"x": x}))
    # not the plain TMC gradient
    torch.manual_seed(0)
    plain = torch.autograd.grad(est.log_marginal({"x": x}), [a, s])
    assert not torch.allclose(plain[0], got[0], atol=1e-4)


@pytest.mark.parametrize("mixture", [False, True])
def test_paper_dregs_matches_eq54_over_combinations(mixture):
    """form="paper" is eq. 54/60 exactly (which is biased: see tests/test_dregs.py)."""
    a1, a2 = torch.nn.Parameter(torch.tensor(0.2)), torch.nn.Parameter(torch.tensor(-0.1))
    s2 = torch.nn.Parameter(torch.tensor(0.1))
    m = tmcgraph.Model()
    m.plate("N", 2)
    m.latent("z1", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(a1, 1.1))
    if mixture:
        m.latent("z2", prior=lambda z1: Normal(z1, 1.0), proposal=lambda z1: Normal(z1 + a2, s2.exp()), plates=["N"])
    else:
        m.latent("z2", prior=lambda z1: Normal(z1, 1.0), proposal=lambda: Normal(a2, s2.exp()), plates=["N"])
    m.observe("x", lambda z2: Normal(z2, 0.7), plates=["N"])
    est = m.compile(K=3)
    torch.manual_seed(2)
    tr, plan, _ = est._trace({"x": torch.tensor([0.4, 1.3])}, dregs=True)
    got = torch.autograd.grad(est._paper_dregs_from_trace(tr, plan), [a1, a2, s2], retain_graph=True)
    z1 = tr.values["z1"].reshape(3)  # (k1,)
    z2 = tr.values["z2"].reshape(3, 2)  # (k2, n)
    x = torch.tensor([0.4, 1.3])
    lq1 = Normal(a1.detach(), 1.1).log_prob(z1)
    if mixture:  # mixture over the parent's samples, parameters detached, samples attached
        comp = Normal(z1[:, None, None] + a2.detach(), s2.detach().exp()).log_prob(z2[None])  # (k1', k2, n)
        lq2 = torch.logsumexp(comp, 0) - math.log(3)
    else:
        lq2 = Normal(a2.detach(), s2.detach().exp()).log_prob(z2)
    # combinations: z1 index k, and for each plate element n its own z2 index j_n
    terms = []
    for k in range(3):
        for js in itertools.product(range(3), repeat=2):
            t = Normal(0.0, 1.0).log_prob(z1[k]) - lq1[k]
            for n, j in enumerate(js):
                t = t + Normal(z1[k], 1.0).log_prob(z2[j, n]) - lq2[j, n] + Normal(z2[j, n], 0.7).log_prob(x[n])
            terms.append(t)
    want = _dregs_by_hand(torch.stack(terms), [a1, a2, s2])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g, w)


# -- posterior summaries --------------------------------------------------------------------------------
def test_posterior_marginals_match_brute_force_and_sampling_matches_joint():
    torch.manual_seed(3)
    m = global_local(n=2)
    est = m.compile(K=3)
    data = {"x": torch.tensor([0.5, -0.7])}
    post = est.posterior(data)
    tr = post._trace
    fac = {k: v.detach().double() for k, v in tr.factors.items()}
    total = brute_force_log_sum(est.graph, fac)

    def prob(mu_k, z0_k=None):
        f = dict(fac)
        mask = torch.full((3,), -math.inf, dtype=torch.float64)
        mask[mu_k] = 0
        f["mu"] = f["mu"] + mask
        if z0_k is not None:
            zmask = torch.zeros(2, 3, 3, dtype=torch.float64)  # (N, z, mu)
            zmask[0] = -math.inf
            zmask[0, z0_k] = 0
            f["z"] = f["z"] + zmask
        return torch.exp(brute_force_log_sum(est.graph, f) - total).item()

    mu_marg = [prob(k) for k in range(3)]
    assert torch.allclose(post.marginals["mu"].double(), torch.tensor(mu_marg, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(post.marginals["z"].sum(-1), torch.ones(2), atol=1e-5)
    # posterior mean = marginal-weighted samples
    assert torch.allclose(post.mean("mu"), (post.marginals["mu"] * post.samples["mu"]).sum(), atol=1e-6)
    # backward sampling reproduces the joint of (mu index, z_0 index)
    draws = post.sample(20000)
    joint = torch.zeros(3, 3)
    joint.index_put_((draws["@index:mu"], draws["@index:z"][:, 0]), torch.ones(20000), accumulate=True)
    want = torch.tensor([[prob(k, j) for j in range(3)] for k in range(3)], dtype=torch.float32)
    assert torch.allclose(joint / 20000, want, atol=0.015)
    assert draws["z"].shape == (20000, 2)
    assert torch.equal(draws["mu"], post.samples["mu"][draws["@index:mu"]])


def test_posterior_mean_conjugate():
    torch.manual_seed(0)
    x = torch.tensor([1.2, 0.8, 2.1, 1.5])
    m = tmcgraph.Model()
    m.plate("N", 4)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(1.0, 1.0))
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    post = m.compile(K=20000).posterior({"x": x})
    assert abs(post.mean("mu").item() - x.sum().item() / 5) < 0.02
    var = post.mean("mu", lambda v: v**2) - post.mean("mu") ** 2
    assert abs(var.item() - 0.2) < 0.02


def test_posterior_of_enumerated_latent_is_exact_given_samples():
    torch.manual_seed(0)
    m = mixture_model()
    x = torch.tensor([0.3, 2.5, -0.4, 1.9, 0.1])
    post = m.compile(K=4096).posterior({"x": x})
    probs = post.marginals["c"]
    assert probs.shape == (5, 2)
    assert probs[1, 1] > 0.5 and probs[2, 1] < 0.2
    assert torch.allclose(probs.sum(-1), torch.ones(5), atol=1e-5)


# -- numerics and layout ----------------------------------------------------------------------------------
def test_zero_probability_gives_minus_inf_and_finite_gradients():
    p = torch.nn.Parameter(torch.tensor([0.0, 0.0]))
    m = tmcgraph.Model()
    m.latent("c", prior=lambda: Categorical(logits=p), enumerate=True)
    table = torch.tensor([[0.0, 0.0, -math.inf], [0.5, 0.1, -math.inf]])  # value 2 is impossible under either c
    m.observe("x", lambda c: Categorical(logits=table[c]))
    lp = m.compile().log_marginal({"x": torch.tensor(2)})
    assert lp.item() == -math.inf
    lp.backward()
    assert torch.isfinite(p.grad).all()


def test_vector_latents_and_batches_of_datasets():
    m = tmcgraph.Model()
    m.plate("N", 4)
    m.latent("w", prior=lambda: Independent(Normal(torch.zeros(2), 1.0), 1))
    m.observe("y", lambda w: Normal(w[..., 0] - w[..., 1], 0.5), plates=["N"])
    y = torch.randn(3, 4)
    out = m.compile(K=64).log_marginal({"y": y})
    assert out.shape == (3,) and torch.isfinite(out).all()


def test_two_plates_and_a_data_dependent_proposal():
    m = tmcgraph.Model()
    m.plate("N", 3)
    m.plate("T", 2)
    m.latent("a", prior=lambda: Normal(torch.zeros(3, 1), 1.0), plates=["N"])
    m.latent("b", prior=lambda a: Normal(a, 1.0), proposal=lambda a, x: Normal(0.5 * (a + x), 0.9),
             plates=["N", "T"])
    m.observe("x", lambda b: Normal(b, 1.0), plates=["N", "T"])
    torch.manual_seed(0)
    x = torch.randn(3, 2)
    # x ~ N(0, I (x) (1 1^T) * 1 + 2 I) per N row: a_n shared by the two T elements
    cov = torch.ones(2, 2, dtype=torch.float64) + 2 * torch.eye(2, dtype=torch.float64)
    exact = MultivariateNormal(torch.zeros(2, dtype=torch.float64), cov).log_prob(x.double()).sum().item()
    assert_unbiased(m.compile(K=4).log_marginal({"x": x.expand(20000, 3, 2)}), exact)


def _two_globals():
    """a ~ N(0, 1); b ~ N(a, 1); c_n ~ N(b - a, 1); x_n ~ N(a + b + c_n, 1) = N(2 b + ..): x ~ N(0, 8 11^T + 2 I).

    c's proposal (its prior) reads both a and b: grouped, they must come from one joint sample (one ancestor).
    """
    m = tmcgraph.Model().plate("N", 3)
    m.latent("a", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(0.3, 1.2))
    m.latent("b", prior=lambda a: Normal(a, 1.0), proposal=lambda a: Normal(a, 1.1))
    m.latent("c", prior=lambda a, b: Normal(b - a, 1.0), plates=["N"])
    m.observe("x", lambda a, b, c: Normal(a + b + c, 1.0), plates=["N"])
    return m


def test_grouped_latents_share_one_index_and_stay_unbiased():
    """A group draws its latents' k-th samples together (b's proposal reads a's k-th sample) on one index: the
    plan has one index for both, and exp(log P) is unbiased for p(x) (closed form)."""
    x = torch.tensor([0.5, 2.0, 1.2])
    exact = torch.distributions.MultivariateNormal(torch.zeros(3), 8 * torch.ones(3, 3) + 2 * torch.eye(3)
                                                   ).log_prob(x)
    est = _two_globals().compile(K=6, groups=[["a", "b"]])
    assert set(est.graph.indices) == {"a+b", "c"}
    torch.manual_seed(0)
    ratio = torch.stack([(est.log_marginal({"x": x}).detach() - exact).exp() for _ in range(3000)])
    assert abs(ratio.mean().item() - 1) < 4 * ratio.std().item() / math.sqrt(3000)
    post = est.posterior({"x": x})
    torch.testing.assert_close(post.marginals["a"], post.marginals["b"])  # one index, one set of weights
    draws = post.sample(50)
    torch.testing.assert_close(draws["@index:a"], draws["@index:b"])


def test_groups_are_validated():
    m = _two_globals()
    with pytest.raises(tmcgraph.TMCError, match=r"group \['a'\]: a group needs at least two latents"):
        m.compile(K=3, groups=[["a"]])
    with pytest.raises(tmcgraph.TMCError, match=r"group \['a', 'c'\]: its latents live in different plates"):
        m.compile(K=3, groups=[["a", "c"]])
    with pytest.raises(tmcgraph.TMCError, match=r"group \['a', 'b'\]: its latents have different K \[3, 4\]"):
        m.compile(K={"a": 3, "b": 4, "c": 2}, groups=[["a", "b"]])
    with pytest.raises(tmcgraph.TMCError, match=r"'x' is not a sampled latent"):
        m.compile(K=3, groups=[["a", "x"]])
    with pytest.raises(tmcgraph.TMCError, match=r"latent 'b' is already in group \['a', 'b'\]"):
        m.compile(K=3, groups=[["a", "b"], ["b", "c"]])
    with pytest.raises(tmcgraph.TMCError, match="groups must be a list of lists"):
        m.compile(K=3, groups=["a", "b"])


def test_moments_marginals_and_importance_samples_estimate_the_conjugate_posterior():
    """mu ~ N(0, 1), x_n ~ N(mu, 1): the posterior is N(sum x / (N + 1), 1 / (N + 1)); the estimator's moments,
    its weighted marginal samples and its importance samples all estimate it."""
    x = torch.tensor([1.2, 0.8, 2.1, 1.5])
    m = tmcgraph.Model().plate("N", 4)
    m.latent("mu", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(1.0, 1.0))
    m.observe("x", lambda mu: Normal(mu, 1.0), plates=["N"])
    est = m.compile(K=4000)
    torch.manual_seed(0)
    mean, var = x.sum().item() / 5, 0.2
    got = est.moments({"x": x}, {"mu": lambda z: torch.stack([z, z * z], -1)})["mu"]
    assert abs(got[0].item() - mean) < 0.04 and abs(got[1].item() - got[0].item() ** 2 - var) < 0.04
    assert abs(est.moments({"x": x})["mu"].item() - mean) < 0.04
    samples, weights = est.marginals({"x": x})["mu"]
    assert samples.shape == weights.shape == (4000,) and abs(weights.sum().item() - 1) < 1e-5
    draws = est.importance_sample({"x": x}, 4000)["mu"]
    assert draws.shape == (4000,)
    assert abs(draws.mean().item() - mean) < 0.04 and abs(draws.var().item() - var) < 0.04


def test_sampling_a_subset_of_latents_draws_their_joint_and_chunks_are_independent_draws():
    """``sample(latents=["z"])`` draws z with mu summed out: its index frequencies match the brute-force
    marginal; chunked sampling returns the same layout."""
    torch.manual_seed(3)
    m = global_local(n=2)
    est = m.compile(K=3)
    post = est.posterior({"x": torch.tensor([0.5, -0.7])})
    fac = {k: v.detach().double() for k, v in post._trace.factors.items()}
    total = brute_force_log_sum(est.graph, fac)

    def prob_z0(j):
        zmask = torch.zeros(2, 3, 3, dtype=torch.float64)  # (N, z, mu)
        zmask[0] = -math.inf
        zmask[0, j] = 0
        return torch.exp(brute_force_log_sum(est.graph, {**fac, "z": fac["z"] + zmask}) - total).item()

    draws = post.sample(20000, latents=["z"], chunk_size=7000)
    assert set(draws) == {"z", "@index:z"} and draws["z"].shape == (20000, 2)
    freq = torch.bincount(draws["@index:z"][:, 0], minlength=3) / 20000
    torch.testing.assert_close(freq, torch.tensor([prob_z0(j) for j in range(3)], dtype=torch.float32), atol=0.015,
                               rtol=0)
    with pytest.raises(tmcgraph.TMCError, match=r"unknown \['w'\]"):
        post.sample(3, latents=["w"])
    with pytest.raises(tmcgraph.TMCError, match="chunk_size must be a positive int"):
        post.sample(3, chunk_size=0)

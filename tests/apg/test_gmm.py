"""The GMM's conjugate algebra against independent checks."""

import itertools
import math

import torch
from torch.distributions import Categorical

from apg.models.gmm import (
    GMMConfig,
    assignment_logits,
    gibbs,
    global_posterior,
    log_evidence_given_c,
    log_joint,
    normal_gamma_log_prob,
    prior_params,
    sample_normal_gamma,
    simulate,
)

CFG = GMMConfig()


def test_simulator_is_seeded_and_shaped():
    a, b = simulate(4, seed=3), simulate(4, seed=3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["x"].shape == (4, 60, 2) and a["mu"].shape == (4, 3, 2) and a["c"].shape == (4, 60)
    assert not torch.equal(a["x"], simulate(4, seed=4)["x"])


def test_global_conditional_is_the_normalised_joint():
    """log p(x, mu, tau, c) - log p(mu, tau | x, c) does not depend on (mu, tau)."""
    torch.manual_seed(0)
    d = simulate(2, seed=1)
    x, c = d["x"].double(), d["c"]
    post = global_posterior(x, c, CFG)
    mu, tau = sample_normal_gamma(post, torch.Size([50]))  # (50, 2, I, D)
    diff = log_joint(x, mu, tau, c, CFG) - normal_gamma_log_prob(mu, tau, post)
    assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-8)
    # and the constant is log p(x, c), computed independently in closed form
    assert torch.allclose(diff[0], log_evidence_given_c(x, c, CFG), atol=1e-8)


def test_assignment_conditional_is_the_normalised_joint():
    torch.manual_seed(1)
    d = simulate(2, seed=2)
    x = d["x"].double()
    mu, tau = d["mu"].double(), d["tau"].double()
    logits = assignment_logits(x, mu, tau)
    c = Categorical(logits=logits).sample((40,))  # (40, 2, N)
    diff = log_joint(x, mu, tau, c, CFG) - Categorical(logits=logits).log_prob(c).sum(-1)
    assert torch.allclose(diff, diff[:1].expand_as(diff), atol=1e-8)


def test_prior_params_give_the_prior():
    torch.manual_seed(2)
    p = prior_params(CFG, torch.zeros((), dtype=torch.float64))
    mu, tau = sample_normal_gamma(p, torch.Size([200000]))
    assert abs(tau.mean().item() - CFG.alpha0 / CFG.beta0) < 0.01
    assert abs(mu.var().item() - CFG.beta0 / (CFG.nu0 * (CFG.alpha0 - 1))) < 0.15  # Student-t variance


def test_gibbs_samples_the_exact_posterior_over_assignments():
    """On 3 points and 2 clusters, the chain's assignment frequencies match exact enumeration."""
    cfg = GMMConfig(num_clusters=2, num_points=3)
    x = torch.tensor([[-1.5, 0.3], [-1.2, 0.1], [1.8, -0.4]], dtype=torch.float64)
    configs = torch.tensor(list(itertools.product(range(2), repeat=3)))
    log_post = log_evidence_given_c(x, configs, cfg)
    exact = torch.softmax(log_post, 0)
    torch.manual_seed(3)
    out = gibbs(x, num_chains=20000, num_sweeps=25, cfg=cfg)
    code = (out["c"] * torch.tensor([4, 2, 1])).sum(-1)
    freq = torch.bincount(code, minlength=8).double() / code.numel()
    assert torch.allclose(freq, exact, atol=0.012), (freq, exact)
    assert out["log_joint"].shape == (25, 20000)
    assert math.isfinite(out["log_joint"].mean().item())


def test_declared_model_density_and_blankets():
    """The tmcgraph declaration of the GMM gives the hand-written log joint, and its factor graph the blankets."""
    from apg.models.gmm.model import _density, gmm_model
    from tmcgraph.density import JointDensity

    cfg = GMMConfig()
    data = simulate(2, cfg, seed=3)
    x = data["x"].double()
    state = gibbs(x, 4, 2, cfg)
    dens = JointDensity(gmm_model(cfg, dtype=torch.float64))
    got = dens.log_prob({k: state[k] for k in ("mu", "tau", "c")}, {"x": x})
    assert torch.allclose(got, log_joint(x.unsqueeze(-3), state["mu"], state["tau"], state["c"], cfg))
    assert dens.blanket(["mu", "tau"]) == ("tau", "mu", "x") and dens.blanket(["c"]) == ("c", "x")
    assert _density(cfg, 60, torch.float64) is _density(cfg, 60, torch.float64)  # cached per (cfg, N, dtype, device)


def test_the_training_iteration_traces_into_one_graph():
    """The sampler and the eq. 5 loss trace into a single graph (no breaks): ``torch.compile(fullgraph=True)``
    of a training iteration works (benchmarks/apg_iteration.py --compiled times it)."""
    import torch._dynamo as dynamo

    from apg.models import gmm as gmm_
    from apg.objectives import phi_loss
    from apg.sampler import run

    torch.manual_seed(0)
    sampler = gmm_.apg_sampler(gmm_.GMMProposals())
    x = gmm_.simulate(2, seed=1, num_points=12)["x"]

    def loss(x):
        return phi_loss(run(sampler, x, 3, 2, objective=True).sweeps)

    loss(x).backward()  # the eager first iteration builds the model's layouts
    from torch.distributions import Distribution

    validate = Distribution._validate_args  # dynamo's first use turns validation off process-wide
    try:
        explained = dynamo.explain(loss)(x)
    finally:
        Distribution.set_default_validate_args(validate)
    assert explained.graph_break_count == 0 and explained.graph_count == 1

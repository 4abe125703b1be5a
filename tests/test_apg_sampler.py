"""The APG sampler core with known kernels: exact Gibbs kernels give unit weights; the evidence is unbiased."""

import itertools
import math

import pytest
import torch

from apg.gmm import (
    GMMConfig,
    NormalGammaParams,
    exact_blocks,
    global_posterior,
    log_evidence_given_c,
    log_joint,
    normal_gamma_log_prob,
    prior_init,
    sample_normal_gamma,
    simulate,
)
from apg.sampler import Block, ess_fraction, run

CFG = GMMConfig()


def test_exact_gibbs_kernels_give_unit_incremental_weights_and_full_ess():
    torch.manual_seed(0)
    x = simulate(3, seed=5)["x"].double()
    state, log_w, infos = run(x, prior_init(10), exact_blocks(), num_sweeps=4)
    assert state["mu"].shape == (3, 10, 3, 2) and state["c"].shape == (3, 10, 60)
    for info in infos[1:]:
        for name in ("globals", "assignments"):
            assert torch.allclose(info.log_v[name], torch.zeros(3, 10, dtype=torch.float64), atol=1e-9)
            assert torch.allclose(info.ess[name], torch.ones(3, dtype=torch.float64), atol=1e-9)
    # the evidence estimate is fixed by the one-shot proposal when every later v = 1
    assert torch.allclose(infos[-1].log_evidence, infos[0].log_evidence, atol=1e-9)


def _broadened_kernel_for_globals(cfg, factor=0.6):
    """The exact Normal-Gamma conditional with nu, alpha, beta scaled by ``factor``: a valid kernel
    (wider than the conditional, so the weights vary but stay light-tailed), not the exact one."""

    def blanket(x, s):
        return log_joint(x.unsqueeze(-3), s["mu"], s["tau"], s["c"], cfg)

    def params(x, s):
        p = global_posterior(x.unsqueeze(-3), s["c"], cfg)
        return NormalGammaParams(p.mu, p.nu * factor, p.alpha * factor, p.beta * factor)

    def propose(x, s):
        p = params(x, s)
        mu, tau = sample_normal_gamma(p)
        return {"mu": mu, "tau": tau}, normal_gamma_log_prob(mu, tau, p)

    def log_q(x, s, v):
        return normal_gamma_log_prob(v["mu"], v["tau"], params(x, s))

    return Block("globals", ("mu", "tau"), propose, log_q, blanket)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_log_evidence_is_unbiased_on_an_enumerable_model(scheme):
    cfg = GMMConfig(num_clusters=2, num_points=3)
    x = torch.tensor([[-1.5, 0.3], [-1.2, 0.1], [1.8, -0.4]], dtype=torch.float64)
    configs = torch.tensor(list(itertools.product(range(2), repeat=3)))
    exact = torch.logsumexp(log_evidence_given_c(x, configs, cfg), 0).item()
    torch.manual_seed(1)
    R = 20000
    blocks = [_broadened_kernel_for_globals(cfg), exact_blocks(cfg)[1]]
    _, _, infos = run(x.expand(R, 3, 2), prior_init(4, cfg), blocks, num_sweeps=3, scheme=scheme)
    assert infos[-1].ess["globals"].mean() < 0.99  # the weights do vary: the test is not trivial
    r = torch.exp(infos[-1].log_evidence - exact)
    mean, se = r.mean().item(), r.std().item() / math.sqrt(R)
    assert abs(mean - 1) < 4.5 * se, (mean, se)


def test_ess_fraction():
    assert torch.allclose(ess_fraction(torch.zeros(2, 5)), torch.ones(2))
    one_hot = torch.tensor([0.0, -float("inf"), -float("inf"), -float("inf")])
    assert torch.allclose(ess_fraction(one_hot), torch.tensor(0.25))

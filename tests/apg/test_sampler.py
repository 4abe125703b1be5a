"""The APG sampler core: exact Gibbs kernels give unit weights; the evidence is unbiased; the surrogate
losses have the gradients of eq. 5 (global and per-element weights)."""

import itertools
import math

import pytest
import torch

from apg import APGError
from apg.metrics import ess_fraction
from apg.models import gmm
from apg.models.gmm import (
    CategoricalKernel,
    GMMConfig,
    NormalGammaKernel,
    exact_sampler,
    global_posterior,
    log_evidence_given_c,
    simulate,
)
from apg.objectives import phi_loss, theta_loss
from apg.proposals import NormalGammaParams
from apg.sampler import Block, Particles, Sampler, _block_update, init, joint_block, run, sweep

CFG = GMMConfig()


def test_exact_gibbs_kernels_give_unit_incremental_weights_and_full_ess():
    torch.manual_seed(0)
    x = simulate(3, seed=5)["x"].double()
    res = run(exact_sampler(), x, 10, 4)
    assert res.state["mu"].shape == (3, 10, 3, 2) and res.state["c"].shape == (3, 10, 60)
    for info in res.sweeps[1:]:
        for name in ("globals", "assignments"):
            assert torch.allclose(info.log_v[name], torch.zeros(3, 10, dtype=torch.float64), atol=1e-9)
            assert torch.allclose(info.ess[name], torch.ones(3, dtype=torch.float64), atol=1e-9)
    # the evidence estimate is fixed by the one-shot proposal when every later v = 1
    assert torch.allclose(res.log_evidence, res.sweeps[0].log_evidence, atol=1e-9)


def test_joint_block_of_exact_kernels_has_unit_weights():
    """The reverse kernel of the composed block (the sweep run backwards) is optimal for exact kernels."""
    torch.manual_seed(1)
    x = simulate(2, seed=6)["x"].double()
    s = exact_sampler()
    res = run(s, x, 6, 3, blocks=[joint_block(s.blocks, s.log_joint)])
    for info in res.sweeps[1:]:
        assert torch.allclose(info.log_v["joint"], torch.zeros(2, 6, dtype=torch.float64), atol=1e-9)


def _broadened(cfg, factor=0.6):
    """The exact Normal-Gamma conditional with nu, alpha, beta scaled by ``factor``: a valid kernel
    (wider than the conditional, so the weights vary but stay light-tailed), not the exact one."""
    exact = exact_sampler(cfg)

    def kernel(x, s):
        p = global_posterior(x.unsqueeze(-3), s["c"], cfg)
        return NormalGammaKernel(NormalGammaParams(p.mu, p.nu * factor, p.alpha * factor, p.beta * factor))

    return Sampler(exact.init, [Block("globals", ("mu", "tau"), kernel, exact.blocks[0].log_blanket),
                                exact.blocks[1]], exact.log_joint)


@pytest.mark.parametrize("scheme", ["multinomial", "systematic"])
def test_log_evidence_is_unbiased_on_an_enumerable_model(scheme):
    cfg = GMMConfig(num_clusters=2, num_points=3)
    x = torch.tensor([[-1.5, 0.3], [-1.2, 0.1], [1.8, -0.4]], dtype=torch.float64)
    configs = torch.tensor(list(itertools.product(range(2), repeat=3)))
    exact = torch.logsumexp(log_evidence_given_c(x, configs, cfg), 0).item()
    torch.manual_seed(1)
    R = 20000
    res = run(_broadened(cfg), x.expand(R, 3, 2), 4, 3, scheme=scheme)
    assert res.sweeps[-1].ess["globals"].mean() < 0.99  # the weights do vary: the test is not trivial
    r = torch.exp(res.log_evidence - exact)
    mean, se = r.mean().item(), r.std().item() / math.sqrt(R)
    assert abs(mean - 1) < 4.5 * se, (mean, se)


def test_ess_fraction():
    assert torch.allclose(ess_fraction(torch.zeros(2, 5)), torch.ones(2))
    one_hot = torch.tensor([0.0, -float("inf"), -float("inf"), -float("inf")])
    assert torch.allclose(ess_fraction(one_hot), torch.tensor(0.25))


def _setup(seed=0):
    torch.manual_seed(seed)
    nets = gmm.GMMProposals(GMMConfig(num_points=7)).double()
    x = simulate(2, GMMConfig(num_points=7), seed=seed)["x"].double()
    sampler = gmm.apg_sampler(nets)
    state, _ = sampler.init(x, 5, None)
    return nets, x, sampler, {k: v.detach() for k, v in state.items()}


def _info(step):
    """A sweep info holding one step, for the objectives."""
    from apg.sampler import SweepInfo

    return SweepInfo(torch.zeros(()), {}, {}, steps=(step,))


def _grads(nets, loss):
    return torch.autograd.grad(loss, [p for p in nets.parameters()], allow_unused=True, retain_graph=True)


def _assert_close(g1, g2):
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert (a is None or a.abs().max() == 0) and (b is None or b.abs().max() == 0)
        else:
            assert torch.allclose(a, b, atol=1e-10, rtol=1e-8)


def test_block_surrogate_gradient_is_the_self_normalised_kl_gradient():
    """Equal incoming weights + systematic resampling keep the particles in place, so eq. 5 can be
    recomputed particle by particle: sum_l wbar_l grad log q(z_b'^l | x, z_-b^l), wbar = softmax(log v)."""
    nets, x, sampler, state = _setup()
    block = sampler.blocks[0]
    particles = Particles(state, torch.zeros(2, 5, dtype=torch.float64))
    new, log_v, step = _block_update(sampler, x, particles, block, scheme="systematic",
                                     generator=torch.Generator().manual_seed(3), objective=True, learn_model=False)
    new_state = new.values
    loss = phi_loss([_info(step)])
    assert torch.equal(new_state["c"], state["c"])
    direct = 0.0
    for b in range(2):
        w = torch.softmax(log_v[b], -1)
        for k in range(5):
            p = nets.global_params(x[b], state["c"][b, k].unsqueeze(0))
            lq = NormalGammaKernel(p).log_prob({"mu": new_state["mu"][b, k].unsqueeze(0),
                                                "tau": new_state["tau"][b, k].unsqueeze(0)})
            direct = direct - w[k] * lq.squeeze(0) / 2  # mean over the batch of 2
    _assert_close(_grads(nets, loss), _grads(nets, direct))


def test_local_block_weighs_each_element_by_its_own_weight():
    """The assignment block: per point n, wbar_{l,n} = softmax_l(log v_{l,n}); resampling uses sum_n log v."""
    nets, x, sampler, state = _setup(1)
    block = sampler.blocks[1]
    assert block.local_dims == 1
    particles = Particles(state, torch.zeros(2, 5, dtype=torch.float64))
    new, log_v, step = _block_update(sampler, x, particles, block, scheme="systematic",
                                     generator=torch.Generator().manual_seed(4), objective=True, learn_model=False)
    new_state = new.values
    loss = phi_loss([_info(step)])
    lq_new = CategoricalKernel(nets.assignment_logits(x, state["mu"], state["tau"])).log_prob(new_state)
    lq_old = CategoricalKernel(nets.assignment_logits(x, state["mu"], state["tau"])).log_prob(state)
    blanket = sampler.blocks[1].log_blanket
    local = (blanket(x, new_state) - blanket(x, state) + lq_old - lq_new).detach()  # (2, 5, 7)
    assert local.shape == (2, 5, 7)
    assert torch.allclose(log_v, local.sum(-1))
    direct = -(torch.softmax(local, 1) * lq_new).sum((1, 2)).mean()
    _assert_close(_grads(nets, loss), _grads(nets, direct))
    # and it differs from weighing every point by the particle's total weight (the test has power)
    coarse = -(torch.softmax(local.sum(-1), 1).unsqueeze(-1) * lq_new).sum((1, 2)).mean()
    w1 = nets.assignments.score[0].weight
    g_coarse, g_direct = (torch.autograd.grad(v, w1, retain_graph=True)[0] for v in (coarse, direct))
    assert not torch.allclose(g_coarse, g_direct)


def test_one_shot_surrogates_are_eqs_5_and_6():
    nets, x, sampler, _ = _setup(2)
    res = run(sampler, x, 5, 1, objective=True, learn_model=True, generator=torch.Generator().manual_seed(5))
    state, log_q = sampler.init(x, 5, torch.Generator().manual_seed(5))
    log_p = sampler.log_joint(x, state)
    w = torch.softmax((log_p - log_q).detach(), -1)
    _assert_close(_grads(nets, phi_loss(res.sweeps)), _grads(nets, -(w * log_q).sum(-1).mean()))
    assert torch.allclose(theta_loss(res.sweeps), -(w * log_p).sum(-1).mean())


def test_run_is_init_then_sweeps_and_reproducible_from_its_generator():
    x = simulate(2, seed=1)["x"].double()
    s = exact_sampler()
    a = run(s, x, 4, 3, generator=torch.Generator().manual_seed(7), record_log_joint=True)
    b = run(s, x, 4, 3, generator=torch.Generator().manual_seed(7), record_log_joint=True)
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    g = torch.Generator().manual_seed(7)
    particles, info = init(s, x, 4, generator=g, record_log_joint=True)
    for _ in range(2):
        particles, info = sweep(s, x, particles, generator=g, record_log_joint=True)
    assert all(torch.equal(a.state[k], particles.values[k]) for k in a.state)
    assert torch.equal(a.sweeps[-1].mean_log_joint(), info.mean_log_joint())
    c = run(s, x, 4, 3, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(a.state["mu"], c.state["mu"])


def test_run_checks_its_arguments():
    s = exact_sampler()
    x = simulate(1, seed=0)["x"]
    with pytest.raises(APGError, match="num_sweeps"):
        run(s, x, 4, 0)
    with pytest.raises(APGError, match="num_particles"):
        run(s, x, 0, 2)
    with pytest.raises(APGError, match="at least one block"):
        run(Sampler(s.init, [], s.log_joint), x, 4, 2)
    with pytest.raises(APGError, match="no step was recorded"):
        phi_loss(run(s, x, 4, 2).sweeps)

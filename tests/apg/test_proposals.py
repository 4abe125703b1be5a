"""Proposals from prior parameters plus neural sufficient statistics: the conjugate limits, the KLs."""

import math

import torch
from torch.distributions import Gamma, Normal

from apg.models.gmm import GMMConfig, global_posterior, simulate, sufficient_statistics
from apg.proposals import (
    NeuralCategorical,
    NeuralNormal,
    NeuralNormalGamma,
    NormalGamma,
    NormalGammaParams,
    kl_categorical,
    kl_normal_gamma,
)

D64 = torch.float64


def _random_params(shape, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda: torch.rand(shape, generator=g, dtype=D64)  # noqa: E731
    return NormalGammaParams(torch.randn(shape, generator=g, dtype=D64), 0.3 + r(), 1.5 + r(), 0.5 + r())


def test_update_with_hard_statistics_is_the_textbook_posterior_with_mu0():
    cfg = GMMConfig(mu0=1.3)  # a non-zero prior mean: where the official code's typo would show
    data = simulate(4, cfg, seed=2)
    x, c = data["x"].double(), data["c"]
    post = global_posterior(x, c, cfg)
    s0, s1, s2 = sufficient_statistics(x, c, cfg.num_clusters)
    nu = cfg.nu0 + s0
    mu = (cfg.nu0 * cfg.mu0 + s1) / nu
    beta = cfg.beta0 + 0.5 * (s2 + cfg.nu0 * cfg.mu0**2 - nu * mu * mu)
    assert torch.allclose(post.mu, mu) and torch.allclose(post.nu, nu)
    assert torch.allclose(post.alpha, cfg.alpha0 + 0.5 * s0) and torch.allclose(post.beta, beta)


def test_normal_gamma_log_prob_and_kl():
    p, q = _random_params((3, 2), 0), _random_params((3, 2), 1)
    tau = torch.rand(5, 3, 2, dtype=D64) + 0.2
    mu = torch.randn(5, 3, 2, dtype=D64)
    ref = (Gamma(p.alpha, p.beta).log_prob(tau) + Normal(p.mu, (p.nu * tau).rsqrt()).log_prob(mu)).sum((-2, -1))
    assert torch.allclose(NormalGamma(p).log_prob(mu, tau), ref)
    assert torch.allclose(kl_normal_gamma(p, p), torch.zeros((), dtype=D64), atol=1e-12)
    torch.manual_seed(0)
    m, t = NormalGamma(p).sample((200000,))
    mc = (NormalGamma(p).log_prob(m, t) - NormalGamma(q).log_prob(m, t))
    exact = kl_normal_gamma(p, q)
    assert abs(mc.mean() - exact) < 4 * mc.std() / math.sqrt(200000), (mc.mean(), exact)


def test_kl_categorical():
    p = torch.tensor([0.0, 1.0, -float("inf")])
    q = torch.tensor([1.0, 0.0, 0.5])
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    ref = sum(lp[i].exp() * (lp[i] - lq[i]) for i in range(2))
    assert torch.allclose(kl_categorical(p, q), ref)
    assert torch.isfinite(kl_categorical(p, q))


def test_neural_normal_gamma_contains_the_exact_conditional():
    """gamma_n = onehot(c_n) (large weights on the c part) and t_n = x_n give the exact Gibbs conditional."""
    cfg = GMMConfig()
    data = simulate(3, cfg, seed=4)
    x, c = data["x"].double(), data["c"]
    net = NeuralNormalGamma(cfg.dim + cfg.num_clusters, cfg.num_clusters, cfg.dim).double()
    with torch.no_grad():
        net.assign.weight.zero_()
        net.assign.weight[:, cfg.dim:] = 200 * torch.eye(cfg.num_clusters)
        net.assign.bias.zero_()
        net.feature.weight.zero_()
        net.feature.weight[:, : cfg.dim] = torch.eye(cfg.dim)
        net.feature.bias.zero_()
    feats = torch.cat([x, torch.nn.functional.one_hot(c, cfg.num_clusters).double()], -1)
    prior = NormalGammaParams(*(torch.full((3, 2), v, dtype=D64) for v in (cfg.mu0, cfg.nu0, cfg.alpha0, cfg.beta0)))
    got, want = net(feats, prior), global_posterior(x, c, cfg)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-8)
    # the statistics are sums over the plate: permuting the points changes nothing
    perm = torch.randperm(x.shape[-2])
    for a, b in zip(net(feats[:, perm], prior), got):
        assert torch.allclose(a, b)


def test_neural_normal_is_the_known_variance_conjugate_update():
    """r_n = 1/sigma^2 and t_n = x_n give the Normal posterior of a mean with known noise sigma."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, 1, generator=g, dtype=D64)
    sigma, m0, s0 = 0.7, 0.3, 2.0
    net = NeuralNormal(1, 1).double()
    with torch.no_grad():
        net.precision.weight.zero_()
        net.precision.bias.fill_(math.log(math.expm1(1 / sigma**2)))  # softplus^-1
        net.target.weight.fill_(1.0)
        net.target.bias.zero_()
    q = net(x, torch.tensor([m0], dtype=D64), torch.tensor([s0], dtype=D64))
    prec = 1 / s0**2 + 9 / sigma**2
    mean = (m0 / s0**2 + x.sum(-2) / sigma**2) / prec
    assert torch.allclose(q.loc, mean) and torch.allclose(q.scale, torch.full_like(mean, prec**-0.5))


def test_categorical_pairs_equal_the_concatenated_features():
    torch.manual_seed(0)
    net = NeuralCategorical(6).double()
    x = torch.randn(4, 1, 7, 2, dtype=D64)
    eta = torch.randn(4, 5, 3, 4, dtype=D64)
    prior = torch.full((3,), -math.log(3), dtype=D64)
    feats = torch.cat([x.unsqueeze(-2).expand(4, 5, 7, 3, 2), eta.unsqueeze(-3).expand(4, 5, 7, 3, 4)], -1)
    a, b = net(feats, prior), net.forward_pairs(x, eta, prior)
    assert torch.allclose(a, b)
    assert torch.allclose(b.exp().sum(-1), torch.ones(4, 5, 7, dtype=D64))
    r = torch.randn(4, 5, 7, 3, dtype=D64)
    ga = torch.autograd.grad((a * r).sum(), list(net.parameters()))
    gb = torch.autograd.grad((b * r).sum(), list(net.parameters()))
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, atol=1e-12)
    e0 = eta[:1, :2].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda e: net.forward_pairs(x[:1, :, :3], e, prior), (e0,))

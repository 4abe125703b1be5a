"""One APG training iteration on the GMM (batch 20, L=10 particles, K=10 sweeps): ours vs a straightforward loop.

"Ours" is ``apg.sampler.run(..., objective=True)`` + backward: one network call
per block update (the forward and the reverse kernel share it), the Markov
blanket of the block from the compiled tmcgraph model, no autograd through the
weights, the pairwise assignment MLP with a hand-written backward.

"Straightforward" is the same iteration written the way the official code
(hao-w/apgs) writes it, as a per-block loop: the kernel network is called once
for the forward and once for the reverse kernel, the full log joint is
evaluated (``torch.distributions`` with argument validation) before and after
each block, the assignment MLP runs on concatenated (point, cluster) features
with ``nn.Tanh``, and resampling gathers each variable separately.  Both
build the eq. 5 surrogate (self-normalised weights, per-point weights for the
assignments) from the same networks and the same resampling scheme.

    python benchmarks/apg_iteration.py --threads 1 2 --repeats 7 --json benchmarks/results/apg_iteration.json

Timings are interleaved (ours, straightforward, ours, ...), medians of
``--repeats``; the figure reported is the ratio straightforward / ours.

``--compiled`` also times ours under ``torch.compile(fullgraph=True)`` (the sampler and
the loss traced as one graph; the backward compiled by AOTAutograd), after one eager
iteration, and reports its compile time and eager ours / compiled.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from torch.distributions import Categorical, Gamma, Normal

from apg.models import gmm
from apg.objectives import phi_loss
from apg.resampling import resample
from apg.sampler import run
from tmcgraph.arguments import output_file


def _log_joint(x, mu, tau, c, cfg):
    """log p(x, mu, tau, c) with validated torch.distributions, as a per-block loop would."""
    p = gmm.prior_params(cfg, x)
    lp = Gamma(p.alpha, p.beta).log_prob(tau).sum((-2, -1))
    lp = lp + Normal(p.mu, (p.nu * tau).rsqrt()).log_prob(mu).sum((-2, -1))
    lp = lp + Categorical(logits=torch.zeros(cfg.num_clusters)).log_prob(c).sum(-1)
    loc = torch.gather(mu, -2, c.unsqueeze(-1).expand(c.shape + (mu.shape[-1],)))
    scale = torch.gather(tau, -2, c.unsqueeze(-1).expand(c.shape + (tau.shape[-1],))).rsqrt()
    return lp + Normal(loc, scale).log_prob(x.unsqueeze(-3)).sum((-2, -1))


def _c_logits(nets, x, mu, tau):
    """The assignment MLP on concatenated features, plain autograd."""
    N, k = x.shape[-2], mu.shape[-2]
    lead = mu.shape[:-2]
    xs = x.unsqueeze(-3).unsqueeze(-2).expand(lead + (N, k, x.shape[-1]))
    eta = torch.cat([mu, tau], -1).unsqueeze(-3).expand(lead + (N, k, 2 * mu.shape[-1]))
    first, _, last = nets.assignments.score
    h = torch.tanh(first(torch.cat([xs, eta], -1)))
    return torch.log_softmax(-math.log(k) + last(h).squeeze(-1), -1)


def _gather(v, anc):
    idx = anc.reshape(anc.shape + (1,) * (v.dim() - anc.dim())).expand(anc.shape + v.shape[anc.dim():])
    return torch.gather(v, anc.dim() - 1, idx)


def straightforward(nets, x, L, K, cfg):
    """The iteration as a per-block loop (see the module docstring); returns the loss."""
    prior = gmm.prior_params(cfg, x)
    p = nets.oneshot(x, prior)
    p = type(p)(*(t.unsqueeze(-3).expand(t.shape[:-2] + (L,) + t.shape[-2:]) for t in p))
    tau = Gamma(p.alpha, p.beta).sample()
    mu = Normal(p.mu, (p.nu * tau).rsqrt()).sample()
    lq = Gamma(p.alpha, p.beta).log_prob(tau).sum((-2, -1)) + Normal(p.mu, (p.nu * tau).rsqrt()).log_prob(mu).sum(
        (-2, -1))
    q_c = Categorical(logits=_c_logits(nets, x, mu, tau))
    c = q_c.sample()
    lq = lq + q_c.log_prob(c).sum(-1)
    log_w = (_log_joint(x, mu, tau, c, cfg) - lq).detach()
    loss = -(torch.softmax(log_w, -1) * lq).sum(-1).mean()
    for _ in range(K - 1):
        # globals
        anc = resample(log_w, "systematic")
        mu, tau, c = _gather(mu, anc), _gather(tau, anc), _gather(c, anc)
        onehot = torch.nn.functional.one_hot(c, cfg.num_clusters).float()
        feats = torch.cat([x.unsqueeze(-3).expand(onehot.shape[:-1] + x.shape[-1:]), onehot], -1)
        pf = nets.globals(feats, prior)
        tau_n = Gamma(pf.alpha, pf.beta).sample()
        mu_n = Normal(pf.mu, (pf.nu * tau_n).rsqrt()).sample()
        lq_f = Gamma(pf.alpha, pf.beta).log_prob(tau_n).sum((-2, -1)) + Normal(
            pf.mu, (pf.nu * tau_n).rsqrt()).log_prob(mu_n).sum((-2, -1))
        pb = nets.globals(feats, prior)  # the reverse kernel: a second network call
        lq_b = Gamma(pb.alpha, pb.beta).log_prob(tau).sum((-2, -1)) + Normal(
            pb.mu, (pb.nu * tau).rsqrt()).log_prob(mu).sum((-2, -1))
        log_v = (_log_joint(x, mu_n, tau_n, c, cfg) - lq_f - _log_joint(x, mu, tau, c, cfg) + lq_b).detach()
        loss = loss - (torch.softmax(log_v, -1) * lq_f).sum(-1).mean()
        mu, tau = mu_n, tau_n
        log_w = log_v
        # assignments
        anc = resample(log_w, "systematic")
        mu, tau, c = _gather(mu, anc), _gather(tau, anc), _gather(c, anc)
        q_f = Categorical(logits=_c_logits(nets, x, mu, tau))
        c_n = q_f.sample()
        lq_f = q_f.log_prob(c_n)
        q_b = Categorical(logits=_c_logits(nets, x, mu, tau))  # the reverse kernel: a second network call
        lq_b = q_b.log_prob(c)
        loc_n = torch.gather(mu, -2, c_n.unsqueeze(-1).expand(c_n.shape + (2,)))
        sc_n = torch.gather(tau, -2, c_n.unsqueeze(-1).expand(c_n.shape + (2,))).rsqrt()
        loc_o = torch.gather(mu, -2, c.unsqueeze(-1).expand(c.shape + (2,)))
        sc_o = torch.gather(tau, -2, c.unsqueeze(-1).expand(c.shape + (2,))).rsqrt()
        ll_n = Normal(loc_n, sc_n).log_prob(x.unsqueeze(-3)).sum(-1)
        ll_o = Normal(loc_o, sc_o).log_prob(x.unsqueeze(-3)).sum(-1)
        local = (ll_n - lq_f - ll_o + lq_b).detach()
        loss = loss - (torch.softmax(local, -2) * lq_f).sum((-2, -1)).mean()
        c = c_n
        log_w = local.sum(-1)
    return loss


def ours(sampler, x, L, K):
    return phi_loss(run(sampler, x, L, K, objective=True).sweeps)


def _time(fn):
    t = time.perf_counter()
    fn().backward()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--particles", type=int, default=10)
    ap.add_argument("--sweeps", type=int, default=10)
    ap.add_argument("--compiled", action="store_true", help="also time ours under torch.compile(fullgraph=True)")
    ap.add_argument("--json", type=output_file, default=None)
    args = ap.parse_args()
    cfg = gmm.GMMConfig()
    torch.manual_seed(0)
    nets = gmm.GMMProposals(cfg)
    sampler = gmm.apg_sampler(nets)
    x = gmm.simulate(args.batch, cfg, seed=1)["x"]
    L, K = args.particles, args.sweeps
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for _ in range(2):  # warm-up
            _time(lambda: ours(sampler, x, L, K))
            _time(lambda: straightforward(nets, x, L, K, cfg))
        compiled, compile_s = None, None
        if args.compiled:
            compiled = torch.compile(lambda x: ours(sampler, x, L, K), dynamic=False, fullgraph=True)
            compile_s = _time(lambda c=compiled: c(x))  # the first call compiles
        t_ours, t_naive, t_comp = [], [], []
        for _ in range(args.repeats):
            t_ours.append(_time(lambda: ours(sampler, x, L, K)))
            t_naive.append(_time(lambda: straightforward(nets, x, L, K, cfg)))
            if compiled is not None:
                t_comp.append(_time(lambda c=compiled: c(x)))
        m_ours, m_naive = statistics.median(t_ours), statistics.median(t_naive)
        row = {"threads": threads, "batch": args.batch, "particles": L, "sweeps": K,
               "ours_ms": round(1e3 * m_ours, 2), "straightforward_ms": round(1e3 * m_naive, 2),
               "speedup": round(m_naive / m_ours, 2)}
        line = (f"threads={threads}: straightforward / ours = {row['speedup']:.2f}x "
                f"(medians {row['straightforward_ms']} ms vs {row['ours_ms']} ms")
        if compiled is not None:
            m_comp = statistics.median(t_comp)
            row.update(compiled_ms=round(1e3 * m_comp, 2), compile_seconds=round(compile_s, 1),
                       eager_over_compiled=round(m_ours / m_comp, 2), straightforward_over_compiled=round(
                           m_naive / m_comp, 2))
            line += (f", compiled {row['compiled_ms']} ms: ours eager / compiled = {row['eager_over_compiled']:.2f}x, "
                     f"straightforward / compiled = {row['straightforward_over_compiled']:.2f}x, compile "
                     f"{row['compile_seconds']} s")
        results.append(row)
        print(line + f"; {args.repeats} interleaved repeats)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

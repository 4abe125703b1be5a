"""Median time and mean estimate of `tmcgraph.smc` (bootstrap and guide proposals) on a T=30 chain with K=256,
for A/B runs against another checkout of tmcgraph (the same seed gives the same estimates).

Run from outside the repository so that ``PYTHONPATH`` picks the checkout, alternating the two::

    cd /tmp && PYTHONPATH=/path/to/old python /path/to/benchmarks/smc_step.py
    cd /tmp && PYTHONPATH=/path/to/new python /path/to/benchmarks/smc_step.py
"""

import statistics
import time

import torch
from torch.distributions import Normal

import tmcgraph

torch.set_num_threads(1)
torch.manual_seed(0)
T = 30
m = tmcgraph.Model()
m.latent("z0", prior=lambda: Normal(0.0, 1.0))
for t in range(1, T):
    m.latent(f"z{t}", prior=lambda p: Normal(0.9 * p, 0.44), parents=[f"z{t - 1}"])
for t in range(T):
    m.observe(f"x{t}", lambda z: Normal(z, 1.0), parents=[f"z{t}"])
data = {f"x{t}": torch.randn(8) for t in range(T)}
for proposal in ("bootstrap", "guide"):
    times, estimates = [], []
    for _ in range(15):
        start = time.perf_counter()
        estimate = tmcgraph.smc(m, data, 256, proposal=proposal)
        times.append(time.perf_counter() - start)
        estimates.append(estimate.mean().item())
    print(f"{proposal}: {1e3 * statistics.median(times):.1f} ms, mean log Z {statistics.mean(estimates):.3f}")

"""The median time of one TMC step (forward and backward) on a T=50 chain at K=16, for A/B runs against
another checkout of tmcgraph (a loop of sites, declared in ``Model.batch_sites()`` where that exists).

Run from outside the repository so that ``PYTHONPATH`` picks the checkout, alternating the two::

    cd /tmp && PYTHONPATH=/path/to/old python /path/to/benchmarks/chain_step.py
    cd /tmp && PYTHONPATH=/path/to/new python /path/to/benchmarks/chain_step.py
"""

import contextlib
import statistics
import time

import torch
from torch.distributions import Normal

import tmcgraph

torch.set_num_threads(1)
T = 50
loc = torch.zeros(T, requires_grad=True)
m = tmcgraph.Model()
m.latent("z0", prior=lambda: Normal(0.0, 1.0), proposal=lambda: Normal(loc[0], 1.0))
with getattr(m, "batch_sites", contextlib.nullcontext)():
    for t in range(1, T):
        m.latent(f"z{t}", prior=lambda p: Normal(0.9 * p, 0.44), proposal=lambda t=t: Normal(loc[t], 1.0),
                 parents=[f"z{t - 1}"], proposal_parents=[])
    for t in range(T):
        m.observe(f"x{t}", lambda z: Normal(z, 1.0), parents=[f"z{t}"])
est = m.compile(K=16)
data = {f"x{t}": torch.tensor(0.1 * t) for t in range(T)}
for _ in range(5):
    est.log_marginal(data).backward()


def once() -> float:
    start = time.perf_counter()
    est.log_marginal(data).backward()
    return time.perf_counter() - start


print(f"{tmcgraph.__file__}: {1e3 * statistics.median(once() for _ in range(200)):.2f} ms per step")

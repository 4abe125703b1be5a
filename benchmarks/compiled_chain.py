"""Median time of the compiled and the eager forward of the chain contraction (n=20, K=64, float32, no grad),
for A/B runs against another checkout of tmcgraph.

Run from outside the repository so that ``PYTHONPATH`` picks the checkout, alternating the two::

    cd /tmp && PYTHONPATH=/path/to/old python /path/to/benchmarks/compiled_chain.py
    cd /tmp && PYTHONPATH=/path/to/new python /path/to/benchmarks/compiled_chain.py
"""

import statistics
import time

import torch

import tmcgraph
from tmcgraph.testing import random_factors

torch.set_num_threads(1)
graph = tmcgraph.FactorGraph()  # the chain of benchmarks/contract.py (written out: old checkouts lack its imports)
for i in range(20):
    graph.index(f"z{i}", 64)
graph.factor("p0", ["z0"])
for i in range(1, 20):
    graph.factor(f"f{i}", [f"z{i - 1}", f"z{i}"])
plan = graph.compile()
factors = random_factors(graph, seed=0, scale=1.0, dtype=torch.float32)
with torch.no_grad():
    for _ in range(3):  # the first call compiles
        plan.log_sum(factors, backend="compiled")
    times = {"compiled": [], "eager": []}
    for backend in times:
        for _ in range(300):
            start = time.perf_counter()
            plan.log_sum(factors, backend=backend)
            times[backend].append(time.perf_counter() - start)
print(f"{tmcgraph.__file__}: compiled {1e3 * statistics.median(times['compiled']):.3f} ms, "
      f"eager {1e3 * statistics.median(times['eager']):.3f} ms")

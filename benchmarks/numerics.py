"""float32 accuracy on a 20-chain, K=64, against float64, for tmcgraph and Pyro's torch_log backend.

Run: python benchmarks/numerics.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from contract import chain  # noqa: E402  (the same 20-chain as the contraction benchmark)

n, K = 20, 64
torch.manual_seed(0)
g = chain(n, K)
plan = g.compile()
for std in [1, 30, 100, 1000]:
    f64 = {k: std * torch.randn(g.factor_shape(k), dtype=torch.float64) for k in g.factors}
    ref = plan.log_sum(f64).item()
    f32 = {k: v.float() for k, v in f64.items()}
    ours = plan.log_sum(f32).item()
    error = abs(ours - ref) / abs(ref)
    line = f"std {std}: float64 {ref:.4f}, tmcgraph float32 {ours:.4f} (relative error {error:.1e})"
    try:
        import pyro.ops.contract as pc

        eq = ",".join(["a"] + [chr(97 + i - 1) + chr(97 + i) for i in range(1, n)]) + "->"
        args = [f32[k] for k in g.factors]
        pyro = pc.einsum(eq, *args, backend="pyro.ops.einsum.torch_log", modulo_total=False)[0].item()
        line += f", pyro float32 {pyro:.4f}"
    except ImportError:
        pass
    print(line)

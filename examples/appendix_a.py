"""The worked examples of appendix A of the TMC paper, checked against brute force.

Run: python examples/appendix_a.py
"""


import tmcgraph
from tmcgraph.testing import brute_force_log_sum, random_factors


def loopy() -> tmcgraph.FactorGraph:
    """Fig. 5: four latents, factors f1(k1,k2) f2(k1,k3) f3(k2,k4) f4(k3,k4) (eq. 29)."""
    g = tmcgraph.FactorGraph()
    for name in ("k1", "k2", "k3", "k4"):
        g.index(name, 4)
    g.factor("f1", ["k1", "k2"]).factor("f2", ["k1", "k3"]).factor("f3", ["k2", "k4"]).factor("f4", ["k3", "k4"])
    return g


def global_local(n: int = 5) -> tmcgraph.FactorGraph:
    """Fig. 6: a global theta and a local z_i per data point (eqs. 34-36)."""
    g = tmcgraph.FactorGraph().plate("N", n).index("theta", 3).index("z", 2, plates=["N"])
    return g.factor("f_theta", ["theta"]).factor("f_i", ["theta", "z"], plates=["N"])


def main() -> None:
    for name, g in [("Fig. 5 (loopy)", loopy()), ("Fig. 6 (global + local)", global_local())]:
        factors = random_factors(g, seed=0)
        plan = g.compile()
        # log P_TMC = log_sum - sum over index copies of log K (the 1/K normalisation)
        value = plan.log_sum(factors)
        print(f"{name}: log_sum {value.item():.10f}, brute force {brute_force_log_sum(g, factors).item():.10f}")
        print(plan.describe(), "\n")


if __name__ == "__main__":
    main()

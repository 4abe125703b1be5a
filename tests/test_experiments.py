"""The paper's experiments: ground truths checked independently; CLI runs at tiny sizes."""

import json
import math

import torch
from torch.distributions import MultivariateNormal

import tmcgraph
from tmcgraph.cli import main
from tmcgraph.experiments import chain_data, chain_model, kalman_log_marginal, sparse_data, sparse_model, sparse_problem


def test_kalman_matches_the_joint_gaussian():
    a, N = 0.9, 6
    x = chain_data(N, seed=3)
    t = torch.arange(N, dtype=torch.float64)
    cov = a ** (t[:, None] - t[None, :]).abs() + torch.eye(N, dtype=torch.float64)  # AR(1) + unit noise
    exact = MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov).log_prob(x).item()
    assert math.isclose(kalman_log_marginal(x), exact, rel_tol=1e-10)


def test_chain_estimators_approach_kalman():
    torch.manual_seed(0)
    x = chain_data(5, seed=1)
    data = {f"x{t}": x[t].float() for t in range(5)}
    m = chain_model(5)
    exact = kalman_log_marginal(x)
    assert abs(m.compile(K=512).log_marginal(data).item() - exact) < 0.05
    assert abs(tmcgraph.smc(m, data, 4096).item() - exact) < 0.05


def test_sparse_problem_closed_form_against_iwae():
    torch.manual_seed(0)
    problem = sparse_problem(3, 0.6, seed=2, noise=1.0)
    m = sparse_model(problem)
    est = tmcgraph.iwae(m, sparse_data(problem), 400000, chunk_size=100000).item()
    assert abs(est - problem.exact) < 0.02


def test_treewidth_cli_json(capsys):
    assert main(["treewidth", "--N", "12", "--p", "0.15", "--K", "16", "--iwae-samples", "2000",
                 "--chunk-size", "700", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("treewidth", "exact", "tmc", "tmc_seconds", "iwae", "iwae_seconds", "K"):
        assert key in out
    assert out["K"] == 16 and out["treewidth"] >= 1
    assert math.isfinite(out["tmc"]) and math.isfinite(out["iwae"])


def test_treewidth_cli_sweep_plot(tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main(["treewidth", "--N", "10", "--K", "8", "--iwae-samples", "500", "--sweep", "--ps", "0.05,0.2",
                 "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "tw" in text and png.stat().st_size > 1000


def test_gaussian_cli_json_and_plot(tmp_path, capsys):
    png = tmp_path / "fig7.png"
    assert main(["gaussian", "--N", "6", "--K", "8", "--Ks", "2,8", "--Ns", "3,6", "--repeats", "1", "--json",
                 "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["K"] for r in out["vs_K"]] == [2, 8] and [r["N"] for r in out["vs_N"]] == [3, 6]
    for r in out["vs_K"] + out["vs_N"]:
        for key in ("exact", "tmc", "tmc_seconds", "smc", "smc_seconds", "iwae", "iwae_seconds"):
            assert math.isfinite(r[key])
    assert png.stat().st_size > 1000

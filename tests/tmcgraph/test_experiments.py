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


def test_global_local_problem_closed_form_against_joint_gaussian():
    from tmcgraph.experiments import global_local_problem

    N, noise = 4, 0.5
    p = global_local_problem(N, noise=noise, seed=3)
    # joint Gaussian of (mu, z_1..z_N, x_1..x_N): condition on x
    A = torch.zeros(2 * N + 1, 2 * N + 1, dtype=torch.float64)  # (mu, z, x) = A @ standard normals
    A[0, 0] = 1.0
    A[1:N + 1, 0] = 1.0
    A[1:N + 1, 1:N + 1] = torch.eye(N, dtype=torch.float64)
    A[N + 1:, :N + 1] = A[1:N + 1, :N + 1]
    A[N + 1:, N + 1:] = noise * torch.eye(N, dtype=torch.float64)
    cov = A @ A.T
    lat, obs = slice(0, N + 1), slice(N + 1, 2 * N + 1)
    gain = cov[lat, obs] @ torch.linalg.inv(cov[obs, obs])
    mean = gain @ p.x
    var = torch.diagonal(cov[lat, lat] - gain @ cov[obs, lat])
    assert math.isclose(p.mu_mean, mean[0].item(), rel_tol=1e-10)
    assert math.isclose(p.mu_sd, var[0].sqrt().item(), rel_tol=1e-10)
    assert torch.allclose(p.z_mean, mean[1:]) and torch.allclose(p.z_sd, var[1:].sqrt())
    exact = MultivariateNormal(torch.zeros(N, dtype=torch.float64), cov[obs, obs]).log_prob(p.x).item()
    assert math.isclose(p.exact, exact, rel_tol=1e-10)


def test_dregs_cli_json_and_plot(tmp_path, capsys):
    png = tmp_path / "dregs.png"
    assert main(["dregs", "--N", "3", "--Ks", "1,4", "--draws", "300", "--steps", "4", "--eval-every", "2",
                 "--eval-draws", "50", "--json", "--plot", str(png)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["K"], r["gradient"]) for r in out["snr"]] == [
        (k, g) for k in (1, 4) for g in ("reparameterised", "dregs", "dregs-paper")]
    for r in out["snr"]:
        assert all(math.isfinite(v) and v >= 0 for v in r["snr"].values())
    snr = {(r["K"], r["gradient"]): r for r in out["snr"]}
    # K = 1: every form is the same gradient (TMC is IWAE with one sample)
    for group, value in snr[(1, "dregs")]["snr"].items():
        assert math.isclose(value, snr[(1, "dregs-paper")]["snr"][group], rel_tol=1e-5)
    assert set(out["training"]) == {"reparameterised", "dregs", "dregs-paper"}
    assert [c["step"] for c in out["training"]["dregs"]] == [0, 2, 4]
    assert png.stat().st_size > 1000

"""The DGMM's selectable settings: the data and model flags, appendix E's networks and the LSTM-RWS baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apg.cli import main
from apg.errors import APGError
from apg.models.dgmm import PAPER, DGMMConfig, PaperDGMMProposals, apg_sampler, dgmm_model, exact_sampler, simulate
from apg.models.dgmm.networks import BetaAngle, CircleDecoder
from apg.sampler import run
from tmcgraph import JointDensity


def test_even_angles_are_the_official_laps():
    cfg = DGMMConfig(angles="even")
    d = simulate(3, cfg, seed=1)
    for b in range(3):
        for i in range(cfg.num_clusters):
            ring = d["alpha"][b][d["c"][b] == i].double()
            assert ring.numel() == 50
            for lap in ring.tensor_split(2):  # 25 points, linspace(0, 2 pi, 25) shifted, wrapped into [-pi, pi)
                gaps = torch.remainder(lap.diff(), 2 * math.pi)
                assert torch.allclose(gaps, torch.full_like(gaps, 2 * math.pi / 24), atol=1e-5)
    # the uniform scheme draws the same centres, assignments and noise stream (only the angles differ)
    u = simulate(3, PAPER, seed=1)
    assert torch.equal(u["mu"], d["mu"]) and torch.equal(u["c"], d["c"]) and not torch.equal(u["alpha"], d["alpha"])


def test_data_and_model_noise_are_separate():
    cfg = DGMMConfig(noise=0.1, model_noise=0.5)
    d = simulate(20, cfg, seed=2)
    centre = torch.gather(d["mu"], 1, d["c"].unsqueeze(-1).expand(-1, -1, 2))
    noise = d["x"] - centre - cfg.radius * torch.stack([d["alpha"].cos(), d["alpha"].sin()], -1)
    assert abs(float(noise.std()) - 0.1) < 0.003
    # the model's likelihood uses 0.5: the declared density against a by-hand Normal(., 0.5)
    state = {"mu": d["mu"][:2].double().unsqueeze(1), "c": d["c"][:2].unsqueeze(1),
             "alpha": d["alpha"][:2].double().unsqueeze(1)}
    x = d["x"][:2].double()
    dens = JointDensity(dgmm_model(cfg, CircleDecoder(2.0), 200, torch.float64))
    loc = centre[:2].double() + 2.0 * torch.stack([state["alpha"][:, 0].cos(), state["alpha"][:, 0].sin()], -1)
    by_hand = (torch.distributions.Normal(loc, 0.5).log_prob(x).sum((-2, -1))
               + torch.distributions.Normal(0.0, cfg.sigma0).log_prob(state["mu"][:, 0]).sum((-2, -1))
               - 200 * math.log(4) - 200 * math.log(2 * math.pi))
    assert torch.allclose(dens.log_prob(state, {"x": x})[:, 0], by_hand)
    with pytest.raises(APGError, match="--model-noise"):
        DGMMConfig(model_noise=0.0)
    with pytest.raises(APGError, match="--angles"):
        DGMMConfig(angles="spiral")


def test_beta_angle_is_a_density_on_the_circle_and_samples_it():
    a, b = torch.tensor([0.7, 3.0]), torch.tensor([1.5, 2.0])
    dist = BetaAngle(a, b)
    grid = torch.linspace(-math.pi + 1e-4, math.pi - 1e-4, 200001).unsqueeze(-1)
    mass = torch.trapezoid(dist.log_prob(grid).exp(), grid.squeeze(-1), dim=0)
    assert torch.allclose(mass, torch.ones(2), atol=2e-3)
    draws = BetaAngle(a.expand(100000, 2), b.expand(100000, 2)).sample(torch.Generator().manual_seed(0))
    mean_u = (draws + math.pi) / (2 * math.pi)
    assert torch.allclose(mean_u.mean(0), a / (a + b), atol=5e-3)


def test_paper_networks_drive_the_sampler_and_the_exact_reference():
    torch.manual_seed(0)
    cfg = DGMMConfig(num_clusters=3, num_points=12)
    d = simulate(2, cfg, seed=3)
    nets = PaperDGMMProposals(cfg)
    dec = CircleDecoder(cfg.radius)
    res = run(apg_sampler(nets, dec), d["x"], 5, 3, generator=torch.Generator().manual_seed(1), objective=True)
    assert res.state["mu"].shape == (2, 5, 3, 2) and torch.isfinite(res.log_weights).all()
    assert all(torch.isfinite(s.log_q).all() for info in res.sweeps for s in info.steps)
    # the exact reference keeps the paper networks' one-shot proposal and has exact kernels (unit weights)
    exact = run(exact_sampler(nets.double(), cfg.radius), d["x"].double(), 6, 3,
                generator=torch.Generator().manual_seed(2))
    for info in exact.sweeps[1:]:
        assert all(v.abs().max() < 1e-3 for v in info.log_v.values())
    lstm = PaperDGMMProposals(cfg, conditional=False, encoder="lstm")
    loc, scale = lstm.oneshot_params(d["x"])
    assert loc.shape == scale.shape == (2, 3, 2) and not torch.allclose(loc[:, 0], loc[:, 1])


def test_cli_settings_are_stored_and_the_new_methods_evaluate(tmp_path, capsys):
    for method in ("apg", "rws", "apg-paper", "rws-lstm"):
        args = ["train", "dgmm", "--method", method, "--out", str(tmp_path / method), "--iterations", "2",
                "--batch", "2", "--datasets", "4", "--particles", "3", "--quiet", "--noise", "0.1",
                "--model-noise", "0.5", "--angles", "even", "--sigma0", "3.0"]
        assert main(args + (["--sweeps", "2"] if method.startswith("apg") else [])) == 0
    with open(tmp_path / "apg-paper" / "problem.json") as f:
        saved = json.load(f)
    assert (saved["noise"], saved["model_noise"], saved["angles"], saved["sigma0"]) == (0.1, 0.5, "even", 3.0)
    capsys.readouterr()
    assert main(["evaluate", "dgmm", "--checkpoint", str(tmp_path), "--datasets", "2", "--particles", "3",
                 "--rws-particles", "4", "--sweeps", "2", "--points", "20", "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in out["rows"]] == ["RWS", "LSTM-RWS", "APG", "APG-paper"]
    lstm = out["rows"][1]["log_joint"]
    for r in out["rows"][2:]:
        assert r["delta_log_joint_lstm"] == pytest.approx(r["log_joint"] - lstm, abs=0.05)
    assert out["settings"]["model"]["model_noise"] == 0.5
    with pytest.raises(SystemExit) as stop:  # a usage error
        main(["train", "dgmm", "--out", str(tmp_path / "x"), "--noise", "-1", "--quiet"])
    assert stop.value.code == 2 and "--noise: expected a positive number" in capsys.readouterr().err

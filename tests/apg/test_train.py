"""Training: a short run lowers the inclusive KL; an interrupted and resumed run ends in the state of an
uninterrupted one; the CLI runs at tiny sizes (train, then evaluate with figures and JSON)."""

import csv
import json
import math
import os

import pytest
import torch

from apg import APGError, models
from apg.cli import main
from apg.evaluate import SHIPPED, evaluate
from apg.models import gmm
from apg.train import TrainConfig, load_proposals, train

TINY = dict(batch_size=4, num_particles=3, num_sweeps=2, num_datasets=40, log_every=2, checkpoint_every=4,
            threads=0)


@pytest.mark.slow
def test_short_training_lowers_the_inclusive_kl():
    torch.manual_seed(0)
    x = gmm.simulate(10, seed=99)["x"]
    ref = gmm.gibbs(x, 5, 20)  # particles from the exact Gibbs sampler stand in for p(z_-b | x)

    def kl(nets):
        return {k: v.mean().item() for k, v in gmm.inclusive_kl(nets, x, ref).items()}

    torch.manual_seed(0)
    before = kl(models.get("gmm").make_proposals("apg"))
    cfg = TrainConfig(iterations=100, batch_size=10, num_particles=5, num_sweeps=3, lr=1e-2, lr_final=1e-2,
                      num_datasets=500, log_every=50, checkpoint_every=100, threads=0)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        train(d, cfg, progress=False)
        after = kl(load_proposals(os.path.join(d, "proposals.pt")).proposals)
    assert after["assignments"] < 0.8 * before["assignments"], (before, after)


def _rows(path):
    with open(path) as f:
        return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]


def _interrupted_and_uninterrupted(tmp_path, cfg, on_step, stopped_at):
    """Train ``cfg`` uninterrupted in ``a``; in ``b`` stop it with ``on_step`` and resume. Returns both networks."""
    train(str(tmp_path / "a"), cfg, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(str(tmp_path / "b"), cfg, progress=False, on_step=on_step)
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["iteration"] == stopped_at
    train(str(tmp_path / "b"), cfg, progress=False)
    return tuple(torch.load(tmp_path / r / "proposals.pt", weights_only=True)["state_dict"] for r in ("a", "b"))


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(tmp_path):
    cfg = TrainConfig(iterations=10, seed=3, **TINY)

    def interrupt(t):
        if t == 6:
            raise KeyboardInterrupt

    a, b = _interrupted_and_uninterrupted(tmp_path, cfg, interrupt, 6)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(tmp_path / "a" / "metrics.csv") == _rows(tmp_path / "b" / "metrics.csv")
    # a resumed run must have the same settings; the error names the flag
    with pytest.raises(APGError, match=r"other settings: --iterations 12 \(the run has 10\)"):
        train(str(tmp_path / "b"), TrainConfig(iterations=12, seed=3, **TINY), progress=False)
    # rerunning a finished run says so and returns its last metrics
    assert train(str(tmp_path / "b"), cfg, progress=False)["iteration"] == 10


def test_config_errors():
    with pytest.raises(APGError, match=r"no method 'vae'; valid: \['apg', 'apg-features', 'rws-lstm', 'rws-mlp'\]"):
        TrainConfig(method="vae")
    with pytest.raises(APGError, match=r"unknown model 'hmm'; valid: \['bmnist', 'dgmm', 'gmm'\]"):
        TrainConfig(model="hmm")
    with pytest.raises(APGError, match="num_sweeps must be 1"):
        TrainConfig(method="rws-mlp", num_sweeps=10)
    with pytest.raises(APGError, match=r"iterations .*\(--iterations\)"):
        TrainConfig(iterations=0)


def test_method_defaults_are_the_shipped_checkpoints_settings():
    import json

    for method in ("apg", "apg-features", "rws-mlp", "rws-lstm"):
        with open(os.path.join(SHIPPED, f"gmm-{method}.config.json")) as f:
            shipped = json.load(f)
        cfg = TrainConfig.for_method("gmm", method)
        assert {k: getattr(cfg, k) for k in shipped} == shipped, method


def test_cli_train_and_evaluate_at_tiny_sizes(tmp_path, capsys):
    for method in ("apg", "apg-features", "rws-mlp", "rws-lstm"):
        args = ["train", "gmm", "--method", method, "--out", str(tmp_path / "runs" / method), "--iterations", "3",
                "--batch", "4", "--particles", "3", "--datasets", "40", "--log-every", "1", "--quiet"]
        if method.startswith("apg"):
            args += ["--sweeps", "2"]
        if method == "apg":
            args += ["--resampling", "multinomial"]
        assert main(args) == 0
        assert os.path.exists(tmp_path / "runs" / method / "proposals.pt")
    capsys.readouterr()
    figs = tmp_path / "figs"
    assert main(["evaluate", "gmm", "--checkpoint", str(tmp_path / "runs"), "--json", "--plots", str(figs),
                 "--datasets", "3", "--particles", "4", "--rws-particles", "6", "--sweeps", "2", "3",
                 "--budget", "12", "--budget-sweeps", "1", "3", "--fig2-blocks", "blocked", "joint",
                 "--resampling", "multinomial", "--convergence-sweeps", "3", "--bpg-factor", "2",
                 "--hmc-leapfrog", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    with open(tmp_path / "runs" / "apg" / "config.json") as f:
        assert json.load(f)["resampling"] == "multinomial"
    assert out["settings"]["resampling"] == "multinomial"
    assert out["fig2"]["sweeps"] == [1, 3] and set(out["fig2"]["joint"]) == {"log_joint_mean", "log_joint_sd",
                                                                            "ess_joint_mean"}
    assert set(out["fig2"]["blocked"]) == {"log_joint_mean", "log_joint_sd", "ess_globals_mean",
                                           "ess_assignments_mean"}
    assert set(out["convergence"]["log_joint_mean"]) == {"APG (L=4)", "BPG (L=8)", "Gibbs (L=4)",
                                                         "HMC-RWS (L=4, LF=2)"}
    assert all(len(v) == 3 for v in out["convergence"]["log_joint_mean"].values())
    assert (figs / "convergence.png").stat().st_size > 0
    assert main(["evaluate", "gmm", "--checkpoint", str(tmp_path / "runs"), "--quiet",
                 "--datasets", "3", "--particles", "4", "--rws-particles", "6", "--sweeps", "2", "3"]) == 0
    assert "APG (K=3)" in capsys.readouterr().out
    methods = [(r["method"], r["sweeps"]) for r in out["rows"]]
    assert methods == [("RWS-MLP", 1), ("RWS-LSTM", 1), ("APG", 2), ("APG", 3), ("APG-features", 2),
                       ("APG-features", 3)]
    assert out["rows"][0]["delta_log_joint"] is None and out["rows"][0]["kl"]["globals"] is None
    for r in out["rows"][2:]:  # per element: 6 cluster-dims, 60 points (rounded to 5 digits)
        assert math.isclose(r["kl_per_point"]["assignments"], r["kl"]["assignments"] / 60, rel_tol=1e-3)
        assert math.isclose(r["kl_per_point"]["globals"], r["kl"]["globals"] / 6, rel_tol=1e-3)
    assert out["settings"]["nu0"] == 0.3 and out["paper"][-1]["ess"]["assignments"] == 0.780
    apg = out["rows"][3]
    assert set(apg["ess"]) == {"joint", "globals", "assignments"} and set(apg["kl"]) == {"globals", "assignments"}
    assert all(0 < v <= 1 for v in apg["ess"].values()) and all(v >= 0 for v in apg["kl"].values())
    assert (figs / "fig1a.png").stat().st_size > 0 and (figs / "fig2.png").stat().st_size > 0
    assert main(["evaluate", "gmm", "--checkpoint", str(tmp_path / "runs"), "--json", "--quiet", "--nu0", "0.1",
                 "--datasets", "2", "--particles", "4", "--rws-particles", "6", "--sweeps", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["nu0"] == 0.1


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["evaluate", "gmm", "--checkpoint", str(tmp_path)]) == 2
    assert "no checkpoint for 'apg'" in capsys.readouterr().err
    args = ["train", "gmm", "--out", str(tmp_path / "r"), "--iterations", "2", "--batch", "4", "--particles", "3",
            "--sweeps", "2", "--datasets", "40", "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args[:-1] + ["--seed", "5", "--quiet"]) == 2
    assert "other settings: --seed 5 (the run has 0)" in capsys.readouterr().err
    assert main(args) == 0  # rerunning a finished run
    assert "already finished" in capsys.readouterr().err


def test_shipped_checkpoints_load_and_evaluate():
    assert os.path.isdir(SHIPPED)  # apg/checkpoints is part of the package
    out = evaluate("gmm", options={"datasets": 2, "particles": 4, "rws_particles": 8, "sweeps": [2]})
    assert [r["method"] for r in out["rows"]] == ["RWS-MLP", "RWS-LSTM", "APG", "APG-features"]


def test_sigint_stops_at_an_iteration_boundary_and_resumes_exactly(tmp_path):
    """A real Ctrl-C (SIGINT) mid-run: the checkpoint is at a boundary and the resumed run equals the
    uninterrupted one."""
    import signal

    before = signal.getsignal(signal.SIGINT)
    cfg = TrainConfig(iterations=8, seed=4, **TINY)

    def ctrl_c(t):
        if t == 3:
            os.kill(os.getpid(), signal.SIGINT)  # handled: the run stops after this iteration

    a, b = _interrupted_and_uninterrupted(tmp_path, cfg, ctrl_c, 3)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "gmm", "--particles", "0"], "argument --particles: expected a positive integer, got '0'"),
    (["train", "gmm", "--out", "x", "--lr", "-1"], "argument --lr: expected a positive number"),
    (["train", "hmm", "--out", "x"], "invalid choice: 'hmm'"),
    (["train", "gmm", "--out", "x", "--method", "vae"], "invalid choice: 'vae'"),
])
def test_bad_values_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "usage: apg" in err and message in err


def test_flags_that_need_plots_and_version(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # one help line per option
    assert main(["evaluate", "gmm", "--budget", "10", "--datasets", "1", "--quiet"]) == 2
    assert "--budget set(s) up a figure, which is drawn only with --plots" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.startswith("apg ")
    with pytest.raises(SystemExit):
        main(["train", "gmm", "--help"])
    help_text = capsys.readouterr().out
    assert "apg: 32000; apg-features: 2000; rws-mlp, rws-lstm: 10000" in help_text  # each method's defaults


def test_optional_methods_are_skipped_when_absent(tmp_path):
    """APG-features is optional: a checkpoint directory without it evaluates the other methods."""
    import shutil

    for method in ("apg", "rws-mlp", "rws-lstm"):
        shutil.copy(os.path.join(SHIPPED, f"gmm-{method}.pt"), tmp_path / f"gmm-{method}.pt")
    out = evaluate("gmm", checkpoint=str(tmp_path), options={"datasets": 2, "particles": 4, "rws_particles": 8,
                                                              "sweeps": [2]})
    assert [r["method"] for r in out["rows"]] == ["RWS-MLP", "RWS-LSTM", "APG"]


def test_compiled_training_resumes_exactly(tmp_path):
    """--compile: each iteration's sampler and loss run as a torch.compile'd program drawing from the run's
    one stream, whose state the checkpoint keeps, so an interrupted and resumed run equals an uninterrupted
    one bit for bit."""
    cfg = TrainConfig(iterations=6, seed=3, compile=True, **{**TINY, "checkpoint_every": 2, "log_every": 3})

    def stop_at_4(t):
        if t == 4:
            raise KeyboardInterrupt

    a, b = _interrupted_and_uninterrupted(tmp_path, cfg, stop_at_4, 4)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = _rows(tmp_path / "a" / "metrics.csv")
    assert [r["iteration"] for r in rows] == ["3", "6"] and all(math.isfinite(float(r["loss"])) for r in rows)
    with pytest.raises(APGError, match=r"compile runs one random stream: streams must be 1, got 2 \(--compile, "
                                         r"--streams\)"):
        TrainConfig(compile=True, streams=2, batch_size=4)

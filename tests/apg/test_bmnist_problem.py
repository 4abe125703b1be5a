"""Bouncing MNIST as a registered problem: training lowers the MSE, resume, model settings, the CLI at tiny
sizes (with MNIST IDX files and with the bundled digits) and the shipped checkpoint."""

from __future__ import annotations

import gzip
import json
import os
import struct

import pytest
import torch

from apg.cli import main
from apg.errors import APGError
from apg.models.bmnist import BMNISTConfig, simulate
from apg.models.bmnist.evaluation import mse_rows
from apg.models.bmnist.problem import BMNISTProblem, BMNISTSettings, split_digits
from apg.train import TrainConfig, load_proposals, train

pytest.importorskip("sklearn", reason="the offline digits come from scikit-learn (the test extra installs it)")

TINY = BMNISTConfig(canvas=20, digit=6, num_digits=2, num_frames=4)


def _problem(**kw) -> BMNISTProblem:
    return BMNISTProblem(BMNISTSettings(profile=TINY, proposal_hidden=(32, 32), decoder_hidden=(32, 64), **kw))


def _cfg(**kw) -> TrainConfig:
    settings = dict(iterations=100, batch_size=4, num_particles=4, num_sweeps=2, num_datasets=400, log_every=10,
                    checkpoint_every=1000, lr=3e-3, lr_final=3e-3)
    settings.update(kw)
    return TrainConfig.for_method("bmnist", "apg", **settings)


def test_short_training_lowers_the_held_out_mse(tmp_path):
    """100 iterations on 20x20 videos of two 6x6 digits: the held-out reconstruction MSE after 3 sweeps falls
    below half that of the untrained networks (which start from the same seed), and below a third of the
    blank reconstruction's."""
    problem = _problem()
    train(str(tmp_path / "run"), _cfg(), progress=False, problem=problem)
    trained = load_proposals(str(tmp_path / "run" / "proposals.pt"))
    assert isinstance(trained.problem, BMNISTProblem) and trained.problem.cfg == TINY
    torch.manual_seed(0)
    fresh = (problem.make_proposals("apg"), problem.make_model())
    frames = simulate(8, TINY, split_digits(problem.digits())[1], seed=5)["frames"]
    mse = {}
    for name, (nets, decoder) in (("fresh", fresh), ("trained", (trained.proposals, trained.model))):
        rows, _ = mse_rows(trained.problem, nets, decoder, frames, 2, 4, (1, 3), torch.Generator().manual_seed(0))
        mse[name] = rows[-1]["mse"]
        blank = rows[-1]["mse_blank"]
    assert mse["trained"] < 0.5 * mse["fresh"], mse
    assert mse["trained"] < blank / 3, (mse, blank)


def test_resume_is_bit_for_bit_and_model_settings_must_match(tmp_path):
    cfg = _cfg(iterations=4, checkpoint_every=2, log_every=2)
    train(str(tmp_path / "a"), cfg, progress=False, problem=_problem())

    def stop(t):
        if t == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(str(tmp_path / "b"), cfg, progress=False, problem=_problem(), on_step=stop)
    with open(tmp_path / "b" / "problem.json") as f:
        assert json.load(f)["profile"]["canvas"] == 20
    # the model's own settings (here the profile, via the default problem) must match the run's
    with pytest.raises(APGError, match="model settings"):
        train(str(tmp_path / "b"), cfg, progress=False)
    # a run started before a setting existed (where_net) resumes with that setting's default
    with open(tmp_path / "b" / "problem.json") as f:
        saved = json.load(f)
    del saved["where_net"]
    with open(tmp_path / "b" / "problem.json", "w") as f:
        json.dump(saved, f)
    train(str(tmp_path / "b"), cfg, progress=False, problem=_problem())
    a = torch.load(tmp_path / "a" / "proposals.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "proposals.pt", weights_only=False)
    for part in ("state_dict", "model_state_dict"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    # an unfinished run's checkpoint loads with its model settings
    t = load_proposals(str(tmp_path / "b" / "checkpoint.pt"))
    assert isinstance(t.problem, BMNISTProblem) and t.problem.cfg == TINY


def _write_idx(path: str, images: torch.Tensor) -> None:
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", *images.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + images.numpy().tobytes())


def test_cli_trains_on_mnist_files_and_evaluates(tmp_path, capsys):
    """``--mnist-dir``: the digits come from the IDX file (28x28, resized to the profile's 8x8), the setting is
    stored with the run and evaluation reads it back; the JSON rows have the documented keys."""
    g = torch.Generator().manual_seed(0)
    images = (torch.rand(60, 28, 28, generator=g) * 255).to(torch.uint8)
    mnist_dir = tmp_path / "mnist"
    mnist_dir.mkdir()
    _write_idx(str(mnist_dir / "train-images-idx3-ubyte.gz"), images)
    out = tmp_path / "runs" / "apg"
    rc = main(["train", "bmnist", "--out", str(out), "--iterations", "2", "--batch", "2", "--particles", "2",
               "--sweeps", "2", "--datasets", "10", "--mnist-dir", str(mnist_dir), "--quiet", "--json"])
    assert rc == 0
    capsys.readouterr()
    with open(out / "problem.json") as f:
        assert json.load(f)["mnist_dir"] == str(mnist_dir)
    t = load_proposals(str(out / "proposals.pt"))
    assert isinstance(t.problem, BMNISTProblem)
    expected = torch.nn.functional.interpolate(images.float().unsqueeze(1) / 255, size=(8, 8), mode="bilinear",
                                               align_corners=False, antialias=True).squeeze(1).clamp(0, 1)
    torch.testing.assert_close(t.problem.digits(), expected)
    rc = main(["evaluate", "bmnist", "--checkpoint", str(tmp_path / "runs"), "--T", "3", "--D", "1", "2",
               "--videos", "2", "--particles", "2", "--sweeps", "1", "2", "--json", "--quiet"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out)
    assert [(r["T"], r["D"], r["sweeps"]) for r in res["rows"]] == [(3, 1, 1), (3, 1, 2), (3, 2, 1), (3, 2, 2)]
    assert all(set(r) == {"method", "T", "D", "sweeps", "mse", "mse_frame", "mse_blank"} for r in res["rows"])
    assert all(abs(r["mse_frame"] - 1024 * r["mse"]) < 1e-9 for r in res["rows"])  # summed over 32x32 pixels
    assert res["settings"]["digits"] == "MNIST"
    assert res["settings"]["held_out_digits"] == "last sixth of MNIST's training images (no t10k file)"
    # with MNIST's test file beside it, all training images train and the test images are held out
    test_images = (torch.rand(12, 28, 28, generator=g) * 255).to(torch.uint8)
    _write_idx(str(mnist_dir / "t10k-images-idx3-ubyte.gz"), test_images)
    problem = t.problem.with_config(t.problem.config())
    train_digits, held_out, source = problem.digit_split()
    torch.testing.assert_close(train_digits, expected)
    torch.testing.assert_close(held_out, torch.nn.functional.interpolate(
        test_images.float().unsqueeze(1) / 255, size=(8, 8), mode="bilinear", align_corners=False,
        antialias=True).squeeze(1).clamp(0, 1))
    assert source == "MNIST test set"
    rc = main(["evaluate", "bmnist", "--checkpoint", str(tmp_path / "runs"), "--T", "3", "--D", "1",
               "--videos", "2", "--particles", "2", "--sweeps", "1", "2", "--json", "--quiet", "--device", "cpu",
               "--resampling", "multinomial"])
    assert rc == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert (settings["held_out_digits"], settings["resampling"], settings["device"]) == ("MNIST test set",
                                                                                         "multinomial", "cpu")
    if not torch.cuda.is_available():
        rc = main(["evaluate", "bmnist", "--checkpoint", str(tmp_path / "runs"), "--device", "cuda", "--quiet"])
        assert rc == 2 and "no CUDA device available (--device)" in capsys.readouterr().err
    # a missing directory is a clear error, not a traceback
    rc = main(["train", "bmnist", "--out", str(tmp_path / "x"), "--iterations", "1", "--mnist-dir",
               str(tmp_path / "nowhere"), "--quiet"])
    assert rc == 2 and "--mnist-dir" in capsys.readouterr().err


def test_the_papers_position_network_trains_and_evaluates(tmp_path, capsys):
    """``--where-net paper``: appendix E's position network (FC hidden[0] tanh, two heads of FC hidden[1] tanh) is
    stored with the run, rebuilt from it, and its kernel's density is that of the Normal it draws from."""
    out = tmp_path / "runs" / "apg"
    assert main(["train", "bmnist", "--out", str(out), "--iterations", "2", "--batch", "2", "--particles", "2",
                 "--sweeps", "2", "--datasets", "10", "--where-net", "paper", "--quiet", "--json"]) == 0
    capsys.readouterr()
    t = load_proposals(str(out / "proposals.pt"))
    nets = t.proposals
    assert t.problem.settings.where_net == "paper" and nets.where_kind == "paper"
    assert [m.out_features for m in nets.where_net if isinstance(m, torch.nn.Linear)] == [200]  # cpu: (200, 100)
    assert [m.out_features for m in nets.where_loc if isinstance(m, torch.nn.Linear)] == [100, 2]
    frame, digit = torch.rand(3, 32, 32), torch.rand(3, 8, 8)
    loc, scale = nets.where_params(frame, digit)
    assert loc.abs().max() < 1 and (scale > 0).all()
    assert main(["evaluate", "bmnist", "--checkpoint", str(tmp_path / "runs"), "--T", "3", "--D", "1",
                 "--videos", "2", "--particles", "2", "--sweeps", "1", "2", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["where_net"] == "paper"
    with pytest.raises(APGError, match="where_net"):
        BMNISTSettings(where_net="lstm")


def test_shipped_checkpoint_tracks_longer_videos_with_more_digits(capsys):
    """The shipped cpu-profile checkpoint (trained on D=3, T=10): on held-out videos of T=20 with D=3 and 4,
    the MSE falls with sweeps and stays well below the blank reconstruction's."""
    rc = main(["evaluate", "bmnist", "--T", "20", "--D", "3", "4", "--videos", "4", "--sweeps", "1", "4",
               "--json", "--quiet"])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    for D in (3, 4):
        one, four = (next(r for r in rows if r["D"] == D and r["sweeps"] == k) for k in (1, 4))
        assert four["mse"] < one["mse"], (D, one, four)
        assert four["mse"] < 0.5 * four["mse_blank"], (D, four)


def test_evaluation_plots(tmp_path):
    pytest.importorskip("matplotlib")
    from apg.models.bmnist.evaluation import evaluate_bmnist

    problem = _problem()
    run_dir = tmp_path / "apg"
    train(str(run_dir), _cfg(iterations=2, log_every=1), progress=False, problem=problem)
    out = evaluate_bmnist({"apg": load_proposals(str(run_dir / "proposals.pt"))},
                          {"frames": [3, 5], "digits": [2], "videos": 2, "particles": 2, "sweeps": [1, 2]},
                          plots=str(tmp_path / "figs"), metrics={"apg": str(run_dir / "metrics.csv")},
                          progress=False)
    assert set(out["figures"]) == {"fig4", "fig3-D2", "training"}
    assert all(os.path.getsize(p) > 5_000 for p in out["figures"].values())

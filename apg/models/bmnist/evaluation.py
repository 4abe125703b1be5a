"""Bouncing MNIST's evaluation.

Fig. 4 (reconstruction MSE against sweeps) and Fig. 3 (tracking) of the APG paper (Wu et al., ICML 2020), on videos
longer and with more digits than in training.

For every video length T and digit count D asked for, ``num_videos`` held-out videos are simulated from
the held-out digit images (`.digits.split_digits`) with ``seed``; the APG sampler runs ``max(sweeps)``
sweeps with L particles, and after each sweep K in ``sweeps`` the reconstruction is scored:

* ``mse``: the mean over videos, frames and pixels of ``(x - x_hat)^2``, where ``x_hat`` is the
  posterior-mean reconstruction (`.model.posterior_reconstruction`: the particles' Bernoulli
  means averaged with their normalised weights after sweep K; K = 1 is the one-shot proposal).
* ``mse_frame``: the same summed over a frame's pixels (``mse * H^2``): the official code's units, per frame.
* ``mse_blank``: the same for an empty reconstruction (``x_hat = 0``, i.e. the mean of ``x^2``): a scale
  for ``mse`` (a sampler that explains nothing scores about this).

The paper's Fig. 4 plots the MSE against sweeps for T in {10, 20, 100} and D in {3, 4, 5} on 96x96 videos;
its values are only shown as a plot (no table), so no paper numbers are printed beside ours.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from tmcgraph.arguments import positive_int
from tmcgraph.plots import pyplot

from ...errors import APGError
from ...sampler import run
from ..base import Trained
from ..common import add_resampling_argument, option, resolve_device, save_figure, training_curves
from .model import DigitDecoder, posterior_reconstruction
from .networks import BMNISTProposals
from .simulate import simulate

__all__ = ["EvalConfig", "add_arguments", "evaluate_bmnist", "format_table", "mse_rows"]


@dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation.

    Attributes:
        frames: the video lengths T (default 10, as trained, and 50).
        digits: the digit counts D (default: the training D and one more).
        num_videos: held-out videos per (T, D).
        seed: seed of the videos and of the sampler.
        particles: L.
        sweeps: the sweep counts K reported (the sampler runs ``max(sweeps)``).
        resampling: the scheme before every block update.
        device: where the networks, the videos and the sampler run.
    """

    frames: Sequence[int] = (10, 50)
    digits: Optional[Sequence[int]] = None
    num_videos: int = 20
    seed: int = 12345
    particles: int = 10
    sweeps: Sequence[int] = (1, 2, 3, 5, 8, 12)
    resampling: str = "systematic"
    device: str = "cpu"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``apg evaluate bmnist``'s options."""
    d = EvalConfig()
    parser.add_argument("--T", dest="frames", type=positive_int, nargs="+", default=list(d.frames), metavar="T",
                        help="video lengths T")
    parser.add_argument("--D", dest="digits", type=positive_int, nargs="+", default=None, metavar="D",
                        help="digits per video (default: the training D and one more)")
    parser.add_argument("--videos", type=positive_int, default=d.num_videos, metavar="N",
                        help="held-out videos per (T, D)")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the test videos and of the sampler")
    parser.add_argument("--particles", type=positive_int, default=d.particles, metavar="L", help="particles L")
    parser.add_argument("--sweeps", type=positive_int, nargs="+", default=list(d.sweeps), metavar="K",
                        help="sweep counts K reported (1: the one-shot proposal)")
    parser.add_argument("--mnist-dir", default=None, metavar="DIR",
                        help="MNIST's IDX files, for checkpoints trained on MNIST (default: the directory the "
                             "checkpoint was trained with); the held-out digits are its test set "
                             "(t10k-images-idx3-ubyte[.gz]) if there, else the last sixth of its training images")
    add_resampling_argument(parser)
    parser.add_argument("--device", default=d.device, metavar="DEV",
                        help="where to evaluate: cpu (default), cuda, cuda:1, ...")


def mse_rows(problem: Any, nets: BMNISTProposals, decoder: DigitDecoder, frames: torch.Tensor, num_digits: int,
             particles: int, sweeps: Sequence[int], generator: torch.Generator,
             one_shot: bool = False, scheme: str = "systematic") -> Tuple[List[Dict[str, Any]], Any]:
    """MSE after each sweep count in ``sweeps`` on ``frames (B, T, H, H)``.

    Rows ``{"sweeps", "mse", "mse_frame", "mse_blank"}`` and the `apg.sampler.Result` (states after every sweep).
    The networks, ``frames`` and ``generator`` must be on one device.
    """
    T = frames.shape[-3]
    sampler = problem.sampler(nets, decoder, num_digits=num_digits, num_frames=T, one_shot=one_shot)
    K = 1 if one_shot else max(sweeps)
    with torch.no_grad():
        res = run(sampler, frames, particles, K, record_log_joint=True, record_states=True, scheme=scheme,
                  generator=generator)
    blank = float((frames ** 2).mean())
    assert res.trajectory is not None  # recorded
    rows = []
    for k in sorted(set(sweeps)):
        if k > K:
            continue
        state, log_w = res.trajectory[k - 1], res.sweeps[k - 1].log_weights
        assert log_w is not None  # recorded
        recon = posterior_reconstruction(decoder, res._replace(state=state, log_weights=log_w), frames.shape[-1])
        mse = float(((recon - frames) ** 2).mean())
        rows.append({"sweeps": k, "mse": mse, "mse_frame": mse * frames.shape[-1] * frames.shape[-2],
                     "mse_blank": blank})
    return rows, res


def evaluate_bmnist(trained: Dict[str, Trained], options: Mapping[str, Any], *, plots: Optional[str],
                    metrics: Dict[str, Optional[str]], progress: bool) -> Dict[str, Any]:
    """Fig. 4's MSE table (and Figs. 3-4 as PNGs when ``plots`` names a directory).

    Args:
        trained: method (``"apg"``, optionally ``"rws"``) -> its loaded bmnist networks
            (`apg.trained.load_proposals`).
        options: ``apg evaluate bmnist``'s options by ``dest`` (see `add_arguments`).
        plots: a directory for ``fig4.png``, ``fig3-D{D}.png`` and ``training.png``.
        metrics: method -> its training metrics.csv (for the training curves).
        progress: a progress bar on stderr (one step per (method, T, D)).

    Returns:
        ``{"rows": [{"method", "T", "D", "sweeps", "mse", "mse_blank"}, ...], "settings": {...},
        "figures": {...}}`` (RWS rows, one-shot only, when an RWS checkpoint is found).
    """
    from tqdm.auto import tqdm

    for t in trained.values():
        assert isinstance(t.proposals, BMNISTProposals) and isinstance(t.model, DigitDecoder)
    if "apg" not in trained:
        raise APGError("no apg checkpoint to evaluate")
    problem: Any = trained["apg"].problem  # a BMNISTProblem (the driver checked the name)
    mnist_dir = option(options, "mnist_dir", None)
    if mnist_dir is not None:
        problem = problem.with_config({**problem.config(), "mnist_dir": mnist_dir})
    d = EvalConfig()
    train_D = problem.cfg.num_digits
    cfg = EvalConfig(frames=tuple(option(options, "frames", d.frames)),
                     digits=tuple(option(options, "digits", (train_D, train_D + 1))),
                     num_videos=option(options, "videos", d.num_videos), seed=option(options, "seed", d.seed),
                     particles=option(options, "particles", d.particles),
                     sweeps=tuple(option(options, "sweeps", d.sweeps)),
                     resampling=option(options, "resampling", d.resampling), device=option(options, "device", d.device))
    assert cfg.digits is not None
    device = resolve_device(cfg.device)
    _, test_digits, held_out = problem.digit_split()
    bar = tqdm(total=len(trained) * len(cfg.frames) * len(cfg.digits), disable=not progress,
               desc="evaluate bmnist", unit="setting")
    rows: List[Dict[str, Any]] = []
    examples: Dict[int, Tuple[torch.Tensor, Any]] = {}  # D -> (frames, result) of the shortest T, for Fig. 3
    for method, t in trained.items():
        one_shot = problem.method(method).one_shot
        for T in cfg.frames:
            for D in cfg.digits:
                frames = simulate(cfg.num_videos, problem.cfg, test_digits, seed=cfg.seed + 1000 * D + T,
                                  num_digits=D, num_frames=T)["frames"].to(device)
                g = torch.Generator(device=device).manual_seed(cfg.seed)
                nets, decoder = t.proposals.to(device), t.model.to(device)
                assert isinstance(nets, BMNISTProposals) and isinstance(decoder, DigitDecoder)
                found, res = mse_rows(problem, nets, decoder, frames, D, cfg.particles, cfg.sweeps, g,
                                      one_shot=one_shot, scheme=cfg.resampling)
                rows.extend({"method": method, "T": T, "D": D, **r} for r in found)
                if method == "apg" and T == min(cfg.frames):
                    examples[D] = (frames, res)
                bar.update(1)
    bar.close()
    out: Dict[str, Any] = {
        "rows": rows,
        "settings": {"videos": cfg.num_videos, "seed": cfg.seed, "particles": cfg.particles,
                     "profile": problem.config()["profile"], "digits": "MNIST" if problem.settings.mnist_dir
                     else "scikit-learn 8x8", "held_out_digits": held_out, "trained_D": train_D,
                     "trained_T": problem.cfg.num_frames, "where_net": problem.settings.where_net,
                     "resampling": cfg.resampling, "device": str(device)}}
    if plots is not None:
        os.makedirs(plots, exist_ok=True)
        figures = {"fig4": _fig4(rows, os.path.join(plots, "fig4.png"))}
        apg = trained["apg"]
        assert isinstance(apg.model, DigitDecoder)
        for D, (frames, res) in examples.items():
            figures[f"fig3-D{D}"] = _fig3(apg.model, frames, res, os.path.join(plots, f"fig3-D{D}.png"))
        curves = _training_curves(metrics, os.path.join(plots, "training.png"))
        if curves is not None:
            figures["training"] = curves
        out["figures"] = figures
    return out


def format_table(out: Dict[str, Any]) -> str:
    """The MSE tables, per pixel and per frame: one line per (method, T, D), one column per sweep count, and blank."""
    rows = out["rows"]
    sweeps = sorted({r["sweeps"] for r in rows})
    s = out["settings"]
    H = s["profile"]["canvas"]
    lines = [f"Fig. 4: reconstruction MSE against sweeps K ({s['videos']} held-out videos per row, "
             f"L={s['particles']}, seed {s['seed']}; trained on D={s['trained_D']}, T={s['trained_T']}; "
             f"{H}x{H} canvas, {s['digits']} digits; held out: {s.get('held_out_digits', '?')})"]
    keys = sorted({(r["method"], r["T"], r["D"]) for r in rows}, key=lambda x: (x[0] != "apg", x[1], x[2]))
    for unit, scale, fmt in (("per pixel", 1, ">8.5f"), (f"per frame (summed over its {H * H} pixels, the official "
                                                          "code's units)", H * H, ">8.2f")):
        lines.append(f"MSE {unit}:")
        lines.append(f"{'method':>6} {'T':>4} {'D':>3} " + " ".join(f"{'K=' + str(k):>8}" for k in sweeps)
                     + f" {'blank':>8}")
        for m, T, D in keys:
            by_k = {r["sweeps"]: r for r in rows if (r["method"], r["T"], r["D"]) == (m, T, D)}
            cells = " ".join(f"{by_k[k]['mse'] * scale:{fmt}}" if k in by_k else f"{'-':>8}" for k in sweeps)
            blank = next(iter(by_k.values()))["mse_blank"] * scale
            lines.append(f"{m.upper():>6} {T:>4} {D:>3} {cells} {blank:{fmt}}")
    if "figures" in out:
        lines.append("figures: " + ", ".join(out["figures"].values()))
    return "\n".join(lines)


def _fig4(rows: List[Dict[str, Any]], path: str) -> str:
    """MSE against sweeps, one line per (T, D) of the APG rows, the blank reconstruction's MSE dotted."""
    plt = pyplot()
    apg = [r for r in rows if r["method"] == "apg"]
    Ds = sorted({r["D"] for r in apg})
    fig, axes = plt.subplots(1, len(Ds), figsize=(4.2 * len(Ds), 3.4), squeeze=False)
    for ax, D in zip(axes[0], Ds):
        for T in sorted({r["T"] for r in apg}):
            sel = sorted((r for r in apg if r["D"] == D and r["T"] == T), key=lambda r: r["sweeps"])
            line, = ax.plot([r["sweeps"] for r in sel], [r["mse"] for r in sel], marker="o", label=f"T={T}")
            ax.axhline(sel[0]["mse_blank"], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_title(f"D = {D}")
        ax.set_xlabel("sweeps K")
        ax.set_ylabel("MSE per pixel (dotted: blank)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return save_figure(fig, path)


def _fig3(decoder: DigitDecoder, frames: torch.Tensor, res: Any, path: str, video: int = 0,
          max_frames: int = 15) -> str:
    """One video.

    The frames with the highest-weight particle's trajectories (after the last sweep) drawn over them, and that
    particle's reconstruction below (Fig. 3's layout).
    """
    from .model import reconstruct

    plt = pyplot()
    best = int(res.log_weights[video].argmax())
    where = res.state["where"][video, best]  # (D, T, 2)
    what = res.state["what"][video, best]  # (D, 10)
    H = frames.shape[-1]
    with torch.no_grad():
        recon = reconstruct(decoder, what.unsqueeze(0), where.transpose(0, 1), H).cpu()  # (T, H, H)
    frames, where = frames.cpu(), where.cpu()
    T = min(max_frames, frames.shape[-3])
    h = decoder.digit
    fig, axes = plt.subplots(2, T, figsize=(1.1 * T, 2.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for t in range(T):
        ax = axes[0][t]
        ax.imshow(frames[video, t].numpy(), cmap="gray", vmin=0, vmax=1)
        for dd in range(where.shape[0]):
            # the digit's box: top-left pixel offset (H - h)(1 + where)/2, x horizontal
            ox, oy = ((H - h) * (1 + where[dd, t]) / 2).tolist()
            ax.add_patch(plt.Rectangle((ox - 0.5, oy - 0.5), h, h, fill=False, linewidth=0.8,
                                       edgecolor=colours[dd % len(colours)]))
        axes[1][t].imshow(recon[t].numpy(), cmap="gray", vmin=0, vmax=1)
        for ax in (axes[0][t], axes[1][t]):
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][t].set_title(f"t={t + 1}", fontsize=7)
    axes[0][0].set_ylabel("data", fontsize=8)
    axes[1][0].set_ylabel("recon.", fontsize=8)
    return save_figure(fig, path)


def _training_curves(metrics: Dict[str, Optional[str]], path: str) -> Optional[str]:
    """Training curves (MSE and log joint of the training batches) from the runs' metrics CSVs."""

    def draw(axes: Any, m: str, it: List[int], col: Callable[[str], List[float]]) -> None:
        axes[0].plot(it, col("mse"), label=m.upper())
        axes[0].set_yscale("log")
        axes[1].plot(it, col("log_joint"), label=m.upper())

    return training_curves(metrics, path, ["MSE per pixel (training batch)", "E_w log p(x, z) (training batch)"],
                           (9, 3.4), draw)

"""Evaluation of trained DGMM samplers: Table 1b and Fig. 1b of the APG paper (Wu et al., ICML 2020).

Table 1b columns, per method, on held-out datasets simulated with ``seed``
(each method with the decoder it learned):

* ``log_joint``: mean over datasets of ``E_w[log p_theta(x, z)]`` (the
  self-normalised average over the final particles), summed over the points
  as in the paper; ``delta_log_joint``: minus the RWS row's.
* ``centres_found``: the share of datasets whose highest-weight particle has a
  centre within 0.5 of every true centre (not in the paper; it counts the
  datasets where the sampler found the right clustering).
* ESS/L (eq. 11) of the last sweep: ``joint`` for ``{mu, c, alpha}`` updated as
  one block (`apg.sampler.joint_block`, one resampling per sweep; for RWS
  the one-shot weights), ``globals`` for the ``{mu}`` block and ``locals`` for
  ``{c, alpha}`` in the blocked sampler.

References printed beside them: the log joint of the simulated latents under
the true model (a circle of the true radius); the exact blocked Gibbs sampler
of the true model started from the APG's one-shot proposal (same L, the
largest K: how far blocked Gibbs itself gets); and each method's learned
radius against the true one.  All randomness comes from generators seeded with
``seed``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from tmcgraph.plots import pyplot

from ...sampler import joint_block, run
from ..common import cell, chunks, save_figure, standard_error, training_curves
from .data import DGMMConfig, simulate
from .model import apg_sampler, exact_sampler, log_joint
from .networks import AnyProposals, CircleDecoder, Decoder

__all__ = ["EvalConfig", "PAPER_TABLE_1B", "centres_found", "evaluate_dgmm", "format_table", "true_log_joint"]

METHOD_NAMES = {"rws": "RWS", "apg": "APG", "rws-lstm": "LSTM-RWS", "apg-paper": "APG-paper"}

#: Table 1b of Wu et al. (ICML 2020) as printed: dlogp, ESS/L {mu,c,alpha}, {mu}, {c,alpha}.  Its baseline
#: (dlogp "-") is the LSTM-RWS row; the MLP-RWS row reads 2538 above it; the evaluation L is not stated.
PAPER_TABLE_1B = [
    {"method": "MLP-RWS", "sweeps": 1, "delta_log_joint": 2538, "ess": {"joint": 0.001, "globals": None,
                                                                       "locals": None}},
    {"method": "LSTM-RWS", "sweeps": 1, "delta_log_joint": None, "ess": {"joint": 0.001, "globals": None,
                                                                        "locals": None}},
    {"method": "APG", "sweeps": 5, "delta_log_joint": 6201, "ess": {"joint": 0.002, "globals": 0.013,
                                                                   "locals": 0.422}},
    {"method": "APG", "sweeps": 10, "delta_log_joint": 6293, "ess": {"joint": 0.002, "globals": 0.019,
                                                                    "locals": 0.454}},
    {"method": "APG", "sweeps": 15, "delta_log_joint": 6310, "ess": {"joint": 0.003, "globals": 0.025,
                                                                    "locals": 0.488}},
]


@dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation.

    (defaults: 100 test datasets of 200 points, APG L=20, RWS L=300: the sample budget of APG at K=15).
    """

    num_datasets: int = 100
    seed: int = 12345
    apg_particles: int = 20
    rws_particles: int = 300
    sweeps: Sequence[int] = (5, 10, 15)
    num_points: int = 200
    chunk: int = 2000  # datasets x particles per batched call (bounds memory)
    resampling: str = "systematic"  # the scheme before every block update (apg.resampling.SCHEMES)


def true_log_joint(truth: Dict[str, torch.Tensor], cfg: DGMMConfig) -> torch.Tensor:
    """``log p(x, z)`` of simulated data at its true latents under the true model (the simulator's noise): ``(B,)``."""
    return log_joint(truth["x"], truth["mu"], truth["c"], truth["alpha"], CircleDecoder(cfg.radius),
                     dataclasses.replace(cfg, model_noise=None))


def centres_found(mu: torch.Tensor, log_weights: torch.Tensor, true_mu: torch.Tensor,
                  tolerance: float = 0.5) -> torch.Tensor:
    """Whether the highest-weight particle puts a centre within ``tolerance`` of every true centre.

    ``mu (B, L, I, 2)``, ``log_weights (B, L)``, ``true_mu (B, I, 2)`` -> ``(B,)`` bool.
    """
    best = mu[torch.arange(mu.shape[0]), log_weights.argmax(-1)]  # (B, I, 2)
    dist = (true_mu.unsqueeze(-2) - best.unsqueeze(-3)).norm(dim=-1)  # (B, I true, I found)
    return (dist.min(-1).values < tolerance).all(-1)


def _row(nets: AnyProposals, decoder: Decoder, x: torch.Tensor, true_mu: torch.Tensor, L: int, K: int,
         chunk: int, scheme: str, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Last-sweep mean log joint, ESS/L (joint and per block) and centres found at K sweeps.

    (K = 1: the one-shot proposal).
    """
    sampler = apg_sampler(nets, decoder)
    joint = [joint_block(sampler.blocks, sampler.log_joint)] if K > 1 else None
    out: Dict[str, List[torch.Tensor]] = {k: [] for k in ("log_joint", "joint", "globals", "locals", "found")}
    for s in chunks(x.shape[0], max(1, chunk // L)):
        res = run(sampler, x[s], L, K, record_log_joint=True, scheme=scheme, generator=generator)
        last = res.sweeps[-1]
        out["log_joint"].append(last.mean_log_joint())
        out["found"].append(centres_found(res.state["mu"], res.log_weights, true_mu[s]).double())
        if K == 1:
            out["joint"].append(last.ess["init"])
            continue
        out["globals"].append(last.ess["mu"])
        out["locals"].append(last.ess["local"])
        out["joint"].append(run(sampler, x[s], L, K, blocks=joint, scheme=scheme,
                                generator=generator).sweeps[-1].ess["joint"])
    return {k: torch.cat(v) for k, v in out.items() if v}


def _mean(t: Optional[torch.Tensor]) -> Optional[float]:
    return None if t is None else float(f"{float(t.mean()):.5g}")


def evaluate_dgmm(trained: Dict[str, Tuple[AnyProposals, Decoder]], cfg: EvalConfig = EvalConfig(),
                  plots: Optional[str] = None, metrics: Optional[Dict[str, Optional[str]]] = None,
                  progress: bool = False) -> Dict[str, Any]:
    """Table 1b on held-out datasets (and Fig. 1b when ``plots`` names a directory).

    Args:
        trained: method (``"rws"``, ``"apg"``; optionally ``"rws-lstm"``, ``"apg-paper"``) -> (proposals, decoder).
        cfg: the evaluation settings.
        plots: directory for ``fig1b.png`` (and ``training.png``).
        metrics: method -> training metrics.csv, for the training curves.
        progress: a progress bar on stderr (one step per table row and figure).

    Returns:
        ``{"rows": [{"method", "sweeps", "particles", "log_joint", "delta_log_joint" (against RWS),
        "delta_log_joint_lstm" (against LSTM-RWS, the paper's baseline), "ess": {"joint", "globals", "locals"},
        "radius", "centres_found", "se": {"log_joint", "centres_found"}}, ...], "reference": {...},
        "settings": {...}, "paper": [...]}``; ``None`` where a column does not apply.
    """
    from tqdm.auto import tqdm

    model_cfg = trained["apg"][0].cfg
    truth = simulate(cfg.num_datasets, model_cfg, seed=cfg.seed, num_points=cfg.num_points)
    x = truth["x"]
    g = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(total=sum(1 if m.startswith("rws") else len(cfg.sweeps) for m in trained) + 1
               + (1 if plots is not None else 0), disable=not progress,
               desc="evaluate dgmm", unit="step")
    rows: List[Dict[str, Any]] = []
    rws_methods = [m for m in ("rws", "rws-lstm") if m in trained]
    apg_methods = [m for m in ("apg", "apg-paper") if m in trained]
    with torch.no_grad():
        lj: Dict[str, torch.Tensor] = {}  # method (at its largest K) -> per-dataset mean log joint
        for m in rws_methods + apg_methods:
            nets, dec = trained[m]
            for K in ([1] if m in rws_methods else cfg.sweeps):
                L = cfg.rws_particles if K == 1 else cfg.apg_particles
                r = _row(nets, dec, x, truth["mu"], L, K, cfg.chunk, cfg.resampling, g)
                bar.update(1)
                lj[m] = r["log_joint"]
                rows.append({"method": METHOD_NAMES[m], "sweeps": K, "particles": L, "log_joint": _mean(lj[m]),
                             "delta_log_joint": None if m == "rws" else _mean(lj[m] - lj["rws"]),
                             "delta_log_joint_lstm": (_mean(lj[m] - lj["rws-lstm"]) if "rws-lstm" in lj
                                                      and m != "rws-lstm" else None),
                             "ess": {"joint": _mean(r["joint"]), "globals": _mean(r.get("globals")),
                                     "locals": _mean(r.get("locals"))},
                             "radius": round(float(dec.radius.detach()), 4), "centres_found": _mean(r["found"]),
                             "se": {"log_joint": standard_error(lj[m]), "centres_found": standard_error(r["found"])}})
        base = lj["rws"]
        nets, dec = trained["apg"]
        true_lj = true_log_joint(truth, model_cfg)
        # the exact blocked Gibbs sampler of the true rings, from the APG's one-shot proposal (same L, largest K)
        K = max(cfg.sweeps)
        gibbs_lj, gibbs_found = [], []
        exact = exact_sampler(nets, model_cfg.radius)
        for s in chunks(x.shape[0], max(1, cfg.chunk // cfg.apg_particles)):
            res = run(exact, x[s], cfg.apg_particles, K, record_log_joint=True, scheme=cfg.resampling, generator=g)
            gibbs_lj.append(res.sweeps[-1].mean_log_joint())
            gibbs_found.append(centres_found(res.state["mu"], res.log_weights, truth["mu"][s]).double())
        bar.update(1)
    out: Dict[str, Any] = {
        "rows": rows,
        "reference": {"true_latents_log_joint": _mean(true_lj), "rws_log_joint": _mean(base),
                      f"exact_gibbs_log_joint_K{K}": _mean(torch.cat(gibbs_lj)),
                      f"exact_gibbs_centres_found_K{K}": _mean(torch.cat(gibbs_found)),
                      "true_radius": model_cfg.radius},
        "settings": {"test_datasets": cfg.num_datasets, "points": cfg.num_points, "seed": cfg.seed,
                     "apg_particles": cfg.apg_particles, "rws_particles": cfg.rws_particles,
                     "resampling": cfg.resampling, "model": dataclasses.asdict(model_cfg)},
        "paper": PAPER_TABLE_1B}
    if plots is not None:
        os.makedirs(plots, exist_ok=True)
        out["figures"] = {"fig1b": _fig1b(trained, cfg, os.path.join(plots, "fig1b.png"))}
        bar.update(1)
        curves = _training_curves(metrics or {}, os.path.join(plots, "training.png"))
        if curves is not None:
            out["figures"]["training"] = curves
    bar.close()
    return out


def format_table(out: Dict[str, Any]) -> str:
    """Table 1b as text (ours, then the paper's)."""
    f = cell

    head = (f"{'method':<18}{'L':>6}{'log p':>11}{'dlogp':>9}{'dlogp':>9}{'ESS/L':>9}{'':>9}{'':>9}{'radius':>8}"
            f"{'found':>7}\n"
            f"{'':<18}{'':>6}{'':>11}{'RWS':>9}{'LSTM':>9}{'{m,c,a}':>9}{'{m}':>9}{'{c,a}':>9}")
    lines = [head]

    def name(r: Dict[str, Any]) -> str:
        return r["method"] if r["sweeps"] == 1 else f"{r['method']} (K={r['sweeps']})"

    for r in out["rows"]:
        lines.append(f"{name(r):<18}{r['particles']:>6}{f(r['log_joint'], 11, 1)}{f(r['delta_log_joint'], 9, 1)}"
                     f"{f(r.get('delta_log_joint_lstm'), 9, 1)}{f(r['ess']['joint'])}{f(r['ess']['globals'])}"
                     f"{f(r['ess']['locals'])}{f(r['radius'], 8)}{f(r.get('centres_found'), 7, 2)}")
    s = out.get("settings", {})
    lines.append(f"({s.get('test_datasets')} held-out datasets of {s.get('points')} points, seed {s.get('seed')}; "
                 "log p: mean E_w[log p(x, z)] summed over the points; dlogp: minus RWS's, and minus LSTM-RWS's (the "
                 "paper's baseline); ESS/L of the last sweep; "
                 "found: share of datasets whose highest-weight particle has a centre within 0.5 of every true one)")
    if out.get("paper"):
        lines.append("the paper's Table 1b (evaluation L not stated; its dlogp is against its LSTM-RWS row):")
        for r in out["paper"]:
            lines.append(f"{name(r):<18}{'?':>6}{'':>11}{'':>9}{f(r['delta_log_joint'], 9, 1)}{f(r['ess']['joint'])}"
                         f"{f(r['ess']['globals'])}{f(r['ess']['locals'])}")
    ref = out.get("reference", {})
    if ref:
        lines.append("reference: " + ", ".join(f"{k} {v:.2f}" for k, v in ref.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
_COLOURS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]


def _draw(ax, x, state, decoder: Optional[Decoder], title: str, recon: bool = False) -> None:
    import numpy as np

    xs = x.numpy()
    if state is None:
        ax.scatter(xs[:, 0], xs[:, 1], s=4, c="grey")
    else:
        c = state["c"].numpy()
        colours = np.array(_COLOURS)[c % len(_COLOURS)]
        mu = state["mu"]
        if recon:
            assert decoder is not None
            pts = (torch.gather(mu, 0, state["c"].unsqueeze(-1).expand(-1, 2)) + decoder(state["alpha"])).numpy()
            ax.scatter(pts[:, 0], pts[:, 1], s=4, c=colours)
        else:
            ax.scatter(xs[:, 0], xs[:, 1], s=4, c=colours)
        if decoder is not None:
            grid = torch.linspace(-math.pi, math.pi, 200)
            ring = decoder(grid).numpy()
            for i in range(mu.shape[0]):
                m = mu[i].numpy()
                ax.plot(m[0] + ring[:, 0], m[1] + ring[:, 1], color=_COLOURS[i % len(_COLOURS)], lw=0.8)
                ax.plot(m[0], m[1], "x", color="k", ms=4)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title, fontsize=8)


def _best(state: Dict[str, torch.Tensor], log_joint_values: torch.Tensor) -> Dict[str, torch.Tensor]:
    best = int(log_joint_values.argmax())
    return {k: v[best] for k, v in state.items()}


def _fig1b(trained: Dict[str, Tuple[AnyProposals, Decoder]], cfg: EvalConfig, path: str) -> str:
    """Fig. 1b: 5 test datasets of 100-600 points.

    Data, RWS, APG after 3 and 6 sweeps (the particle of highest log joint, with its learned rings), and the
    reconstruction ``mu_c + g_theta(alpha)``.
    """
    plt = pyplot()
    sizes = [100, 200, 300, 400, 600]
    fig, axes = plt.subplots(len(sizes), 5, figsize=(10, 2 * len(sizes)))
    g = torch.Generator().manual_seed(cfg.seed)
    rws_nets, rws_dec = trained["rws"]
    nets, dec = trained["apg"]
    with torch.no_grad():
        for row, n in enumerate(sizes):
            x = simulate(1, nets.cfg, seed=cfg.seed + 1000 + n, num_points=n)["x"]
            _draw(axes[row, 0], x[0], None, None, f"data, N={n}")
            rs = apg_sampler(rws_nets, rws_dec)
            res = run(rs, x, cfg.apg_particles, 1, generator=g)
            st = {k: v[0] for k, v in res.state.items()}
            _draw(axes[row, 1], x[0], _best(st, rs.log_joint(x, res.state)[0]), rws_dec, "RWS")
            sampler = apg_sampler(nets, dec)
            res = run(sampler, x, cfg.apg_particles, 7, record_states=True, scheme=cfg.resampling, generator=g)
            assert res.trajectory is not None
            for col, k in ((2, 3), (3, 6)):
                state = res.trajectory[k]
                best = _best({kk: v[0] for kk, v in state.items()}, sampler.log_joint(x, state)[0])
                _draw(axes[row, col], x[0], best, dec, f"APG, {k} sweeps")
            _draw(axes[row, 4], x[0], best, dec, "reconstruction", recon=True)
    return save_figure(fig, path)


def _training_curves(metrics: Dict[str, Optional[str]], path: str) -> Optional[str]:
    """Training curves (log joint, ESS/L per block, learned radius) from the runs' metrics CSVs."""

    def draw(axes: Any, m: str, it: List[int], col: Callable[[str], List[float]]) -> None:
        label = METHOD_NAMES.get(m, m)
        axes[0].plot(it, col("log_joint"), label=label)
        if m in ("apg", "apg-paper"):
            axes[1].plot(it, col("ess_mu"), label=f"{label} {{mu}}")
            axes[1].plot(it, col("ess_local"), label=f"{label} {{c, alpha}}")
        axes[1].plot(it, col("ess_init"), label=f"{label} one-shot")
        axes[2].plot(it, col("radius"), label=label)

    return training_curves(metrics, path, ["E_w log p(x, z) (training batch)", "ESS / L (training batch)",
                                           "learned radius"], (13, 3.6), draw)

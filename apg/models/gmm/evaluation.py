"""Evaluation of trained GMM proposals: Table 1a, Fig. 1a and Fig. 2 of the APG paper (Wu et al., ICML 2020).

Table 1a columns, per method, on held-out datasets simulated with ``seed``:

* ``delta_log_joint``: mean over datasets of ``E_w[log p(x, z)]`` (the
  self-normalised average over the final particles) minus the RWS-MLP row's.
* ESS/L (eq. 11) of the last sweep: ``joint`` for ``{tau, mu, c}`` updated as one
  block (`apg.sampler.joint_block`, one resampling per sweep; for RWS the
  one-shot weights), ``globals`` for the ``{tau, mu}`` block and
  ``assignments`` for ``{c}`` in the blocked sampler.
* ``kl``: the inclusive KL of eq. 4 between the exact conditionals and the
  learned kernels at the final particles (`apg.models.gmm.inclusive_kl`).

All randomness comes from generators seeded with ``seed``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from tmcgraph.plots import pyplot

from ...errors import APGError
from ...sampler import joint_block, run
from ..common import cell, chunks, metrics_columns, save_figure, standard_error
from .algebra import GMMConfig, gibbs, log_joint, simulate
from .model import apg_sampler, inclusive_kl
from .networks import GMMProposals

__all__ = ["EvalConfig", "METHOD_NAMES", "evaluate_gmm", "format_table"]

METHOD_NAMES = {"rws-mlp": "RWS-MLP", "rws-lstm": "RWS-LSTM", "apg": "APG", "apg-features": "APG-features"}

#: Table 1a of Wu et al. (ICML 2020) as printed: dlogp, ESS/L {t,m,c}, {t,m}, {c}, KL {t,m}, {c}
#: (the paper does not state its evaluation L; its KL {c} fits a per-point value, see the reproducing docs)
PAPER_TABLE_1A = [
    {"method": "MLP-RWS", "sweeps": 1, "delta_log_joint": None, "ess": {"joint": 0.001, "globals": None,
     "assignments": None}, "kl": {"globals": None, "assignments": None}},
    {"method": "LSTM-RWS", "sweeps": 1, "delta_log_joint": 202.2, "ess": {"joint": 0.104, "globals": None,
     "assignments": None}, "kl": {"globals": None, "assignments": None}},
    {"method": "APG", "sweeps": 5, "delta_log_joint": 198.5, "ess": {"joint": 0.261, "globals": 0.980,
     "assignments": 0.631}, "kl": {"globals": 0.005, "assignments": 0.005}},
    {"method": "APG", "sweeps": 10, "delta_log_joint": 211.9, "ess": {"joint": 0.398, "globals": 0.981,
     "assignments": 0.760}, "kl": {"globals": 0.004, "assignments": 0.004}},
    {"method": "APG", "sweeps": 15, "delta_log_joint": 215.2, "ess": {"joint": 0.416, "globals": 0.983,
     "assignments": 0.780}, "kl": {"globals": 0.003, "assignments": 0.004}},
]


@dataclass(frozen=True)
class EvalConfig:
    """Settings of an evaluation (defaults: 100 test datasets, APG L=100, RWS L=1000)."""

    num_datasets: int = 100
    seed: int = 12345
    apg_particles: int = 100
    rws_particles: int = 1000
    sweeps: Sequence[int] = (5, 10, 15)
    budget: int = 1000
    budget_sweeps: Sequence[int] = (1, 2, 5, 10, 20, 50, 100)
    budget_runs: int = 10
    budget_datasets: int = 5
    chunk: int = 20000  # datasets x particles per batched call (bounds memory)
    nu0: Optional[float] = None  # the prior's nu0 for the test data and the model (None: the networks')
    resampling: str = "systematic"  # the scheme before every block update (apg.resampling.SCHEMES)
    budget_blocks: Sequence[str] = ("blocked",)  # Fig. 2's samplers: "blocked" (per block), "joint" (per sweep)
    # the convergence comparison, with L = apg_particles (the official code's settings: L = 100, 30 sweeps,
    # 3 runs on 1 dataset, HMC step 0.1 with 1, 5 and 10 leapfrog steps, BPG with 100 times the particles)
    convergence_sweeps: int = 30
    convergence_runs: int = 3
    convergence_datasets: int = 1
    hmc_step_size: float = 0.1
    hmc_leapfrog: Sequence[int] = (1, 5, 10)
    bpg_factor: int = 100


def _rws_row(nets: GMMProposals, x: torch.Tensor, L: int, chunk: int,
             generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """The one-shot columns: log joint and ESS/L of the importance weights (no resampling)."""
    sampler = apg_sampler(nets)
    lj, ess = [], []
    for s in chunks(x.shape[0], max(1, chunk // L)):
        res = run(sampler, x[s], L, 1, record_log_joint=True, generator=generator)
        lj.append(res.sweeps[-1].mean_log_joint())
        ess.append(res.sweeps[0].ess["init"])
    return {"log_joint": torch.cat(lj), "joint": torch.cat(ess)}


def _apg_row(nets: GMMProposals, x: torch.Tensor, L: int, K: int, chunk: int, scheme: str,
             generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """The APG columns at K sweeps: last-sweep log joint, ESS/L per block and joint, KL per block."""
    sampler = apg_sampler(nets)
    joint = [joint_block(sampler.blocks, sampler.log_joint)]
    out: Dict[str, List[torch.Tensor]] = {k: [] for k in ("log_joint", "globals", "assignments", "joint",
                                                           "kl_globals", "kl_assignments")}
    for s in chunks(x.shape[0], max(1, chunk // L)):
        res = run(sampler, x[s], L, K, record_log_joint=True, scheme=scheme, generator=generator)
        last = res.sweeps[-1]
        out["log_joint"].append(last.mean_log_joint())
        out["globals"].append(last.ess["globals"])
        out["assignments"].append(last.ess["assignments"])
        kl = inclusive_kl(nets, x[s], res.state, res.log_weights)
        out["kl_globals"].append(kl["globals"])
        out["kl_assignments"].append(kl["assignments"])
        out["joint"].append(run(sampler, x[s], L, K, blocks=joint, scheme=scheme,
                                generator=generator).sweeps[-1].ess["joint"])
    return {k: torch.cat(v) for k, v in out.items()}


def _mean(t: Optional[torch.Tensor]) -> Optional[float]:
    return None if t is None else float(f"{float(t.mean()):.5g}")


def evaluate_gmm(nets: Dict[str, GMMProposals], cfg: EvalConfig = EvalConfig(), plots: Optional[str] = None,
                 metrics: Optional[Dict[str, Optional[str]]] = None, progress: bool = False) -> Dict[str, Any]:
    """Table 1a on held-out datasets (and the figures when ``plots`` names a directory).

    Args:
        nets: method (``"rws-mlp"``, ``"rws-lstm"``, ``"apg"``) -> trained proposals.
        cfg: the evaluation settings.
        plots: directory for ``fig1a.png``, ``fig2.png`` (and ``training.png``).
        metrics: method -> training metrics.csv, for the training curves.
        progress: a progress bar on stderr (one step per table row, reference and figure).

    Returns:
        ``{"rows": [{"method", "sweeps", "particles", "log_joint", "delta_log_joint",
        "ess": {"joint", "globals", "assignments"}, "kl": {"globals", "assignments"}}, ...],
        "settings": {...}}``; ``None`` where a column does not apply.
    """
    from tqdm.auto import tqdm

    model = nets["apg"].cfg if cfg.nu0 is None else dataclasses.replace(nets["apg"].cfg, nu0=cfg.nu0)
    nets = {m: _with_model(n, model) for m, n in nets.items()}
    x = simulate(cfg.num_datasets, model, seed=cfg.seed)["x"]
    g = torch.Generator().manual_seed(cfg.seed)
    apg_methods = [m for m in ("apg", "apg-features") if m in nets]
    bar = tqdm(total=2 + len(apg_methods) * len(cfg.sweeps) + 1 + (3 if plots is not None else 0),
               disable=not progress, desc="evaluate gmm", unit="step")
    rows: List[Dict[str, Any]] = []
    with torch.no_grad():
        base = None
        for m in ("rws-mlp", "rws-lstm"):
            r = _rws_row(nets[m], x, cfg.rws_particles, cfg.chunk, g)
            bar.update(1)
            if base is None:
                base = r["log_joint"]
            rows.append({"method": METHOD_NAMES[m], "sweeps": 1, "particles": cfg.rws_particles,
                         "log_joint": _mean(r["log_joint"]),
                         "delta_log_joint": None if m == "rws-mlp" else _mean(r["log_joint"] - base),
                         "ess": {"joint": _mean(r["joint"]), "globals": None, "assignments": None},
                         "kl": {"globals": None, "assignments": None},
                         "kl_per_point": {"globals": None, "assignments": None},
                         "se": {"log_joint": standard_error(r["log_joint"]),
                                "ess": {"joint": standard_error(r["joint"])}}})
        assert base is not None
        # KL summed over the block's elements (as the official code sums it), and per element: per
        # cluster-dimension for {t,m}, per point for {c} (the paper's KL {c} is evidently per point)
        elements = {"globals": model.num_clusters * model.dim, "assignments": x.shape[-2]}
        for m in apg_methods:
            for K in cfg.sweeps:
                r = _apg_row(nets[m], x, cfg.apg_particles, K, cfg.chunk, cfg.resampling, g)
                bar.update(1)
                rows.append({"method": METHOD_NAMES[m], "sweeps": K, "particles": cfg.apg_particles,
                             "log_joint": _mean(r["log_joint"]), "delta_log_joint": _mean(r["log_joint"] - base),
                             "ess": {"joint": _mean(r["joint"]), "globals": _mean(r["globals"]),
                                     "assignments": _mean(r["assignments"])},
                             "kl": {b: _mean(r[f"kl_{b}"]) for b in elements},
                             "kl_per_point": {b: _mean(r[f"kl_{b}"] / n) for b, n in elements.items()},
                             "se": {"log_joint": standard_error(r["log_joint"]),
                                    "ess": {b: standard_error(r[b]) for b in ("joint", "globals", "assignments")}}})
        # reference points: the exact blocked Gibbs sampler (same L, the largest K) and the simulated truth
        K = max(cfg.sweeps)
        gib = torch.cat([gibbs(x[s], cfg.apg_particles, K, model, generator=g)["log_joint"][-1].mean(-1)
                         for s in chunks(x.shape[0], max(1, cfg.chunk // cfg.apg_particles))])
        truth = simulate(cfg.num_datasets, model, seed=cfg.seed)
        true_lj = log_joint(truth["x"], truth["mu"], truth["tau"], truth["c"], model)
        bar.update(1)
    out: Dict[str, Any] = {"rows": rows, "reference": {
        f"gibbs_log_joint_K{K}": _mean(gib), "true_latents_log_joint": _mean(true_lj),
        "rws_mlp_log_joint": _mean(base)}, "settings": {
        "test_datasets": cfg.num_datasets, "seed": cfg.seed, "apg_particles": cfg.apg_particles,
        "rws_particles": cfg.rws_particles, "nu0": model.nu0, "resampling": cfg.resampling,
        "threads": torch.get_num_threads()}, "paper": PAPER_TABLE_1A}
    if plots is not None:
        os.makedirs(plots, exist_ok=True)
        fig2, fig2_data = _fig2(nets["apg"], cfg, os.path.join(plots, "fig2.png"))
        bar.update(1)
        out["figures"] = {"fig1a": _fig1a(nets, cfg, os.path.join(plots, "fig1a.png")), "fig2": fig2}
        bar.update(1)
        out["fig2"] = fig2_data
        out["figures"]["convergence"], out["convergence"] = _convergence(nets["apg"], cfg,
                                                                         os.path.join(plots, "convergence.png"))
        bar.update(1)
        curves = _training_curves(metrics or {}, os.path.join(plots, "training.png"))
        if curves is not None:
            out["figures"]["training"] = curves
    bar.close()
    return out


def _with_model(nets: GMMProposals, model: GMMConfig) -> GMMProposals:
    """The same networks conditioned on ``model``'s prior (their conjugate updates start from it)."""
    if nets.cfg == model:
        return nets
    if (nets.cfg.num_clusters, nets.cfg.dim) != (model.num_clusters, model.dim):
        raise APGError(f"networks for {nets.cfg.num_clusters} clusters in {nets.cfg.dim} dims cannot serve "
                       f"a model with {model.num_clusters} in {model.dim}")
    copy = GMMProposals(model, nets.encoder, nets.globals is not None, features=nets.features)
    copy.load_state_dict(nets.state_dict())
    return copy


def format_table(out: Dict[str, Any]) -> str:
    """Table 1a as text (ours, then the paper's)."""
    f = cell

    head = (f"{'method':<22}{'L':>6}{'dlogp':>9}{'ESS/L':>9}{'':>9}{'':>9}{'KL (sum)':>9}{'':>9}"
            f"{'KL/point':>10}{'':>9}\n"
            f"{'':<22}{'':>6}{'':>9}{'{t,m,c}':>9}{'{t,m}':>9}{'{c}':>9}{'{t,m}':>9}{'{c}':>9}{'{t,m}':>10}{'{c}':>9}")
    lines = [head]

    def name(r: Dict[str, Any]) -> str:
        return r["method"] if r["sweeps"] == 1 else f"{r['method']} (K={r['sweeps']})"

    for r in out["rows"]:
        per = r.get("kl_per_point", {"globals": None, "assignments": None})
        lines.append(f"{name(r):<22}{r['particles']:>6}{f(r['delta_log_joint'], 9, 1)}{f(r['ess']['joint'])}"
                     f"{f(r['ess']['globals'])}{f(r['ess']['assignments'])}{f(r['kl']['globals'])}"
                     f"{f(r['kl']['assignments'])}{f(per['globals'], 10)}{f(per['assignments'])}")
    s = out.get("settings", {})
    lines.append(f"({s.get('test_datasets')} held-out datasets, seed {s.get('seed')}, nu0 {s.get('nu0')}; dlogp: "
                 "mean log joint minus RWS-MLP's; ESS/L and KL of the last sweep; KL summed over the block and "
                 "per element: per cluster-dim for {t,m}, per point for {c})")
    if out.get("paper"):
        lines.append("the paper's Table 1a (evaluation L not stated; its KL {c} is per point):")
        for r in out["paper"]:
            lines.append(f"{name(r):<22}{'?':>6}{f(r['delta_log_joint'], 9, 1)}{f(r['ess']['joint'])}"
                         f"{f(r['ess']['globals'])}{f(r['ess']['assignments'])}{f(r['kl']['globals'])}"
                         f"{f(r['kl']['assignments'])}")
    ref = out.get("reference", {})
    if ref:
        lines.append("reference mean log joints: " + ", ".join(f"{k} {v:.2f}" for k, v in ref.items()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------
def _draw(ax, x, state, best, title):
    import numpy as np

    c = state["c"][best].numpy() if state is not None else None
    xs = x.numpy()
    colours = np.array(["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"])
    ax.scatter(xs[:, 0], xs[:, 1], s=6, c="grey" if c is None else colours[c % len(colours)])
    if state is not None:
        from matplotlib.patches import Ellipse

        mu, tau = state["mu"][best].numpy(), state["tau"][best].numpy()
        for i in range(mu.shape[0]):
            sd = 1 / np.sqrt(tau[i])
            ax.add_patch(Ellipse(mu[i], 4 * sd[0], 4 * sd[1], fill=False, color=colours[i % len(colours)], lw=1.2))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)


def _fig1a(nets, cfg: EvalConfig, path: str) -> str:
    """Fig. 1a: 5 test datasets of different sizes; data, RWS, then APG after 4, 8, 12 sweeps (best particle)."""
    plt = pyplot()
    sizes = [60, 100, 150, 200, 300]
    fig, axes = plt.subplots(len(sizes), 5, figsize=(10, 2 * len(sizes)))
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for row, n in enumerate(sizes):
            x = simulate(1, nets["apg"].cfg, seed=cfg.seed + 1000 + n, num_points=n)["x"]
            _draw(axes[row, 0], x[0], None, None, f"data, N={n}")
            rws = run(apg_sampler(nets["rws-mlp"]), x, cfg.apg_particles, 1, scheme=cfg.resampling, generator=g)
            _draw(axes[row, 1], x[0], {k: v[0] for k, v in rws.state.items()}, int(rws.log_weights[0].argmax()),
                  "RWS")
            res = run(apg_sampler(nets["apg"]), x, cfg.apg_particles, 13, record_states=True, scheme=cfg.resampling,
                      generator=g)
            assert res.trajectory is not None
            for col, k in enumerate((4, 8, 12), start=2):
                st = {kk: v[0] for kk, v in res.trajectory[k].items()}
                lj = log_joint(x[0], st["mu"], st["tau"], st["c"], nets["apg"].cfg)
                _draw(axes[row, col], x[0], st, int(lj.argmax()), f"APG, {k} sweeps")
    return save_figure(fig, path)


def _fig2(nets, cfg: EvalConfig, path: str) -> Tuple[str, Dict[str, Any]]:
    """Fig. 2: fixed budget K * L; mean log joint and ESS/L against K (std over runs of random datasets).

    One line per sampler of ``cfg.budget_blocks``: ``"blocked"`` resamples before each block (the APG
    sampler), ``"joint"`` updates ``{tau, mu, c}`` as one block and resamples once per sweep
    (`apg.sampler.joint_block`); its ESS/L is that of the joint block.
    """
    plt = pyplot()
    Ks = [k for k in cfg.budget_sweeps if cfg.budget // k >= 1]
    sampler = apg_sampler(nets)
    variants = {"blocked": None, "joint": [joint_block(sampler.blocks, sampler.log_joint)]}
    unknown = [b for b in cfg.budget_blocks if b not in variants]
    if unknown:
        raise APGError(f"Fig. 2's samplers are {sorted(variants)}, got {unknown} (--fig2-blocks)")
    ess_blocks = {"blocked": ("globals", "assignments"), "joint": ("joint",)}
    lj = {v: torch.zeros(len(Ks), cfg.budget_runs) for v in cfg.budget_blocks}
    ess = {v: {b: torch.zeros(len(Ks), cfg.budget_runs) for b in ess_blocks[v]} for v in cfg.budget_blocks}
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for r in range(cfg.budget_runs):
            x = simulate(cfg.budget_datasets, nets.cfg, seed=cfg.seed + 50_000 + r)["x"]
            for v in cfg.budget_blocks:
                for i, K in enumerate(Ks):
                    res = run(sampler, x, cfg.budget // K, K, record_log_joint=True, blocks=variants[v],
                              scheme=cfg.resampling, generator=g)
                    lj[v][i, r] = res.sweeps[-1].mean_log_joint().mean()
                    for b in ess[v]:
                        ess[v][b][i, r] = (res.sweeps[-1].ess[b] if K > 1 else res.sweeps[0].ess["init"]).mean()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    names = {"blocked": "", "joint": "joint block, "}
    for v in cfg.budget_blocks:
        series = ((a1, {"log joint": lj[v]}), (a2, ess[v]))
        for ax, curves in series:
            for name, t in curves.items():
                m, sd = t.mean(1).numpy(), t.std(1).numpy()
                ax.plot(Ks, m, marker="o", label=f"{names[v]}{name} (mean)")
                ax.fill_between(Ks, m - sd, m + sd, alpha=0.25)
    for ax, label in ((a1, "log p(x, z)"), (a2, "ESS / L")):
        ax.set_xscale("log")
        ax.set_xlabel(f"sweeps K (L = {cfg.budget} / K)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="best", title=f"shading: +-1 sd over {cfg.budget_runs} runs", title_fontsize=7)
    fig.suptitle(f"APG on the GMM, fixed budget K * L = {cfg.budget}", fontsize=10)
    save_figure(fig, path)
    data: Dict[str, Any] = {"sweeps": Ks, "budget": cfg.budget, "runs": cfg.budget_runs,
                            "datasets_per_run": cfg.budget_datasets}
    for v in cfg.budget_blocks:
        data[v] = {"log_joint_mean": [round(float(t), 2) for t in lj[v].mean(1)],
                   "log_joint_sd": [round(float(t), 2) for t in lj[v].std(1)],
                   **{f"ess_{b}_mean": [round(float(t), 3) for t in e.mean(1)] for b, e in ess[v].items()}}
    return path, data


def _convergence(nets: GMMProposals, cfg: EvalConfig, path: str) -> Tuple[str, Dict[str, Any]]:
    """The convergence comparison: mean log joint against sweeps for APG, BPG, Gibbs and HMC-RWS.

    Every sampler starts from the APG networks' one-shot proposal; ``convergence_runs`` runs (random streams) on
    the same ``convergence_datasets`` test datasets (as the official code: one dataset, three runs); the shading
    is the sd over runs of the datasets' mean. APG and BPG report the self-normalised mean over their particles
    (at sweep 1: the importance-weighted one-shot), the chains the plain mean.
    """
    from .baselines import bpg_sampler, gibbs_chains, hmc_chains

    plt = pyplot()
    K, L = cfg.convergence_sweeps, cfg.apg_particles
    if K < 2:
        raise APGError(f"the convergence figure needs at least 2 sweeps, got {K} (--convergence-sweeps)")
    curves: Dict[str, List[torch.Tensor]] = {}  # sampler -> per run, (K,) mean log joint over the datasets
    acceptance: Dict[str, List[float]] = {}

    def add(name: str, per_sweep: torch.Tensor) -> None:  # (K, datasets)
        curves.setdefault(name, []).append(per_sweep.mean(-1))

    sampler, bpg = apg_sampler(nets), bpg_sampler(nets)
    x = simulate(cfg.convergence_datasets, nets.cfg, seed=cfg.seed + 70_000)["x"]
    with torch.no_grad():
        for r in range(cfg.convergence_runs):
            g = torch.Generator().manual_seed(cfg.seed + r)
            for label, s, n in ((f"APG (L={L})", sampler, L), (f"BPG (L={L * cfg.bpg_factor})", bpg,
                                                                  L * cfg.bpg_factor)):
                res = run(s, x, n, K, record_log_joint=True, scheme=cfg.resampling, generator=g)
                add(label, torch.stack([info.mean_log_joint() for info in res.sweeps]))
            start = sampler.init(x, L, g)[0]
            add(f"Gibbs (L={L})", torch.cat([sampler.log_joint(x, start).mean(-1).unsqueeze(0),
                                             gibbs_chains(x, start, K - 1, nets.cfg, generator=g).mean(-1)]))
            for lf in cfg.hmc_leapfrog:
                lj, acc = hmc_chains(x, start, K, nets.cfg, step_size=cfg.hmc_step_size, leapfrog=lf, generator=g)
                label = f"HMC-RWS (L={L}, LF={lf})"
                add(label, lj.mean(-1))
                acceptance.setdefault(label, []).append(float(acc.mean()))
    stacked = {k: torch.stack(v, 1) for k, v in curves.items()}  # (K, runs)
    fig, ax = plt.subplots(figsize=(7, 4))
    sweeps = list(range(1, K + 1))
    for name, t in stacked.items():
        m, sd = t.mean(1).numpy(), t.std(1).numpy() if t.shape[1] > 1 else 0 * t.mean(1).numpy()
        ax.plot(sweeps, m, label=name)
        ax.fill_between(sweeps, m - sd, m + sd, alpha=0.2)
    ax.set_xlabel("sweeps (1: the one-shot proposal)")
    ax.set_ylabel("log p(x, z), mean over particles and datasets")
    ax.set_title(f"GMM: convergence from the one-shot proposal ({cfg.convergence_runs} runs on "
                 f"{cfg.convergence_datasets} test dataset{'s' if cfg.convergence_datasets > 1 else ''})",
                 fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)
    data = {"sweeps": K, "runs": cfg.convergence_runs, "datasets_per_run": cfg.convergence_datasets,
            "hmc_step_size": cfg.hmc_step_size,
            "log_joint_mean": {k: [round(float(v), 2) for v in t.mean(1)] for k, t in stacked.items()},
            "log_joint_sd_over_runs": {k: [round(float(v), 2) for v in t.std(1)] for k, t in stacked.items()},
            "hmc_acceptance": {k: round(sum(v) / len(v), 3) for k, v in acceptance.items()}}
    return path, data


def _training_curves(metrics: Dict[str, Optional[str]], path: str) -> Optional[str]:
    """Training curves (ESS/L and inclusive KL per block against iteration) from the runs' metrics CSVs."""
    runs = {m: p for m, p in metrics.items() if p is not None}
    runs = dict(sorted(runs.items(), key=lambda kv: kv[0] == "apg-features"))  # APG before APG-features
    last_apg_iteration = 0
    if not runs:
        return None
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m, p in runs.items():
        it, col = metrics_columns(p)
        if m == "apg-features":  # it starts from the trained APG: drawn after APG's last iteration
            offset = last_apg_iteration
            a1.plot([offset + i for i in it], col("ess_assignments"), label="APG-features {c} (from APG's end)")
            a2.plot([offset + i for i in it], col("kl_assignments"), label="APG-features {c} (from APG's end)")
        elif m == "apg":
            a1.plot(it, col("ess_globals"), label="APG {tau, mu}")
            a1.plot(it, col("ess_assignments"), label="APG {c}")
            a2.plot(it, col("kl_globals"), label="APG {tau, mu}")
            a2.plot(it, col("kl_assignments"), label="APG {c}")
            last_apg_iteration = it[-1] if it else 0
        else:
            a1.plot(it, col("ess_init"), label=f"{METHOD_NAMES[m]} one-shot")
    a1.set_ylabel("ESS / L (training batch)")
    a2.set_ylabel("inclusive KL (training batch)")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    return save_figure(fig, path)

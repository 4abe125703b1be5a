"""Figures of the ``tmcgraph`` experiments (matplotlib, ``pip install -e ".[plots]"``).

Each function takes the JSON-able results of an experiment and writes one PNG.
"""

from __future__ import annotations

from typing import Any, Dict, List

__all__ = ["plot_dregs", "plot_gaussian", "plot_sweep", "pyplot"]


def pyplot() -> Any:
    """Matplotlib's pyplot on the file-only Agg backend (``pip install -e ".[plots]"``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(rows: List[Dict[str, Any]], path: str) -> None:
    """Appendix H: error and time against tree-width, one point per random graph."""
    plt = pyplot()

    # every point is a different random graph (one edge probability p): points, not lines
    fig, (ax_err, ax_time) = plt.subplots(1, 2, figsize=(9, 3.8))
    tw = [r["treewidth"] for r in rows]
    for key, label, marker in (("tmc", f"TMC K={rows[0]['K']}", "o"),
                               ("iwae", f"IWAE {rows[0]['iwae_samples']} samples", "s")):
        colour = "tab:blue" if key == "tmc" else "tab:red"
        pts = [(t, abs(r[key] - r["exact"]), r[key + "_seconds"], r["p"]) for t, r in zip(tw, rows)
               if r[key] is not None]
        ax_err.plot([p[0] for p in pts], [max(p[1], 1e-3) for p in pts], marker, color=colour, label=label,
                    linestyle="none")
        ax_time.plot([p[0] for p in pts], [p[2] for p in pts], marker, color=colour, label=label, linestyle="none")
        if key == "tmc":
            for t, err, _, p in pts:
                ax_err.annotate(f"p={p:g}", (t, max(err, 1e-3)), fontsize=6, xytext=(3, 3),
                                textcoords="offset points")
    ax_err.set(xlabel="tree-width of the random graph", ylabel="|log p(x) estimate - exact| (nats)", yscale="log",
               title=f"error (N={rows[0]['N']}, one graph per edge probability p)")
    ax_time.set(xlabel="tree-width of the random graph", ylabel="seconds", yscale="log", title="time")
    handles, labels = ax_err.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)


def plot_gaussian(out: Dict[str, Any], path: str) -> None:
    """Fig. 7: estimates and times against K (N fixed) and against N (K fixed)."""
    plt = pyplot()

    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    for col, (key, x, per_point) in enumerate((("vs_K", "K", False), ("vs_N", "N", True))):
        rows = out[key]
        xs = [r[x] for r in rows]
        colours = {"exact": "black", "tmc": "tab:blue", "smc": "tab:green", "iwae": "tab:red"}
        for name in ("exact", "tmc", "smc", "iwae"):
            ys = [r[name] / (r["N"] if per_point else 1) for r in rows]
            axes[0, col].plot(xs, ys, "o-" if name != "exact" else "--", color=colours[name],
                              label="ground truth (Kalman)" if name == "exact" else name.upper())
            if name != "exact":
                axes[1, col].plot(xs, [r[name + "_seconds"] for r in rows], "o-", color=colours[name],
                                  label=name.upper())
        fixed = f"N = {rows[0]['N']} fixed" if key == "vs_K" else f"K = {rows[0]['K']} fixed"
        axes[0, col].set(xscale="log", xlabel=x, ylabel="log p(x)" + (" / N" if per_point else ""),
                         title=f"estimate against {x} ({fixed})")
        axes[1, col].set(xscale="log", yscale="log", xlabel=x, ylabel="seconds (median)",
                         title=f"time against {x} ({fixed})")
    from matplotlib.ticker import ScalarFormatter

    for ax in axes.flat:  # K and N are powers of two: plain numbers on a base-2 axis
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)


_GRADIENT_STYLE = {"reparameterised": ("tab:red", "reparameterised"), "dregs": ("tab:blue", "DReGs (ours)"),
                   "dregs-paper": ("tab:gray", "DReGs, paper's eq. 60 (biased)")}


def plot_dregs(out: Dict[str, Any], path: str) -> None:
    """DReGs: gradient SNR against K per proposal parameter group, and training curves."""
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, latent in zip(axes[:2], ("mu", "z")):
        for name, (colour, label) in _GRADIENT_STYLE.items():
            rows = [r for r in out["snr"] if r["gradient"] == name]
            ks = [r["K"] for r in rows]
            ax.plot(ks, [r["snr"][f"{latent}_loc"] for r in rows], "o-", color=colour, label=f"{label}: mean")
            ax.plot(ks, [r["snr"][f"{latent}_log_scale"] for r in rows], "s--", color=colour, label=f"{label}: log sd",
                    alpha=0.7)
        ax.set(xscale="log", yscale="log", xlabel="K (samples per latent)", ylabel="gradient SNR |E g| / sd(g)",
               title=f"q({latent}) parameters (mean over the group)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax = axes[2]
    for name, curve in out["training"].items():
        colour, label = _GRADIENT_STYLE[name]
        steps = [c["step"] for c in curve]
        ys = [c["log_marginal"] for c in curve]
        se = [2 * c["log_marginal_se"] for c in curve]
        ax.plot(steps, ys, "o-", color=colour, label=label)
        ax.fill_between(steps, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)], color=colour,
                        alpha=0.2)
    ax.axhline(out["exact"], color="black", ls=":", label="exact log p(x)")
    ax.set(xlabel="training step", ylabel=f"E[log P_TMC], K={out['settings']['K']} (band: 2 s.e.)",
           title="proposals trained with each gradient")
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)

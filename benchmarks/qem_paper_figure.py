"""Read the QEM paper's learning curves and per-iteration times out of its figures' vector data.

The QEM paper (Heap, Bowyer and Aitchison, AABI 2025) prints its results as figures only.  Their PDFs are in the
public repository alan-ppl/alan (``examples/QEM_paper_plots/manuscript_plots/``; the curves
``standard_models_summary.pdf`` at commit 4e48cee4455b8fca89df8dde9b3eeda51d0bbf8e, the times
``standard_models_time_per_iter.pdf`` at 09ae599fbdbcdedeb973917dd6817287a531cbfa).  Matplotlib wrote them as
vector paths, so the plotted numbers can be read back exactly (to the PDF's coordinate precision), not by eye:

* **Curves** (ELBO and predictive log-likelihood against iterations, K = 30, COVID K = 10).  Each method's
  standard-error band is a ``fill_between`` polygon of 502 vertices over iterations 0..249, which the
  plotting script (``QEM_paper_plot.py`` at 4e48cee) draws unclipped and unsimplified: its lower edge is
  ``mean - stderr``, its upper edge ``mean + stderr``, where ``mean`` is the average of 5 runs at the
  method's best learning rate (by the ELBO at iteration 125), smoothed by a trailing mean of the previous 8
  iterations.  The data coordinates follow from the axes' frame and the script's axis limits
  (``YLIMS`` below, copied from it; x from 0 to 250); every tick label's magnitude is checked against that
  mapping (the PDF's minus signs are glyphs without text).
* **Times**: each bar's height, mapped through the y tick labels.

Needs pdfminer.six (``pip install pdfminer.six``), which is not a dependency of tmcgraph: the numbers it
reads are shipped in ``benchmarks/results/qem_paper_figure.json``.

Run: python benchmarks/qem_paper_figure.py --curves standard_models_summary.pdf \
        --times standard_models_time_per_iter.pdf --json benchmarks/results/qem_paper_figure.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Dict, List, Sequence, Tuple

#: the panels' columns, left to right, and the K each plots
MODELS = ("bus_breakdown", "movielens", "occupancy", "radon", "covid")
KS = {"bus_breakdown": 30, "movielens": 30, "occupancy": 30, "radon": 30, "covid": 10}
#: the y limits the plotting script sets, per row (ELBO, predictive log-likelihood) and model
YLIMS = {"elbo": {"bus_breakdown": (-500, -400), "movielens": (-1060, -985), "occupancy": (-49300, -49050),
                  "radon": (-290, -276), "covid": (-1400000, -500000)},
         "predictive_ll": {"bus_breakdown": (-500, -425), "movielens": (-965, -943), "occupancy": (-24600, -24550),
                           "radon": (-600, -450), "covid": (-30000000, 2000000)}}
#: the script's colour of each method
COLOURS = {"qem": "#e7298a", "rws": "#1b9e77", "vi": "#d95f02"}
ITERATIONS = 250
TAIL = 50


def _hex(colour) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in colour) if isinstance(colour, tuple) else ""


def _method(colour) -> str:
    return {v: k for k, v in COLOURS.items()}.get(_hex(colour), "")


def _frames(page) -> List:
    """The axes' frames (white rectangles smaller than the page), top row first, left to right."""
    from pdfminer.layout import LTRect

    rects = [o for o in page if isinstance(o, LTRect) and o.fill and 50 < o.width < page.width / 2]
    return sorted(rects, key=lambda r: (-round(r.y0), r.x0))


def _drawn_in(page, frames) -> List[List]:
    """Per frame, the objects drawn after it and before the next axes' frame (matplotlib draws axes one by one)."""
    items = list(page)
    starts = sorted(items.index(f) for f in frames)
    by_start = {i: [] for i in starts}
    for i, o in enumerate(items):
        owner = max((s for s in starts if s < i), default=None)
        if owner is not None:
            by_start[owner].append(o)
    return [by_start[items.index(f)] for f in frames]


def _tick_labels(page, frame) -> List[Tuple[float, float]]:
    """``(y centre, |value|)`` of the numeric labels just left of ``frame``."""
    from pdfminer.layout import LTTextContainer

    out = []
    for o in page:
        if isinstance(o, LTTextContainer) and frame.x0 - 40 < o.x1 <= frame.x0 + 1 and \
                frame.y0 - 8 < (o.y0 + o.y1) / 2 < frame.y1 + 8:
            try:
                out.append(((o.y0 + o.y1) / 2, abs(float(o.get_text().strip()))))
            except ValueError:
                pass
    return out


def read_curves(path: str) -> Dict:
    """Per model, metric and method: the plotted mean and standard error at every iteration 0..249."""
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LTCurve, LTRect

    page = next(iter(extract_pages(path)))
    frames = _frames(page)
    if len(frames) != 2 * len(MODELS):
        raise SystemExit(f"{path}: expected {2 * len(MODELS)} axes, found {len(frames)}")
    drawn = _drawn_in(page, frames)
    out: Dict = {}
    for row, metric in enumerate(("elbo", "predictive_ll")):
        for col, model in enumerate(MODELS):
            frame = frames[row * len(MODELS) + col]
            lo, hi = YLIMS[metric][model]

            def to_data(y, frame=frame, lo=lo, hi=hi):
                return lo + (y - frame.y0) / frame.height * (hi - lo)

            tolerance = 5 / frame.height * (hi - lo)  # 5 points: a label's centre sits near, not on, its tick
            labels = _tick_labels(page, frame)
            exponent = 1e6 if model == "covid" and metric == "elbo" else 1e7 if model == "covid" else 1.0
            for y, value in labels:  # the labels' magnitudes confirm the axis mapping
                if abs(abs(to_data(y)) - value * exponent) > tolerance:
                    raise SystemExit(f"{path}: {model} {metric}: tick label {value} at y={y:.1f} maps to "
                                     f"{to_data(y):.2f}; the axis limits {YLIMS[metric][model]} do not fit")
            if len(labels) < 3:
                raise SystemExit(f"{path}: {model} {metric}: found {len(labels)} tick labels to check the axis by")
            bands = [o for o in drawn[row * len(MODELS) + col] if isinstance(o, LTCurve) and not isinstance(o, LTRect)
                     and o.fill and _method(o.non_stroking_color) and len(o.pts) == 2 * ITERATIONS + 2]
            if not bands:
                raise SystemExit(f"{path}: {model} {metric}: no standard-error bands found")
            for band in bands:
                pts = band.pts
                lower = [to_data(y) for _, y in pts[1:ITERATIONS + 1]]
                upper = [to_data(pts[2 * ITERATIONS + 1 - i][1]) for i in range(ITERATIONS)]
                xs = [x for x, _ in pts[1:ITERATIONS + 1]]
                step = (xs[-1] - xs[0]) / (ITERATIONS - 1)
                if abs(step * ITERATIONS - frame.width) > 0.5 or any(abs(pts[2 * ITERATIONS + 1 - i][0] - x) > 1e-3
                                                                      for i, x in enumerate(xs)):
                    raise SystemExit(f"{path}: {model} {metric}: a band is not 250 iterations across the axes")
                mean = [(a + b) / 2 for a, b in zip(lower, upper)]
                stderr = [(b - a) / 2 for a, b in zip(lower, upper)]
                out.setdefault(model, {"K": KS[model]}).setdefault(metric, {})[_method(band.non_stroking_color)] = {
                    "final": mean[-1], "final_stderr": stderr[-1],
                    f"mean_last_{TAIL}": statistics.fmean(mean[-TAIL:]),
                    "curve": [round(v, 3) for v in mean], "stderr": [round(v, 3) for v in stderr]}
    return out


def read_times(path: str) -> Dict:
    """Per model, method and K: the bar's height, the average seconds per iteration."""
    from pdfminer.high_level import extract_pages
    from pdfminer.layout import LTRect, LTTextContainer

    page = next(iter(extract_pages(path)))
    frames = _frames(page)
    if len(frames) != len(MODELS):
        raise SystemExit(f"{path}: expected {len(MODELS)} axes, found {len(frames)}")
    out: Dict = {}
    for model, frame, drawn in zip(MODELS, frames, _drawn_in(page, frames)):
        labels = sorted(_tick_labels(page, frame))
        if len(labels) < 3:
            raise SystemExit(f"{path}: {model}: found {len(labels)} tick labels")
        (y0, v0), (y1, v1) = labels[0], labels[-1]
        per_point = (v1 - v0) / (y1 - y0)
        if v0 != 0:
            raise SystemExit(f"{path}: {model}: the bars' axis does not start at 0")
        for y, v in labels:
            if abs(v0 + (y - y0) * per_point - v) > 1e-3 * v1:
                raise SystemExit(f"{path}: {model}: the tick labels are not evenly spaced")
        ks = sorted(int(o.get_text().split()[0]) for o in page if isinstance(o, LTTextContainer)  # "10\nK": a
                    and frame.x0 < (o.x0 + o.x1) / 2 < frame.x1 and frame.y0 - 25 < o.y1 <= frame.y0  # K tick and
                    and o.get_text().split()[0].isdigit())                                          # the axis title
        bars = [o for o in drawn if isinstance(o, LTRect) and o.fill and _method(o.non_stroking_color)
                and abs(o.y0 - frame.y0) < 1]  # standing on the axis: not the legend's patches
        for method in COLOURS:
            mine = sorted((b for b in bars if _method(b.non_stroking_color) == method), key=lambda b: b.x0)
            if not mine:
                continue
            if len(mine) != len(ks):
                raise SystemExit(f"{path}: {model}: {len(mine)} {method} bars for Ks {ks}")
            out.setdefault(model, {})[method] = {str(k): b.height * per_point for k, b in zip(ks, mine)}
    return out


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--curves", required=True, help="standard_models_summary.pdf")
    parser.add_argument("--times", default=None, help="standard_models_time_per_iter.pdf")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(list(argv) or None)
    try:
        import pdfminer  # noqa: F401
    except ImportError:
        raise SystemExit("this script reads PDFs with pdfminer.six: pip install pdfminer.six") from None
    curves = read_curves(args.curves)
    print(f"the QEM paper's curves (mean of 5 runs, smoothed over 8 iterations): value at iteration "
          f"{ITERATIONS - 1} +- its standard error; mean of the last {TAIL} iterations")
    for model, rows in curves.items():
        for metric in ("elbo", "predictive_ll"):
            for method, c in rows.get(metric, {}).items():
                print(f"  {model:<14s} K={rows['K']:<3d} {metric:<14s} {method:<4s} {c['final']:14.2f} "
                      f"+- {c['final_stderr']:8.2f}   {c[f'mean_last_{TAIL}']:14.2f}")
    times = read_times(args.times) if args.times else {}
    for model, rows in times.items():
        print(f"  {model:<14s} seconds per iteration: " + "; ".join(
            f"{m} " + ", ".join(f"K={k} {v:.4f}" for k, v in ks.items()) for m, ks in rows.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"source": "alan-ppl/alan examples/QEM_paper_plots/manuscript_plots",
                       "curves_pdf": "standard_models_summary.pdf @ 4e48cee4455b8fca89df8dde9b3eeda51d0bbf8e",
                       "times_pdf": "standard_models_time_per_iter.pdf @ 09ae599fbdbcdedeb973917dd6817287a531cbfa",
                       "curves": curves, "seconds_per_iteration": times}, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

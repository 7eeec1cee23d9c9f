"""Accuracy against eps: one panel per (dataset, model), one line per mechanism and horizon, mean +- std over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dpbench.style import mech_colour, mech_marker, save_png_and_svg  # noqa: E402
from dpbench.tables import DATASET_TITLES, horizon_label, load_published, shown_configurations, summarize  # noqa: E402,E501

#: Markers of published reference points, one per model family.
PUBLISHED_MARKERS = ("*", "P", "X", "D", "^", "v", "s", "h")


def _best_per_eps(rows: pd.DataFrame) -> pd.DataFrame:
    return shown_configurations(rows, ["eps_target"]).sort_values("eps_target")


def _log_ticks(ours: list[float], others: list[float]) -> list[float]:
    """Our eps values, then published ones not within 15 % of a tick already kept (labels would overlap)."""
    kept: list[float] = []
    for t in sorted(set(ours)) + sorted(set(others) - set(ours)):
        if t > 0 and all(abs(math.log(t / k)) > 0.15 for k in kept):
            kept.append(t)
    return sorted(kept)


def _segments(rows: pd.DataFrame) -> list[pd.DataFrame]:
    """Runs of consecutive eps points with the same horizon: only those are joined by a line."""
    breaks = (rows["horizon"] != rows["horizon"].shift()).cumsum()
    return [part for _, part in rows.groupby(breaks, sort=False)]


def plot_results(df: pd.DataFrame, *, published: pd.DataFrame | None = None, log_eps: bool = False,
                 title: str | None = None) -> plt.Figure:
    """Build the figure (also used by tests, which inspect its artists).

    Each mechanism keeps its colour and marker (:mod:`dpbench.style`). A line joins points of the same
    horizon only; a mean over several seeds is a filled marker with a +- std bar, a single-seed point an
    open marker; the points of a mechanism that ran at several horizons name theirs. Panel titles give the
    model, the horizon and the seed counts.
    """
    summary = summarize(df)
    summary["horizon"] = [horizon_label(e, t) for e, t in zip(summary["epochs"], summary["steps"])]
    panels = list(summary[["dataset", "model"]].drop_duplicates().itertuples(index=False, name=None))
    private = summary["eps_target"].map(math.isfinite)  # eps = inf rows are the non-private control
    mechs = sorted(summary.loc[private, "mech"].unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 0.5, 3.9), squeeze=False)
    handles: dict[str, object] = {}
    family_markers: dict[str, str] = {}
    for ax, (dataset, model) in zip(axes[0], panels):
        part = summary[(summary["dataset"] == dataset) & (summary["model"] == model)]
        finite = part["eps_target"].map(math.isfinite)
        best = {m: _best_per_eps(part[(part["mech"] == m) & finite]) for m in mechs}
        shown = pd.concat([*best.values(), part[~finite]])
        mixed_horizons = shown["horizon"].nunique() > 1
        for mech in mechs:
            # one mechanism at several horizons keeps one colour and marker: each point then names its horizon
            own_horizons = best[mech]["horizon"].nunique() > 1
            for seg in _segments(best[mech]):
                if own_horizons:
                    for x, y in zip(seg["eps_target"], 100 * seg["mean"]):
                        ax.annotate(seg["horizon"].iloc[0], (x, y), xytext=(6, -3), textcoords="offset points",
                                    fontsize=7, color=mech_colour(mech))
                label = mech + (f" ({seg['horizon'].iloc[0]})" if mixed_horizons else "")
                h = ax.errorbar(seg["eps_target"], 100 * seg["mean"], yerr=100 * seg["std"],
                                marker=mech_marker(mech), ms=5, capsize=3, lw=1.5, color=mech_colour(mech), label=label)
                handles.setdefault(label, h)
                single = seg[seg["n"] == 1]
                if len(single):  # drawn over the filled marker: a single-seed point is open
                    ax.scatter(single["eps_target"], 100 * single["mean"], marker=mech_marker(mech), s=30, zorder=4,
                               facecolors="white", edgecolors=mech_colour(mech), linewidths=1.2)
        control = part[~finite]
        if not control.empty:
            top = shown_configurations(control, ["dataset"]).iloc[-1]
            label = f"non-private (eps = inf), {top['horizon']}, {int(top['n'])} seed{'s' if top['n'] > 1 else ''}"
            h = ax.axhline(100 * top["mean"], color=mech_colour("nonprivate"), ls="--", lw=1, label=label)
            handles.setdefault(label, h)
        pub_eps: list[float] = []
        if published is not None:
            pub = published[(published["dataset"] == dataset) & published["eps"].map(math.isfinite)]
            pub_eps = list(pub["eps"])
            for (mech, family), rows in pub.groupby(["mech", "model_family"]):
                label = f"published: {mech}, {family}"
                # colour = mechanism, marker = model family, so two sources of one mechanism stay apart
                marker = family_markers.setdefault(family, PUBLISHED_MARKERS[len(family_markers) % len(PUBLISHED_MARKERS)])
                h = ax.scatter(rows["eps"], 100 * rows["test_acc"], marker=marker, s=60, zorder=5,
                               color=mech_colour(mech), edgecolors="black", linewidths=0.5, label=label)
                handles.setdefault(label, h)
        counts = sorted(int(n) for n in shown["n"].unique())
        seeds = f"{counts[0]} seed{'s' if counts[0] > 1 else ''}" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} seeds"
        if len(counts) > 1 and counts[0] == 1:
            seeds += " (open marker: 1 seed)"
        horizons = shown["horizon"].iloc[0] if not mixed_horizons else "horizon per mechanism (legend)"
        spread = ", mean ± std" if counts[-1] > 1 else ""
        ax.set_title(f"{DATASET_TITLES.get(dataset, dataset)}, {model}\n{horizons}, {seeds}{spread}", fontsize=10)
        ax.set_xlabel("privacy budget eps (delta = 1e-5)")
        ax.set_ylabel("test accuracy (%)")
        if log_eps:
            ax.set_xscale("log")
            ticks = _log_ticks([float(t) for t in part.loc[finite, "eps_target"]], pub_eps)
            if ticks:
                ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
                ax.minorticks_off()
        ax.grid(True, alpha=0.3)
    fig.legend(list(handles.values()), list(handles.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5),
               frameon=False, fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save_plot(df: pd.DataFrame, out_png: str | Path, *, with_published: bool = False, log_eps: bool = False,
              title: str | None = None) -> list[Path]:
    """Write the figure as PNG and SVG; returns both paths."""
    fig = plot_results(df, published=load_published() if with_published else None, log_eps=log_eps, title=title)
    paths = save_png_and_svg(fig, out_png)
    plt.close(fig)
    return paths

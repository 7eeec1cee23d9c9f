"""Accuracy against eps: one panel per (dataset, model), one line per mechanism, mean +- std over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dpbench.tables import load_published, summarize  # noqa: E402

#: Markers of published reference points, one per model family.
PUBLISHED_MARKERS = ("*", "P", "X", "D", "^", "v", "s", "h")

DATASET_TITLES = {"mnist": "MNIST", "fmnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "imdb": "IMDb",
                  "synthetic": "synthetic"}


def plot_results(df: pd.DataFrame, *, published: pd.DataFrame | None = None, log_eps: bool = False,
                 title: str | None = None) -> plt.Figure:
    """Build the figure (also used by tests, which inspect its artists)."""
    summary = summarize(df)
    panels = list(summary[["dataset", "model"]].drop_duplicates().itertuples(index=False, name=None))
    private = summary["eps_target"].map(math.isfinite)  # eps = inf rows are the non-private control
    mechs = sorted(summary.loc[private, "mech"].unique())
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(mechs)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 0.5, 3.6), squeeze=False)
    handles: dict[str, object] = {}
    family_markers: dict[str, str] = {}
    for ax, (dataset, model) in zip(axes[0], panels):
        part = summary[(summary["dataset"] == dataset) & (summary["model"] == model)]
        for mech in mechs:
            rows = part[(part["mech"] == mech) & part["eps_target"].map(math.isfinite)]
            if rows.empty:
                continue
            # several configurations of one mechanism at one eps: show the best mean (the others are in the report)
            rows = rows.sort_values("mean").groupby("eps_target").tail(1).sort_values("eps_target")
            h = ax.errorbar(rows["eps_target"], 100 * rows["mean"], yerr=100 * rows["std"], marker="o", ms=4,
                            capsize=3, lw=1.5, color=colours[mech], label=mech)
            handles.setdefault(mech, h)
        control = part[~part["eps_target"].map(math.isfinite)]
        if not control.empty:
            h = ax.axhline(100 * control["mean"].max(), color="0.3", ls="--", lw=1, label="non-private (eps = inf)")
            handles.setdefault("non-private (eps = inf)", h)
        if published is not None:
            pub = published[(published["dataset"] == dataset) & published["eps"].map(math.isfinite)]
            for (mech, family), rows in pub.groupby(["mech", "model_family"]):
                label = f"published: {mech}, {family}"
                # colour = mechanism, marker = model family, so two sources of one mechanism stay apart
                marker = family_markers.setdefault(family, PUBLISHED_MARKERS[len(family_markers) % len(PUBLISHED_MARKERS)])
                h = ax.scatter(rows["eps"], 100 * rows["test_acc"], marker=marker, s=60, zorder=5,
                               color=colours.get(mech, "0.2"), edgecolors="black", linewidths=0.5, label=label)
                handles.setdefault(label, h)
        ax.set_title(f"{DATASET_TITLES.get(dataset, dataset)} ({model})")
        ax.set_xlabel("privacy budget eps (delta = 1e-5)")
        ax.set_ylabel("test accuracy (%)")
        if log_eps:
            ax.set_xscale("log")
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
    png = Path(out_png)
    png.parent.mkdir(parents=True, exist_ok=True)
    svg = png.with_suffix(".svg")
    fig.savefig(png, dpi=200, bbox_inches="tight")
    fig.savefig(svg, bbox_inches="tight")
    plt.close(fig)
    return [png, svg]

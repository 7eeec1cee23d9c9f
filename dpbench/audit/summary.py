"""The audit's summary figure: claimed eps against the measured lower bound, one marker per audit."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from dpbench.style import mech_colour, mech_marker, save_png_and_svg  # noqa: E402

#: Columns an audit CSV has and a results CSV lacks.
AUDIT_COLUMNS = ("eps_claimed", "eps_lower_bound", "threat_model")


def is_audit_csv(df: pd.DataFrame) -> bool:
    return all(c in df.columns for c in AUDIT_COLUMNS)


def plot_audit_summary(df: pd.DataFrame, *, title: str | None = None) -> plt.Figure:
    """Lower bound against claim per mechanism (private runs; the non-private control as a reference line).

    A point above the diagonal is a refuted claim: the mechanism or its accountant leaks more than it says.
    """
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    private = df[df["eps_claimed"].map(math.isfinite)]
    mechs = sorted(private["mech"].unique())
    offsets = {m: (i - (len(mechs) - 1) / 2) * 0.06 for i, m in enumerate(mechs)}  # small shifts keep markers apart
    for mech in mechs:
        rows = private[private["mech"] == mech].sort_values("eps_claimed")
        ax.plot(rows["eps_claimed"] + offsets[mech], rows["eps_lower_bound"], marker=mech_marker(mech), ms=5, lw=1,
                color=mech_colour(mech), label=mech)
    top = max(float(private["eps_claimed"].max()) if len(private) else 1.0, 1.0)
    ax.plot([0, top], [0, top], color="0.5", ls=":", lw=1, label="lower bound = claim")
    control = df[~df["eps_claimed"].map(math.isfinite)]
    if len(control):
        ax.axhline(float(control["eps_lower_bound"].max()), color="0.3", ls="--", lw=1,
                   label="non-private control (largest measurable)")
    threat = ", ".join(sorted(df["threat_model"].astype(str).unique()))
    ax.set_xlabel("claimed eps (the mechanism's accountant; markers shifted slightly apart)")
    ax.set_ylabel("empirical lower bound on eps (95 %)")
    ax.set_title(title or f"one-run privacy audit ({threat}-box canaries)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def save_audit_summary(df: pd.DataFrame, out_png: str | Path, *, title: str | None = None) -> list[Path]:
    fig = plot_audit_summary(df, title=title)
    paths = save_png_and_svg(fig, out_png)
    plt.close(fig)
    return paths

"""Reading results CSVs and summarising them over seeds (shared by plots and reports)."""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from dpbench.errors import BadInput
from dpbench.results import BACKFILL

#: Published reference numbers with their sources: package data, so an installed wheel has them too.
PUBLISHED_CSV = resources.files("dpbench") / "published.csv"
GROUP = ["dataset", "model", "mech", "eps_target", "config_hash"]

#: How figures and tables name the datasets.
DATASET_TITLES = {"mnist": "MNIST", "fmnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "imdb": "IMDb",
                  "synthetic": "synthetic"}


def load_results(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such results CSV")
    df = pd.read_csv(path, dtype={"config_hash": str, "mech_params": str, "command": str})
    needed = {"dataset", "model", "mech", "eps_target", "test_acc", "seed", "config_hash"}
    missing = needed - set(df.columns)
    if missing:
        raise BadInput(f"{path}: not a dpbench results CSV (missing {sorted(missing)})")
    if df.empty:
        raise BadInput(f"{path}: no rows")
    df["eps_target"] = df["eps_target"].astype(float)
    for column, source in BACKFILL.items():  # older CSVs lack newer columns
        if column not in df.columns and source in df.columns:
            df[column] = df[source]
    return df


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """The published reference numbers (``dpbench/published.csv`` unless ``path`` is given)."""
    if path is None:
        with resources.as_file(PUBLISHED_CSV) as packaged:
            df = pd.read_csv(packaged)
    else:
        df = pd.read_csv(path)
    df["eps"] = df["eps"].astype(float)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (0 for one seed) and count of test accuracy per configuration, with its horizon.

    ``epochs`` and ``steps`` are the configuration's (one value each: both enter its config hash); NaN where
    the CSV lacks them.
    """
    g = df.groupby(GROUP, sort=True, dropna=False)
    out = g["test_acc"].agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    for column in ("epochs", "steps"):
        out[column] = (g[column].first().to_numpy(dtype=float) if column in df.columns
                       else np.full(len(out), np.nan))
    return out


def shown_configurations(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Of several configurations per ``by`` group, the one plots and headline tables show: the most seeds,
    then the best mean (the report's detail lists the others)."""
    return frame.sort_values(["n", "mean"]).groupby(by).tail(1)


def horizon_label(epochs: float, steps: float) -> str:
    """``40 ep`` (or ``500 steps`` where epochs are unknown)."""
    if epochs == epochs:  # not NaN
        return f"{epochs:g} ep"
    if steps == steps:
        return f"{steps:g} steps"
    return "horizon unknown"


def mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fmt_eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"

"""Reading results CSVs and summarising them over seeds (shared by plots and reports)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from dpbench.errors import BadInput

PUBLISHED_CSV = Path(__file__).resolve().parent.parent / "benchmarks" / "published.csv"
GROUP = ["dataset", "model", "mech", "eps_target", "config_hash"]


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
    return df


def load_published(path: str | Path = PUBLISHED_CSV) -> pd.DataFrame:
    df = pd.read_csv(path)
    df["eps"] = df["eps"].astype(float)
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean, sample std (0 for one seed) and count of test accuracy per configuration."""
    g = df.groupby(GROUP, sort=True, dropna=False)["test_acc"]
    out = g.agg(mean="mean", std="std", n="count").reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


def mean_std(values: np.ndarray) -> tuple[float, float]:
    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fmt_eps(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"

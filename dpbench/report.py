"""Markdown comparison report: per dataset, every (mechanism, eps, configuration) against a baseline.

The baseline is a mechanism (``dpsgd`` unless ``--baseline`` says otherwise). The difference to it
is paired by seed: the mean over seeds present in both groups of (acc_mech - acc_baseline), against
the baseline configuration with the same dataset, model, eps and steps. Where the CSV holds several
baseline configurations for one cell, none is picked silently: the cell says so until
``--baseline-config HASH`` names the one to pair with.
"""

from __future__ import annotations

import math
import re

import pandas as pd

from dpbench.data import DATASETS
from dpbench.mechanisms import MECHANISMS
from dpbench.tables import GROUP, fmt_eps, load_published, mean_std
from dpbench.tuning.summary import tuning_lines


def _chance(dataset: str) -> float:
    classes = DATASETS.entry(dataset).meta.get("num_classes", 10) if dataset in DATASETS else 10
    return 1.0 / classes


def _group_command(rows: pd.DataFrame) -> str:
    seeds = sorted(int(s) for s in rows["seed"].unique())
    cmd = str(rows["command"].iloc[0]) if "command" in rows else ""
    if not cmd or cmd == "nan":
        return "-"
    cmd = re.sub(r"--seed \S+", "--seed S", cmd)
    return f"`{cmd}` (S in {{{', '.join(map(str, seeds))}}})"


def calibrated_by(accountant: object) -> str | None:
    """The calibrating accountant of an ``accountant`` cell (``sgm-pld`` -> ``pld``); None for a non-private row."""
    if not isinstance(accountant, str) or not accountant:
        return "rdp"  # rows written before --accountant existed
    if accountant == "none":
        return None
    return accountant.rsplit("-", 1)[-1]


def baseline_candidates(df: pd.DataFrame, rows: pd.DataFrame, baseline: str,
                        configs: tuple[str, ...] = ()) -> list[str]:
    """Config hashes of ``baseline`` runs with the same dataset, model, eps, steps and calibrating accountant
    as ``rows`` (an eps by PLD buys less noise than the same eps by RDP, so they are never paired).

    ``configs`` (config-hash prefixes) keeps only the chosen ones; the caller pairs only when one is left.
    """
    first = rows.iloc[0]
    ref = df[(df["mech"] == baseline) & (df["dataset"] == first["dataset"]) & (df["model"] == first["model"])
             & (df["eps_target"] == first["eps_target"]) & (df["steps"] == first["steps"])]
    kind = calibrated_by(first.get("accountant"))
    if kind is not None and "accountant" in ref:
        ref = ref[ref["accountant"].map(calibrated_by) == kind]
    hashes = sorted(ref["config_hash"].astype(str).unique())
    if configs:
        hashes = [h for h in hashes if any(h.startswith(c) for c in configs)]
    return hashes


def paired_difference(rows: pd.DataFrame, ref: pd.DataFrame) -> tuple[float, int] | None:
    """Mean over shared seeds of (acc - acc_baseline), and the number of pairs."""
    a = rows.groupby("seed")["test_acc"].mean()
    b = ref.groupby("seed")["test_acc"].mean()
    shared = a.index.intersection(b.index)
    if len(shared) == 0:
        return None
    return float((a[shared] - b[shared]).mean()), len(shared)


def _published(pub: pd.DataFrame | None, dataset: str, mech: str, eps: float) -> str:
    if pub is None:
        return ""
    hits = pub[(pub["dataset"] == dataset) & (pub["mech"] == mech)
               & ((pub["eps"] == eps) | (pub["eps"].map(math.isinf) & math.isinf(eps)))]
    return "; ".join(f"{100 * r.test_acc:.2f} ({r.model_family})" for r in hits.itertuples())


def build_report(df: pd.DataFrame, *, title: str = "dpbench report", with_published: bool = True,
                 baseline: str = "dpsgd", baseline_configs: tuple[str, ...] = ()) -> str:
    pub = load_published() if with_published else None
    lines = [f"# {title}", "",
             "Test accuracy in %, mean ± sample std over seeds (n = number of seeds). "
             f"Δ {baseline}: mean over shared seeds of the paired difference to the `{baseline}` configuration with "
             "the same dataset, model, eps and steps (where there are several, the cell names them: choose one "
             "with `--baseline-config`); a private row pairs only with a baseline calibrated by the same accountant, and an eps calibrated by PLD or PRV says so. ⚠ marks a run group below chance + 5 points. Published numbers come from "
             "`dpbench/published.csv` (sources there; `dpbench.tables.load_published()`) and may use other models or epochs.", ""]
    for dataset, part in df.groupby("dataset", sort=True):
        chance = _chance(dataset)
        lines += [f"## {dataset}", "",
                  f"| mechanism | eps | model | accuracy | n | Δ {baseline} | published | epochs | reproduce |",
                  "|---|---|---|---|---|---|---|---|---|"]
        groups = part.groupby(GROUP, sort=True, dropna=False)
        for (ds, model, mech, eps, _), rows in groups:
            mean, std = mean_std(rows["test_acc"].to_numpy())
            flag = " ⚠" if mean < chance + 0.05 else ""
            diff = "-"
            hashes = baseline_candidates(df, rows, baseline, baseline_configs) if mech != baseline else []
            if len(hashes) > 1:
                diff = f"{len(hashes)} baseline configurations ({', '.join(h[:8] for h in hashes)})"
            elif hashes:
                paired = paired_difference(rows, df[df["config_hash"].astype(str) == hashes[0]])
                if paired is not None:
                    diff = f"{100 * paired[0]:+.2f} ({paired[1]} pairs)"
            epochs = rows["epochs"].iloc[0] if "epochs" in rows else float("nan")
            kind = calibrated_by(rows["accountant"].iloc[0]) if "accountant" in rows else "rdp"
            eps_cell = fmt_eps(eps) + (f" ({kind.upper()})" if kind not in (None, "rdp") else "")
            lines.append(f"| {mech} | {eps_cell} | {model} | {100 * mean:.2f} ± {100 * std:.2f}{flag} | "
                         f"{len(rows)} | {diff} | {_published(pub, dataset, mech, eps) or '-'} | {epochs:.3g} | "
                         f"{_group_command(rows)} |")
        lines.append("")
    lines += tuning_lines(df)
    caveats = [(m, MECHANISMS.get(m).caveat) for m in sorted(df["mech"].unique())
               if m in MECHANISMS and MECHANISMS.get(m).caveat]
    if caveats:
        lines += ["## Caveats", ""] + [f"- `{m}`: {c}" for m, c in caveats] + [""]
    return "\n".join(lines)


def group_means(df: pd.DataFrame) -> pd.DataFrame:
    """The numbers the report prints, as a frame (for checks against a plain pandas groupby)."""
    return df.groupby(GROUP, dropna=False)["test_acc"].agg(["mean", "std", "count"]).reset_index()


__all__ = ["build_report", "group_means", "paired_difference"]

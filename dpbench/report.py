"""Comparison reports: per dataset, every (mechanism, eps, configuration) against a baseline.

Three outputs of the same numbers (:func:`cell_table`): the markdown report (a headline table of mechanisms
against dataset x eps, then one detailed table per dataset), a LaTeX table (pandas' Styler) and a CSV.

The baseline is a mechanism (``dpsgd`` unless ``--baseline`` says otherwise). The difference to it
is paired by seed: the mean over seeds present in both groups of (acc_mech - acc_baseline), with a 95 %
Student-t interval, against the baseline configuration with the same dataset, model and eps (tuned in the
same study for a tuned row, of the same steps otherwise; see ``baseline_candidates``). Where the CSV holds several
baseline configurations for one cell, none is picked silently: the cell says so until
``--baseline-config HASH`` names the one to pair with.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
from scipy import stats

from dpbench.data import DATASETS
from dpbench.mechanisms import MECHANISMS
from dpbench.tables import DATASET_TITLES, GROUP, fmt_eps, load_published, mean_std, shown_configurations
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


def tuning_study(source: object) -> str | None:
    """The study a tuned row's recipe came from (``<study>#<trial>`` -> ``<study>``); None for other rows."""
    if not isinstance(source, str) or "#" not in source:
        return None
    return source.rpartition("#")[0]


def baseline_candidates(df: pd.DataFrame, rows: pd.DataFrame, baseline: str,
                        configs: tuple[str, ...] = ()) -> list[str]:
    """Config hashes of ``baseline`` runs that ``rows`` pair with.

    Always the same dataset, model, eps and calibrating accountant (an eps by PLD buys less noise than the
    same eps by RDP, so they are never paired). Rows trained from a tuned recipe pair with the baseline tuned
    in the same study (equal tuning budget; each keeps its own tuned horizon); other rows with baseline runs
    of the same number of steps. ``configs`` (config-hash prefixes) keeps only the chosen ones; the caller
    pairs only when one is left.
    """
    first = rows.iloc[0]
    ref = df[(df["mech"] == baseline) & (df["dataset"] == first["dataset"]) & (df["model"] == first["model"])
             & (df["eps_target"] == first["eps_target"])]
    kind = calibrated_by(first.get("accountant"))
    if kind is not None and "accountant" in ref:
        ref = ref[ref["accountant"].map(calibrated_by) == kind]
    study = tuning_study(first.get("recipe_source"))
    if study is not None:
        ref = ref[ref["recipe_source"].map(tuning_study) == study]
    else:
        ref = ref[ref["steps"] == first["steps"]]
        if "recipe_source" in ref:
            ref = ref[ref["recipe_source"].map(tuning_study).isna()]
    hashes = sorted(ref["config_hash"].astype(str).unique())
    if configs:
        hashes = [h for h in hashes if any(h.startswith(c) for c in configs)]
    return hashes


def paired_difference(rows: pd.DataFrame, ref: pd.DataFrame) -> tuple[float, int] | None:
    """Mean over shared seeds of (acc - acc_baseline), and the number of pairs."""
    diffs = seed_differences(rows, ref)
    return None if diffs is None else (float(diffs.mean()), len(diffs))


def seed_differences(rows: pd.DataFrame, ref: pd.DataFrame) -> np.ndarray | None:
    """acc - acc_baseline for every seed both groups have (None when they share none)."""
    a = rows.groupby("seed")["test_acc"].mean()
    b = ref.groupby("seed")["test_acc"].mean()
    shared = a.index.intersection(b.index)
    if len(shared) == 0:
        return None
    return (a[shared] - b[shared]).to_numpy(dtype=float)


def confidence_interval(diffs: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean paired difference; NaN for fewer than two pairs (no spread to estimate)."""
    n = len(diffs)
    if n < 2:
        return float("nan"), float("nan")
    half = float(stats.t.ppf(0.5 + level / 2, n - 1) * diffs.std(ddof=1) / math.sqrt(n))
    mean = float(diffs.mean())
    return mean - half, mean + half


def _published(pub: pd.DataFrame | None, dataset: str, mech: str, eps: float) -> str:
    if pub is None:
        return ""
    hits = pub[(pub["dataset"] == dataset) & (pub["mech"] == mech)
               & ((pub["eps"] == eps) | (pub["eps"].map(math.isinf) & math.isinf(eps)))]
    return "; ".join(f"{100 * r.test_acc:.2f} ({r.model_family})" for r in hits.itertuples())


def _plain_sgm_eps(rows: pd.DataFrame) -> float:
    """For a mechanism with its own analysis: the eps plain sampled-Gaussian accounting gives for the same noise
    (the ``eps_rdp`` column of such rows); NaN for the sampled-Gaussian family, where the two are one number."""
    own = str(rows["accountant"].iloc[0]) if "accountant" in rows else ""
    if own.startswith("sgm") or own in ("none", "", "nan") or "eps_rdp" not in rows:
        return float("nan")
    return float(pd.to_numeric(rows["eps_rdp"], errors="coerce").max())


def cell_table(df: pd.DataFrame, *, baseline: str = "dpsgd", baseline_configs: tuple[str, ...] = (),
               with_published: bool = True) -> pd.DataFrame:
    """One row per (dataset, model, mechanism, eps, configuration): every number the reports print.

    ``diff`` is the mean paired difference to the baseline (same seeds), ``diff_ci_low``/``diff_ci_high`` its
    95 % Student-t interval (NaN below two pairs); ``baseline_note`` says why a cell has no difference when
    several baseline configurations could pair with it. Accuracies and differences are fractions.
    """
    pub = load_published() if with_published else None
    records = []
    for (dataset, model, mech, eps, config), rows in df.groupby(GROUP, sort=True, dropna=False):
        mean, std = mean_std(rows["test_acc"].to_numpy())
        diff = low = high = float("nan")
        pairs, note = 0, ""
        hashes = baseline_candidates(df, rows, baseline, baseline_configs) if mech != baseline else []
        if len(hashes) > 1:
            note = f"{len(hashes)} baseline configurations ({', '.join(h[:8] for h in hashes)})"
        elif hashes:
            diffs = seed_differences(rows, df[df["config_hash"].astype(str) == hashes[0]])
            if diffs is not None:
                diff, pairs = float(diffs.mean()), len(diffs)
                low, high = confidence_interval(diffs)
        first = rows.iloc[0]
        records.append({
            "dataset": dataset, "model": model, "mech": mech, "eps_target": float(eps),
            "calibrated_by": calibrated_by(first.get("accountant")) if "accountant" in rows else "rdp",
            "config_hash": config, "epochs": float(first.get("epochs", float("nan"))),
            "steps": float(first.get("steps", float("nan"))),
            "batch_size": float(first.get("batch_size", float("nan"))),
            "n": len(rows), "seeds": ",".join(str(int(x)) for x in sorted(rows["seed"].unique())),
            "mean": mean, "std": std, "diff": diff, "diff_ci_low": low, "diff_ci_high": high, "pairs": pairs,
            "baseline_note": note,
            "eps_spent": float(pd.to_numeric(rows["eps_spent"], errors="coerce").max()) if "eps_spent" in rows
            else float("nan"),
            "eps_plain_sgm": _plain_sgm_eps(rows),
            "below_chance": mean < _chance(dataset) + 0.05,
            "published": _published(pub, dataset, mech, float(eps)),
            "command": _group_command(rows),
        })
    return pd.DataFrame.from_records(records)


def headline_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Mechanisms (rows) against (dataset/model, eps) columns, from :func:`cell_table`.

    A cell with several configurations shows the one with the most seeds (then the best mean) and is marked
    ``multiple``; ``best`` marks the highest private mean of each column (the non-private control has a column
    of its own).
    """
    cells = cells.assign(pair=cells["dataset"].astype(str) + "/" + cells["model"].astype(str))
    counts = cells.groupby(["pair", "mech", "eps_target"])["config_hash"].transform("count")
    chosen = shown_configurations(cells.assign(multiple=counts > 1), ["pair", "mech", "eps_target"])
    finite = chosen["eps_target"].map(math.isfinite)
    top = chosen[finite].groupby(["pair", "eps_target"])["mean"].transform("max")
    chosen["best"] = False
    chosen.loc[finite, "best"] = chosen.loc[finite, "mean"] >= top
    return chosen.sort_values(["pair", "eps_target", "mech"]).reset_index(drop=True)


def _headline_cell(r: pd.Series, *, bold: tuple[str, str], pm: str = "±", dagger: str = "†") -> str:
    text = f"{100 * r['mean']:.2f} {pm} {100 * r['std']:.2f}"
    if r["n"] < 3:
        text += f" (n={int(r['n'])})"
    if r["multiple"]:
        text += dagger
    return f"{bold[0]}{text}{bold[1]}" if r["best"] else text


def headline_frame(cells: pd.DataFrame, *, bold: tuple[str, str] = ("**", "**"), pm: str = "±",
                   dagger: str = "†") -> pd.DataFrame:
    """The headline as a frame of strings: index mechanism, columns (dataset/model, eps); '-' where no run."""
    head = headline_table(cells)
    head["text"] = [_headline_cell(r, bold=bold, pm=pm, dagger=dagger) for _, r in head.iterrows()]
    wide = head.pivot_table(index="mech", columns=["pair", "eps_target"], values="text", aggfunc="first")
    order = [m for m in MECHANISMS.names() if m in wide.index] + sorted(set(wide.index) - set(MECHANISMS.names()))
    wide = wide.reindex(order).fillna("-")
    wide.columns = pd.MultiIndex.from_tuples([(p, "eps " + fmt_eps(e)) for p, e in wide.columns])
    wide.index.name = "mechanism"
    return wide


def _column_title(pair: str, eps: str) -> str:
    dataset, _, model = pair.partition("/")
    return f"{DATASET_TITLES.get(dataset, dataset)}<br>{model}<br>{eps.replace('eps ', 'ε ').replace('inf', '∞')}"


def headline_markdown(cells: pd.DataFrame) -> list[str]:
    wide = headline_frame(cells)
    header = ["mechanism"] + [_column_title(pair, eps) for pair, eps in wide.columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for mech, row in wide.iterrows():
        lines.append("| " + " | ".join([str(mech), *row.tolist()]) + " |")
    return lines


def _horizons(cells: pd.DataFrame) -> pd.Series:
    """Each mechanism's epochs, e.g. '20/40' where its cells trained for different horizons."""
    # a step-counted run has fractional epochs (800 steps of 8192 of 60,000 = 109.2266...): four digits
    return cells.groupby("mech")["epochs"].agg(
        lambda e: "/".join(f"{x:g}" for x in sorted({float(f"{epochs:.4g}") for epochs in e.dropna()})))


def _pair_horizons(cells: pd.DataFrame) -> str:
    """'dpsgd, ged 10; nonprivate 20; ...': mechanisms grouped by their horizon, shortest first."""
    by_horizon: dict[str, list[str]] = {}
    for mech, horizon in _horizons(cells).items():
        if horizon:
            by_horizon.setdefault(horizon, []).append(str(mech))
    order = sorted(by_horizon, key=lambda h: [float(x) for x in h.split("/")])
    return "; ".join(f"{', '.join(by_horizon[h])} {h}" for h in order)


def headline_legend(cells: pd.DataFrame) -> str:
    """The headline's caption: what a cell shows and every mechanism's horizon (per pair where several)."""
    text = ("Test accuracy in %, mean ± sample std over seeds (3 unless (n=k) says otherwise); bold: the best "
            "private mean of its column; † several configurations ran for this cell, the one with the most seeds "
            "(then the best mean) is shown. ")
    pairs = cells.groupby(["dataset", "model"], sort=True) if {"dataset", "model"} <= set(cells.columns) else None
    if pairs is None or pairs.ngroups < 2:
        return text + "Epochs per mechanism: " + ", ".join(
            f"{m} {h}" for m, h in _horizons(cells).items() if h) + "."
    # one list across pairs ('dpsgd 10/12/40') would not say which pair trained how long
    return text + "Epochs per pair: " + ". ".join(
        f"{DATASET_TITLES.get(dataset, dataset)} {model}: {_pair_horizons(part)}"
        for (dataset, model), part in pairs) + "."


def build_report(df: pd.DataFrame, *, title: str = "dpbench report", with_published: bool = True,
                 baseline: str = "dpsgd", baseline_configs: tuple[str, ...] = ()) -> str:
    cells = cell_table(df, baseline=baseline, baseline_configs=baseline_configs, with_published=with_published)
    lines = [f"# {title}", "", "## Headline", "", headline_legend(cells), "", *headline_markdown(cells), "",
             "## Detail", "",
             "Test accuracy in %, mean ± sample std over seeds (n = number of seeds). "
             f"Δ {baseline}: mean over shared seeds of the paired difference to the `{baseline}` configuration with "
             "the same dataset, model and eps, tuned in the same study for a tuned row (each keeps its own tuned "
             "horizon), of the same steps otherwise (where there are several, the cell names them: choose one "
             "with `--baseline-config`), and its 95 % confidence interval (Student t over the pairs; none below two "
             "pairs); a private row pairs only with a baseline calibrated by the same accountant, and an eps "
             "calibrated by PLD or PRV says so. eps spent: the largest over the seeds, by the mechanism's own "
             "accountant; in brackets, plain sampled-Gaussian accounting of the same noise, for mechanisms with an "
             "analysis of their own. ⚠ marks a run group below chance + 5 points. Published numbers come from "
             "`dpbench/published.csv` (sources there; `dpbench.tables.load_published()`) and may use other models "
             "or epochs.", ""]
    for dataset, part in cells.groupby("dataset", sort=True):
        lines += [f"## {dataset}", "",
                  f"| mechanism | eps | model | accuracy | n | Δ {baseline} | 95 % CI | eps spent | published | "
                  "epochs | reproduce |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in part.itertuples():
            diff = r.baseline_note or (f"{100 * r.diff:+.2f} ({r.pairs} pairs)" if r.pairs else "-")
            ci = f"[{100 * r.diff_ci_low:+.2f}, {100 * r.diff_ci_high:+.2f}]" if r.diff_ci_low == r.diff_ci_low else "-"
            spent = "-" if r.eps_spent != r.eps_spent else f"{r.eps_spent:.3f}"
            if r.eps_plain_sgm == r.eps_plain_sgm:
                spent += f" ({r.eps_plain_sgm:.3g})"
            kind = r.calibrated_by if isinstance(r.calibrated_by, str) else None
            eps_cell = fmt_eps(r.eps_target) + (f" ({kind.upper()})" if kind not in (None, "rdp") else "")
            flag = " ⚠" if r.below_chance else ""
            lines.append(f"| {r.mech} | {eps_cell} | {r.model} | {100 * r.mean:.2f} ± {100 * r.std:.2f}{flag} | "
                         f"{r.n} | {diff} | {ci} | {spent} | {r.published or '-'} | {r.epochs:.3g} | {r.command} |")
        lines.append("")
    lines += tuning_lines(df)
    caveats = [(m, MECHANISMS.get(m).caveat) for m in sorted(df["mech"].unique())
               if m in MECHANISMS and MECHANISMS.get(m).caveat]
    if caveats:
        lines += ["## Caveats", ""] + [f"- `{m}`: {c}" for m, c in caveats] + [""]
    return "\n".join(lines)


def build_latex(df: pd.DataFrame, *, title: str = "dpbench report", baseline: str = "dpsgd",
                baseline_configs: tuple[str, ...] = ()) -> str:
    """The headline table as a LaTeX ``table`` (booktabs), best of each column in bold."""
    cells = cell_table(df, baseline=baseline, baseline_configs=baseline_configs, with_published=False)
    wide = headline_frame(cells, bold=("\\textbf{", "}"), pm="$\\pm$", dagger="$^\\dagger$")
    wide.columns = pd.MultiIndex.from_tuples([(_latex_escape(p), e.replace("eps ", "$\\varepsilon$ = "))
                                              for p, e in wide.columns])
    wide.index = [_latex_escape(m) for m in wide.index]
    caption = _latex_escape(f"{title}. " + headline_legend(cells))
    return wide.style.to_latex(hrules=True, multicol_align="c", caption=caption, position="t",
                               label="tab:dpbench", environment="table")


def _latex_escape(text: str) -> str:
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("±", "$\\pm$"), ("†", "$^\\dagger$")):
        text = text.replace(a, b)
    return text


def build_csv(df: pd.DataFrame, *, baseline: str = "dpsgd", baseline_configs: tuple[str, ...] = ()) -> str:
    """Every cell of the report as one CSV row (accuracies and differences as fractions, unrounded)."""
    cells = cell_table(df, baseline=baseline, baseline_configs=baseline_configs)
    head = headline_table(cells)[["dataset", "model", "mech", "eps_target", "config_hash", "best", "multiple"]]
    cells = cells.merge(head, on=["dataset", "model", "mech", "eps_target", "config_hash"], how="left")
    cells["in_headline"] = cells["best"].notna()
    cells["best"] = cells["best"].fillna(False).astype(bool)
    return cells.drop(columns=["multiple"]).to_csv(index=False)


FORMATS = ("md", "latex", "csv")


def group_means(df: pd.DataFrame) -> pd.DataFrame:
    """The numbers the report prints, as a frame (for checks against a plain pandas groupby)."""
    return df.groupby(GROUP, dropna=False)["test_acc"].agg(["mean", "std", "count"]).reset_index()


__all__ = ["FORMATS", "build_csv", "build_latex", "build_report", "cell_table", "confidence_interval", "group_means",
           "headline_frame", "headline_markdown", "headline_table", "paired_difference", "seed_differences"]

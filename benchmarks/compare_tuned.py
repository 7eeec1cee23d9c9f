"""Tuned against built-in recipes: one table from a CSV holding both (``make compare-tuned-mnist``).

    python benchmarks/compare_tuned.py results/tuning/mnist-test/runs.csv

A row is tuned when its ``recipe_source`` names a study trial (``<study>#<trial>``). Writes
``comparison.md`` beside the CSV: per mechanism, test accuracy mean +- std over seeds for each kind of
recipe, the difference of the means, and each group's hyperparameters and one command.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd


def describe(group: pd.DataFrame) -> dict[str, str]:
    acc = 100 * group["test_acc"]
    first = group.iloc[0]
    return {"acc": f"{acc.mean():.2f} ± {acc.std(ddof=1) if len(acc) > 1 else float('nan'):.2f} (n={len(acc)})",
            "mean": acc.mean(),
            "recipe": f"B {int(first['batch_size'])}, {first['epochs']:g} ep, lr {first['lr']:.4g}, "
                      f"mom {first['momentum']:g}, C {first['clip']:.4g}",
            "eps": f"{group['eps_spent'].max():.5f}", "wall": f"{group['wall_s'].mean():.0f}",
            "command": first["command"]}


def main(csv_path: str) -> None:
    df = pd.read_csv(csv_path)
    df["tuned"] = df["recipe_source"].astype(str).str.contains(r"\.db#", regex=True)
    lines = [f"# Tuned against built-in recipes ({csv_path})", "",
             "Test split, mean ± sample std over seeds. Tuned: `dpbench tune` on the validation split at the same "
             "eps with the same budget per mechanism; built-in: `dpbench/recipes.py`. Tuning is not "
             "privacy-accounted.", "",
             "| mechanism | tuned acc % | built-in acc % | tuned − built-in | tuned recipe | built-in recipe | "
             "eps spent (max) | train s (mean, tuned / built-in) |", "|---|---|---|---|---|---|---|---|"]
    commands = []
    for mech in sorted(df["mech"].unique()):
        rows = df[df["mech"] == mech]
        t = describe(rows[rows["tuned"]]) if rows["tuned"].any() else None
        b = describe(rows[~rows["tuned"]]) if (~rows["tuned"]).any() else None
        diff = f"{t['mean'] - b['mean']:+.2f}" if t and b else "-"
        lines.append(f"| {mech} | {t['acc'] if t else '-'} | {b['acc'] if b else '- (no row)'} | {diff} | "
                     f"{t['recipe'] if t else '-'} | {b['recipe'] if b else '-'} | "
                     f"{(t or b)['eps']} | {t['wall'] if t else '-'} / {b['wall'] if b else '-'} |")
        commands += [f"- {mech}, {kind}: `{d['command']}` (seeds 0, 1, 2)" for kind, d in (("tuned", t), ("built-in", b))
                     if d]
    lines += ["", "One command per group (the seeds differ only in `--seed`):", "", *commands]
    out = Path(csv_path).with_name("comparison.md")
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/tuning/mnist-test/runs.csv")

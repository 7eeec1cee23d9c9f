"""Paired differences of a table's rows to a baseline that lives in another CSV (a sensitivity check).

`dpbench report` pairs a tuned row only with the baseline tuned in the same study (equal budget). A
sensitivity check tunes the baseline again outside that budget (benchmarks/sensitivity/); this script pairs
every mechanism of a table, seed by seed, with that baseline at one eps, with the report's own
difference and Student-t interval, and prints a Markdown table with the command that made it.

    python benchmarks/paired_to_baseline.py results/benchmark/fmnist-cnn_tanh/runs.csv \
        --baseline results/sensitivity/fmnist-cnn_tanh-dpsgd-eps1/runs.csv --eps 1
"""
from __future__ import annotations

import argparse
import shlex
import sys

from dpbench.report import confidence_interval, seed_differences
from dpbench.tables import load_results


def paired_table(table_csv: str, baseline_csv: str, eps: float) -> list[str]:
    table, base = load_results(table_csv), load_results(baseline_csv)
    table, base = table[table["eps_target"] == eps], base[base["eps_target"] == eps]
    if base["config_hash"].nunique() != 1:
        raise ValueError(f"--baseline {baseline_csv}: needs exactly one configuration at eps {eps:g}, "
                         f"found {base['config_hash'].nunique()}")
    lines = ["| mechanism | config | accuracy (%) | n | Δ baseline (points) | 95 % CI |",
             "|---|---|---|---|---|---|"]
    # one line per configuration: a CSV may hold several of one mechanism (e.g. tuned and built-in recipes)
    for (mech, config), rows in sorted(table.groupby(["mech", "config_hash"])):
        diffs = seed_differences(rows, base)
        if diffs is None:
            continue
        acc = rows.groupby("seed")["test_acc"].mean() * 100
        low, high = confidence_interval(diffs * 100)
        lines.append(f"| {mech} | {str(config)[:8]} | {acc.mean():.2f} ± {acc.std(ddof=1):.2f} | {len(diffs)} | "
                     f"{diffs.mean() * 100:+.2f} | [{low:+.2f}, {high:+.2f}] |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", help="results CSV of the table")
    parser.add_argument("--baseline", required=True, help="results CSV holding the baseline's runs")
    parser.add_argument("--eps", type=float, required=True, help="target eps of the comparison")
    args = parser.parse_args()
    try:
        lines = paired_table(args.table, args.baseline, args.eps)
    except ValueError as exc:
        parser.error(str(exc))
    base = load_results(args.baseline)
    base = base[base["eps_target"] == args.eps]
    print(f"Baseline: {args.baseline}, {base['mech'].iloc[0]} at eps {args.eps:g} "
          f"({100 * base['test_acc'].mean():.2f} % over {len(base)} seeds).\n")
    print("\n".join(lines))
    print("\n`" + " ".join(["python", *map(shlex.quote, sys.argv)]) + "`")


if __name__ == "__main__":
    main()

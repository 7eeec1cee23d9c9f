"""Copy the benchmark's headline tables into the README, between its two marker lines.

    python benchmarks/readme_headline.py results/benchmark/*/runs.csv

Each table is `dpbench report`'s headline (the same code), so the README never drifts from the reports.
Pairs that share their ε columns share a table (the feature and embedding models at ε 1, 2, 4, 8; the
end-to-end CNNs at ε 1, 4), which keeps each table narrow enough to read.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import pandas as pd

from dpbench.report import cell_table, headline_legend, headline_markdown
from dpbench.tables import fmt_eps, load_results

BEGIN = "<!-- benchmark-headline: written by benchmarks/readme_headline.py -->"
END = "<!-- /benchmark-headline -->"


def groups_by_eps(cells: pd.DataFrame) -> list[tuple[tuple[float, ...], pd.DataFrame]]:
    """The cells split by the finite ε their (dataset, model) pair ran at, the longest grid first."""
    pair = cells["dataset"].astype(str) + "/" + cells["model"].astype(str)
    grid = {p: tuple(sorted({float(e) for e in part["eps_target"] if math.isfinite(e)}))
            for p, part in cells.groupby(pair)}
    key = pair.map(grid)
    return sorted(((g, cells[key == g]) for g in set(grid.values())), key=lambda item: (-len(item[0]), item[0]))


def headline_block(cells: pd.DataFrame) -> str:
    """The text between the markers: one legend and table per ε grid."""
    lines = [BEGIN, ""]
    for grid, part in groups_by_eps(cells):
        lines += [f"**At ε {', '.join(fmt_eps(e) for e in grid)}.** " + headline_legend(part), "",
                  *headline_markdown(part), ""]
    return "\n".join(lines + [END])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="the pairs' runs.csv files")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args()
    df = pd.concat([load_results(f) for f in args.csv], ignore_index=True)
    cells = cell_table(df, with_published=False)
    readme = Path(args.readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{readme}: no '{BEGIN}' ... '{END}' block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + headline_block(cells) + tail)
    print(f"wrote the headline of {len(cells)} cells into {readme}")


if __name__ == "__main__":
    main()

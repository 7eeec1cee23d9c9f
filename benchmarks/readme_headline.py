"""Copy the benchmark's headline table into the README, between its two marker lines.

    python benchmarks/readme_headline.py results/benchmark/*/runs.csv

The table is `dpbench report`'s headline (the same code), so the README never drifts from the reports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from dpbench.report import cell_table, headline_legend, headline_markdown
from dpbench.tables import load_results

BEGIN = "<!-- benchmark-headline: written by benchmarks/readme_headline.py -->"
END = "<!-- /benchmark-headline -->"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="the pairs' runs.csv files")
    ap.add_argument("--readme", default="README.md")
    args = ap.parse_args()
    df = pd.concat([load_results(f) for f in args.csv], ignore_index=True)
    cells = cell_table(df, with_published=False)
    block = "\n".join([BEGIN, "", headline_legend(cells), "", *headline_markdown(cells), "", END])
    readme = Path(args.readme)
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        sys.exit(f"{readme}: no '{BEGIN}' ... '{END}' block to replace")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + block + tail)
    print(f"wrote the headline of {len(cells)} cells into {readme}")


if __name__ == "__main__":
    main()

"""``benchmarks/readme_headline.py``: the README's headline tables, one per ε grid, between the markers."""

from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd

from dpbench.results import ALL_COLUMNS
from tests.scripts import BENCHMARKS, load_benchmark_script

SCRIPT = BENCHMARKS / "readme_headline.py"


def load_script():  # noqa: ANN201
    return load_benchmark_script("readme_headline")


def runs(dataset: str, model: str, eps: tuple[float, ...]) -> pd.DataFrame:
    rows = []
    for mech, base in (("dpsgd", 0.90), ("psac", 0.91), ("nonprivate", 0.99)):
        for e in ((math.inf,) if mech == "nonprivate" else eps):
            for seed in (0, 1, 2):
                row = {c: "" for c in ALL_COLUMNS}
                row.update(mech=mech, dataset=dataset, model=model, eps_target=e, seed=seed, steps=100, epochs=1.0,
                           test_acc=base - (0.02 / e if math.isfinite(e) else 0) + 0.001 * seed,
                           config_hash=f"{dataset}-{model}-{mech}-{e}", command="dpbench run")
                rows.append(row)
    return pd.DataFrame(rows)


def test_pairs_share_a_table_only_when_they_share_their_eps_columns(tmp_path):
    paths = []
    for dataset, model, eps in (("mnist", "scatter_linear", (1.0, 2.0, 4.0, 8.0)),
                                ("fmnist", "scatter_linear", (1.0, 2.0, 4.0, 8.0)), ("mnist", "cnn_tanh", (1.0, 4.0))):
        path = tmp_path / f"{dataset}-{model}.csv"
        runs(dataset, model, eps).to_csv(path, index=False)
        paths.append(str(path))
    readme = tmp_path / "README.md"
    script = load_script()
    readme.write_text(f"# title\n\n{script.BEGIN}\nold table\n{script.END}\n\nafter\n")
    done = subprocess.run([sys.executable, str(SCRIPT), *paths, "--readme", str(readme)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("# title\n\n") and text.endswith(f"{script.END}\n\nafter\n") and "old table" not in text
    headers = [line for line in text.splitlines() if line.startswith("| mechanism")]
    assert len(headers) == 2  # ε 1, 2, 4, 8 (two pairs) first, then ε 1, 4
    assert headers[0].count("scatter_linear") == 10 and "cnn_tanh" not in headers[0]  # 2 pairs x (4 eps + inf)
    assert headers[1].count("cnn_tanh") == 3 and "scatter_linear" not in headers[1]
    assert text.index("**At ε 1, 2, 4, 8.**") < text.index("**At ε 1, 4.**")
    psac = [line for line in text.splitlines() if line.startswith("| psac")]
    assert all(cell.strip().startswith("**") for cell in psac[1].split("|")[2:4])  # best private mean, marked

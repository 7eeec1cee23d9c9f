"""``benchmarks/paired_to_baseline.py``: a table's rows paired seed by seed with a baseline from another CSV."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dpbench.results import ALL_COLUMNS
from tests.scripts import BENCHMARKS, load_benchmark_script

SCRIPT = BENCHMARKS / "paired_to_baseline.py"


def load_script():  # noqa: ANN201
    return load_benchmark_script("paired_to_baseline")


def write_runs(path: Path, accuracies: dict[tuple[str, float, str], list[float]]) -> str:
    """One row per seed; keys are (mech, eps, config hash), values the accuracies of seeds 0, 1, ..."""
    rows = []
    for (mech, eps, config), accs in accuracies.items():
        for seed, acc in enumerate(accs):
            row = {c: "" for c in ALL_COLUMNS}
            row.update(mech=mech, dataset="fmnist", model="cnn_tanh", eps_target=eps, seed=seed, steps=100,
                       epochs=1.0, test_acc=acc, config_hash=config, command="dpbench run")
            rows.append(row)
    pd.DataFrame(rows).to_csv(path, index=False)
    return str(path)


def test_differences_are_paired_by_seed_at_the_chosen_eps_only(tmp_path):
    table = write_runs(tmp_path / "table.csv", {
        ("psac", 1.0, "p1"): [0.84, 0.85, 0.83],
        ("psac", 4.0, "p4"): [0.10, 0.10, 0.10],  # another eps: never paired
        ("rs", 1.0, "r1"): [0.80, 0.81],  # seed 2 missing: two pairs
    })
    baseline = write_runs(tmp_path / "base.csv", {("dpsgd", 1.0, "d1"): [0.80, 0.82, 0.78]})
    lines = load_script().paired_table(table, baseline, 1.0)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]] for line in lines[2:]}
    assert set(rows) == {"psac", "rs"}
    # psac - dpsgd per seed: +4, +3, +5 points; the interval is the paired one: 4 -+ t(2) * 1 / sqrt(3)
    assert rows["psac"][:3] == ["84.00 ± 1.00", "3", "+4.00"]
    assert rows["psac"][3] == "[+1.52, +6.48]"
    assert rows["rs"][1:3] == ["2", "-0.50"]  # 0 and -1 point over the two seeds both have
    assert rows["rs"][3] == "[-6.85, +5.85]"


def test_each_configuration_of_a_mechanism_gets_its_own_line(tmp_path):
    table = write_runs(tmp_path / "table.csv", {("dpsgd", 1.0, "tuned"): [0.84, 0.86],
                                                ("dpsgd", 1.0, "builtin"): [0.70, 0.72]})
    baseline = write_runs(tmp_path / "base.csv", {("dpsgd", 1.0, "d1"): [0.80, 0.82]})
    lines = load_script().paired_table(table, baseline, 1.0)[2:]
    assert [line.split("|")[2].strip() for line in lines] == ["builtin", "tuned"]
    assert [line.split("|")[5].strip() for line in lines] == ["-10.00", "+4.00"]  # never their mean, -3


def test_a_baseline_with_several_configurations_is_refused_with_exit_2(tmp_path):
    table = write_runs(tmp_path / "table.csv", {("psac", 1.0, "p1"): [0.84, 0.85]})
    baseline = write_runs(tmp_path / "base.csv", {("dpsgd", 1.0, "a"): [0.80, 0.82],
                                                  ("dpsgd", 1.0, "b"): [0.70, 0.72]})
    with pytest.raises(ValueError, match="exactly one configuration at eps 1, found 2"):
        load_script().paired_table(table, baseline, 1.0)
    done = subprocess.run([sys.executable, str(SCRIPT), table, "--baseline", baseline, "--eps", "2"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--baseline" in done.stderr and "found 0" in done.stderr
    assert done.stdout == ""

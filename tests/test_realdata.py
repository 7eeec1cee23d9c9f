"""On the real offline copies (``make test-all``; deselected by default): MNIST loads intact and one
short DP-SGD run learns. Skipped where no copy is found ($DPBENCH_DATA, else ../shared/data)."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.data import load_dataset

# read at import: the autouse fixture of conftest.py clears DPBENCH_DATA for every test
REAL_DATA = Path(os.environ.get("DPBENCH_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
pytestmark = [pytest.mark.realdata,
              pytest.mark.skipif(not (REAL_DATA / "mnist").is_dir(), reason=f"no offline data copy at {REAL_DATA}")]


def test_the_mnist_copy_matches_its_checksums():
    sums = {}
    for line in (REAL_DATA / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        if name.startswith("./mnist/"):
            sums[name] = digest
    assert len(sums) == 4
    for name, digest in sums.items():
        assert hashlib.sha256((REAL_DATA / name).read_bytes()).hexdigest() == digest, name


def test_mnist_loads_with_the_published_sizes_and_normalisation():
    data = load_dataset("mnist", str(REAL_DATA))
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    counts = torch.bincount(data.train_y, minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert abs(float(data.train_x.mean())) < 1e-3 and abs(float(data.train_x.std()) - 1.0) < 1e-3


def test_a_short_dpsgd_run_on_mnist_learns():
    res = CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--eps", "3", "--dataset", "mnist", "--steps", "30",
                                   "--data-dir", str(REAL_DATA), "--quiet", "--out", "r.csv"])
    assert res.exit_code == 0, res.output
    (row,) = list(csv.DictReader(open("r.csv")))
    assert float(row["eps_spent"]) <= 3.0 and row["dataset_variant"] == "mnist"
    assert float(row["test_acc"]) > 0.4, row["test_acc"]  # chance is 0.1; seed 0 gave 0.5388

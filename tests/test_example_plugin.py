"""The README's example plugin, installed as a user installs it (pip, entry point), through check, run, account."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "softclip"


def test_the_example_plugin_is_short():
    files = [EXAMPLE / "pyproject.toml", EXAMPLE / "dpbench_softclip" / "__init__.py"]
    assert sum(len(f.read_text().splitlines()) for f in files) <= 60


def test_the_example_plugin_installs_and_passes_check_run_and_account(tmp_path):
    shutil.copytree(EXAMPLE, tmp_path / "softclip", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                                "--target", str(tmp_path / "site"), str(tmp_path / "softclip")],
                               capture_output=True, text=True)
    assert installed.returncode == 0, installed.stderr
    env = {"PYTHONPATH": str(tmp_path / "site"), "DPBENCH_OFFLINE": "1", "PATH": "/usr/bin:/bin",
           "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "DPBENCH_CACHE": str(tmp_path / "cache"),
           "COLUMNS": "200"}

    def dpbench(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dpbench.cli", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path)

    check = dpbench("check", "softclip", "--set", "warmup=3")
    assert check.returncode == 0 and "softclip passes all 7 conformance checks" in check.stdout, check.stdout
    run = dpbench("run", "--mech", "softclip", "--dataset", "synthetic", "--eps", "8", "--steps", "3",
                  "--quiet", "--out", "r.csv")
    assert run.returncode == 0, run.stderr
    (row,) = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert row["mech"] == "softclip" and float(row["eps_spent"]) <= 8 and row["accountant"] == "sgm-rdp"
    account = dpbench("account", "--mech", "softclip", "--eps", "3", "--json")
    assert account.returncode == 0 and json.loads(account.stdout)["batch_size"] == 512  # its MNIST recipe

"""The package as a user installs it: a wheel that carries its data files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_published_reference_numbers(tmp_path):
    # built from a copy, so that the build leaves nothing in the checkout
    src = tmp_path / "src"
    shutil.copytree(ROOT / "dpbench", src / "dpbench", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheels"), str(src)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheels").glob("dpbench-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read("dpbench/published.csv") == (ROOT / "dpbench" / "published.csv").read_bytes()
    assert not (ROOT / "benchmarks" / "published.csv").exists()  # one copy only


def test_published_numbers_load_from_the_package():
    from dpbench.tables import load_published

    pub = load_published()
    assert {"dataset", "mech", "eps", "test_acc", "source"} <= set(pub.columns) and len(pub) > 10

"""Shared fixtures: every test runs offline, with its own cache and no progress bars."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DPBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DPBENCH_OFFLINE", "1")
    monkeypatch.delenv("DPBENCH_DATA", raising=False)
    monkeypatch.chdir(tmp_path)
    yield

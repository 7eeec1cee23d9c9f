"""benchmarks/bench_overhead.py: time per sample is per record trained on, whatever the sampler draws."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dpbench.config import resolve
from dpbench.data import load_dataset
from tests.scripts import load_benchmark_script


@pytest.fixture(scope="module")
def bench():
    return load_benchmark_script("bench_overhead")


def test_dpis_is_charged_per_record_trained_on_not_per_candidate(bench):
    data = load_dataset("synthetic")
    base = resolve({"mech": "dpis", "dataset": "synthetic", "eps": 3.0, "steps": 12})
    cfg = dataclasses.replace(base, mech_params={**base.mech_params, "r_hat": 0.25})
    seconds, trained, drawn, _ = bench.measure(cfg, data, torch.device("cpu"), warmup=1, steps=10)
    assert seconds > 0
    assert trained == 10 * cfg.batch_size
    # candidates at rate q / r_hat: about four per record trained on (Poisson: 10 steps of ~4B draws)
    assert 3.0 < drawn / trained < 5.0


def test_dpsgd_draws_about_one_record_per_record_trained_on(bench):
    data = load_dataset("synthetic")
    cfg = resolve({"mech": "dpsgd", "dataset": "synthetic", "eps": 3.0, "steps": 12})
    _, trained, drawn, _ = bench.measure(cfg, data, torch.device("cpu"), warmup=1, steps=10)
    assert trained == 10 * cfg.batch_size
    assert 0.75 < drawn / trained < 1.25

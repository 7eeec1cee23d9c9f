"""End to end on the synthetic data set: the audit finds leakage where there is some, and never more than the claim."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from dpbench.audit.canaries import GradientCanaries, canary_direction
from dpbench.audit.runner import AUDIT_COLUMNS, read_scores, run_audit
from dpbench.cli import app
from dpbench.config import resolve
from dpbench.data import load_dataset
from dpbench.engine import train
from dpbench.runstate import derive_seed
from dpbench.mechanisms import MECHANISMS, get_mechanism


def audit(mech: str, eps: float | None, *, steps: int, m: int = 200, seed: int = 0, threat: str = "white",
          out: str = "audit.csv", **extra) -> dict:
    options = {"mech": mech, "dataset": "synthetic", "eps": eps, "steps": steps, "seed": seed, "out": out, **extra}
    return run_audit(resolve(options), canaries=m, threat=threat, show_progress=False)


def test_nonprivate_white_box_bound_is_clearly_above_one(tmp_path):
    row = audit("nonprivate", None, steps=100)
    assert row["eps_lower_bound"] > 1.5
    assert math.isfinite(row["eps_lower_bound"]) and row["eps_lower_bound"] < math.log(200)
    assert row["auroc"] > 0.9
    # the files beside the row: one row, a score per canary, the ROC plot
    with open("audit.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and tuple(rows[0]) == AUDIT_COLUMNS
    scores, included = read_scores(tmp_path / row["scores_file"])
    assert len(scores) == 200 and included.sum() == row["included"]
    assert (tmp_path / row["roc_file"]).stat().st_size > 0


def test_dpsgd_with_very_large_noise_gives_a_bound_near_zero():
    row = audit("dpsgd", 0.3, steps=60)
    assert row["noise_multiplier"] > 5
    assert row["eps_lower_bound"] < 0.2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dpsgd_at_a_moderate_eps_never_exceeds_its_claim(seed):
    # Without noise this setting audits to about 1.6-2.0 (nonprivate, 60 steps, seeds 0-2): a canary
    # that bypassed the noise, or entered more often than q, would push the bound past the claim of 1.
    row = audit("dpsgd", 1.0, steps=60, seed=seed)
    assert row["eps_spent"] <= 1.0
    assert row["eps_lower_bound"] <= 1.0
    assert not row["exceeds_claim"]


def test_black_box_nonprivate_run_memorises_flipped_labels():
    row = audit("nonprivate", None, steps=100, m=100, threat="black")
    assert row["threat_model"] == "black"
    assert row["train_size"] == 512 - 100 + row["included"]  # N' = N - m + |S|
    assert row["eps_lower_bound"] > 1.0


def _hooked_run(mech_name: str, steps: int, m: int = 40, **mech_params):
    cfg = resolve({"mech": mech_name, "dataset": "synthetic", "eps": 4.0, "steps": steps, "mech_params": mech_params})
    data = load_dataset("synthetic")
    mech = get_mechanism(mech_name)(**cfg.mech_params)
    n = data.train_size
    q = cfg.sample_rate(n)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    noise = 1.0 if mech.private else 0.0  # the rate of entry does not depend on the noise; no calibration needed
    included = np.arange(m) % 2 == 0
    seed_of = lambda p: derive_seed(cfg.seed, p)  # noqa: E731
    hook = GradientCanaries(mech, included, mech.sample_rate(q), cfg.clip, cfg.batch_size, seed_of)
    train(cfg, mech, data, noise, steps, torch.device("cpu"), show_progress=False, on_optimizer=hook.attach)
    return hook, mech, q


@pytest.mark.parametrize("name", sorted(MECHANISMS.names()))
def test_every_registered_mechanism_takes_canaries_at_its_own_rate(name):
    steps = 8
    hook, mech, q = _hooked_run(name, steps)
    assert hook.steps_seen == steps  # once per logical step, empty batches included
    assert hook.entered[~hook.included].sum() == 0
    rate = mech.sample_rate(q)
    trials = steps * int(hook.included.sum())
    mean, sd = rate * trials, math.sqrt(trials * rate * (1 - rate))
    assert abs(hook.entered.sum() - mean) < 5 * sd + 1
    assert np.all(np.isfinite(hook.scores(get_mechanism(name)())))
    if name == "dpis":  # the differing record enters DPIS's gradient release at q_cap, not q
        assert hook.rate == mech.rates(q).q_cap > q


def test_canary_contribution_reaches_the_update_with_its_worst_case_shape():
    # modelmix's canary is p coordinates of C/sqrt(p): the scoring direction has exactly p non-zeros
    mm = get_mechanism("modelmix")(p=25)
    shapes = [torch.Size([30, 20]), torch.Size([7])]
    d = canary_direction(lambda p: derive_seed(0, p), 3, shapes, torch.device("cpu"))
    assert math.isclose(float(sum(t.pow(2).sum() for t in d)), 1.0, rel_tol=1e-5)
    c = mm.canary_contribution(d, 2.0)
    flat = torch.cat([t.reshape(-1) for t in c])
    assert int((flat != 0).sum()) == 25 and float(flat.norm()) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("args, word", [
    (["--mech", "dpsgdd", "--eps", "1"], "dpsgdd"),
    (["--mech", "dpsgd", "--eps", "0"], "--eps"),
    (["--mech", "dpsgd", "--eps", "-1"], "--eps"),
    (["--mech", "dpsgd"], "--eps"),
    (["--mech", "dpsgd", "--eps", "1", "--canaries", "1"], "--canaries"),
    (["--mech", "dpsgd", "--eps", "1", "--threat", "grey"], "--threat"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, args, word):
    result = CliRunner().invoke(app, ["audit", *args, "--dataset", "synthetic", "--out", str(tmp_path / "a.csv")])
    assert result.exit_code == 2, result.output
    assert word in result.output
    assert not (tmp_path / "a.csv").exists()


def test_cli_prints_the_verdict(tmp_path):
    result = CliRunner().invoke(app, ["audit", "--mech", "dpsgd", "--eps", "2", "--dataset", "synthetic", "--steps", "5",
                                      "--canaries", "20", "--quiet", "--out", str(tmp_path / "a.csv")])
    assert result.exit_code == 0, result.output
    assert "claimed eps 2" in result.output and "lower bound" in result.output
    assert "consistent with the claim" in result.output

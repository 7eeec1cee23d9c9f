"""Choosing the accountant: which mechanism takes which, the CLI, the CSV and the config hash."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.config import resolve
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import Mechanism
from dpbench.privacy import account, calibrate, check_accountant, eps_opacus, sgm_rdp
from dpbench.privacy.modelmix import INTEGER_ORDERS, modelmix_rdp
from dpbench.privacy.rdp import SGM_ORDERS

runner = CliRunner()
DELTA = 1e-5


@pytest.mark.parametrize("name", ["modelmix", "ged"])
@pytest.mark.parametrize("accountant", ["pld", "prv"])
def test_rdp_only_mechanisms_refuse_pld_and_prv_and_say_why(name, accountant):
    mech = get_mechanism(name)()
    assert mech.sampled_gaussians(1.0, 0.01, 10) is None
    with pytest.raises(BadInput, match=f"--accountant {accountant}: {name} has only an RDP analysis"):
        check_accountant(mech, accountant)
    res = runner.invoke(app, ["account", "--mech", name, "--n", "60000", "--batch-size", "256", "--epochs", "1",
                              "--clip", "1", "--eps", "3", "--accountant", accountant])
    assert res.exit_code == 2 and "only an RDP analysis" in res.output and "--accountant rdp" in res.output


def test_run_with_an_unusable_accountant_exits_2_and_writes_nothing():
    res = runner.invoke(app, ["run", "--mech", "modelmix", "--dataset", "synthetic", "--eps", "2", "--steps", "2",
                              "--accountant", "pld", "--quiet"])
    assert res.exit_code == 2 and "modelmix" in res.output and not Path("results").exists()
    res = runner.invoke(app, ["run", "--mech", "dpsgd", "--dataset", "synthetic", "--eps", "2", "--steps", "2",
                              "--accountant", "gdp", "--quiet"])
    assert res.exit_code == 2 and "--accountant 'gdp'" in res.output and not Path("results").exists()


def test_a_plugin_with_its_own_rdp_curve_is_rdp_only_unless_it_states_its_release():
    class OwnCurve(Mechanism):
        name = "own_curve"

        def rdp(self, noise_multiplier, q, steps):
            return SGM_ORDERS, 0.5 * sgm_rdp(q, noise_multiplier, steps)

    mech = OwnCurve()
    assert mech.rdp_only_reason is not None and mech.sampled_gaussians(1.0, 0.01, 10) is None
    with pytest.raises(BadInput, match="only an RDP analysis"):
        calibrate(mech, 1.0, 0.01, 100, DELTA, "pld")
    assert get_mechanism("psac")().rdp_only_reason is None  # inherits the sampled Gaussian untouched


def test_modelmix_is_never_worse_than_plain_dpsgd_accounting():
    mech = get_mechanism("modelmix")(p=1)  # p = 1: no l-infinity cap, the mixing buys little
    mech.bind(batch_size=512, clip=1.0)
    q, steps, z = 512 / 60000, 4687, 0.25
    phases = mech.phases(steps)
    own_alone = eps_opacus(INTEGER_ORDERS, modelmix_rdp(q, z, phases, 1), DELTA)[0]
    plain = eps_opacus(SGM_ORDERS, sgm_rdp(q, z, steps, SGM_ORDERS), DELTA)[0]
    assert own_alone > 10 * plain  # the authors' curve alone: no order below 2, where a large eps is attained
    report = account(mech, z, q, steps, DELTA, with_others=False)
    assert report.eps_rdp == pytest.approx(plain) and report.eps <= plain
    orders, curve = mech.rdp(z, q, steps)
    assert np.all(curve <= sgm_rdp(q, z, steps, orders) * (1 + 1e-12))  # per order, never above the plain curve
    integer = [orders.index(float(a)) for a in INTEGER_ORDERS]
    assert np.all(curve[integer] <= modelmix_rdp(q, z, phases, 1) * (1 + 1e-12))  # nor above the authors'
    # where the mixing helps (p = 100, the default), the authors' curve is the smaller one
    strong = get_mechanism("modelmix")()
    strong.bind(batch_size=512, clip=1.0)
    assert account(strong, 1.0, q, steps, DELTA, with_others=False).eps < 0.9 * account(
        get_mechanism("dpsgd")(), 1.0, q, steps, DELTA, with_others=False).eps


def test_modelmix_calibrates_small_eps_through_the_sampled_gaussian_orders():
    mech = get_mechanism("modelmix")()
    mech.bind(batch_size=512, clip=1.0)
    q, steps = 512 / 60000, 4687
    noise = calibrate(mech, 0.1, q, steps, DELTA)  # through the sampled-Gaussian orders above 64
    assert account(mech, noise, q, steps, DELTA, with_others=False).eps <= 0.1


def run_synthetic(*extra: str, out: str = "results/runs.csv") -> dict:
    res = runner.invoke(app, ["run", "--mech", "dpsgd", "--dataset", "synthetic", "--eps", "2", "--steps", "3",
                              "--quiet", "--out", out, *extra])
    assert res.exit_code == 0, res.output
    return list(csv.DictReader(open(out)))[-1]


def test_run_by_pld_reports_pld_and_every_other_eps():
    rdp = run_synthetic()
    pld = run_synthetic("--accountant", "pld")
    assert rdp["accountant"] == "sgm-rdp" and pld["accountant"] == "sgm-pld"
    assert float(pld["eps_spent"]) == float(pld["eps_pld"]) <= 2.0 and float(pld["eps_spent"]) >= 0.97 * 2
    assert float(pld["noise_multiplier"]) < float(rdp["noise_multiplier"])
    assert float(pld["eps_rdp"]) > 2.0  # the same noise by RDP
    assert float(rdp["eps_pld"]) < float(rdp["eps_spent"]) == float(rdp["eps_rdp"])
    assert "--accountant pld" in pld["command"] and "--accountant" not in rdp["command"]
    assert pld["config_hash"] != rdp["config_hash"]
    record = json.loads(Path("results/runs", pld["run_id"] + ".json").read_text())
    assert record["config"]["accountant"] == "pld" and record["privacy"]["calibrated_by"] == "pld"
    assert record["privacy"]["eps_by_accountant"]["pld"] == pytest.approx(float(pld["eps_spent"]))


def test_the_default_accountant_keeps_the_hashes_of_older_rows():
    """Config hashes written before --accountant existed (the committed MNIST sweep) still match, so sweeps skip them."""
    rows = [r for r in csv.DictReader(open(Path(__file__).parents[2] / "results/archive/mnist-2-epochs/runs.csv"))
            if r["mech"] == "dpsgd" and r["mech_params"] == "{}"]
    assert len(rows) >= 3
    for row in rows:
        options = {"mech": "dpsgd", "dataset": row["dataset"], "model": row["model"], "eps": float(row["eps_target"]),
                   "delta": float(row["delta"]), "batch_size": int(row["batch_size"]), "lr": float(row["lr"]),
                   "optimizer": row["optimizer"], "momentum": float(row["momentum"]), "clip": float(row["clip"])}
        if "--steps" in row["command"]:
            options["steps"] = int(row["steps"])
        else:
            options["epochs"] = float(row["epochs"])
        assert resolve(options).hash(row["dataset_variant"]) == row["config_hash"]
        assert resolve({**options, "accountant": "pld"}).hash(row["dataset_variant"]) != row["config_hash"]


def test_account_json_names_the_calibrating_accountant_and_all_eps():
    res = runner.invoke(app, ["account", "--mech", "dpsgd", "--n", "60000", "--batch-size", "256", "--epochs", "30",
                              "--eps", "2", "--accountant", "prv", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["calibrated_by"] == "prv" and out["accountant"] == "sgm-prv" and out["eps"] == out["eps_prv"] <= 2
    by = out["eps_by_accountant"]
    assert set(by) == {"rdp", "pld", "prv"} and by["pld"] < 2 < by["rdp"] == out["eps_rdp"]
    res = runner.invoke(app, ["account", "--mech", "modelmix", "--n", "60000", "--batch-size", "256", "--epochs", "1",
                              "--clip", "1", "--eps", "3", "--json"])
    by = json.loads(res.output)["eps_by_accountant"]
    assert by["pld"] is None and by["prv"] is None and by["rdp"] <= 3


def test_sweep_with_pld_names_the_mechanisms_that_cannot_take_it(tmp_path):
    res = runner.invoke(app, ["sweep", "--mech", "dpsgd,ged", "--dataset", "synthetic", "--accountant", "pld",
                              "--out", str(tmp_path / "s.csv"), "--dry-run"])
    assert res.exit_code == 2 and "ged has only an RDP analysis" in res.output and "[recipe.ged]" in res.output
    res = runner.invoke(app, ["sweep", "--mech", "dpsgd,dpis", "--dataset", "synthetic", "--accountant", "pld",
                              "--out", str(tmp_path / "s.csv"), "--dry-run"])
    assert res.exit_code == 0 and res.output.count("--accountant pld") == 2

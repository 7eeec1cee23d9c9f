"""End to end through the command line (Typer's CliRunner) on the synthetic dataset."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.results import ALL_COLUMNS, COLUMNS

runner = CliRunner()
QUICK = ["--dataset", "synthetic", "--steps", "4", "--quiet"]


def invoke(*args: str):
    return runner.invoke(app, list(args))


def rows(path: str = "results/runs.csv") -> list[dict]:
    return list(csv.DictReader(open(path))) if Path(path).exists() else []


def test_run_appends_a_complete_row_and_a_run_record():
    res = invoke("run", "--mech", "dpsgd", "--eps", "2", *QUICK)
    assert res.exit_code == 0, res.output
    (row,) = rows()
    assert tuple(row)[: len(COLUMNS)] == COLUMNS and tuple(row) == ALL_COLUMNS
    assert all(row[c] != "" for c in COLUMNS), {c: row[c] for c in COLUMNS if row[c] == ""}
    assert float(row["eps_spent"]) <= float(row["eps_target"]) == 2.0
    assert 0.0 <= float(row["test_acc"]) <= 1.0
    assert row["accountant"] == "sgm-rdp" and int(row["steps"]) == 4
    assert float(row["sample_rate"]) == pytest.approx(64 / 512)
    assert float(row["eps_prv"]) < float(row["eps_spent"])
    assert json.loads(row["mech_params"]) == {}
    assert row["command"].startswith("dpbench run --mech dpsgd")
    record = json.loads(Path("results/runs", row["run_id"] + ".json").read_text())
    assert record["config"]["eps"] == 2.0 and record["privacy"]["eps"] == float(row["eps_spent"])
    assert "accuracy" in res.output


def test_nonprivate_learns_the_synthetic_task():
    res = invoke("run", "--mech", "nonprivate", "--dataset", "synthetic", "--quiet")
    assert res.exit_code == 0, res.output
    (row,) = rows()
    assert row["eps_spent"] == "inf" and row["accountant"] == "none" and row["eps_target"] == "inf"
    assert float(row["test_acc"]) > 0.5  # chance is 0.1


def test_eps_inf_is_the_nonprivate_control():
    assert invoke("run", "--mech", "dpsgd", "--eps", "inf", *QUICK).exit_code == 0
    assert rows()[0]["mech"] == "nonprivate"


def test_same_seed_same_result_different_seed_different_result():
    for seed in ("1", "1", "2"):
        assert invoke("run", "--mech", "dpsgd", "--eps", "4", "--seed", seed, *QUICK).exit_code == 0
    a, b, c = rows()
    assert a["test_loss"] == b["test_loss"] and a["config_hash"] == c["config_hash"]
    assert a["test_loss"] != c["test_loss"]


def test_failure_mid_run_leaves_no_row(monkeypatch):
    from dpbench.mechanisms.base import DPBenchOptimizer

    calls = {"n": 0}
    original = DPBenchOptimizer.add_noise

    def failing(self):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        original(self)

    monkeypatch.setattr(DPBenchOptimizer, "add_noise", failing)
    res = invoke("run", "--mech", "dpsgd", "--eps", "2", *QUICK)
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)
    assert calls["n"] == 3
    assert rows() == [] and not list(Path(".").glob("results/runs/*.json"))


def test_account_json_has_the_contract_keys():
    res = invoke("account", "--mech", "dpsgd", "--n", "60000", "--batch-size", "256", "--steps", "4687",
                 "--sigma", "1.3", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    for key in ("mech", "noise_multiplier", "sample_rate", "steps", "delta", "accountant", "eps",
                "eps_classic", "eps_rdp", "eps_prv"):
        assert key in data
    assert data["eps"] == pytest.approx(1.1064, abs=5e-4) and data["steps"] == 4687


def test_account_calibrates_below_target():
    res = invoke("account", "--mech", "dpsgd", "--dataset", "mnist", "--eps", "3", "--json")
    data = json.loads(res.stdout)
    assert data["eps"] <= 3.0 and data["steps"] == math.floor(40 * 60000 / 512)
    assert data["noise_multiplier"] == pytest.approx(1.12, abs=0.01)


def test_account_nonprivate_writes_inf_as_string():
    res = invoke("account", "--mech", "nonprivate", "--sigma", "1", "--json")
    assert json.loads(res.stdout)["eps"] == "inf"


def test_ls_lists_every_registry_and_parameters():
    assert "dpsgd" in invoke("ls").output and "nonprivate" in invoke("ls", "mechanisms").output
    assert "synthetic" in invoke("ls", "datasets").output
    assert "cnn_tanh" in invoke("ls", "models", "--pattern", "*cnn*").output
    assert "linear" not in invoke("ls", "models", "--pattern", "*cnn*").output


BAD_INPUTS = [
    (["--mech", "dpsgd", "--eps", "0"], "--eps"),
    (["--mech", "dpsgd", "--eps", "-1"], "--eps"),
    (["--mech", "dpsgd", "--eps", "nan"], "--eps"),
    (["--mech", "dpsgd", "--eps", "3", "--delta", "0"], "--delta 0"),
    (["--mech", "dpsgd", "--eps", "3", "--delta", "1.5"], "--delta 1.5"),
    (["--mech", "dpsgd", "--eps", "3", "--delta", "0.01"], "1/N"),
    (["--mech", "dpsgd", "--eps", "3", "--batch-size", "100000"], "--batch-size 100000"),
    (["--mech", "dpsgd", "--eps", "3", "--epochs", "0"], "--epochs 0"),
    (["--mech", "dpsgd", "--eps", "3", "--epochs", "-2"], "--epochs -2"),
    (["--mech", "dpsdg", "--eps", "3"], "did you mean 'dpsgd'"),
    (["--mech", "dpsgd", "--eps", "3", "--dataset", "mnsit"], "did you mean 'mnist'"),
    (["--mech", "dpsgd", "--eps", "3", "--model", "cnn_tan"], "did you mean 'cnn_tanh'"),
    (["--mech", "dpsgd", "--eps", "3", "--set", "oops"], "--set 'oops'"),
    (["--mech", "dpsgd", "--eps", "3", "--set", "q_cap=0.1"], "--set q_cap"),
    (["--mech", "dpsgd", "--eps", "3", "--out", "/proc/nope/r.csv"], "--out /proc/nope/r.csv"),
    (["--mech", "dpsgd", "--eps", "3", "--device", "tpu"], "--device 'tpu'"),
    (["--mech", "dpsgd", "--eps", "3", "--optimizer", "rmsprop"], "--optimizer 'rmsprop'"),
    (["--mech", "dpsgd", "--eps", "3", "--clip", "inf"], "--clip inf: must be a finite number"),
    (["--mech", "dpsgd", "--eps", "3", "--clip", "nan"], "--clip nan"),
    (["--mech", "dpsgd", "--eps", "3", "--clip", "1e-13"], "--clip 1e-13"),
    (["--mech", "dpsgd", "--eps", "3", "--epochs", "2", "--steps", "5"],
     "--epochs 2.0 and --steps 5 given together: give one of them (--steps 5 would have been used"),
    (["--mech", "dpsgd", "--eps", "3", "--checkpoint-every", "0"], "--checkpoint-every 0"),
    (["--mech", "dpsgd", "--eps", "3", "--grad-sample", "ghost"], "--grad-sample 'ghost'"),
]


@pytest.mark.parametrize("args,named", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_exits_2_names_the_value_and_writes_nothing(args, named):
    dataset = [] if "--dataset" in args else ["--dataset", "synthetic"]
    res = invoke("run", *args, *dataset, "--quiet")
    assert res.exit_code == 2, res.output
    assert named in " ".join(res.output.split()), res.output
    assert not Path("results").exists()


@pytest.mark.parametrize("args,named", [
    (["--eps", "0"], "--eps 0"), (["--eps", "3", "--lr", "-1"], "--lr -1"), ([], "missing or invalid --eps"),
    (["--eps", "3", "--out", "/proc/nope/r.csv"], "--out /proc/nope/r.csv"),
])
def test_bad_values_are_named_before_any_data_is_looked_for(tmp_path, args, named):
    # MNIST is absent here: the error must be about the bad value, not about the missing data
    res = invoke("run", "--mech", "dpsgd", *args, "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"))
    assert res.exit_code == 2, res.output
    text = " ".join(res.output.split())
    assert named in text and "not found" not in text, text


def test_account_with_a_model_uses_that_models_recipe():
    res = invoke("account", "--mech", "modelmix", "--dataset", "cifar10", "--model", "resnet20_gn", "--sigma", "1",
                 "--json")
    assert res.exit_code == 0, res.output
    payload = json.loads(res.output)
    assert payload["batch_size"] == 1500 and payload["clip"] == 20.0


def test_delta_above_one_over_n_is_allowed_with_force():
    assert invoke("run", "--mech", "dpsgd", "--eps", "3", "--delta", "0.01", "--force", *QUICK).exit_code == 0


def test_missing_offline_data_names_the_paths_tried(tmp_path):
    res = invoke("run", "--mech", "dpsgd", "--eps", "3", "--dataset", "mnist", "--data-dir", str(tmp_path / "nowhere"))
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert str(tmp_path / "nowhere" / "mnist") in text and "--data-dir" in text
    assert not Path("results").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_an_error_not_a_fallback():
    res = invoke("run", "--mech", "dpsgd", "--eps", "3", "--device", "cuda", *QUICK)
    assert res.exit_code == 2 and "CUDA is not available" in res.output
    assert not Path("results").exists()


def test_typo_in_list_name():
    res = invoke("ls", "mechansims")
    assert res.exit_code == 2 and "did you mean 'mechanisms'" in res.output


def test_steps_and_epochs_in_a_config_file_are_refused_but_a_flag_replaces_the_files(tmp_path):
    both = tmp_path / "both.toml"
    both.write_text("epochs = 2\nsteps = 5\n")
    res = invoke("run", "--mech", "dpsgd", "--eps", "3", "--dataset", "synthetic", "--config", str(both), "--quiet")
    assert res.exit_code == 2 and f"in --config {both}" in " ".join(res.output.split())
    one = tmp_path / "one.toml"
    one.write_text("epochs = 2\n")
    assert invoke("run", "--mech", "dpsgd", "--eps", "3", "--dataset", "synthetic", "--config", str(one),
                  "--steps", "3", "--quiet").exit_code == 0
    assert rows()[0]["steps"] == "3"


def test_account_refuses_steps_with_epochs_and_an_infinite_clip():
    res = invoke("account", "--mech", "dpsgd", "--eps", "3", "--epochs", "2", "--steps", "5")
    assert res.exit_code == 2 and "--steps 5 would have been used" in " ".join(res.output.split())
    res = invoke("account", "--mech", "modelmix", "--eps", "3", "--clip", "inf")
    assert res.exit_code == 2 and "--clip inf" in res.output


@pytest.mark.parametrize("mech", ["dpsgd", "dpis", "ged"])
def test_a_huge_eps_target_calibrates_a_tiny_noise_instead_of_crashing(mech):
    # today: the PRV accountant allocated 13 TiB for the tiny noise and died with MemoryError (exit 1)
    res = invoke("account", "--mech", mech, "--eps", "1e9", "--json",
                 *(["--set", "k=8", "--set", "codebook_rows=4"] if mech == "ged" else []))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert 0 < out["noise_multiplier"] < 0.1 and out["eps"] <= 1e9 and out["eps_prv"] is None


def test_a_huge_eps_run_trains_and_records_its_eps():
    res = invoke("run", "--mech", "dpsgd", "--eps", "1e9", *QUICK)
    assert res.exit_code == 0, res.output
    (row,) = rows()
    assert float(row["eps_spent"]) <= 1e9 and float(row["noise_multiplier"]) < 0.01 and row["eps_prv"] == ""


def test_nonprivate_says_that_it_ignores_eps():
    res = invoke("run", "--mech", "nonprivate", "--eps", "3", *QUICK)
    assert res.exit_code == 0
    assert "warning: --eps 3 is ignored" in " ".join(res.stderr.split())
    assert "ignored" not in invoke("run", "--mech", "nonprivate", *QUICK).stderr


def test_run_help_says_what_secure_does_and_does_not_protect():
    text = " ".join(invoke("run", "--help").output.replace("│", " ").split())
    for phrase in ("OS entropy", "floating-point-attack", "does NOT make the generators cryptographic",
                   "torchcsprng", "never a reproducible run's", "(default: mnist)"):
        assert phrase in text, phrase

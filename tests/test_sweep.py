"""Sweeps: grid expansion, skipping finished configurations, failures, and surviving SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from dpbench.errors import BadInput
from dpbench.sweep import SweepSpec, expand, finished_keys, read_spec, run_command, run_sweep


def test_grid_expansion_and_dedup_of_the_nonprivate_control():
    spec = SweepSpec(grid={"mech": ["dpsgd", "nonprivate"], "dataset": ["synthetic"], "eps": [1, 2, 4],
                           "seed": [0, 1]}, fixed={"epochs": 1})
    configs = expand(spec)
    assert len(configs) == 3 * 2 + 1 * 2  # nonprivate ignores eps
    assert {c.mech for c in configs} == {"dpsgd", "nonprivate"}
    assert all(c.epochs == 1 for c in configs)


def test_star_means_every_built_in_mechanism_and_a_plugin_joins_when_named(monkeypatch):
    from dpbench.mechanisms import MECHANISMS
    from dpbench.mechanisms.dpsgd import DPSGD
    from dpbench.registry import Entry

    class Plugin(DPSGD):
        name = "someplugin"

    monkeypatch.setitem(MECHANISMS._entries, "someplugin", Entry("someplugin", Plugin, {"plugin": "a-dist"}))
    configs = expand(SweepSpec(grid={"mech": ["*"], "dataset": ["synthetic"], "eps": [3]}))
    assert {c.mech for c in configs} == set(MECHANISMS.names()) - {"someplugin"}
    assert "dpsgd" in {c.mech for c in configs}
    named = expand(SweepSpec(grid={"mech": ["dp*", "someplugin"], "dataset": ["synthetic"], "eps": [3]}))
    assert [c.mech for c in named] == ["dpis", "dpsgd", "someplugin"]


def test_recipe_overrides_apply_to_their_mechanism_only(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[grid]\nmech = ["dpsgd", "nonprivate"]\ndataset = ["synthetic"]\neps = [3]\n'
                    '[fixed]\nepochs = 2\n[recipe.dpsgd]\nlr = 0.7\n')
    by_mech = {c.mech: c for c in expand(read_spec(str(path)))}
    assert by_mech["dpsgd"].lr == 0.7 and by_mech["nonprivate"].lr != 0.7
    assert by_mech["dpsgd"].epochs == 2 == by_mech["nonprivate"].epochs


def test_recipes_under_fixed_is_the_same_as_at_the_top(tmp_path):
    top, fixed = tmp_path / "top.toml", tmp_path / "fixed.toml"
    top.write_text('recipes = "r.toml"\n[grid]\nmech = ["dpsgd"]\n')
    fixed.write_text('[grid]\nmech = ["dpsgd"]\n[fixed]\nrecipes = "r.toml"\n')
    assert read_spec(str(top)).recipes == read_spec(str(fixed)).recipes == "r.toml"
    assert "recipes" not in read_spec(str(fixed)).fixed
    both = tmp_path / "both.toml"
    both.write_text('recipes = "a.toml"\n[fixed]\nrecipes = "b.toml"\n')
    with pytest.raises(BadInput, match="'a.toml' at the top and 'b.toml' under"):
        read_spec(str(both))
    per_mech = tmp_path / "m.toml"
    per_mech.write_text('[recipe.dpsgd]\nrecipes = "a.toml"\n')
    with pytest.raises(BadInput, match=r"recipes under \[recipe.dpsgd\]"):
        read_spec(str(per_mech))


def test_execution_settings_of_a_spec_reach_its_runs(tmp_path):
    spec = SweepSpec(grid={"mech": ["dpsgd"], "dataset": ["synthetic"], "eps": [2.0]},
                     fixed={"steps": 2, "physical_batch_size": 16, "data_dir": str(tmp_path)})
    (cfg,) = expand(spec)
    args = run_command(cfg, str(tmp_path / "runs.csv"), "cpu", str(tmp_path / "ck"))
    assert args[args.index("--physical-batch-size") + 1] == "16"
    assert args[args.index("--data-dir") + 1] == str(tmp_path)
    assert args[args.index("--checkpoint-dir") + 1] == str(tmp_path / "ck")
    assert "--physical-batch-size" not in cfg.command()  # the reproducing command is unchanged


def test_bad_spec_is_a_clear_error(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text('[grid]\nmechs = ["dpsgd"]\n')
    with pytest.raises(BadInput, match="mechs"):
        read_spec(str(path))
    with pytest.raises(BadInput, match="did you mean 'dpsgd'"):
        expand(SweepSpec(grid={"mech": ["dpsdg"], "dataset": ["synthetic"]}))


def test_failed_configuration_is_logged_and_the_others_run(tmp_path):
    out = str(tmp_path / "r.csv")
    spec = SweepSpec(grid={"mech": ["dpsgd"], "dataset": ["synthetic"], "eps": [2, 4]}, fixed={"steps": 2},
                     recipe={})
    good, other = expand(spec)
    import dataclasses

    bad = dataclasses.replace(other, batch_size=10**6)  # rejected by the run: batch larger than N
    outcomes = run_sweep([bad, good], out, jobs=2)
    assert [o.ok for o in outcomes if o.cfg is bad] == [False]
    assert [o.ok for o in outcomes if o.cfg is good] == [True]
    log = Path(out).with_suffix(".failures.log").read_text()
    assert "--batch-size 1000000" in log and "reproduce: dpbench run" in log
    assert len(pd.read_csv(out)) == 1
    # a finished sweep re-run trains nothing
    assert run_sweep([good], out) == []


def test_killed_sweep_resumes_with_each_configuration_exactly_once(tmp_path):
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "dpbench.cli", "sweep", "--mech", "dpsgd", "--dataset", "synthetic",
           "--eps", "1,2,3", "--seeds", "0", "--epochs", "8", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(finished_keys(out)) < 1:
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)  # mid-sweep: one row written, the next run in flight
    proc.wait()
    assert 1 <= len(finished_keys(out)) < 3
    time.sleep(1.0)  # the in-flight child dies with its parent
    rows_after_kill = len(pd.read_csv(out))
    assert rows_after_kill == len(finished_keys(out))
    resumed = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    df = pd.read_csv(out, dtype={"config_hash": str})
    assert len(df) == 3 and df.groupby(["config_hash", "seed"]).size().max() == 1
    assert sorted(df["eps_target"]) == [1.0, 2.0, 3.0]


def test_every_committed_sweep_spec_expands(monkeypatch):
    """A typo in a campaign's spec must fail here, not hours into the campaign."""
    from dataclasses import replace

    from dpbench.tuning.recipes_file import read_recipes

    root = Path(__file__).parents[1]
    monkeypatch.chdir(root)  # specs name their recipes and outputs relative to the repository
    specs = sorted((root / "benchmarks").rglob("*.toml"))
    assert len(specs) >= 10
    for path in specs:
        spec = read_spec(str(path.relative_to(root)))
        if spec.recipes is not None and not Path(spec.recipes).exists():
            spec = replace(spec, recipes=None)  # a pair not tuned yet: its grid and tables still resolve
        tuned = {r.mech for r in read_recipes(spec.recipes)} if spec.recipes else set()
        waiting = [m for m in spec.grid.get("mech", []) if spec.recipes and m not in tuned]
        if waiting:  # a pair tuned in part: the mechanisms whose studies run still resolve on built-in recipes
            configs = (expand(replace(spec, grid={**spec.grid, "mech": [m for m in spec.grid["mech"] if m in tuned]}))
                       + expand(replace(spec, recipes=None, grid={**spec.grid, "mech": waiting})))
        else:
            configs = expand(spec)
        assert configs, path
        assert all(str(c.out).startswith("results/") for c in configs), path


def test_a_note_shared_by_every_seed_of_a_configuration_is_said_once(capsys):
    from dpbench.tuning.recipes_file import TunedRecipe, write_recipes

    tuned = TunedRecipe(mech="dpsgd", dataset="synthetic", eps=2.0, model="linear", batch_size=64, epochs=2.0, lr=0.1,
                        optimizer="sgd", momentum=0.0, clip=1.0, source="t/study.db#1", val_acc=0.9, trials=12,
                        pruned=0, cpu_s=1.0, mech_params={})
    write_recipes("r.toml", [tuned], "test")
    spec = SweepSpec(grid={"mech": ["dpsgd"], "dataset": ["synthetic"], "model": ["linear"], "eps": [1, 2, 4],
                           "seed": [0, 1, 2]}, recipes="r.toml")
    configs = expand(spec)
    assert len(configs) == 9 and {c.lr for c in configs} == {0.1}
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == 2 and "no recipe tuned at eps 1" in notes[0] and "no recipe tuned at eps 4" in notes[1]
    expand(spec)  # a second expansion (a second sweep) says them again
    assert len([line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]) == 2

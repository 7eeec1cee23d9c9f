"""``dpbench tune`` end to end on the synthetic validation split: budgets, resumption, faults, bad input."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import optuna
import pytest
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.mechanisms import MECHANISMS
from dpbench.mechanisms.dpsgd import DPSGD
from dpbench.privacy.rdp import SGM_ORDERS
from dpbench.registry import Entry
from dpbench.tuning.recipes_file import read_recipes
from dpbench.tuning.runner import TuneRequest, interim_progress, trial_progress, tune
from dpbench.tuning.space import SharedSpace

runner = CliRunner()
SMALL = ["--dataset", "synthetic", "--model", "linear", "--eps", "4", "--batch-sizes", "32,64", "--epoch-choices",
         "1,2"]
SHARED = SharedSpace(batch_sizes=(32, 64), epochs=(1.0, 2.0))


def tune_cli(*args: str, out: str = "t/recipes.toml"):  # noqa: ANN201
    return runner.invoke(app, ["tune", *SMALL, "--out", out, *args])


def studies(path: str = "t/recipes.db") -> dict[str, list]:
    storage = f"sqlite:///{Path(path).resolve()}"
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).get_trials()
            for s in optuna.study.get_all_study_summaries(storage)}


def finished(trials) -> list:  # noqa: ANN001
    return [t for t in trials if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)]


def rows(path: str = "t/recipes.trials.csv") -> list[dict]:
    return list(csv.DictReader(open(path))) if Path(path).exists() else []


def test_equal_budget_on_the_validation_split_and_a_recipe_per_mechanism():
    res = tune_cli("--mech", "dpsgd,auto_s", "--trials", "3")
    assert res.exit_code == 0, res.output
    by_mech = studies()
    assert sorted(by_mech) == ["auto_s", "dpsgd"]
    assert all(len(finished(t)) == 3 for t in by_mech.values())  # the same budget for every mechanism
    trial_rows = rows()
    assert trial_rows and {r["dataset"] for r in trial_rows} == {"synthetic_val"}  # never the test split
    assert {r["eps_target"] for r in trial_rows} == {"4.0"} and all(float(r["eps_spent"]) <= 4 for r in trial_rows)
    recipes = {r.mech: r for r in read_recipes("t/recipes.toml")}
    assert sorted(recipes) == ["auto_s", "dpsgd"]
    for mech, recipe in recipes.items():
        assert recipe.dataset == "synthetic" and recipe.model == "linear" and recipe.eps == 4.0 and recipe.trials == 3
        study_file, number = recipe.source.rsplit("#", 1)
        best = by_mech[mech][int(number)]
        assert Path(study_file) == Path("t/recipes.db").resolve() or study_file == "t/recipes.db"
        assert recipe.val_acc == best.value == max(t.value for t in by_mech[mech] if t.value is not None)
        row = next(r for r in trial_rows if r["run_id"] == best.user_attrs["run_id"])
        assert float(row["test_acc"]) == recipe.val_acc and float(row["lr"]) == pytest.approx(recipe.lr)
        assert recipe.batch_size in (32, 64) and recipe.epochs in (1.0, 2.0)
    assert 0.01 <= recipes["auto_s"].clip <= 10 and 1e-3 <= recipes["auto_s"].mech_params["gamma"] <= 1.0
    # a line per finished trial, so that a long tune's log shows where it is
    assert "auto_s: trial 2 " in res.output and "3 of 3 finished, about 0:00 left for auto_s" in res.output
    # and a line at each interim evaluation inside a trial, before the trial's line
    interim = re.findall(r"dpsgd: trial 0 at step (\d+) of (\d+), validation accuracy 0\.\d{4} after", res.output)
    assert len(interim) == 3 and len({total for _, total in interim}) == 1
    assert res.output.index("dpsgd: trial 0 at step") < res.output.index("dpsgd: trial 0 validation accuracy")

    # a finished tune trains nothing, rewrites --out and exits 0
    Path("t/recipes.toml").unlink()
    before = len(rows())
    again = tune_cli("--mech", "dpsgd,auto_s", "--trials", "3")
    assert again.exit_code == 0 and len(rows()) == before and Path("t/recipes.toml").exists()
    assert {r.source for r in read_recipes("t/recipes.toml")} == {r.source for r in recipes.values()}

    # the budget is the total: raising it runs only the difference
    more = tune_cli("--mech", "dpsgd", "--trials", "4")
    assert more.exit_code == 0 and len(finished(studies()["dpsgd"])) == 4 and len(finished(studies()["auto_s"])) == 3
    assert {r.mech for r in read_recipes("t/recipes.toml")} == {"dpsgd", "auto_s"}  # auto_s's entry is kept


def test_the_progress_line_after_a_trial_counts_its_mechanisms_finished_trials_and_the_time_left():
    study = optuna.create_study(direction="maximize")
    State = optuna.trial.TrialState
    dist = {"lr": optuna.distributions.FloatDistribution(0.01, 1.0)}
    for state, value, wall in ((State.COMPLETE, 0.91, 100.0), (State.PRUNED, None, 20.0), (State.FAIL, None, 5.0),
                               (State.COMPLETE, 0.93, 60.0)):
        study.add_trial(optuna.trial.create_trial(state=state, value=value, params={"lr": 0.1}, distributions=dist,
                                                  user_attrs={"wall_s": wall}))
    # 3 finished of 12 (the failed trial is not one), 9 left on 2 workers: 5 rounds of the mean 60 s
    line = trial_progress(study, "dpsgd", 3, 12, 2)
    assert line == ("dpsgd: trial 3 validation accuracy 0.9300 in 1:00; 3 of 12 finished, "
                    "about 5:00 left for dpsgd")
    assert "trial 1 pruned in 0:20" in trial_progress(study, "dpsgd", 1, 12, 2)
    assert "trial 2 fail in 0:05" in trial_progress(study, "dpsgd", 2, 12, 2)


def test_the_progress_line_inside_a_trial_says_where_it_is_and_the_time_left_at_its_pace():
    # a quarter of 800 steps in 10 minutes: three quarters left, 30 minutes
    assert interim_progress("ged", 4, 200, 800, 0.41234, 600.0) == (
        "ged: trial 4 at step 200 of 800, validation accuracy 0.4123 after 10:00; about 30:00 left in this trial")


@pytest.mark.slow  # about 15 s: two worker processes
def test_parallel_workers_never_overshoot_the_budget():
    res = tune_cli("--mech", "dpsgd", "--trials", "3", "--jobs", "2")
    assert res.exit_code == 0, res.output
    assert len(finished(studies()["dpsgd"])) == 3 and len(studies()["dpsgd"]) == 3


def test_a_killed_tune_resumes_and_its_running_trial_is_run_again():
    assert tune_cli("--mech", "dpsgd", "--trials", "1").exit_code == 0
    study = optuna.load_study(study_name="dpsgd", storage=f"sqlite:///{Path('t/recipes.db').resolve()}")
    study.ask()  # a trial a killed tune left running
    assert tune_cli("--mech", "dpsgd", "--trials", "2").exit_code == 0
    trials = studies()["dpsgd"]
    assert len(finished(trials)) == 2 and sum(t.state == optuna.trial.TrialState.FAIL for t in trials) == 1


def test_a_cut_trial_is_run_again_wherever_it_was_and_a_resumed_tune_repeats_no_finished_trial(monkeypatch):
    import dpbench.tuning.runner as tuning_runner

    trained = tuning_runner.train_reporting
    calls = []

    def cut_the_second(cfg, trial, **kwargs):  # noqa: ANN001, ANN202
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the tune is killed inside trial 1, after it drew its parameters
        return trained(cfg, trial, **kwargs)

    monkeypatch.setattr(tuning_runner, "train_reporting", cut_the_second)
    with pytest.raises(KeyboardInterrupt):
        tune(request("dpsgd", 3))
    monkeypatch.setattr(tuning_runner, "train_reporting", trained)
    cut = optuna.load_study(study_name="dpsgd", storage=f"sqlite:///{Path('t/study.db').resolve()}").trials[1]
    assert cut.state == optuna.trial.TrialState.RUNNING and cut.params

    assert tune(request("dpsgd", 3))
    trials = optuna.load_study(study_name="dpsgd", storage=f"sqlite:///{Path('t/study.db').resolve()}").trials
    State = optuna.trial.TrialState
    assert [t.state for t in trials] == [State.COMPLETE, State.FAIL, State.COMPLETE, State.COMPLETE]
    assert trials[2].params == cut.params and trials[2].user_attrs["rerun_of"] == 1  # the cut trial, run again
    drawn = [tuple(sorted(t.params.items())) for t in finished(trials)]
    assert len(set(drawn)) == 3  # the resumed tune's own draw is new, not the study's first again


def test_a_cut_trial_that_repeats_a_finished_one_is_not_queued_again():
    from dpbench.tuning.runner import rerun_cut_trials

    study = optuna.create_study(direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(0.01, 1.0)}
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, value=0.9, params={"lr": 0.1},
                                              distributions=dist))
    for lr in (0.1, 0.5):  # a repeat of trial 0 (left by an earlier resumption) and a new draw, both cut
        trial = study.ask()
        trial.suggest_float("lr", lr, lr)
    rerun_cut_trials(study)
    State = optuna.trial.TrialState
    assert [t.state for t in study.trials[:3]] == [State.COMPLETE, State.FAIL, State.FAIL]
    queued = study.get_trials(deepcopy=False, states=(State.WAITING,))
    assert [(t.system_attrs["fixed_params"], t.user_attrs["rerun_of"]) for t in queued] == [({"lr": 0.5}, 2)]


class Unreachable(DPSGD):
    """An accountant with a floor: no noise reaches small eps."""

    name = "unreachable"

    def rdp(self, noise_multiplier, q, steps):  # noqa: ANN001
        return SGM_ORDERS, np.full(len(SGM_ORDERS), 10.0)

    def sampled_gaussians(self, noise_multiplier, q, steps):  # noqa: ANN001
        return None


class CrashesAtLargeLr(DPSGD):
    name = "crashy"

    def setup(self, ctx):  # noqa: ANN001
        if ctx.optimizer.param_groups[0]["lr"] > 0.3:
            raise RuntimeError("boom")


def register(monkeypatch, cls) -> None:  # noqa: ANN001
    monkeypatch.setitem(MECHANISMS._entries, cls.name, Entry(cls.name, cls, {"plugin": "tests"}))


def request(mech: str, trials: int) -> TuneRequest:
    return TuneRequest(mechs=(mech,), dataset="synthetic", model="linear", eps=4.0, trials=trials,
                       study="t/study.db", out="t/r.toml", shared=SHARED)


def test_an_unreachable_eps_is_a_pruned_trial_and_a_crash_a_failed_one(monkeypatch):
    register(monkeypatch, Unreachable)
    assert tune(request("unreachable", 2)) == []  # no completed trial, no recipe, no crash
    trials = studies("t/study.db")["unreachable"]
    assert len(trials) == 2 and all(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    assert all("unreachable" in t.user_attrs["pruned"] for t in trials)

    register(monkeypatch, CrashesAtLargeLr)
    req = TuneRequest(mechs=("crashy",), dataset="synthetic", model="linear", eps=4.0, trials=3,
                      study="t/crashy.db", out="t/c.toml", shared=SHARED)
    recipes = tune(req)
    trials = studies("t/crashy.db")["crashy"]
    failed = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert failed and all("boom" in t.user_attrs["error"] and "dpbench run" in t.user_attrs["command"] for t in failed)
    assert len(finished(trials)) == 3 or len(failed) == 5  # the tune went on past the crashes
    assert all(r.lr <= 0.3 for r in recipes)


def test_constraints_and_own_parameters_shape_each_mechanisms_space():
    from dpbench.tuning.space import mechanism_space

    shared = SharedSpace(batch_sizes=(256, 2048, 8192), epochs=(5.0,), momentum=(0.0, 0.9))
    mm = mechanism_space("modelmix", shared, "sgd")
    assert mm.momentum == (0.0,) and set(mm.own) == {"p", "gamma"} and mm.batch_sizes == (256, 2048, 8192)
    ged = mechanism_space("ged", shared, "sgd")
    assert ged.batch_sizes == (256,) and ged.momentum == (0.0, 0.9) and set(ged.own) == {"kappa"}
    assert mechanism_space("nonprivate", shared, "sgd").clip is None
    dpsgd = mechanism_space("dpsgd", shared, "sgd")
    assert dpsgd.own == {} and dpsgd.lr == mm.lr and dpsgd.clip == mm.clip  # the shared part is the same


def test_a_learning_rate_range_replaces_its_optimizers_default_and_is_part_of_the_study():
    from dpbench.tuning.space import LR_RANGES, mechanism_space

    wide = SharedSpace(lr_ranges=(("sgd", 1.0, 1000.0),))
    assert mechanism_space("modelmix", wide, "sgd").lr == (1.0, 1000.0)
    assert mechanism_space("dpsgd", wide, "adam").lr == LR_RANGES["adam"]  # other optimizers keep theirs
    assert "lr_ranges" not in SharedSpace().describe()  # studies made before the option still match
    assert wide.describe()["lr_ranges"] == (("sgd", 1.0, 1000.0),)
    assert tune_cli("--mech", "dpsgd", "--trials", "1", "--lr-range", "sgd=0.5:0.6").exit_code == 0
    lr = studies()["dpsgd"][0].params["lr"]
    assert 0.5 <= lr <= 0.6
    other = tune_cli("--mech", "dpsgd", "--trials", "1")  # the same study with the default range: refused
    assert other.exit_code == 2 and "learning-rate ranges" in other.output, other.output


@pytest.mark.parametrize("args,message", [
    (["--mech", "dpsdg", "--trials", "2"], "did you mean 'dpsgd'"),
    (["--mech", "dpsgd", "--trials", "0"], "--trials 0"),
    (["--mech", "dpsgd", "--trials", "2", "--dataset", "synthetic_val"], "give the dataset to tune for"),
    (["--mech", "dpsgd", "--trials", "2", "--dataset", "cifar10_aug"], "no validation split"),
    (["--mech", "dpsgd", "--trials", "2", "--batch-sizes", "0"], "--batch-sizes 0"),
    (["--mech", "dpsgd", "--trials", "2", "--lr-range", "sgd=5:1"], "--lr-range sgd=5:1: needs 0 < low < high"),
    (["--mech", "dpsgd", "--trials", "2", "--lr-range", "rmsprop=1:2"], "unknown optimizer 'rmsprop'"),
    (["--mech", "dpsgd", "--trials", "2", "--lr-range", "sgd=1-1000"], "--lr-range sgd=1-1000: expected"),
])
def test_bad_input_exits_2_and_writes_nothing(args, message):
    res = tune_cli(*args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert not Path("t").exists()


def test_a_study_of_another_configuration_or_an_unwritable_out_is_refused():
    assert tune_cli("--mech", "dpsgd", "--trials", "1").exit_code == 0
    before = Path("t/recipes.db").read_bytes(), Path("t/recipes.toml").read_text()
    other_eps = runner.invoke(app, ["tune", *SMALL[:4], "--eps", "2", *SMALL[6:], "--out", "t/recipes.toml",
                                    "--mech", "dpsgd", "--trials", "1"])
    assert other_eps.exit_code == 2 and "belongs to another configuration" in other_eps.output
    other_space = tune_cli("--mech", "dpsgd", "--trials", "1", "--epoch-choices", "3")
    assert other_space.exit_code == 2 and "search space" in other_space.output
    assert (Path("t/recipes.db").read_bytes(), Path("t/recipes.toml").read_text()) == before
    res = tune_cli("--mech", "dpsgd", "--trials", "1", out="t/recipes.toml/r.toml")  # a file where a folder must be
    assert res.exit_code == 2 and "is not a directory" in res.output
    assert (Path("t/recipes.db").read_bytes(), Path("t/recipes.toml").read_text()) == before


def test_run_uses_the_tuned_recipe_and_records_where_it_came_from():
    assert tune_cli("--mech", "dpsgd", "--trials", "1").exit_code == 0
    (recipe,) = read_recipes("t/recipes.toml")
    res = runner.invoke(app, ["run", "--mech", "dpsgd", "--dataset", "synthetic", "--model", "linear", "--eps", "4",
                              "--recipes", "t/recipes.toml", "--quiet", "--out", "final.csv"])
    assert res.exit_code == 0, res.output
    (row,) = rows("final.csv")
    assert row["recipe_source"] == recipe.source and row["dataset"] == "synthetic"
    assert float(row["lr"]) == pytest.approx(recipe.lr) and int(row["batch_size"]) == recipe.batch_size
    nearest = runner.invoke(app, ["run", "--mech", "dpsgd", "--dataset", "synthetic", "--model", "linear", "--eps",
                                  "8", "--recipes", "t/recipes.toml", "--quiet", "--out", "final.csv"])
    assert nearest.exit_code == 0 and "nearest tuned eps, 4" in nearest.output
    builtin = runner.invoke(app, ["run", "--mech", "dpsgd", "--dataset", "synthetic", "--eps", "4", "--quiet",
                                  "--steps", "2", "--out", "builtin.csv"])
    assert builtin.exit_code == 0 and rows("builtin.csv")[0]["recipe_source"] == "dpbench test recipe"
    report = runner.invoke(app, ["report", "final.csv"])
    assert report.exit_code == 0 and "## Tuning" in report.output and "not privacy-accounted" in report.output
    budget = next(line for line in report.output.splitlines() if line.startswith("| dpsgd | `t/recipes.db`"))
    cells = [c.strip() for c in budget.split("|")[1:-1]]
    study = studies()["dpsgd"]
    assert cells[2] == "1" and cells[3] == str(sum(t.state == optuna.trial.TrialState.PRUNED for t in study))
    assert cells[6] == f"{100 * recipe.val_acc:.2f} %" and cells[7] == recipe.source.rsplit("#", 1)[1]
    missing = runner.invoke(app, ["run", "--mech", "auto_s", "--dataset", "synthetic", "--eps", "4",
                                  "--recipes", "t/recipes.toml", "--quiet", "--out", "x.csv"])
    assert missing.exit_code == 2 and "no tuned recipe for auto_s" in missing.output and not Path("x.csv").exists()


def test_run_cuts_a_tuned_horizon_that_cannot_reach_the_eps_and_says_so():
    from dpbench.tuning.recipes_file import TunedRecipe, write_recipes

    # GED on the synthetic data at batch 64: eps 1 is reachable at 4 epochs, not at the 8 tuned at eps 2
    tuned = TunedRecipe(mech="ged", dataset="synthetic", eps=2.0, model="linear", batch_size=64, epochs=8.0, lr=0.1,
                        optimizer="sgd", momentum=0.0, clip=0.5, source="t/study.db#3", val_acc=0.9, trials=12,
                        pruned=0, cpu_s=1.0, mech_params={"kappa": 2.0})
    write_recipes("ged.toml", [tuned], "test")
    res = runner.invoke(app, ["run", "--mech", "ged", "--dataset", "synthetic", "--eps", "1", "--recipes", "ged.toml",
                              "--quiet", "--out", "ged.csv"])
    assert res.exit_code == 0, res.output
    assert "eps 1 is unreachable at the tuned horizon (8 epochs of batch 64); using 4 epochs" in res.output
    (row,) = rows("ged.csv")
    assert float(row["epochs"]) == 4.0 and int(row["steps"]) == 4 * 512 // 64 and float(row["eps_spent"]) <= 1.0
    assert row["recipe_source"] == "t/study.db#3 (epochs 8 -> 4: eps 1 unreachable at 8)"
    assert float(row["lr"]) == tuned.lr and float(row["clip"]) == tuned.clip and int(row["batch_size"]) == 64
    assert "--epochs 4 " in row["command"]
    again = runner.invoke(app, ["run", *row["command"].split()[2:], "--quiet", "--out", "again.csv"])  # as a sweep
    assert again.exit_code == 0, again.output
    assert rows("again.csv")[0]["recipe_source"] == row["recipe_source"]
    assert rows("again.csv")[0]["config_hash"] == row["config_hash"]
    report = runner.invoke(app, ["report", "ged.csv"])
    assert report.exit_code == 0, report.output
    assert "| 3; epochs 8 -> 4: eps 1 unreachable at 8 |" in report.output  # the tuning table names the change


@pytest.mark.slow  # about 17 s: a sweep of subprocess runs (run --recipes is tested in-process)
def test_a_sweep_with_tuned_recipes_records_their_source():
    assert tune_cli("--mech", "dpsgd", "--trials", "1").exit_code == 0
    (recipe,) = read_recipes("t/recipes.toml")
    Path("spec.toml").write_text('recipes = "t/recipes.toml"\n[grid]\nmech = ["dpsgd"]\ndataset = ["synthetic"]\n'
                                 'model = ["linear"]\neps = [4]\nseed = [0]\n')
    res = runner.invoke(app, ["sweep", "spec.toml", "--out", "sweep.csv"])
    assert res.exit_code == 0, res.output
    (row,) = rows("sweep.csv")
    assert row["recipe_source"] == recipe.source and "--recipes t/recipes.toml" in row["command"]
    assert float(row["lr"]) == pytest.approx(recipe.lr)

"""RunConfig resolution, --set parsing and the config hash."""

from __future__ import annotations

import dataclasses
import math

import pytest

from dpbench.config import parse_sets, parse_value, resolve
from dpbench.errors import BadInput
from dpbench.recipes import recipe_for


def test_parse_value_order():
    assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
    assert parse_value("0.05") == 0.05
    assert math.isinf(parse_value("inf"))
    assert parse_value("true") is True and parse_value("False") is False
    assert parse_value("adam") == "adam"


@pytest.mark.parametrize("bad", ["q_cap", "=3", "q_cap=", "1x=2", "a b=1"])
def test_malformed_set_is_rejected(bad):
    with pytest.raises(BadInput, match="expected key=value"):
        parse_sets([bad])


def test_recipe_then_file_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr = 0.25\nepochs = 3\nbatch_size = 128\n[set]\nfoo = 1\n')
    cfg = resolve({"mech": "dpsgd", "dataset": "mnist", "eps": 3.0, "epochs": 5.0}, str(f))
    r = recipe_for("mnist", "dpsgd")
    assert cfg.lr == 0.25 and cfg.batch_size == 128  # from the file
    assert cfg.epochs == 5.0  # the flag beats the file
    assert cfg.clip == r.clip and cfg.model == r.model  # the recipe fills the rest
    assert cfg.mech_params == {"foo": 1}


def test_eps_inf_means_nonprivate():
    cfg = resolve({"mech": "dpsgd", "dataset": "mnist", "eps": float("inf")})
    assert cfg.mech == "nonprivate" and math.isinf(cfg.eps)


def test_steps_replace_epochs():
    cfg = resolve({"mech": "dpsgd", "dataset": "mnist", "eps": 1.0, "steps": 10})
    assert cfg.num_steps(60000) == 10 and cfg.nominal_epochs(60000) == pytest.approx(10 * 512 / 60000)
    cfg = resolve({"mech": "dpsgd", "dataset": "mnist", "eps": 1.0, "epochs": 1.0})
    assert cfg.num_steps(60000) == 117  # floor(1 * 60000 / 512)


def test_hash_ignores_seed_device_paths_but_not_hyperparameters():
    base = resolve({"mech": "dpsgd", "dataset": "mnist", "eps": 3.0})
    h = base.hash("mnist")
    for change in (dict(seed=7), dict(device="cuda"), dict(out="x.csv"), dict(data_dir="/d"),
                   dict(physical_batch_size=32)):
        assert dataclasses.replace(base, **change).hash("mnist") == h, change
    for change in (dict(lr=0.4), dict(clip=0.2), dict(batch_size=256), dict(epochs=20.0), dict(eps=2.0),
                   dict(delta=1e-6), dict(momentum=0.5), dict(model="linear"), dict(mech_params={"p": 1})):
        assert dataclasses.replace(base, **change).hash("mnist") != h, change
    assert base.hash("mnist-other-variant") != h


def tuned_file(tmp_path, **values) -> str:
    """A recipes TOML with one tuned GED recipe (batch 64 on the synthetic data unless ``values`` say otherwise)."""
    from dpbench.tuning.recipes_file import TunedRecipe, write_recipes

    fields = dict(mech="ged", dataset="synthetic", eps=2.0, model="linear", batch_size=64, epochs=8.0, lr=0.1,
                  optimizer="sgd", momentum=0.0, clip=0.5, source="t/study.db#3", val_acc=0.9, trials=12, pruned=0,
                  cpu_s=1.0, mech_params={"kappa": 2.0})
    fields.update(values)
    path = tmp_path / "recipes.toml"
    write_recipes(path, [TunedRecipe(**fields)], "test recipes")
    return str(path)


def steps_reach(cfg, n: int) -> bool:
    from dpbench.mechanisms import get_mechanism
    from dpbench.privacy import eps_reachable

    mech = get_mechanism(cfg.mech)(**cfg.mech_params)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    return eps_reachable(mech, cfg.eps, cfg.batch_size / n, cfg.num_steps(n), cfg.delta)


def test_a_tuned_horizon_that_cannot_reach_the_eps_is_halved_and_nothing_else_changes(tmp_path):
    recipes = tuned_file(tmp_path)
    at_tuned = resolve({"mech": "ged", "dataset": "synthetic", "eps": 2.0, "recipes": recipes})
    assert at_tuned.epochs == 8.0 and at_tuned.recipe_source == "t/study.db#3" and steps_reach(at_tuned, 512)
    cut = resolve({"mech": "ged", "dataset": "synthetic", "eps": 1.0, "recipes": recipes})
    assert not steps_reach(dataclasses.replace(cut, epochs=8.0), 512)  # the tuned 8 epochs cannot reach eps 1
    assert cut.epochs == 4.0 and steps_reach(cut, 512)  # the longest halving that can
    assert cut.recipe_source == "t/study.db#3 (epochs 8 -> 4: eps 1 unreachable at 8)"
    kept = ("batch_size", "lr", "optimizer", "momentum", "clip", "mech_params", "model")
    assert {k: getattr(cut, k) for k in kept} == {k: getattr(at_tuned, k) for k in kept}
    assert cut.hash("synthetic") == dataclasses.replace(at_tuned, eps=1.0, epochs=4.0).hash("synthetic")


@pytest.mark.parametrize("eps", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_the_horizon_rule_never_picks_an_unreachable_horizon(tmp_path, eps):
    recipes = tuned_file(tmp_path, epochs=32.0)
    cfg = resolve({"mech": "ged", "dataset": "synthetic", "eps": eps, "recipes": recipes})
    if cfg.epochs == 32.0:  # left alone only where the tuned horizon reaches eps
        assert steps_reach(cfg, 512) and cfg.recipe_source == "t/study.db#3"
    else:
        assert cfg.epochs in (16.0, 8.0, 4.0, 2.0, 1.0) and steps_reach(cfg, 512)
        assert not steps_reach(dataclasses.replace(cfg, epochs=2 * cfg.epochs), 512)  # and it is the longest


def test_a_horizon_given_by_flag_or_without_recipes_is_never_changed(tmp_path):
    recipes = tuned_file(tmp_path)
    flag = resolve({"mech": "ged", "dataset": "synthetic", "eps": 1.0, "recipes": recipes, "epochs": 8.0})
    assert flag.epochs == 8.0 and flag.recipe_source == "t/study.db#3"  # run then names the unreachable eps
    other = resolve({"mech": "ged", "dataset": "synthetic", "eps": 1.0, "recipes": recipes, "epochs": 2.0})
    assert other.epochs == 2.0 and other.recipe_source == "t/study.db#3"
    # the rule's own horizon given back (a row's command does so) keeps the source that says why
    again = resolve({"mech": "ged", "dataset": "synthetic", "eps": 1.0, "recipes": recipes, "epochs": 4.0})
    assert again.recipe_source == "t/study.db#3 (epochs 8 -> 4: eps 1 unreachable at 8)"
    steps = resolve({"mech": "ged", "dataset": "synthetic", "eps": 1.0, "recipes": recipes, "steps": 64})
    assert steps.steps == 64 and steps.epochs is None
    builtin = resolve({"mech": "ged", "dataset": "mnist", "model": "cnn_tanh", "eps": 0.05, "batch_size": 1024})
    assert builtin.epochs == recipe_for("mnist", "ged", "cnn_tanh").epochs  # the rule is for tuned recipes only
    nothing = resolve({"mech": "ged", "dataset": "synthetic", "eps": 1e-3, "recipes": recipes})
    assert nothing.epochs == 8.0 and nothing.recipe_source == "t/study.db#3"  # no halving reaches it: unchanged

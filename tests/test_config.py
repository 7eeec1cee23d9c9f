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

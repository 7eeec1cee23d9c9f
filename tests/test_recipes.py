"""Recipes: a mechanism's ``recipe_changes`` turn a shared default it cannot run into one it can."""

from __future__ import annotations

import pytest

from dpbench.config import resolve
from dpbench.mechanisms import get_mechanism
from dpbench.recipes import DEFAULT_RECIPES, RecipeKey, lookup, recipe_for, with_changes


def split(key: RecipeKey) -> tuple[str, str | None]:
    return key if isinstance(key, tuple) else (key, None)


#: The shared defaults with momentum that ModelMix falls back to (where it has no recipe of its own).
FALLBACKS = sorted((k for k, r in DEFAULT_RECIPES.items() if r.optimizer == "sgd" and r.momentum != 0
                    and lookup(get_mechanism("modelmix").recipes, *split(k)) is lookup({}, *split(k))), key=str)


def test_modelmix_has_fallbacks_to_check():
    assert ("cifar10", "scatter_linear") in FALLBACKS and ("mnist", "scatter_linear") in FALLBACKS


@pytest.mark.parametrize("key", FALLBACKS, ids=str)
def test_modelmix_falls_back_to_the_shared_recipe_without_momentum(key):
    dataset, model = split(key)
    shared = lookup({}, dataset, model)
    recipe = recipe_for(dataset, "modelmix", model)
    assert recipe.momentum == 0.0 and shared.momentum != 0.0
    same = ("model", "batch_size", "epochs", "lr", "optimizer", "clip")
    assert [getattr(recipe, f) for f in same] == [getattr(shared, f) for f in same]
    assert recipe.source == f"{shared.source}; momentum 0 for modelmix"
    # what ModelMix's setup demands of a run (plain SGD) holds for the resolved configuration
    cfg = resolve({"mech": "modelmix", "dataset": dataset, "model": model, "eps": 2.0})
    assert cfg.optimizer == "sgd" and cfg.momentum == 0.0 and cfg.recipe_source == recipe.source


def test_recipes_of_the_mechanism_itself_and_of_others_are_untouched():
    for key, own in get_mechanism("modelmix").recipes.items():
        dataset, model = split(key)
        assert recipe_for(dataset, "modelmix", model) is own
    assert recipe_for("cifar10", "dpsgd", "scatter_linear") is DEFAULT_RECIPES[("cifar10", "scatter_linear")]
    assert recipe_for("cifar10", "dpsgd", "scatter_linear").momentum == 0.9


def test_a_flag_still_beats_the_change():
    cfg = resolve({"mech": "modelmix", "dataset": "cifar10", "model": "scatter_linear", "eps": 2.0, "momentum": 0.9})
    assert cfg.momentum == 0.9  # and ModelMix's setup refuses it, with its own message


@pytest.mark.parametrize("field", ["batchsize", "source"])
def test_a_change_of_no_recipe_field_is_a_programming_error(field):
    with pytest.raises(TypeError, match=f"myplugin.recipe_changes names {field}"):
        with_changes(DEFAULT_RECIPES["mnist"], "myplugin", {field: 1})

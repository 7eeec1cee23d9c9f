"""Recipes: default hyperparameters per dataset (and model), each with its source.

The noise multiplier is never part of a recipe: it always comes from calibration to the target eps.
The defaults here are DP-SGD's published rows, shared by every mechanism; a mechanism changes what it
needs in its own ``recipes`` (``Mechanism.recipes``, keyed by dataset or by (dataset, model)), so a
plugin's recipes work for ``run``, ``sweep``, ``account`` and ``audit`` exactly as the built-ins' do.
Lookup order, for the dataset and then its base dataset (``mnist_val`` -> ``mnist``): with a model
named, the mechanism's (dataset, model) recipe, then the default one; then the mechanism's dataset
recipe, then the default one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping, Union

from dpbench.errors import BadInput

#: A recipe key: a dataset, or a (dataset, model) pair.
RecipeKey = Union[str, tuple[str, str]]


@dataclass(frozen=True)
class Recipe:
    model: str
    batch_size: int
    epochs: float
    lr: float
    optimizer: str
    momentum: float
    clip: float
    source: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_RECIPES: dict[RecipeKey, Recipe] = {
    # Tramer & Boneh, "Differentially Private Learning Needs Better Features", ICLR 2021,
    # end-to-end CNN rows: batch 512, lr 0.5, momentum 0.9, C 0.1, 40 epochs (98.1% at eps 3).
    "mnist": Recipe("cnn_tanh", 512, 40, 0.5, "sgd", 0.9, 0.1,
                           "Tramer & Boneh 2021, end-to-end CNN (MNIST)"),
    # Same source, Fashion-MNIST: batch 2048, lr 4, momentum 0.9, C 0.1, 40 epochs (86.0% at eps 3).
    "fmnist": Recipe("cnn_tanh", 2048, 40, 4.0, "sgd", 0.9, 0.1,
                            "Tramer & Boneh 2021, end-to-end CNN (Fashion-MNIST)"),
    # Tests: a few quick steps.
    "synthetic": Recipe("cnn_tanh", 64, 4, 0.2, "sgd", 0.9, 1.0, "dpbench test recipe"),
    # Tramer & Boneh 2021, end-to-end CIFAR-10 CNN: batch 1024, lr 1, momentum 0.9, C 0.1, 30 epochs
    # (59.2% at eps 3).
    "cifar10": Recipe("cnn_tanh_cifar", 1024, 30, 1.0, "sgd", 0.9, 0.1,
                             "Tramer & Boneh 2021, end-to-end CNN (CIFAR-10)"),
    # DPSUR (Fu et al. 2024) IMDb runs: Adam, lr 0.02, batch 1024, C 0.1 (its default); 12 epochs, where
    # our calibrated sigma at eps 3 is DPSUR's 1.35. Adam is scale-free, so the same recipe serves
    # the non-private control.
    "imdb": Recipe("bilstm", 1024, 12, 0.02, "adam", 0.0, 0.1,
                          "DPSUR 2024 IMDb (Adam, lr 0.02, batch 1024, C 0.1), 12 epochs"),
    # Tramer & Boneh 2021, ScatterNet + linear / + CNN on CIFAR-10: batch 8192, lr 4, momentum 0.9,
    # C 0.1, 60 epochs (67.0% / 69.3% at eps 3). GroupNorm (27 groups) instead of T&B's private batch
    # statistics, so all of the budget goes to DP-SGD.
    ("cifar10", "scatter_linear"): Recipe("scatter_linear", 8192, 60, 4.0, "sgd", 0.9, 0.1,
                                               "Tramer & Boneh 2021, ScatterNet + linear (CIFAR-10)"),
    ("cifar10", "scatter_cnn"): Recipe("scatter_cnn", 8192, 60, 4.0, "sgd", 0.9, 0.1,
                                            "Tramer & Boneh 2021, ScatterNet + CNN (CIFAR-10)"),
    # Same source, MNIST and Fashion-MNIST (batch and lr from T&B's README; 40 epochs, as their
    # end-to-end rows, approximately reproduces their noise multipliers).
    ("mnist", "scatter_linear"): Recipe("scatter_linear", 4096, 40, 8.0, "sgd", 0.9, 0.1,
                                             "Tramer & Boneh 2021, ScatterNet + linear (MNIST)"),
    ("fmnist", "scatter_linear"): Recipe("scatter_linear", 8192, 40, 16.0, "sgd", 0.9, 0.1,
                                              "Tramer & Boneh 2021, ScatterNet + linear (Fashion-MNIST)"),
    ("mnist", "scatter_cnn"): Recipe("scatter_cnn", 1024, 40, 1.0, "sgd", 0.9, 0.1,
                                          "Tramer & Boneh 2021, ScatterNet + CNN (MNIST)"),
    ("fmnist", "scatter_cnn"): Recipe("scatter_cnn", 2048, 40, 4.0, "sgd", 0.9, 0.1,
                                           "Tramer & Boneh 2021, ScatterNet + CNN (Fashion-MNIST)"),
    # ModelMix (Xiao et al. 2022) App. E, ResNet-20 (GroupNorm) on CIFAR-10, DP-SGD baseline: q = 1500/50000,
    # C 20, lr 0.1, 3500 iterations (= 105 epochs), momentum 0.9 as in its code; the paper also uses
    # crop + flip augmentation (dataset cifar10_aug). Gradients rarely reach C = 20, so the same lr
    # serves the non-private control.
    ("cifar10", "resnet20_gn"): Recipe("resnet20_gn", 1500, 105, 0.1, "sgd", 0.9, 20.0,
                                            "Xiao et al. 2022 App. E, ResNet-20 DP-SGD baseline (CIFAR-10)"),
    # Small CPU baseline for IMDb, same optimiser settings as the DPSUR recipe.
    ("imdb", "embbag"): Recipe("embbag", 1024, 12, 0.02, "adam", 0.0, 0.1,
                                    "DPSUR 2024 IMDb optimiser settings, embedding-mean model"),
}


def base_dataset(dataset: str) -> str:
    """The dataset a variant derives from (its ``base`` meta: ``cifar10_aug16`` -> ``cifar10``, ``mnist_val``
    -> ``mnist``), whose recipes it shares; the dataset itself when it is no variant or not registered."""
    from dpbench.data import DATASETS

    return DATASETS.entry(dataset).meta.get("base", dataset) if dataset in DATASETS else dataset


def lookup(own: Mapping[RecipeKey, Recipe], dataset: str, model: str | None = None) -> Recipe | None:
    """The first of ``own`` (a mechanism's recipes) and the defaults that has a recipe for this dataset/model."""
    for ds in dict.fromkeys((dataset, base_dataset(dataset))):
        keys: list[RecipeKey] = [(ds, model)] if model is not None else []
        for key in keys + [ds]:
            for table in (own, DEFAULT_RECIPES):
                if key in table:
                    return table[key]
    return None


def reachable_epochs(mech: str, params: Mapping[str, Any], n: int, *, batch_size: int, clip: float,
                     epochs: float, eps: float, delta: float) -> float | None:
    """The longest of ``epochs``, ``epochs / 2``, ``epochs / 4``, ... (at least one step) at which mechanism
    ``mech`` can be calibrated to ``eps`` on ``n`` records with this batch size and clip; None if none can.

    Tuned grids double their epoch choices, so the halvings are the horizons a tuned recipe could have chosen.
    """
    from dpbench.mechanisms import get_mechanism
    from dpbench.privacy import eps_reachable

    mechanism = get_mechanism(mech)(**params)
    mechanism.bind(batch_size=batch_size, clip=clip)
    q = batch_size / n
    while (steps := int(math.floor(epochs * n / batch_size))) >= 1:
        if eps_reachable(mechanism, eps, q, steps, delta):
            return float(epochs)
        epochs /= 2
    return None


def recipe_for(dataset: str, mech: str, model: str | None = None) -> Recipe:
    """The recipe of mechanism ``mech`` (a registered name, plugins included) for ``dataset`` and ``model``."""
    from dpbench.mechanisms import get_mechanism

    mechanism = get_mechanism(mech)
    recipe = lookup(getattr(mechanism, "recipes", {}), dataset, model)
    if recipe is None:
        raise BadInput(f"no recipe for dataset {dataset!r}; give --model, --batch-size, --epochs, --lr and --clip")
    return with_changes(recipe, mech, getattr(mechanism, "recipe_changes", {}))


def with_changes(recipe: Recipe, mech: str, changes: Mapping[str, Any]) -> Recipe:
    """``recipe`` with a mechanism's ``recipe_changes`` applied; its source says which fields changed."""
    unknown = sorted(set(changes) - (set(Recipe.__dataclass_fields__) - {"source"}))  # the source says what changed
    if unknown:
        raise TypeError(f"{mech}.recipe_changes names {', '.join(unknown)}: not a recipe field")
    changed = {k: v for k, v in changes.items() if getattr(recipe, k) != v}
    if not changed:
        return recipe
    said = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in changed.items())
    return replace(recipe, **changed, source=f"{recipe.source}; {said} for {mech}")

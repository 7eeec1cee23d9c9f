"""Tuned recipes: the TOML that ``dpbench tune`` writes and ``run --recipes`` / ``sweep --recipes`` read.

One ``[[recipe]]`` table per (mechanism, dataset, model, eps), keyed by the dataset tuned for (``mnist``,
not ``mnist_val``), with the chosen hyperparameters, mechanism parameters under ``set``, where it came
from (``source = "<study file>#<trial number>"``) and the tuning budget behind it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dpbench.config import load_toml
from dpbench.errors import BadInput
from dpbench.recipes import Recipe
from dpbench.storage import write_text_atomic

#: The fields a recipe sets, in the order they are written (``Recipe``'s, then the tuned recipe's key first).
RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


@dataclass(frozen=True, kw_only=True)
class TunedRecipe(Recipe):
    """A built-in recipe's fields (``source`` = "<study file>#<trial number>"), for one (mech, dataset, eps),
    with the tuning budget behind it."""

    mech: str
    dataset: str  # the dataset tuned for (the base of the validation split)
    eps: float
    val_acc: float
    trials: int  # finished trials of this mechanism's study (completed + pruned)
    pruned: int
    cpu_s: float  # summed wall time of the trials, one thread each
    mech_params: dict[str, Any] = field(default_factory=dict)

    def options(self) -> dict[str, Any]:
        """The ``resolve`` options this recipe sets (everything but its source)."""
        return {k: getattr(self, k) for k in RECIPE_FIELDS if k != "source"}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string for what we write


def write_recipes(path: str | Path, recipes: list[TunedRecipe], header: str) -> None:
    """Write ``recipes`` (atomically) with ``header`` as leading comment lines."""
    lines = [f"# {line}" for line in header.splitlines()] + [""]
    for r in sorted(recipes, key=lambda r: (r.dataset, r.model, r.mech, r.eps)):
        lines.append("[[recipe]]")
        for key in ("mech", "dataset", "eps", *RECIPE_FIELDS, "val_acc", "trials", "pruned", "cpu_s"):
            lines.append(f"{key} = {_toml_value(getattr(r, key))}")
        if r.mech_params:
            inner = ", ".join(f"{k} = {_toml_value(v)}" for k, v in sorted(r.mech_params.items()))
            lines.append(f"set = {{ {inner} }}")
        lines.append("")
    write_text_atomic(Path(path), "\n".join(lines))


def read_recipes(path: str | Path) -> list[TunedRecipe]:
    """The recipes of a file written by ``write_recipes``; a malformed one is a BadInput naming it."""
    data = load_toml(str(path), "--recipes")
    out = []
    for i, entry in enumerate(data.get("recipe", [])):
        try:
            out.append(TunedRecipe(
                mech=str(entry["mech"]), dataset=str(entry["dataset"]), model=str(entry["model"]),
                eps=float(entry["eps"]), batch_size=int(entry["batch_size"]), epochs=float(entry["epochs"]),
                lr=float(entry["lr"]), optimizer=str(entry["optimizer"]), momentum=float(entry["momentum"]),
                clip=float(entry["clip"]), source=str(entry["source"]), val_acc=float(entry.get("val_acc", math.nan)),
                trials=int(entry.get("trials", 0)), pruned=int(entry.get("pruned", 0)),
                cpu_s=float(entry.get("cpu_s", math.nan)), mech_params=dict(entry.get("set", {}))))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadInput(f"--recipes {path}: recipe {i + 1} is malformed ({exc!r})") from None
    return out


def choose(recipes: list[TunedRecipe], path: str, *, mech: str, dataset: str, model: str | None,
           eps: float) -> tuple[TunedRecipe, str | None]:
    """The recipe for (mech, dataset, model) at ``eps``, else at the nearest tuned eps (on a log scale).

    Returns the recipe and, when its eps is not ``eps``, a sentence saying which was used. No recipe for
    the mechanism, dataset and model is a BadInput.
    """
    matching = [r for r in recipes if r.mech == mech and r.dataset == dataset and (model is None or r.model == model)]
    if not matching:
        have = sorted({f"{r.mech}/{r.dataset}/{r.model}" for r in recipes}) or ["none"]
        raise BadInput(f"--recipes {path}: no tuned recipe for {mech} on {dataset}"
                       + (f" with model {model}" if model else "") + f"; it has: {', '.join(have)}")
    models = sorted({r.model for r in matching})
    if len(models) > 1:
        raise BadInput(f"--recipes {path}: {mech} on {dataset} was tuned for several models ({', '.join(models)}); "
                       f"give --model")

    def distance(r: TunedRecipe) -> float:
        if math.isinf(eps) or math.isinf(r.eps):
            return 0.0 if r.eps == eps else math.inf
        return abs(math.log(r.eps / eps))

    best = min(matching, key=lambda r: (distance(r), r.eps))
    note = None if best.eps == eps else (f"{mech} on {dataset}: no recipe tuned at eps {eps:g} in {path}; using the "
                                         f"nearest tuned eps, {best.eps:g} ({best.source})")
    return best, note

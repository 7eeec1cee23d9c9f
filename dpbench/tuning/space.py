"""The search space of ``dpbench tune``: one shared space, cut by each mechanism's declared constraints,
plus the mechanism's own tunable parameters (``Param.tune``)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import TuneRange

#: Learning-rate range (log scale) by optimizer: SGD steps of DP-SGD and of the normalising mechanisms
#: (Auto-S, PSAC: lr 4-8 in their papers) both lie inside the first.
LR_RANGES = {"sgd": (0.01, 30.0), "adam": (1e-4, 0.1)}


@dataclass(frozen=True)
class SharedSpace:
    """The dimensions every mechanism shares; the same for every mechanism of a tune."""

    clip: tuple[float, float] = (0.01, 10.0)  # log scale
    batch_sizes: tuple[int, ...] = (256, 512, 1024, 2048)
    epochs: tuple[float, ...] = (5.0, 10.0, 20.0)
    momentum: tuple[float, ...] = (0.0, 0.9)
    #: (optimizer, low, high) replacing ``LR_RANGES``' range of that optimizer, for a model whose steps need other
    #: rates (IMDb's embedding mean learns under SGD only at rates near 100)
    lr_ranges: tuple[tuple[str, float, float], ...] = ()

    def __post_init__(self) -> None:
        if not (0 < self.clip[0] < self.clip[1]):
            raise BadInput(f"clip range {self.clip}: needs 0 < low < high")
        if not self.batch_sizes or any(b <= 0 for b in self.batch_sizes):
            raise BadInput(f"--batch-sizes {','.join(map(str, self.batch_sizes))}: need positive integers")
        if not self.epochs or any(not e > 0 for e in self.epochs):
            raise BadInput(f"--epoch-choices {','.join(map(str, self.epochs))}: need positive numbers")
        for optimizer, low, high in self.lr_ranges:
            if optimizer not in LR_RANGES:
                raise BadInput(f"--lr-range {optimizer}={low:g}:{high:g}: unknown optimizer {optimizer!r} "
                               f"(known: {', '.join(LR_RANGES)})")
            if not (0 < low < high < math.inf):
                raise BadInput(f"--lr-range {optimizer}={low:g}:{high:g}: needs 0 < low < high")
        if len({optimizer for optimizer, _, _ in self.lr_ranges}) < len(self.lr_ranges):
            raise BadInput("--lr-range: one range per optimizer")

    def lr_range(self, optimizer: str) -> tuple[float, float]:
        """The learning-rate range searched for ``optimizer``: the given one, else ``LR_RANGES``'."""
        for name, low, high in self.lr_ranges:
            if name == optimizer:
                return (low, high)
        return LR_RANGES[optimizer]

    def describe(self) -> dict[str, Any]:
        """As a study stores it; without ``lr_ranges`` when none is given, as studies made before it existed."""
        out = asdict(self)
        if not self.lr_ranges:
            del out["lr_ranges"]
        return out


@dataclass(frozen=True)
class MechanismSpace:
    """One mechanism's space: the shared one after its constraints, and its own parameters."""

    mech: str
    optimizer: str
    lr: tuple[float, float]
    clip: tuple[float, float] | None  # None: the mechanism does not clip (non-private)
    batch_sizes: tuple[int, ...]
    epochs: tuple[float, ...]
    momentum: tuple[float, ...]
    own: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> TuneRange fields and type

    def describe(self) -> dict[str, Any]:
        return asdict(self)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:16]

    def sample(self, trial: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(run options, mechanism parameters) drawn by an Optuna trial."""
        options: dict[str, Any] = {
            "lr": trial.suggest_float("lr", *self.lr, log=True),
            "batch_size": trial.suggest_categorical("batch_size", list(self.batch_sizes)),
            "epochs": trial.suggest_categorical("epochs", list(self.epochs)),
            "momentum": trial.suggest_categorical("momentum", list(self.momentum)),
            "optimizer": self.optimizer,
        }
        if self.clip is not None:
            options["clip"] = trial.suggest_float("clip", *self.clip, log=True)
        params: dict[str, Any] = {}
        for name, spec in self.own.items():
            key = f"set.{name}"
            if spec["choices"]:
                params[name] = trial.suggest_categorical(key, list(spec["choices"]))
            elif spec["type"] == "int":
                params[name] = trial.suggest_int(key, int(spec["low"]), int(spec["high"]), log=spec["log"])
            else:
                params[name] = trial.suggest_float(key, spec["low"], spec["high"], log=spec["log"])
        return options, params


def mechanism_space(mech: str, shared: SharedSpace, optimizer: str) -> MechanismSpace:
    """``shared`` cut by ``mech``'s ``tune_constraints``, with its ``Param.tune`` parameters."""
    cls = get_mechanism(mech)
    if optimizer not in LR_RANGES:
        raise BadInput(f"optimizer {optimizer!r}: no learning-rate range for it (known: {', '.join(LR_RANGES)})")
    cut: dict[str, tuple] = {}
    for dim, values in (("batch_size", shared.batch_sizes), ("epochs", shared.epochs), ("momentum", shared.momentum)):
        accept = cls.tune_constraints.get(dim, lambda _: True)
        cut[dim] = tuple(v for v in values if accept(v))
        if not cut[dim]:
            raise BadInput(f"{mech} accepts none of the {dim} values {list(values)} of the shared search space")
    own = {}
    for p in cls.param_specs:
        if isinstance(p.tune, TuneRange):
            own[p.name] = {"low": p.tune.low, "high": p.tune.high, "log": p.tune.log, "choices": list(p.tune.choices),
                           "type": p.type.__name__}
    return MechanismSpace(mech, optimizer, shared.lr_range(optimizer), shared.clip if cls.private else None,
                          cut["batch_size"], cut["epochs"], cut["momentum"], own)

"""The one preparation path of ``run`` and ``audit``: config -> data -> model inputs -> mechanism ->
calibration -> accounting, with every check that needs no training done before any training.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dpbench.config import (RunConfig, check_clip, check_one_horizon, check_writable, resolve, validate,
                            validate_options)
from dpbench.data import DATASETS, DatasetBundle, load_dataset
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import Mechanism
from dpbench.models import MODELS
from dpbench.models.inputs import prepare_for_model
from dpbench.privacy import PrivacyReport, account, calibrate, check_accountant
from dpbench.results import RUNS, CsvSchema, check_compatible

DataHook = Callable[[DatasetBundle], DatasetBundle]


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``; asking for CUDA where there is none is a BadInput."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise BadInput(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInput(f"--device {name}: CUDA is not available on this machine")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise BadInput(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    return torch.device(name)


@dataclass
class Prepared:
    """Everything a run needs before it trains: the data it trains on and the noise it was calibrated to."""

    cfg: RunConfig
    device: torch.device
    mech: Mechanism
    data: DatasetBundle
    q: float  # B / N
    steps: int
    noise: float  # the calibrated noise multiplier (0 for a non-private mechanism)
    privacy: PrivacyReport  # recomputed from ``noise``: what the row reports

    @property
    def n(self) -> int:
        return self.data.train_size


def prepare(cfg: RunConfig, *, schema: CsvSchema = RUNS, raw_data: DataHook | None = None,
            model_data: DataHook | None = None, with_others: bool = True, check_out: bool = True) -> Prepared:
    """Check, load, calibrate and account one configuration.

    Cheap checks come first, so a typo never waits for (or triggers) a download. ``raw_data`` adapts the
    loaded dataset (the audit's subset), ``model_data`` the model's inputs (the audit's input canaries).
    """
    device = resolve_device(cfg.device)
    mech = get_mechanism(cfg.mech)(**cfg.mech_params)
    MODELS.entry(cfg.model)
    validate_options(cfg)
    check_accountant(mech, cfg.accountant)
    if check_out:
        check_writable(cfg.out)
        check_compatible(Path(cfg.out), schema)
    data = load_dataset(cfg.dataset, cfg.data_dir)
    if raw_data is not None:
        data = raw_data(data)
    validate(cfg, data.train_size)  # before features, which take minutes the first time
    # models that train on fixed features (ScatterNet) get them here, computed once and cached
    data = prepare_for_model(data, cfg.model, device)
    if model_data is not None:
        data = model_data(data)
        validate(cfg, data.train_size)
    n = data.train_size
    q, steps = cfg.sample_rate(n), cfg.num_steps(n)
    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    noise = calibrate(mech, cfg.eps, q, steps, cfg.delta, cfg.accountant) if mech.private else 0.0
    # from the noise actually used
    privacy = account(mech, noise, q, steps, cfg.delta, cfg.accountant, with_others=with_others)
    if mech.private and not privacy.eps <= cfg.eps:
        raise RuntimeError(f"eps spent {privacy.eps} exceeds the target {cfg.eps}")
    return Prepared(cfg, device, mech, data, q, steps, noise, privacy)


@dataclass
class AccountingPlan:
    """What ``dpbench account`` reports: q, T and C of a configuration, its noise and the privacy it buys."""

    mech: Mechanism
    size: int  # N
    batch_size: int
    steps: int
    clip: float | None
    noise: float
    privacy: PrivacyReport

    @property
    def q(self) -> float:
        return self.batch_size / self.size


def plan_accounting(mech: str, *, params: dict, dataset: str | None = None, n: int | None = None,
                    model: str | None = None, batch_size: int | None = None, clip: float | None = None,
                    epochs: float | None = None, steps: int | None = None, eps: float | None = None,
                    sigma: float | None = None, delta: float = 1e-5, accountant: str = "rdp") -> AccountingPlan:
    """Calibrate (given ``eps``) or account (given ``sigma``) a configuration without data or training.

    With a dataset (``mnist`` unless only ``n`` is given) the recipe and the flags merge as for ``run``
    (``config.resolve``); with ``n`` alone every value comes from the flags.
    """
    if (eps is None) == (sigma is None):
        raise BadInput("give exactly one of --eps and --sigma")
    if clip is not None:
        check_clip(clip)
    if not 0 < delta < 1:
        raise BadInput(f"--delta {delta}: must be in (0, 1)")
    if n is None or dataset is not None:
        cfg = resolve({"mech": mech, "dataset": dataset, "model": model, "batch_size": batch_size, "clip": clip,
                       "epochs": epochs, "steps": steps, "mech_params": params})
        mech, params = cfg.mech, cfg.mech_params
        batch_size, clip, epochs, steps = cfg.batch_size, cfg.clip, cfg.epochs, cfg.steps
        size = n if n is not None else DATASETS.entry(cfg.dataset).meta["train_size"]
    else:
        check_one_horizon({k: v for k, v in (("epochs", epochs), ("steps", steps)) if v is not None})
        size = n
    mechanism = get_mechanism(mech)(**params)
    check_accountant(mechanism, accountant)
    if size <= 0:
        raise BadInput(f"--n {size}: must be positive")
    if batch_size is None or not 0 < batch_size <= size:
        raise BadInput(f"--batch-size {batch_size}: must be in [1, N = {size}]")
    if steps is None:
        if epochs is None or not epochs > 0:
            raise BadInput(f"--epochs {epochs}: must be positive (or give --steps)")
        steps = int(math.floor(epochs * size / batch_size))
    if steps <= 0:
        raise BadInput(f"--steps {steps}: must be positive")
    q = batch_size / size
    mechanism.bind(batch_size=batch_size, clip=clip)
    if sigma is not None:
        if not sigma > 0:
            raise BadInput(f"--sigma {sigma}: must be positive")
        noise = sigma
    else:
        if math.isnan(eps) or eps <= 0:
            raise BadInput(f"--eps {eps}: must be positive")
        noise = calibrate(mechanism, eps, q, steps, delta, accountant)
    return AccountingPlan(mechanism, size, batch_size, steps, clip, noise,
                          account(mechanism, noise, q, steps, delta, accountant))

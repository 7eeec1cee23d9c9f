"""The one preparation path of ``run`` and ``audit``: config -> data -> model inputs -> mechanism ->
calibration -> accounting, with every check that needs no training done before any training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from dpbench.config import RunConfig, check_writable, validate, validate_options
from dpbench.data import DatasetBundle, load_dataset
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import Mechanism
from dpbench.models import MODELS
from dpbench.models.inputs import prepare_for_model
from dpbench.privacy import PrivacyReport, account, calibrate
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
            model_data: DataHook | None = None, with_prv: bool = True) -> Prepared:
    """Check, load, calibrate and account one configuration.

    Cheap checks come first, so a typo never waits for (or triggers) a download. ``raw_data`` adapts the
    loaded dataset (the audit's subset), ``model_data`` the model's inputs (the audit's input canaries).
    """
    device = resolve_device(cfg.device)
    mech = get_mechanism(cfg.mech)(**cfg.mech_params)
    MODELS.entry(cfg.model)
    validate_options(cfg)
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
    noise = calibrate(mech, cfg.eps, q, steps, cfg.delta) if mech.private else 0.0
    privacy = account(mech, noise, q, steps, cfg.delta, with_prv=with_prv)  # from the noise actually used
    if mech.private and not privacy.eps <= cfg.eps:
        raise RuntimeError(f"eps spent {privacy.eps} exceeds the target {cfg.eps}")
    return Prepared(cfg, device, mech, data, q, steps, noise, privacy)

"""The one training loop every mechanism shares.

Per logical step: the mechanism's sampler draws a batch (Poisson at rate q = B/N by default), the
batch is split into physical chunks for memory, Opacus computes per-sample gradients, and the
mechanism's optimizer transforms, accumulates, adds noise and updates. Everything a mechanism does
differently happens inside its own hooks (``dpbench.mechanisms.base``).
"""

from __future__ import annotations

import hashlib
import math
import re
import resource
import secrets
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from opacus.optimizers import DPOptimizer
from rich.console import Console

from dpbench.checkpoint import Checkpointer, checkpoint_path
from dpbench.config import RunConfig, check_writable, validate, validate_options
from dpbench.data import DatasetBundle, load_dataset
from dpbench.environment import LoadMeter, environment
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.mechanisms.base import Mechanism, TrainContext
from dpbench.models import MODELS, build_model, count_parameters
from dpbench.models.inputs import prepare_for_model
from dpbench.privacy import account, calibrate
from dpbench.progress import TrainingProgress
from dpbench.results import append_row, check_compatible, run_record_path, write_json_atomic

DEFAULT_PHYSICAL_BATCH = 1024

EVAL_BATCH = 4096


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


def derive_seed(seed: int, purpose: str) -> int:
    """Independent, reproducible seeds for model init, sampling, noise, ... from one --seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{purpose}".encode()).digest()[:8], "little") >> 1


def make_generator(seed: int, purpose: str, device: torch.device, secure: bool) -> torch.Generator:
    """A generator for one purpose; in secure mode seeded from OS entropy and never recorded."""
    g = torch.Generator(device=device)
    g.manual_seed(secrets.randbits(63) if secure else derive_seed(seed, purpose))
    return g


def physical_batch_size(cfg: RunConfig) -> int:
    """``--physical-batch-size``, else the model's declared default (small for text models), at most B."""
    default = MODELS.entry(cfg.model).meta.get("physical_batch_size", DEFAULT_PHYSICAL_BATCH)
    return cfg.physical_batch_size or min(cfg.batch_size, default)


def _average_augmentations(params: list[torch.Tensor], copies: int) -> None:
    """Per-sample gradients of K adjacent augmented copies -> their mean, one row per example.

    Done before clipping, so every example still contributes exactly one per-sample gradient and
    the privacy analysis is that of the un-augmented run (De et al. 2022).
    """
    for p in params:
        grad_sample = getattr(p, "grad_sample", None)
        if grad_sample is not None:
            p.grad_sample = grad_sample.view(-1, copies, *grad_sample.shape[1:]).mean(1)


@dataclass
class TrainOutcome:
    model: nn.Module
    test_acc: float
    test_loss: float
    train_wall_s: float
    samples_seen: int
    final_train_loss: float


def _base_optimizer(cfg: RunConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def warn(message: str) -> None:
    """One warning line on stderr (also when it is a log file)."""
    Console(stderr=True, highlight=False, soft_wrap=True).print(f"[yellow]warning:[/] {message}")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(accuracy in [0, 1], mean cross-entropy) on a held-out split."""
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(y), EVAL_BATCH):
        out = model(x[i:i + EVAL_BATCH])
        loss += float(nn.functional.cross_entropy(out, y[i:i + EVAL_BATCH], reduction="sum"))
        correct += int((out.argmax(1) == y[i:i + EVAL_BATCH]).sum())
    model.train()
    return correct / len(y), loss / len(y)


def train(cfg: RunConfig, mech: Mechanism, data: DatasetBundle, noise_multiplier: float, steps: int,
          device: torch.device, *, show_progress: bool = True,
          on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
          checkpointer: Checkpointer | None = None, resume: bool = False,
          model_factory: Callable[[], nn.Module] | None = None) -> TrainOutcome:
    """Train ``steps`` logical steps of ``mech`` and evaluate on the test split.

    With a ``checkpointer`` the state is saved every few minutes; ``resume`` continues from it.
    ``model_factory`` replaces the registry's ``cfg.model`` (the conformance checks use a tiny model).
    """
    n = data.train_size
    q = cfg.sample_rate(n)
    new_model = model_factory or (lambda: build_model(cfg.model, data.input_shape, data.num_classes))
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    model = new_model()
    if cfg.secure:  # the initial weights may follow --seed; nothing drawn from here on may
        torch.manual_seed(secrets.randbits(63))
    if mech.private:
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise BadInput(f"model {cfg.model!r} cannot be trained privately: {errors[0]}")
        model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.to(device).train()
    generators: dict[str, torch.Generator] = {}

    def generator(purpose: str, on: torch.device = device) -> torch.Generator:
        if purpose in generators:
            raise ValueError(f"generator {purpose!r} requested twice")
        generators[purpose] = make_generator(cfg.seed, purpose, on, cfg.secure)
        return generators[purpose]

    optimizer = mech.make_optimizer(_base_optimizer(cfg, model.parameters()), noise_multiplier=noise_multiplier,
                                    max_grad_norm=cfg.clip, expected_batch_size=cfg.batch_size,
                                    generator=generator("noise"))
    if cfg.secure and isinstance(optimizer, DPOptimizer):
        # Opacus' noise hardened against floating-point attacks (2n Gaussian draws); its secure RNG needs
        # torchcsprng, which has no release for this torch, so the generators stay OS-seeded PRNGs.
        optimizer.secure_mode = True
    if on_optimizer is not None:
        on_optimizer(optimizer)
    sampling = generator("sampling", torch.device("cpu"))
    x, y = data.train_x.to(device), data.train_y.to(device)
    physical = physical_batch_size(cfg)
    augment, copies = data.train_transform, max(1, data.augmentations)
    augmenter = generator("augmentation") if augment is not None else None

    def inputs(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A chunk's inputs and labels; with augmentation, K augmented copies of each example, adjacent."""
        if augment is None:
            return x[c], y[c]
        return augment(x[c].repeat_interleave(copies, 0), augmenter), y[c].repeat_interleave(copies)

    criterion = nn.CrossEntropyLoss()
    ctx = TrainContext(cfg=cfg, model=model, optimizer=optimizer, train_x=x, train_y=y, criterion=criterion,
                       noise_multiplier=noise_multiplier, sample_rate=q, steps=steps, physical_batch_size=physical,
                       device=device, make_generator=generator,
                       build_model=new_model)
    mech.setup(ctx)

    start, samples, ema_loss, done_wall = 0, 0, float("nan"), 0.0
    state = checkpointer.load() if (checkpointer is not None and resume) else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        mech.load_state_dict(state["mechanism"])
        if not cfg.secure:  # a secure run keeps its fresh OS-seeded generators (the checkpoint holds none)
            for purpose, g_state in state.get("generators", {}).items():
                generators[purpose].set_state(g_state)
            if "torch_rng" in state:
                torch.set_rng_state(state["torch_rng"])
        start, samples, ema_loss, done_wall = state["step"], state["samples"], state["ema_loss"], state["wall"]

    def snapshot(next_step: int) -> dict[str, Any]:
        return {"step": next_step, "samples": samples, "ema_loss": ema_loss,
                "wall": done_wall + time.perf_counter() - t0, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "mechanism": mech.state_dict(),
                "generators": {k: g.get_state() for k, g in generators.items()}, "torch_rng": torch.get_rng_state()}

    sampler = mech.make_sampler(n, q, steps - start, sampling)
    t0 = time.perf_counter()
    progress = TrainingProgress(f"{cfg.mech} {cfg.dataset}", steps, start, enabled=show_progress)
    samples_before = samples
    with progress, warnings.catch_warnings():
        # Opacus' hooks on the first layer fire on module outputs when inputs need no gradient: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for step, indices in enumerate(sampler, start=start):
            mech.begin_step(ctx, step)
            idx = torch.as_tensor(indices, dtype=torch.long, device=device)
            chunks = list(idx.split(physical)) if len(idx) else []
            step_loss = 0.0
            if mech.private:
                if not chunks:  # an empty Poisson batch still releases noise and counts as a step
                    for p in optimizer.params:
                        p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                    chunks_to_run: list[torch.Tensor] = []
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    chunks_to_run = chunks
                for j, c in enumerate(chunks_to_run):
                    xc, yc = inputs(c)
                    loss = criterion(model(xc), yc)
                    loss.backward()
                    if copies > 1:
                        _average_augmentations(optimizer.params, copies)
                    step_loss += float(loss.detach()) * len(c)
                    if j < len(chunks_to_run) - 1:
                        optimizer.signal_skip_step(do_skip=True)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.zero_grad(set_to_none=True)
                for c in chunks:
                    # sum of per-sample losses over the expected batch size, as the private path scales
                    xc, yc = inputs(c)
                    loss = nn.functional.cross_entropy(model(xc), yc, reduction="sum") / (cfg.batch_size * copies)
                    loss.backward()
                    step_loss += float(loss.detach()) * cfg.batch_size
                optimizer.step()
            samples += len(idx)
            if len(idx):
                mean = step_loss / len(idx)
                ema_loss = mean if math.isnan(ema_loss) else 0.95 * ema_loss + 0.05 * mean
            progress.update(step + 1, ema_loss, samples - samples_before)
            if checkpointer is not None and step + 1 < steps:
                checkpointer.maybe_save(lambda: snapshot(step + 1))
    wall = done_wall + time.perf_counter() - t0
    acc, test_loss = evaluate(model, data.test_x.to(device), data.test_y.to(device))
    return TrainOutcome(model, acc, test_loss, wall, samples, ema_loss)


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(cfg: RunConfig, *, show_progress: bool = True, resume: bool = False,
        checkpoint_every_s: float = 300.0) -> dict[str, Any]:
    """Validate, calibrate, train, evaluate and record one run; returns the CSV row.

    A checkpoint is kept beside the CSV while the run trains; ``resume`` continues from it.
    """
    started = _now()
    device = resolve_device(cfg.device)
    mech = get_mechanism(cfg.mech)(**cfg.mech_params)
    MODELS.entry(cfg.model)
    validate_options(cfg)  # cheap checks first: a typo never waits for (or triggers) a download
    check_writable(cfg.out)
    check_compatible(Path(cfg.out))
    data = load_dataset(cfg.dataset, cfg.data_dir)
    n = data.train_size
    validate(cfg, n)
    # models that train on fixed features (ScatterNet) get them here, computed once and cached
    data = prepare_for_model(data, cfg.model, device)
    q, steps = cfg.sample_rate(n), cfg.num_steps(n)

    mech.bind(batch_size=cfg.batch_size, clip=cfg.clip)
    noise = calibrate(mech, cfg.eps, q, steps, cfg.delta) if mech.private else 0.0
    privacy = account(mech, noise, q, steps, cfg.delta)  # recomputed from the noise actually used
    if mech.private and not privacy.eps <= cfg.eps:
        raise RuntimeError(f"eps spent {privacy.eps} exceeds the target {cfg.eps}")

    meter = LoadMeter()
    config_hash = cfg.hash(data.variant)
    checkpointer = Checkpointer(checkpoint_path(cfg.out, config_hash, cfg.seed, cfg.secure), checkpoint_every_s,
                                secure=cfg.secure)
    reproducible_checkpoint = checkpoint_path(cfg.out, config_hash, cfg.seed, secure=False)
    if resume and cfg.secure and not checkpointer.path.exists() and reproducible_checkpoint.exists():
        warn(f"{reproducible_checkpoint} is a checkpoint of a reproducible run of this configuration; a --secure "
             "run never continues one (its randomness is derived from --seed), so this run starts afresh")
    outcome = train(cfg, mech, data, noise, steps, device, show_progress=show_progress,
                    checkpointer=checkpointer, resume=resume)
    env = environment()
    run_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{cfg.mech}-{cfg.dataset}-{uuid.uuid4().hex[:6]}"
    row: dict[str, Any] = {
        "run_id": run_id, "started_at": started, "finished_at": _now(),
        "mech": cfg.mech, "dataset": cfg.dataset, "dataset_variant": data.variant, "model": cfg.model,
        "eps_target": cfg.eps, "delta": cfg.delta, "eps_spent": privacy.eps, "accountant": privacy.accountant,
        "eps_rdp": privacy.eps_rdp, "eps_prv": privacy.eps_prv, "noise_multiplier": noise,
        "sample_rate": q, "release_rate": privacy.release_rate, "batch_size": cfg.batch_size, "epochs": cfg.nominal_epochs(n),
        "steps": steps, "lr": cfg.lr, "clip": cfg.clip, "seed": cfg.seed, "test_acc": outcome.test_acc,
        "test_loss": outcome.test_loss, "wall_s": round(outcome.train_wall_s, 3),
        "samples_per_s": round(outcome.samples_seen / max(outcome.train_wall_s, 1e-9), 1),
        "peak_mem_mb": round(_peak_mem_mb(device), 1), "device": str(device), "mech_params": mech.params,
        "config_hash": cfg.hash(data.variant), "dpbench_version": env["dpbench_version"],
        "git_commit": env["git_commit"], "torch_version": env["torch_version"],
        "opacus_version": env["opacus_version"], "eps_classic": privacy.eps_classic,
        "optimizer": cfg.optimizer, "momentum": cfg.momentum,
        "physical_batch_size": physical_batch_size(cfg),
        "secure": cfg.secure, "other_load": _round(meter.other_load()), "command": cfg.command(),
    }
    record = {"row": row, "config": asdict(cfg), "privacy": privacy.as_json(), "environment": env,
              "model_parameters": count_parameters(outcome.model), "train_size": n,
              "final_train_loss": outcome.final_train_loss}
    write_json_atomic(run_record_path(cfg.out, run_id), record)
    append_row(cfg.out, row)
    checkpointer.clear()
    return row


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)

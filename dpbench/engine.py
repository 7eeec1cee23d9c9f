"""The one training loop every mechanism shares.

Per logical step: the mechanism's sampler draws a batch (Poisson at rate q = B/N by default), the
batch is split into physical chunks for memory (``dpbench.step``), ``dpbench.persample`` computes
per-sample gradients (or their norms), and the engine's step object accumulates, releases and updates
through the mechanism's methods (``dpbench.mechanisms.base``). Seeding and checkpoints are
``dpbench.runstate``'s.
"""

from __future__ import annotations

import resource
import time
import uuid
import warnings
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any, Callable

import torch
import torch.nn as nn
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from rich.console import Console

from dpbench.allocator import keep_freed_memory
from dpbench.checkpoint import Checkpointer, checkpoint_path
from dpbench.config import RunConfig
from dpbench.data import DatasetBundle
from dpbench.environment import LoadMeter, environment
from dpbench.errors import BadInput
from dpbench.mechanisms.base import Mechanism, TrainContext
from dpbench.models import MODELS, build_model, count_parameters
from dpbench.persample import BookKeeping, unsupported_layer
from dpbench.pipeline import prepare
from dpbench.progress import TrainingProgress
from dpbench.runstate import RunState
from dpbench.step import Batches, nonprivate_step, private_step
from dpbench.results import record_run

DEFAULT_PHYSICAL_BATCH = 1024

EVAL_BATCH = 4096


def physical_batch_size(cfg: RunConfig) -> int:
    """``--physical-batch-size``, else the model's declared default (small for text models), at most B."""
    default = MODELS.entry(cfg.model).meta.get("physical_batch_size", DEFAULT_PHYSICAL_BATCH)
    return cfg.physical_batch_size or min(cfg.batch_size, default)


@dataclass
class TrainOutcome:
    model: nn.Module
    test_acc: float
    test_loss: float
    train_wall_s: float
    samples_seen: int
    final_train_loss: float
    grad_sample: str | None = None  # the per-sample path that trained a private model
    resumed_from_step: int = 0  # the checkpoint's step where a resumed run continued, else 0


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


@dataclass(frozen=True)
class Interim:
    """Evaluations on the held-out split during training, at fractions of the steps (tuning prunes on them).

    ``report(step, steps, accuracy)`` may raise to stop the run; evaluating changes no random state, so a
    run with interim evaluations ends where the same run without them ends.
    """

    fractions: tuple[float, ...]
    report: Callable[[int, int, float], None]

    def steps(self, total: int) -> set[int]:
        return {s for s in (int(f * total) for f in self.fractions) if 0 < s < total}


def train(cfg: RunConfig, mech: Mechanism, data: DatasetBundle, noise_multiplier: float, steps: int,
          device: torch.device, *, show_progress: bool = True,
          on_optimizer: Callable[[torch.optim.Optimizer], None] | None = None,
          checkpointer: Checkpointer | None = None, resume: bool = False,
          model_factory: Callable[[], nn.Module] | None = None, interim: Interim | None = None) -> TrainOutcome:
    """Train ``steps`` logical steps of ``mech`` and evaluate on the test split.

    With a ``checkpointer`` the state is saved every few minutes; ``resume`` continues from it.
    ``model_factory`` replaces the registry's ``cfg.model`` (the conformance checks use a tiny model).
    ``interim`` evaluates on the test split (the held-out split of a ``*_val`` dataset) during training.
    """
    keep_freed_memory()
    n = data.train_size
    q = cfg.sample_rate(n)
    state = RunState(cfg.seed, cfg.secure, device)
    new_model = model_factory or (lambda: build_model(cfg.model, data.input_shape, data.num_classes))
    state.seed_model_init()
    model = new_model()
    state.after_model_init()
    copies = max(1, data.augmentations)
    grad_sample = None
    if mech.private:
        errors = ModuleValidator.validate(model, strict=False)
        if errors:
            raise BadInput(f"model {cfg.model!r} cannot be trained privately: {errors[0]}")
        grad_sample = per_sample_path(cfg, model)
        if grad_sample == "fast":
            model = BookKeeping(model, copies=copies)
        else:
            model = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    model.to(device).train()

    # --secure: Gaussian noise hardened against floating-point attacks (2n draws, as Opacus' secure_mode); its
    # secure RNG needs torchcsprng, which has no release for this torch, so the generators stay OS-seeded PRNGs.
    optimizer = mech.make_optimizer(_base_optimizer(cfg, model.parameters()), noise_multiplier=noise_multiplier,
                                    max_grad_norm=cfg.clip, expected_batch_size=cfg.batch_size,
                                    generator=state.generator("noise"), secure_mode=cfg.secure)
    if isinstance(model, BookKeeping):
        if [id(p) for p in optimizer.params] != [id(p) for p in model.trainable]:
            raise RuntimeError("the optimizer's parameters are not the fast path's trainable parameters, in order")
        optimizer.fast = model
    if on_optimizer is not None:
        on_optimizer(optimizer)
    sampling = state.generator("sampling", torch.device("cpu"))
    batches = Batches(data.train_x.to(device), data.train_y.to(device), physical_batch_size(cfg),
                      data.train_transform, copies)
    if batches.augment is not None:
        batches.augmenter = state.generator("augmentation")

    criterion = nn.CrossEntropyLoss()
    ctx = TrainContext(cfg=cfg, model=model, optimizer=optimizer, train_x=batches.x, train_y=batches.y,
                       criterion=criterion, noise_multiplier=noise_multiplier, sample_rate=q, steps=steps,
                       physical_batch_size=batches.physical, device=device, make_generator=state.generator,
                       build_model=new_model)
    mech.setup(ctx)
    if checkpointer is not None and resume:
        state.restore(checkpointer, model, optimizer, mech)

    start, samples_before = state.step, state.samples
    sampler = mech.make_sampler(n, q, steps - start, sampling)
    interim_steps = interim.steps(steps) if interim is not None else set()
    t0 = time.perf_counter()
    progress = TrainingProgress(f"{cfg.mech} {cfg.dataset}", steps, start, enabled=show_progress)
    with progress, warnings.catch_warnings():
        # Opacus' hooks on the first layer fire on module outputs when inputs need no gradient: harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for step, indices in enumerate(sampler, start=start):
            mech.begin_step(ctx, step)
            idx = _to_device(indices, device)
            if mech.private:
                loss_sum = private_step(model, optimizer, criterion, batches, idx)
            else:
                loss_sum = nonprivate_step(model, optimizer, batches, idx, cfg.batch_size)
            state.record(len(idx), loss_sum)
            progress.update(state.step, lambda: state.ema_loss, state.samples - samples_before)
            if interim is not None and state.step in interim_steps:
                interim.report(state.step, steps, evaluate(model, data.test_x.to(device), data.test_y.to(device))[0])
            if checkpointer is not None and state.step < steps:
                checkpointer.maybe_save(lambda: state.snapshot(model, optimizer, mech,
                                                               state.wall + time.perf_counter() - t0))
    wall = state.wall + time.perf_counter() - t0
    acc, test_loss = evaluate(model, data.test_x.to(device), data.test_y.to(device))
    return TrainOutcome(model, acc, test_loss, wall, state.samples, state.ema_loss, grad_sample, start)


def _to_device(indices: list[int], device: torch.device) -> torch.Tensor:
    """A batch's indices on the device; to a GPU from pinned memory, without waiting for its queue."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if device.type == "cuda":
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def per_sample_path(cfg: RunConfig, model: nn.Module) -> str:
    """``cfg.grad_sample``, except that a model with a layer the fast path does not cover takes the reference."""
    if cfg.grad_sample != "fast":
        return cfg.grad_sample
    reason = unsupported_layer(model)
    if reason is None:
        return "fast"
    warn(f"the fast per-sample path does not cover {reason}; training with --grad-sample reference (Opacus)")
    return "reference"


def _peak_mem_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(cfg: RunConfig, *, show_progress: bool = True, resume: bool = False,
        checkpoint_every_s: float = 300.0, interim: Interim | None = None,
        checkpoint_dir: str | None = None) -> dict[str, Any]:
    """Validate, calibrate, train, evaluate and record one run; returns the CSV row.

    A checkpoint is kept beside the CSV (or in ``checkpoint_dir``) while the run trains; ``resume``
    continues from it.
    """
    result = execute(cfg, show_progress=show_progress, resume=resume, checkpoint_every_s=checkpoint_every_s,
                     interim=interim, checkpoint_dir=checkpoint_dir)
    record_run(cfg.out, result.row, result.record)
    result.checkpoint.clear()
    return result.row


@dataclass
class Executed:
    """A finished run not yet recorded: its CSV row, its run record, and the checkpoint to clear once the
    row is written (a run whose row was lost continues from it)."""

    row: dict[str, Any]
    record: dict[str, Any]
    checkpoint: Checkpointer


def execute(cfg: RunConfig, *, show_progress: bool = True, resume: bool = False, checkpoint_every_s: float = 300.0,
            interim: Interim | None = None, checkpoint_dir: str | None = None,
            check_out: bool = True) -> Executed:
    """Validate, calibrate, train and evaluate one run, writing nothing but checkpoints.

    ``check_out=False`` skips the checks of ``cfg.out`` (a Ray task on a node that cannot see the
    driver's CSV: the driver checked it and writes the row).
    """
    started = _now()
    prepared = prepare(cfg, check_out=check_out)
    device, mech, data, noise, privacy = prepared.device, prepared.mech, prepared.data, prepared.noise, prepared.privacy
    n, q, steps = prepared.n, prepared.q, prepared.steps

    meter = LoadMeter()
    config_hash = cfg.hash(data.variant)
    checkpointer = Checkpointer(checkpoint_path(cfg.out, config_hash, cfg.seed, cfg.secure, checkpoint_dir),
                                checkpoint_every_s, secure=cfg.secure)
    reproducible_checkpoint = checkpoint_path(cfg.out, config_hash, cfg.seed, secure=False, folder=checkpoint_dir)
    if resume and cfg.secure and not checkpointer.path.exists() and reproducible_checkpoint.exists():
        warn(f"{reproducible_checkpoint} is a checkpoint of a reproducible run of this configuration; a --secure "
             "run never continues one (its randomness is derived from --seed), so this run starts afresh")
    outcome = train(cfg, mech, data, noise, steps, device, show_progress=show_progress,
                    checkpointer=checkpointer, resume=resume, interim=interim)
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
        "grad_sample": outcome.grad_sample or "", "eps_pld": privacy.eps_pld, "recipe_source": cfg.recipe_source,
    }
    record = {"row": row, "config": asdict(cfg), "privacy": privacy.as_json(), "environment": env,
              "model_parameters": count_parameters(outcome.model), "train_size": n,
              "final_train_loss": outcome.final_train_loss, "resumed_from_step": outcome.resumed_from_step}
    return Executed(row, record, checkpointer)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)

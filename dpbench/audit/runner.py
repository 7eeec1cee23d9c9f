"""``dpbench audit``: one training run with m canaries, scored and turned into an eps lower bound.

The run is the mechanism's own: same loop (``dpbench.engine.train``), same sampler, optimizer step and
calibrated noise as ``dpbench run``; only the canaries are added. The statistics are in
``dpbench.audit.stats``.

How N and q are treated.
- White-box: the gradient canaries are extra records that exist only as gradients. The data set size
  N, the rate q = B/N, the steps T and so the calibrated noise are those of the real training split,
  fixed before S is drawn. Each included canary is Poisson-sampled into each step at
  ``mech.sample_rate(q)``, as the accountant assumes of the differing record, so the run is the
  accounted mechanism on the data set "training split + included canaries". The divisor of the
  noisy sum stays the public B (N for DPIS), so canaries only make the realised batches larger.
- Black-box: m records of the training split become label-flipped canaries; the training set is
  the other N - m records plus the included canaries, N' = N - m + |S| records, and q = B/N' and
  T = floor(E N'/B) are computed from that set, as ``dpbench run`` would. N' is treated as public,
  as in every DP-SGD implementation; its dependence on S moves q by B/N'^2 per canary.
"""

from __future__ import annotations

import csv
import io
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from dpbench.audit import stats
from dpbench.audit.canaries import GradientCanaries, draw_membership, flip_labels
from dpbench.config import RunConfig
from dpbench.data import DatasetBundle
from dpbench.engine import train
from dpbench.pipeline import prepare
from dpbench.runstate import derive_seed
from dpbench.environment import environment
from dpbench.errors import BadInput
from dpbench.mechanisms import get_mechanism
from dpbench.results import CsvSchema, append_row
from dpbench.storage import write_text_atomic

THREATS = ("white", "black")
DEFAULT_CANARIES = 1000
CONFIDENCE = 0.95

AUDIT_COLUMNS: tuple[str, ...] = (
    "audit_id", "started_at", "finished_at", "mech", "dataset", "dataset_variant", "model", "eps_claimed",
    "delta", "threat_model", "m", "k", "k_plus", "k_minus", "correct", "eps_lower_bound", "auroc",
    "tpr_at_fpr_0.01", "confidence", "exceeds_claim", "seed", "accountant", "eps_spent", "noise_multiplier",
    "sample_rate", "canary_rate", "train_size", "included", "batch_size", "epochs", "steps", "lr", "clip",
    "test_acc", "k_grid", "wall_s", "scores_file", "roc_file", "mech_params", "dpbench_version", "git_commit",
    "command",
)
AUDITS = CsvSchema("audit", AUDIT_COLUMNS)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_audit_options(cfg: RunConfig, canaries: int, threat: str, train_size: int | None) -> None:
    """Bad audit options are BadInput (exit 2), caught before any data is loaded."""
    if threat not in THREATS:
        raise BadInput(f"--threat {threat!r}: choose white or black")
    if not isinstance(canaries, int) or canaries < 2:
        raise BadInput(f"--canaries {canaries}: need at least 2")
    if train_size is not None and train_size < 1:
        raise BadInput(f"--train-size {train_size}: must be positive")


def _subset(data: DatasetBundle, n: int | None) -> DatasetBundle:
    if n is None:
        return data
    if n > data.train_size:
        raise BadInput(f"--train-size {n}: the {data.name} training split has only {data.train_size} records")
    return replace(data, train_x=data.train_x[:n], train_y=data.train_y[:n])


def _input_canaries(data: DatasetBundle, m: int, included: np.ndarray, seed_of) -> tuple[DatasetBundle, torch.Tensor, torch.Tensor]:
    """(training set without the excluded canaries, canary inputs, flipped canary labels)."""
    n = data.train_size
    if m >= n:
        raise BadInput(f"--canaries {m}: black-box canaries come from the training split, which has only {n} records")
    g = torch.Generator().manual_seed(seed_of("audit-canary-pool"))
    pool = torch.randperm(n, generator=g)[:m]
    keep = torch.ones(n, dtype=torch.bool)
    keep[pool] = False
    cx = data.train_x[pool]
    cy = flip_labels(data.train_y[pool], data.num_classes, g)
    inc = torch.as_tensor(included, dtype=torch.bool)
    train_x = torch.cat([data.train_x[keep], cx[inc]])
    train_y = torch.cat([data.train_y[keep], cy[inc]])
    return replace(data, train_x=train_x, train_y=train_y), cx, cy


@torch.no_grad()
def _loss_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device) -> np.ndarray:
    """Minus the per-record loss: a record the model fits better is more likely to have been trained on."""
    model.eval()
    out = []
    for i in range(0, len(y), 1024):
        logits = model(x[i:i + 1024].to(device))
        out.append(nn.functional.cross_entropy(logits, y[i:i + 1024].to(device), reduction="none").double().cpu())
    model.train()
    return -torch.cat(out).numpy()


def run_audit(cfg: RunConfig, *, canaries: int = DEFAULT_CANARIES, threat: str = "white",
              train_size: int | None = None, show_progress: bool = True) -> dict[str, Any]:
    """Train once with m canaries, score them, bound eps from below; append one row to ``cfg.out``.

    Writes ``<stem>-<audit_id>.scores.csv`` (canary, included, score) and ``...roc.png`` beside the CSV.
    """
    started, t0 = _now(), time.perf_counter()
    check_audit_options(cfg, canaries, threat, train_size)
    seed_of = lambda purpose: derive_seed(cfg.seed, purpose)  # noqa: E731
    included = draw_membership(seed_of, canaries)
    black_box: list[torch.Tensor] = []

    def with_input_canaries(data: DatasetBundle) -> DatasetBundle:
        data, canary_x, canary_y = _input_canaries(data, canaries, included, seed_of)
        black_box.extend((canary_x, canary_y))
        return data

    prepared = prepare(cfg, schema=AUDITS, raw_data=lambda data: _subset(data, train_size),
                       model_data=with_input_canaries if threat == "black" else None, with_others=False)
    device, mech, data, noise, privacy = prepared.device, prepared.mech, prepared.data, prepared.noise, prepared.privacy
    n, q, steps = prepared.n, prepared.q, prepared.steps
    canary_rate = mech.sample_rate(q)

    hook = None
    if threat == "white":
        hook = GradientCanaries(mech, included, canary_rate, cfg.clip, cfg.batch_size, seed_of)
    outcome = train(cfg, mech, data, noise, steps, device, show_progress=show_progress,
                    on_optimizer=hook.attach if hook is not None else None)
    if hook is not None:
        if hook.steps_seen != steps:
            raise RuntimeError(f"the canary hook ran {hook.steps_seen} times in {steps} steps")
        scores = hook.scores(get_mechanism(cfg.mech)(**cfg.mech_params))
    else:
        scores = _loss_scores(outcome.model, *black_box, device)
    result = stats.audit(scores, included, cfg.delta, beta=1.0 - CONFIDENCE)

    audit_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{cfg.mech}-{threat}-{uuid.uuid4().hex[:6]}"
    out = Path(cfg.out)
    stem = out.parent / f"{out.stem}-{audit_id}"
    scores_file, roc_file = stem.with_suffix(".scores.csv"), stem.with_suffix(".roc.png")
    _write_scores(scores_file, scores, included)
    claimed = float(cfg.eps)
    _plot_roc(roc_file, scores, included, f"{cfg.mech} on {cfg.dataset}, {threat}-box, eps {claimed:g}: "
              f"lower bound {result.eps_lower_bound:.3g}, AUROC {result.auroc:.3f}")
    env = environment()
    row: dict[str, Any] = {
        "audit_id": audit_id, "started_at": started, "finished_at": _now(), "mech": cfg.mech,
        "dataset": cfg.dataset, "dataset_variant": data.variant, "model": cfg.model, "eps_claimed": claimed,
        "delta": cfg.delta, "threat_model": threat, "m": canaries, "k": result.k, "k_plus": result.k_plus,
        "k_minus": result.k_minus, "correct": result.correct, "eps_lower_bound": result.eps_lower_bound,
        "auroc": result.auroc, "tpr_at_fpr_0.01": result.tpr_at_fpr_001, "confidence": CONFIDENCE,
        "exceeds_claim": bool(result.eps_lower_bound > claimed), "seed": cfg.seed,
        "accountant": privacy.accountant, "eps_spent": privacy.eps, "noise_multiplier": noise,
        "sample_rate": q, "canary_rate": canary_rate, "train_size": n, "included": result.included,
        "batch_size": cfg.batch_size, "epochs": cfg.nominal_epochs(n), "steps": steps, "lr": cfg.lr,
        "clip": cfg.clip, "test_acc": outcome.test_acc, "k_grid": " ".join(map(str, result.k_grid)),
        "wall_s": round(time.perf_counter() - t0, 3), "scores_file": scores_file.name, "roc_file": roc_file.name,
        "mech_params": mech.params, "dpbench_version": env["dpbench_version"], "git_commit": env["git_commit"],
        "command": audit_command(cfg, canaries, threat, train_size),
    }
    append_row(out, row, AUDITS)
    return row


def audit_command(cfg: RunConfig, canaries: int, threat: str, train_size: int | None) -> str:
    """The ``dpbench audit`` command that reproduces this audit."""
    parts = cfg.command().replace("dpbench run", "dpbench audit", 1)
    extra = f" --canaries {canaries} --threat {threat}"
    if train_size is not None:
        extra += f" --train-size {train_size}"
    return parts + extra


# -- files -----------------------------------------------------------------------------------------
def _write_scores(path: Path, scores: np.ndarray, included: np.ndarray) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(("canary", "included", "score"))
    for i, (s, inc) in enumerate(zip(scores, included)):
        w.writerow((i, int(inc), repr(float(s))))
    write_text_atomic(path, buf.getvalue())


def read_scores(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(scores, included) from a scores file written by an audit."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return (np.array([float(r["score"]) for r in rows]), np.array([r["included"] == "1" for r in rows]))


def _plot_roc(path: Path, scores: np.ndarray, included: np.ndarray, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    if 0 < included.sum() < len(included):
        fpr, tpr = stats.roc(scores, included)
        for ax, log in zip(axes, (False, True)):
            ax.plot(fpr, tpr, drawstyle="steps-post", label="canary scores")
            ax.plot([1e-3 if log else 0, 1], [1e-3 if log else 0, 1], "k--", lw=0.8, label="chance")
            if log:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlim(1 / len(scores), 1)
                ax.set_ylim(1 / len(scores), 1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.legend(loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

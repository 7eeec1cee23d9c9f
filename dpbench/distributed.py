"""Ray: runs of a sweep (and trials of a tune) as Ray tasks, with the driver as the only writer.

A task trains one configuration with ``engine.execute`` and returns its row and record; it writes only
its checkpoint, into a folder every node must reach. The driver appends the row (atomically, as a
local run does), writes the record, then deletes the checkpoint. A task whose worker or node dies is
retried by Ray (``max_retries``) and resumes from that checkpoint; a result reaches the driver once
per task, so every configuration gets exactly one row. A killed driver is restarted like a local
sweep: configurations already in the CSV are skipped, the others resume from their checkpoints.

Ray is an optional extra (``pip install 'dpbench[ray]'``); nothing here imports it until asked.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ContextManager, Iterator

from rich.console import Console
from rich.markup import escape

from dpbench.config import RunConfig, check_writable
from dpbench.errors import BadInput
from dpbench.results import RUNS, check_compatible, record_run
from dpbench.storage import held_exclusively
from dpbench.sweep import Outcome, failures_log, grid_line, label, log_failure, pending, grid_progress, summary

#: Backends of ``sweep`` and ``tune``.
BACKENDS = ("local", "ray")
#: Times Ray reruns a task whose worker or node died (application errors are never retried).
MAX_RETRIES = 3
#: Environment a task needs from the driver's (where the data and the feature cache are).
FORWARDED_ENV = ("DPBENCH_DATA", "DPBENCH_CACHE", "DPBENCH_OFFLINE")


def require_ray() -> Any:
    """The ``ray`` module, or a BadInput that says how to install it."""
    try:
        import ray
    except ImportError:
        raise BadInput("--backend ray: Ray is not installed; install it with pip install 'dpbench[ray]' "
                       "(or pip install ray==2.60.0), or use --backend local") from None
    return ray


def check_backend(backend: str, address: str | None, cpus_per_run: float, gpus_per_run: float) -> None:
    """Every check of the backend options that needs no cluster."""
    if backend not in BACKENDS:
        raise BadInput(f"--backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "local":
        if address is not None:
            raise BadInput(f"--address {address}: only with --backend ray")
        return
    if not cpus_per_run > 0:
        raise BadInput(f"--cpus-per-run {cpus_per_run}: must be positive")
    if not gpus_per_run >= 0:
        raise BadInput(f"--gpus-per-run {gpus_per_run}: must be 0 or more (fractions share a GPU)")
    require_ray()


@contextmanager
def connected(address: str | None) -> Iterator[Any]:
    """Ray, connected to the cluster at ``address`` or to a local instance started here (and stopped after).

    Without an address Ray is asked for a new local instance ("local"): left to itself it would join the cluster
    that ``RAY_ADDRESS`` or ``/tmp/ray/ray_current_cluster`` names, which may be another user's or long dead
    (a killed driver leaves that file behind). A process already connected (a test's cluster) keeps its
    connection; an ``address`` naming another cluster is then refused.
    """
    ray = require_ray()
    if address is not None:
        check_reachable(address)
    if ray.is_initialized():
        check_same_cluster(address, ray.get_runtime_context().gcs_address)
        yield ray
        return
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    try:
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": env} if env else None)
    except (ConnectionError, ValueError) as exc:
        raise BadInput(f"--address {address}: cannot connect to a Ray cluster there ({exc})") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def check_same_cluster(address: str | None, connected_to: str) -> None:
    """An ``address`` given to a process already connected elsewhere is refused, not silently replaced by the
    connection (hosts may be spelled differently for one cluster, so the ports decide)."""
    if address is None or "://" in address or address in ("auto", "local"):
        return
    port, connected_port = address.rpartition(":")[2], connected_to.rpartition(":")[2]
    if port.isdigit() and connected_port.isdigit() and int(port) != int(connected_port):
        raise BadInput(f"--address {address}: this process is already connected to the Ray cluster at "
                       f"{connected_to}; disconnect (ray.shutdown()) first or pass that address")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A ``host:port`` address must accept a connection: Ray itself retries an unreachable one for minutes."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", ray://...: Ray's own resolution
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise BadInput(f"--address {address}: no Ray cluster answers there ({exc.strerror or exc}); start one with "
                       f"'ray start --head --port {port}' or check the address") from None


def task_device(cfg: RunConfig, gpus_per_run: float) -> str:
    """The device a task trains on: the GPU Ray assigned it (``cuda``: Ray sets CUDA_VISIBLE_DEVICES), else the
    configuration's."""
    return "cuda" if gpus_per_run > 0 else cfg.device


def train_in_task(cfg: RunConfig, checkpoint_dir: str, checkpoint_every_s: float, threads: int) -> dict[str, Any]:
    """The body of a Ray task: one configuration, trained and returned, never written to the CSV."""
    import ray
    import torch

    from dpbench.engine import execute

    torch.set_num_threads(threads)
    node = ray.get_runtime_context().get_node_id()
    t0 = time.perf_counter()
    try:
        result = execute(cfg, show_progress=False, resume=True, checkpoint_every_s=checkpoint_every_s,
                         checkpoint_dir=checkpoint_dir, check_out=False)
    except BadInput as exc:
        return {"ok": False, "detail": str(exc), "text": str(exc), "node": node}
    except Exception as exc:  # noqa: BLE001 - reported to the driver, which logs it and goes on
        return {"ok": False, "detail": f"{type(exc).__name__}: {exc}", "text": traceback.format_exc(), "node": node}
    return {"ok": True, "row": result.row, "record": result.record, "checkpoint": str(result.checkpoint.path),
            "node": node, "seconds": time.perf_counter() - t0}


def sole_writer(out: str) -> ContextManager[None]:
    """Hold ``<out>.sweep.lock`` while this driver writes ``out``; a second driver on it is refused."""
    path = Path(out).with_suffix(".sweep.lock")
    return held_exclusively(path, f"--out {out}: another sweep driver is writing it ({path} is held)")


def run_sweep_ray(configs: list[RunConfig], out: str, *, address: str | None = None, cpus_per_run: float = 1.0,
                  gpus_per_run: float = 0.0, checkpoint_dir: str | None = None, checkpoint_every_s: float = 300.0,
                  max_retries: int = MAX_RETRIES, console: Console | None = None) -> list[Outcome]:
    """Run every configuration not yet in ``out`` as a Ray task; returns the outcomes of those run."""
    console = console or Console(stderr=True)
    check_writable(out)
    check_compatible(Path(out), RUNS)
    folder = str(Path(checkpoint_dir or Path(out).parent / "checkpoints").resolve())
    threads = max(1, int(cpus_per_run))
    with sole_writer(out):
        todo = pending(configs, out, console)
        if not todo:
            return []
        failures = failures_log(out)
        outcomes: list[Outcome] = []
        with connected(address) as ray:
            remote = ray.remote(train_in_task).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run,
                                                       max_retries=max_retries)
            started = time.perf_counter()
            submitted = {remote.remote(replace(c, device=task_device(c, gpus_per_run)), folder, checkpoint_every_s,
                                       threads): (c, time.perf_counter()) for c in todo}
            with grid_progress(console) as progress:
                bar = progress.add_task(f"sweep (ray, {len(todo)} tasks)", total=len(todo))
                while submitted:
                    ready, _ = ray.wait(list(submitted), num_returns=1)
                    cfg, t0 = submitted.pop(ready[0])
                    try:
                        result = ray.get(ready[0])
                    except ray.exceptions.RayError as exc:  # retries exhausted: the worker or node kept dying
                        first = str(exc).strip().splitlines()
                        result = {"ok": False, "detail": f"{type(exc).__name__}: {first[0] if first else ''}",
                                  "text": str(exc), "node": "?"}
                    outcome = Outcome(cfg, bool(result["ok"]), result.get("seconds", time.perf_counter() - t0))
                    node = str(result.get("node", "?"))[:8]
                    if outcome.ok:
                        record_run(out, result["row"], {**result["record"], "ray_node": result["node"]})
                        Path(result["checkpoint"]).unlink(missing_ok=True)
                        row = result["row"]
                        console.print(f"[green]done[/] {escape(label(cfg))}: acc {100 * row['test_acc']:.2f} %, "
                                      f"eps {row['eps_spent']:.4g}, {outcome.seconds:.0f} s, node {node}",
                                      highlight=False, soft_wrap=True)
                    else:
                        outcome.detail = result["detail"]
                        log_failure(failures, cfg, f"failed on node {node}", cfg.command(), result["text"])
                        console.print(f"[red]failed[/] {escape(label(cfg))} on node {node}: {escape(outcome.detail)} "
                                      f"(see {failures})", highlight=False, soft_wrap=True)
                    outcomes.append(outcome)
                    progress.advance(bar)
                    if not console.is_terminal:
                        console.print(grid_line(len(outcomes), len(todo), time.perf_counter() - started),
                                      highlight=False)
    summary(outcomes, out, console)
    return outcomes

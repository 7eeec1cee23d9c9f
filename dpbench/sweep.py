"""Sweeps: a grid of mechanism x dataset x model x eps x seed, run as resumable subprocesses.

Each configuration runs as its own ``dpbench run ... --resume`` process, so a crash is contained,
the command in the failures log reproduces it exactly, and a killed sweep loses at most the runs in
flight (which continue from their checkpoints next time). A (config_hash, seed) pair already in the
output CSV is skipped, so re-running a finished sweep trains nothing.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from dpbench.config import RunConfig, load_toml, notes_said_once, options_from_table, resolve
from dpbench.data import dataset_variant
from dpbench.errors import BadInput
from dpbench.mechanisms import MECHANISMS
from dpbench.privacy import check_accountant
from dpbench.progress import PASSED_ON_PREFIXES, PLAIN_PREFIX, format_duration

GRID_KEYS = ("mech", "dataset", "model", "eps", "seed")


@dataclass
class SweepSpec:
    grid: dict[str, list[Any]]
    fixed: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-mechanism overrides
    recipes: str | None = None  # tuned recipes (``dpbench tune``) replacing the built-in ones


def read_spec(path: str) -> SweepSpec:
    data = load_toml(path, "sweep spec")
    unknown = set(data) - {"grid", "fixed", "recipe", "recipes"}
    if unknown:
        raise BadInput(f"sweep spec {path!r}: unknown table(s) {sorted(unknown)}; expected grid, fixed, recipe "
                       f"(and a recipes = \"FILE\" key)")
    grid = {k: v if isinstance(v, list) else [v] for k, v in data.get("grid", {}).items()}
    bad = set(grid) - set(GRID_KEYS)
    if bad:
        raise BadInput(f"sweep spec {path!r}: unknown grid key(s) {sorted(bad)}; expected {', '.join(GRID_KEYS)}")
    fixed, recipe, recipes = dict(data.get("fixed", {})), dict(data.get("recipe", {})), data.get("recipes")
    # a key written after [fixed] belongs to it in TOML: the same file, not silently dropped
    in_fixed = fixed.pop("recipes", None)
    if in_fixed is not None and recipes is not None and in_fixed != recipes:
        raise BadInput(f"sweep spec {path!r}: recipes = {recipes!r} at the top and {in_fixed!r} under [fixed]")
    recipes = recipes if recipes is not None else in_fixed
    if recipes is not None and not isinstance(recipes, str):
        raise BadInput(f"sweep spec {path!r}: recipes must be a file name")
    for mech, table in recipe.items():
        if "recipes" in table:
            raise BadInput(f"sweep spec {path!r}: recipes under [recipe.{mech}]: it names the tuned recipes of the "
                           f"whole sweep; give it at the top of the spec")
    return SweepSpec(grid, fixed, recipe, recipes)


def expand(spec: SweepSpec) -> list[RunConfig]:
    """All configurations of the grid; ``mech = ["*"]`` means every built-in mechanism.

    Patterns match built-in mechanisms only: an installed plugin joins a sweep when it is named.

    Configurations that resolve to the same (config hash, seed), such as the non-private control at
    every eps, appear once.
    """
    mechs: list[str] = []
    for pattern in spec.grid.get("mech", ["*"]):
        if pattern in MECHANISMS:
            MECHANISMS.get(pattern)  # a named plugin that cannot be used fails here, before any run
            names = [pattern]
        else:
            names = MECHANISMS.names(pattern, plugins=False)
            if not names:
                MECHANISMS.entry(pattern)  # raises with a "did you mean"
        mechs += [m for m in names if m not in mechs]
    axes = {
        "mech": mechs,
        "dataset": spec.grid.get("dataset", ["mnist"]),
        "model": spec.grid.get("model", [None]),
        "eps": spec.grid.get("eps", [3.0]),
        "seed": spec.grid.get("seed", [0]),
    }
    fixed = options_from_table(spec.fixed)
    configs: list[RunConfig] = []
    seen: set[tuple[str, int]] = set()
    with notes_said_once():  # one note per configuration, not one per seed of it
        for mech, dataset, model, eps, seed in itertools.product(*axes.values()):
            opts = {**fixed, **options_from_table(spec.recipe.get(mech, {}))}
            params = {**fixed.get("mech_params", {}), **opts.get("mech_params", {})}
            opts.update(mech=mech, dataset=dataset, eps=float(eps), seed=int(seed), mech_params=params,
                        recipes=spec.recipes)
            if model is not None:
                opts["model"] = model
            cfg = resolve(opts)
            try:
                check_accountant(MECHANISMS.get(cfg.mech)(**cfg.mech_params), cfg.accountant)
            except BadInput as exc:
                raise BadInput(f"{exc}; in a sweep spec, accountant = \"rdp\" under [recipe.{mech}] keeps the others") \
                    from None
            key = (cfg.hash(dataset_variant(cfg.dataset, cfg.data_dir)), cfg.seed)
            if key not in seen:
                seen.add(key)
                configs.append(cfg)
    return configs


def finished_keys(csv_path: str | Path) -> set[tuple[str, int]]:
    """(config_hash, seed) pairs that already have a row."""
    path = Path(csv_path)
    if not path.exists() or path.stat().st_size == 0:
        return set()
    df = pd.read_csv(path, usecols=["config_hash", "seed"], dtype={"config_hash": str})
    return {(h, int(s)) for h, s in zip(df["config_hash"], df["seed"])}


def run_command(cfg: RunConfig, out: str, device: str, checkpoint_dir: str | None = None) -> list[str]:
    """The ``dpbench run`` command of one configuration (as a list for subprocess).

    Not ``--quiet``: its stderr is a pipe, so it prints plain progress lines, which the sweep shows.
    """
    args = shlex.split(cfg.command())[2:] + ["--out", out, "--device", device, "--resume"]
    # execution settings stay out of the reproducing command (they change no result) but the run needs them
    if cfg.physical_batch_size is not None:
        args += ["--physical-batch-size", str(cfg.physical_batch_size)]
    if cfg.data_dir:
        args += ["--data-dir", cfg.data_dir]
    if checkpoint_dir:
        args += ["--checkpoint-dir", checkpoint_dir]
    return [sys.executable, "-m", "dpbench.cli", "run", *args]


def _die_with_parent() -> None:
    """Children die with the sweep (Linux), so a killed sweep leaves no orphan writing rows."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Outcome:
    cfg: RunConfig
    ok: bool
    seconds: float
    detail: str = ""


def label(cfg: RunConfig) -> str:
    eps = "inf" if cfg.eps == float("inf") else f"{cfg.eps:g}"
    return f"{cfg.mech} {cfg.dataset}/{cfg.model} eps={eps} seed={cfg.seed}"


def run_sweep(configs: list[RunConfig], out: str, *, jobs: int = 1, devices: list[str] | None = None,
              checkpoint_dir: str | None = None, console: Console | None = None) -> list[Outcome]:
    """Run every configuration not yet in ``out``; returns the outcomes of those run."""
    console = console or Console(stderr=True)
    todo = pending(configs, out, console)
    if not todo:
        return []
    slots = devices or ["cpu"] * max(1, jobs)
    # the cores are shared out between workers unless the caller fixed the thread count
    threads_each = int(os.environ.get("OMP_NUM_THREADS") or 0) or max(1, (os.cpu_count() or 1) // len(slots))
    failures = failures_log(out)
    work: queue.Queue[RunConfig] = queue.Queue()
    for c in todo:
        work.put(c)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    progress = grid_progress(console)
    started = time.perf_counter()
    with progress:
        overall = progress.add_task("sweep", total=len(todo))

        def worker(device: str) -> None:
            env = {**os.environ, "OMP_NUM_THREADS": str(threads_each), "PYTHONUNBUFFERED": "1"}
            while True:
                try:
                    cfg = work.get_nowait()
                except queue.Empty:
                    return
                cmd = run_command(cfg, out, device, checkpoint_dir)
                tag = f"{label(cfg)} [{device}]"
                task = progress.add_task(escape(f"  {tag}"), total=None)
                t0 = time.perf_counter()
                returncode, stdout, stderr = _run_showing_progress(
                    cmd, env, lambda line: _show_run_progress(progress, task, console, tag, line))
                outcome = Outcome(cfg, returncode == 0, time.perf_counter() - t0)
                progress.remove_task(task)
                with lock:
                    if not outcome.ok:
                        lines = [ln for ln in (stderr or stdout).strip().splitlines()
                                 if not ln.startswith(PLAIN_PREFIX)]
                        outcome.detail = lines[-1] if lines else f"exit {returncode}"
                        log_failure(failures, cfg, f"exit {returncode}", shlex.join(['dpbench', *cmd[3:]]),
                                    f"{stderr}{stdout[-2000:]}")
                        console.print(f"[red]failed[/] {label(cfg)}: {outcome.detail} (see {failures})")
                    else:
                        console.print(f"[green]done[/] {label(cfg)} in {outcome.seconds:.0f} s")
                    outcomes.append(outcome)
                    progress.advance(overall)
                    if not console.is_terminal:  # the bar is invisible in a log: say where the grid stands
                        console.print(grid_line(len(outcomes), len(todo), time.perf_counter() - started),
                                      highlight=False)

        pool = [threading.Thread(target=worker, args=(d,), daemon=True) for d in slots]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
    summary(outcomes, out, console)
    return outcomes


def failures_log(out: str | Path) -> Path:
    """``<out>.failures.log``: every failed configuration, with the command that reproduces it."""
    return Path(out).with_suffix(".failures.log")


def log_failure(path: Path, cfg: RunConfig, status: str, reproduce: str, text: str) -> None:
    with open(path, "a") as fh:
        fh.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} {status}: {label(cfg)}\n"
                 f"reproduce: {reproduce}\n{text}\n")


def pending(configs: list[RunConfig], out: str, console: Console) -> list[RunConfig]:
    """The configurations without a row in ``out``, said on the console."""
    done = finished_keys(out)
    todo = [c for c in configs if (c.hash(dataset_variant(c.dataset, c.data_dir)), c.seed) not in done]
    console.print(f"sweep: {len(configs)} configurations, {len(configs) - len(todo)} already in {out}, "
                  f"{len(todo)} to run")
    if not todo:
        console.print("nothing to train")
    return todo


def grid_progress(console: Console) -> Progress:
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)


def _run_showing_progress(cmd: list[str], env: dict[str, str], on_progress: Callable[[str], None]) -> tuple[int, str, str]:
    """Run ``cmd``; each progress line it prints on stderr, and each line it says that a sweep passes on
    (``PASSED_ON_PREFIXES``), goes to ``on_progress`` as it comes.

    Returns (exit code, stdout, stderr); stdout is drained by a thread so that neither pipe can fill up.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=_die_with_parent)
    stdout: list[str] = []
    reader = threading.Thread(target=lambda: stdout.append(proc.stdout.read()), daemon=True)
    reader.start()
    stderr: list[str] = []
    for line in proc.stderr:
        stderr.append(line)
        if line.startswith((PLAIN_PREFIX, *PASSED_ON_PREFIXES)):
            on_progress(line.strip())
    returncode = proc.wait()
    reader.join()
    return returncode, "".join(stdout), "".join(stderr)


def _show_run_progress(progress: Progress, task: Any, console: Console, label: str, line: str) -> None:
    """A run's progress line: in its bar's description on a terminal, else printed with the run's label.

    Its other lines (a warning, a cache file computed) are printed with the label on a terminal too.
    """
    if console.is_terminal and line.startswith(PLAIN_PREFIX):
        progress.update(task, description=escape(f"  {label}  {line.split('  (')[0]}"))
    else:
        console.print(f"{label}: {line}", markup=False, highlight=False, soft_wrap=True)


def grid_line(done: int, total: int, elapsed: float) -> str:
    eta = elapsed * (total - done) / done if done else float("nan")
    return f"sweep: {done}/{total} configurations done, {format_duration(elapsed)} elapsed, ETA {format_duration(eta)}"


def summary(outcomes: list[Outcome], out: str, console: Console) -> None:
    t = Table(title=f"sweep summary ({sum(o.ok for o in outcomes)} done, {sum(not o.ok for o in outcomes)} failed)")
    for col in ("configuration", "status", "test acc", "seconds"):
        t.add_column(col)
    rows = pd.read_csv(out, dtype={"config_hash": str}) if Path(out).exists() else pd.DataFrame()
    for o in outcomes:
        acc = "-"
        if o.ok and not rows.empty:
            match = rows[(rows["mech"] == o.cfg.mech) & (rows["seed"] == o.cfg.seed)
                         & (rows["config_hash"] == o.cfg.hash(dataset_variant(o.cfg.dataset, o.cfg.data_dir)))]
            if len(match):
                acc = f"{100 * match['test_acc'].iloc[-1]:.2f} %"
        t.add_row(label(o.cfg), "[green]done" if o.ok else "[red]failed", acc, f"{o.seconds:.0f}")
    console.print(t)

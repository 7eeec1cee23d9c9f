"""Progress of one training run: a rich bar on a terminal, plain lines anywhere else.

A rich bar prints nothing when stderr is not a terminal (CI logs, ``nohup``, sweep workers, cluster
jobs), so there a background thread prints ``step S/T  loss L  N samples/s  ETA ...`` lines instead:
the first within ``FIRST_LINE_S`` seconds of the first step, then one every ``EVERY_S`` seconds, and a
last one when training ends. Sweeps read these lines from their workers (``PLAIN_PREFIX``), and a few
others (``PASSED_ON_PREFIXES``).
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import IO, Any, Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

#: Seconds from the first step to the first plain line, and between later lines.
FIRST_LINE_S = 10.0
EVERY_S = 30.0
#: Seconds between updates of the loss on the bar.
BAR_LOSS_EVERY_S = 1.0
#: Every plain progress line starts with this.
PLAIN_PREFIX = "step "
#: What a run says on stderr besides its progress that a sweep passes on under the run's label: its warnings,
#: and the cache files it computes or waits for before its first step (minutes on a cold cache). Not its
#: notes: they come from resolving its configuration, which the sweep has done and said once.
PASSED_ON_PREFIXES = ("warning: ", "computing ", "waiting for another process ")


def format_duration(seconds: float) -> str:
    """``1:02:03``, ``4:05`` or ``?`` for an unknown duration."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class TrainingProgress:
    """Reports (steps done, loss, samples seen) of a run; use as a context manager.

    ``enabled=False`` (``--quiet``) prints nothing. ``terminal`` defaults to whether the stream is a
    terminal: a rich bar there, plain lines otherwise.
    """

    def __init__(self, label: str, total: int, completed: int = 0, *, enabled: bool = True,
                 stream: IO[str] | None = None, terminal: bool | None = None,
                 first_line_s: float | None = None, every_s: float | None = None) -> None:
        self.label, self.total, self.start_step = label, total, completed
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = terminal if terminal is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.first_line_s = FIRST_LINE_S if first_line_s is None else first_line_s
        self.every_s = EVERY_S if every_s is None else every_s
        self.step, self.samples = completed, 0
        self._loss: float | Callable[[], float] = float("nan")
        self._bar_loss_at = 0.0
        self._bar: Progress | None = None
        self._task: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.monotonic()

    # -- the two outputs ---------------------------------------------------------------------------
    def __enter__(self) -> "TrainingProgress":
        self._t0 = time.monotonic()
        if not self.enabled:
            return self
        if self.terminal:
            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]:.4f}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=Console(file=self.stream, force_terminal=True))
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, completed=self.start_step, loss=self.loss)
        else:
            self._thread = threading.Thread(target=self._tick, name="dpbench-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, None, None)
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            if exc_type is None:
                self._print_line()

    def update(self, step: int, loss: float | Callable[[], float], samples: int) -> None:
        """``step`` logical steps done in all (resumed ones included), ``samples`` seen since this process began.

        ``loss`` may be a function, called only when a line or the bar shows it: reading a loss that is still
        being computed on a GPU would make every step wait.
        """
        self.step, self._loss, self.samples = step, loss, samples
        if self._bar is not None:
            now = time.monotonic()
            if now - self._bar_loss_at >= BAR_LOSS_EVERY_S or step >= self.total:
                self._bar_loss_at = now
                self._bar.update(self._task, completed=step, loss=self.loss)
            else:
                self._bar.update(self._task, completed=step)

    @property
    def loss(self) -> float:
        return self._loss() if callable(self._loss) else self._loss

    # -- plain lines -------------------------------------------------------------------------------
    def line(self) -> str:
        """``step S/T  loss L  N samples/s  ETA h:mm:ss  (label)``, from the steps done since this process began."""
        elapsed = time.monotonic() - self._t0
        done = self.step - self.start_step
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.step) * elapsed / done if done > 0 else float("nan")
        value = self.loss
        loss = "-" if math.isnan(value) else f"{value:.4f}"
        return (f"{PLAIN_PREFIX}{self.step}/{self.total}  loss {loss}  {rate:.0f} samples/s  "
                f"ETA {format_duration(eta)}  ({self.label})")

    def _print_line(self) -> None:
        try:
            print(self.line(), file=self.stream, flush=True)
        except (OSError, ValueError):  # a closed pipe (a sweep that went away) must not kill training
            pass

    def _tick(self) -> None:
        if self._stop.wait(self.first_line_s):
            return
        self._print_line()
        while not self._stop.wait(self.every_s):
            self._print_line()

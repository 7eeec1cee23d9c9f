"""Progress where nobody watches a terminal: plain lines in logs, none with --quiet, forwarded by sweeps."""

from __future__ import annotations

import io
import os
import re
import sys
import time

import pytest
from typer.testing import CliRunner

from dpbench import progress
from dpbench.cli import app
from dpbench.progress import PASSED_ON_PREFIXES, TrainingProgress, format_duration
from dpbench import sweep as sweep_module
from dpbench.sweep import SweepSpec, expand, run_sweep

LINE = re.compile(r"^step (\d+)/(\d+)  loss (-|\d+\.\d{4})  \d+ samples/s  ETA (\?|\d+:\d\d(:\d\d)?)  \((.+)\)$")


def test_the_contract_first_line_within_10_s_then_every_30_s():
    assert progress.FIRST_LINE_S <= 10 and progress.EVERY_S <= 30


def test_plain_lines_come_on_a_timer_and_a_last_one_at_the_end():
    stream = io.StringIO()
    with TrainingProgress("dpsgd mnist", 100, enabled=True, stream=stream, first_line_s=0.05, every_s=0.05) as p:
        for step in range(1, 101):
            p.update(step, 0.5, 64 * step)
            time.sleep(0.003)
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 3, lines  # ~0.3 s of training: a first line, timed ones, the last
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [int(m.group(1)) for m in parsed] == sorted(int(m.group(1)) for m in parsed)
    last = parsed[-1]
    assert last.group(1) == last.group(2) == "100" and last.group(6) == "dpsgd mnist"


def test_nothing_is_printed_when_disabled_or_on_a_terminal_bar_only():
    quiet = io.StringIO()
    with TrainingProgress("x", 10, enabled=False, stream=quiet, first_line_s=0.0, every_s=0.01) as p:
        p.update(10, 0.1, 10)
        time.sleep(0.05)
    assert quiet.getvalue() == ""


def test_eta_counts_from_the_steps_done_in_this_process():
    p = TrainingProgress("x", 100, completed=50, enabled=False)
    p._t0 -= 10.0  # 10 s for 10 steps after resuming at step 50: 40 steps left is 40 s
    p.update(60, 0.25, 640)
    assert "step 60/100" in p.line() and "ETA 0:40" in p.line() and "64 samples/s" in p.line()


@pytest.mark.parametrize("seconds,text", [(5, "0:05"), (65, "1:05"), (3725, "1:02:05"), (float("nan"), "?")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_a_run_whose_stderr_is_not_a_terminal_prints_progress_lines(monkeypatch):
    monkeypatch.setattr(progress, "FIRST_LINE_S", 0.0)
    res = CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--eps", "3", "--dataset", "synthetic", "--steps", "4"])
    assert res.exit_code == 0, res.output
    lines = [line for line in res.stderr.splitlines() if line.startswith("step ")]
    assert lines and all(LINE.match(line) for line in lines), res.stderr
    assert lines[-1].startswith("step 4/4")
    quiet = CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--eps", "3", "--dataset", "synthetic", "--steps", "4",
                                     "--quiet"])
    assert quiet.exit_code == 0 and "step " not in quiet.stderr


def test_a_sweep_shows_each_configurations_progress(tmp_path):
    stream = io.StringIO()
    from rich.console import Console

    configs = expand(SweepSpec(grid={"mech": ["dpsgd"], "dataset": ["synthetic"], "eps": [2]}, fixed={"steps": 3}))
    outcomes = run_sweep(configs, str(tmp_path / "r.csv"), console=Console(file=stream, width=300))
    assert [o.ok for o in outcomes] == [True]
    text = stream.getvalue()
    assert re.search(r"dpsgd synthetic/\S+ eps=2 seed=0 \[cpu\]: step 3/3  loss ", text), text
    assert "sweep: 1/1 configurations done" in text


def test_a_sweep_shows_what_a_run_computes_before_its_first_step(tmp_path, monkeypatch):
    """On a cold cache a run computes its ScatterNet features for minutes before its first progress line."""
    from rich.console import Console

    monkeypatch.setenv("DPBENCH_CACHE", str(tmp_path / "cache"))
    stream = io.StringIO()
    configs = expand(SweepSpec(grid={"mech": ["dpsgd"], "dataset": ["synthetic"], "model": ["scatter_linear"],
                                     "eps": [2]}, fixed={"steps": 2}))
    outcomes = run_sweep(configs, str(tmp_path / "r.csv"), console=Console(file=stream, width=300))
    assert [o.ok for o in outcomes] == [True]
    text = stream.getvalue()
    assert re.search(r"dpsgd synthetic/scatter_linear eps=2 seed=0 \[cpu\]: computing ScatterNet features of "
                     r"synthetic once", text), text


def test_a_runs_warning_is_a_line_a_sweep_passes_on(capsys):
    from dpbench.engine import warn

    warn("the fast per-sample path does not cover this model")
    (said,) = capsys.readouterr().err.splitlines()
    assert said.startswith(PASSED_ON_PREFIXES) and said.endswith("does not cover this model")


def test_a_sweep_passes_on_warnings_and_cache_lines_and_keeps_notes_and_errors_for_its_failure_log():
    """Notes come from resolving the configuration, which the sweep said once; an error is its failed line."""
    lines = ["note: nearest tuned eps", "computing ScatterNet features of x once (cached in /c)",
             "waiting for another process to finish computing y (/c/y.pt)", "warning: slow path",
             "step 1/2  loss 2.3  10 samples/s  ETA 1s", "error: --lr 0: must be positive", "Traceback (most recent"]
    script = "import sys\nfor line in %r: print(line, file=sys.stderr)\nsys.exit(3)" % (lines,)
    shown: list[str] = []
    returncode, _, stderr = sweep_module._run_showing_progress([sys.executable, "-c", script], dict(os.environ),
                                                              shown.append)
    assert returncode == 3 and stderr.splitlines() == lines  # all of it still goes to the failure log
    assert shown == lines[1:5]

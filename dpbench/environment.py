"""What a result needs to be reproduced: versions, git commit, device and machine load."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

import dpbench


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(dpbench.__file__).resolve().parent, timeout=5)
        if out.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(dpbench.__file__).resolve().parent, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict[str, str]:
    import opacus

    return {
        "dpbench_version": dpbench.__version__,
        "git_commit": git_commit(),
        "torch_version": torch.__version__,
        "opacus_version": opacus.__version__,
    }


def environment() -> dict[str, Any]:
    return {
        **versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_busy_seconds() -> float | None:
    try:
        with open("/proc/stat") as fh:
            v = [int(t) for t in fh.readline().split()[1:]]
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class LoadMeter:
    """Average CPU use of *other* processes (in cores) while a run is timed, so timings can be read."""

    def __init__(self) -> None:
        self.busy0 = _cpu_busy_seconds()
        self.proc0 = time.process_time()
        self.wall0 = time.perf_counter()

    def other_load(self) -> float | None:
        busy = _cpu_busy_seconds()
        wall = time.perf_counter() - self.wall0
        if busy is None or self.busy0 is None or wall <= 0:
            return None
        ours = time.process_time() - self.proc0
        return max(0.0, (busy - self.busy0 - ours) / wall)

"""The allocator setting: large buffers come from the process's heap, which keeps them, not from fresh mappings."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys, torch
    from dpbench.allocator import keep_freed_memory
    if sys.argv[1] == "on":
        assert keep_freed_memory() is True
    buffer = torch.ones(12 * 2**20)  # 48 MiB: above glibc's largest adaptive mmap threshold (32 MiB)
    address = buffer.data_ptr()
    for line in open("/proc/self/maps"):
        span, *rest = line.split()
        start, end = (int(v, 16) for v in span.split("-"))
        if start <= address < end:
            print("heap" if rest and rest[-1] == "[heap]" else "mapping")
""")


def _where_a_large_buffer_lives(setting: str) -> str:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt, /proc/self/maps")
def test_large_buffers_come_from_the_heap_once_the_setting_is_made():
    assert _where_a_large_buffer_lives("off") == "mapping"  # glibc's default: mapped, unmapped on free
    assert _where_a_large_buffer_lives("on") == "heap"


def test_training_makes_the_setting(monkeypatch):
    import dpbench.engine as engine

    calls = []
    monkeypatch.setattr(engine, "keep_freed_memory", lambda: calls.append(1) or True)
    from dpbench.config import resolve
    from dpbench.data import load_dataset
    from dpbench.mechanisms import get_mechanism

    cfg = resolve({"mech": "nonprivate", "dataset": "synthetic", "steps": 1, "model": "linear"})
    engine.train(cfg, get_mechanism("nonprivate")(), load_dataset("synthetic"), 0.0, 1, engine.torch.device("cpu"),
                 show_progress=False)
    assert calls == [1]

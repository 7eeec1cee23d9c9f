"""The storage layer's build-once lock for cache files (atomic writes and damaged files are tested where used)."""

from __future__ import annotations

import time

from dpbench.progress import PASSED_ON_PREFIXES
from dpbench.storage import built_once
from tests.concurrency import together


def _hold(path, events: list[str], name: str, seconds: float = 0.3) -> None:
    with built_once(path, f"building {name}"):
        events.append(f"{name} in")
        time.sleep(seconds)
        events.append(f"{name} out")


def test_a_second_builder_of_one_cache_file_waits_for_the_first_and_says_so(tmp_path, capsys):
    events: list[str] = []
    path = tmp_path / "cache" / "features.pt"
    together(lambda: _hold(path, events, "a"), lambda: _hold(path, events, "b"))
    first, second = events[0].split()[0], events[2].split()[0]
    assert events == [f"{first} in", f"{first} out", f"{second} in", f"{second} out"]  # never interleaved
    err = capsys.readouterr().err
    assert f"waiting for another process to finish building {second} ({path})" in err
    (said,) = [line for line in err.splitlines() if "waiting" in line]
    assert said.startswith(PASSED_ON_PREFIXES)  # a sweep shows it under the run's label
    assert f"finish building {first}" not in err  # the first found the lock free and did not wait


def test_builders_of_different_cache_files_do_not_wait_for_each_other(tmp_path, capsys):
    events: list[str] = []
    together(lambda: _hold(tmp_path / "one.pt", events, "a"),
             lambda: _hold(tmp_path / "two.pt", events, "b"))
    assert sorted(events[:2]) == ["a in", "b in"]  # both inside before either left
    assert "waiting" not in capsys.readouterr().err


def test_a_cache_file_that_exists_is_read_without_waiting(tmp_path, capsys):
    events: list[str] = []
    path = tmp_path / "features.pt"
    path.write_bytes(b"built before")
    together(lambda: _hold(path, events, "a"), lambda: _hold(path, events, "b"))
    assert sorted(events[:2]) == ["a in", "b in"]  # readers of a built file never queue
    assert "waiting" not in capsys.readouterr().err

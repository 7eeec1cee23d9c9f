"""The results CSV: header once, required columns first, atomic appends from concurrent writers."""

from __future__ import annotations

import csv
import multiprocessing as mp

import pytest

from dpbench.errors import BadInput
from dpbench.results import ALL_COLUMNS, COLUMNS, append_row


def fake_row(i: int, writer: int) -> dict:
    row = {c: f"{c}-{writer}-{i}" for c in ALL_COLUMNS}
    row["command"] = 'dpbench run --set note="a, b"'  # commas and quotes must survive
    return row


def _writer(path: str, writer: int, n: int) -> None:
    for i in range(n):
        append_row(path, fake_row(i, writer))


def test_header_written_once_and_rows_parse(tmp_path):
    path = tmp_path / "sub" / "r.csv"
    append_row(path, fake_row(0, 0))
    append_row(path, fake_row(1, 0))
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 2 and tuple(rows[0].keys())[: len(COLUMNS)] == COLUMNS
    assert rows[1]["command"] == 'dpbench run --set note="a, b"'


def test_concurrent_writers_never_interleave(tmp_path):
    path = str(tmp_path / "r.csv")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 200)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 600
    seen = {(r["run_id"]) for r in rows}
    assert len(seen) == 600
    for r in rows:
        _, w, i = r["run_id"].split("-")
        assert r == {c: v for c, v in fake_row(int(i), int(w)).items()}


def test_missing_required_column_is_refused(tmp_path):
    row = fake_row(0, 0)
    del row["eps_spent"]
    with pytest.raises(ValueError, match="eps_spent"):
        append_row(tmp_path / "r.csv", row)
    assert not (tmp_path / "r.csv").read_text()


def test_foreign_csv_is_refused(tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(BadInput, match="other columns"):
        append_row(path, fake_row(0, 0))
    assert path.read_text() == "a,b\n1,2\n"

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


def test_an_older_csv_gets_todays_header_with_its_rows_kept_and_backfilled(tmp_path):
    path = tmp_path / "r.csv"
    old_columns = ALL_COLUMNS[: ALL_COLUMNS.index("release_rate")]
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(old_columns)
        for i in range(2):
            writer.writerow([fake_row(i, 9)[c] for c in old_columns])
    new = fake_row(5, 1)
    append_row(path, new)
    rows = list(csv.DictReader(open(path)))
    assert tuple(rows[0]) == ALL_COLUMNS and len(rows) == 3
    for i, row in enumerate(rows[:2]):  # the old rows: unchanged, release_rate from their sample_rate
        assert {c: row[c] for c in old_columns} == {c: fake_row(i, 9)[c] for c in old_columns}
        assert row["release_rate"] == row["sample_rate"] == f"sample_rate-9-{i}"
    assert rows[2] == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv"]  # no temporary file left


def test_an_older_csv_reads_with_the_newer_columns_backfilled(tmp_path):
    from dpbench.tables import load_results

    path = tmp_path / "r.csv"
    pd = pytest.importorskip("pandas")
    pd.DataFrame([{"dataset": "mnist", "model": "m", "mech": "dpis", "eps_target": 1.0, "test_acc": 0.9,
                   "seed": 0, "config_hash": "h", "sample_rate": 0.017}]).to_csv(path, index=False)
    assert load_results(path)["release_rate"].tolist() == [0.017]


def test_run_and_audit_rows_share_one_writer_and_never_mix(tmp_path):
    from dpbench.audit.runner import AUDITS

    runs, audits = tmp_path / "runs.csv", tmp_path / "audit.csv"
    append_row(runs, fake_row(0, 0))
    audit_row = {c: f"{c}-a" for c in AUDITS.columns}
    append_row(audits, audit_row, AUDITS)
    append_row(audits, audit_row, AUDITS)
    assert [tuple(r) for r in csv.DictReader(open(audits))] == [AUDITS.columns] * 2
    with pytest.raises(BadInput, match="not a dpbench audit CSV"):
        append_row(runs, audit_row, AUDITS)
    with pytest.raises(BadInput, match="not a dpbench results CSV"):
        append_row(audits, fake_row(1, 0))

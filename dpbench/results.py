"""Results CSVs (one row per finished run or audit) and the run record written beside a run's row.

One writer for every kind: a :class:`CsvSchema` names the columns, and :func:`append_row` appends
crash-safely: the row is formatted in memory and written with a single ``write`` on an ``O_APPEND``
descriptor under an exclusive ``flock``, so concurrent writers never interleave and a killed run
(which has not reached this point) leaves no partial row.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from dpbench.errors import BadInput
from dpbench.storage import write_json_atomic, write_text_atomic

#: Required columns, in this order (design.md); more may follow.
COLUMNS: tuple[str, ...] = (
    "run_id", "started_at", "finished_at", "mech", "dataset", "dataset_variant", "model", "eps_target",
    "delta", "eps_spent", "accountant", "eps_rdp", "eps_prv", "noise_multiplier", "sample_rate",
    "batch_size", "epochs", "steps", "lr", "clip", "seed", "test_acc", "test_loss", "wall_s",
    "samples_per_s", "peak_mem_mb", "device", "mech_params", "config_hash", "dpbench_version",
    "git_commit", "torch_version", "opacus_version",
)
#: Extra columns that follow the required ones.
EXTRA_COLUMNS: tuple[str, ...] = (
    "eps_classic", "optimizer", "momentum", "physical_batch_size", "secure", "other_load", "command",
    "release_rate", "grad_sample", "eps_pld", "recipe_source",
)
#: How to fill a column that an older CSV lacks, from that row's other columns.
BACKFILL: dict[str, str] = {"release_rate": "sample_rate"}  # older rows wrote the release rate there
ALL_COLUMNS = COLUMNS + EXTRA_COLUMNS


@dataclass(frozen=True)
class CsvSchema:
    """The columns of one kind of results CSV: required ones first, in order, then extras.

    ``backfill`` says how to fill a newer column for rows of an older CSV that lacks it.
    """

    kind: str
    required: tuple[str, ...]
    extra: tuple[str, ...] = ()
    backfill: Mapping[str, str] = field(default_factory=dict)

    @property
    def columns(self) -> tuple[str, ...]:
        return self.required + self.extra


#: Training runs (``dpbench run``, sweeps).
RUNS = CsvSchema("results", COLUMNS, EXTRA_COLUMNS, BACKFILL)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return repr(value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def format_row(row: dict[str, Any], columns: tuple[str, ...] = ALL_COLUMNS,
               required: tuple[str, ...] = COLUMNS) -> str:
    missing = [c for c in required if c not in row]
    if missing:
        raise ValueError(f"row lacks required columns: {missing}")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow([_cell(row.get(c)) for c in columns])
    return buf.getvalue()


def _header(columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(columns)
    return buf.getvalue()


def existing_columns(path: Path) -> tuple[str, ...] | None:
    """The header of an existing CSV, or None when the file is absent or empty."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as fh:
        return tuple(next(csv.reader(fh)))


def check_compatible(path: Path, schema: CsvSchema = RUNS) -> None:
    """An existing CSV must start with the schema's required columns, so rows line up with its header."""
    cols = existing_columns(path)
    if cols is not None and cols[: len(schema.required)] != schema.required:
        raise BadInput(f"--out {path}: existing CSV is not a dpbench {schema.kind} CSV (other columns)")


def append_row(path: str | Path, row: dict[str, Any], schema: CsvSchema = RUNS) -> None:
    """Append one row atomically, writing the header first if the file is new or empty.

    Written with a single ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock``. A CSV
    written by an older dpbench (its header a prefix of today's columns) is first rewritten with today's
    header, its rows' new cells filled by the schema's ``backfill``, into a temporary file moved into
    place: a kill leaves the old file or the new one, never a mix.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = schema.columns
    while True:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:
                continue  # another writer upgraded the file while this one waited: append to the new one
            check_compatible(path, schema)
            cols = existing_columns(path) or columns
            if len(cols) < len(columns) and columns[: len(cols)] == cols:
                _upgrade_header(path, schema)
                continue
            data = format_row(row, cols, schema.required)
            if os.fstat(fd).st_size == 0:
                data = _header(cols) + data
            os.write(fd, data.encode())
            os.fsync(fd)
            return
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def _upgrade_header(path: Path, schema: CsvSchema) -> None:
    """Rewrite an older CSV with today's columns (called under the file's lock)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(schema.columns)
    for old in rows:
        writer.writerow([old.get(c, old.get(schema.backfill.get(c, ""), "")) for c in schema.columns])
    write_text_atomic(path, buf.getvalue())


def record_run(out_csv: str | Path, row: dict[str, Any], record: dict[str, Any]) -> None:
    """Write a finished run: its record first, then its row (a row always has its record)."""
    write_json_atomic(run_record_path(out_csv, row["run_id"]), record)
    append_row(out_csv, row)


def run_record_path(out_csv: str | Path, run_id: str) -> Path:
    """``<csv folder>/runs/<run_id>.json``."""
    return Path(out_csv).parent / "runs" / f"{run_id}.json"

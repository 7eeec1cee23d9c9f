"""Files: the cache folder, atomic writes, building a cache file once, and clear errors for damaged input files.

The bottom layer: every package (data, privacy, results, checkpoints, the audit) writes through
:func:`atomic_write`, so a killed process or a concurrent reader sees the old file or the whole new
one, and concurrent writers of one path never share a temporary name.
"""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import sys
import tarfile
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from dpbench.errors import BadInput


@contextmanager
def held_exclusively(path: str | Path, refusal: str) -> Iterator[None]:
    """Hold an exclusive lock file at ``path`` for the block (removed after); a BadInput(``refusal``) when another
    process holds it. The kernel releases the lock of a killed holder, so a restart is never refused."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(refusal) from None
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextmanager
def built_once(path: str | Path, what: str) -> Iterator[None]:
    """Hold a blocking lock beside the cache file ``path`` while the block checks for it and builds it.

    Jobs that start together on a machine with a cold cache would each build the same file (minutes of
    every core for CIFAR-10's ScatterNet features); under this lock the first builds it and the others
    wait, then find it. A file already there takes no lock, so readers never queue behind each other.
    The lock file stays: removing it while a waiter holds its inode would let a third process lock a
    new file and build alongside. The kernel releases a killed holder's lock.
    """
    path = Path(path)
    if path.is_file():
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process to finish {what} ({path})", file=sys.stderr, flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def cache_dir() -> Path:
    """``$DPBENCH_CACHE``, default ``~/.cache/dpbench``: decoded data and features, never in the repo."""
    return Path(os.environ.get("DPBENCH_CACHE") or Path.home() / ".cache" / "dpbench")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write`` on a temporary file beside ``path``, then move it into place (or remove it on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda fh: fh.write(text.encode()))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def save_torch_atomic(path: str | Path, obj: Any) -> None:
    import torch

    atomic_write(path, lambda fh: torch.save(obj, fh))


#: What reading a damaged file raises: truncated gzip (EOFError), bad headers (OSError, BadGzipFile),
#: bad zip/npz or tar members, unpickling a cut torch file, and shape or JSON errors on cut contents.
DAMAGED_FILE_ERRORS = (EOFError, OSError, ValueError, RuntimeError, KeyError, zlib.error, pickle.UnpicklingError,
                       tarfile.TarError, zipfile.BadZipFile)


def source_remedy(path: str | Path) -> str:
    """How to fix a damaged dataset file that the user supplied."""
    return (f"replace it with an intact copy (compare it with the SHA256SUMS of its folder, where there is one: "
            f"cd {Path(path).parent.parent} && sha256sum -c SHA256SUMS), or delete it to download it again")


def cache_remedy(path: str | Path) -> str:
    """How to fix a damaged file in dpbench's cache, which is rebuilt from the source data."""
    command = "rm -r" if Path(path).is_dir() else "rm"
    return f"delete it ({command} {path}) and run again: dpbench rebuilds it from the source data"


@contextmanager
def reading_data_file(path: str | Path, remedy: str) -> Iterator[None]:
    """Turn any failure to read ``path`` into a BadInput that names the file and says how to fix it."""
    try:
        yield
    except BadInput:
        raise
    except DAMAGED_FILE_ERRORS as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise BadInput(f"{path} is truncated or corrupt ({type(exc).__name__}{': ' + detail if detail else ''}); "
                       f"{remedy}") from None

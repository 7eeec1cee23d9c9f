"""IMDb movie reviews (Maas et al. 2011), binary sentiment, as int64 token ids [N, SEQ_LEN].

Online users get the official ``aclImdb_v1.tar.gz`` (read straight from the archive). Offline, a
folder laid out like the shared data copy holds ``imdb/imdb_{train,test}.jsonl.gz`` (one JSON
object a line: id, rating, label, text). Both give the same records in the same order, sorted by
(label, id), so they encode to the same tensors.

Encoding, deterministic: lower-case, ``<br />`` tags dropped, word tokens (letters and digits,
inner apostrophes kept: "don't"); the vocabulary is the ``MAX_WORDS`` most frequent words of the
TRAINING split only (ties broken alphabetically), id 0 = padding, 1 = unknown; every review is
truncated to its first ``SEQ_LEN`` tokens and padded at the end. ``SEQ_LEN`` (256) can be changed
with ``$DPBENCH_IMDB_SEQ_LEN``; a non-default length is recorded in ``dataset_variant``
(``imdb-len128``) so it changes the config hash. Encoded tensors are cached under ``cache_dir()``,
keyed by a hash of the source files and these settings.

Privacy: the vocabulary is a function of the training texts that the accounting does not cover;
as in the DP-SGD literature this benchmarks (DPSUR, Opacus' examples), it is treated as public.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import torch

from dpbench.data import DATASETS
from dpbench.data.base import DatasetBundle, offline_roots, validation_split, validation_variant
from dpbench.storage import built_once, cache_dir, cache_remedy, reading_data_file, save_torch_atomic, source_remedy
from dpbench.errors import BadInput

MAX_WORDS = 10_000
DEFAULT_SEQ_LEN = 256
PAD, UNK = 0, 1
VOCAB_SIZE = MAX_WORDS + 2  # what the text models' embeddings must cover
TOKENIZER_VERSION = "v1"  # bump when the tokeniser changes, so old caches are not reused
URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
ARCHIVE_MD5 = "7c2ac02c03563afcf9b574c7e56c153a"
OFFLINE_FILES = ("imdb_train.jsonl.gz", "imdb_test.jsonl.gz")
TRAIN_SIZE, TEST_SIZE, CLASSES = 25000, 25000, 2

_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*")

Record = tuple[int, int, str]  # (label, id, text)


def seq_len() -> int:
    """Tokens per review: ``$DPBENCH_IMDB_SEQ_LEN`` or 256."""
    text = os.environ.get("DPBENCH_IMDB_SEQ_LEN", "").strip()
    if not text:
        return DEFAULT_SEQ_LEN
    if not text.isdigit() or int(text) < 1:
        raise BadInput(f"DPBENCH_IMDB_SEQ_LEN={text!r}: must be a positive integer")
    return int(text)


def variant(data_dir: str | None = None) -> str:
    n = seq_len()
    return "imdb" if n == DEFAULT_SEQ_LEN else f"imdb-len{n}"


def tokenize(text: str) -> list[str]:
    return _WORD.findall(_BREAK.sub(" ", text.lower()))


def build_vocabulary(train_texts: Iterable[str], max_words: int = MAX_WORDS) -> dict[str, int]:
    """word -> id for the ``max_words`` most frequent words; call it with TRAINING texts only."""
    counts = Counter(tok for text in train_texts for tok in tokenize(text))
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]
    return {word: i + 2 for i, (word, _) in enumerate(ranked)}


def encode(texts: Iterable[str], vocab: dict[str, int], length: int) -> torch.Tensor:
    rows = []
    for text in texts:
        ids = [vocab.get(tok, UNK) for tok in tokenize(text)[:length]]
        rows.append(ids + [PAD] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, length)


def _read_jsonl(path: Path) -> list[Record]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    records = [(int(r["label"]), int(r["id"]), r["text"]) for r in rows]
    return sorted(records)


def _read_archive(path: Path) -> dict[str, list[Record]]:
    """The labelled reviews of ``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt``."""
    name = re.compile(r"aclImdb/(train|test)/(pos|neg)/(\d+)_\d+\.txt$")
    out: dict[str, list[Record]] = {"train": [], "test": []}
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            m = name.search(member.name)
            if m and member.isfile():
                text = tar.extractfile(member).read().decode("utf-8")
                out[m.group(1)].append((int(m.group(2) == "pos"), int(m.group(3)), text))
    return {split: sorted(records) for split, records in out.items()}


def _sources(data_dir: str | None) -> tuple[list[Path], bool]:
    """The files to read and whether they are the offline JSONL copy; BadInput when none is found."""
    tried = []
    for base in offline_roots(data_dir):
        files = [base / "imdb" / f for f in OFFLINE_FILES]
        tried.append(str(base / "imdb"))
        if all(f.is_file() for f in files):
            return files, True
    archive = cache_dir() / "imdb" / "aclImdb_v1.tar.gz"
    tried.append(f"download of {URL} into {archive.parent}")
    problem = "DPBENCH_OFFLINE is set"
    if not os.environ.get("DPBENCH_OFFLINE"):
        try:
            from torchvision.datasets.utils import download_url

            download_url(URL, str(archive.parent), archive.name, md5=ARCHIVE_MD5)
            return [archive], False
        except Exception as exc:  # no network: say where we looked and how to fix it
            problem = f"download failed: {type(exc).__name__}"
    raise BadInput(
        f"dataset 'imdb' not found; tried {'; '.join(tried)} ({problem}). "
        f"Pass --data-dir (or set DPBENCH_DATA) to a folder holding imdb/{OFFLINE_FILES[0]} and imdb/{OFFLINE_FILES[1]}."
    )


def _encoded(data_dir: str | None) -> dict[str, torch.Tensor]:
    files, offline = _sources(data_dir)
    length = seq_len()
    h = hashlib.sha256(f"{TOKENIZER_VERSION}/{MAX_WORDS}/{length}".encode())
    for f in files:
        with reading_data_file(f, source_remedy(f)):
            h.update(f.read_bytes())
    cached = cache_dir() / "imdb" / f"encoded-{h.hexdigest()[:16]}.pt"
    with built_once(cached, "encoding the IMDb reviews"):
        if cached.is_file():
            with reading_data_file(cached, cache_remedy(cached)):
                tensors = torch.load(cached)
                if tuple(tensors["train_x"].shape[:1]) != tuple(tensors["train_y"].shape):
                    raise ValueError("train inputs and labels differ in length")
                return tensors
        if offline:
            splits = {}
            for split, f in zip(("train", "test"), files):
                with reading_data_file(f, source_remedy(f)):
                    splits[split] = _read_jsonl(f)
        else:
            with reading_data_file(files[0], source_remedy(files[0])):
                splits = _read_archive(files[0])
        vocab = build_vocabulary(text for _, _, text in splits["train"])
        tensors = {}
        for split, records in splits.items():
            tensors[f"{split}_x"] = encode((text for _, _, text in records), vocab, length)
            tensors[f"{split}_y"] = torch.tensor([label for label, _, _ in records], dtype=torch.long)
        save_torch_atomic(cached, tensors)  # a concurrent reader sees no file or the whole file
        return tensors


@DATASETS.register("imdb", train_size=TRAIN_SIZE, num_classes=CLASSES, input_shape=(DEFAULT_SEQ_LEN,),
                   variant=variant,
                   summary=f"IMDb reviews, binary sentiment, 25k/25k (Maas et al. 2011); {MAX_WORDS} words x {DEFAULT_SEQ_LEN} tokens")
def load_imdb(data_dir: str | None = None) -> DatasetBundle:
    t = _encoded(data_dir)
    return DatasetBundle("imdb", variant(data_dir), t["train_x"], t["train_y"], t["test_x"], t["test_y"],
                         num_classes=CLASSES)


#: Training reviews held out as the validation split of ``imdb_val``.
VALIDATION_HOLDOUT = 5_000
#: The training file is sorted by label, so the held-out reviews come from a fixed seeded order.
VALIDATION_ORDER_SEED = 20261203


@DATASETS.register("imdb_val", train_size=TRAIN_SIZE - VALIDATION_HOLDOUT, num_classes=CLASSES,
                   input_shape=(DEFAULT_SEQ_LEN,), base="imdb",
                   variant=lambda data_dir: validation_variant(variant(data_dir), VALIDATION_HOLDOUT),
                   summary="IMDb for tuning: 20k training reviews, 5k held out (a fixed seeded order: the file is "
                           "sorted by label)")
def load_imdb_val(data_dir: str | None = None) -> DatasetBundle:
    return validation_split(load_imdb(data_dir), VALIDATION_HOLDOUT, order_seed=VALIDATION_ORDER_SEED)

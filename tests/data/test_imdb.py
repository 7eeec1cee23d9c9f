"""IMDb loader on tiny JSONL files in the offline copy's layout: encoding, vocabulary, caching."""

from __future__ import annotations

import gzip
import json
import time

import pytest
import torch
from typer.testing import CliRunner

from dpbench.cli import app
from dpbench.data import dataset_variant, load_dataset
from dpbench.data import imdb
from dpbench.errors import BadInput
from tests.concurrency import together

TRAIN = [
    (1, 0, 7, "A great film.<br /><br />Great acting, great story; don't miss it"),
    (3, 0, 2, "Awful. Boring and awful, a waste"),
    (2, 1, 9, "Great fun, great cast"),
    (0, 0, 1, "boring boring boring"),
]
TEST = [
    (5, 1, 10, "testonlyword testonlyword testonlyword testonlyword great"),
    (4, 0, 3, "awful testonlyword"),
]


def _write(path, records):
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        for rid, label, rating, text in records:
            fh.write(json.dumps({"id": rid, "rating": rating, "label": label, "text": text}) + "\n")


@pytest.fixture
def imdb_root(tmp_path):
    root = tmp_path / "data"
    (root / "imdb").mkdir(parents=True)
    _write(root / "imdb" / "imdb_train.jsonl.gz", TRAIN)
    _write(root / "imdb" / "imdb_test.jsonl.gz", TEST)
    return root


def test_tokenizer_lowercases_drops_line_breaks_and_keeps_contractions():
    assert imdb.tokenize("It's GREAT.<br /><br />Don't miss it, 10/10") == ["it's", "great", "don't", "miss", "it", "10", "10"]


def test_loader_returns_padded_int64_tokens_and_labels(imdb_root):
    b = load_dataset("imdb", str(imdb_root))
    assert b.variant == "imdb" == dataset_variant("imdb", str(imdb_root))
    assert b.train_x.shape == (4, imdb.DEFAULT_SEQ_LEN) and b.test_x.shape == (2, imdb.DEFAULT_SEQ_LEN)
    assert b.train_x.dtype == torch.int64 and b.train_y.dtype == torch.int64
    assert b.num_classes == 2 and set(b.train_y.tolist()) == {0, 1} and b.train_size == 4
    assert b.train_y.tolist() == [0, 0, 0, 1]  # records sorted by (label, id), whatever the file order
    assert int(b.train_x.max()) < imdb.VOCAB_SIZE and int(b.train_x.min()) >= 0
    first = b.train_x[0]  # id 0: "boring boring boring"
    assert first[:3].tolist() == [first[0].item()] * 3 and first[0] > imdb.UNK
    assert (first[3:] == imdb.PAD).all()


def test_vocabulary_is_built_from_training_texts_only(imdb_root, monkeypatch):
    seen: list[str] = []
    real = imdb.build_vocabulary

    def recording(texts, *args):
        texts = list(texts)
        seen.extend(texts)
        return real(texts, *args)

    monkeypatch.setattr(imdb, "build_vocabulary", recording)
    b = load_dataset("imdb", str(imdb_root))
    assert sorted(seen) == sorted(text for _, _, _, text in TRAIN)
    vocab = real(text for _, _, _, text in TRAIN)
    assert "testonlyword" not in vocab and "br" not in vocab
    assert vocab["great"] == 2  # the most frequent training word gets the first id
    # the test review's frequent test-only word is unknown, its training word is not
    test_pos = b.test_x[b.test_y == 1][0]
    assert test_pos[:5].tolist() == [imdb.UNK] * 4 + [vocab["great"]]


def test_sequence_length_is_configurable_and_recorded(imdb_root, monkeypatch):
    monkeypatch.setenv("DPBENCH_IMDB_SEQ_LEN", "3")
    b = load_dataset("imdb", str(imdb_root))
    assert b.train_x.shape == (4, 3) and b.variant == "imdb-len3"
    vocab = imdb.build_vocabulary(text for _, _, _, text in TRAIN)
    long_review = b.train_x[b.train_y == 0][2]  # id 3: "Awful. Boring and awful, a waste"
    assert long_review.tolist() == [vocab["awful"], vocab["boring"], vocab["and"]]  # the first tokens are kept
    monkeypatch.setenv("DPBENCH_IMDB_SEQ_LEN", "zero")
    with pytest.raises(BadInput, match="DPBENCH_IMDB_SEQ_LEN"):
        load_dataset("imdb", str(imdb_root))


def test_encoding_is_cached_and_deterministic(imdb_root, monkeypatch):
    first = load_dataset("imdb", str(imdb_root))
    calls = []
    monkeypatch.setattr(imdb, "build_vocabulary", lambda *a: calls.append(1))
    second = load_dataset("imdb", str(imdb_root))
    assert calls == [] and torch.equal(first.train_x, second.train_x)


def test_jobs_starting_together_encode_the_reviews_once(imdb_root, monkeypatch):
    calls = []
    real = imdb.build_vocabulary

    def slow(texts):
        calls.append(1)
        time.sleep(0.2)  # the second job arrives while the first is encoding
        return real(texts)

    monkeypatch.setattr(imdb, "build_vocabulary", slow)
    job = lambda: load_dataset("imdb", str(imdb_root))  # noqa: E731
    results = together(job, job)
    assert calls == [1]
    assert len(results) == 2 and torch.equal(results[0].train_x, results[1].train_x)


def test_missing_copy_is_bad_input_naming_the_paths_tried(tmp_path):
    (tmp_path / "only_mnist" / "mnist").mkdir(parents=True)
    with pytest.raises(BadInput, match="imdb_train.jsonl.gz") as err:
        load_dataset("imdb", str(tmp_path / "only_mnist"))
    assert str(tmp_path / "only_mnist" / "imdb") in str(err.value)
    assert "DPBENCH_OFFLINE" in str(err.value)


def _run(root, out):
    return CliRunner().invoke(app, ["run", "--mech", "dpsgd", "--dataset", "imdb", "--data-dir", str(root),
                                    "--eps", "3", "--steps", "1", "--quiet", "--out", str(out)])


def test_a_truncated_source_file_is_named_exit_2(imdb_root, tmp_path):
    source = imdb_root / "imdb" / "imdb_test.jsonl.gz"
    source.write_bytes(source.read_bytes()[:40])
    res = _run(imdb_root, tmp_path / "res" / "runs.csv")
    text = res.output.replace("\n", "")
    assert res.exit_code == 2 and str(source) in text and "truncated or corrupt" in text and "SHA256SUMS" in text
    assert not (tmp_path / "res").exists()


def test_a_corrupt_cache_entry_is_named_exit_2(imdb_root, tmp_path):
    load_dataset("imdb", str(imdb_root))
    cached = next((tmp_path / "cache" / "imdb").glob("encoded-*.pt"))
    cached.write_bytes(cached.read_bytes()[:200])
    res = _run(imdb_root, tmp_path / "res" / "runs.csv")
    text = res.output.replace("\n", "")
    assert res.exit_code == 2 and str(cached) in text and f"rm {cached}" in text
    assert not (tmp_path / "res").exists()

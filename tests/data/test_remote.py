"""Every data source and ``pretokenize --out`` against a real GCS API (the emulator of
tests/gcs_emulator.py): reading from ``gs://`` gives exactly what the same files give locally.
Independent reference: the local sources over the same bytes (themselves tested against the
values written, in test_sources.py / test_formats.py)."""

import gzip
import json
import os

import numpy as np
import pytest

from diffujax import paths
from diffujax.data.pretokenize import main
from diffujax.data.sources import PretokenizedSource, make_source
from diffujax.data.tokenizer import load_tokenizer

DOCS = [f"remote document {i}\nwith ü and 漢 {'x' * i}" for i in range(17)]


def _upload(local_dir, url):
    for p in sorted(local_dir.rglob("*")):
        if p.is_file():
            paths.copy_file(p, f"{url}/{p.relative_to(local_dir).as_posix()}")


def _all(src):
    return [src[i] for i in range(len(src))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """One directory with every format, written locally."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from array_record.python.array_record_module import ArrayRecordWriter

    root = tmp_path_factory.mktemp("remote-corpus")
    (root / "text").mkdir()
    for i, d in enumerate(DOCS[:5]):
        (root / "text" / f"{i}.txt").write_text(d)
    (root / "jsonl").mkdir()
    lines = "".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in DOCS)
    (root / "jsonl" / "a.jsonl").write_text(lines)
    (root / "jsonl" / "b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    (root / "parquet").mkdir()
    pq.write_table(pa.table({"text": DOCS}), root / "parquet" / "part-0.parquet", row_group_size=4)
    (root / "array_record").mkdir()
    w = ArrayRecordWriter(str(root / "array_record" / "a.array_record"), "group_size:1")
    for d in DOCS:
        w.write(d.encode())
    w.close()
    datasets.Dataset.from_dict({"text": DOCS}).save_to_disk(str(root / "hf"), num_shards=2)
    return root


@pytest.fixture(scope="module")
def bucket(gcs, corpus):
    url = gcs.url_for("data")
    _upload(corpus, url)
    return url


@pytest.mark.parametrize("name,fmt", [("text", "text"), ("jsonl", "jsonl"),
                                      ("parquet", "parquet"), ("array_record", "array_record"),
                                      ("hf", "arrow")])
def test_every_source_reads_the_bucket(bucket, corpus, name, fmt, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUJAX_CACHE", str(tmp_path / "cache"))
    field = None if fmt == "array_record" else "text"  # raw text records
    remote = make_source("auto", f"{bucket}/{name}", field=field)
    local = make_source("auto", corpus / name, field=field)
    assert type(remote) is type(local)
    assert len(remote) > 0 and _all(remote) == _all(local)
    assert remote.report.files == local.report.files
    assert all(p.startswith("gs://") for p in remote.paths)  # messages name the objects


def test_globs_and_errors_in_the_bucket(bucket, corpus):
    src = make_source("jsonl", f"{bucket}/**/*.jsonl*")
    assert _all(src) == DOCS + DOCS
    with pytest.raises(FileNotFoundError, match="no file matches"):
        make_source("jsonl", f"{bucket}/nothing/*.jsonl")
    with pytest.raises(FileNotFoundError, match=f"{bucket}/missing.jsonl does not exist"):
        make_source("jsonl", f"{bucket}/missing.jsonl")


def test_pretokenize_to_and_from_the_bucket(bucket, corpus, hf_dir, tmp_path, gcs):
    tok_url = gcs.url_for("tokenizer")
    _upload(hf_dir, tok_url)
    tok = load_tokenizer(tok_url)  # tokenizer files read from the bucket
    assert tok.encode(DOCS[3]) == load_tokenizer(hf_dir).encode(DOCS[3])
    assert tok.special == load_tokenizer(hf_dir).special

    out = gcs.url_for("pretok")
    args = ["--tokenizer", tok_url, "--shards", "2", "--seq-len", "16", f"{bucket}/jsonl"]
    assert main(["--out", out, *args]) == 0
    assert main(["--out", str(tmp_path / "local"), *args]) == 0
    names = sorted(p.name for p in paths.list_files(out))
    assert names == ["data-00000-of-00002.array_record", "data-00000-of-00002.json",
                     "data-00001-of-00002.array_record", "data-00001-of-00002.json",
                     "metadata.json"]
    remote, local = PretokenizedSource(out), PretokenizedSource(tmp_path / "local")
    assert len(remote) == len(local) > 0
    np.testing.assert_array_equal(np.stack(_all(remote)), np.stack(_all(local)))
    assert make_source("auto", out).layout == "blocks"
    # A re-run resumes: complete shards are kept, nothing is rewritten.
    before = {p.name: p.stat().mtime for p in paths.list_files(out) if p.suffix != ".json"}
    assert main(["--out", out, *args]) == 0
    assert {p.name: p.stat().mtime for p in paths.list_files(out)
            if p.suffix != ".json"} == before
    assert not any(os.fspath(p).split("/")[-1].startswith(".") for p in paths.list_files(out))

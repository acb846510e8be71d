"""Data as users have it: compressed jsonl / text (SlimPajama ships ``.jsonl.zst``), directories
given without a glob, Spark-style parquet directories, Hugging Face ``datasets`` saved with
``save_to_disk`` and plain arrow files. Independent references: the Python values the files were
written from, and ``datasets.load_from_disk`` for the datasets directories."""

import bz2
import gzip
import json
import lzma
import pickle

import pytest

from diffujax.data.sources import (ArrowSource, DataError, JsonlSource, TextSource, guess_format,
                                   make_source)

DOCS = [f"document {i}: {'ü漢 ' * (i % 3)}some words\nand a second line" for i in range(23)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Decompressed copies go to a per-test cache, so each test decompresses afresh."""
    monkeypatch.setenv("DIFFUJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _compress(data: bytes, suffix: str) -> bytes:
    if suffix == ".zst":
        import zstandard

        # Two frames, as `zstd` writes for concatenated inputs: both must be read.
        half = len(data) // 2
        c = zstandard.ZstdCompressor()
        return c.compress(data[:half]) + c.compress(data[half:])
    return {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](data)


def _jsonl(docs) -> bytes:
    return "".join(json.dumps({"text": d, "meta": {"n": i}}, ensure_ascii=False) + "\n"
                   for i, d in enumerate(docs)).encode()


def _all(src):
    return [src[i] for i in range(len(src))]


@pytest.mark.parametrize("suffix", [".zst", ".gz", ".bz2", ".xz"])
def test_compressed_jsonl(tmp_path, cache, suffix):
    path = tmp_path / f"chunk_0{'.jsonl'}{suffix}"
    path.write_bytes(_compress(_jsonl(DOCS), suffix))
    assert guess_format(str(path)) == "jsonl"
    src = make_source("auto", path)
    assert isinstance(src, JsonlSource) and _all(src) == DOCS
    assert list(cache.rglob("chunk_0.jsonl"))  # decompressed once, into the cache
    assert _all(pickle.loads(pickle.dumps(src))) == DOCS  # what a grain worker gets


def test_compressed_errors_name_the_compressed_file(tmp_path):
    bad = tmp_path / "bad.jsonl.zst"
    bad.write_bytes(_compress(b'{"text": "ok"}\n{oops\n', ".zst"))
    with pytest.raises(DataError, match=r"bad.jsonl.zst:2: invalid JSON"):
        make_source("auto", bad)
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"some text\n" * 100)[:-20])  # truncated download
    with pytest.raises(OSError, match=r"broken.txt.gz: cannot decompress \(gz\)"):
        TextSource(broken)


def test_compressed_text_modes(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress("para one\nline two\n\npara two\n".encode()))
    src = TextSource(tmp_path / "a.txt.gz", mode="paragraph")
    assert _all(src) == ["para one\nline two", "para two"]
    assert guess_format(str(tmp_path / "a.txt.gz")) == "text"


def test_directory_without_glob(tmp_path):
    """A SlimPajama-like tree: nested chunk directories of .jsonl.zst and .jsonl.gz, a README and
    Spark/Hadoop marker files. The directory alone is the input; the format is guessed."""
    root = tmp_path / "slim"
    (root / "chunk1").mkdir(parents=True)
    (root / "chunk2").mkdir()
    (root / "chunk1" / "example_0.jsonl.zst").write_bytes(_compress(_jsonl(DOCS[:10]), ".zst"))
    (root / "chunk1" / "example_1.jsonl.gz").write_bytes(_compress(_jsonl(DOCS[10:15]), ".gz"))
    (root / "chunk2" / "example_0.jsonl").write_bytes(_jsonl(DOCS[15:]))
    (root / "README.md").write_text("# how this corpus was made\n")
    (root / "_SUCCESS").write_text("")
    (root / ".checksums").write_text("x")
    assert guess_format(str(root)) == "jsonl"
    src = make_source("auto", str(root))
    assert _all(src) == DOCS  # files in sorted order, documents in file order
    assert src.report.files == 3
    assert src.report.skipped["files of another format"] == 1  # README.md, named in the report
    assert "README.md" in src.report.summary()


def test_parquet_directory(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "parquet"
    root.mkdir()
    for k in range(3):  # what Spark / datasets.to_parquet / HF Hub parquet exports look like
        part = DOCS[k * 8:(k + 1) * 8]
        pq.write_table(pa.table({"text": part, "id": list(range(len(part)))}),
                       root / f"part-{k:05d}-abc.snappy.parquet", row_group_size=3)
    (root / "_SUCCESS").write_text("")
    (root / ".part-00000-abc.snappy.parquet.crc").write_bytes(b"\0")
    assert guess_format(str(root)) == "parquet"
    src = make_source("auto", root)
    assert _all(src) == DOCS and src.report.files == 3 and not src.report.skipped


def test_hf_datasets_save_to_disk(tmp_path):
    import datasets

    rows = {"text": DOCS, "prompt": [f"q{i}" for i in range(len(DOCS))],
            "answer": [f"a{i}" for i in range(len(DOCS))]}
    one = tmp_path / "one"
    datasets.Dataset.from_dict(rows).save_to_disk(str(one), num_shards=3)
    reference = datasets.load_from_disk(str(one))["text"]
    assert guess_format(str(one)) == "arrow"
    src = make_source("auto", one)
    assert isinstance(src, ArrowSource) and src.report.files == 3 and _all(src) == reference
    sft = make_source("auto", one, field=("prompt", "answer"))
    assert sft[4] == {"prompt": "q4", "answer": "a4"}
    assert _all(pickle.loads(pickle.dumps(src))) == reference

    splits = tmp_path / "dict"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": DOCS[:20]}),
        "test": datasets.Dataset.from_dict({"text": DOCS[20:]}),
    }).save_to_disk(str(splits))
    assert _all(make_source("auto", splits)) == DOCS[:20]  # split defaults to train
    assert _all(make_source("auto", splits, split="test")) == DOCS[20:]
    with pytest.raises(DataError, match=r"no split 'validation' \(splits: \['train', 'test'\]\)"):
        make_source("auto", splits, split="validation")
    with pytest.raises(DataError, match=r"no column \['body'\]"):
        make_source("auto", one, field="body")


def test_plain_arrow_files(tmp_path):
    import pyarrow as pa

    table = pa.table({"text": DOCS})
    with pa.OSFile(str(tmp_path / "a.arrow"), "wb") as f:  # IPC file format
        with pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table.slice(0, 12))
    with pa.OSFile(str(tmp_path / "b.arrow"), "wb") as f:  # IPC stream format
        with pa.ipc.new_stream(f, table.schema) as w:
            w.write_table(table.slice(12))
    assert guess_format(str(tmp_path / "a.arrow")) == "arrow"
    assert _all(make_source("auto", tmp_path)) == DOCS
    (tmp_path / "c.arrow").write_bytes(b"not arrow at all")
    with pytest.raises(DataError, match=r"c.arrow: not an arrow file"):
        ArrowSource(tmp_path / "c.arrow")

"""Sources: every format yields the documents written to it; bad data is located or counted.
Independent reference: the Python values the test files were written from."""

import json

import numpy as np
import pytest

from diffujax.data.files import expand
from diffujax.data.sources import (
    ArrayRecordSource,
    DataError,
    JsonlSource,
    ParquetSource,
    TextSource,
    TfdsSource,
    guess_format,
    make_source,
)

DOCS = ["first document\nwith two lines", "second", "third one, ü and 漢"]


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("para one\nline two\n\n \npara two\n")
    (d / "b.txt").write_text("solo\n\n\nlast para")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\n")
    return d


def test_text_modes(text_dir):
    files = TextSource(text_dir, mode="file")
    assert [files[i] for i in range(len(files))] == [
        "para one\nline two\n\n \npara two", "solo\n\n\nlast para"]
    assert files.report.skipped["empty files"] == 2  # empty.txt and blank.txt, counted
    assert files.report.files == 4 and files.report.documents == 2
    assert "empty.txt" in files.report.summary()

    paras = TextSource(text_dir, mode="paragraph")
    assert list(paras[i] for i in range(len(paras))) == [
        "para one\nline two", "para two", "solo", "last para"]

    lines = TextSource(text_dir, mode="lines")
    assert [lines[i] for i in range(len(lines))] == [
        "para one", "line two", "para two", "solo", "last para"]
    assert lines.report.skipped["blank lines"] == 6


def test_missing_and_all_empty(tmp_path, text_dir):
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        TextSource([text_dir / "a.txt", tmp_path / "nope.txt"])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        TextSource(str(tmp_path / "*.missing"))
    with pytest.raises(DataError, match="no documents.*skipped 1 empty files"):
        TextSource(text_dir / "empty.txt")


def test_non_utf8_is_located(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok line\nstill ok\nbad \xff here\nfine\n")
    with pytest.raises(DataError, match=r"bad.txt: invalid UTF-8 at byte offset 21 \(line 3\)"):
        TextSource(bad)
    with pytest.raises(DataError, match=r"byte offset 21 \(line 3\)"):
        TextSource(bad, mode="paragraph")
    with pytest.raises(DataError, match=r"byte offset 21 \(line 3\)"):
        TextSource(bad, mode="lines")
    skipping = TextSource(bad, mode="lines", errors="skip")
    assert [skipping[i] for i in range(len(skipping))] == ["ok line", "still ok", "fine"]
    assert skipping.report.skipped["non-UTF-8 documents"] == 1
    assert skipping.report.examples["non-UTF-8 documents"] == [f"{bad}:3"]
    bad.write_bytes(b"good para\n\nbad \xff\nbad \xfe again\n\nlast\n")
    paras = TextSource(bad, mode="paragraph", errors="skip")
    assert [paras[i] for i in range(len(paras))] == ["good para", "last"]
    assert paras.report.examples == {"non-UTF-8 documents": [f"{bad}:3"]}  # counted once


def test_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": t, "prompt": f"q{i}", "answer": f"a{i}"} for i, t in enumerate(DOCS)]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    src = JsonlSource(path)
    assert [src[i] for i in range(len(src))] == DOCS
    assert src.report.skipped["blank lines"] == 1
    sft = JsonlSource(path, field=("prompt", "answer"))
    assert sft[2] == {"prompt": "q2", "answer": "a2"}
    assert guess_format(str(path)) == "jsonl"
    assert make_source("auto", [path])[1] == "second"


def test_jsonl_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": 3}\n{oops\n{"other": "x"}\n{"text": ""}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text' is a int"):
        JsonlSource(path)
    src = JsonlSource(path, errors="skip")
    assert len(src) == 1 and src[0] == "fine"
    assert src.report.skipped == {"invalid records": 3, "empty documents": 1}
    path.write_bytes(b'{"text": "a"}\n{"text": "\xc3("}\n')
    with pytest.raises(DataError, match=r"invalid UTF-8 at byte offset 24 \(line 2\)"):
        JsonlSource(path)


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": DOCS * 3, "n": list(range(9))}), path, row_group_size=2)
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "e.parquet")
    src = ParquetSource(sorted(tmp_path.glob("*.parquet")))
    assert len(src) == 9 and [src[i] for i in (8, 0, 4)] == [DOCS[2], DOCS[0], DOCS[1]]
    assert src.report.skipped["empty files"] == 1
    with pytest.raises(DataError, match="no column.*columns: \\['text', 'n'\\]"):
        ParquetSource(path, column="body")
    pq.write_table(pa.table({"text": ["x", None]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match="null.parquet row group 0 row 1"):
        ParquetSource(tmp_path / "null.parquet")[1]
    assert ParquetSource(tmp_path / "null.parquet", errors="skip")[1] is None


def test_array_record(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    def write(name, records):
        w = ArrayRecordWriter(str(tmp_path / name), "group_size:1")
        for r in records:
            w.write(r)
        w.close()

    write("a.array_record", [d.encode() for d in DOCS])
    write("b.array_record", [json.dumps({"text": d}).encode() for d in DOCS] + [b"\xff"])
    plain = ArrayRecordSource(tmp_path / "a.array_record")
    assert [plain[i] for i in range(3)] == DOCS
    rec = ArrayRecordSource(tmp_path / "b.array_record", field="text")
    assert rec[1] == DOCS[1]
    with pytest.raises(DataError, match=r"b.array_record record 3: bad JSON"):
        rec[3]
    write("c.array_record", [b"ok", b"\xfe bad"])
    with pytest.raises(DataError, match="c.array_record record 1: invalid UTF-8 at byte offset 0"):
        ArrayRecordSource(tmp_path / "c.array_record")[1]


def test_expand(tmp_path, text_dir):
    (text_dir / ".hidden").write_text("x")
    names = [p.name for p in expand([text_dir])[0]]
    assert names == ["a.txt", "b.txt", "blank.txt", "empty.txt"]
    assert [p.name for p in expand(str(text_dir / "[ab].txt"))[0]] == ["a.txt", "b.txt"]


# -- TFDS: a tiny builder written in array_record format to a temporary data_dir ----------------

@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    class DiffujaxTinyText(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(DOCS),
                    "test": self._generate_examples(DOCS[:1])}

        def _generate_examples(self, docs):
            for i, d in enumerate(docs):
                yield i, {"text": d}

    # tfds 4.9.10 looks up the source file of a builder defined in a dotted module through
    # importlib_resources, which it only installs for Python < 3.9; a one-part name skips that.
    DiffujaxTinyText.__module__ = "diffujax_tiny_text_builder"
    data_dir = tmp_path_factory.mktemp("tfds")
    DiffujaxTinyText(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds_data_source(tfds_dir):
    src = TfdsSource("diffujax_tiny_text", split="train", data_dir=str(tfds_dir))
    assert sorted(src[i] for i in range(len(src))) == sorted(DOCS)
    test = make_source("tfds", "diffujax_tiny_text:test", data_dir=str(tfds_dir))
    assert len(test) == 1 and test[0] == DOCS[0]
    with pytest.raises(DataError, match="no feature \\['body'\\]"):
        TfdsSource("diffujax_tiny_text", data_dir=str(tfds_dir), field="body")
    with pytest.raises(DataError, match="cannot open TFDS dataset 'no_such_ds'"):
        TfdsSource("no_such_ds", data_dir=str(tfds_dir))


def test_sources_pickle(tmp_path, text_dir, tfds_dir):
    import pickle

    for src in (TextSource(text_dir, mode="lines"),
                TfdsSource("diffujax_tiny_text", data_dir=str(tfds_dir))):
        clone = pickle.loads(pickle.dumps(src))
        assert [clone[i] for i in range(len(clone))] == [src[i] for i in range(len(src))]
    assert np.all(TextSource(text_dir, mode="lines")._index >= 0)


def test_only_skipped_bad_data_warns(tmp_path, caplog):
    """Empty files and blank lines are ordinary (an empty ``__init__.py``): no warning, the report
    says it. Bad records passed over under errors=skip are worth one."""
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n\n')
    (tmp_path / "empty.jsonl").write_text("")
    with caplog.at_level("DEBUG", logger="diffujax"):
        quiet = JsonlSource(sorted(tmp_path.glob("*.jsonl")))
    assert quiet.report.skipped == {"blank lines": 1, "empty files": 1}
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    caplog.clear()
    (tmp_path / "bad.jsonl").write_text('{"text": 3}\n')
    with caplog.at_level("DEBUG", logger="diffujax"):
        JsonlSource(sorted(tmp_path.glob("*.jsonl")), errors="skip")
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "skipped 1 invalid records" in caplog.records[0].getMessage()

"""Pre-tokenised shards: blocks equal a brute-force packing of each shard's documents; documents
read back give the same batches as tokenising on the fly; re-runs resume; writes are atomic."""

import json

import grain
import numpy as np
import pytest

from diffujax.data.pipeline import PipelineOptions, build_pipeline
from diffujax.data.pretokenize import main
from diffujax.data.sources import PretokenizedSource, TextSource

ONE = grain.sharding.ShardOptions(0, 1)


def batches(source, tok, **kw):
    opts = PipelineOptions(shuffle=False, num_epochs=1, drop_remainder=False, read_threads=0, **kw)
    return list(build_pipeline(source, tok, opts, shard=ONE).iterator())


def cat(bs, key="tokens"):
    return np.concatenate([b[key] for b in bs])


@pytest.fixture(scope="module")
def blocks_dir(tmp_path_factory, sp_dir, corpus_dir):
    out = tmp_path_factory.mktemp("pretok") / "blocks"
    argv = ["--tokenizer", str(sp_dir), "--out", str(out), "--shards", "3", "--seq-len", "32",
            "--mode", "paragraph", str(corpus_dir)]
    assert main(argv) == 0
    return out, argv


def test_blocks_match_brute_force(blocks_dir, sp_tok, corpus_dir):
    out, _ = blocks_dir
    src = PretokenizedSource(out)
    text = TextSource(corpus_dir, mode="paragraph")
    n, L, eos = len(text), 32, sp_tok.eos_id
    expected, tail = [], 0
    for k in range(3):  # shard k packs the k-th contiguous slice of the documents
        stream = [t for i in range(n * k // 3, n * (k + 1) // 3)
                  for t in sp_tok.encode(text[i]) + [eos]]
        full = len(stream) // L * L
        expected += [stream[j:j + L] for j in range(0, full, L)]
        tail += len(stream) - full
    assert src.layout == "blocks" and src.seq_len == L and len(src) == len(expected)
    np.testing.assert_array_equal(np.stack([src[i] for i in range(len(src))]), expected)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["counts"]["tail_tokens_dropped"] == tail
    assert meta["counts"]["documents"] == n and meta["dtype"] == "uint16"
    assert not list(out.glob(".*"))  # no temporary files left behind

    # Through the pipeline: tokens as stored, segments restart after every EOS.
    got = batches(src, None, seq_len=L, global_batch=4, segment_ids=True, positions=True)
    tokens, seg = cat(got), cat(got, "segment_ids")
    np.testing.assert_array_equal(tokens, expected)
    for row, srow in zip(tokens, seg):
        ends = np.flatnonzero(row[:-1] == eos)
        assert (np.diff(srow) == np.isin(np.arange(L - 1), ends)).all() and srow[0] == 1
    assert cat(got, "loss_mask").all()


def test_resume_and_config_mismatch(blocks_dir, capsys):
    out, argv = blocks_dir
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "data-00001-of-00003.json").unlink()  # as if shard 1 had not finished
    assert main(argv) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after["data-00000-of-00003.array_record"] == before["data-00000-of-00003.array_record"]
    assert after["data-00001-of-00003.array_record"] != before["data-00001-of-00003.array_record"]
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["layout"] == "blocks" and summary["records"] == len(PretokenizedSource(out))
    other = list(argv)
    other[other.index("--seq-len") + 1] = "16"
    assert main(other) == 1
    assert "another configuration" in capsys.readouterr().err


def test_documents_layout_equals_on_the_fly(tmp_path, hf_dir, hf_tok, corpus_dir):
    out = tmp_path / "docs"
    assert main(["--tokenizer", str(hf_dir), "--out", str(out), "--shards", "2", "--docs",
                 "--mode", "paragraph", "--workers", "1", str(corpus_dir)]) == 0
    stored = PretokenizedSource(out)
    text = TextSource(corpus_dir, mode="paragraph")
    assert stored.layout == "tokens" and len(stored) == len(text)
    kw = dict(seq_len=48, global_batch=4, segment_ids=True)
    np.testing.assert_array_equal(cat(batches(stored, hf_tok, **kw)),
                                  cat(batches(text, hf_tok, **kw)))
    # no tokenizer needed: EOS comes from the metadata
    np.testing.assert_array_equal(cat(batches(stored, None, **kw)),
                                  cat(batches(text, hf_tok, **kw)))


def test_errors(tmp_path, sp_dir, corpus_dir, capsys):
    assert main(["--tokenizer", str(sp_dir), "--out", str(tmp_path / "o"), "--shards", "1",
                 "--seq-len", "8", str(tmp_path / "missing.txt")]) == 1
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert main(["--tokenizer", str(sp_dir), "--out", str(tmp_path / "o"), "--shards", "1",
                 "--seq-len", "8", "--model-vocab-size", "100", str(corpus_dir)]) == 1
    assert "only 100 rows" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a pretokenize output"):
        PretokenizedSource(tmp_path)


def test_vocab_of_stored_data_is_checked(blocks_dir):
    from diffujax.data.tokenizer import VocabMismatchError

    src = PretokenizedSource(blocks_dir[0])
    with pytest.raises(VocabMismatchError, match="vocabulary of 400 tokens.*only 300 rows"):
        build_pipeline(src, None, PipelineOptions(seq_len=32, global_batch=2), shard=ONE,
                       model_vocab_size=300)

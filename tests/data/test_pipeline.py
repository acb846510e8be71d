"""The grain pipeline against brute-force references: concatenate every document + EOS and cut
into blocks; the SFT contract built example by example with ``build_sft_example``."""

import json

import grain
import numpy as np
import pytest

from diffujax.data.pipeline import PipelineOptions, build_pipeline
from diffujax.data.sources import DataError, JsonlSource, TextSource
from diffujax.data.tokenizer import VocabMismatchError
from diffujax.diffusion.sft import build_sft_example

ONE = grain.sharding.ShardOptions(0, 1)


def run(source, tok, shard=ONE, n=None, model_vocab_size=None, **kw):
    """Batches of a fresh pipeline: all of a finite run, or the first ``n``."""
    kw.setdefault("read_threads", 0)
    pipe = build_pipeline(source, tok, PipelineOptions(**kw), shard=shard,
                          model_vocab_size=model_vocab_size)
    it = pipe.iterator()
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out


def rows(batches, key="tokens"):
    return np.concatenate([b[key] for b in batches])


def reference_blocks(docs_ids, L, eos, pad):
    """Concatenate documents + EOS, cut into L; returns tokens, segment ids, positions, mask."""
    stream = [t for ids in docs_ids for t in list(ids) + [eos]]
    doc = [d for d, ids in enumerate(docs_ids) for _ in range(len(ids) + 1)]
    n = -(-len(stream) // L)
    tokens = np.full(n * L, pad, np.int32)
    tokens[: len(stream)] = stream
    doc = np.asarray(doc + [-1] * (n * L - len(stream))).reshape(n, L)
    seg = np.zeros((n, L), np.int32)
    pos = np.zeros((n, L), np.int32)
    for r in range(n):
        for j in range(L):
            if doc[r, j] < 0:
                continue
            new = j == 0 or doc[r, j] != doc[r, j - 1]
            seg[r, j] = (seg[r, j - 1] if j else 0) + new
            pos[r, j] = 0 if new else pos[r, j - 1] + 1
    return tokens.reshape(n, L), seg, pos, doc >= 0


@pytest.fixture(scope="module")
def paragraphs(corpus_dir):
    return TextSource(corpus_dir, mode="paragraph")


def split_docs(batches, eos, cut=False):
    """Documents (as id tuples) recovered from a pretraining stream (``cut``: the stream may
    stop inside a document, which is then left out)."""
    stream = rows(batches)[rows(batches, "loss_mask")]
    docs, cur = [], []
    for t in stream.tolist():
        if t == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    assert cut or not cur
    return docs


def test_packing_matches_brute_force(any_tok, paragraphs):
    L = 64
    batches = run(paragraphs, any_tok, seq_len=L, global_batch=4, shuffle=False, num_epochs=1,
                  drop_remainder=False, segment_ids=True, positions=True)
    docs = [any_tok.encode(paragraphs[i]) for i in range(len(paragraphs))]
    pad = any_tok.pad_id if any_tok.pad_id is not None else any_tok.eos_id
    tokens, seg, pos, mask = reference_blocks(docs, L, any_tok.eos_id, pad)
    np.testing.assert_array_equal(rows(batches), tokens)
    np.testing.assert_array_equal(rows(batches, "segment_ids"), seg)
    np.testing.assert_array_equal(rows(batches, "positions"), pos)
    np.testing.assert_array_equal(rows(batches, "loss_mask"), mask)
    assert not rows(batches, "src").any()
    for b in batches:
        assert b["tokens"].dtype == np.int32 and b["segment_ids"].dtype == np.int32
        assert b["src"].dtype == bool and b["loss_mask"].dtype == bool


def test_segment_ids_off_and_bos(sp_tok, paragraphs):
    kw = dict(seq_len=32, global_batch=2, shuffle=False, num_epochs=1, n=6)
    on = run(paragraphs, sp_tok, segment_ids=True, **kw)
    off = run(paragraphs, sp_tok, segment_ids=False, **kw)
    np.testing.assert_array_equal(rows(on), rows(off))
    assert (rows(off, "segment_ids") == 1).all() and (rows(on, "segment_ids") > 1).any()
    assert "positions" not in off[0]
    with_bos = run(paragraphs, sp_tok, add_bos=True, **kw)
    first = [sp_tok.bos_id] + sp_tok.encode(paragraphs[0]) + [sp_tok.eos_id]
    assert rows(with_bos).ravel()[: len(first)].tolist() == first[: 6 * 32]


def test_overlong_documents_counted(sp_tok, paragraphs):
    L = 16
    pipe = build_pipeline(paragraphs, sp_tok, PipelineOptions(
        seq_len=L, global_batch=2, shuffle=False, num_epochs=1, read_threads=0), shard=ONE)
    list(pipe.iterator())
    lengths = [len(sp_tok.encode(paragraphs[i])) + 1 for i in range(len(paragraphs))]
    counts = pipe.stats.counts
    assert counts["documents"] == len(lengths) and counts["tokens"] == sum(lengths)
    assert counts["documents_longer_than_block"] == sum(n > L for n in lengths) > 0


UNIQUE = [f"doc {i} " + " ".join(["alpha", "beta", "gamma"][i % 3:]) * (i % 5 + 1)
          for i in range(37)]


def test_two_processes_split_the_data(sp_tok):
    kw = dict(seq_len=16, global_batch=2, num_epochs=1, drop_remainder=False, seed=3)
    whole = split_docs(run(UNIQUE, sp_tok, **kw), sp_tok.eos_id)
    parts = [split_docs(run(UNIQUE, sp_tok, shard=grain.sharding.ShardOptions(i, 2), **kw),
                        sp_tok.eos_id) for i in range(2)]
    assert set(parts[0]).isdisjoint(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(whole) == sorted(
        tuple(sp_tok.encode(d)) for d in UNIQUE)
    assert abs(len(parts[0]) - len(parts[1])) <= 1
    with pytest.raises(ValueError, match="not divisible"):
        build_pipeline(UNIQUE, sp_tok, PipelineOptions(seq_len=16, global_batch=3),
                       shard=grain.sharding.ShardOptions(0, 2))


def test_seed_determinism_and_epochs(sp_tok):
    kw = dict(seq_len=16, global_batch=2, num_epochs=2, drop_remainder=False)
    a, b = run(UNIQUE, sp_tok, seed=1, **kw), run(UNIQUE, sp_tok, seed=1, **kw)
    np.testing.assert_array_equal(rows(a), rows(b))
    c = run(UNIQUE, sp_tok, seed=2, **kw)
    assert rows(c).shape != rows(a).shape or (rows(c) != rows(a)).any()
    docs = split_docs(a, sp_tok.eos_id)
    expected = [tuple(sp_tok.encode(d)) for d in UNIQUE]
    assert sorted(docs) == sorted(expected * 2)  # every document once per epoch
    assert docs[:37] != docs[37:]  # each epoch is shuffled anew
    ordered = split_docs(run(UNIQUE, sp_tok, shuffle=False, **kw), sp_tok.eos_id)
    assert ordered == expected * 2


@pytest.mark.parametrize("mode", ["pretrain", "sft_packed", "repeat_forever"])
def test_state_restore_reproduces_batches(sp_tok, paragraphs, sft_jsonl, mode):
    if mode == "sft_packed":
        source, opts = sft_jsonl, dict(mode="sft", sft_pack=True, segment_ids=True, sep_id=3)
    else:
        source, opts = paragraphs, dict(segment_ids=True)
    opts.update(seq_len=32, global_batch=2, read_threads=2, seed=5,
                num_epochs=1 if mode == "pretrain" else None)
    pipe = build_pipeline(source, sp_tok, PipelineOptions(**opts), shard=ONE)
    for skip in (0, 3, 11):
        it = pipe.iterator()
        for _ in range(skip):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # as the checkpoint stores it
        expect = [next(it) for _ in range(6)]
        fresh = pipe.iterator()
        fresh.set_state(state)
        for want, got in zip(expect, (next(fresh) for _ in range(6))):
            for key in want:
                np.testing.assert_array_equal(want[key], got[key])


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    rng = np.random.default_rng(0)
    words = "what is the answer to this question because of that reason".split()
    with open(path, "w") as f:
        for i in range(23):
            p = " ".join(rng.choice(words, rng.integers(1, 12)))
            a = " ".join(rng.choice(words, rng.integers(1, 16)))
            f.write(json.dumps({"prompt": f"q{i} {p}", "answer": a}) + "\n")
    return JsonlSource(path, field=("prompt", "answer"))


def sft_reference(tok, ex, L, sep=3, pad=0):
    return build_sft_example(tok.encode(ex["prompt"]), tok.encode(ex["answer"]), length=L,
                             bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=pad, sep_id=sep)


def test_sft_rows_follow_the_contract(sp_tok, sft_jsonl):
    L = 24
    batches = run(sft_jsonl, sp_tok, mode="sft", seq_len=L, global_batch=4, shuffle=False,
                  num_epochs=1, drop_remainder=False, sep_id=3, pad_id=0)
    refs = [sft_reference(sp_tok, sft_jsonl[i], L) for i in range(len(sft_jsonl))]
    np.testing.assert_array_equal(rows(batches), np.stack([t for t, _ in refs]))
    np.testing.assert_array_equal(rows(batches, "src"), np.stack([s for _, s in refs]))
    assert rows(batches, "loss_mask").all()  # padding is a target (docs/algorithms.md §4)
    assert (rows(batches, "segment_ids") == 1).all()


def test_sft_first_fit_packing(sp_tok, sft_jsonl):
    L = 128
    batches = run(sft_jsonl, sp_tok, mode="sft", seq_len=L, global_batch=4, num_epochs=1,
                  drop_remainder=False, sep_id=3, pad_id=0, sft_pack=True, segment_ids=True)
    tokens, src, seg = rows(batches), rows(batches, "src"), rows(batches, "segment_ids")
    np.testing.assert_array_equal(rows(batches, "loss_mask"), seg > 0)
    assert (tokens[seg == 0] == 0).all() and not src[seg == 0].any()
    found = []
    for r in range(len(tokens)):
        for s in range(1, seg[r].max() + 1):
            found.append((tuple(tokens[r][seg[r] == s]), tuple(src[r][seg[r] == s])))
    expected = []
    for i in range(len(sft_jsonl)):
        t, s = sft_reference(sp_tok, sft_jsonl[i], L)
        n = int(np.flatnonzero(t == sp_tok.eos_id)[-1]) + 1  # unpadded length
        expected.append((tuple(t[:n]), tuple(s[:n])))
    assert sorted(found) == sorted(expected)
    assert len(tokens) < len(sft_jsonl)  # several examples share a row


def test_vocab_checks(sp_tok):
    with pytest.raises(VocabMismatchError, match="only 300 rows"):
        build_pipeline(UNIQUE, sp_tok, PipelineOptions(seq_len=16, global_batch=2),
                       shard=ONE, model_vocab_size=300)
    docs = [np.array([5, 6, 7], np.int32), np.array([8, 450], np.int32)]  # pretokenized docs
    with pytest.raises(VocabMismatchError, match="token id 450 >= model vocabulary size 400"):
        run(docs, sp_tok, seq_len=4, global_batch=1, num_epochs=1, model_vocab_size=400)
    with pytest.raises(DataError, match="no documents"):
        build_pipeline([], sp_tok, PipelineOptions(seq_len=16, global_batch=2), shard=ONE)


def test_mixture(sp_tok):
    a = [f"apple {i}" for i in range(20)]
    b = [f"banana {i}" for i in range(20)]
    batches = run([(a, 3.0), (b, 1.0)], sp_tok, seq_len=16, global_batch=2, n=20)
    text = " ".join(sp_tok.decode(d) for d in split_docs(batches, sp_tok.eos_id, cut=True))
    assert 2 * text.count("banana") < text.count("apple")
    with pytest.raises(ValueError, match="num_epochs=None"):
        build_pipeline([(a, 1.0), (b, 1.0)], sp_tok,
                       PipelineOptions(seq_len=16, global_batch=2, num_epochs=1), shard=ONE)


@pytest.mark.integration  # a spawned grain worker
def test_worker_process(sp_tok):
    """A grain worker process (spawned): same stream as in-process; set_state rewinds it."""
    kw = dict(seq_len=16, global_batch=2, num_epochs=1, seed=4, read_threads=0)
    local = run(UNIQUE, sp_tok, n=4, **kw)
    pipe = build_pipeline(UNIQUE, sp_tok, PipelineOptions(worker_count=1, **kw), shard=ONE)
    it = pipe.iterator()
    try:
        got = [next(it) for _ in range(2)]
        assert type(got[0]["tokens"]) is np.ndarray  # not a shared-memory view
        state = json.loads(json.dumps(it.get_state()))
        got += [next(it) for _ in range(2)]
        np.testing.assert_array_equal(rows(got), rows(local))
        it.set_state(state)  # one worker start only: rewind the live iterator
        np.testing.assert_array_equal(rows([next(it) for _ in range(2)]), rows(local[2:]))
    finally:
        it.close()



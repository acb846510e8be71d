"""The grain pipeline: source -> tokenize -> pack -> batch, one shard per process.

Order of operations (every process runs the same code with its own ``shard_index``)::

    source -> shuffle(seed)          same permutation on every process
           -> [shard_index::count]   disjoint slices; their union is the whole epoch
           -> repeat(num_epochs)     each epoch reshuffled (grain folds the epoch into the seed)
           -> tokenize               EOS after each document (BOS before it with add_bos)
           -> pack                   pretraining: concat-then-split into seq_len blocks;
                                     SFT: one padded example per row, or first-fit packing
           -> batch(global_batch / count)

Each batch is a dict of numpy arrays, all ``[local_batch, seq_len]``:

- ``tokens`` int32;
- ``segment_ids`` int32: 1, 2, ... for the documents of a row, 0 on filler, when
  ``segment_ids=True``; all ones otherwise (the reference attends across documents);
- ``src`` bool: positions never noised (SFT prompt); all False for pretraining;
- ``loss_mask`` bool: False only on filler that belongs to no document (the tail of the last
  block of a finite run, the free space of a packed SFT row). SFT padding *is* a target
  (docs/algorithms.md §4), so an unpacked SFT row is all True;
- ``positions`` int32 (only with ``positions=True``): position inside each segment of the row
  (a document continued from the previous row restarts at 0), 0 on filler.

The iterator's state (``get_state``) is a small JSON-safe dict; ``set_state`` on a fresh iterator
of the same pipeline reproduces the following batches exactly. The stream depends on
``worker_count`` (each worker packs its own slice), so restore with the same worker count.

With several processes and a finite ``num_epochs`` processes may produce different numbers of
batches (documents differ in length); train with ``num_epochs=None`` and stop by step count.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any

import grain
import numpy as np
from absl import flags

from diffujax.data.sources import DataError
from diffujax.data.tokenizer import Tokenizer, VocabMismatchError
from diffujax.plain import from_tagged, to_tagged
from diffujax.diffusion.sft import build_sft_example

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelineOptions:
    seq_len: int
    global_batch: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    mode: str = "pretrain"  # "pretrain" | "sft"
    segment_ids: bool = False  # off for parity with the reference (docs/algorithms.md §2.7)
    positions: bool = False
    add_bos: bool = False  # pretraining: BOS before every document
    # SFT: fields of the source's records, separator and packing.
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    sep_id: int | None = None  # None: no separator token
    pad_id: int | None = None  # None: the tokenizer's PAD, else its EOS
    sft_pack: bool = False
    sft_packing_bins: int | None = None  # None: the local batch size
    drop_remainder: bool = True  # drop the last incomplete batch of a finite run
    worker_count: int = 0  # grain worker processes (spawned)
    worker_buffer_size: int = 2
    read_threads: int = 2  # threads reading + tokenising in each process

    def __post_init__(self):
        if self.mode not in ("pretrain", "sft"):
            raise ValueError(f"mode must be 'pretrain' or 'sft', got {self.mode!r}")
        if self.seq_len < 2 or self.global_batch < 1:
            raise ValueError(f"need seq_len >= 2 and global_batch >= 1, got {self}")


class DocStats:
    """Counters of the tokenize stage, live in the process that runs it: exact with
    ``worker_count=0`` (documents read ahead included); with workers each worker logs its own."""

    def __init__(self):
        self.counts = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        if key == "documents" and self.counts[key] >= 1024 and self.counts[key].bit_count() == 1:
            log.info("data: %s", self.summary())  # at 1024, 2048, 4096, ... documents

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))

    def __getstate__(self):  # a fresh set of counters in each worker
        return {"counts": collections.Counter()}


# -- per-document transforms (picklable: they travel to worker processes) ----------------------


def _check_vocab(ids: np.ndarray, vocab: int | None) -> None:
    if vocab is not None and ids.size and int(ids.max()) >= vocab:
        raise VocabMismatchError(
            f"token id {int(ids.max())} >= model vocabulary size {vocab}: the tokenizer "
            "or the pretokenized data does not belong to this model")


class _Tokenize:
    """Document -> dict of int32 token arrays (and ``src`` for SFT)."""

    def __init__(self, tokenizer: Tokenizer | None, opts: PipelineOptions, eos: int,
                 bos: int | None, pad: int, model_vocab_size: int | None, stats: DocStats):
        self.tok, self.opts, self.eos, self.bos, self.pad = tokenizer, opts, eos, bos, pad
        self.vocab = model_vocab_size
        self.stats = stats

    def _encode(self, text) -> list[int]:
        if isinstance(text, np.ndarray):  # pretokenized documents
            return text.tolist()
        return self.tok.encode(text)

    def __call__(self, doc) -> dict[str, np.ndarray] | None:
        if self.opts.mode == "sft":
            return self._sft(doc)
        ids = self._encode(doc)
        if not ids:
            self.stats.add("empty_documents_skipped")
            return None
        ids = ([self.bos] if self.opts.add_bos else []) + ids + [self.eos]
        tokens = np.asarray(ids, np.int32)
        _check_vocab(tokens, self.vocab)
        self.stats.add("documents")
        self.stats.add("tokens", len(tokens))
        if len(tokens) > self.opts.seq_len:
            self.stats.add("documents_longer_than_block")
            if self.stats.counts["documents_longer_than_block"] == 1:  # ordinary in packing
                log.debug("data: a document of %d tokens is longer than a block (%d) and is "
                          "split across blocks; counted as documents_longer_than_block",
                          len(tokens), self.opts.seq_len)
        return {"tokens": tokens}

    def _sft(self, doc):
        o = self.opts
        if not isinstance(doc, dict) or o.prompt_field not in doc or o.answer_field not in doc:
            keys = list(doc) if isinstance(doc, dict) else ""
            raise DataError(f"SFT needs records with {o.prompt_field!r} and {o.answer_field!r}, "
                            f"got {type(doc).__name__} {keys}")
        prompt, answer = self._encode(doc[o.prompt_field]), self._encode(doc[o.answer_field])
        natural = 1 + len(prompt) + (o.sep_id is not None) + len(answer) + 1
        if natural > o.seq_len:
            self.stats.add("sft_examples_truncated")
        # Packed rows hold unpadded examples; grain's packer adds the filler.
        length = min(natural, o.seq_len) if o.sft_pack else o.seq_len
        tokens, src = build_sft_example(prompt, answer, length=length, bos_id=self.bos,
                                        eos_id=self.eos, pad_id=self.pad, sep_id=o.sep_id)
        _check_vocab(tokens, self.vocab)
        self.stats.add("documents")
        return {"tokens": tokens, "src": src}


class _Block:
    """A pretokenized block -> the packers' form: documents end at EOS."""

    def __init__(self, eos: int, model_vocab_size: int | None):
        self.eos, self.vocab = eos, model_vocab_size

    def __call__(self, tokens: np.ndarray) -> dict[str, np.ndarray]:
        _check_vocab(tokens, self.vocab)
        seg = 1 + np.concatenate([[0], np.cumsum(tokens[:-1] == self.eos)])
        return {"tokens": tokens, "tokens_segment_ids": seg.astype(np.int32)}


class _Finish:
    """A row (grain's packers' form: ``tokens_segment_ids`` 0 on filler; an unpacked SFT row
    has none) -> the output contract (see the module doc)."""

    def __init__(self, opts: PipelineOptions, pad: int):
        self.opts, self.pad = opts, pad

    def __call__(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        L = self.opts.seq_len
        seg = ex.get("tokens_segment_ids", np.ones(L, np.int32))
        out = {
            "tokens": np.where(seg > 0, ex["tokens"], self.pad).astype(np.int32),
            "segment_ids": seg if self.opts.segment_ids else np.ones(L, np.int32),
            "src": ex["src"].astype(bool) if "src" in ex else np.zeros(L, bool),
            "loss_mask": seg > 0,
        }
        if self.opts.positions:
            out["positions"] = _positions(seg)
        return out


def _positions(seg: np.ndarray) -> np.ndarray:
    """Position inside each segment (0 where a new segment starts); 0 on filler."""
    idx = np.arange(len(seg))
    starts = np.concatenate([[True], seg[1:] != seg[:-1]])
    first = np.maximum.accumulate(np.where(starts, idx, 0))
    return np.where(seg > 0, idx - first, 0).astype(np.int32)


# -- JSON-safe iterator state ---------------------------------------------------------------------


class DataIterator:
    """A grain iterator whose state survives a JSON round trip (the checkpoint stores JSON)."""

    def __init__(self, it: grain.DatasetIterator):
        self._it = it

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        # Worker processes hand over grain SharedMemoryArrays, which unmap their buffer when
        # collected; copy into plain arrays so nothing downstream (a zero-copy device_put on
        # CPU) can outlive the mapping. A batch is small: B * L * 10 bytes.
        return {k: v if type(v) is np.ndarray else np.array(v) for k, v in batch.items()}

    def get_state(self) -> dict[str, Any]:
        return to_tagged(self._it.get_state())

    def set_state(self, state: dict[str, Any]) -> None:
        self._it.set_state(from_tagged(state))

    def close(self) -> None:
        self._it.close()


@dataclasses.dataclass
class Pipeline:
    dataset: grain.IterDataset
    stats: DocStats

    def iterator(self) -> DataIterator:
        return DataIterator(iter(self.dataset))


# -- building -------------------------------------------------------------------------------------


def _resolve_ids(tokenizer, source, opts: PipelineOptions):
    special = dict(getattr(source, "special", None) or {})  # pretokenized data carries its own
    if tokenizer is not None:
        mine = tokenizer.special
        for name in ("bos", "eos"):
            if name in special and name in mine and special[name] != mine[name]:
                raise VocabMismatchError(
                    f"{source} was tokenised with {name}={special[name]} but the tokenizer "
                    f"{tokenizer.path} has {name}={mine[name]}")
        special.update(mine)
    eos = special.get("eos")
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; declare eos_token in its"
                         " tokenizer_config.json")
    bos = special.get("bos")
    if (opts.add_bos or opts.mode == "sft") and bos is None:
        raise ValueError("BOS is needed (add_bos / SFT) but the tokenizer has none; declare"
                         " bos_token in its tokenizer_config.json")
    pad = opts.pad_id if opts.pad_id is not None else special.get("pad", eos)
    return eos, bos, pad


def build_pipeline(
    sources,
    tokenizer: Tokenizer | None,
    options: PipelineOptions,
    *,
    shard: grain.sharding.ShardOptions | None = None,
    model_vocab_size: int | None = None,
) -> Pipeline:
    """Build the pipeline for one process.

    ``sources``: one source, or a list of ``(source, weight)`` mixed by weight (documents are
    drawn from each in proportion; mixing needs ``num_epochs=None``). ``shard`` defaults to
    ``grain.sharding.ShardByJaxProcess()``; tests pass ``ShardOptions(i, n)`` to simulate
    processes. ``tokenizer`` may be None for pretokenized sources. With ``model_vocab_size`` the
    tokenizer and every token id are checked against the model's embedding table.
    """
    opts = options
    if shard is None:
        shard = grain.sharding.ShardByJaxProcess()
    if opts.global_batch % shard.shard_count:
        raise ValueError(f"global batch {opts.global_batch} is not divisible by the "
                         f"{shard.shard_count} processes")
    local_batch = opts.global_batch // shard.shard_count
    # A list of (source, weight) pairs is a mixture; anything else (a plain list of documents
    # too) is one source.
    mixture = isinstance(sources, (list, tuple)) and sources and all(
        isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], (int, float)) for x in sources)
    pairs = [(src, float(w)) for src, w in sources] if mixture else [(sources, 1.0)]
    if len(pairs) > 1 and opts.num_epochs is not None:
        raise ValueError("mixing several sources needs num_epochs=None")
    # "blocks": pretokenized, already packed; "tokens": pretokenized documents; else text.
    layouts = [getattr(src, "layout", "text") for src, _ in pairs]
    blocks = layouts[0] == "blocks"
    if any((lay == "blocks") != blocks for lay in layouts):
        raise ValueError(f"cannot mix pre-packed blocks with documents ({layouts})")
    if blocks and opts.mode != "pretrain":
        raise ValueError("pretokenized blocks are for pretraining only")
    if tokenizer is None and "text" in layouts:
        raise ValueError("a tokenizer is needed for text sources")
    if tokenizer is not None and model_vocab_size is not None:
        tokenizer.check_model_vocab(model_vocab_size)
    eos, bos, pad = _resolve_ids(tokenizer, pairs[0][0], opts)

    parts = []
    for i, (src, _) in enumerate(pairs):
        if len(src) == 0:
            raise DataError(f"{src} has no documents")
        src_vocab = getattr(src, "vocab_size", None)  # pretokenized data knows its tokenizer
        if model_vocab_size is not None and src_vocab is not None and src_vocab > model_vocab_size:
            raise VocabMismatchError(f"{src} was tokenised with a vocabulary of {src_vocab} "
                                     f"tokens; the model has only {model_vocab_size} rows")
        if blocks and src.seq_len != opts.seq_len:
            raise ValueError(f"{src} holds blocks of {src.seq_len} tokens, "
                             f"seq_len is {opts.seq_len}")
        ds = grain.MapDataset.source(src)
        if opts.shuffle:
            ds = ds.shuffle(seed=opts.seed + i)
        n = len(ds)
        if shard.drop_remainder and n % shard.shard_count:
            log.warning("data: dropping %d of %d documents so every process gets the same"
                        " number", n % shard.shard_count, n)
            ds = ds[: n - n % shard.shard_count]
        ds = ds[shard.shard_index :: shard.shard_count]
        if opts.num_epochs != 1:
            ds = ds.repeat(opts.num_epochs)
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [w for _, w in pairs])

    stats = DocStats()
    if blocks:
        ds = ds.map(_Block(eos, model_vocab_size))
    else:
        ds = ds.map(_Tokenize(tokenizer, opts, eos, bos, pad, model_vocab_size, stats))
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=opts.read_threads,
                                              prefetch_buffer_size=max(opts.read_threads, 1) * 8))
    L = opts.seq_len  # rows of L tokens: pretokenized blocks and unpacked SFT rows are already
    if opts.mode == "pretrain" and not blocks:
        it = grain.experimental.ConcatThenSplitIterDataset(it, length_struct={"tokens": L})
    elif opts.mode == "sft" and opts.sft_pack:
        if not opts.segment_ids:
            log.warning("data: packed SFT rows without segment_ids let examples attend to each"
                        " other")
        it = grain.experimental.FirstFitPackIterDataset(
            it, length_struct={"tokens": L, "src": L},
            num_packing_bins=opts.sft_packing_bins or local_batch, seed=opts.seed)
    it = it.map(_Finish(opts, pad))
    it = it.batch(local_batch, drop_remainder=opts.drop_remainder)
    if opts.worker_count > 0:
        # grain's worker processes read absl flags; a program that does not run absl.app must
        # mark them parsed before it starts workers.
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=opts.worker_count, per_worker_buffer_size=opts.worker_buffer_size))
    return Pipeline(it, stats)


"""Pre-tokenise a corpus into ArrayRecord shards, so a pod reads tokens instead of tokenising.

    python -m diffujax.data.pretokenize --tokenizer DIR --out DIR --shards N [--seq-len L | --docs]
        [--format auto|text|jsonl|parquet|array_record|tfds] [--field text] [--mode file]
        [--workers W] inputs...

Two layouts:
- ``blocks`` (``--seq-len L``): documents (+EOS, BOS before each with ``--add-bos``) concatenated
  and cut into blocks of exactly L tokens, one record each; the pipeline only shuffles and
  batches them. Each shard packs its own documents; its last incomplete block is dropped and
  counted (``tail_tokens_dropped``).
- ``tokens`` (``--docs``): one record per document (its ids, without BOS/EOS); the pipeline adds
  EOS and packs on the fly, so one tokenisation serves every ``seq_len``.

Records are the raw little-endian ids (uint16 when the vocabulary fits, else int32). Shard k of N
takes the k-th contiguous slice of the documents. Every file is written to a temporary name and
renamed into place (or, for ``--out gs://...``, written locally and uploaded); a shard's ``.json``
(its counts) is written after it and marks it complete, so a re-run resumes by skipping complete
shards. ``metadata.json``, written last, describes the whole output; readers require it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import multiprocessing
import os
import pathlib
import sys
import tempfile
from typing import Any

import numpy as np

from diffujax import console, paths
from diffujax.data.sources import (FORMATS, PRETOKENIZED_FORMAT, PRETOKENIZED_VERSION, DataError,
                                   SourceReport, make_source)
from diffujax.data.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

_BATCH = 256  # documents tokenised per encode_batch call


def _shard_name(k: int, n: int) -> str:
    return f"data-{k:05d}-of-{n:05d}.array_record"


def _write_shard(source, tokenizer: Tokenizer, out: str, k: int, config: dict) -> dict:
    """Tokenise documents of shard ``k`` and write its ArrayRecord file, then its ``.json``."""
    # array_record is a Linux-only dependency (pyproject marker): imported where it is written
    from array_record.python.array_record_module import ArrayRecordWriter

    n = config["num_shards"]
    lo, hi = len(source) * k // n, len(source) * (k + 1) // n
    final = paths.resolve(out) / _shard_name(k, n)
    counts = dict(documents=0, tokens=0, records=0, empty_documents_skipped=0,
                  unreadable_skipped=0, documents_longer_than_block=0, tail_tokens_dropped=0)
    try:
        with paths.writing_file(final) as tmp:  # removed on failure: nothing half-written stays
            writer = ArrayRecordWriter(os.fspath(tmp), "group_size:1")  # read one by one
            try:
                _tokenize_into(writer, source, tokenizer, range(lo, hi), config, counts)
            finally:
                writer.close()
        paths.write_text_atomic(final.with_suffix(".json"), json.dumps(
            {"config": config, "counts": counts}, indent=1, sort_keys=True))
    except (OSError, RuntimeError) as e:  # the writer's own errors are RuntimeErrors
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise OSError(f"writing {final} failed: {reason}") from None
    return counts


def _tokenize_into(writer, source, tokenizer, docs: range, config: dict, counts: dict):
    """Documents ``docs`` of ``source`` as records (``seq_len`` None: one per document, else
    packed blocks of ``seq_len`` tokens); ``counts`` is updated in place."""
    L, dtype = config["seq_len"], np.dtype(config["dtype"]).newbyteorder("<")
    eos, bos = config["special"].get("eos"), config["special"].get("bos")
    pending: list[int] = []  # blocks layout: tokens not yet written

    def emit(ids):
        writer.write(np.asarray(ids, dtype).tobytes())
        counts["records"] += 1

    for start in range(docs.start, docs.stop, _BATCH):
        batch = [source[i] for i in range(start, min(docs.stop, start + _BATCH))]
        counts["unreadable_skipped"] += sum(d is None for d in batch)
        for ids in tokenizer.encode_batch([d for d in batch if d is not None]):
            if not ids:
                counts["empty_documents_skipped"] += 1
                continue
            counts["documents"] += 1
            if L is None:
                counts["tokens"] += len(ids)
                emit(ids)
                continue
            ids = ([bos] if config["add_bos"] else []) + ids + [eos]
            counts["tokens"] += len(ids)
            counts["documents_longer_than_block"] += len(ids) > L
            pending.extend(ids)
            while len(pending) >= L:
                emit(pending[:L])
                del pending[:L]
    counts["tail_tokens_dropped"] = len(pending)


def check_arguments(*, num_shards: int, seq_len: int | None, workers: int = 1,
                    model_vocab_size: int | None = None) -> None:
    """Refuse (``ValueError``, one line naming the option) a value that cannot work: before the
    corpus is scanned (a block length of 0 would never finish a block)."""
    lowest = {"--shards": (num_shards, 1), "--seq-len": (seq_len, 2), "--workers": (workers, 1),
              "--model-vocab-size": (model_vocab_size, 1)}
    for name, (value, low) in lowest.items():
        if value is not None and value < low:
            raise ValueError(f"{name} {value}: must be >= {low}")


def prepare_output(out_dir):
    """``out_dir`` created if needed and checked to be a writable directory (one line naming
    it otherwise, before any work)."""
    out = paths.resolve(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not paths.is_remote(out):
            with tempfile.TemporaryFile(dir=os.fspath(out)):
                pass
    except OSError as e:
        raise ValueError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


def _remove_stale_temporaries(out) -> None:
    """The temporary files (``paths.writing_file`` names) of shards, their ``.json`` and the
    metadata that a killed run left: one pretokenize writes an output directory at a time, so
    they are nobody's."""
    if paths.is_remote(out):
        return  # a bucket's files are written locally and uploaded whole
    local = pathlib.Path(os.fspath(out))
    for pattern in (".data-*-of-*.tmp-*", ".metadata.json.tmp-*"):
        for stale in local.glob(pattern):
            log.warning("pretokenize: removing %s, left by an interrupted run", stale)
            stale.unlink(missing_ok=True)


def pretokenize(source, tokenizer: Tokenizer, out_dir, *, num_shards: int, seq_len: int | None,
                add_bos: bool = False, model_vocab_size: int | None = None,
                workers: int = 1) -> dict:
    """Write ``num_shards`` shards of ``source`` into ``out_dir``; returns the metadata."""
    check_arguments(num_shards=num_shards, seq_len=seq_len, workers=workers,
                    model_vocab_size=model_vocab_size)
    out = prepare_output(out_dir)
    _remove_stale_temporaries(out)
    if model_vocab_size is not None:
        tokenizer.check_model_vocab(model_vocab_size)
    if not getattr(source, "single", True):
        raise ValueError(f"{source} yields records of several fields; pretokenize takes text")
    special = dict(tokenizer.special)
    if seq_len is not None and "eos" not in special:
        raise ValueError(f"{tokenizer} has no EOS token to end documents with")
    if add_bos and "bos" not in special:
        raise ValueError(f"--add-bos but {tokenizer} has no BOS token")
    config = dict(
        num_shards=num_shards, seq_len=seq_len, add_bos=add_bos, special=special,
        dtype="uint16" if tokenizer.vocab_size <= 1 << 16 else "int32",
        source=repr(source), tokenizer=dict(path=tokenizer.path, kind=tokenizer.kind,
                                            vocab_size=tokenizer.vocab_size),
    )
    todo, counts = [], {}
    for k in range(num_shards):
        done = out / _shard_name(k, num_shards)
        if done.with_suffix(".json").is_file() and done.is_file():
            prior = json.loads(done.with_suffix(".json").read_text())
            if prior["config"] != config:
                raise ValueError(f"{out} holds shards written with another configuration "
                                 f"({done.with_suffix('.json')}); use a fresh output directory")
            counts[k] = prior["counts"]
        else:
            todo.append(k)
    if todo:
        log.info("pretokenize: %d of %d shards to write", len(todo), num_shards)
    if workers > 1 and len(todo) > 1:
        ctx = multiprocessing.get_context("spawn")  # tokenizer libraries dislike fork
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=ctx) as ex:
            futures = {k: ex.submit(_write_shard, source, tokenizer, os.fspath(out), k, config)
                       for k in todo}
            counts.update({k: f.result() for k, f in futures.items()})
    else:
        counts.update({k: _write_shard(source, tokenizer, os.fspath(out), k, config) for k in todo})
    total = {key: sum(c[key] for c in counts.values()) for key in counts[0]}
    report: SourceReport | None = getattr(source, "report", None)
    meta = dict(
        format=PRETOKENIZED_FORMAT, version=PRETOKENIZED_VERSION,
        layout="tokens" if seq_len is None else "blocks",
        shards=[_shard_name(k, num_shards) for k in range(num_shards)],
        counts=total, source_skipped=dict(report.skipped) if report else {}, **config,
    )
    paths.write_text_atomic(out / "metadata.json", json.dumps(meta, indent=1, sort_keys=True))
    return meta


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffujax.data.pretokenize",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="files, directories, globs (tfds: NAME[:SPLIT])")
    p.add_argument("--tokenizer", required=True, help="checkpoint/HF dir or tokenizer file")
    p.add_argument("--out", required=True)
    p.add_argument("--shards", type=int, required=True)
    layout = p.add_mutually_exclusive_group(required=True)
    layout.add_argument("--seq-len", type=int, help="write packed blocks of this many tokens")
    layout.add_argument("--docs", action="store_true", help="write one record per document")
    p.add_argument("--format", default="auto", choices=("auto",) + FORMATS[:-1])
    p.add_argument("--field", default="text", help="jsonl/parquet/array_record/tfds text field")
    p.add_argument("--mode", default="file", choices=("file", "paragraph", "lines"),
                   help="text files: one document per file, paragraph or line")
    p.add_argument("--errors", default="strict", choices=("strict", "skip"))
    p.add_argument("--split", default="train", help="tfds split")
    p.add_argument("--data-dir", help="tfds data_dir")
    p.add_argument("--add-bos", action="store_true")
    p.add_argument("--model-vocab-size", type=int)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--debug", action="store_true", help="debug log records, tracebacks on errors")
    args = p.parse_args(argv)
    console.setup_logging(debug=args.debug)
    try:
        check_arguments(num_shards=args.shards, seq_len=args.seq_len, workers=args.workers,
                        model_vocab_size=args.model_vocab_size)
        prepare_output(args.out)
        source = make_source(args.format, args.inputs, field=args.field, mode=args.mode,
                             errors=args.errors, split=args.split, data_dir=args.data_dir)
        tok = load_tokenizer(args.tokenizer)
        meta = pretokenize(source, tok, args.out, num_shards=args.shards, seq_len=args.seq_len,
                           add_bos=args.add_bos, model_vocab_size=args.model_vocab_size,
                           workers=args.workers)
    except (DataError, OSError, ValueError) as e:  # OSError: a full disk, a failing bucket
        console.error_line(e)
        return 1
    print(json.dumps({"out": args.out, "layout": meta["layout"], **meta["counts"],
                      "source_skipped": meta["source_skipped"]}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The training run's data: the pipelines of ``data.sources`` and ``data.eval_sources``.

The config has validated and defaulted every source and pipeline option when it loaded
(``RunConfig.source_specs`` / ``pipeline_options``); this module only builds them."""

from __future__ import annotations

import os

import grain
import jax

from diffujax import paths
from diffujax.data.pipeline import PipelineOptions, build_pipeline
from diffujax.data.sources import make_source


def build_data(cfg, tokenizer, model_cfg, *, eval_split: bool = False, shard=None):
    """``(pipeline, sources)``: the process-local pipeline of ``data.sources`` (or, with
    ``eval_split``, of ``data.eval_sources``: one pass, in order; ``(None, [])`` if none).
    ``shard``: this process's ``(index, count)`` block of the global batch
    (``Layout.data_shard``)."""
    specs = cfg.source_specs(eval_split)
    if not specs:
        if eval_split:
            return None, []
        raise ValueError("data.sources is empty: name at least one training source")
    options = PipelineOptions(**cfg.pipeline_options(eval_split))
    if not eval_split and options.num_epochs is not None and jax.process_count() > 1:
        # Hosts would run out of data at different steps and wait for each other forever.
        raise ValueError("data.num_epochs must be unset (endless data, stop by train.steps) when"
                         " training on more than one process")
    pairs = [(make_source(s["format"], s["path"], field=s["field"], mode=s["mode"],
                          errors=s["errors"], split=s["split"], data_dir=s["data_dir"]),
              float(s["weight"])) for s in specs]
    shard_options = None if shard is None else grain.sharding.ShardOptions(*shard)
    pipeline = build_pipeline(pairs if len(pairs) > 1 else pairs[0][0], tokenizer, options,
                              shard=shard_options, model_vocab_size=model_cfg.vocab_size)
    return pipeline, [s for s, _ in pairs]


def source_reports(sources) -> list[str]:
    """One line per source that skipped records (``errors: skip``)."""
    return [s.report.summary() for s in sources if getattr(s, "report", None) is not None]


# -- what a checkpoint's data-iterator state refers to -------------------------------------------


def _files_of(source) -> list[str]:
    if hasattr(source, "paths"):  # text, jsonl, parquet, array_record, arrow
        return list(source.paths)
    if hasattr(source, "directory"):  # pretokenized: its metadata and shards
        meta = source.directory / "metadata.json"
        return [os.fspath(meta)] + [os.fspath(source.directory / s) for s in source.meta["shards"]]
    return []  # tfds: read through its own reader; its size stands for it


def data_identity(sources) -> list[dict]:
    """What the training stream is made of, as a checkpoint records it: per source its name,
    number of documents and files, each file with its ``paths.fingerprint`` (size and
    modification time, or the object's generation in a bucket)."""
    out = []
    for source in sources:
        files = {}
        for name in _files_of(source):
            files[name] = paths.fingerprint(name).rsplit("|", 2)[-2:]
        out.append({"name": getattr(getattr(source, "report", None), "name", repr(source)),
                    "documents": len(source), "files": files})
    return out


def _listed(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def data_changes(old: list[dict] | None, new: list[dict]) -> list[str]:
    """How the training data differs from what a checkpoint recorded (``data_identity``), one
    item per kind of change; empty when it is the same (or the checkpoint recorded nothing)."""
    if old is None:
        return []
    if len(old) != len(new):
        return [f"{len(old)} sources then, {len(new)} now"]
    changes = []
    for i, (a, b) in enumerate(zip(old, new)):
        where = f"source {i} ({b['name']})"
        added = [f for f in b["files"] if f not in a["files"]]
        removed = [f for f in a["files"] if f not in b["files"]]
        modified = [f for f in b["files"] if f in a["files"] and
                    list(a["files"][f]) != list(b["files"][f])]
        for what, names in (("files added", added), ("files removed", removed),
                            ("files modified", modified)):
            if names:
                changes.append(f"{where}: {len(names)} {what}: {_listed(names)}")
        if a["documents"] != b["documents"]:
            changes.append(f"{where}: {a['documents']} documents then, {b['documents']} now")
    return changes

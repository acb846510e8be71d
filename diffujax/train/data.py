"""The training run's data: the pipelines of ``data.sources`` and ``data.eval_sources``.

The config has validated and defaulted every source and pipeline option when it loaded
(``RunConfig.source_specs`` / ``pipeline_options``); this module only builds them."""

from __future__ import annotations

import grain
import jax

from diffujax.data.pipeline import PipelineOptions, build_pipeline
from diffujax.data.sources import make_source


def build_data(cfg, tokenizer, model_cfg, *, eval_split: bool = False, shard=None):
    """``(pipeline, sources)``: the process-local pipeline of ``data.sources`` (or, with
    ``eval_split``, of ``data.eval_sources``: one pass, in order; ``(None, [])`` if none).
    ``shard``: this process's ``(index, count)`` block of the global batch (``data_shard``)."""
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

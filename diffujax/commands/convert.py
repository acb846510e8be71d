"""``diffujax {convert,export,default-model}`` and ``tools/convert_torch_weights.py``: the
command-line faces of the checkpoint package (and of training checkpoints, which ``export`` also
takes). Each ``run_*`` returns the process exit code and prints a ``CheckpointError`` as one line
on stderr (exit code 1)."""

from __future__ import annotations

from diffujax import console
from diffujax.checkpoint import convert, export, hub, smollm2
from diffujax.checkpoint.errors import CheckpointError
from diffujax.train.export import export_adapter, export_hf, is_training_checkpoint


def _report(fn) -> int:
    try:
        print(fn())
    except CheckpointError as e:
        console.error_line(e)  # one line (--debug: with the traceback)
        return 1
    return 0


def convert_from_args(args):
    """The work of ``diffujax convert``: the checkpoint directory written."""
    src = hub.hub_snapshot(args.src) if hub.is_hub_id(args.src) else args.src
    return convert(src, args.dst, dtype=args.dtype, mask_token_id=args.mask_token_id,
                   no_mask_token=args.no_mask_token, overwrite=args.overwrite)


def run_convert(args) -> int:
    return _report(lambda: convert_from_args(args))


def run_export(args) -> int:
    """Export a model checkpoint, or a training run / training step (its model weights, a LoRA
    run's merged; with ``--adapter`` its adapters, for peft)."""
    if args.adapter:
        if not is_training_checkpoint(args.src):
            console.error_line(CheckpointError(f"--adapter: {args.src} is not a training run (a"
                                               " model checkpoint holds merged weights)"))
            return 1
        return _report(lambda: export_adapter(args.src, args.dst, overwrite=args.overwrite))
    exporter = export_hf if is_training_checkpoint(args.src) else export
    return _report(lambda: exporter(args.src, args.dst, max_shard_size=args.max_shard_size,
                                    dtype=args.dtype, overwrite=args.overwrite,
                                    naming=getattr(args, "names", None)))


def run_default_model(args) -> int:
    return _report(lambda: smollm2.default_model(args.cache_dir))



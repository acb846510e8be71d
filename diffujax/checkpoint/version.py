"""The checkpoint format version: one integer shared by diffujax model checkpoints (the
"diffujax" section of ``config.json``, ``checkpoint.store``) and training checkpoints (each
step's ``meta``, ``train.checkpointing``), checked once when a checkpoint is opened, before any
array is read. A diffujax reads exactly one format: nothing older is translated.

Bump it when what either kind writes changes in a way the reader depends on, including a run
config key added (a step's config record carries every key; one recorded without the new key
would read as "changed on resume"). Version 1 is everything written before the version was
checked: model checkpoints that said 1, training checkpoints that said nothing. Version 3 lays
the parameters out as the Flax NNX module tree (``"layers/attn/q_proj/kernel"`` where version
2 had ``"layers/wq"``).
"""

from __future__ import annotations

from diffujax.checkpoint.errors import CheckpointError

FORMAT_VERSION = 3
KEY = "format"  # its name in both records

# What to do with a checkpoint of an older format, by kind.
OLDER_REMEDY = {
    "model": "convert the model again from its Hugging Face source (diffujax convert), or export"
             " it to Hugging Face with the diffujax that wrote it and convert that",
    "training": "export its weights with the diffujax that wrote it (diffujax export) and start"
                " a new output_dir from them (model.checkpoint=...)",
}


class FormatVersionError(CheckpointError):
    """A checkpoint of another format version: no other step or file of it will read either."""


def stamp(record: dict) -> dict:
    """``record`` with this diffujax's format version."""
    return {KEY: FORMAT_VERSION, **record}


def check_version(record: dict, path, kind: str) -> None:
    """Raise ``FormatVersionError`` (one line naming ``path`` and both versions) unless
    ``record`` (a model checkpoint's "diffujax" section or a training step's meta, ``kind``
    "model" or "training") was written in ``FORMAT_VERSION``."""
    version = record.get(KEY, 1)
    if version == FORMAT_VERSION and not isinstance(version, bool):
        return
    newer = isinstance(version, int) and not isinstance(version, bool) \
        and version > FORMAT_VERSION
    todo = (f"read it with a diffujax that reads format {version}" if newer
            else OLDER_REMEDY[kind])
    raise FormatVersionError(f"{path}: written by diffujax checkpoint format {version!r}"
                             f" (this diffujax reads format {FORMAT_VERSION}); {todo}")

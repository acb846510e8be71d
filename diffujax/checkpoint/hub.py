"""A Hugging Face Hub model id as the source of ``diffujax convert``: ``org/name`` (optionally
``org/name@revision``) is fetched through ``huggingface_hub`` into its cache (``HF_HOME``,
``HF_HUB_CACHE``) and converted from there. With ``HF_HUB_OFFLINE=1`` only the cache is read,
so a model fetched once converts again without a network."""

from __future__ import annotations

import logging
import os
import re

from diffujax import paths
from diffujax.checkpoint.errors import CheckpointError

log = logging.getLogger(__name__)

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?")
# What convert reads: config, tokenizer files, weights (top level only: not onnx/, runs/ ...).
_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def is_hub_id(src) -> bool:
    """``org/name[@revision]`` that is no local path (an existing directory wins) or URL."""
    text = os.fspath(src)
    return bool(_HUB_ID.fullmatch(text)) and not os.path.exists(text) and "://" not in text


def hub_snapshot(hub_id: str) -> str:
    """The local directory of the model's snapshot in the Hugging Face cache, fetched first
    unless offline. Errors are one line naming the id."""
    try:
        import huggingface_hub  # deferred: only Hub ids need it
        from huggingface_hub import errors
    except ImportError:
        raise CheckpointError(f"{hub_id}: a Hugging Face Hub id needs huggingface_hub"
                              " (pip install huggingface_hub), or give a local directory") from None
    repo_id, _, revision = hub_id.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id, revision=revision or None, local_files_only=offline, ignore_patterns=["*/*"],
            allow_patterns=_FILES + _torch_weights(huggingface_hub, repo_id, revision, offline))
    except errors.LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise CheckpointError(f"{hub_id}: not in the Hugging Face cache"
                              f" ({huggingface_hub.constants.HF_HUB_CACHE}) and {where}: fetch it"
                              " once online, or give a local directory") from None
    except (errors.RepositoryNotFoundError, errors.RevisionNotFoundError) as e:
        raise CheckpointError(f"{hub_id}: no such model or revision on the Hugging Face Hub"
                              f" ({type(e).__name__}); a local directory must exist") from None
    except (errors.HfHubHTTPError, OSError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{hub_id}: fetching from the Hugging Face Hub failed: {reason}"
                              ) from None
    log.info("%s: the Hugging Face cache's snapshot %s", hub_id, folder)
    return os.fspath(paths.resolve(folder))


def _torch_weights(huggingface_hub, repo_id: str, revision: str, offline: bool) -> list[str]:
    """``pytorch_model*.bin`` too, unless the model has safetensors (then they are all it needs).
    Offline, or when the listing fails, the cache holds what it holds."""
    if not offline:
        try:
            files = huggingface_hub.list_repo_files(repo_id, revision=revision or None)
        except Exception:  # unreachable or unknown: snapshot_download says which, or uses the cache
            files = []
        if any(f.endswith(".safetensors") and "/" not in f for f in files):
            return []
    return ["pytorch_model*.bin"]

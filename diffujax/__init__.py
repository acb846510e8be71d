"""diffujax: autoregressive language models turned into diffusion language models, in JAX.

The Python API (``diffujax/api.py``; the README's "Python API" section)::

    import diffujax
    model, tokenizer = diffujax.load("runs/tiny/final")     # an nnx.Module and its tokenizer
    texts = diffujax.generate(model, tokenizer, "Once upon a time", length=32)
    metrics = diffujax.evaluate(model, tokenizer, "held_out.txt", seq_len=128)
    diffujax.convert("hf_model_dir", "checkpoint_dir")

``import diffujax`` itself imports nothing heavy: the four names load ``diffujax.api`` (and with
it jax and flax) on first use (a module ``__getattr__``, PEP 562). No submodule of the package
bears one of these names, so importing the package's modules never hides them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors only: importing them here would load jax
    from diffujax.api import convert, evaluate, generate, load

__all__ = ["load", "generate", "evaluate", "convert"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("diffujax.api"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

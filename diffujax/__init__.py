"""diffujax: autoregressive language models turned into diffusion language models, in JAX.

The Python API (``diffujax/api.py``; the README's "Python API" section)::

    import diffujax
    model, tokenizer = diffujax.load("runs/tiny/final")     # an nnx.Module and its tokenizer
    texts = diffujax.generate(model, tokenizer, "Once upon a time", length=32)
    metrics = diffujax.evaluate(model, tokenizer, "held_out.txt", seq_len=128)
    diffujax.convert("hf_model_dir", "checkpoint_dir")

``import diffujax`` itself imports nothing heavy: the four names load ``diffujax.api`` (and with
it jax and flax) on first use. ``diffujax.generate``, ``diffujax.evaluate`` and
``diffujax.convert`` are always these functions, even once the command modules of the same names
are imported; reach those modules with ``from diffujax.generate import ...`` or
``importlib.import_module("diffujax.generate")``.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # for type checkers and editors only: importing them here would load jax
    from diffujax.api import convert, evaluate, generate, load

API = ("load", "generate", "evaluate", "convert")
__all__ = list(API)


def _api_function(name: str) -> property:
    """A property of the package that is ``diffujax.api.<name>``. It takes precedence over the
    attribute the import system sets on the package when the submodule ``diffujax.<name>`` is
    imported (kept aside by the setter, unused)."""

    def get(package):
        return getattr(importlib.import_module("diffujax.api"), name)

    def set_(package, value):
        package.__dict__[name] = value

    return property(get, set_, doc=f"diffujax.api.{name}")


class _Package(types.ModuleType):
    """The ``diffujax`` module's class: its public functions as lazy properties."""

    load = _api_function("load")
    generate = _api_function("generate")
    evaluate = _api_function("evaluate")
    convert = _api_function("convert")

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(API))


sys.modules[__name__].__class__ = _Package

"""The Python API: what the commands do, as functions that return values.

    import diffujax
    model, tokenizer = diffujax.load("runs/tiny")           # nnx.Module (model.config) + tokenizer
    texts = diffujax.generate(model, tokenizer, "w1 w2", length=16, seed=1)   # one per sample
    metrics = diffujax.evaluate(model, tokenizer, "held_out.txt", seq_len=64)  # eval --json's dict
    diffujax.convert("hf_model_dir", "checkpoint_dir", dtype="bfloat16")

Options are the command's own, spelled as Python names (``--seq-len`` is ``seq_len=``,
``--keep-after-eos`` is ``keep_after_eos=True``), with its defaults. They go through the
command's argument parser and then its checks (``check_generate_args``, ``check_fits``,
``check_eval_args``), so a bad value is refused with the command's own one-line message
(a ``ValueError``); an option the function does not take is a ``TypeError`` naming it.

The model runs on one device (the first): for a mesh over several devices or hosts use the
commands (``--mesh``). Each ``generate`` / ``evaluate`` call compiles its program afresh, as one
run of the command does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import shutil
import tempfile
import weakref

from flax import nnx

from diffujax import arguments, paths
from diffujax.checkpoint import hub
from diffujax.checkpoint.convert import convert as convert_checkpoint
from diffujax.checkpoint.errors import CheckpointError
from diffujax.checkpoint.tokenizer_files import copy_tokenizer_files
from diffujax.commands.convert import convert_from_args
from diffujax.commands.evaluate import check_eval_args, metrics, score
from diffujax.commands.generate import check_fits, check_generate_args, generate_texts
from diffujax.data.tokenizer import Tokenizer, load_tokenizer
from diffujax.models import ModelConfig, apply_fn_for, merge
from diffujax.parallel.tpu_env import quiet_libtpu_without_tpu
from diffujax.runtime import LoadedModel, load_for_inference
from diffujax.train.export import export_step, is_training_checkpoint

# Before anything starts JAX, as the command line does: no libtpu error on a machine without a TPU.
quiet_libtpu_without_tpu()

# Options of generate and eval that the functions do not take, and why (said when refused).
NOT_OPTIONS = {
    "checkpoint": "pass the model that diffujax.load returned",
    "dtype": "give it to diffujax.load",
    "json": "the values are returned",
    "mesh": "the model runs on the device that holds its arrays",
    "distributed": "the model runs on the device that holds its arrays",
}


# -- loading ------------------------------------------------------------------------------------


def load(path, *, dtype: str | None = None) -> tuple[nnx.Module, Tokenizer]:
    """``model, tokenizer = load(path)``: the model as an ``nnx.Module`` holding its weights
    (``model.config`` is its ``ModelConfig``; ``model(tokens, pattern)`` gives logits) and its
    tokenizer (``encode`` / ``decode``), on the first device.

    ``path``: a diffujax model checkpoint; a training run directory, its ``checkpoints`` folder
    or one ``checkpoints/STEP`` (the newest usable step, as ``diffujax export RUN_DIR`` takes;
    a run without step checkpoints: its ``final/``); or a Hugging Face model directory or Hub id
    (converted as ``diffujax convert`` does with its defaults, which adds a mask token when the
    model has none: use ``convert`` first for other choices). Everything but a model checkpoint
    passes through a temporary checkpoint, removed once loaded. ``dtype``: "float32" or
    "bfloat16" (default: the checkpoint's), as ``--dtype``."""
    if dtype is not None and dtype not in arguments.DTYPES:
        raise ValueError(f"dtype {dtype!r}: must be one of {', '.join(arguments.DTYPES)}")
    with _as_checkpoint(path) as (checkpoint, temporary):
        loaded = load_for_inference(os.fspath(checkpoint), dtype=dtype)
        tokenizer = _lasting_tokenizer(checkpoint) if temporary else loaded.tokenizer
    return merge(loaded.config, loaded.params), tokenizer


def _is_model_checkpoint(path) -> bool:
    """A diffujax model checkpoint (complete or not: loading names what is wrong) rather than a
    Hugging Face directory: its config.json has a "diffujax" section."""
    try:
        return "diffujax" in json.loads((paths.resolve(path) / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


@contextlib.contextmanager
def _as_checkpoint(path):
    """``(diffujax model checkpoint holding the model at path, whether it is temporary)``."""
    source = paths.resolve(path)
    if _is_model_checkpoint(source):
        yield source, False
    elif (source / "config.json").is_file() or hub.is_hub_id(path):
        with tempfile.TemporaryDirectory(prefix="diffujax-load-") as tmp:
            src = hub.hub_snapshot(os.fspath(path)) if hub.is_hub_id(path) else source
            yield convert_checkpoint(src, pathlib.Path(tmp) / "model"), True
    elif is_training_checkpoint(source):
        with tempfile.TemporaryDirectory(prefix="diffujax-load-") as tmp:
            yield export_step(source, None, pathlib.Path(tmp) / "model"), True
    elif _is_model_checkpoint(source / "final"):
        yield source / "final", False
    elif not source.exists():
        raise CheckpointError(f"{source}: not found")
    else:
        raise CheckpointError(f"{source}: not a diffujax model checkpoint, a training run or a"
                              " Hugging Face model directory (no config.json, no checkpoints/"
                              " STEP, no final/)")


def _lasting_tokenizer(checkpoint) -> Tokenizer:
    """The tokenizer of a temporary checkpoint, from a copy of its files that lives as long as
    the tokenizer does (it loads them again in any process it is sent to)."""
    directory = tempfile.mkdtemp(prefix="diffujax-tokenizer-")
    copy_tokenizer_files(checkpoint, directory)
    paths.copy_file(paths.resolve(checkpoint) / "config.json",
                    paths.resolve(directory) / "config.json")  # special ids it may name
    tokenizer = load_tokenizer(directory)
    weakref.finalize(tokenizer, shutil.rmtree, directory, ignore_errors=True)
    return tokenizer


def _loaded(model, tokenizer, function: str) -> LoadedModel:
    """The model and tokenizer in the form the commands' code runs."""
    config = getattr(model, "config", None)
    if not isinstance(model, nnx.Module) or not isinstance(config, ModelConfig):
        raise TypeError(f"diffujax.{function}: model must be the nnx.Module diffujax.load"
                        f" returns (with its ModelConfig as .config), not {type(model).__name__}")
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"diffujax.{function}: tokenizer must be the one diffujax.load returns,"
                        f" not {type(tokenizer).__name__}")
    tokenizer.check_model_vocab(config.vocab_size)
    return LoadedModel(config, apply_fn_for(config), nnx.to_pure_dict(nnx.state(model)),
                       tokenizer)


# -- options ------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """The command's parser, raising its message instead of printing it and exiting."""

    def error(self, message):
        raise ValueError(message)


def _command_arguments(function: str, command: str, add_args, options: dict, *,
                       fixed: dict | None = None, refused: dict | None = None,
                       positional: tuple = ()) -> argparse.Namespace:
    """``diffujax COMMAND``'s arguments from the keyword ``options`` of ``diffujax.FUNCTION``,
    parsed by the command's own parser (``add_args``: types, choices, exclusive options: its
    messages).
    ``fixed``: options the function sets from its own arguments; ``refused``: options of the
    command the function does not take, and why; ``positional``: the command's positional
    arguments."""
    parser = _Parser(prog=f"diffujax {command}", add_help=False)
    add_args(parser)
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    fixed, refused = fixed or {}, refused or {}
    taken = sorted(set(actions) - set(refused) - set(fixed))
    function = f"diffujax.{function}"
    for name in options:
        if name in refused or name in fixed:
            why = refused.get(name, "it is an argument of its own")
            raise TypeError(f"{function}: {name} is not an option here ({why})")
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise TypeError(f"{function}: unknown option{'s' * (len(unknown) > 1)}"
                        f" {', '.join(unknown)} (the options: {', '.join(taken)})")
    argv = []
    for name, value in {**options, **fixed}.items():
        action = actions[name]
        if action.nargs == 0:  # a flag: True or False
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r}: must be True or False")
            argv += [action.option_strings[-1]] if value else []
        elif value is not None:
            argv.append(f"{action.option_strings[-1]}={value}")
        elif action.default is not None:  # None stands for a default of None only
            raise ValueError(f"{name}=None: give a value (default: {action.default!r})")
    for action in actions.values():
        action.required = False  # --checkpoint: the model is given instead
    if positional:  # after "--": a path that starts with "-" is no option
        argv += ["--", *map(os.fspath, positional)]
    return parser.parse_args(argv)


# -- the commands -------------------------------------------------------------------------------


def generate(model: nnx.Module, tokenizer: Tokenizer, prompt: str = "", **options) -> list[str]:
    """``diffujax generate`` on a loaded model: one text per sample (``num_samples``), each the
    prompt, the generated span and the ``suffix`` (if given), as the command prints them.

    ``options``: the command's (``length``, ``sampler``, ``steps``, ``seed``, ``temperature``,
    ``suffix``, ``num_samples``, ...; ``diffujax generate --help``), with its defaults."""
    loaded = _loaded(model, tokenizer, "generate")
    args = _command_arguments("generate", "generate", arguments.add_generate_args, options,
                              fixed={"prompt": prompt}, refused=NOT_OPTIONS)
    check_generate_args(args, loaded.config)
    check_fits(args, loaded.config, tokenizer)
    return generate_texts(args, loaded)["texts"]


def evaluate(model: nnx.Module, tokenizer: Tokenizer, text_file, **options) -> dict:
    """``diffujax eval`` on a loaded model: the perplexity of the UTF-8 text file (or URL)
    ``text_file`` as the dict ``diffujax eval --json`` prints: ``nelbo`` (nats per token; the
    AR NLL with ``objective="ar"``), ``stderr``, ``perplexity``, ``tokens``, ``draws``,
    ``block_size``.

    ``options``: the command's (``objective``, ``seq_len``, ``blocks``, ``draws``,
    ``batch_size``, ``block_size``, ``seed``; ``diffujax eval --help``), with its defaults."""
    loaded = _loaded(model, tokenizer, "evaluate")
    args = _command_arguments("evaluate", "eval", arguments.add_eval_args, options,
                              fixed={"text": os.fspath(text_file)}, refused=NOT_OPTIONS)
    check_eval_args(args, loaded.config)
    return metrics(args, score(args, loaded))


def convert(src, dst, **options):
    """``diffujax convert``: the Hugging Face model directory (or Hub id) ``src`` as the diffujax
    model checkpoint ``dst``; returns its path. ``options``: ``dtype``, ``mask_token_id``,
    ``no_mask_token``, ``overwrite`` (``diffujax convert --help``)."""
    return convert_from_args(_command_arguments("convert", "convert", arguments.add_convert_args,
                                                options, positional=(src, dst)))

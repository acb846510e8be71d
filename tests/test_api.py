"""The Python API (``diffujax/api.py``) against the commands it stands for: ``diffujax.load`` of
each kind of directory gives the weights the commands load, ``generate`` / ``evaluate`` return
what ``diffujax generate --json`` / ``diffujax eval --json`` print for the same options, bad
options are refused with the commands' own messages, ``convert`` writes what ``diffujax convert``
writes, ``import diffujax`` imports nothing heavy, and the README's example runs.

The model: a tiny LLaMA made by ``transformers`` with a word-level tokenizer that has no mask
token (so converting it adds one, to the embedding and to the tokenizer files)."""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers

import diffujax
from diffujax import api
from diffujax.attention import causal
from diffujax.checkpoint import store
from diffujax.checkpoint.errors import CheckpointError
from diffujax.cli import main as cli
from diffujax.data.tokenizer import load_tokenizer
from diffujax.models import forward
from diffujax.train import checkpointing as C

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = 62  # w0..w61, then <unk> 62, <eos> 63
HEAVY = ("jax", "jaxlib", "flax", "orbax", "torch", "tensorflow", "libtpu", "transformers")


def write_tokenizer(directory: pathlib.Path) -> None:
    vocab = {f"w{i}": i for i in range(WORDS)} | {"<unk>": WORDS, "<eos>": WORDS + 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>", "unk_token": "<unk>"}))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny LLaMA saved by transformers, with its tokenizer."""
    directory = tmp_path_factory.mktemp("api") / "hf_model_dir"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=WORDS + 2, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=WORDS + 1, eos_token_id=WORDS + 1, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # peaked logits: greedy choices are no near-ties
        for p in model.parameters():
            p.mul_(8.0)
    model.save_pretrained(directory)
    write_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def ckpt(hf_dir):
    """The model converted by the command (``diffujax convert``)."""
    out = hf_dir.parent / "ckpt"
    assert cli(["convert", str(hf_dir), str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def loaded(ckpt):
    return diffujax.load(ckpt)


def text_file(directory: pathlib.Path, words: int = 200) -> pathlib.Path:
    rng = np.random.default_rng(0)
    path = directory / "held_out.txt"
    path.write_text(" ".join(f"w{i}" for i in rng.integers(0, WORDS, words)))
    return path


def params_of(model) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))


def assert_same_params(a, b):
    la, ta = jax.tree.flatten(a)
    lb, tb = jax.tree.flatten(b)
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y)


# -- import ---------------------------------------------------------------------------------------


PROBE = """
import json, sys
import diffujax
before = sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})
model, tokenizer = diffujax.load(sys.argv[1])
after = sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r})
texts = diffujax.generate(model, tokenizer, "w1", length=2, steps=2)
print(json.dumps([before, after, type(model).__name__, len(texts)]))
"""


@pytest.mark.integration  # a fresh interpreter
def test_import_diffujax_imports_no_heavy_library_until_the_api_is_used(ckpt, tmp_path):
    """As a new user's shell has it: no TPU variables, libtpu's errors not filtered out (its
    one-process lock skipped: another process here may hold it)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TPU_") and k not in ("TF_CPP_MIN_LOG_LEVEL", "JAX_PLATFORMS")}
    env.update(PYTHONPATH=str(REPO), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    run = subprocess.run([sys.executable, "-c", PROBE.format(heavy=set(HEAVY)), str(ckpt)],
                         capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    before, after, model, samples = json.loads(run.stdout.strip().splitlines()[-1])
    assert before == [], f"import diffujax imported {before[:8]}"
    assert {"jax", "flax"} <= set(after) and model == "Llama" and samples == 1
    # libtpu (when installed) says nothing about the TPU this machine does not have.
    noise = [line for line in run.stderr.splitlines()
             if line.startswith("E0000") or "INVALID_ARGUMENT" in line or "TPU_" in line]
    assert noise == [], run.stderr


def test_the_api_names_are_the_functions_even_once_the_commands_are_imported():
    import importlib

    for command in ("generate", "evaluate", "convert"):
        importlib.import_module(f"diffujax.commands.{command}")
    package = pathlib.Path(diffujax.__file__).parent
    for name in diffujax.__all__:
        # No submodule of the name: its import would set the package attribute over the function.
        assert not (package / f"{name}.py").exists() and not (package / name).exists()
        assert getattr(diffujax, name) is getattr(api, name)
    assert set(diffujax.__all__) <= set(dir(diffujax))
    with pytest.raises(AttributeError, match="no attribute 'generat'"):
        diffujax.generat


# -- load -----------------------------------------------------------------------------------------


def logits_of(model, params, length=6):
    tokens = jnp.arange(1, length + 1, dtype=jnp.int32)[None]
    return np.asarray(model(tokens, causal())), np.asarray(
        forward(model.config, params, tokens, causal()))


def test_load_a_model_checkpoint(loaded, ckpt):
    model, tokenizer = loaded
    config, params = store.load(ckpt)
    assert isinstance(model, nnx.Module) and model.config == config
    assert_same_params(params_of(model), jax.tree.map(np.asarray, params))
    got, want = logits_of(model, params)
    np.testing.assert_array_equal(got, want)
    reference = load_tokenizer(ckpt)
    assert tokenizer.encode("w3 w7 <|mask|> w9") == reference.encode("w3 w7 <|mask|> w9")
    assert tokenizer.vocab_size == reference.vocab_size == WORDS + 3  # the added mask token


def test_load_a_hugging_face_directory_converts_it_as_the_command_does(hf_dir, ckpt, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the temporary ones go
    model, tokenizer = diffujax.load(hf_dir)
    config, params = store.load(ckpt)
    assert model.config == config and config.mask_token_id == WORDS + 2
    assert_same_params(params_of(model), jax.tree.map(np.asarray, params))
    # The tokenizer learnt the mask token, and outlives the temporary checkpoint...
    assert tokenizer.token_to_id("<|mask|>") == WORDS + 2
    assert [p.name.split("-")[1] for p in tmp_path.iterdir()] == ["tokenizer"]
    assert tokenizer.decode(tokenizer.encode("w1 w2")) == "w1 w2"
    del tokenizer  # ... and its files go with it
    gc.collect()
    assert list(tmp_path.iterdir()) == []


HUB_PROBE = """
import json, sys
import numpy as np, jax
from flax import nnx
import diffujax
model, tokenizer = diffujax.load("tiny-org/tiny-llama")
ref, _ = diffujax.load(sys.argv[1])
same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.to_pure_dict(nnx.state(model)),
                    nnx.to_pure_dict(nnx.state(ref)))
print(json.dumps([model.config == ref.config, all(jax.tree.leaves(same)),
                  tokenizer.token_to_id("<|mask|>")]))
"""


@pytest.mark.integration  # a fresh interpreter: huggingface_hub reads HF_HOME on import
def test_load_a_hub_id_offline_from_the_cache(hf_dir, ckpt, tmp_path):
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf_home" / "hub" / "models--tiny-org--tiny-llama"
    shutil.copytree(hf_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    run = subprocess.run([sys.executable, "-c", HUB_PROBE, str(ckpt)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == [True, True, WORDS + 2]


def training_run(root: pathlib.Path, ckpt, steps=(2, 4)):
    """A run directory holding training steps of ``ckpt``'s model: step s has its weights
    times s / max(steps) (the newest: the weights themselves)."""
    config, params = store.load(ckpt)
    saver = C.TrainCheckpointer(root / "checkpoints", save_every=1)
    for step in steps:
        scaled = jax.tree.map(lambda x, s=step: x * (s / max(steps)), params)
        saver.save(step, {"params": scaled, "step": jnp.int32(step)},
                   meta={"model_config": config.to_hf(),
                         "tokenizer_dir": os.fspath(ckpt)})
    saver.close()
    return params


def test_load_a_training_run_takes_its_newest_step(ckpt, tmp_path):
    params = training_run(tmp_path / "run", ckpt)
    for path in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        model, tokenizer = diffujax.load(path)
        assert_same_params(params_of(model), jax.tree.map(np.asarray, params))
        assert tokenizer.token_to_id("<|mask|>") == model.config.mask_token_id
    older, _ = diffujax.load(tmp_path / "run" / "checkpoints" / "2")
    assert_same_params(params_of(older), jax.tree.map(lambda x: np.asarray(x * 0.5), params))


def test_load_a_run_without_steps_takes_its_final_checkpoint(ckpt, loaded, tmp_path):
    store.save(tmp_path / "run" / "final", *store.load(ckpt), tokenizer_from=ckpt)
    model, _ = diffujax.load(tmp_path / "run")
    assert_same_params(params_of(model), params_of(loaded[0]))


def test_load_refuses_what_it_cannot_read_in_one_line(tmp_path, ckpt):
    with pytest.raises(CheckpointError) as error:
        diffujax.load(tmp_path)
    assert str(error.value).startswith(f"{tmp_path}: not a diffujax model checkpoint")
    with pytest.raises(CheckpointError, match=f"^{tmp_path / 'nowhere'}: not found$"):
        diffujax.load(tmp_path / "nowhere")
    shutil.copytree(ckpt, tmp_path / "cut")
    (tmp_path / "cut" / ".complete").unlink()  # an interrupted write: no HF directory either
    with pytest.raises(CheckpointError, match="cut: incomplete or not a diffujax checkpoint"):
        diffujax.load(tmp_path / "cut")
    with pytest.raises(ValueError, match="^dtype 'float64': must be one of float32, bfloat16$"):
        diffujax.load(ckpt, dtype="float64")
    model, _ = diffujax.load(ckpt, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params_of(model))} == {np.dtype(jnp.bfloat16)}


# -- generate and evaluate against the commands ------------------------------------------------


def cli_json(capsys, argv):
    capsys.readouterr()
    assert cli(argv + ["--json", "--mesh", "none"]) == 0  # the API runs on one device too
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


@pytest.mark.parametrize("options", [
    dict(length=8, steps=8),  # the default sampler, greedy
    dict(length=6, steps=3, sampler="ancestral", num_samples=2, seed=3),
    dict(suffix="w5 w6", infill_length=4, sampler="threshold", threshold=0.5),
])
def test_generate_gives_the_commands_texts(loaded, ckpt, capsys, options):
    model, tokenizer = loaded
    texts = diffujax.generate(model, tokenizer, "w1 w2 w3", **options)
    argv = ["generate", "--checkpoint", str(ckpt), "--prompt", "w1 w2 w3"]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    want = cli_json(capsys, argv)["text"]
    assert texts == ([want] if isinstance(want, str) else want)
    assert len(texts) == options.get("num_samples", 1)
    assert all(t.startswith("w1 w2 w3") and t.endswith(options.get("suffix", "")) for t in texts)


@pytest.mark.parametrize("options", [dict(seq_len=16, draws=3, batch_size=4, seed=2),
                                     dict(seq_len=24, objective="ar", blocks=5)])
def test_evaluate_gives_the_commands_metrics(loaded, ckpt, tmp_path, capsys, options):
    model, tokenizer = loaded
    text = text_file(tmp_path)
    metrics = diffujax.evaluate(model, tokenizer, text, **options)
    argv = ["eval", "--checkpoint", str(ckpt), "--text", str(text)]
    for name, value in options.items():
        argv += [f"--{name.replace('_', '-')}", str(value)]
    assert metrics == cli_json(capsys, argv)
    assert metrics["perplexity"] > 1 and metrics["tokens"] > 0


# -- bad options: the commands' messages ----------------------------------------------------------


def cli_error(capsys, argv) -> str:
    """The command's last stderr line, the command having failed."""
    capsys.readouterr()
    try:
        assert cli(argv) != 0
    except SystemExit as e:  # argparse refuses a type or a choice
        assert e.code != 0
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("command, options, argv", [
    ("generate", dict(steps=0), ["--steps", "0"]),
    ("generate", dict(top_p=1.5), ["--top-p", "1.5"]),
    ("generate", dict(sampler="nope"), ["--sampler", "nope"]),
    ("generate", dict(length="many"), ["--length", "many"]),
    ("generate", dict(length=200), ["--length", "200"]),  # beyond the model's 128 positions
    ("generate", dict(infill_length=3), ["--infill-length", "3"]),
    ("generate", dict(sampler="ar", suffix="w1"), ["--sampler", "ar", "--suffix", "w1"]),
    ("eval", dict(seq_len=1), ["--seq-len", "1"]),
    ("eval", dict(seq_len=16, block_size=17), ["--seq-len", "16", "--block-size", "17"]),
    ("eval", dict(objective="elbo"), ["--objective", "elbo"]),
])
def test_bad_options_are_refused_with_the_commands_message(loaded, ckpt, tmp_path, capsys,
                                                           command, options, argv):
    model, tokenizer = loaded
    text = text_file(tmp_path)
    with pytest.raises(ValueError) as error:
        if command == "generate":
            diffujax.generate(model, tokenizer, "w1", **options)
        else:
            diffujax.evaluate(model, tokenizer, text, **options)
    base = (["generate", "--checkpoint", str(ckpt), "--prompt", "w1"] if command == "generate"
            else ["eval", "--checkpoint", str(ckpt), "--text", str(text)])
    assert cli_error(capsys, base + argv) == f"diffujax {command}: error: {error.value}"


def test_options_the_functions_do_not_take_are_named(loaded, tmp_path):
    model, tokenizer = loaded
    with pytest.raises(TypeError, match=r"^diffujax\.generate: unknown options lenght, stpes"
                                        r" \(the options: .*\blength\b.*\)$"):
        diffujax.generate(model, tokenizer, "w1", stpes=3, lenght=4)
    with pytest.raises(TypeError, match=r"^diffujax\.evaluate: json is not an option here"):
        diffujax.evaluate(model, tokenizer, text_file(tmp_path), json=True)
    with pytest.raises(TypeError, match=r"^diffujax\.generate: checkpoint is not an option"):
        diffujax.generate(model, tokenizer, "w1", checkpoint="x")
    with pytest.raises(ValueError, match=r"^keep_after_eos='yes': must be True or False$"):
        diffujax.generate(model, tokenizer, "w1", keep_after_eos="yes")
    with pytest.raises(ValueError, match=r"^steps=None: give a value \(default: 64\)$"):
        diffujax.generate(model, tokenizer, "w1", steps=None)
    with pytest.raises(TypeError, match=r"^diffujax\.generate: model must be the nnx\.Module"):
        diffujax.generate(params_of(model), tokenizer, "w1")


# -- convert --------------------------------------------------------------------------------------


def test_convert_writes_what_the_command_writes(hf_dir, tmp_path, capsys):
    out = diffujax.convert(hf_dir, tmp_path / "api", dtype="bfloat16")
    assert pathlib.Path(out) == tmp_path / "api"
    assert cli(["convert", str(hf_dir), str(tmp_path / "cli"), "--dtype", "bfloat16"]) == 0
    (config_a, params_a), (config_b, params_b) = store.load(out), store.load(tmp_path / "cli")
    assert config_a == config_b and config_a.param_dtype == "bfloat16"
    assert_same_params(jax.tree.map(np.asarray, params_a), jax.tree.map(np.asarray, params_b))
    assert ((tmp_path / "api" / "tokenizer.json").read_text()
            == (tmp_path / "cli" / "tokenizer.json").read_text())
    # Refusals: the command's messages (an existing destination; options that exclude each
    # other, refused by the parser).
    for options, argv in ((dict(), []), (dict(mask_token_id=3, no_mask_token=True),
                                         ["--mask-token-id", "3", "--no-mask-token"])):
        with pytest.raises(ValueError) as error:
            diffujax.convert(hf_dir, tmp_path / "api", **options)
        line = cli_error(capsys, ["convert", str(hf_dir), str(tmp_path / "api"), *argv])
        assert line.endswith(f"error: {error.value}")


# -- the README's example -------------------------------------------------------------------------


def readme_example() -> str:
    section = (REPO / "README.md").read_text().split("\n## Python API\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_runs(hf_dir, tmp_path, monkeypatch):
    """Verbatim, in a directory holding the files it names: the tiny model as
    ``hf_model_dir`` and a text file."""
    code = readme_example()
    lines = [line for line in code.splitlines() if line.strip() and not line.startswith("#")]
    assert len(lines) <= 5, code
    os.symlink(hf_dir, tmp_path / "hf_model_dir")
    text_file(tmp_path)
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    printed = out.getvalue().splitlines()
    assert len(printed) == 2 and printed[0].startswith("The capital of France is")
    assert set(eval(printed[1])) == {"nelbo", "stderr", "perplexity", "tokens", "draws",
                                     "block_size"}
    assert store.load(tmp_path / "ckpt")[0].mask_token_id == WORDS + 2

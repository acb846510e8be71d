"""Shared fixtures of the task-harness tests: a tiny random LLaMA saved as a diffujax
checkpoint with a word-level tokenizer (``w0``..``w60``), and tiny task files in every format
written by the tests themselves."""

from __future__ import annotations

import csv
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # the sibling task_toys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/word_tokenizer.py

from task_toys import EOS, MASK, UNK, V  # noqa: E402
from word_tokenizer import write_word_tokenizer  # noqa: E402


def words(rng, n):
    return " ".join(f"w{i}" for i in rng.integers(0, 60, n))


def write_tokenizer(directory: pathlib.Path) -> None:
    write_word_tokenizer(directory, words=V - 3, unk=UNK, mask=MASK, eos=EOS)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    from diffujax.checkpoint import save
    from diffujax.models import LlamaConfig, init_params

    root = tmp_path_factory.mktemp("tasks_ckpt")
    (root / "tok").mkdir()
    write_tokenizer(root / "tok")
    config = LlamaConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         intermediate_size=64, tie_word_embeddings=False, max_positions=512,
                         mask_token_id=MASK, bos_token_id=EOS, eos_token_id=EOS)
    params = init_params(config, seed=0)
    params = jax.tree.map(lambda x: x * 8.0, params)  # peaked: greedy choices are no near-ties
    save(root / "ckpt", config, params, tokenizer_from=root / "tok")
    return root / "ckpt"


@pytest.fixture(scope="session")
def tiny_model(tiny_ckpt):
    from diffujax.runtime import load_for_inference

    return load_for_inference(str(tiny_ckpt))


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def task_files(tmp_path_factory):
    """``{task: path}``: a few items of every task in its distributed format (word-level text,
    so the tiny tokenizer reads it)."""
    root = tmp_path_factory.mktemp("task_files")
    rng = np.random.default_rng(7)
    files = {}
    lambada = root / "lambada.txt"
    lambada.write_text("\n".join(words(rng, int(rng.integers(4, 12))) for _ in range(6)) + "\n")
    files["lambada"] = lambada
    files["hellaswag"] = _jsonl(root / "hellaswag.jsonl", [
        dict(activity_label=words(rng, 2), ctx_a=words(rng, 5), ctx_b=words(rng, 3),
             endings=[words(rng, int(rng.integers(2, 7))) for _ in range(4)], label=str(i % 4))
        for i in range(5)])
    files["winogrande"] = _jsonl(root / "winogrande.jsonl", [
        dict(sentence=f"{words(rng, 4)} _ {words(rng, 3)}", option1=words(rng, 1),
             option2=words(rng, 2), answer=str(1 + i % 2)) for i in range(5)])
    files["siqa"] = _jsonl(root / "siqa.jsonl", [
        dict(context=words(rng, 6), question=words(rng, 3), answerA=words(rng, 2),
             answerB=words(rng, 3), answerC=words(rng, 1), label=str(1 + i % 3))
        for i in range(5)])
    files["piqa"] = _jsonl(root / "piqa.jsonl", [
        dict(goal=words(rng, 5), sol1=words(rng, 4), sol2=words(rng, 6), label=i % 2)
        for i in range(5)])
    roc = root / "rocstories.csv"
    with open(roc, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
                    "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                    "AnswerRightEnding"])
        for i in range(4):
            w.writerow([f"id{i}"] + [words(rng, int(rng.integers(3, 7))) for _ in range(6)]
                       + [str(1 + i % 2)])
    files["rocstories"] = roc
    files["humaneval"] = _jsonl(root / "humaneval.jsonl", [
        dict(task_id=f"Toy/{i}", entry_point="f", prompt="def f ( x ) :\n",
             canonical_solution="    return x\n", suffix="", test="def check(f):\n    assert f(3) == 3\n")
        for i in range(3)])
    files["gsm8k"] = _jsonl(root / "gsm8k.jsonl", [
        dict(question=words(rng, 8), answer=f"{words(rng, 3)} #### {i + 1}") for i in range(4)])
    return files

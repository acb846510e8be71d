"""Every task end to end (tiny model, both objectives) and the runner's bookkeeping: scores
equal plain implementations on the same items and draws, Lambada counts a hit once, the
ROCStories span is exactly the oracle-length middle, GSM8K answers are parsed, HumanEval
completions are executed, per-item files resume, the CLI prints one JSON line."""

import json

import numpy as np
import pytest
from scipy import special

from diffujax.attention.pattern import causal
from diffujax.tasks import formats
from diffujax.commands.tasks import make_encoder
from diffujax.tasks.encode import ROW_STRIDE, Encoder
from diffujax.tasks.engine import Engine
from diffujax.tasks.runner import TASKS, Settings, TaskRunner, run_task

from task_toys import CharTokenizer, ScriptedEngine, logits_of, plain_reference_score

SEED = 3


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(tiny_model, batch_size=4, seed=SEED)


def runner_for(engine, task, objective="diffusion", **settings):
    encoder = make_encoder(engine.model)
    settings.setdefault("seq_len", 24)
    return TaskRunner(engine, encoder, task, Settings(objective=objective, seed=SEED,
                                                      **settings))


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_runs_end_to_end(engine, task_files, task, objective):
    runner = runner_for(engine, task, objective, num_levels=8)
    result, records = run_task(runner, str(task_files[task]), progress=False)
    items = TASKS[task].load(str(task_files[task]))
    assert result["items"] == len(items) == len(records)
    assert [r["index"] for r in records] == list(range(len(items)))
    assert result["seed"] == SEED and result["objective"] == objective and "draws" in result
    for name, metric in result["metrics"].items():
        values = [r["correct" if name == "accuracy" else name] for r in records]
        scale = 100.0 if name in ("accuracy", "pass@1") else 1.0
        assert metric["value"] == pytest.approx(scale * np.mean(values))
        assert metric["stderr"] == pytest.approx(scale * np.std(values, ddof=1)
                                                 / np.sqrt(len(values)))


def test_a_task_scores_the_same_whatever_ran_before_it(tiny_model, task_files):
    """The reference's Lambada changed the step count and temperature for every later task;
    here each task's records are those it gets on a fresh engine, after other tasks ran on the
    same one (reference: the task alone on a fresh engine)."""
    def records(engine, task):
        return run_task(runner_for(engine, task, num_levels=8), str(task_files[task]),
                        progress=False)[1]

    shared = Engine(tiny_model, batch_size=4, seed=SEED)
    for task in ("rocstories", "lambada", "siqa"):
        after_others = records(shared, task)
        assert after_others == records(Engine(tiny_model, batch_size=4, seed=SEED), task), task


@pytest.mark.parametrize("task", ["hellaswag", "winogrande", "siqa", "piqa"])
def test_multiple_choice_scores_equal_plain_implementations(engine, tiny_model, task_files,
                                                            task):
    encoder = make_encoder(tiny_model)
    items = TASKS[task].load(str(task_files[task]))
    for objective in ("diffusion", "ar"):
        runner = runner_for(engine, task, objective, num_levels=8)
        _, records = run_task(runner, str(task_files[task]), progress=False)
        for index, (item, record) in enumerate(zip(items, records)):
            rows = encoder.choice_rows(index, item)
            # the row: BOS + prefix + the continuation, each piece encoded on its own
            context = [encoder.lead[0]] + list(tiny_model.tokenizer.encode(item.prefix))
            assert list(rows[0].tokens[:len(context)]) == context
            if objective == "diffusion":
                plain = [plain_reference_score(tiny_model, r, seed=SEED, levels=8) for r in rows]
                pred = int(np.argmin(plain))
            else:
                plain = []
                for r in rows:
                    logp = special.log_softmax(logits_of(tiny_model, r.tokens, causal()), -1)
                    span = [j for j, f in enumerate(r.fixed) if not f]
                    total = sum(logp[j - 1, r.tokens[j]] for j in span)
                    plain.append(total / len(span) if TASKS[task].ar_reduce == "mean" else total)
                pred = int(np.argmax(plain))
            np.testing.assert_allclose(record["scores"], plain, rtol=2e-5, atol=1e-5)
            assert record["pred"] == pred and record["correct"] == float(pred == item.gold)


def char_runner(task, answers, **settings):
    engine = ScriptedEngine(answers)
    encoder = Encoder(CharTokenizer(), mask_token_id=0, bos_id=1, eos_id=1, pad_id=1)
    return TaskRunner(engine, encoder, task, Settings(**settings)), engine


def chars(text):
    return CharTokenizer().encode(text)


def test_lambada_counts_each_hit_once(tmp_path):
    # the same passage twice, the target word also inside the passage
    path = tmp_path / "lambada.txt"
    path.write_text("the dog saw the dog\nthe dog saw the dog\na cat sat on a mat\n")
    answers = {0: chars("dog"), ROW_STRIDE: chars("dog"), 2 * ROW_STRIDE: chars("hat")}
    runner, engine = char_runner("lambada", answers)
    result, records = run_task(runner, str(path), progress=False)
    assert [r["correct"] for r in records] == [1.0, 1.0, 0.0]
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(200 / 3)
    # T = the word's token count, the span right after BOS + prefix
    row = engine.seen[0]
    assert row.tokens[:1 + len("the dog saw the")] == (1, *chars("the dog saw the"))
    assert sum(not f for f in row.fixed) == len(chars(" dog"))


def test_rocstories_span_is_exactly_the_oracle_length_middle(task_files, tiny_model):
    encoder = make_encoder(tiny_model)
    items = formats.rocstories(str(task_files["rocstories"]))
    for index, item in enumerate(items):
        row = encoder.infill_row(index, item)
        prefix = [encoder.lead[0]] + tiny_model.tokenizer.encode(item.prefix)
        middle = tiny_model.tokenizer.encode(item.middle)
        suffix = tiny_model.tokenizer.encode(item.suffix)
        assert row.tokens[:len(prefix)] == tuple(prefix)
        assert row.tokens[len(prefix) + len(middle):] == tuple(suffix)
        assert row.fixed == (True,) * len(prefix) + (False,) * len(middle) + (True,) * len(suffix)
    # and the runner scores the decoded span against the middle sentence
    runner, _ = char_runner("rocstories", {i * ROW_STRIDE: chars(item.middle)
                                           for i, item in enumerate(items)})
    result, records = run_task(runner, str(task_files["rocstories"]), progress=False)
    assert all(r["prediction"] == r["reference"] == item.middle
               for r, item in zip(records, items))
    assert result["metrics"]["rougeL"]["value"] == pytest.approx(100.0)


def test_gsm8k_generated_answers_are_parsed(tmp_path):
    path = tmp_path / "gsm.jsonl"
    path.write_text("".join(json.dumps(dict(question=f"q{i}", answer=f"x #### {g}")) + "\n"
                            for i, g in enumerate(["18", "1200", "7"])))
    answers = {0: chars("so 9*2 #### 18") + [1, 1, 1],  # EOS then padding: cut
               ROW_STRIDE: chars("#### 1,200 dollars"), 2 * ROW_STRIDE: chars("it is 7")}
    runner, engine = char_runner("gsm8k", answers, seq_len=40)
    result, records = run_task(runner, str(path), progress=False)
    assert [r["parsed"] for r in records] == ["18", "1200", None]
    assert [r["correct"] for r in records] == [1.0, 1.0, 0.0]
    assert all(len(r.tokens) == 40 for r in engine.seen)  # the SFT canvas of --seq-len
    runner, _ = char_runner("gsm8k", answers, seq_len=40, reference=True)
    _, records = run_task(runner, str(path), progress=False)
    assert [r["correct"] for r in records] == [1.0, 0.0, 0.0]  # the whole remainder must match


def test_humaneval_completions_are_executed(tmp_path):
    problems = [dict(task_id=f"T/{i}", entry_point="f", prompt="def f(x):\n", suffix="\n",
                     canonical_solution="    return x * 2", test="def check(f):\n"
                     "    assert f(2) == 4\n") for i in range(3)]
    path = tmp_path / "he.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems))
    answers = {0: chars("    return x * 2"), ROW_STRIDE: chars("    return x + 2"),
               2 * ROW_STRIDE: chars("    while True: pass")}
    runner, _ = char_runner("humaneval", answers, timeout=1.0)
    result, records = run_task(runner, str(path), progress=False)
    assert [r["status"] for r in records] == ["passed", "passed", "timed out"]
    assert result["metrics"]["pass@1"]["value"] == pytest.approx(200 / 3)


def test_per_item_file_resumes_with_the_same_numbers(engine, task_files, tmp_path):
    data, log = str(task_files["siqa"]), tmp_path / "siqa.jsonl"
    fresh, _ = run_task(runner_for(engine, "siqa", num_levels=8), data, progress=False)
    first, _ = run_task(runner_for(engine, "siqa", num_levels=8), data, limit=2,
                        per_item=str(log), progress=False)
    assert first["items"] == 2
    with open(log, "a") as f:
        f.write('{"index": 4, "sco')  # a line cut short by an interruption
    runner = runner_for(engine, "siqa", num_levels=8)
    evaluated = []
    inner = runner.evaluate
    runner.evaluate = lambda chunk: evaluated.extend(i for i, _ in chunk) or inner(chunk)
    resumed, _ = run_task(runner, data, per_item=str(log), progress=False)
    assert evaluated == [2, 3, 4]  # the first two came from the file
    assert resumed["metrics"] == fresh["metrics"]
    with pytest.raises(ValueError, match="other settings .*seed"):
        other = TaskRunner(engine, make_encoder(engine.model), "siqa",
                           Settings(seed=SEED + 1, num_levels=8))
        run_task(other, data, per_item=str(log), progress=False)


def test_cli_prints_one_json_line_and_refuses_bad_input(tiny_ckpt, task_files, tmp_path, capsys):
    from diffujax.cli import main

    args = ["tasks", "--checkpoint", str(tiny_ckpt), "--task", "piqa", "--mesh", "none",
            "--levels", "8", "--seed", str(SEED), "--progress", "off"]
    assert main(args + ["--data", str(task_files["piqa"]), "--json", "--limit", "3"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "piqa" and result["items"] == 3
    assert set(result["metrics"]["accuracy"]) == {"value", "stderr"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "g"}\n')
    assert main(args + ["--data", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.jsonl:1: missing field 'sol1'" in err[0]


def test_reference_parity_ar_context_has_no_bos(engine, tiny_model, task_files):
    """``--reference-parity --objective ar`` encodes a multiple-choice context as the reference's
    AR script did: its first token at position 0, no BOS (README: Tasks). The scores equal plain
    causal log-probs of exactly those tokens; by default, and for the diffusion objective, BOS
    leads."""
    items = TASKS["hellaswag"].load(str(task_files["hellaswag"]))
    parity = runner_for(engine, "hellaswag", "ar", reference=True)
    _, records = run_task(parity, str(task_files["hellaswag"]), progress=False)
    encode = tiny_model.tokenizer.encode
    for item, record in zip(items, records):
        context, plain = list(encode(item.prefix)), []
        for text in item.continuations:
            tokens = np.asarray(context + list(encode(text)), np.int32)
            logp = special.log_softmax(logits_of(tiny_model, tokens, causal()), -1)
            span = range(len(context), len(tokens))
            plain.append(np.mean([logp[j - 1, tokens[j]] for j in span]))  # HellaSwag: mean
        np.testing.assert_allclose(record["scores"], plain, rtol=2e-5, atol=1e-5)
    bos = make_encoder(tiny_model).lead[0]
    first = encode(items[0].prefix)[0]
    assert first != bos
    for runner, lead in ((parity, first), (runner_for(engine, "hellaswag", "ar"), bos),
                         (runner_for(engine, "hellaswag", reference=True), bos)):
        assert runner.encoder.choice_rows(0, items[0])[0].tokens[0] == lead
    # Its Lambada encodes with the tokenizer's special tokens: BOS stays.
    assert runner_for(engine, "lambada", "ar", reference=True).encoder.bos_before_context


def test_reference_parity_scores_choices_as_the_reference_scripts(engine, tiny_model, task_files):
    """The reference's evaluation scripts (``eval-diffugpt.py`` / ``eval-diffullama.py``) score a
    choice with the module-level ``eval_forward`` of its ``ddm/trainer.py``, one row per call:
    levels T..1 at rate k / T, the unweighted mean ce over the row's noised positions, 0 for a
    level with none, summed and divided by T (``plain_reference_score``, on the same draws). Not
    its trainer's ``eval_forward`` method (T-1..1, 1/t weighted): no script calls that."""
    items = TASKS["piqa"].load(str(task_files["piqa"]))
    encoder = make_encoder(tiny_model)
    parity = runner_for(engine, "piqa", reference=True, num_levels=8)
    _, records = run_task(parity, str(task_files["piqa"]), progress=False)
    _, default = run_task(runner_for(engine, "piqa", num_levels=8), str(task_files["piqa"]),
                          progress=False)
    for index, (item, record) in enumerate(zip(items, records)):
        plain = [plain_reference_score(tiny_model, row, seed=SEED, levels=8)
                 for row in encoder.choice_rows(index, item)]
        np.testing.assert_allclose(record["scores"], plain, rtol=2e-5, atol=1e-5)
        assert record["scores"] == default[index]["scores"]
    assert parity.header("x")["levels"] == "T..1 of T=8, unweighted"

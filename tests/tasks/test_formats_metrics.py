"""Task files, prompt formats and metrics, without a model. References: the ``rouge_score``
package (what the reference's ``evaluate.load("rouge")`` runs), numpy, and the reference's
prompt strings written out by hand."""

import csv
import gzip
import json
import math

import numpy as np
import pytest

from diffujax.tasks import formats, metrics
from diffujax.tasks.readers import TaskDataError


def jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_multiple_choice_prompts_follow_the_reference(tmp_path):
    [h] = formats.hellaswag(jsonl(tmp_path / "h.jsonl", [dict(
        activity_label="Removing ice", ctx_a="A man [title] scrapes.", ctx_b="then he",
        endings=["wipes  it. [header]", "leaves"], label="1")]))
    assert h.prefix == "Removing ice: A man.  scrapes. Then he".replace("  ", " ")
    # strip runs before the bracket removal (as in the reference and lm-eval): the space stays
    assert h.continuations == ("wipes it. ", "leaves") and h.gold == 1
    [w] = formats.winogrande(jsonl(tmp_path / "w.jsonl", [dict(
        sentence="Sarah gave Maria the book because _ was done with it.", option1="Sarah",
        option2="Maria", answer="2")]))
    assert w.prefix == "Sarah gave Maria the book because "
    assert w.continuations == ("Sarah was done with it.", "Maria was done with it.")
    assert w.gold == 1
    [s] = formats.siqa(jsonl(tmp_path / "s.jsonl", [dict(
        context="Tracy went home.", question="Why?", answerA="a", answerB="b", answerC="c",
        label="3")]))
    assert s.prefix == "Question: Tracy went home. Why?\nAnswer: " and s.gold == 2
    [p] = formats.piqa(jsonl(tmp_path / "p.jsonl", [dict(goal="Open a jar", sol1="twist",
                                                         sol2="smash", label=0)]))
    assert p.prefix == "Question: Open a jar\nAnswer: " and p.continuations == (" twist", " smash")


def test_rocstories_middle_is_the_third_sentence_of_the_right_story(tmp_path):
    path = tmp_path / "roc.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["InputStoryid", "InputSentence1", "InputSentence2", "InputSentence3",
                    "InputSentence4", "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2",
                    "AnswerRightEnding"])
        w.writerow(["x", "A.", "B.", "C.", "D.", "wrong.", "right.", "2"])
    [item] = formats.rocstories(str(path))
    assert (item.prefix, item.middle, item.suffix) == ("A. B.", "C.", "D. right.")


def test_humaneval_and_gsm8k_records(tmp_path):
    record = dict(task_id="HumanEval/0", prompt="def f():\n", suffix="\n", entry_point="f",
                  canonical_solution="    return 1", test="def check(c): pass")
    gz = tmp_path / "he.jsonl.gz"
    gz.write_bytes(gzip.compress((json.dumps(record) + "\n").encode()))
    [item] = formats.humaneval(str(gz))
    assert item.middle == "    return 1" and item.ar_prompt.startswith("The prefix is: def f():")
    # the reference's gsm_test.json: one JSON array of instruction / output
    array = tmp_path / "gsm.json"
    array.write_text(json.dumps([{"instruction": "q?", "output": "<<2*3=6>> #### 6"}]))
    [g] = formats.gsm8k(str(array))
    assert (g.question, g.gold) == ("q?", "6")


@pytest.mark.parametrize("task,content,message", [
    ("hellaswag", '{"ctx_a": "x"}\n', "missing field 'ctx_b'"),
    ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 5}\n', "label=5 is not one of"),
    ("siqa", 'not json\n', ":1: not JSON"),
    ("winogrande", '{"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"}\n',
     "needs a '_' blank"),
    ("gsm8k", '{"question": "q", "answer": "no marker"}\n', "no number after '####'"),
    ("lambada", "\n\n", "no non-empty lines"),
])
def test_bad_task_files_name_the_file_line_and_field(tmp_path, task, content, message):
    path = tmp_path / f"{task}.data"
    path.write_text(content)
    with pytest.raises(TaskDataError, match=message) as e:
        getattr(formats, task)(str(path))
    assert str(path) in str(e.value)
    with pytest.raises(TaskDataError, match="no such task file"):
        getattr(formats, task)(str(tmp_path / "missing"))


def test_gsm_parsing():
    assert metrics.gsm_number("so 3 + 4 = 7 #### 7") == "7"
    assert metrics.gsm_number("#### 1,234 dollars") == "1234"
    assert metrics.gsm_number("#### -5.50") == "-5.5"
    assert metrics.gsm_number("a #### 2 then #### 12.0") == "12"
    assert metrics.gsm_number("no answer") is None
    assert metrics.gsm_number("#### none") is None
    assert metrics.gsm_correct("work #### 18<pad>", "18")
    assert not metrics.gsm_correct("work #### 18 eggs", "18", reference=True)  # whole remainder
    assert metrics.gsm_correct("work #### 1,8", "18", reference=True)


def test_lambada_match_is_exact_and_once():
    assert metrics.lambada_correct(" dog ", "dog")
    assert not metrics.lambada_correct("dogs", "dog")
    assert not metrics.lambada_correct("dog dog", "dog")


def test_rouge_equals_the_rouge_score_package():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    rng = np.random.default_rng(0)
    vocab = ["The", "cat", "sat", "on", "the", "mat.", "A", "dog's", "bone", "it", "2x", "--"]
    pairs = [("", "the cat"), ("the cat", ""), ("The cat sat.", "the cat sat")]
    pairs += [(" ".join(rng.choice(vocab, rng.integers(1, 12))),
               " ".join(rng.choice(vocab, rng.integers(1, 12)))) for _ in range(60)]
    for prediction, reference in pairs:
        ours = metrics.rouge_scores(prediction, reference)
        theirs = scorer.score(reference, prediction)
        for key in ("rouge1", "rouge2", "rougeL"):
            assert ours[key] == pytest.approx(100 * theirs[key].fmeasure, abs=1e-9), key


def test_mean_and_standard_error():
    values = [1.0, 0.0, 1.0, 1.0, 0.0]
    mean, se = metrics.mean_stderr(values)
    assert mean == pytest.approx(0.6)
    assert se == pytest.approx(np.std(values, ddof=1) / math.sqrt(len(values)))
    assert math.isnan(metrics.mean_stderr([1.0])[1])

"""The paper's tasks as items, with the reference's prompt formats (HKUNLP/DiffuLLaMA,
``evaluation/eval-diffugpt.py``; the AR baseline's aggregation from ``eval-llm.py``).

Items are text; :mod:`diffujax.tasks.encode` turns them into token rows. Four kinds:
``Choice`` (score each continuation, lowest diffusion score / highest AR log-prob wins),
``LastWord`` (Lambada: decode the last word), ``Infill`` (ROCStories, HumanEval: the
oracle-length middle between a fixed prefix and suffix) and ``Answer`` (GSM8K: generate, parse
the number after ``####``). ``TASKS``: what each task is (its reader, kind, defaults and the
format of its file; light imports only: ``diffujax tasks --help`` lists them without loading a
model's machinery).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

from diffujax.tasks import readers
from diffujax.tasks.metrics import gsm_number
from diffujax.tasks.readers import TaskDataError, field


@dataclasses.dataclass(frozen=True)
class Choice:
    prefix: str  # fixed context
    continuations: tuple[str, ...]  # each scored after the prefix (encoded on its own)
    gold: int


@dataclasses.dataclass(frozen=True)
class LastWord:
    text: str  # the whole passage
    prefix: str  # every word but the last, joined by single spaces
    target: str  # the last word


@dataclasses.dataclass(frozen=True)
class Infill:
    prefix: str
    middle: str  # the reference middle: its token count is the infill length (oracle length)
    suffix: str
    ar_prompt: str | None = None  # the AR baseline's prompt (None: the prefix)
    test: str | None = None  # HumanEval: test code and entry point
    entry_point: str | None = None
    task_id: str | None = None


@dataclasses.dataclass(frozen=True)
class Answer:
    question: str
    answer: str  # the full reference answer text
    gold: str  # the number after '####'


# --- Lambada ----------------------------------------------------------------------------------

def lambada(path):
    items = []
    for line in readers.read_lines(path):
        words = line.split()
        if len(words) < 2:
            raise TaskDataError(f"{path}: a Lambada line needs at least two words: {line!r:.60}")
        items.append(LastWord(text=line, prefix=" ".join(words[:-1]), target=words[-1]))
    return items


# --- multiple choice ----------------------------------------------------------------------------

def hellaswag_preprocess(text: str) -> str:
    """lm-eval's / the reference's HellaSwag cleaning (WikiHow bracket artifacts)."""
    return re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". ")).replace("  ", " ")


def _gold(record, name, count, offset=0):
    gold = field(record, name, int) - offset
    if not 0 <= gold < count:
        raise TaskDataError(f"{record['_where']}: {name}={gold + offset} is not one of the"
                            f" {count} choices")
    return gold


def hellaswag(path):
    items = []
    for r in readers.read_records(path):
        ctx = field(r, "ctx_a") + " " + field(r, "ctx_b").capitalize()
        endings = field(r, "endings", list)
        if not all(isinstance(e, str) for e in endings):
            raise TaskDataError(f"{r['_where']}: field 'endings' must be a list of strings, got"
                                f" {endings!r:.60}")
        items.append(Choice(prefix=hellaswag_preprocess(field(r, "activity_label") + ": " + ctx),
                            continuations=tuple(hellaswag_preprocess(e) for e in endings),
                            gold=_gold(r, "label", len(endings))))
    return items


def winogrande(path):
    """The blank splits the sentence; each option plus the rest of the sentence is scored
    (the reference: ``prefix | option + suffix``, suffix stripped, both encoded on their own)."""
    items = []
    for r in readers.read_records(path):
        sentence = field(r, "sentence")
        if "_" not in sentence:
            raise TaskDataError(f"{r['_where']}: a WinoGrande sentence needs a '_' blank")
        blank = sentence.index("_")
        rest = sentence[blank + 1:].strip()
        options = (field(r, "option1"), field(r, "option2"))
        items.append(Choice(prefix=sentence[:blank],
                            continuations=tuple(f"{o} {rest}" for o in options),
                            gold=_gold(r, "answer", 2, offset=1)))
    return items


def siqa(path):
    return [Choice(prefix=f"Question: {field(r, 'context')} {field(r, 'question')}\nAnswer: ",
                   continuations=tuple(field(r, k) for k in ("answerA", "answerB", "answerC")),
                   gold=_gold(r, "label", 3, 1)) for r in readers.read_records(path)]


def piqa(path):
    return [Choice(prefix=f"Question: {field(r, 'goal')}\nAnswer: ",
                   continuations=(" " + field(r, "sol1"), " " + field(r, "sol2")),
                   gold=_gold(r, "label", 2)) for r in readers.read_records(path)]


# --- infilling -----------------------------------------------------------------------------------

def rocstories(path):
    """The cloze-test CSV (InputSentence1-4, RandomFifthSentenceQuiz1/2, AnswerRightEnding: the
    right ending completes the story), or the five-sentence training CSV (sentence1-5).
    Sentences 1-2 are the prefix, 3 is the middle, 4-5 the suffix (joined by single spaces)."""
    items = []
    for r in readers.read_csv(path):
        if "sentence1" in r:
            story = [field(r, f"sentence{i}") for i in range(1, 6)]
        else:
            right = field(r, "AnswerRightEnding").strip()
            if right not in ("1", "2"):
                raise TaskDataError(f"{r['_where']}: AnswerRightEnding must be 1 or 2")
            story = [field(r, f"InputSentence{i}") for i in range(1, 5)]
            story.append(field(r, f"RandomFifthSentenceQuiz{right}"))
        middle = readers.nonempty(r, "sentence3" if "sentence3" in r else "InputSentence3",
                                  "nothing to infill")
        items.append(Infill(prefix=story[0] + " " + story[1], middle=middle,
                            suffix=story[3] + " " + story[4]))
    return items


def humaneval_prompt(prefix: str, suffix: str) -> str:
    """The AR baseline's instruction prompt for code infilling (the reference's eval-llm.py)."""
    return (f"The prefix is: {prefix} and the suffix is: {suffix}, please return the middle"
            " code: ")


def humaneval(path):
    """HumanEval-infilling records: task_id, prompt, suffix, canonical_solution, test,
    entry_point (the single-line benchmark's jsonl)."""
    items = []
    for r in readers.read_records(path):
        prefix, suffix = field(r, "prompt"), field(r, "suffix")
        middle = readers.nonempty(r, "canonical_solution", "nothing to infill")
        items.append(Infill(prefix=prefix, middle=middle, suffix=suffix,
                            ar_prompt=humaneval_prompt(prefix, suffix), test=field(r, "test"),
                            entry_point=field(r, "entry_point"), task_id=field(r, "task_id")))
    return items


# --- GSM8K ---------------------------------------------------------------------------------------

def gsm8k(path):
    """``question``/``answer`` (the HF export) or ``instruction``/``output`` (the reference's
    gsm.json); the gold is the number after the last '####' of the answer."""
    items = []
    for r in readers.read_records(path):
        q_key, a_key = ("question", "answer") if "question" in r else ("instruction", "output")
        answer = field(r, a_key)
        gold = gsm_number(answer)
        if gold is None:
            raise TaskDataError(f"{r['_where']}: the answer has no number after '####'")
        items.append(Answer(question=field(r, q_key), answer=answer, gold=gold))
    return items


# --- the table -----------------------------------------------------------------------------------

OBJECTIVES = ("diffusion", "ar")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    load: Callable[[str], list]
    kind: str  # choice | last_word | infill | code | answer
    ar_reduce: str = "sum"  # choice tasks, AR objective: sum or mean log-prob (eval-llm.py)
    steps: int | None = 32  # default denoising passes (None: the span's token count)
    data: str = ""  # the format of --data, for --help and errors


TASKS = {
    "lambada": TaskSpec(lambada, "last_word", steps=None,
                        data="plain text, one passage a line (lambada_test_plain_text.txt)"),
    "hellaswag": TaskSpec(hellaswag, "choice", ar_reduce="mean",
                          data="jsonl: activity_label, ctx_a, ctx_b, endings, label"),
    "winogrande": TaskSpec(winogrande, "choice", ar_reduce="mean",
                           data="jsonl: sentence (with '_'), option1, option2, answer"),
    "siqa": TaskSpec(siqa, "choice",
                     data="jsonl: context, question, answerA/B/C, label (1-3)"),
    "piqa": TaskSpec(piqa, "choice", data="jsonl: goal, sol1, sol2, label (0/1)"),
    "rocstories": TaskSpec(rocstories, "infill",
                           data="csv: the cloze test (InputSentence1-4, RandomFifthSentenceQuiz1/2,"
                                " AnswerRightEnding) or sentence1-5"),
    "humaneval": TaskSpec(humaneval, "code",
                          data="jsonl: task_id, prompt, suffix, canonical_solution, test,"
                               " entry_point (HumanEval infilling)"),
    "gsm8k": TaskSpec(gsm8k, "answer", steps=64,
                      data="jsonl: question, answer ('... #### N'), or instruction/output"),
}

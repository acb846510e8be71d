"""What each task is: its reader, its kind, its defaults and the format of its file (light
imports only: ``diffujax tasks --help`` lists them without loading a model's machinery)."""

from __future__ import annotations

import dataclasses
from typing import Callable

from diffujax.tasks import formats

OBJECTIVES = ("diffusion", "ar")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    load: Callable[[str], list]
    kind: str  # choice | last_word | infill | code | answer
    ar_reduce: str = "sum"  # choice tasks, AR objective: sum or mean log-prob (eval-llm.py)
    steps: int | None = 32  # default denoising passes (None: the span's token count)
    data: str = ""  # the format of --data, for --help and errors


TASKS = {
    "lambada": TaskSpec(formats.lambada, "last_word", steps=None,
                        data="plain text, one passage a line (lambada_test_plain_text.txt)"),
    "hellaswag": TaskSpec(formats.hellaswag, "choice", ar_reduce="mean",
                          data="jsonl: activity_label, ctx_a, ctx_b, endings, label"),
    "winogrande": TaskSpec(formats.winogrande, "choice", ar_reduce="mean",
                           data="jsonl: sentence (with '_'), option1, option2, answer"),
    "siqa": TaskSpec(formats.siqa, "choice",
                     data="jsonl: context, question, answerA/B/C, label (1-3)"),
    "piqa": TaskSpec(formats.piqa, "choice", data="jsonl: goal, sol1, sol2, label (0/1)"),
    "rocstories": TaskSpec(formats.rocstories, "infill",
                           data="csv: the cloze test (InputSentence1-4, RandomFifthSentenceQuiz1/2,"
                                " AnswerRightEnding) or sentence1-5"),
    "humaneval": TaskSpec(formats.humaneval, "code",
                          data="jsonl: task_id, prompt, suffix, canonical_solution, test,"
                               " entry_point (HumanEval infilling)"),
    "gsm8k": TaskSpec(formats.gsm8k, "answer", steps=64,
                      data="jsonl: question, answer ('... #### N'), or instruction/output"),
}

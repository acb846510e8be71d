"""Per-item scores and their aggregate: mean with its standard error, ROUGE-1/2/L (the
``rouge_score`` definitions: lower-cased alphanumeric tokens, no stemming, F-measure), GSM8K
answer parsing, Lambada's exact match."""

from __future__ import annotations

import collections
import math
import re
import statistics
from typing import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (sample standard deviation / sqrt(n), as
    lm-evaluation-harness reports it); the error is NaN for fewer than two items."""
    if not values:
        return math.nan, math.nan
    spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return statistics.fmean(values), spread


# --- ROUGE ---------------------------------------------------------------------------------------

def _f_measure(overlap: int, predicted: int, reference: int) -> float:
    if overlap == 0:
        return 0.0
    precision, recall = overlap / predicted, overlap / reference
    return 2 * precision * recall / (precision + recall)


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_scores(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-measures in percent."""
    p, r = (re.sub(r"[^a-z0-9]+", " ", text.lower()).split() for text in (prediction, reference))
    out = {}
    for n in (1, 2):
        pn, rn = (collections.Counter(zip(*(t[i:] for i in range(n)))) for t in (p, r))
        overlap = sum((pn & rn).values())  # n-grams in both, each as often as in the rarer
        out[f"rouge{n}"] = 100 * _f_measure(overlap, sum(pn.values()), sum(rn.values()))
    out["rougeL"] = 100 * _f_measure(_lcs(p, r), len(p), len(r))
    return out


# --- GSM8K ---------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def gsm_number(text: str) -> str | None:
    """The number after the last '####' (commas dropped, ``12.0`` -> ``12``), or None."""
    match = _NUMBER.search(text.rsplit("####", 1)[1]) if "####" in text else None
    if match is None:
        return None
    number = match.group().replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".") or "0"
    return number


def gsm_correct(prediction: str, gold: str, *, reference: bool = False) -> bool:
    """diffujax: the parsed numbers are equal. ``reference``: the reference's ``gsm_eval``,
    the whole text after the last '####', stripped and without commas, equals the gold's."""
    if reference:
        return prediction.split("####")[-1].strip().replace(",", "") == gold
    return gsm_number(prediction) == gold


def lambada_correct(prediction: str, target: str) -> bool:
    """Exact match of the decoded last word (both stripped), once per passage."""
    return prediction.strip() == target.strip()

"""Running one task: items -> rows -> scores or decodes -> per-item records -> the metric.

Each task runs in chunks of items; with a per-item file every finished chunk is appended to it
(one JSON line per item, after a header line with the settings), so a stopped run restarts
where it stopped and gives the same numbers: every random draw follows from the seed and the
item's index alone.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import sys

from tqdm import tqdm

from diffujax.inference.generation import DIFFUSION_SAMPLERS, check_sampler
from diffujax.tasks import metrics
from diffujax.tasks.encode import Encoder
from diffujax.tasks.engine import Engine, by_span_length
from diffujax.tasks.execution import humaneval_program, run_program
from diffujax.tasks.formats import OBJECTIVES, TASKS, TaskSpec


@dataclasses.dataclass(frozen=True)
class Settings:
    objective: str = "diffusion"
    seed: int = 0
    num_levels: int = 32  # multiple-choice score levels T
    steps: int | None = None  # denoising passes (None: the task's default)
    sampler: str = "confidence"
    temperature: float = 0.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    reference: bool = False  # reproduce the reference's scoring / sampling (see README)
    logits_temp: float = 0.95  # the reference's temperature (eval-diffugpt.py default)
    seq_len: int = 256  # GSM8K: canvas length (the reference's cutoff_len)
    timeout: float = 10.0  # HumanEval: seconds per program

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"--objective {self.objective!r} is not one of {OBJECTIVES}")
        rules = {">= 1": lambda v: v >= 1, ">= 2": lambda v: v >= 2, ">= 0": lambda v: v >= 0,
                 "> 0": lambda v: v > 0, "in (0, 1]": lambda v: 0 < v <= 1}  # NaN fails each
        for flag, value, rule in (
                ("--levels", self.num_levels, ">= 1"), ("--steps", self.steps, ">= 1"),
                ("--top-k", self.top_k, ">= 1"), ("--temperature", self.temperature, ">= 0"),
                ("--top-p", self.top_p, "in (0, 1]"), ("--logits-temp", self.logits_temp, "> 0"),
                ("--timeout", self.timeout, "> 0"), ("--seq-len", self.seq_len, ">= 2")):
            if value is not None and not rules[rule](value):
                raise ValueError(f"{flag} {value}: must be {rule}")
        check_sampler(self.sampler, DIFFUSION_SAMPLERS)
        if self.reference and self.sampler != "confidence":
            raise ValueError("--reference-parity uses the reference's confidence sampler: drop"
                             " --sampler")


def decode_options(spec: TaskSpec, s: Settings) -> dict:
    """How one task decodes with the diffusion objective: steps, temperature, ranking and
    confidence temperature of ``Engine.diffusion_decode``."""
    steps = s.steps if s.steps is not None else spec.steps
    if not s.reference:
        return dict(steps=steps, temperature=s.temperature, ranking="masked",
                    confidence_temperature=None)
    # The reference: Lambada samples at temperature 1 with T = the token count; GSM8K decodes
    # greedily ranking by temperature-1 probabilities (its gsm inference config); the infilling
    # tasks sample at logits_temp and rank by it. Each task sets its own values (the reference
    # overwrote them for every later task after Lambada).
    temperature, confidence = {"last_word": (1.0, 1.0), "answer": (0.0, 1.0)}.get(
        spec.kind, (s.logits_temp, s.logits_temp))
    return dict(steps=steps, temperature=temperature, ranking="all",
                confidence_temperature=confidence)


class TaskRunner:
    def __init__(self, engine: Engine, encoder: Encoder, name: str, settings: Settings):
        if name not in TASKS:
            raise ValueError(f"--task {name!r} is not one of {sorted(TASKS)}")
        self.spec = TASKS[name]
        if settings.reference and settings.objective == "ar" and self.spec.kind != "last_word":
            # The reference's AR script encodes these contexts without special tokens (its
            # Lambada keeps the tokenizer's own: BOS for LLaMA). README: Tasks.
            encoder = encoder.without_context_bos()
        self.engine, self.encoder, self.name, self.s = engine, encoder, name, settings
        self.options = decode_options(self.spec, settings)
        # {metric: the per-item record field it averages}
        names = {"infill": ("rouge1", "rouge2", "rougeL"), "code": ("pass@1",)}.get(
            self.spec.kind, ("accuracy",))
        self.metric_fields = {n: "correct" if n == "accuracy" else n for n in names}

    # --- the per-kind evaluation of a chunk of (index, item) ------------------------------------

    def evaluate(self, chunk) -> list[dict]:
        kinds = dict(choice=self._choice, last_word=self._last_word, infill=self._infill,
                     code=self._code, answer=self._answer)
        return kinds[self.spec.kind](chunk)

    def _choice(self, chunk):
        rows = [self.encoder.choice_rows(i, item) for i, item in chunk]
        flat = [r for group in rows for r in group]
        if self.s.objective == "diffusion":
            # the reference's scripts score with exactly this (multiple_choice_score), so
            # --reference-parity changes nothing here
            values = list(self.engine.diffusion_score(flat, num_levels=self.s.num_levels))
            pick = min
        else:
            sums, counts, _ = self.engine.ar_logprob(flat)
            values = list(sums / counts if self.spec.ar_reduce == "mean" else sums)
            pick = max
        out, at = [], 0
        for (index, item), group in zip(chunk, rows):
            scores = [float(v) for v in values[at:at + len(group)]]
            at += len(group)
            pred = scores.index(pick(scores))
            out.append(dict(index=index, scores=scores, pred=pred, gold=item.gold,
                            correct=float(pred == item.gold)))
        return out

    def _decode(self, rows):
        """Spans for ``rows`` with the objective's decoder; with no steps given (Lambada) the
        diffusion steps equal each row's span length (rows are grouped by it)."""
        if self.s.objective == "ar":
            return self.engine.ar_decode(rows)
        options = dict(self.options, sampler=self.s.sampler, top_k=self.s.top_k,
                       top_p=self.s.top_p)
        if options["steps"] is not None:
            return self.engine.diffusion_decode(rows, **options)
        return by_span_length(rows, lambda group, n: self.engine.diffusion_decode(
            group, **dict(options, steps=n)))

    def _last_word(self, chunk):
        texts = map(self.encoder.decode,
                    self._decode([self.encoder.last_word_row(i, item) for i, item in chunk]))
        return [dict(index=index, prediction=pred, target=item.target,
                     correct=float(metrics.lambada_correct(pred, item.target)))
                for (index, item), pred in zip(chunk, texts)]

    def _infill_texts(self, chunk):
        ar = self.s.objective == "ar"
        rows = [self.encoder.infill_row(i, item, ar) for i, item in chunk]
        return [self.encoder.decode(span) for span in self._decode(rows)]

    def _infill(self, chunk):
        return [dict(index=index, prediction=pred, reference=item.middle,
                     **metrics.rouge_scores(pred, item.middle))
                for (index, item), pred in zip(chunk, self._infill_texts(chunk))]

    def _code(self, chunk):
        completions = self._infill_texts(chunk)
        programs = [humaneval_program(item.prefix, c, item.suffix, item.test, item.entry_point)
                    for (_, item), c in zip(chunk, completions)]
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # made as needed
            outcomes = list(pool.map(lambda p: run_program(p, timeout=self.s.timeout), programs))
        return [dict(index=index, task_id=item.task_id, completion=c, status=o.status,
                     detail=o.detail, **{"pass@1": float(o.passed)})
                for (index, item), c, o in zip(chunk, completions, outcomes)]

    def _answer(self, chunk):
        rows = [self.encoder.answer_row(i, item, self.s.seq_len) for i, item in chunk]
        texts = [self.encoder.decode(self.encoder.until_stop(span)) for span in self._decode(rows)]
        correct = lambda text, gold: float(  # noqa: E731
            metrics.gsm_correct(text, gold, reference=self.s.reference))
        return [dict(index=index, prediction=text, parsed=metrics.gsm_number(text), gold=item.gold,
                     correct=correct(text, item.gold)) for (index, item), text in zip(chunk, texts)]

    # --- description and aggregate -------------------------------------------------------------

    def header(self, data: str) -> dict:
        """Everything an item's result depends on (a per-item file is resumed only if it
        matches; not the item count: a larger --limit resumes a smaller one)."""
        s, o = self.s, self.options
        h = dict(task=self.name, data=os.path.abspath(data), objective=s.objective, seed=s.seed,
                 reference_parity=s.reference)
        if self.spec.kind == "choice":
            h.update(draws=(f"{s.num_levels} noise levels x 1 draw per choice"
                            if s.objective == "diffusion" else "exact (AR log-prob "
                            f"{self.spec.ar_reduce})"), steps=None)
            if s.objective == "diffusion":
                h["levels"] = f"T..1 of T={s.num_levels}, unweighted"
        elif s.objective == "ar":
            h.update(draws="greedy", steps="one forward pass per token")
        else:
            t = o["temperature"]
            h.update(steps=o["steps"] if o["steps"] is not None else "the span's token count",
                     draws="greedy" if t == 0 else f"1 sample at temperature {t}",
                     ranking=o["ranking"], confidence_temperature=o["confidence_temperature"],
                     sampler=s.sampler, top_k=s.top_k, top_p=s.top_p)
        if self.spec.kind == "answer":
            h["seq_len"] = s.seq_len
        if self.spec.kind == "code":
            h["timeout_s"] = s.timeout
        return h

    def summarize(self, records: list[dict], header: dict) -> dict:
        scale = 1.0 if self.spec.kind == "infill" else 100.0  # ROUGE is in percent already
        scores = {}
        for name, field in self.metric_fields.items():
            value, stderr = metrics.mean_stderr([r[field] for r in records])
            scores[name] = dict(value=value * scale, stderr=stderr * scale)
        return dict(header, metrics=scores, items=len(records))


# --- per-item file (restart): a header line with what the results were computed from (settings,
# the task file's digest), then one JSON line per item with at least the fields a result needs.

def _write_records(path: str, header: dict, records, *, fresh: bool = False) -> None:
    """Append ``records`` (a new file, or ``fresh``: start over, with the header line)."""
    head = [{"header": header}] if fresh or not os.path.exists(path) else []
    with open(path, "w" if fresh else "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in head + list(records))
        f.flush()
        os.fsync(f.fileno())


def _read_records(path: str, header: dict, fields: tuple[str, ...]) -> dict[int, dict]:
    """An earlier run's records by item index, checked against ``header`` and to have
    ``fields``; the file is rewritten without a last line cut short by an interruption."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()

    def damaged(number: int, what: str) -> ValueError:
        return ValueError(f"{path}:{number}: damaged record ({what}): remove that line (its item"
                          " runs again) or the file (to start over)")

    done = {}
    if lines:
        try:
            first = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ValueError(f"{path}: not a diffujax per-item file (remove it or choose another"
                             " --per-item)") from None
        old = first.get("header") if isinstance(first, dict) else None
        if old != header:
            old = old if isinstance(old, dict) else {}
            diff = sorted(k for k in set(old) | set(header) if old.get(k) != header.get(k))
            raise ValueError(f"{path} was computed from other settings or data"
                             f" ({', '.join(diff)} differ): remove it to start over, or choose"
                             " another --per-item")
    for number, line in enumerate(lines[1:], start=2):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the last line, cut short by an interruption: that item runs again
            raise damaged(number, "not JSON") from None
        if not isinstance(record, dict):
            raise damaged(number, f"a {type(record).__name__}, not a record")
        missing = [k for k in fields if k not in record]
        if missing:
            raise damaged(number, f"missing {', '.join(missing)}")
        index = record["index"]
        if type(index) is not int or index < 0:
            raise damaged(number, f"index {index!r} is not an item number")
        done[index] = record
    tmp = f"{path}.tmp"  # drops a cut-short tail, so appends start on a clean line
    _write_records(tmp, header, [done[i] for i in sorted(done)], fresh=True)
    os.replace(tmp, path)
    return done


def run_task(runner: TaskRunner, data: str, *, limit: int | None = None,
             per_item: str | None = None, progress: bool | None = None,
             computed_from: dict | None = None, items: list | None = None
             ) -> tuple[dict, list[dict]]:
    """Evaluate ``runner``'s task on the file ``data``; returns (result, per-item records).
    ``computed_from``: more of what the results depend on (the checkpoint), for the header;
    ``items``: the file's items, when they were read already (``--limit`` >= 1 is the command's
    check)."""
    items = (runner.spec.load(data) if items is None else items)[:limit]
    with open(data, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    header = dict(runner.header(data), data_sha256=digest, **(computed_from or {}))
    fields = ("index", *runner.metric_fields.values())
    done = _read_records(per_item, header, fields) if per_item else {}
    todo = [(i, item) for i, item in enumerate(items) if i not in done]
    chunk = max(1, runner.engine.batch_size)
    bar = tqdm(total=len(items), initial=len(done), desc=runner.name, unit="item",
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    with bar:
        for start in range(0, len(todo), chunk):
            records = runner.evaluate(todo[start:start + chunk])
            if per_item:
                _write_records(per_item, header, records)
            done.update((r["index"], r) for r in records)
            bar.update(len(records))
    records = [done[i] for i in range(len(items))]
    return runner.summarize(records, header), records

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
from diffujax.tasks.engine import Engine
from diffujax.tasks.execution import humaneval_program, run_program
from diffujax.tasks.specs import OBJECTIVES, TASKS, TaskSpec


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
        at_least_1 = {"--levels": self.num_levels, "--steps": self.steps, "--top-k": self.top_k}
        for name, value in at_least_1.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} {value}: must be >= 1")
        if not self.temperature >= 0:  # NaN too
            raise ValueError(f"--temperature {self.temperature}: must be >= 0")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"--top-p {self.top_p}: must be in (0, 1]")
        for name, value in (("--logits-temp", self.logits_temp), ("--timeout", self.timeout)):
            if not value > 0:
                raise ValueError(f"{name} {value}: must be > 0")
        if self.seq_len < 2:
            raise ValueError(f"--seq-len {self.seq_len}: must be >= 2")
        check_sampler(self.sampler, DIFFUSION_SAMPLERS)
        if self.reference and self.sampler != "confidence":
            raise ValueError("--reference-parity uses the reference's confidence sampler: drop"
                             " --sampler")


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """How one task decodes with the diffusion objective."""
    steps: int | None
    temperature: float
    ranking: str = "masked"
    confidence_temperature: float | None = None

    def describe(self) -> dict:
        draws = "greedy" if self.temperature == 0 else f"1 sample at temperature {self.temperature}"
        return {"steps": self.steps if self.steps is not None else "the span's token count",
                "draws": draws, "ranking": self.ranking,
                "confidence_temperature": self.confidence_temperature}


def decode_plan(spec: TaskSpec, s: Settings) -> DecodePlan:
    steps = s.steps if s.steps is not None else spec.steps
    if not s.reference:
        return DecodePlan(steps, s.temperature)
    # The reference: Lambada samples at temperature 1 with T = the token count; GSM8K decodes
    # greedily ranking by temperature-1 probabilities (its gsm inference config); the infilling
    # tasks sample at logits_temp and rank by it. Each task sets its own values (the reference
    # overwrote them for every later task after Lambada).
    if spec.kind == "last_word":
        return DecodePlan(steps, 1.0, "all", 1.0)
    if spec.kind == "answer":
        return DecodePlan(steps, 0.0, "all", 1.0)
    return DecodePlan(steps, s.logits_temp, "all", s.logits_temp)


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
        self.plan = decode_plan(self.spec, settings)

    # --- the per-kind evaluation of a chunk of (index, item) ------------------------------------

    def evaluate(self, chunk) -> list[dict]:
        return getattr(self, f"_{self.spec.kind}")(chunk)

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

    def _decode(self, rows, *, per_row_steps=False):
        """Spans for ``rows`` with the objective's decoder; with ``per_row_steps`` (Lambada) the
        diffusion steps equal each row's span length (rows are grouped by it)."""
        if self.s.objective == "ar":
            return self.engine.ar_decode(rows)
        p = self.plan
        options = dict(sampler=self.s.sampler, temperature=p.temperature, top_k=self.s.top_k,
                       top_p=self.s.top_p, ranking=p.ranking,
                       confidence_temperature=p.confidence_temperature)
        if not (per_row_steps and p.steps is None):
            return self.engine.diffusion_decode(rows, steps=p.steps, **options)
        spans = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for k, row in enumerate(rows):
            groups.setdefault(sum(not f for f in row.fixed), []).append(k)
        for steps, members in sorted(groups.items()):
            decoded = self.engine.diffusion_decode([rows[k] for k in members], steps=steps,
                                                   **options)
            for k, span in zip(members, decoded):
                spans[k] = span
        return spans

    def _last_word(self, chunk):
        rows = [self.encoder.last_word_row(i, item) for i, item in chunk]
        spans = self._decode(rows, per_row_steps=True)
        out = []
        for (index, item), span in zip(chunk, spans):
            pred = self.encoder.decode(span)
            out.append(dict(index=index, prediction=pred, target=item.target,
                            correct=float(metrics.lambada_correct(pred, item.target))))
        return out

    def _infill_spans(self, chunk):
        enc = self.encoder
        make = enc.infill_row if self.s.objective == "diffusion" else enc.ar_infill_row
        return self._decode([make(i, item) for i, item in chunk])

    def _infill(self, chunk):
        out = []
        for (index, item), span in zip(chunk, self._infill_spans(chunk)):
            pred = self.encoder.decode(span)
            out.append(dict(index=index, prediction=pred, reference=item.middle,
                            **metrics.rouge_scores(pred, item.middle)))
        return out

    def _code(self, chunk):
        completions = [self.encoder.decode(span) for span in self._infill_spans(chunk)]
        programs = [humaneval_program(item.prefix, c, item.suffix, item.test, item.entry_point)
                    for (_, item), c in zip(chunk, completions)]
        workers = max(1, min(len(programs), os.cpu_count() or 1))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            outcomes = list(pool.map(lambda p: run_program(p, timeout=self.s.timeout), programs))
        return [dict(index=index, task_id=item.task_id, completion=c, status=o.status,
                     detail=o.detail, **{"pass@1": float(o.passed)})
                for (index, item), c, o in zip(chunk, completions, outcomes)]

    def _answer(self, chunk):
        rows = [self.encoder.answer_row(i, item, self.s.seq_len) for i, item in chunk]
        out = []
        for (index, item), span in zip(chunk, self._decode(rows)):
            text = self.encoder.decode(self.encoder.until_stop(span))
            correct = metrics.gsm_correct(text, item.gold, reference=self.s.reference)
            out.append(dict(index=index, prediction=text, parsed=metrics.gsm_number(text),
                            gold=item.gold, correct=float(correct)))
        return out

    # --- description and aggregate -------------------------------------------------------------

    def metric_names(self) -> tuple[str, ...]:
        return {"infill": ("rouge1", "rouge2", "rougeL"), "code": ("pass@1",)}.get(
            self.spec.kind, ("accuracy",))

    def header(self, data: str) -> dict:
        """Everything an item's result depends on (a per-item file is resumed only if it
        matches; not the item count: a larger --limit resumes a smaller one)."""
        s = self.s
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
            h.update(self.plan.describe(), sampler=s.sampler, top_k=s.top_k, top_p=s.top_p)
        if self.spec.kind == "answer":
            h["seq_len"] = s.seq_len
        if self.spec.kind == "code":
            h["timeout_s"] = s.timeout
        return h

    def record_fields(self) -> tuple[str, ...]:
        """The fields of a per-item record that the metrics read."""
        if self.spec.kind in ("choice", "last_word", "answer"):
            return ("correct",)
        return self.metric_names()

    def summarize(self, records: list[dict], header: dict) -> dict:
        result = dict(header)
        result["metrics"] = {}
        fields = self.record_fields()
        for name in self.metric_names():
            field = fields[0] if fields == ("correct",) else name
            value, stderr = metrics.mean_stderr([r[field] for r in records])
            scale = 100.0 if field in ("correct", "pass@1") else 1.0
            result["metrics"][name] = dict(value=value * scale, stderr=stderr * scale)
        result["items"] = len(records)
        return result


# --- per-item file (restart) --------------------------------------------------------------------

def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class PerItemFile:
    """Append-only JSON lines: a header with what the results were computed from (settings, the
    task file's digest), then one record per item with at least ``fields``."""

    def __init__(self, path: str | None, header: dict, fields: tuple[str, ...] = ("index",)):
        self.path, self.header, self.fields = path, header, fields

    def load(self) -> dict[int, dict]:
        if self.path is None or not os.path.exists(self.path):
            return {}
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if not lines:
            return {}
        try:
            first = json.loads(lines[0])
        except json.JSONDecodeError:
            raise ValueError(f"{self.path}: not a diffujax per-item file (remove it or choose"
                             " another --per-item)") from None
        if not isinstance(first, dict) or first.get("header") != self.header:
            old = first.get("header", {}) if isinstance(first, dict) else {}
            old = old if isinstance(old, dict) else {}
            diff = sorted(k for k in set(old) | set(self.header) if old.get(k) != self.header.get(k))
            raise ValueError(f"{self.path} was computed from other settings or data"
                             f" ({', '.join(diff)} differ): remove it to start over, or choose"
                             " another --per-item")
        done = {}
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    break  # the last line, cut short by an interruption: that item runs again
                raise ValueError(self._damaged(number, "not JSON")) from None
            done[self._index(record, number)] = record
        self._rewrite(done)  # drops a cut-short tail, so appends start on a clean line
        return done

    def _index(self, record, number: int) -> int:
        """The item index of a record, checked to have every field a result needs."""
        if not isinstance(record, dict):
            raise ValueError(self._damaged(number, f"a {type(record).__name__}, not a record"))
        missing = [k for k in self.fields if k not in record]
        if missing:
            raise ValueError(self._damaged(number, f"missing {', '.join(missing)}"))
        index = record["index"]
        if type(index) is not int or index < 0:
            raise ValueError(self._damaged(number, f"index {index!r} is not an item number"))
        return index

    def _damaged(self, number: int, what: str) -> str:
        return (f"{self.path}:{number}: damaged record ({what}): remove that line (its item runs"
                " again) or the file (to start over)")

    def _rewrite(self, done):
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"header": self.header}) + "\n")
            for index in sorted(done):
                f.write(json.dumps(done[index]) + "\n")
        os.replace(tmp, self.path)

    def append(self, records: list[dict]) -> None:
        if self.path is None:
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", encoding="utf-8") as f:
            if new:
                f.write(json.dumps({"header": self.header}) + "\n")
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_task(runner: TaskRunner, data: str, *, limit: int | None = None,
             per_item: str | None = None, chunk_items: int | None = None,
             progress: bool | None = None, write: bool = True,
             computed_from: dict | None = None, items: list | None = None
             ) -> tuple[dict, list[dict]]:
    """Evaluate ``runner``'s task on the file ``data``; returns (result, per-item records).
    ``computed_from``: more of what the results depend on (the checkpoint), for the header;
    ``items``: the file's items, when they were read already."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit {limit}: must be >= 1")
    items = runner.spec.load(data) if items is None else items
    if limit is not None:
        items = items[:limit]
    header = dict(runner.header(data), data_sha256=file_sha256(data), **(computed_from or {}))
    log = PerItemFile(per_item if write else None, header, ("index", *runner.record_fields()))
    done = log.load()
    todo = [(i, item) for i, item in enumerate(items) if i not in done]
    chunk = chunk_items or max(1, runner.engine.batch_size)
    bar = tqdm(total=len(items), initial=len(done), desc=runner.name, unit="item",
               disable=(not sys.stderr.isatty()) if progress is None else not progress)
    with bar:
        for start in range(0, len(todo), chunk):
            records = runner.evaluate(todo[start:start + chunk])
            log.append(records)
            done.update((r["index"], r) for r in records)
            bar.update(len(records))
    records = [done[i] for i in range(len(items))]
    return runner.summarize(records, header), records

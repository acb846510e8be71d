"""``diffujax`` with injected faults, for the fault tests: ``python fault_worker.py ARGS...`` runs
the CLI exactly as ``python -m diffujax.cli ARGS...`` after installing the faults named in
``$DIFFUJAX_TEST_FAULTS``, a comma-separated list of ``WHAT#N=ACTION``:

    WHAT    elbo | samples (training-time evaluation calls), tb (TensorBoard event writes),
            jsonl (metrics.jsonl record writes), save (checkpoint saves), model (the writes of
            a model checkpoint's config and parameters: ``final/``, ``final_ema/``), ckpt_json
            (the JSON items of a checkpoint, written in the background of an asynchronous save:
            config, meta, integrity, in that order, three per save)
    N       the N-th such call of this process (1-based) triggers the action
    ACTION  kill (SIGKILL itself, mid-call), sigint2 (a double Ctrl-C: two SIGINTs), enospc
            (the write fails with "No space left on device"), wait (block until the file named
            by ``$DIFFUJAX_TEST_GO`` exists: the test decides when the run goes on)
"""

import errno
import os
import signal
import sys
import time


def _act(action: str):
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "sigint2":
        os.kill(os.getpid(), signal.SIGINT)  # the first sets the "save, then exit" flag ...
        os.kill(os.getpid(), signal.SIGINT)  # ... the second interrupts whatever runs
    elif action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == "wait":
        deadline = time.monotonic() + 600
        while not os.path.exists(os.environ["DIFFUJAX_TEST_GO"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        raise ValueError(f"unknown fault action {action!r}")


def _wrap(owner, name: str, nth: int, action: str):
    real = getattr(owner, name)
    calls = [0]

    def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            _act(action)
        return real(*args, **kwargs)

    setattr(owner, name, faulty)


def _wrap_async(owner, name: str, nth: int, action: str):
    """As ``_wrap``, for a coroutine function: the fault strikes when the coroutine runs (for
    orbax, in the background thread of an asynchronous save), not when it is created."""
    real = getattr(owner, name)
    calls = [0]

    async def faulty(*args, **kwargs):
        calls[0] += 1
        if calls[0] == nth:
            _act(action)
        return await real(*args, **kwargs)

    setattr(owner, name, faulty)


class _File:
    """A file object whose ``write`` is the faulty one (file types cannot be patched)."""

    def __init__(self, f):
        self.f = f

    def write(self, text):
        return self.f.write(text)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _faulty_jsonl(nth: int, action: str):
    from diffujax.runs import metrics

    real_init = metrics.RunLogger.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        if self._jsonl is not None:
            self._jsonl = _File(self._jsonl)
            _wrap(self._jsonl, "write", nth, action)

    metrics.RunLogger.__init__ = init


def install(spec: str):
    from orbax.checkpoint._src.handlers.json_checkpoint_handler import JsonCheckpointHandler

    from diffujax.checkpoint import store
    from diffujax.runs import metrics
    from diffujax.train import checkpointing, evaluation

    targets = {"elbo": (evaluation.Evaluator, "elbo"),
               "samples": (evaluation.Evaluator, "samples"),
               "tb": (metrics._TensorBoard, "write"),  # under RunLogger's error guard
               "save": (checkpointing.TrainCheckpointer, "save"),
               "model": (store, "write")}
    for item in filter(None, spec.split(",")):
        what, _, rest = item.partition("#")
        nth, _, action = rest.partition("=")
        if what == "jsonl":
            _faulty_jsonl(int(nth), action)
        elif what == "ckpt_json":
            _wrap_async(JsonCheckpointHandler, "_save_fn", int(nth), action)
        else:
            _wrap(*targets[what], int(nth), action)


if __name__ == "__main__":
    install(os.environ.get("DIFFUJAX_TEST_FAULTS", ""))
    from diffujax.cli import main

    sys.exit(main(sys.argv[1:]))

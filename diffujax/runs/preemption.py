"""Preemption: SIGTERM / SIGINT (or, on a multi-host run, JAX's preemption sync point) become a
flag the training loop reads once per step: "save a checkpoint, then exit"."""

from __future__ import annotations

import logging
import signal

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)


class PreemptionGuard:
    """``with PreemptionGuard() as guard: ... if guard.requested(step): save; exit``.

    JAX's preemption service only exists after ``jax.distributed.initialize`` (and then it owns
    SIGTERM), so a single-process run installs its own handlers that just set a flag; the loop
    checks it once per step. A second SIGINT interrupts immediately (the default handler is put
    back after the first), so a stuck run can still be killed with Ctrl-C twice.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._previous: dict = {}
        self._multihost = jax.process_count() > 1

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        log.warning("%s received: saving a checkpoint after the current step, then exiting",
                    self.signal_name)

    def __enter__(self):
        if not self._multihost:
            for s in (signal.SIGTERM, signal.SIGINT):
                try:
                    self._previous[s] = signal.signal(s, self._handle)
                except ValueError:  # not the main thread: leave signals alone
                    pass
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def requested(self, step: int) -> bool:
        """Must be called by every process at every step (multi-host: it is a collective)."""
        if self._multihost:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.signal_name = self.signal_name or "preemption notice"
            except RuntimeError:  # preemption service disabled
                pass
        return self.signal_name is not None

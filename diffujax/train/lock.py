"""One writer per run directory: ``diffujax train`` holds a lock on ``output_dir`` while it runs.

    with run_lock(output_dir):          # RunLockError (one line) if another run holds it
        ...

The interface is two calls, ``acquire()`` and ``release()``, so that a lock for another kind of
storage (a lease object with a generation precondition on an object store) can replace
``FileLock`` without touching the loop: ``run_lock`` picks the implementation for a path.

``FileLock`` is ``output_dir/.lock``, created with O_EXCL (atomic on local and network
filesystems), holding ``{"host", "pid", "start", "created"}``. A lock left by a process that is
gone (same host, and no process with that pid and start time) is stale: it is taken over, and
said so. A lock of another host cannot be checked from here; the message says how to remove it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

from diffujax import paths
from diffujax.processes import hostname, process_alive, process_start

LOCK_NAME = ".lock"


class RunLockError(OSError):
    """Another run holds the run directory (the message names it and how to proceed)."""


class FileLock:
    """A lock file in a local or network-mounted directory."""

    def __init__(self, directory):
        self.path = os.path.join(os.fspath(directory), LOCK_NAME)
        self.notes: list[str] = []  # what acquire() had to do (a stale lock taken over)
        self._held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"host": hostname(), "pid": pid, "start": process_start(pid),
                "created": time.time()}

    def _read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # being written, or damaged: treated as held by an unknown owner

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        for _ in range(3):  # the holder may go away between our tries
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._read()
                if owner is None:
                    continue
                if not self._is_stale(owner):
                    raise RunLockError(self._held_message(owner))
                # Rename first: of several processes taking over a stale lock, one wins.
                aside = f"{self.path}.stale-{os.getpid()}"
                try:
                    os.rename(self.path, aside)
                except FileNotFoundError:
                    continue
                os.remove(aside)
                self.notes.append(f"took over the stale lock {self.path} of process"
                                  f" {owner.get('pid')} on {owner.get('host')}, which is gone")
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._record(), f)
            self._held = True
            return
        raise RunLockError(f"{self.path}: could not take the run lock (it keeps changing hands)")

    def _is_stale(self, owner: dict) -> bool:
        if not owner:
            return False
        return process_alive(owner.get("host"), int(owner.get("pid", -1)),
                             owner.get("start")) is False

    def _held_message(self, owner: dict) -> str:
        directory = os.path.dirname(self.path)
        if not owner:
            return (f"{directory} is locked by {self.path}, which cannot be read; if no run is"
                    " using this output_dir, delete that file")
        who = f"process {owner.get('pid')} on {owner.get('host')}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("created", 0)))
        hint = ("if that machine's run has ended, delete the file" if owner.get("host")
                != hostname() else "wait for it to finish or stop it")
        return (f"output_dir {directory} is in use by another diffujax train ({who}, since"
                f" {since}); two runs must not write one directory: choose another output_dir,"
                f" or {hint} ({self.path})")

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        owner = self._read()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == hostname():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


class NoLock:
    """Object stores: no lock yet (a lease object with a generation precondition goes here)."""

    def __init__(self, directory):
        self.notes = [f"{directory}: no run lock on an object store yet; make sure only one run"
                      " writes this output_dir"]

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass


def lock_for(directory):
    """The lock implementation for ``directory``: ``FileLock`` for local and mounted paths."""
    return NoLock(directory) if paths.is_remote(directory) else FileLock(directory)


@contextlib.contextmanager
def run_lock(directory, notes: list | None = None):
    lock = lock_for(directory)
    lock.acquire()
    if notes is not None:
        notes.extend(lock.notes)
    try:
        yield lock
    finally:
        lock.release()

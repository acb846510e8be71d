"""One writer per run directory: ``diffujax train`` holds a lock on ``output_dir`` while it runs.

    with run_lock(output_dir) as lock:  # RunLockError (one line) if another run holds it
        ...
        lock.check()                    # at every step: RunLockError if the lock was lost

``run_lock`` picks the implementation for a path (``lock_for``); each has ``acquire()``,
``release()`` and ``check()``.

``FileLock`` (local and mounted directories) is ``output_dir/.lock``, created with O_EXCL (atomic
on local and network filesystems), holding ``{"host", "pid", "start", "created"}``. A lock left by
a process that is gone (same host, and no process with that pid and start time) is stale: it is
taken over, and said so. A lock of another host cannot be checked from here; the message says how
to remove it.

``LeaseLock`` (gs:// buckets, which have no exclusive create of files nor processes to ask) is
the object ``output_dir/.lock`` holding the same fields plus ``expires`` and a ``run`` id: a
lease. It is created only if absent (a write with the generation precondition 0), and a daemon
thread renews it every ``lease / 3`` seconds with a write conditioned on the generation we wrote
last, so only its holder can renew it. A lease whose ``expires`` has passed (its run stopped
renewing it: killed, or cut off from the bucket), or whose process on this host is gone, is taken
over, and said so; a live one refuses. If a renewal finds the lease gone or another run's, or
cannot renew it before it expires, ``check()`` raises and the run stops: another run may own the
directory now. Release deletes it only while it is still ours. The lease is ``LEASE_S`` seconds,
``$DIFFUJAX_LEASE_S`` to change it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid

from diffujax import paths
from diffujax.runs import gcs_objects
from diffujax.processes import hostname, process_alive, process_start

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
LEASE_S = 300.0  # how long a lease lives without renewal (renewed every third of it)
LEASE_ENV = "DIFFUJAX_LEASE_S"


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
        hint = ("if that machine's run has ended, delete the file" if owner.get("host")
                != hostname() else "wait for it to finish or stop it")
        return (f"output_dir {directory} is in use by another diffujax train ({who}, since"
                f" {_when(owner.get('created'))}); two runs must not write one directory: choose"
                f" another output_dir, or {hint} ({self.path})")

    def check(self) -> None:
        """A lock file cannot be taken from a live process (only a gone one's is taken over)."""

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        owner = self._read()
        if owner and owner.get("pid") == os.getpid() and owner.get("host") == hostname():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def lease_seconds() -> float:
    """``$DIFFUJAX_LEASE_S`` if set, else ``LEASE_S``."""
    text = os.environ.get(LEASE_ENV, "").strip()
    if not text:
        return LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise ValueError(f"{LEASE_ENV}={text}: must be a number of seconds > 0")
    return value


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t or 0))


def _owner(owner: dict) -> str:
    return f"run {owner.get('run')} (process {owner.get('pid')} on {owner.get('host')})"


class LeaseLock:
    """A lease object in a bucket, renewed by a heartbeat thread while the run lives."""

    def __init__(self, directory, lease_s: float | None = None):
        self.url = str(paths.resolve(directory) / LOCK_NAME)
        self.lease_s = lease_seconds() if lease_s is None else float(lease_s)
        self.run_id = uuid.uuid4().hex[:12]
        self.notes: list[str] = []
        self.generation: int | None = None  # of the lease we wrote last; None: not held
        self.expires = 0.0
        self._created = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[dict, int] | None:
        """The lease object's record ({} if unreadable) and generation, None if there is none."""
        got = gcs_objects.read_object(self.url)
        if got is None:
            return None
        data, generation = got
        try:
            owner = json.loads(data)
        except ValueError:
            owner = None
        return (owner if isinstance(owner, dict) else {}), generation

    def _write(self, if_generation: int) -> None:
        """Write our record (expiring one lease from now) if the object is at ``if_generation``."""
        pid = os.getpid()
        expires = time.time() + self.lease_s
        record = {"host": hostname(), "pid": pid, "start": process_start(pid),
                  "created": self._created, "expires": expires, "run": self.run_id}
        data = json.dumps(record).encode()
        try:
            generation = gcs_objects.write_object(self.url, data, if_generation)
        except FileExistsError:
            # A retried request whose first try landed fails its own precondition: is it ours?
            current = self._read()
            if current is None or current[0] != record:
                raise
            generation = current[1]
        self.generation, self.expires = generation, expires

    def _takeover_reason(self, owner: dict) -> str | None:
        """Why the lease of ``owner`` may be taken over, None while it is live."""
        if not owner:
            return None
        if float(owner.get("expires", 0)) < time.time():
            return f"it expired at {_when(owner.get('expires'))} (that run stopped renewing it)"
        if process_alive(owner.get("host"), int(owner.get("pid", -1)),
                         owner.get("start")) is False:
            return "its process is gone"
        return None

    def _held_message(self, owner: dict) -> str:
        directory = self.url.rsplit("/", 1)[0]
        if not owner:
            return (f"{directory} is locked by {self.url}, which cannot be read; if no run is"
                    " using this output_dir, delete that object")
        return (f"output_dir {directory} is in use by another diffujax train ({_owner(owner)},"
                f" since {_when(owner.get('created'))}); two runs must not write one directory:"
                f" choose another output_dir, wait until its lease expires"
                f" ({_when(owner.get('expires'))}, renewed while it runs), or, if that run has"
                f" ended, delete {self.url}")

    def acquire(self) -> None:
        for _ in range(3):  # the holder may go away between our tries
            current = self._read()
            reason = None
            if current is not None:
                reason = self._takeover_reason(current[0])
                if reason is None:
                    raise RunLockError(self._held_message(current[0]))
            self._created = time.time()
            try:
                self._write(0 if current is None else current[1])
            except FileExistsError:
                continue  # another run wrote it between our read and our write
            if current is not None:
                self.notes.append(f"took over the run lease {self.url} of"
                                  f" {_owner(current[0])}: {reason}")
            self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                            name="diffujax-run-lease")
            self._thread.start()
            return
        raise RunLockError(f"{self.url}: could not take the run lease (it keeps changing hands)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except RunLockError as e:
                self._lost = str(e)
                return
            except Exception as e:  # noqa: BLE001 - the bucket may answer again before expiry
                if time.time() >= self.expires:
                    self._lost = (f"could not renew the run lease {self.url} before it expired"
                                  f" ({e}); another run may own this output_dir now")
                    return
                log.warning("could not renew the run lease %s (%s); retrying until it expires"
                            " at %s", self.url, e, _when(self.expires))

    def renew(self) -> None:
        """Extend the lease by one period (the heartbeat does this); RunLockError if it is not
        ours any more."""
        current = self._read()
        if current is not None and current[0].get("run") == self.run_id:
            try:
                self._write(self.generation)
                return
            except FileExistsError:  # someone wrote it since our read
                current = self._read()
        if current is None:
            what = "was deleted"
        else:
            what = (f"was taken over by {_owner(current[0])} at"
                    f" {_when(current[0].get('created'))}")
        raise RunLockError(f"lost the run lease {self.url}: it {what}; this run stops so that"
                           " two runs do not write one output_dir (its last checkpoint is kept)")

    def check(self) -> None:
        """RunLockError if the heartbeat lost the lease (the loop calls this at every step)."""
        if self._lost:
            raise RunLockError(self._lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.generation is None or self._lost:
            return
        self.generation = None
        try:
            current = self._read()
            if current is not None and current[0].get("run") == self.run_id:
                gcs_objects.delete_object(self.url, current[1])
        except Exception as e:  # noqa: BLE001 - it expires by itself; the run's result stands
            log.warning("could not delete the run lease %s (%s); it expires at %s", self.url, e,
                        _when(self.expires))


class NoLock:
    """Object stores without generation preconditions (s3://, ...): no lock."""

    def __init__(self, directory):
        self.notes = [f"{directory}: no run lock on this object store; make sure only one run"
                      " writes this output_dir"]

    def acquire(self) -> None:
        pass

    def check(self) -> None:
        pass

    def release(self) -> None:
        pass


def lock_for(directory):
    """The lock implementation for ``directory``: ``FileLock`` for local and mounted paths, a
    ``LeaseLock`` on gs://, no lock on other object stores."""
    if not paths.is_remote(directory):
        return FileLock(directory)
    if gcs_objects.supports_generations(directory):
        return LeaseLock(directory)
    return NoLock(directory)


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

"""One writer per run directory: ``diffujax train`` holds a lock on ``output_dir`` while it runs.

    with run_lock(output_dir) as lock:  # RunLockError (one line) if another run holds it
        ...
        lock.check()                    # at every step: RunLockError if the lock was lost

The lock is the file or object ``output_dir/.lock`` holding ``{"host", "pid", "start",
"created"}``; ``run_lock`` picks the implementation for a path (``lock_for``). Both take over a
lock whose process is gone (same host, and no process with that pid and start time), and say so;
a live one refuses, naming its owner and how to proceed.

``FileLock`` (local and mounted directories) creates the file with O_EXCL (atomic on local and
network filesystems). A lock of another host cannot be checked from here.

``LeaseLock`` (gs:// buckets, which have no exclusive create of files nor processes to ask) adds
``expires`` and a ``run`` id: a lease. It is created only if absent (a write with the generation
precondition 0), and a daemon thread renews it every ``lease / 3`` seconds with a write
conditioned on the generation we wrote last, so only its holder can renew it. A lease whose
``expires`` has passed (its run stopped renewing it: killed, or cut off from the bucket) is also
taken over. If a renewal finds the lease gone or another run's, or cannot renew it before it
expires, ``check()`` raises and the run stops: another run may own the directory now. Release
deletes it only while it is still ours. The lease is ``LEASE_S`` seconds, ``$DIFFUJAX_LEASE_S``
to change it.
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


def _when(t) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t or 0))


def _owner(owner: dict) -> str:
    process = f"process {owner.get('pid')} on {owner.get('host')}"
    return f"run {owner['run']} ({process})" if "run" in owner else process


def _parse(data) -> dict:
    """A lock's record; {} if unreadable (being written, or damaged: an unknown owner)."""
    try:
        owner = json.loads(data)
    except ValueError:
        return {}
    return owner if isinstance(owner, dict) else {}


class FileLock:
    """A lock file in a local or network-mounted directory. Subclasses change where the record
    lives (``_read``, ``_take``, ``release``) and when a live-looking owner has lost it."""

    what, thing = "run lock", "file"

    def __init__(self, directory):
        self.path = os.path.join(os.fspath(directory), LOCK_NAME)
        self.notes: list[str] = []  # what acquire() had to do (a stale lock taken over)
        self._created = 0.0
        self._held = False

    def _record(self) -> dict:
        pid = os.getpid()
        return {"host": hostname(), "pid": pid, "start": process_start(pid),
                "created": self._created}

    def _read(self) -> tuple[dict, object] | None:
        """The lock's record ({} if unreadable) and version, None if there is no lock."""
        try:
            with open(self.path) as f:
                return _parse(f.read()), None
        except FileNotFoundError:
            return None

    def _take(self, current) -> None:
        """Write our record where ``current`` (``_read``'s answer) was; FileExistsError if another
        process got there first."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        if current is not None:
            # Rename first: of several processes taking over a stale lock, one wins.
            aside = f"{self.path}.stale-{os.getpid()}"
            try:
                os.rename(self.path, aside)
            except FileNotFoundError:
                raise FileExistsError(self.path) from None
            os.remove(aside)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        self._held = True

    def _takeover_reason(self, owner: dict) -> str | None:
        """Why the lock of ``owner`` may be taken over, None while it is live."""
        if not owner:
            return None
        if process_alive(owner.get("host"), int(owner.get("pid", -1)),
                         owner.get("start")) is False:
            return "its process is gone"
        return None

    def _way_out(self, owner: dict) -> str:
        if owner.get("host") != hostname():
            return f"if that machine's run has ended, delete the file ({self.path})"
        return f"wait for it to finish or stop it ({self.path})"

    def acquire(self) -> None:
        for _ in range(3):  # the holder may go away between our tries
            current = self._read()
            reason = None
            if current is not None:
                owner = current[0]
                reason = self._takeover_reason(owner)
                if reason is None:
                    directory = os.path.dirname(self.path)
                    if not owner:
                        raise RunLockError(
                            f"{directory} is locked by {self.path}, which cannot be read; if no"
                            f" run is using this output_dir, delete that {self.thing}")
                    raise RunLockError(
                        f"output_dir {directory} is in use by another diffujax train"
                        f" ({_owner(owner)}, since {_when(owner.get('created'))}); two runs must"
                        f" not write one directory: choose another output_dir, or"
                        f" {self._way_out(owner)}")
            self._created = time.time()
            try:
                self._take(current)
            except FileExistsError:
                continue  # another run wrote it between our read and our write
            if current is not None:
                self.notes.append(f"took over the {self.what} {self.path} of"
                                  f" {_owner(current[0])}: {reason}")
            return
        raise RunLockError(f"{self.path}: could not take the {self.what} (it keeps changing"
                           " hands)")

    def check(self) -> None:
        """A lock file cannot be taken from a live process (only a gone one's is taken over)."""

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        current = self._read()
        owner = current[0] if current else {}
        if owner.get("pid") == os.getpid() and owner.get("host") == hostname():
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def lease_seconds() -> float:
    """``$DIFFUJAX_LEASE_S`` if set, else ``LEASE_S``."""
    text = os.environ.get(LEASE_ENV, "").strip()
    try:
        value = float(text or LEASE_S)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise ValueError(f"{LEASE_ENV}={text}: must be a number of seconds > 0")
    return value


class LeaseLock(FileLock):
    """A lease object in a bucket, renewed by a heartbeat thread while the run lives."""

    what, thing = "run lease", "object"

    def __init__(self, directory, lease_s: float | None = None):
        super().__init__(directory)
        self.path = self.url = str(paths.resolve(directory) / LOCK_NAME)
        self.lease_s = lease_seconds() if lease_s is None else float(lease_s)
        self.run_id = uuid.uuid4().hex[:12]
        self.generation: int | None = None  # of the lease we wrote last; None: not held
        self.expires = 0.0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[dict, int] | None:
        got = gcs_objects.read_object(self.url)
        return None if got is None else (_parse(got[0]), got[1])

    def _write(self, if_generation: int) -> None:
        """Write our record (expiring one lease from now) if the object is at ``if_generation``."""
        expires = time.time() + self.lease_s
        record = dict(self._record(), expires=expires, run=self.run_id)
        try:
            generation = gcs_objects.write_object(self.url, json.dumps(record).encode(),
                                                  if_generation)
        except FileExistsError:
            # A retried request whose first try landed fails its own precondition: is it ours?
            current = self._read()
            if current is None or current[0] != record:
                raise
            generation = current[1]
        self.generation, self.expires = generation, expires

    def _take(self, current) -> None:
        self._write(0 if current is None else current[1])
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="diffujax-run-lease")
        self._thread.start()

    def _takeover_reason(self, owner: dict) -> str | None:
        if owner and float(owner.get("expires", 0)) < time.time():
            return f"it expired at {_when(owner.get('expires'))} (that run stopped renewing it)"
        return super()._takeover_reason(owner)

    def _way_out(self, owner: dict) -> str:
        return (f"wait until its lease expires ({_when(owner.get('expires'))}, renewed while it"
                f" runs), or, if that run has ended, delete {self.url}")

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
        what = ("was deleted" if current is None else
                f"was taken over by {_owner(current[0])} at {_when(current[0].get('created'))}")
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


class NoLock(FileLock):
    """Object stores without generation preconditions (s3://, ...): no lock."""

    def __init__(self, directory):
        super().__init__(directory)
        self.notes = [f"{directory}: no run lock on this object store; make sure only one run"
                      " writes this output_dir"]

    def acquire(self) -> None:
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

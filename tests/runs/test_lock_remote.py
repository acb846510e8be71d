"""The run lease on gs:// (``LeaseLock``) against a real GCS API (the emulator of
tests/gcs_emulator.py): a live lease refuses a second run with its owner's name, an expired one
(or one of a process that is gone) is taken over and said, the heartbeat renews it, a lease taken
from us or deleted is reported by ``check()``, release deletes only our own lease; ``diffujax
train`` on a bucket with a live foreign lease exits 2 with one line, writing nothing, and a
training run whose lease is taken stops within a step (exit 2, no emergency checkpoint).

The emulator honours ``ifGenerationMatch`` as GCS does (tests/gcs_emulator_server.py adds it), so
a run that loses the race between reading a stale lease and taking it over is refused by the
server, as on GCS. References: the lease object as the server holds it (read back with plain
JSON), the clock."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest

from diffujax import paths
from diffujax.cli import main as cli
from diffujax.runs import gcs_objects
from diffujax.runs import lock as lock_module
from diffujax.runs.metrics import RunLogger
from diffujax.runs.lock import LOCK_NAME, LeaseLock, RunLockError, lock_for

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _object(url):
    got = gcs_objects.read_object(f"{url}/{LOCK_NAME}")
    return None if got is None else json.loads(got[0])


def _plant(url, **record):
    """A lease object of another run, as that run would have written it."""
    now = time.time()
    owner = {"host": "elsewhere", "pid": 4242, "start": None, "created": now - 60,
             "expires": now + 300, "run": "foreign0run0"} | record
    target = f"{url}/{LOCK_NAME}"
    for _ in range(100):
        # A live holder renews between our read and our write now and then (the server then
        # refuses the write, as GCS would): read the new generation and write again.
        got = gcs_objects.read_object(target)
        try:
            gcs_objects.write_object(target, json.dumps(owner).encode(),
                                     0 if got is None else got[1])
            return owner
        except FileExistsError:
            continue
    raise AssertionError(f"could not plant a lease at {target}: it changed under every write")


def _wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_gs_gets_a_lease_and_other_object_stores_none(gcs):
    assert isinstance(lock_for(gcs.url_for("x")), LeaseLock)
    assert isinstance(lock_for("s3://bucket/run"), lock_module.NoLock)


def test_a_live_lease_refuses_a_second_run_until_released(gcs):
    url = gcs.url_for("lease")
    first = LeaseLock(url, lease_s=30)
    t0 = time.time()
    first.acquire()
    try:
        owner = _object(url)
        assert owner["run"] == first.run_id and owner["pid"] == os.getpid()
        assert owner["host"] == socket.gethostname()
        assert t0 <= owner["created"] <= time.time()
        assert owner["expires"] == pytest.approx(owner["created"] + 30, abs=1)
        with pytest.raises(RunLockError) as e:
            LeaseLock(url, lease_s=30).acquire()
        message = str(e.value)
        assert "\n" not in message
        assert (f"in use by another diffujax train (run {first.run_id} (process {os.getpid()}"
                f" on {socket.gethostname()}), since") in message
        assert "wait until its lease expires" in message
        assert f"delete {url}/{LOCK_NAME}" in message
        first.check()  # still ours
    finally:
        first.release()
    assert gcs.objects(url) == []
    second = LeaseLock(url, lease_s=30)
    second.acquire()
    second.release()
    assert gcs.objects(url) == []


def test_an_expired_lease_or_one_of_a_gone_process_is_taken_over_and_said(gcs):
    url = gcs.url_for("lease")
    foreign = _plant(url, expires=time.time() - 5)
    lock = LeaseLock(url, lease_s=30)
    lock.acquire()
    try:
        assert len(lock.notes) == 1 and "took over the run lease" in lock.notes[0]
        assert "run foreign0run0 (process 4242 on elsewhere)" in lock.notes[0]
        assert "it expired at" in lock.notes[0]
        assert _object(url)["run"] == lock.run_id != foreign["run"]
    finally:
        lock.release()

    # not expired, but its process on this host is gone (a killed run, rerun at once)
    _plant(url, host=socket.gethostname(), pid=2**22 + 17, start="1")
    lock = LeaseLock(url, lease_s=30)
    lock.acquire()
    try:
        assert "its process is gone" in lock.notes[0]
    finally:
        lock.release()

    # an unreadable lease is not taken over
    target = f"{url}/{LOCK_NAME}"
    gcs_objects.write_object(target, b"{half", 0)
    with pytest.raises(RunLockError, match="cannot be read; if no run is using this output_dir,"
                                           " delete that object"):
        LeaseLock(url).acquire()


def test_of_two_runs_taking_over_one_expired_lease_only_one_wins(gcs):
    """Both read the expired lease; the first writes its own; the second's write, conditioned on
    the generation it read, is refused by the server, and it reads the live lease and stops."""
    url = gcs.url_for("lease")
    _plant(url, expires=time.time() - 5)
    second = LeaseLock(url, lease_s=30)
    stale = second._read()  # what the second run saw before the first one wrote
    first = LeaseLock(url, lease_s=30)
    first.acquire()
    try:
        reads = iter([stale])
        second._read = lambda: next(reads, None) or LeaseLock._read(second)
        with pytest.raises(RunLockError, match=f"run {first.run_id}"):
            second.acquire()
        assert _object(url)["run"] == first.run_id
        first.check()  # still ours
        with pytest.raises(FileExistsError):  # the server refuses a write at a stale generation
            gcs_objects.write_object(f"{url}/{LOCK_NAME}", b"{}", stale[1])
    finally:
        first.release()


def test_the_heartbeat_renews_and_release_deletes_only_our_lease(gcs):
    url = gcs.url_for("lease")
    lock = LeaseLock(url, lease_s=0.9)  # renewed every 0.3 s
    lock.acquire()
    try:
        first_expiry = _object(url)["expires"]
        time.sleep(1.5)  # past the first expiry: only renewals keep it alive
        assert _object(url)["expires"] > max(first_expiry, time.time())
        lock.check()
        with pytest.raises(RunLockError, match="in use by another diffujax train"):
            LeaseLock(url).acquire()
    finally:
        lock.release()
    assert gcs.objects(url) == []

    # a lease that another run has taken from us is left alone on release
    lock = LeaseLock(url, lease_s=30)
    lock.acquire()
    foreign = _plant(url)
    lock.release()
    assert _object(url) == foreign


def test_a_stolen_or_deleted_lease_is_detected(gcs):
    url = gcs.url_for("lease")
    lock = LeaseLock(url, lease_s=0.6)
    lock.acquire()
    try:
        _plant(url)
        assert _wait_for(lambda: lock._lost), "the heartbeat did not notice the takeover"
        with pytest.raises(RunLockError, match=r"lost the run lease .*: it was taken over by run"
                                               r" foreign0run0 \(process 4242 on elsewhere\)"):
            lock.check()
    finally:
        lock.release()
    assert _object(url)["run"] == "foreign0run0"  # not ours: kept

    url = gcs.url_for("lease")
    lock = LeaseLock(url, lease_s=0.6)
    lock.acquire()
    try:
        target = f"{url}/{LOCK_NAME}"  # retried when a renewal slips in between read and delete
        assert any(gcs_objects.delete_object(target, gcs_objects.read_object(target)[1])
                   for _ in range(100))
        assert _wait_for(lambda: lock._lost)
        with pytest.raises(RunLockError, match="it was deleted; this run stops"):
            lock.check()
    finally:
        lock.release()


def test_a_lease_that_cannot_be_renewed_is_lost_when_it_expires(gcs, monkeypatch):
    url = gcs.url_for("lease")
    lock = LeaseLock(url, lease_s=0.6)
    lock.acquire()
    try:
        def unreachable(*args, **kwargs):
            raise ConnectionError("bucket unreachable")

        monkeypatch.setattr(gcs_objects, "read_object", unreachable)
        time.sleep(0.25)
        lock.check()  # a failed renewal before expiry is retried, not fatal
        assert _wait_for(lambda: lock._lost)
        with pytest.raises(RunLockError, match="could not renew the run lease .* before it"
                                               " expired .*bucket unreachable"):
            lock.check()
    finally:
        monkeypatch.undo()
        lock.release()


def test_lease_length_from_the_environment(monkeypatch):
    monkeypatch.setenv("DIFFUJAX_LEASE_S", "12.5")
    assert lock_module.lease_seconds() == 12.5
    for bad in ("0", "-3", "soon", "nan"):
        monkeypatch.setenv("DIFFUJAX_LEASE_S", bad)
        with pytest.raises(ValueError, match=f"DIFFUJAX_LEASE_S={bad}: must be a number of"
                                             " seconds > 0"):
            lock_module.lease_seconds()


def test_train_refuses_a_bucket_with_a_live_foreign_lease(gcs, capsys):
    url = gcs.url_for("run")
    foreign = _plant(url)
    status = cli(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), f"output_dir={url}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2
    assert len(err) == 1, err
    assert err[0].startswith(f"diffujax train: error: output_dir {url} is in use by another"
                             " diffujax train (run foreign0run0 (process 4242 on elsewhere)")
    assert f"delete {url}/{LOCK_NAME}" in err[0]
    assert gcs.objects(url) == [f"{url.removeprefix('gs://diffujax-test/')}/{LOCK_NAME}"]
    assert _object(url) == foreign


def test_a_run_whose_lease_is_taken_stops_at_the_next_step(gcs, tmp_path):
    url = gcs.url_for("run")
    log = tmp_path / "train.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), DIFFUJAX_LEASE_S="1.5",
               JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "diffujax.cli", "train", "--config", "configs/tiny.yaml",
             "train.steps=100000", "checkpoint.every_steps=100000", "logging.every_steps=1",
             "logging.eval_every=0", "logging.sample_every=0", f"output_dir={url}"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        assert _wait_for(lambda: "step 3/" in log.read_text() or proc.poll() is not None,
                         timeout=120), log.read_text()[-2000:]
        assert proc.poll() is None, log.read_text()[-2000:]
        _plant(url)
        stolen = time.monotonic()
        assert proc.wait(timeout=30) == 2
        assert time.monotonic() - stolen < 10  # one heartbeat (0.5 s) and one step
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith(f"diffujax train: error: lost the run lease {url}/{LOCK_NAME}: it was"
                           " taken over by run foreign0run0 (process 4242 on elsewhere)"), last
    assert not [n for n in gcs.objects(url) if "/checkpoints/" in n]  # no emergency save
    assert _object(url)["run"] == "foreign0run0"


def test_a_logger_abandoned_after_a_lost_lease_writes_nothing_more(gcs):
    url = gcs.url_for("run")
    logger = RunLogger(url, total_steps=4, tensorboard=False, enabled=True)
    logger.train(1, {"loss": 1.5})
    logger.flush()  # what the run had written while the lease was its own
    logger.train(2, {"loss": 1.25})
    logger.abandon()
    records = [json.loads(line) for line in
               paths.resolve(f"{url}/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]

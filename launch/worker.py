#!/usr/bin/env python3
"""The half of the launcher that runs on each TPU host (standard library only, Python >= 3.8).

``launch/tpu.py`` ships the code, then runs this file over ssh on every host:

    worker.py start  --root R --code DIR --run NAME --worker G [--install EXTRA] [--venv V]
                     [--env KEY=VALUE ...] -- ARGS...      start `python -m diffujax.cli ARGS` detached
    worker.py stop   --root R [--run NAME] [--grace S]    SIGTERM the job (a checkpoint is saved), then SIGKILL
    worker.py status --root R [--run NAME]                running / exited N / not started
    worker.py logs   --root R [--run NAME] [--lines N] [--follow]

Layout under the root (``~/diffujax`` by default), nothing of which is ever deleted:

    code/<digest>/             one directory per shipped tree (identical trees share one)
    venv/                      the Python environment, created on first use
    runs/<run>/worker-G.log    stdout + stderr of process G; worker-G.pid, worker-G.exit beside it
    current                    the name of the newest run (the default of stop / status / logs)

The job is detached: it runs in its own session (``setsid``) with stdin closed and output in the log
file, so a dropped ssh connection does not reach it. A small supervisor (``supervise``, also this
file) waits for it and records its exit status.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

# Device files a process holds while it owns the TPU (TPU v4+ expose /dev/accel*, v5e/v6e VFIO).
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")
LIBTPU_LOCKFILE = "/tmp/libtpu_lockfile"
MIN_PYTHON = (3, 11)  # diffujax's requires-python


class WorkerError(Exception):
    pass


# ------------------------------------------------------------------------------------ processes


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its parent) no longer holds anything
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pids, timeout: float) -> list:
    deadline = time.time() + timeout
    pids = list(pids)
    while pids and time.time() < deadline:
        time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
    return pids


def _signal_group(pgid: int, sig) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _device_patterns():
    # DIFFUJAX_TPU_DEVICES (colon-separated globs) lets the tests stand a plain file in for a TPU.
    env = os.environ.get("DIFFUJAX_TPU_DEVICES")
    return tuple(env.split(":")) if env else TPU_DEVICE_GLOBS


def tpu_holders() -> dict:
    """pid -> device path for every process (other than this one) with a TPU device open."""
    devices = {os.path.realpath(p) for pattern in _device_patterns() for p in glob.glob(pattern)}
    holders = {}
    if not devices:
        return holders
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        pid = int(fd_dir.split("/")[2])
        if pid == os.getpid():
            continue
        try:
            for fd in os.listdir(fd_dir):
                target = os.readlink(os.path.join(fd_dir, fd))
                if target in devices:
                    holders[pid] = target
                    break
        except OSError:  # gone, or not ours to inspect
            continue
    return holders


def _kill(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise WorkerError(f"pid {pid} holds the TPU and belongs to another user: sudo kill {pid}, "
                          "then start again") from None


def kill_tpu_holders(grace: float) -> list:
    """SIGTERM, then SIGKILL, every process holding the TPU; clear libtpu's stale lock file."""
    holders = tpu_holders()
    for pid, device in sorted(holders.items()):
        print(f"killing pid {pid}: it holds {device}", flush=True)
        _kill(pid, signal.SIGTERM)
    for pid in _wait_gone(holders, grace):
        _kill(pid, signal.SIGKILL)
    left = _wait_gone(holders, 10)
    if left:
        raise WorkerError(f"processes {left} still hold the TPU after SIGKILL (owned by another "
                          f"user? try: sudo kill -9 {' '.join(map(str, left))})")
    if not tpu_holders() and os.path.exists(LIBTPU_LOCKFILE):
        try:
            os.remove(LIBTPU_LOCKFILE)
        except OSError:
            pass
    return sorted(holders)


def host_python() -> str:
    """The newest Python >= 3.11 on PATH, to create the venv with (TPU VM images based on Ubuntu
    22.04 ship 3.10 as python3)."""
    for name in ("python3.13", "python3.12", "python3.11", "python3"):
        path = shutil.which(name)
        if not path:
            continue
        try:
            out = subprocess.run([path, "-c", "import sys; print(*sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=60).stdout.split()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if len(out) == 2 and tuple(map(int, out)) >= MIN_PYTHON:
            return path
    raise WorkerError("no Python >= 3.11 on this host to create the venv with (Ubuntu 22.04: sudo "
                      "apt-get install -y python3.11 python3.11-venv), or pass --venv")


# ------------------------------------------------------------------------------------ run files


class Run:
    def __init__(self, root: str, name: str, worker: int | None = None):
        self.root, self.name = root, name
        self.dir = os.path.join(root, "runs", name)
        self.worker = worker

    @classmethod
    def find(cls, root: str, name: str | None) -> "Run":
        if name is None:
            try:
                with open(os.path.join(root, "current")) as f:
                    name = f.read().strip()
            except FileNotFoundError:
                raise WorkerError(f"no run has been started under {root}") from None
        run = cls(root, name)
        logs = sorted(glob.glob(os.path.join(run.dir, "worker-*.log")))
        if not logs:
            raise WorkerError(f"no run named {name!r} under {root}")
        run.worker = int(os.path.basename(logs[0])[len("worker-"):-len(".log")])
        return run

    def path(self, suffix: str) -> str:
        return os.path.join(self.dir, f"worker-{self.worker}.{suffix}")

    def pid(self) -> int | None:
        try:
            with open(self.path("pid")) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def exit_status(self) -> int | None:
        try:
            with open(self.path("exit")) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.pid()
        return pid is not None and self.exit_status() is None and _alive(pid)


def stop_run(run: Run, grace: float) -> str:
    """SIGTERM the job's process group (diffujax saves a checkpoint on SIGTERM), SIGKILL after grace."""
    pid = run.pid()
    if pid is None or not run.running():
        return f"run {run.name} worker {run.worker}: not running"
    _signal_group(pid, signal.SIGTERM)
    if _wait_gone([pid], grace):
        _signal_group(pid, signal.SIGKILL)
        _wait_gone([pid], 10)
        return f"run {run.name} worker {run.worker}: killed (SIGKILL after {grace:g} s)"
    return f"run {run.name} worker {run.worker}: stopped"


# ------------------------------------------------------------------------------------- commands


def _parse_env(pairs) -> dict:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise WorkerError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


def cmd_start(a) -> int:
    root = os.path.abspath(a.root)
    code = os.path.abspath(a.code)
    venv = os.path.abspath(a.venv or os.path.join(root, "venv"))
    run = Run(root, a.run, a.worker)
    if os.path.exists(run.path("log")):
        raise WorkerError(f"run {a.run!r} already has {run.path('log')}; pick another --run-name")
    os.makedirs(run.dir, exist_ok=True)

    # One job per host: the previous run (if still going), then anything else holding the TPU.
    try:
        previous = Run.find(root, None)
    except WorkerError:
        previous = None
    if previous is not None and previous.running():
        print(stop_run(previous, a.grace), flush=True)
    kill_tpu_holders(a.grace)

    python = os.path.join(venv, "bin", "python")
    if a.install is not None:
        if not os.path.exists(python):
            subprocess.run([host_python(), "-m", "venv", venv], check=True)
        target = f"{code}[{a.install}]" if a.install else code
        with open(run.path("install.log"), "w") as log:
            done = subprocess.run([python, "-m", "pip", "install", "-e", target],
                                  stdout=log, stderr=subprocess.STDOUT)
        if done.returncode:
            with open(run.path("install.log")) as f:
                tail = f.read()[-2000:]
            raise WorkerError(f"pip install -e {target} failed (full log {run.path('install.log')}):"
                              f"\n{tail}")
    elif not os.path.exists(python):
        raise WorkerError(f"{python} does not exist: drop --no-install or pass --venv")

    env = dict(os.environ, PYTHONUNBUFFERED="1", **_parse_env(a.env))
    command = [python, "-m", "diffujax.cli", *a.args]
    with open(run.path("command.json"), "w") as f:
        json.dump({"argv": command, "cwd": code, "env": _parse_env(a.env)}, f, indent=1)
    with open(run.path("log"), "ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "supervise", run.path("exit"), "--",
             *command],
            cwd=code, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    with open(run.path("pid"), "w") as f:
        f.write(str(supervisor.pid))
    with open(os.path.join(root, "current"), "w") as f:
        f.write(a.run)
    print(f"started run {a.run} worker {a.worker}: pid {supervisor.pid}, log {run.path('log')}",
          flush=True)
    return 0


def cmd_supervise(a) -> int:
    """Run the job in this (new) session and record its exit status when it ends."""
    # Signals sent to the whole group reach the job directly; the supervisor only waits.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    child = subprocess.Popen(a.args)
    while True:
        try:
            status = child.wait()
            break
        except InterruptedError:
            continue
    status = status if status >= 0 else 128 - status  # killed by signal N -> 128 + N
    with open(a.exit_file + ".tmp", "w") as f:
        f.write(str(status))
    os.replace(a.exit_file + ".tmp", a.exit_file)
    return status


def cmd_stop(a) -> int:
    print(stop_run(Run.find(os.path.abspath(a.root), a.run), a.grace))
    return 0


def cmd_status(a) -> int:
    run = Run.find(os.path.abspath(a.root), a.run)
    status = run.exit_status()
    state = ("running" if run.running() else
             f"exited {status}" if status is not None else "not running (no exit status)")
    print(json.dumps({"run": run.name, "worker": run.worker, "state": state, "exit": status,
                      "log": run.path("log")}))
    return 0


def cmd_logs(a) -> int:
    run = Run.find(os.path.abspath(a.root), a.run)
    argv = ["tail", "-n", str(a.lines)]
    if a.follow and run.running():
        argv += ["-F", f"--pid={run.pid()}"]  # ends when the job does
    os.execvp("tail", argv + [run.path("log")])
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="worker.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start")
    s.add_argument("--root", required=True)
    s.add_argument("--code", required=True)
    s.add_argument("--run", required=True)
    s.add_argument("--worker", type=int, required=True)
    s.add_argument("--venv")
    s.add_argument("--install", help="pip install -e CODE[EXTRA] first ('' for no extra)")
    s.add_argument("--env", action="append", default=[])
    s.add_argument("--grace", type=float, default=120.0)
    s.add_argument("args", nargs="*")
    s.set_defaults(fn=cmd_start)
    s = sub.add_parser("supervise")
    s.add_argument("exit_file")
    s.add_argument("args", nargs="+")
    s.set_defaults(fn=cmd_supervise)
    for name, fn in (("stop", cmd_stop), ("status", cmd_status), ("logs", cmd_logs)):
        s = sub.add_parser(name)
        s.add_argument("--root", required=True)
        s.add_argument("--run")
        s.set_defaults(fn=fn)
        if name == "stop":
            s.add_argument("--grace", type=float, default=120.0)
        if name == "logs":
            s.add_argument("--lines", type=int, default=100)
            s.add_argument("--follow", action="store_true")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except WorkerError as e:
        print(f"worker.py {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

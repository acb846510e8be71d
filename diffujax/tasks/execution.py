"""Running generated code (HumanEval pass@1): each program in its own Python subprocess, in a
fresh temporary directory that is deleted afterwards, with a wall-clock limit (the whole
process group is killed), CPU / memory / file-size limits, an empty environment (no
PYTHONPATH, no credentials), ``python -I`` (no user site, no current directory on the path)
and sockets disabled before the program runs. Where the machine allows unprivileged network
namespaces (``unshare -rn``), the process also runs without any network interface.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile

# Runs before the program: resource limits (soft and hard, so the program cannot raise them)
# and no sockets (a program cannot reach the network through Python).
_PREAMBLE = """\
import resource as _resource
for _limit, _value in ((_resource.RLIMIT_CPU, {cpu}), (_resource.RLIMIT_AS, {memory}),
                       (_resource.RLIMIT_FSIZE, 16 << 20)):
    _resource.setrlimit(_limit, (_value, _value))
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled while running generated code")
for _name in ("socket", "create_connection", "getaddrinfo", "socketpair", "fromfd"):
    setattr(_socket, _name, _no_network)
del _socket, _name, _no_network, _resource, _limit, _value
"""


@dataclasses.dataclass(frozen=True)
class Outcome:
    passed: bool
    status: str  # "passed" | "failed" | "timed out"
    detail: str = ""  # the last line of stderr when it failed


def humaneval_program(prefix: str, completion: str, suffix: str, test: str,
                      entry_point: str) -> str:
    """The program the HumanEval-infilling harness runs for one completion."""
    return f"{prefix}{completion}{suffix}\n\n{test}\n\ncheck({entry_point})\n"


@functools.cache
def _network_namespace() -> list[str]:
    """``["unshare", "-rn"]`` if an unprivileged network namespace works here, else ``[]``."""
    tool = shutil.which("unshare")
    try:
        ok = tool and subprocess.run([tool, "-rn", "true"], capture_output=True,
                                     timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return [tool, "-rn"] if ok else []


def run_program(program: str, *, timeout: float = 10.0, memory_bytes: int = 2 << 30) -> Outcome:
    """Run ``program`` isolated (see the module docstring); passed = exit status 0."""
    with tempfile.TemporaryDirectory(prefix="diffujax-exec-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(_PREAMBLE.format(cpu=int(timeout) + 1, memory=memory_bytes) + program)
        command = _network_namespace() + [sys.executable, "-I", "-B", path]
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        process = subprocess.Popen(command, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   start_new_session=True)
        try:
            _, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stderr = None
        finally:  # the whole group: also whatever the program left running in the background
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if stderr is None:
            process.communicate()
            return Outcome(False, "timed out")
        if process.returncode == 0:
            return Outcome(True, "passed")
        lines = stderr.decode("utf-8", "replace").strip().splitlines()
        return Outcome(False, "failed", lines[-1][:200] if lines else f"exit {process.returncode}")

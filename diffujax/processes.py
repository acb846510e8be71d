"""Is the process that left something behind (a lock, a temporary directory) still running?"""

from __future__ import annotations

import os
import socket


def hostname() -> str:
    return socket.gethostname()


def process_start(pid: int) -> str | None:
    """An identifier of when process ``pid`` started (Linux: its start time in clock ticks), so
    a reused pid is not mistaken for the original owner; None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None
    except OSError:  # no /proc (macOS): fall back to "is there such a pid"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "alive"


def process_alive(host: str | None, pid: int, start: str | None = None) -> bool | None:
    """True / False for a process of this host (``start``: its ``process_start`` when it was
    recorded, to tell a reused pid apart); None (unknown) for another host."""
    if host != hostname():
        return None
    now = process_start(pid)
    return now is not None and (start is None or now in (start, "alive"))

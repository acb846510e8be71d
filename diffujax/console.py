"""What the command line shows a person: log records, errors, progress bars. One place for each.

- ``setup_logging(debug)``: diffujax's log records reach stderr (INFO and up; ``--debug``:
  DEBUG), written through tqdm so they never tear a progress bar. They read like the commands'
  own lines: INFO is the bare message, a warning starts ``warning:`` (diffujax's own
  ``warnings.warn`` too); ``--debug`` adds the time, level and logger name to every record and
  leaves Python's warnings as Python shows them (file, line, category).
- ``error_line(exc, prefix)``: bad input is one line; with ``--debug`` the traceback too.
- ``progress(iterable, total=, desc=)``: a tqdm bar on stderr when stderr is a terminal (or
  ``DIFFUJAX_PROGRESS=1``); nothing in log files and pipes (or ``DIFFUJAX_PROGRESS=0``).
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings

from tqdm import tqdm

_DEBUG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_debug = False
_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_python_showwarning = warnings.showwarning


class _PlainFormatter(logging.Formatter):
    """The message alone at INFO and below; ``warning: ...`` / ``error: ...`` above."""

    def format(self, record):
        text = super().format(record)
        return text if record.levelno <= logging.INFO else f"{record.levelname.lower()}: {text}"


class _TqdmHandler(logging.StreamHandler):
    """A stderr handler that prints above any active tqdm bar instead of through it."""

    def emit(self, record):
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging take the program down
            self.handleError(record)


def setup_logging(debug: bool = False) -> None:
    """Show diffujax's log records on stderr (INFO and up; ``debug``: DEBUG and up). The handler
    sits on diffujax's own loggers, which do not propagate, so a library that configures the root
    logger (``logging.basicConfig``) neither duplicates nor reformats them; library records keep
    going to the root logger (by default: WARNING and up on stderr). Idempotent."""
    global _debug
    _debug = debug
    for name in ("diffujax", "__main__"):  # __main__: a module run as `python -m diffujax.x`
        logger = logging.getLogger(name)
        handler = next((h for h in logger.handlers if isinstance(h, _TqdmHandler)), None)
        if handler is None:
            handler = _TqdmHandler()
            logger.addHandler(handler)
        handler.setFormatter(logging.Formatter(_DEBUG_FORMAT, datefmt="%H:%M:%S") if debug
                             else _PlainFormatter("%(message)s"))
        logger.setLevel(logging.DEBUG if debug else logging.INFO)
        logger.propagate = False
    warnings.showwarning = _python_showwarning if debug else _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """diffujax's own warnings as ``warning: message`` lines; a library's as Python shows them."""
    if not os.path.abspath(filename).startswith(_PACKAGE + os.sep):
        return _python_showwarning(message, category, filename, lineno, file, line)
    try:
        tqdm.write(f"warning: {message}", file=sys.stderr if file is None else file)
    except Exception:  # a warning must never take the program down
        pass


def debug_enabled() -> bool:
    return _debug


def error_line(exc: BaseException, prefix: str | None = None) -> None:
    """``[prefix: ]error: message`` on stderr; under ``--debug`` preceded by the traceback."""
    if _debug:
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    print(f"{prefix + ': ' if prefix else ''}error: {exc}", file=sys.stderr)


def progress_enabled() -> bool:
    setting = os.environ.get("DIFFUJAX_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


def progress(iterable=None, *, total=None, desc=None, unit="it"):
    """``iterable`` wrapped in a progress bar (a silent pass-through when bars are off). Without
    an iterable: an object with ``update(n)`` and ``close()``, usable as a context manager."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not progress_enabled())

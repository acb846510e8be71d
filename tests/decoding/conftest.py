"""Decoding tests share the tiny models of ``tiny_models.py`` (put on the path here: the suite
runs with ``--import-mode=importlib``)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

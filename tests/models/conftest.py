"""The suite runs with ``--import-mode=importlib``: put this folder on the path for the shared
``tiny_families``."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

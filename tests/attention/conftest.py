"""Attention tests run the Pallas kernels in interpret mode on CPU.

The suite runs with ``--import-mode=importlib`` (no ``sys.path`` entry per test folder), so the
shared helpers in ``attn_testlib.py`` are put on the path here.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

"""``diffujax plan``: compile a run for a Cloud TPU slice on any machine and report what it needs
(README: Planning a TPU run without a TPU).

The real TPU compiler (libtpu) compiles the run's programs for compile-only devices of the named
slice, from abstract inputs that carry the run's shardings (``programs.py``): no weights, no data,
no TPU. ``analysis.py`` reads what the compiler says: HBM per chip, the collectives of the
optimized HLO (``hlo.py``, timed on the interconnect by ``comms.py``) and the compiler's cycle
estimates, from which ``estimate.py`` makes an *estimated* step time and MFU, or a decoder's
tokens/s; ``report.py`` prints the report, ``search.py`` is ``--fit``.
"""

from __future__ import annotations

from diffujax.plan.analysis import Target, compile_program, make_target, plan
from diffujax.plan.search import fit

__all__ = ["Target", "compile_program", "fit", "make_target", "plan"]

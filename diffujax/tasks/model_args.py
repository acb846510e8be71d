"""The ``model_args`` of ``diffujax lm-eval --model diffujax``, checked before the model loads:
an unknown key is named (with the nearest known one), a value of the wrong type or outside its
range is named with what it may be, one line each (as ``diffujax eval`` checks its options).

lm-eval has already turned each value into a bool, None, int, float or string
(``key=8`` arrives as the int 8, ``key=auto`` as a string)."""

from __future__ import annotations

import difflib
import math

from diffujax.checkpoint.hf_read import DTYPES
from diffujax.diffusion.sampling import RANKINGS
from diffujax.inference.generation import DIFFUSION_SAMPLERS, RENAMED_SAMPLERS

OBJECTIVES = ("diffusion", "ar")
SCORES = ("reference", "mc")
# lm-eval passes these to every model (from its --batch_size, --max_batch_size, --device).
HARNESS_KEYS = ("max_batch_size", "device")


def _integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _at_least(low: int):
    return lambda v: (None if _integer(v) and v >= low else f"must be an integer >= {low}")


def _optional(check):
    return lambda v: None if v is None else check(v)


def _one_of(choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def _sampler(v):
    if v in RENAMED_SAMPLERS:
        return f"is now called {RENAMED_SAMPLERS[v]}"
    return _one_of(DIFFUSION_SAMPLERS)(v)


def _float_at_least(low: float, strict: bool = False):
    def check(v):
        ok = _number(v) and (v > low if strict else v >= low)
        return None if ok else f"must be a number {'>' if strict else '>='} {low:g}"
    return check


def _batch_size(v):
    if _integer(v) and v >= 1:
        return None
    if isinstance(v, str) and (v == "auto" or (v.startswith("auto:") and v[5:].isdigit()
                                               and int(v[5:]) >= 1)):
        return None
    return "must be an integer >= 1, auto or auto:N"


def _checkpoint(v):
    return None if isinstance(v, str) and v else "is required: a diffujax checkpoint directory"


CHECKS = {
    "checkpoint": _checkpoint,
    "objective": _one_of(OBJECTIVES),
    "score": _one_of(SCORES),
    "levels": _at_least(1),
    "mc_num": _at_least(1),
    "rolling_draws": _at_least(1),
    "sampler": _sampler,
    "steps": _optional(_at_least(1)),
    "temperature": _float_at_least(0.0),
    "ranking": _one_of(RANKINGS),
    "confidence_temperature": _optional(_float_at_least(0.0, strict=True)),
    "batch_size": _batch_size,
    "seed": _at_least(0),
    "dtype": _optional(_one_of(tuple(DTYPES))),
    # lm-eval reads mesh=none as None
    "mesh": lambda v: None if v is None or isinstance(v, str) and v else
    "must be auto, none or axis sizes",
    "max_length": _optional(_at_least(2)),
    "max_gen_toks": _at_least(1),
    "add_bos_token": lambda v: None if isinstance(v, bool) else "must be true or false",
    "max_batch_size": _optional(_at_least(1)),
    "device": lambda v: None,  # lm-eval's: the mesh places the model
}


DEFAULTS = dict(objective="diffusion", score="reference", levels=32, mc_num=128, rolling_draws=8,
                sampler="confidence", steps=None, temperature=0.0, ranking="masked",
                confidence_temperature=None, batch_size=8, seed=0, dtype=None, mesh="auto",
                max_length=None, max_gen_toks=256, add_bos_token=False)


def model_args(values: dict) -> dict:
    """``values`` checked (``check_model_args``), with the defaults of the keys not given."""
    check_model_args(values)
    return dict(DEFAULTS, **values)


def check_model_args(values: dict) -> None:
    """Raise ``ValueError`` (one line) for the first unknown key or bad value of ``values``."""
    for key in values:
        if key not in CHECKS:
            near = difflib.get_close_matches(key, list(CHECKS), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            known = ", ".join(k for k in CHECKS if k not in HARNESS_KEYS)
            raise ValueError(f"model_args {key}: unknown key{hint}; known keys: {known}")
    for key, check in CHECKS.items():
        problem = check(values.get(key)) if key in values or key == "checkpoint" else None
        if problem:
            raise ValueError(f"model_args {key}={values.get(key)!r}: {problem}")


def batch_size_of(value) -> int:
    """The rows per forward pass: an integer as given; ``auto`` / ``auto:N`` (lm-eval's batch
    search, which a compiled model does not need) take the default, 8."""
    return 8 if isinstance(value, str) else int(value)

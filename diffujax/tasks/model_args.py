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
from diffujax.tasks.formats import OBJECTIVES

SCORES = ("reference", "mc")
# lm-eval passes these to every model (from its --max_batch_size, --device).
HARNESS_KEYS = ("max_batch_size", "device")


def _integer(low: int):
    return lambda v: None if type(v) is int and v >= low else f"must be an integer >= {low}"


def _number(low: float, strict: bool = False):
    def check(v):
        ok = type(v) in (int, float) and math.isfinite(v) and (v > low if strict else v >= low)
        return None if ok else f"must be a number {'>' if strict else '>='} {low:g}"
    return check


def _optional(check):
    return lambda v: None if v is None else check(v)


def _one_of(choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(map(str, choices))}"


def _sampler(v):
    if v in RENAMED_SAMPLERS:
        return f"is now called {RENAMED_SAMPLERS[v]}"
    return _one_of(DIFFUSION_SAMPLERS)(v)


def _batch_size(v):
    n = v[5:] if isinstance(v, str) and v.startswith("auto:") else ""
    ok = (type(v) is int and v >= 1) or v == "auto" or (n.isdigit() and int(n) >= 1)
    return None if ok else "must be an integer >= 1, auto or auto:N"


# key: (default, check: None if the value is good, else what it must be)
ARGS = {
    "checkpoint": (None, lambda v: None if isinstance(v, str) and v else
                   "is required: a diffujax checkpoint directory"),
    "objective": ("diffusion", _one_of(OBJECTIVES)),
    "score": ("reference", _one_of(SCORES)),
    "levels": (32, _integer(1)),
    "mc_num": (128, _integer(1)),
    "rolling_draws": (8, _integer(1)),
    "sampler": ("confidence", _sampler),
    "steps": (None, _optional(_integer(1))),
    "temperature": (0.0, _number(0.0)),
    "ranking": ("masked", _one_of(RANKINGS)),
    "confidence_temperature": (None, _optional(_number(0.0, strict=True))),
    # auto / auto:N (lm-eval's batch search, which a compiled model does not need): 8
    "batch_size": (8, _batch_size),
    "seed": (0, _integer(0)),
    "dtype": (None, _optional(_one_of(tuple(DTYPES)))),
    # lm-eval reads mesh=none as None
    "mesh": ("auto", lambda v: None if v is None or isinstance(v, str) and v else
             "must be auto, none or axis sizes"),
    "max_length": (None, _optional(_integer(2))),
    "max_gen_toks": (256, _integer(1)),
    "add_bos_token": (False, lambda v: None if isinstance(v, bool) else "must be true or false"),
    "max_batch_size": (None, _optional(_integer(1))),
    "device": (None, lambda v: None),  # lm-eval's: the mesh places the model
}


def model_args(values: dict) -> dict:
    """``values`` with the defaults of the keys not given; ``ValueError`` (one line) for the
    first unknown key or bad value."""
    for key in values:
        if key not in ARGS:
            near = difflib.get_close_matches(key, list(ARGS), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            known = ", ".join(k for k in ARGS if k not in HARNESS_KEYS)
            raise ValueError(f"model_args {key}: unknown key{hint}; known keys: {known}")
    out = {key: values.get(key, default) for key, (default, _) in ARGS.items()}
    for key, (_, check) in ARGS.items():
        problem = check(out[key])
        if problem:
            raise ValueError(f"model_args {key}={out[key]!r}: {problem}")
    return out

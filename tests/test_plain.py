"""diffujax.plain: plain JSON for configs and metadata, an exact tagged round trip for state.
Reference: the standard json module (what the files are written with)."""

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np

from diffujax.plain import from_tagged, to_plain, to_tagged


@dataclasses.dataclass(frozen=True)
class Inner:
    sizes: tuple = (1, 2)
    flag: bool = True


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = Inner()
    path: pathlib.Path = pathlib.Path("/tmp/x")
    extra: dict = dataclasses.field(default_factory=lambda: {1: np.float32(0.5)})


def test_to_plain_is_json_and_names_fields():
    plain = to_plain(dict(cfg=Outer(), step=np.int64(7), loss=jnp.float32(1.5)))
    assert json.loads(json.dumps(plain)) == plain
    assert plain == {"cfg": {"inner": {"sizes": [1, 2], "flag": True}, "path": "/tmp/x",
                             "extra": {"1": 0.5}}, "step": 7, "loss": 1.5}


def test_tagged_round_trip_is_exact():
    """grain iterator states: tuples (packing slices), int-keyed dicts (interleave), numpy ints."""
    state = {"a": (1, (-1, -1)), "f": {2: {"next_index": np.int64(3)}}, "l": [(0, 1)], "e": {}}
    back = from_tagged(json.loads(json.dumps(to_tagged(state))))
    assert back == {"a": (1, (-1, -1)), "f": {2: {"next_index": 3}}, "l": [(0, 1)], "e": {}}
    assert isinstance(back["a"][1], tuple) and isinstance(back["l"][0], tuple)
    assert list(back["f"]) == [2]

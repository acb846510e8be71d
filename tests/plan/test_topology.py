"""Cloud TPU slice names -> libtpu topologies and compile-only devices (reference: Cloud TPU's
published accelerator types: v4 / v5p count TensorCores, two per chip; v5e / v6e count chips)."""

import subprocess
import sys

import pytest

from diffujax.config import ConfigError, load_config
from diffujax.parallel.topology import parse_slice, slice_devices, valid_names


@pytest.mark.parametrize("name, chips, topology, host_bounds", [
    ("v5p-128", 64, "v5p:4x4x4", (2, 2, 1)),
    ("v5p-8", 4, "v5p:2x2x1", (2, 2, 1)),
    ("v4-8", 4, "v4:2x2x1", (2, 2, 1)),
    ("v4-32", 16, "v4:2x2x4", (2, 2, 1)),
    ("v5litepod-16", 16, "v5e:4x4", (2, 2, 1)),
    ("v5litepod-8", 8, "v5e:2x4", (2, 4, 1)),
    ("v5e-8", 8, "v5e:2x4", (2, 4, 1)),  # the common spelling is accepted
    ("v6e-8", 8, "v6e:2x4", (2, 4, 1)),
    ("v6e-256", 256, "v6e:16x16", (2, 2, 1)),
])
def test_names_map_to_libtpu_topologies(name, chips, topology, host_bounds):
    spec = parse_slice(name)
    assert (spec.chips, spec.topology, spec.chips_per_host_bounds) == (chips, topology, host_bounds)
    assert spec.name == name.replace("v5e-", "v5litepod-")


@pytest.mark.parametrize("bad", ["v5p-100", "v5p-7", "v7-8", "tpu", "v5litepod-3", ""])
def test_bad_names_list_the_valid_ones(bad):
    with pytest.raises(ValueError) as e:
        parse_slice(bad)
    message = str(e.value)
    assert repr(bad) in message
    for name in ("v4-8", "v5litepod-16", "v5p-128", "v6e-8"):
        assert name in message
    assert "\n" not in message


@pytest.mark.parametrize("name, kind", [("v5p-8", "TPU v5"), ("v5litepod-4", "TPU v5 lite"),
                                        ("v4-8", "TPU v4"), ("v6e-4", "TPU v6 lite")])
def test_devices_come_from_libtpu(name, kind):
    devices = slice_devices(parse_slice(name))
    assert len(devices) == parse_slice(name).chips
    assert {d.device_kind for d in devices} == {kind}
    assert {d.platform for d in devices} == {"tpu"}


def test_every_listed_name_parses():
    names = valid_names()
    assert len(names) == len(set(names))
    assert all(parse_slice(n).name == n for n in names)


def test_several_slices_carry_their_slice_index():
    devices = slice_devices(parse_slice("v5p-8"), num_slices=2)
    assert len(devices) == 8
    assert sorted(d.slice_index for d in devices) == [0] * 4 + [1] * 4


def test_config_names_its_slice():
    cfg = load_config("configs/tiny.yaml", ["plan.topology=v5p-8"])
    assert cfg.plan.topology == "v5p-8"
    with pytest.raises(ConfigError, match=r"plan\.topology: unknown TPU slice 'v5p-9'"):
        load_config("configs/tiny.yaml", ["plan.topology=v5p-9"])
    with pytest.raises(ConfigError, match=r"plan\.model\.hidden_size"):
        load_config("configs/tiny.yaml", ["plan.model.family=llama", "plan.model.vocab_size=8"])


@pytest.mark.integration  # the CLI in a fresh interpreter
def test_cli_bad_topology_is_one_line_and_exit_2():
    out = subprocess.run([sys.executable, "-m", "diffujax.cli", "plan", "--config",
                          "configs/tiny.yaml", "--topology", "v5p-9"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    lines = [l for l in out.stderr.splitlines() if l.startswith("diffujax plan: error:")]
    assert len(lines) == 1 and "unknown TPU slice 'v5p-9'" in lines[0] and "v5p-128" in lines[0]
    assert out.stdout == ""

"""``model.remat=dots_with_attention`` on the real TPU compiler: the train step of a one-layer tiny
LLaMA for 4 v5p chips (FSDP x TP, kernels under ``shard_map``), planned as ``diffujax plan``
compiles it, in its two programs: the annealing step (diffujax's Pallas kernel) and the
full-attention step (JAX's splash kernel).

Under ``dots`` the backward pass recomputes the attention forward: the optimized program calls the
forward kernel twice. Under ``dots_with_attention`` the kernel's output and log-sum-exp are saved
(their checkpoint names: ``attention/residuals.py``) and it is called once; the backward kernels
(dq, dk/dv) once under both. A policy name the config does not know stops ``plan`` with one
line naming ``model.remat``.
"""

import re

import pytest

from diffujax.cli import main
from diffujax.config import load_config
from diffujax.plan import plan

ONE_LAYER_FSDP_X_TP = ["mesh.shape.fsdp=2", "mesh.shape.tensor=2", "model.init.num_layers=1"]


def _kernel_calls(program: dict) -> dict:
    """Calls of each kind of attention kernel in a compiled program, by the kernel's name
    (``diffujax_flash_fwd.2``, ``splash_mha_dq_no_residuals.1``, ...)."""
    kinds = [re.search(r"_(fwd|dq|dkv)", k["name"]).group(1)
             for k in program["compiler_cycles"]["kernels"]]
    return {kind: kinds.count(kind) for kind in ("fwd", "dq", "dkv")}


@pytest.mark.parametrize("remat,forward_calls", [("dots", 2), ("dots_with_attention", 1)])
def test_the_attention_forward_runs_once_when_its_residuals_are_saved(remat, forward_calls):
    cfg = load_config("configs/tiny.yaml", ONE_LAYER_FSDP_X_TP + [f"model.remat={remat}"])
    report = plan(cfg, "v5p-8", what="train")
    assert report["config"]["remat"] == remat
    backends = [p["attention"] for p in report["programs"]]
    assert backends == [{"annealed": "pallas_tpu"}, {"full": "splash"}]
    for program in report["programs"]:
        assert program["memory"]["fits"]
        assert _kernel_calls(program) == {"fwd": forward_calls, "dq": 1, "dkv": 1}, program["name"]


def test_an_unknown_policy_stops_plan_with_one_line(capsys):
    code = main(["plan", "--config", "configs/tiny.yaml", "model.remat=dots_attention"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "model.remat: 'dots_attention' is not one of 'none', 'dots_with_attention', 'dots'" \
           " or 'full'" in err[0]

"""``model.scan_layers: false`` on the real TPU compiler: the train step of the tiny LLaMA with
its two layers unrolled, for 4 v5p chips (FSDP x TP, the kernels under ``shard_map``), planned as
``diffujax plan`` compiles it. Unrolled, each layer calls its own attention kernels (forward, dq,
dk/dv: 3 per layer) and each call runs once per micro-batch; scanned, one call of each runs once
per layer and micro-batch (``test_plan.py``'s tiny step)."""

from diffujax.config import load_config
from diffujax.plan import plan
from diffujax.plan.report import format_report

LAYERS, ACCUM = 2, 2


def test_unrolled_layers_compile_with_a_kernel_call_per_layer():
    cfg = load_config("configs/tiny.yaml", [
        "mesh.shape.fsdp=2", "mesh.shape.tensor=2", "diffusion.anneal_steps=0",
        f"model.init.num_layers={LAYERS}", f"optimizer.grad_accum_steps={ACCUM}",
        "model.scan_layers=false"])
    report = plan(cfg, "v5p-8", what="train")
    (program,) = report["programs"]
    assert program["attention"] == {"full": "splash"} and report["fits"]
    kernels = program["compiler_cycles"]["kernels"]
    assert program["kernel_calls"] == 3 * LAYERS
    assert {k["runs"] for k in kernels} == {ACCUM}
    assert report["estimate"]["step_seconds"] > 0
    assert report["config"]["scan_layers"] is False
    assert "(grad_accum_steps x micro-batch), remat none, compute float32, master weights" \
        " float32, layers unrolled" in format_report(report)

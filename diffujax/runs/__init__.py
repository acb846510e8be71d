"""Run operations: what keeps a training run going and what it reports, beside the method.

``lock`` (one writer per run directory: a file lock, or a lease in a bucket), ``run_dir`` (where
a run writes, checked before anything is written), ``preemption`` (SIGTERM / SIGINT -> "save,
then exit"), ``metrics`` (throughput, the console line, TensorBoard and ``metrics.jsonl``, the
profiler), ``tb_remote`` (event files in a bucket), ``wandb_log`` (W&B) and ``flops`` (FLOPs per
token, device peaks and MFU: pure arithmetic the planner imports too, without any writer).
``diffujax.train``'s loop uses them; a newcomer reading the method may skip this package.

Nothing is imported here: each module is imported by its own name.
"""

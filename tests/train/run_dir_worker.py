"""One process of a 2-process job that resolves an ``output_dir`` (tests/train/test_remote_run.py).

    python run_dir_worker.py PROCESS_ID PORT OUTPUT_DIR...

Joins a CPU ``jax.distributed`` job (gloo) and prints one JSON line per OUTPUT_DIR:
``{"ok": path}`` or ``{"error": message}``. ``HOME`` may differ per process, so ``~/x`` is
host-local.
"""

import json
import sys


def main(pid, port, *output_dirs):
    import jax

    from diffujax.config import MeshSection
    from diffujax.parallel.mesh import maybe_initialize_distributed
    from diffujax.runs.run_dir import resolve_output_dir

    maybe_initialize_distributed(MeshSection(distributed=True, coordinator=f"127.0.0.1:{port}",
                                             num_processes=2, process_id=int(pid)))
    for output_dir in output_dirs:
        try:
            print(json.dumps({"ok": str(resolve_output_dir(output_dir))}), flush=True)
        except ValueError as e:
            print(json.dumps({"error": str(e)}), flush=True)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])

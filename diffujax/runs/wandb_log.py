"""Weights & Biases beside TensorBoard and metrics.jsonl: ``logging.wandb: {project, name, ...}``.

Off unless the config names a project (``pip install diffujax[wandb]``). The W&B run id is kept
in ``output_dir/wandb.json``, so a resumed run continues the same W&B run; every value is logged
against a ``step`` metric (the training step), so the steps an interrupted attempt logged after
its last checkpoint are logged again, not dropped. Offline use: ``WANDB_MODE=offline``.
"""

from __future__ import annotations

import json
import os
import uuid

from diffujax import paths

ID_FILE = "wandb.json"


class WandbLogger:
    """One W&B run for one ``output_dir``; ``log(step, values)`` and ``text(step, tag, texts)``."""

    def __init__(self, settings: dict, output_dir, run_config: dict | None = None):
        """``settings``: ``logging.wandb`` (checked by the config: a ``project`` at least)."""
        try:
            import wandb  # an optional extra: imported only when a run asks for it
        except ImportError:
            raise ValueError("logging.wandb is set but wandb is not installed (pip install"
                             " 'diffujax[wandb]')") from None
        self._wandb = wandb
        output_dir = paths.resolve(output_dir)
        id_file = output_dir / ID_FILE
        stored = json.loads(id_file.read_text()) if id_file.is_file() else {}
        run_id = settings.get("id") or stored.get("id") or uuid.uuid4().hex[:12]
        # W&B keeps its own files locally: in the run directory, or the cache for a bucket.
        local = (settings.get("dir") or os.environ.get("WANDB_DIR")
                 or os.fspath(paths.cache_root() / "wandb" if paths.is_remote(output_dir)
                              else output_dir))
        os.makedirs(local, exist_ok=True)
        self.run = wandb.init(
            project=settings["project"], name=settings.get("name"), entity=settings.get("entity"),
            group=settings.get("group"), tags=settings.get("tags"), notes=settings.get("notes"),
            mode=settings.get("mode"), id=run_id, resume="allow", dir=local,
            config=run_config or {})
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        if stored.get("id") != run_id:
            paths.write_text_atomic(id_file, json.dumps({"id": run_id}) + "\n")

    def log(self, step: int, values: dict) -> None:
        numbers = {k: v for k, v in values.items() if isinstance(v, (int, float))}
        self.run.log({"step": int(step), **numbers})

    def text(self, step: int, tag: str, texts) -> None:
        table = self._wandb.Table(columns=["step", "index", "text"],
                                  data=[[int(step), i, t] for i, t in enumerate(texts)])
        self.run.log({"step": int(step), tag: table})

    def close(self) -> None:
        self.run.finish()

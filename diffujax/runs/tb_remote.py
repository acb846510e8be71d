"""TensorBoard event files in a bucket (``output_dir=gs://...``).

tensorboardX opens event files through writer factories registered per URL scheme; its own
``gs://`` writer needs google-cloud-storage credentials of its own and re-uploads an ever-growing
buffer. ``install`` registers one factory for every scheme ``diffujax.paths`` treats as remote,
writing through ``paths.open_append`` (the same credentials and emulator settings as the
checkpoints; a new event file object past ``ROLL_BYTES``, so each upload stays small).
"""

from __future__ import annotations

from diffujax import paths
from diffujax.runs.tensorboardx import record_writer

SCHEMES = ("gs", "s3", "az", "hf")
ROLL_BYTES = 8 << 20


class _Factory:
    def open(self, path):
        return paths.open_append(path, binary=True, roll_bytes=ROLL_BYTES)

    def directory_check(self, path):
        paths.resolve(path).mkdir(parents=True, exist_ok=True)


def install() -> None:
    """Route tensorboardX's remote event files through ``diffujax.paths`` (idempotent)."""
    for scheme in SCHEMES:
        if not isinstance(record_writer.REGISTERED_FACTORIES.get(scheme), _Factory):
            record_writer.register_writer_factory(scheme, _Factory())

"""Runs ``gcp-storage-emulator`` with one fix that makes it behave like GCS for tensorstore.

GCS answers an object download with its generation in ``x-goog-generation``; tensorstore (orbax's
array store) reads it to make its conditional manifest updates, and fails with "Malformed
StorageGeneration" without it. The emulator leaves it out, so the download handler is wrapped to
add it before the server's routing table is built. Usage: ``python gcs_emulator_server.py start
--host ... --port ...`` (the emulator's own arguments).
"""

import sys

from gcp_storage_emulator.handlers import objects

_download = objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:  # noqa: BLE001 - a 404 was already answered
        return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))


objects.download = _download_with_generation

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch: routes bind it)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Runs ``gcp-storage-emulator`` with two fixes that make it behave like GCS.

1. GCS answers an object download with its generation in ``x-goog-generation``; tensorstore
   (orbax's array store) reads it to make its conditional manifest updates, and fails with
   "Malformed StorageGeneration" without it. The emulator leaves it out.
2. GCS honours ``ifGenerationMatch`` on uploads and deletes (412 when the object is at another
   generation; 0: only if absent); the emulator ignores it, so a test of a write that must lose a
   race (the run lease, tensorstore's conditional writes) would pass whatever the code did.

The handlers are wrapped before the server's routing table is built. Usage: ``python
gcs_emulator_server.py start --host ... --port ...`` (the emulator's own arguments).
"""

import sys
from http import HTTPStatus

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


def _generation(storage, bucket: str, name: str) -> int:
    try:
        return int(storage.get_file_obj(bucket, name)["generation"])
    except Exception:  # noqa: BLE001 - no such object
        return 0


def _honouring_generation_match(handler, object_name):
    def wrapped(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        name = object_name(request)
        if wanted and name is not None and \
                int(wanted[0]) != _generation(storage, request.params["bucket_name"], name):
            response.status = HTTPStatus.PRECONDITION_FAILED  # 412, as GCS answers
            response.json({"error": {"code": 412, "message": "Precondition Failed",
                                     "errors": [{"reason": "conditionNotMet"}]}})
            return None
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


objects.download = _download_with_generation
# Media uploads name the object in the query (multipart ones in the body: left as they are).
objects.insert = _honouring_generation_match(
    objects.insert, lambda r: (r.query.get("name") or [None])[0]
    if (r.query.get("uploadType") or [""])[0] == "media" else None)
objects.delete = _honouring_generation_match(objects.delete, lambda r: r.params["object_id"])

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch: routes bind it)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Runs ``gcp-storage-emulator`` with two fixes that make it behave like GCS.

1. GCS answers an object download with its generation in ``x-goog-generation``; tensorstore
   (orbax's array store) reads it to make its conditional manifest updates, and fails with
   "Malformed StorageGeneration" without it. The emulator leaves it out.
2. GCS honours ``ifGenerationMatch`` on uploads, downloads and deletes (412 when the object is at
   another generation; 0: only if absent); the emulator ignores it, so a test of a write that must
   lose a race (the run lease, tensorstore's conditional writes) would pass whatever the code did.

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


def _honouring_generation_match(handler, object_name, creates=False):
    """``handler`` refusing a request whose ``ifGenerationMatch`` the object does not meet. An
    absent object is at generation 0 for a request that ``creates`` it (an upload); other
    requests for it are left to the handler's 404, as GCS answers them."""
    def wrapped(request, response, storage, *args, **kwargs):
        wanted = request.query.get("ifGenerationMatch")
        name = object_name(request) if wanted else None
        if name is not None:
            generation = _generation(storage, request.params["bucket_name"], name)
            if (generation or creates) and int(wanted[0]) != generation:
                response.status = HTTPStatus.PRECONDITION_FAILED  # 412, as GCS answers
                response.json({"error": {"code": 412, "message": "Precondition Failed",
                                         "errors": [{"reason": "conditionNotMet"}]}})
                return None
        return handler(request, response, storage, *args, **kwargs)
    return wrapped


def _uploaded_name(request):
    """The object a one-request upload writes: named in the query (media uploads: gcsfs,
    tensorstore) or in the metadata part of the body (multipart: google-cloud-storage). Resumable
    uploads are left as they are."""
    kind = (request.query.get("uploadType") or [""])[0]
    if kind == "media":
        return (request.query.get("name") or [None])[0]
    if kind == "multipart":
        return (request.query.get("name") or [request.data["meta"].get("name")])[0]
    return None


def _object_id(request):
    return request.params["object_id"]


objects.download = _honouring_generation_match(_download_with_generation, _object_id)
objects.insert = _honouring_generation_match(objects.insert, _uploaded_name, creates=True)
objects.delete = _honouring_generation_match(objects.delete, _object_id)

from gcp_storage_emulator.__main__ import main  # noqa: E402  (after the patch: routes bind it)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

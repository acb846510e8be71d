"""A real GCS JSON/XML API on 127.0.0.1 (``gcp-storage-emulator``, in-memory, run by
gcs_emulator_server.py), for the gs:// tests.

``start()`` runs the emulator as a subprocess on a free port and points every GCS client of this
process and of its children at it: gcsfs (and so ``etils.epath``) and google-cloud-storage read
``STORAGE_EMULATOR_HOST``, tensorstore (orbax's array writer) reads ``TENSORSTORE_GCS_HTTP_URL``.
No credentials are needed (the clients fall back to anonymous access against an emulator).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

BUCKET = "diffujax-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    def __init__(self):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        server = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gcs_emulator_server.py")
        cmd = [sys.executable, server,
               "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory",
            "--default-bucket", BUCKET, "--quiet"]
        # Its log goes to a file, never a pipe: the server is single-threaded and prints a
        # traceback for every connection a client drops, so a full pipe would stall every request.
        self.log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b/{BUCKET}", timeout=1).read()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"the GCS emulator did not start: {self.tail()}")
                time.sleep(0.1)
        self.env = {
            "STORAGE_EMULATOR_HOST": self.url,
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_CLOUD_PROJECT": "diffujax-test",
            # gcsfs's hierarchical-namespace probe needs real credentials; plain GCS API otherwise.
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        }
        os.environ.update(self.env)

    def url_for(self, name: str) -> str:
        """A fresh ``gs://`` prefix for one test."""
        return f"gs://{BUCKET}/{name}-{uuid.uuid4().hex[:8]}"

    def objects(self, url: str) -> list[str]:
        """Names of the objects below the ``gs://`` prefix ``url``, read fresh from the server."""
        return list_objects(self, url.removeprefix(f"gs://{BUCKET}/"))

    def tail(self) -> str:
        with open(self.log.name, errors="replace") as f:
            return f.read()[-2000:]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def list_objects(emulator: "Emulator", prefix: str) -> list[str]:
    """Object names under ``prefix`` straight from the JSON API (no client-side listing cache)."""
    import json
    import urllib.parse

    query = urllib.parse.urlencode({"prefix": prefix})
    with urllib.request.urlopen(f"{emulator.url}/storage/v1/b/{BUCKET}/o?{query}", timeout=5) as r:
        return [item["name"] for item in json.load(r).get("items", [])]

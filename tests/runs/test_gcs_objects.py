"""Objects under generation preconditions (``runs/gcs_objects.py``, the run lease's storage)
against a real GCS API (the emulator of tests/gcs_emulator.py, which honours ``ifGenerationMatch``
on uploads, downloads and deletes as GCS does): a write or delete at a generation the object is
not at is refused and changes nothing, 0 means "only if absent", a read pairs the contents with
their own generation even when a write lands between its requests. References: the object as
the server holds it, read back over plain HTTP (no client library), and its listing."""

import json
import urllib.error
import urllib.parse
import urllib.request

import pytest
from google.auth.exceptions import DefaultCredentialsError
from google.cloud import storage

from diffujax.runs import gcs_objects
from diffujax.runs.gcs_objects import delete_object, read_object, write_object


def _served(gcs, url):
    """(contents, generation) of the object ``url`` as the server holds it, None if absent."""
    bucket, _, name = url.removeprefix("gs://").partition("/")
    query = f"{gcs.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}"
    try:
        with urllib.request.urlopen(f"{query}?alt=media", timeout=5) as r:
            data = r.read()
        with urllib.request.urlopen(query, timeout=5) as r:
            return data, int(json.load(r)["generation"])
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return None
        raise


def test_writes_and_deletes_happen_only_at_the_generation_named(gcs):
    url = gcs.url_for("objects") + "/lease"
    assert read_object(url) is None
    first = write_object(url, b"one", 0)
    assert _served(gcs, url) == (b"one", first) == read_object(url)

    with pytest.raises(FileExistsError):  # 0: only if absent
        write_object(url, b"two", 0)
    assert _served(gcs, url) == (b"one", first)

    second = write_object(url, b"two", first)
    assert second != first
    assert _served(gcs, url) == (b"two", second) == read_object(url)
    with pytest.raises(FileExistsError):  # the generation it was at before
        write_object(url, b"three", first)
    assert _served(gcs, url) == (b"two", second)

    assert delete_object(url, first) is False  # moved on: left alone
    assert _served(gcs, url) == (b"two", second)
    assert delete_object(url, second) is True
    assert _served(gcs, url) is None and read_object(url) is None
    assert gcs.objects(url) == []
    assert delete_object(url, second) is False  # gone
    with pytest.raises(FileExistsError):  # absent is not at a generation > 0
        write_object(url, b"four", second)
    assert _served(gcs, url) is None


def test_a_read_pairs_contents_with_their_own_generation_when_a_write_lands_between(
        gcs, monkeypatch):
    """A read asks for the generation, then for the contents: another writer replaces the object
    in between (deterministically, inside the first request). The read must not return the new
    contents under the old generation (a write conditioned on it would then succeed)."""
    url = gcs.url_for("objects") + "/lease"
    old = write_object(url, b"old", 0)
    get_blob, raced = storage.Bucket.get_blob, []

    def get_blob_then_replace(self, *args, **kwargs):
        blob = get_blob(self, *args, **kwargs)
        if not raced:
            raced.append(write_object(url, b"new", old))
        return blob

    monkeypatch.setattr(storage.Bucket, "get_blob", get_blob_then_replace)
    got = read_object(url)
    assert raced and got == (b"new", raced[0]) == _served(gcs, url)
    assert raced[0] != old


def test_only_gs_urls_have_generations():
    for url in ("gs://bucket/run/.lock", "gcs://bucket/run/.lock"):
        assert gcs_objects.supports_generations(url)
    for url in ("s3://bucket/run/.lock", "/tmp/run/.lock", "gs", "run/.lock"):
        assert not gcs_objects.supports_generations(url)
    for url in ("s3://bucket/run/.lock", "gs://bucket", "/tmp/run/.lock"):
        with pytest.raises(ValueError, match=f"^{url}: generation preconditions need a"
                                             " gs://BUCKET/OBJECT URL$"):
            write_object(url, b"x", 0)


def test_the_client_uses_application_default_credentials_and_no_project(tmp_path, monkeypatch):
    """On a VM the client authenticates as ``gcsfs`` does (application default credentials, not
    anonymously: a missing credentials file is an error) and needs no project for object calls."""
    for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT",
                 "CLOUDSDK_CORE_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(DefaultCredentialsError, match="missing.json"):
        gcs_objects._client.__wrapped__(0)

    adc = tmp_path / "adc.json"  # what `gcloud auth application-default login` writes
    adc.write_text(json.dumps({"type": "authorized_user", "client_id": "id", "client_secret": "s",
                               "refresh_token": "r"}))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(adc))
    assert gcs_objects._client.__wrapped__(0).project is None

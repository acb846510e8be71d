"""diffujax.paths, the one place that tells local paths from URLs, on local disk and in the GCS
emulator (tests/gcs_emulator.py). References: the bytes written, plain os / pathlib views of the
local side, and the emulator's own JSON API listing for the bucket side."""

import os
import pathlib

import pytest

from diffujax import paths


def test_resolve_and_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("gs://b/x/y")) == "gs://b/x/y" and paths.is_remote("gs://b/x")
    assert str(paths.resolve("rel/dir")) == str(tmp_path / "rel" / "dir")
    assert str(paths.resolve("file:///tmp/a")) == "/tmp/a" and not paths.is_remote("file:///a")
    assert paths.is_relative("rel/dir") and not paths.is_relative("/abs")
    assert not paths.is_relative("gs://b/x") and not paths.is_relative("~/x")


@pytest.fixture(params=["local", "bucket"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("gcs").url_for("paths")


def test_atomic_directory_success_and_failure(root):
    dst = f"{root}/model"
    with paths.atomic_directory(dst) as tmp:
        (tmp / "a.json").write_text("{}")
        if paths.is_remote(root):
            assert not paths.is_complete(dst)  # readers do not take it before the marker
    assert (paths.resolve(dst) / "a.json").read_text() == "{}"
    if paths.is_remote(root):
        assert paths.is_complete(dst)
    with pytest.raises(FileExistsError, match="already exists"):
        with paths.atomic_directory(dst):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with paths.atomic_directory(f"{root}/failed") as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("boom")
    assert not paths.resolve(f"{root}/failed").exists()
    leftovers = [p.name for p in paths.list_files(root) if "failed" in os.fspath(p)
                 or p.name.startswith(".model.")]
    assert leftovers == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_what_mkdtemp_creates_private_gets_the_mode_open_and_mkdir_give(tmp_path, umask):
    """Reference: the modes of a file and a directory made by plain ``open`` / ``mkdir`` under
    the same umask; the umask is unchanged afterwards."""
    old = os.umask(umask)
    try:
        (tmp_path / "plain.txt").write_text("x")
        (tmp_path / "plain_dir").mkdir()
        with paths.atomic_directory(tmp_path / "model") as tmp:
            (tmp / "a.json").write_text("{}")
        private = tmp_path / "private.bin"
        private.touch(mode=0o600)
        paths.chmod_as_created(private)
        assert os.umask(umask) == umask
    finally:
        os.umask(old)
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tmp_path / "model") == mode(tmp_path / "plain_dir")
    assert mode(private) == mode(tmp_path / "plain.txt")


def test_writing_file_and_local_copy(root, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFUJAX_CACHE", str(tmp_path / "cache"))
    dst = f"{root}/sub/data.bin"
    paths.resolve(dst).parent.mkdir(parents=True, exist_ok=True)
    with pytest.raises(ValueError):
        with paths.writing_file(dst) as local:
            local.write_bytes(b"partial")
            raise ValueError("killed")
    assert not paths.resolve(dst).exists()
    with paths.writing_file(dst) as local:
        local.write_bytes(b"\x00payload")
    assert paths.resolve(dst).read_bytes() == b"\x00payload"
    copy = paths.local_copy(dst)
    assert copy.read_bytes() == b"\x00payload"
    assert (copy == pathlib.Path(paths.resolve(dst))) == (not paths.is_remote(root))
    with paths.writing_file(dst) as local:  # a new version is fetched anew
        local.write_bytes(b"v2")
    assert paths.local_copy(dst).read_bytes() == b"v2"


def test_listing_and_globs(root):
    for name in ("a/x.jsonl", "a/b/y.jsonl", "a/b/z.txt", "c.jsonl"):
        with paths.writing_file(f"{root}/{name}") as local:
            paths.resolve(f"{root}/{name}").parent.mkdir(parents=True, exist_ok=True)
            local.write_text(name)
    rel = lambda ps: sorted(os.fspath(p)[len(root) + 1:] for p in ps)  # noqa: E731
    assert rel(paths.list_files(f"{root}/a")) == ["a/b/y.jsonl", "a/b/z.txt", "a/x.jsonl"]
    assert rel(paths.glob(f"{root}/**/*.jsonl")) == ["a/b/y.jsonl", "a/x.jsonl", "c.jsonl"]
    assert rel(paths.glob(f"{root}/a/*.jsonl")) == ["a/x.jsonl"]


def test_append_log_in_a_bucket_uploads_and_rolls(gcs):
    url = gcs.url_for("log") + "/events.out.tfevents.1.host"
    log = paths.open_append(url, binary=True, roll_bytes=10)
    log.write(b"12345")
    assert gcs.objects(url) == []  # held in memory until a flush
    log.flush()
    assert paths.resolve(url).read_bytes() == b"12345"
    log.write(b"67890")
    log.flush()  # reached roll_bytes: the next bytes go to a new object
    log.write(b"abc")
    log.close()
    names = sorted(n.rsplit("/", 1)[1] for n in gcs.objects(url))
    assert names == ["events.out.tfevents.1.host", "events.out.tfevents.1.host.part0001"]
    assert paths.resolve(url + ".part0001").read_bytes() == b"abc"
    text = paths.open_append(gcs.url_for("log") + "/metrics.jsonl")
    text.write('{"step": 1}\n')
    text.close()
    again = paths.open_append(os.fspath(paths.resolve(text.path)))  # a resumed run appends
    again.write('{"step": 2}\n')
    again.close()
    assert paths.resolve(text.path).read_text() == '{"step": 1}\n{"step": 2}\n'

"""launch/tpu.py against a fake `gcloud` on PATH (tests/launch/fake_gcloud.py) that records every
call and runs each TPU host's commands locally, as its own process, in that host's home directory.

The job itself is a stand-in `python` in each host's venv that records how it was started (argv,
cwd, environment), prints to its log, and sleeps or exits as told through the environment.
"""

import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # the launcher and its hosts are processes

HERE = Path(__file__).parent
REPO = HERE.parents[1]


def _load(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu = _load("launch_tpu", REPO / "launch" / "tpu.py")

# The job: records itself, then sleeps FAKE_JOB_SECONDS (SIGTERM ends it like diffujax's
# preemption handler: a message, exit 0) and exits FAKE_JOB_EXIT.
FAKE_PYTHON = textwrap.dedent(f"""\
    #!{sys.executable}
    import json, os, signal, sys, time
    record = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
              "env": {{k: v for k, v in os.environ.items()
                      if k.startswith(("MEGASCALE", "MY_", "FAKE_", "PYTHONUNBUFFERED"))}},
              "pid": os.getpid(), "sid": os.getsid(0)}}
    with open(os.path.join(os.environ["HOME"], "job-calls.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\\n")
    if sys.argv[1:3] == ["-m", "pip"]:
        sys.exit(0)
    def on_term(*_):
        print("SIGTERM: checkpoint saved", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    print("job started", sys.argv[3:], flush=True)
    time.sleep(float(os.environ.get("FAKE_JOB_SECONDS", "0")))
    print("job done", flush=True)
    sys.exit(int(os.environ.get("FAKE_JOB_EXIT", "0")))
    """)


class Cloud:
    """The fake cloud's state directory, with helpers to look at each host."""

    def __init__(self, root: Path, repo: Path):
        self.root, self.repo = root, repo

    def add_node(self, name, workers):
        nodes = self._json("nodes.json", {})
        nodes[name] = workers
        (self.root / "nodes.json").write_text(json.dumps(nodes))
        for w in range(workers):
            self.install_venv(name, w)

    def install_venv(self, node, worker):
        python = self.home(node, worker) / "diffujax" / "venv" / "bin" / "python"
        python.parent.mkdir(parents=True, exist_ok=True)
        python.write_text(FAKE_PYTHON)
        python.chmod(python.stat().st_mode | stat.S_IEXEC)

    def _json(self, name, default):
        p = self.root / name
        return json.loads(p.read_text()) if p.exists() else default

    def home(self, node, worker) -> Path:
        return self.root / "hosts" / node / f"w{worker}"

    def calls(self):
        p = self.root / "calls.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def jobs(self, node, worker):
        p = self.home(node, worker) / "job-calls.jsonl"
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def run_file(self, node, worker, run, name) -> Path:
        return self.home(node, worker) / "diffujax" / "runs" / run / name

    def wait_exit(self, node, worker, run, index, timeout=30):
        f = self.run_file(node, worker, run, f"worker-{index}.exit")
        deadline = time.time() + timeout
        while not f.exists():
            assert time.time() < deadline, f"{f} never appeared"
            time.sleep(0.05)
        return int(f.read_text())

    def launch(self, *argv):
        """Run launch/tpu.py in-process against the fake repository; return its exit status."""
        argv = list(argv)
        if argv and argv[0] == "run":
            argv.insert(1, f"--repo={self.repo}")
        return tpu.main(argv)


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


@pytest.fixture
def cloud(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE / 'fake_gcloud.py'} \"$@\"\n")
    gcloud.chmod(0o755)
    os.symlink(sys.executable, bin_dir / "python3")  # the hosts' python3
    state = tmp_path / "cloud"
    state.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_GCLOUD_DIR", str(state))
    monkeypatch.setenv("DIFFUJAX_TPU_DEVICES", str(tmp_path / "accel0"))  # no real TPU here
    # A small repository to ship: the launcher's own worker half plus a stand-in package.
    repo = tmp_path / "repo"
    (repo / "launch").mkdir(parents=True)
    shutil.copy(REPO / "launch" / "worker.py", repo / "launch" / "worker.py")
    (repo / "configs").mkdir()
    (repo / "configs" / "tiny.yaml").write_text("steps: 1\n")
    (repo / ".gitignore").write_text("runs/\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    yield Cloud(state, repo)
    # Leave no job behind: SIGKILL every recorded job's session.
    for pid_file in state.glob("hosts/*/*/diffujax/runs/*/worker-*.pid"):
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def test_run_without_overrides_starts_every_host_detached(cloud, capsys):
    cloud.add_node("pod", 2)
    rc = cloud.launch("run", "pod", "--zone=us-east5-a", "--run-name=r1", "--no-install",
                      "--env", "MY_FLAG=a b 'c'", "--", "train", "--config", "configs/tiny.yaml")
    assert rc == 0, capsys.readouterr()
    for w in range(2):
        assert cloud.wait_exit("pod", w, "r1", w) == 0
        (job,) = cloud.jobs("pod", w)
        # Exactly these arguments: no empty '' one, and what a multi-host train needs added.
        assert job["argv"] == ["-m", "diffujax.cli", "train", "--config", "configs/tiny.yaml",
                               "mesh.distributed=true"]
        assert job["env"]["MY_FLAG"] == "a b 'c'" and job["env"]["PYTHONUNBUFFERED"] == "1"
        code = Path(job["cwd"])
        assert (code / "configs" / "tiny.yaml").read_text() == "steps: 1\n"
        assert code.parent == cloud.home("pod", w) / "diffujax" / "code"
        # Detached: its own session, not the ssh connection's.
        assert job["sid"] == job["pid"] or job["sid"] != os.getsid(0)
        log = cloud.run_file("pod", w, "r1", f"worker-{w}.log").read_text()
        assert "job started" in log and "job done" in log
    assert all("--zone=us-east5-a" in c for c in cloud.calls())
    # status reports each host's exit
    capsys.readouterr()
    assert cloud.launch("status", "pod", "--zone=us-east5-a") == 0
    out = capsys.readouterr().out
    assert out.count('"state": "exited 0"') == 2


def test_job_survives_hangup_and_stop_lets_it_checkpoint(cloud, capsys):
    cloud.add_node("v4", 2)
    rc = cloud.launch("run", "v4", "--zone=z", "--run-name=long", "--no-install",
                      "--env=FAKE_JOB_SECONDS=120", "--", "train", "--config", "configs/tiny.yaml")
    assert rc == 0, capsys.readouterr()
    # The fake ssh hung up each connection's session when the command returned; jobs live on.
    for w in range(2):
        deadline = time.time() + 20
        while not cloud.run_file("v4", w, "long", f"worker-{w}.log").read_text().startswith("job"):
            assert time.time() < deadline
            time.sleep(0.05)
        pid = int(cloud.run_file("v4", w, "long", f"worker-{w}.pid").read_text())
        os.kill(pid, 0)
        assert not cloud.run_file("v4", w, "long", f"worker-{w}.exit").exists()
    assert cloud.launch("stop", "v4", "--zone=z", "--grace=20") == 0
    assert capsys.readouterr().out.count("stopped") == 2
    for w in range(2):
        assert cloud.wait_exit("v4", w, "long", w) == 0
        log = cloud.run_file("v4", w, "long", f"worker-{w}.log").read_text()
        assert "SIGTERM: checkpoint saved" in log and "job done" not in log


def test_never_deletes_previous_runs_code_or_other_files(cloud, capsys):
    cloud.add_node("pod", 1)
    home = cloud.home("pod", 0)
    keep = {home / "notes.txt": "mine", home / "diffujax" / "runs" / "old" / "worker-0.log": "old",
            home / "diffujax" / "code" / "elsewhere" / "x.py": "x = 1",
            home / "diffujax" / "venv" / "marker": "venv"}
    for p, text in keep.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    assert cloud.launch("run", "pod", "--zone=z", "--run-name=a", "--no-install", "--",
                        "eval") == 0
    cloud.wait_exit("pod", 0, "a", 0)
    # A changed tree is refused until --allow-dirty, then shipped beside the first one.
    (cloud.repo / "configs" / "tiny.yaml").write_text("steps: 2\n")
    (cloud.repo / "new.txt").write_text("untracked, shipped")
    capsys.readouterr()
    assert cloud.launch("run", "pod", "--zone=z", "--run-name=b", "--no-install", "--",
                        "eval") == 2
    err = capsys.readouterr().err
    assert "uncommitted changes" in err and "configs/tiny.yaml" in err and "--allow-dirty" in err
    assert not cloud.run_file("pod", 0, "b", "worker-0.log").exists()
    assert cloud.launch("run", "pod", "--zone=z", "--run-name=b", "--no-install", "--allow-dirty",
                        "--", "eval") == 0
    cloud.wait_exit("pod", 0, "b", 0)
    first, second = (Path(cloud.jobs("pod", 0)[i]["cwd"]) for i in (0, 1))
    assert first != second
    assert (first / "configs" / "tiny.yaml").read_text() == "steps: 1\n"
    assert (second / "configs" / "tiny.yaml").read_text() == "steps: 2\n"
    assert (second / "new.txt").exists()
    # Reusing a run name is refused and leaves that run's log alone.
    log_a = cloud.run_file("pod", 0, "a", "worker-0.log").read_text()
    capsys.readouterr()
    assert cloud.launch("run", "pod", "--zone=z", "--run-name=a", "--no-install", "--allow-dirty",
                        "--", "eval") == 2
    assert "already has" in capsys.readouterr().err
    assert cloud.run_file("pod", 0, "a", "worker-0.log").read_text() == log_a
    for p, text in keep.items():
        assert p.read_text() == text


def test_stale_tpu_holder_is_killed_first(cloud, tmp_path, capsys):
    cloud.add_node("pod", 1)
    device = Path(os.environ["DIFFUJAX_TPU_DEVICES"])
    device.write_text("")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nf = open(sys.argv[1])\n"
                               "print('ready', flush=True)\ntime.sleep(300)", str(device)],
                              stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert holder.stdout.readline() == b"ready\n"
        assert cloud.launch("run", "pod", "--zone=z", "--run-name=r", "--no-install", "--",
                            "eval") == 0
        assert holder.wait(timeout=30) == -signal.SIGTERM
        assert f"killing pid {holder.pid}" in capsys.readouterr().out
    finally:
        holder.kill()
    assert cloud.wait_exit("pod", 0, "r", 0) == 0


def test_install_runs_pip_on_the_shipped_code(cloud, capsys):
    cloud.add_node("pod", 1)
    assert cloud.launch("run", "pod", "--zone=z", "--run-name=r", "--", "eval") == 0
    cloud.wait_exit("pod", 0, "r", 0)
    pip, job = cloud.jobs("pod", 0)
    assert pip["argv"][:4] == ["-m", "pip", "install", "-e"]
    assert pip["argv"][4] == job["cwd"] + "[tpu]"


def test_queued_multislice_spot_slice_then_run_fetch_and_logs(cloud, tmp_path, capsys,
                                                             monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_WORKERS", "2")
    assert cloud.launch("create", "big", "--zone=z", "--type=v5p-16", "--runtime-version=v2",
                        "--num-slices=2", "--spot", "--poll=0") == 0
    out = capsys.readouterr().out
    assert "WAITING_FOR_RESOURCES" in out and "ACTIVE" in out
    (create,) = [c for c in cloud.calls() if c[2:4] == ["queued-resources", "create"]]
    assert create[4:] == ["big", "--accelerator-type=v5p-16", "--runtime-version=v2",
                          "--node-count=2", "--node-prefix=big", "--spot", "--zone=z"]
    for node in ("big-0", "big-1"):
        for w in range(2):
            cloud.install_venv(node, w)
    assert cloud.launch("run", "big", "--zone=z", "--num-slices=2", "--run-name=ms",
                        "--no-install", "--", "train", "--config", "configs/tiny.yaml",
                        "mesh.distributed=true") == 0
    coordinator = json.loads(subprocess.run(
        ["gcloud", "compute", "tpus", "tpu-vm", "describe", "big-0", "--zone=z"],
        capture_output=True, text=True).stdout)["networkEndpoints"][0]["ipAddress"]
    for index, (node, w) in enumerate([("big-0", 0), ("big-0", 1), ("big-1", 0), ("big-1", 1)]):
        cloud.wait_exit(node, w, "ms", index)
        (job,) = cloud.jobs(node, w)
        assert job["argv"][2:] == ["train", "--config", "configs/tiny.yaml",
                                   "mesh.distributed=true", "mesh.num_slices=2"]
        assert job["env"]["MEGASCALE_SLICE_ID"] == str(index // 2)
        assert job["env"]["MEGASCALE_NUM_SLICES"] == "2"
        assert job["env"]["MEGASCALE_COORDINATOR_ADDRESS"] == f"{coordinator}:8080"
    dest = tmp_path / "logs"
    assert cloud.launch("fetch", "big", "--zone=z", "--num-slices=2", str(dest)) == 0
    fetched = sorted(p.name for p in (dest / "ms").iterdir())
    assert fetched == [f"worker-{i}.log" for i in range(4)]
    assert all("job done" in (dest / "ms" / f).read_text() for f in fetched)
    capsys.readouterr()
    # logs goes over ssh with output passed through: compare with the host's file.
    done = subprocess.run([sys.executable, str(REPO / "launch" / "tpu.py"), "logs", "big",
                           "--zone=z", "--num-slices=2", "--worker=3"],
                          capture_output=True, text=True)
    assert done.returncode == 0
    assert done.stdout == cloud.run_file("big-1", 1, "ms", "worker-3.log").read_text()


def test_queued_resource_that_fails_is_reported(cloud, capsys, monkeypatch):
    monkeypatch.setenv("FAKE_GCLOUD_QR_FINAL", "FAILED")
    assert cloud.launch("create", "x", "--zone=z", "--type=v6e-8", "--runtime-version=v",
                        "--reserved", "--poll=0") == 2
    assert "queued resource x is FAILED" in capsys.readouterr().err
    (create,) = [c for c in cloud.calls() if c[2:4] == ["queued-resources", "create"]]
    assert "--reserved" in create and "--node-id=x" in create


def test_a_host_that_cannot_start_stops_the_others(cloud, capsys):
    cloud.add_node("pod", 2)
    # Host 1 has a file where the code directory goes: its start fails.
    blocker = cloud.home("pod", 1) / "diffujax" / "code"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("not a directory")
    assert cloud.launch("run", "pod", "--zone=z", "--run-name=r", "--no-install",
                        "--env=FAKE_JOB_SECONDS=120", "--", "eval") == 2
    captured = capsys.readouterr()
    assert "1 of 2 host(s) did not start" in captured.err and "worker 1" in captured.err
    assert cloud.wait_exit("pod", 0, "r", 0) == 0  # stopped by SIGTERM, not left waiting
    assert "SIGTERM" in cloud.run_file("pod", 0, "r", "worker-0.log").read_text()
    assert blocker.read_text() == "not a directory"


def test_bad_arguments_are_one_line_errors(cloud, capsys):
    cloud.add_node("pod", 1)
    assert cloud.launch("run", "pod", "--zone=z", "--no-install", "--env=1X=2", "--",
                        "eval") == 2
    assert "--env '1X=2'" in capsys.readouterr().err
    assert cloud.launch("run", "pod", "--zone=z", "--no-install") == 2
    assert "nothing to run" in capsys.readouterr().err
    assert cloud.launch("run", "nope", "--zone=z", "--", "eval") == 2
    assert "NOT_FOUND" in capsys.readouterr().err
    assert cloud.launch("logs", "pod", "--zone=z", "--worker=5") == 2
    assert "processes 0..0" in capsys.readouterr().err


def test_venv_python_is_the_newest_at_least_3_11(tmp_path, monkeypatch):
    """TPU VM images on Ubuntu 22.04 have python3 = 3.10: the venv must come from python3.11+."""
    worker = _load("launch_worker", REPO / "launch" / "worker.py")
    bin_dir = tmp_path / "pybin"
    bin_dir.mkdir()

    def interpreter(name, major, minor):
        p = bin_dir / name
        p.write_text(f"#!/bin/sh\necho {major} {minor}\n")
        p.chmod(0o755)
        return str(p)

    monkeypatch.setenv("PATH", str(bin_dir))
    interpreter("python3", 3, 10)
    with pytest.raises(worker.WorkerError, match="no Python >= 3.11"):
        worker.host_python()
    chosen = interpreter("python3.11", 3, 11)
    assert worker.host_python() == chosen
    interpreter("python3", 3, 12)  # a newer python3 is fine too; python3.11 is still preferred
    assert worker.host_python() == chosen


@pytest.mark.integration
def test_delete_stops_the_job_then_releases_the_slice(cloud, capsys, monkeypatch):
    """`delete` SIGTERMs the job (it saves its checkpoint) before the queued resource and its
    node go; afterwards `list` shows nothing and a second delete is a one-line error."""
    monkeypatch.setenv("FAKE_GCLOUD_QR_POLLS", "0")
    assert cloud.launch("create", "pod", "--zone=z", "--type=v5p-8", "--runtime-version=v",
                        "--poll=0") == 0
    for w in range(2):
        cloud.install_venv("pod", w)
    assert cloud.launch("run", "pod", "--zone=z", "--run-name=r", "--no-install",
                        "--env=FAKE_JOB_SECONDS=120", "--", "train") == 0
    capsys.readouterr()
    assert cloud.launch("list", "--zone=z") == 0
    listed = capsys.readouterr().out
    assert "queued resource pod: ACTIVE (nodes pod)" in listed
    assert "TPU pod: v5p-8, READY, 2 host(s)" in listed
    logs = [cloud.run_file("pod", w, "r", f"worker-{w}.log") for w in range(2)]
    assert cloud.launch("delete", "pod", "--zone=z") == 2  # no terminal to ask: needs --yes
    assert "needs --yes" in capsys.readouterr().err
    assert all(log.exists() for log in logs)
    texts = {}
    real_call = tpu.Gcloud.call

    def call(self, *words, **kw):  # read the logs at the moment the deletion is asked for
        if words[1:2] == ("delete",):
            texts.update({log: log.read_text() for log in logs})
        return real_call(self, *words, **kw)

    monkeypatch.setattr(tpu.Gcloud, "call", call)
    assert cloud.launch("delete", "pod", "--zone=z", "--yes", "--grace=30") == 0
    out = capsys.readouterr().out
    assert "deleted TPU pod and queued resource pod" in out
    assert all("SIGTERM: checkpoint saved" in texts[log] for log in logs)  # before deletion
    deletes = [c[2:] for c in cloud.calls() if c[3] == "delete"]
    assert deletes == [["queued-resources", "delete", "pod", "--force", "--quiet", "--zone=z"]]
    assert cloud.launch("list", "--zone=z") == 0
    assert "no TPU slices and no queued resources in zone z" in capsys.readouterr().out
    assert cloud.launch("delete", "pod", "--zone=z", "--yes") == 2
    assert "nothing to delete" in capsys.readouterr().err


@pytest.mark.integration
def test_delete_a_multislice_node_without_its_queued_resource(cloud, capsys):
    """Nodes made outside the launcher (no queued resource): each slice's node is deleted."""
    cloud.add_node("ms-0", 1)
    cloud.add_node("ms-1", 1)
    cloud.add_node("other", 1)
    assert cloud.launch("delete", "ms", "--zone=z", "--num-slices=2", "--yes") == 0
    deletes = [c[2:5] for c in cloud.calls() if c[3] == "delete"]
    assert deletes == [["tpu-vm", "delete", "ms-0"], ["tpu-vm", "delete", "ms-1"]]
    capsys.readouterr()
    assert cloud.launch("list", "--zone=z") == 0
    assert capsys.readouterr().out.strip() == "TPU other: v5p-8, READY, 1 host(s)"

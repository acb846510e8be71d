#!/usr/bin/env python3
"""Run diffujax on every host of a Cloud TPU slice (or several slices), from your workstation.

Standard library only (no jax needed here); it drives ``gcloud``:

    python launch/tpu.py create NAME --zone Z --type v5p-128 --runtime-version V [--spot | --reserved]
                                [--num-slices N]     queue the slice(s) and wait until they are ACTIVE
    python launch/tpu.py run    NAME --zone Z [--env KEY=VALUE ...] [--allow-dirty] [--num-slices N]
                                -- train --config configs/X.yaml [key=value ...]
    python launch/tpu.py status NAME --zone Z        per-host state of the newest run
    python launch/tpu.py logs   NAME --zone Z [--worker G] [--follow]
    python launch/tpu.py fetch  NAME --zone Z DEST   copy every host's log to DEST/RUN/worker-G.log
    python launch/tpu.py stop   NAME --zone Z        SIGTERM (a checkpoint is saved), then SIGKILL
    python launch/tpu.py delete NAME --zone Z [--yes] [--num-slices N]
                                stop the job (it checkpoints), then delete the slice(s) and their
                                queued resource: the billing ends, and the hosts' disks go with it
    python launch/tpu.py list   --zone Z             the TPU slices and queued resources there

``run`` ships the files git tracks (plus untracked, not ignored ones) to ``~/diffujax/code/<digest>``
on every host, installs them into ``~/diffujax/venv`` with ``pip install -e '.[tpu]'``, stops the
previous job and anything else holding the TPU, and starts ``python -m diffujax.cli ARGS`` detached
(it survives a dropped ssh connection) with its output in ``~/diffujax/runs/RUN/worker-G.log``, G
being the process index. Nothing on the hosts is ever deleted: earlier code directories, runs and
logs stay. Uncommitted changes are refused unless ``--allow-dirty`` says to ship the working tree
as it is. With ``--num-slices N`` the slices are the nodes NAME-0 .. NAME-(N-1) (what ``create
--num-slices N`` makes) and each host gets the ``MEGASCALE_*`` variables that join them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gzip
import hashlib
import io
import json
import os
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

ROOT = "diffujax"            # on each host, relative to the home directory
MEGASCALE_PORT = 8080        # the port libtpu's multi-slice runtime listens on
QR_DONE = "ACTIVE"
QR_FAILED = {"FAILED", "SUSPENDING", "SUSPENDED", "DELETING"}


class LaunchError(Exception):
    """A problem to report in one line, without a traceback."""


# ----------------------------------------------------------------------------------- gcloud


class Gcloud:
    def __init__(self, zone: str, project: str | None = None, internal_ip: bool = False):
        self.zone, self.project, self.internal_ip = zone, project, internal_ip

    def _base(self, *words) -> list:
        cmd = ["gcloud", "compute", "tpus", *words, f"--zone={self.zone}"]
        return cmd + ([f"--project={self.project}"] if self.project else [])

    def call(self, *words, capture=True, check=True) -> subprocess.CompletedProcess:
        argv = self._base(*words)
        try:
            done = subprocess.run(argv, text=True, capture_output=capture)
        except FileNotFoundError:
            raise LaunchError("gcloud is not on PATH (install the Google Cloud CLI)") from None
        if check and done.returncode:
            err = (done.stderr or "").strip().splitlines()
            raise LaunchError(f"{shlex.join(argv[:5])} failed: {err[-1] if err else done.returncode}")
        return done

    def ssh(self, node: str, worker: int, command: str, capture=True, check=False):
        extra = ["--internal-ip"] if self.internal_ip else []
        return self.call("tpu-vm", "ssh", node, f"--worker={worker}", *extra,
                         f"--command={command}", capture=capture, check=check)

    def scp(self, node: str, worker: int, src: str, dst: str):
        extra = ["--internal-ip"] if self.internal_ip else []
        return self.call("tpu-vm", "scp", src, dst, f"--worker={worker}", *extra, check=False)

    def describe(self, node: str) -> dict:
        return json.loads(self.call("tpu-vm", "describe", node, "--format=json").stdout)

    def list(self, group: str) -> dict:
        """``{short name: record}`` of the zone's TPU VMs (group ``tpu-vm``) or queued resources
        (``queued-resources``); gcloud names them ``projects/P/locations/Z/.../NAME``."""
        records = json.loads(self.call(group, "list", "--format=json").stdout or "[]")
        return {r.get("name", "").rsplit("/", 1)[-1]: r for r in records}


def node_names(name: str, num_slices: int) -> list:
    return [name] if num_slices == 1 else [f"{name}-{s}" for s in range(num_slices)]


class Host:
    """One process of the job: a worker of one node."""

    def __init__(self, node: str, worker: int, index: int, ip: str | None):
        self.node, self.worker, self.index, self.ip = node, worker, index, ip

    def __repr__(self):
        return f"{self.node} worker {self.worker} (process {self.index})"


def list_hosts(gcloud: Gcloud, name: str, num_slices: int) -> list:
    hosts = []
    for node in node_names(name, num_slices):
        info = gcloud.describe(node)
        state = info.get("state", "READY")
        if state != "READY":
            raise LaunchError(f"TPU {node} is {state}, not READY")
        endpoints = info.get("networkEndpoints") or []
        if not endpoints:
            raise LaunchError(f"TPU {node} reports no hosts (networkEndpoints)")
        if hosts and len(endpoints) != hosts[-1].worker + 1:
            raise LaunchError(f"slices differ in size: {node} has {len(endpoints)} hosts")
        for w, ep in enumerate(endpoints):
            hosts.append(Host(node, w, len(hosts), ep.get("ipAddress")))
    return hosts


def on_all(hosts, fn) -> list:
    """fn(host) on every host at once; results in host order."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(64, len(hosts))) as pool:
        return list(pool.map(fn, hosts))


def worker_py(*args) -> str:
    """Shell command running launch/worker.py (installed by `run` at ~/diffujax/worker.py)."""
    return f"cd ~ && python3 {ROOT}/worker.py " + shlex.join([*args, f"--root={ROOT}"])


# ------------------------------------------------------------------------------------- code


def _git(*args, cwd) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise LaunchError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def pack_code(repo: str, allow_dirty: bool):
    """A reproducible .tar.gz of the files git tracks plus untracked, unignored ones, as they are
    on disk. Returns (bytes, digest, description)."""
    repo = _git("rev-parse", "--show-toplevel", cwd=repo).strip()
    commit = _git("rev-parse", "HEAD", cwd=repo).strip()
    changes = [line for line in _git("status", "--porcelain", cwd=repo).splitlines() if line]
    if changes and not allow_dirty:
        shown = "\n  ".join(changes[:10]) + ("\n  ..." if len(changes) > 10 else "")
        raise LaunchError(f"uncommitted changes in {repo}:\n  {shown}\ncommit them, or pass "
                          "--allow-dirty to ship the working tree as it is")
    files = sorted(set(_git("ls-files", "-z", "--cached", "--others", "--exclude-standard",
                            cwd=repo).split("\0")) - {""})
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz, \
            tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for rel in files:
            path = os.path.join(repo, rel)
            if not os.path.lexists(path):  # deleted in the working tree
                continue
            info = tar.gettarinfo(path, arcname=rel)
            info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
            if info.isreg():
                with open(path, "rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()[:16]
    what = f"{commit[:12]}" + (f" + {len(changes)} uncommitted change(s)" if changes else "")
    return data, digest, what


def start_command(digest: str, run: str, host: Host, args, env: dict, install: str | None,
                  venv: str | None, grace: float) -> str:
    """The shell command that unpacks the shipped tree (once per digest) and starts the job."""
    code = f"{ROOT}/code/{digest}"
    tmp = f"{ROOT}/code/.{digest}.tmp"  # our own half-extracted copy from an interrupted launch
    unpack = (f"if [ ! -d {code} ]; then rm -rf {tmp} && mkdir -p {tmp} && "
              f"tar -xzf {ROOT}-{digest}.tar.gz -C {tmp} && mv {tmp} {code}; fi")
    start = ["start", f"--code={code}", f"--run={run}", f"--worker={host.index}",
             f"--grace={grace:g}"]
    start += [f"--install={install}"] if install is not None else []
    start += [f"--venv={venv}"] if venv else []
    start += [f"--env={k}={v}" for k, v in env.items()]
    return " && ".join([
        "set -e", "cd ~", f"mkdir -p {ROOT}/code", unpack, f"rm -f {ROOT}-{digest}.tar.gz",
        f"cp {code}/launch/worker.py {ROOT}/worker.py",
        f"python3 {ROOT}/worker.py " + shlex.join(start + [f"--root={ROOT}", "--", *args]),
    ])


# --------------------------------------------------------------------------------- commands


def parse_env(pairs) -> dict:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise LaunchError(f"--env {pair!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def job_args(args, hosts, num_slices) -> list:
    """The diffujax arguments, with what a multi-host `train` needs added unless given."""
    args = list(args)
    if not args:
        raise LaunchError("nothing to run: give the diffujax command after --, e.g. "
                          "-- train --config configs/tiny.yaml")
    if args[0] == "train":
        given = {a.split("=", 1)[0] for a in args if "=" in a}
        if len(hosts) > 1 and "mesh.distributed" not in given:
            args.append("mesh.distributed=true")
        if num_slices > 1 and "mesh.num_slices" not in given:
            args.append(f"mesh.num_slices={num_slices}")
    return args


def cmd_run(a, gcloud: Gcloud) -> int:
    hosts = list_hosts(gcloud, a.name, a.num_slices)
    args = job_args(a.args, hosts, a.num_slices)
    env = parse_env(a.env)
    data, digest, what = pack_code(a.repo, a.allow_dirty)
    run = a.run_name or datetime.datetime.now(datetime.timezone.utc).strftime("run-%Y%m%d-%H%M%S")
    print(f"shipping {what} ({len(data) / 1e6:.1f} MB, digest {digest}) to {len(hosts)} host(s); "
          f"run {run}", flush=True)

    def host_env(host):
        if a.num_slices == 1:
            return env
        per_slice = len(hosts) // a.num_slices
        return {"MEGASCALE_COORDINATOR_ADDRESS": f"{hosts[0].ip}:{MEGASCALE_PORT}",
                "MEGASCALE_NUM_SLICES": str(a.num_slices), "MEGASCALE_PORT": str(MEGASCALE_PORT),
                "MEGASCALE_SLICE_ID": str(host.index // per_slice), **env}

    with tempfile.TemporaryDirectory() as tmp:
        archive = os.path.join(tmp, f"{ROOT}-{digest}.tar.gz")
        with open(archive, "wb") as f:
            f.write(data)

        def launch(host):
            sent = gcloud.scp(host.node, host.worker, archive, f"{host.node}:{ROOT}-{digest}.tar.gz")
            if sent.returncode:
                return sent
            return gcloud.ssh(host.node, host.worker, start_command(
                digest, run, host, args, host_env(host), None if a.no_install else a.extra,
                a.venv, a.grace))

        results = on_all(hosts, launch)
    failed = [(h, r) for h, r in zip(hosts, results) if r.returncode]
    for h, r in zip(hosts, results):
        if not r.returncode:
            for line in (r.stdout or "").strip().splitlines():
                print(f"  {h}: {line}", flush=True)
    if failed:
        for h, r in failed:
            print(f"  {h}: FAILED ({r.returncode}): {(r.stderr or r.stdout or '').strip()}",
                  file=sys.stderr)
        # The others would wait forever for the missing processes: stop them.
        started = [h for h, r in zip(hosts, results) if not r.returncode]
        if started:
            on_all(started, lambda h: gcloud.ssh(h.node, h.worker,
                                                 worker_py("stop", f"--run={run}", "--grace=30")))
        raise LaunchError(f"{len(failed)} of {len(hosts)} host(s) did not start; the others were "
                          "stopped")
    me = "python launch/tpu.py "
    where = f"{a.name} --zone={gcloud.zone}" + (f" --num-slices={a.num_slices}"
                                                if a.num_slices > 1 else "")
    print(f"started {run} on {len(hosts)} host(s). Follow: {me}logs {where} --follow; "
          f"stop: {me}stop {where}", flush=True)
    if a.follow:
        return gcloud.ssh(hosts[0].node, hosts[0].worker,
                          worker_py("logs", f"--run={run}", "--follow"), capture=False).returncode
    return 0


def _select(hosts, worker):
    if worker is None:
        return hosts
    if not 0 <= worker < len(hosts):
        raise LaunchError(f"--worker {worker}: the job has processes 0..{len(hosts) - 1}")
    return [hosts[worker]]


def cmd_status(a, gcloud) -> int:
    hosts = list_hosts(gcloud, a.name, a.num_slices)
    run = [f"--run={a.run}"] if a.run else []
    results = on_all(hosts, lambda h: gcloud.ssh(h.node, h.worker, worker_py("status", *run)))
    bad = 0
    for h, r in zip(hosts, results):
        text = (r.stdout if not r.returncode else r.stderr or r.stdout).strip()
        print(f"{h}: {text}")
        bad += bool(r.returncode)
    return 1 if bad else 0


def cmd_logs(a, gcloud) -> int:
    hosts = _select(list_hosts(gcloud, a.name, a.num_slices), a.worker if a.worker is not None
                    else 0)
    run = [f"--run={a.run}"] if a.run else []
    follow = ["--follow"] if a.follow else []
    h = hosts[0]
    return gcloud.ssh(h.node, h.worker, worker_py("logs", *run, f"--lines={a.lines}", *follow),
                      capture=False).returncode


def cmd_fetch(a, gcloud) -> int:
    hosts = _select(list_hosts(gcloud, a.name, a.num_slices), a.worker)
    run = a.run
    if run is None:  # the newest run, as recorded on the first host
        got = gcloud.ssh(hosts[0].node, hosts[0].worker, f"cat ~/{ROOT}/current")
        if got.returncode:
            raise LaunchError(f"no run found on {hosts[0]}")
        run = got.stdout.strip()
    dest = os.path.join(a.dest, run)
    os.makedirs(dest, exist_ok=True)

    def fetch(h):
        name = f"worker-{h.index}.log"
        return gcloud.scp(h.node, h.worker, f"{h.node}:{ROOT}/runs/{run}/{name}",
                          os.path.join(dest, name))

    results = on_all(hosts, fetch)
    for h, r in zip(hosts, results):
        state = "ok" if not r.returncode else f"FAILED: {(r.stderr or '').strip()}"
        print(f"{h}: {os.path.join(dest, f'worker-{h.index}.log')} {state}")
    return 1 if any(r.returncode for r in results) else 0


def cmd_stop(a, gcloud) -> int:
    hosts = list_hosts(gcloud, a.name, a.num_slices)
    run = [f"--run={a.run}"] if a.run else []
    results = on_all(hosts, lambda h: gcloud.ssh(h.node, h.worker,
                                                 worker_py("stop", *run, f"--grace={a.grace:g}")))
    for h, r in zip(hosts, results):
        print(f"{h}: {(r.stdout if not r.returncode else r.stderr or r.stdout).strip()}")
    return 1 if any(r.returncode for r in results) else 0


def cmd_create(a, gcloud) -> int:
    qr = a.queued_resource or a.name
    words = ["queued-resources", "create", qr, f"--accelerator-type={a.type}",
             f"--runtime-version={a.runtime_version}"]
    if a.num_slices == 1:
        words.append(f"--node-id={a.name}")
    else:
        words += [f"--node-count={a.num_slices}", f"--node-prefix={a.name}"]
    words += ["--spot"] if a.spot else []
    words += ["--reserved"] if a.reserved else []
    gcloud.call(*words)
    print(f"queued resource {qr} requested ({a.type} x {a.num_slices}, "
          f"{'spot' if a.spot else 'reserved' if a.reserved else 'on-demand'})", flush=True)
    if a.no_wait:
        return 0
    start, last = time.time(), None
    while True:
        state = gcloud.call("queued-resources", "describe", qr,
                            "--format=value(state.state)").stdout.strip()
        if state != last:
            print(f"  {qr}: {state} after {time.time() - start:.0f} s", flush=True)
            last = state
        if state == QR_DONE:
            return 0
        if state in QR_FAILED:
            raise LaunchError(f"queued resource {qr} is {state}: see `gcloud compute tpus "
                              f"queued-resources describe {qr} --zone={gcloud.zone}`")
        if a.timeout and time.time() - start > a.timeout:
            raise LaunchError(f"queued resource {qr} still {state} after {a.timeout:g} s "
                              "(it stays queued; run create again with the same name to wait)")
        time.sleep(a.poll)


def _qr_state(record: dict) -> str:
    state = record.get("state")
    return (state.get("state") if isinstance(state, dict) else state) or "?"


def cmd_delete(a, gcloud) -> int:
    qr = a.queued_resource or a.name
    nodes = node_names(a.name, a.num_slices)
    existing, queued = gcloud.list("tpu-vm"), gcloud.list("queued-resources")
    found = [n for n in nodes if n in existing]
    if not found and qr not in queued:
        raise LaunchError(f"no TPU {', '.join(nodes)} and no queued resource {qr} in zone"
                          f" {gcloud.zone}: nothing to delete (python launch/tpu.py list"
                          f" --zone={gcloud.zone} shows what there is)")
    what = (f"TPU {', '.join(found) or '(none yet)'}"
            + (f" and queued resource {qr}" if qr in queued else ""))
    if not a.yes:
        if not sys.stdin.isatty():
            raise LaunchError(f"deleting {what} needs --yes (stdin is not a terminal to ask)")
        answer = input(f"delete {what}? The hosts' disks (code, logs under ~/{ROOT}) go with"
                       " it. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    if found == nodes and not a.no_stop:  # the job saves a checkpoint before its hosts go
        hosts = []
        for node in found:
            if existing[node].get("state", "READY") == "READY":
                for w in range(len(existing[node].get("networkEndpoints") or [None])):
                    hosts.append(Host(node, w, len(hosts), None))
        results = on_all(hosts, lambda h: gcloud.ssh(h.node, h.worker, worker_py(
            "stop", f"--grace={a.grace:g}"))) if hosts else []
        for h, r in zip(hosts, results):
            print(f"{h}: {(r.stdout if not r.returncode else 'no job to stop').strip()}",
                  flush=True)
    if qr in queued:  # --force: the queued resource's nodes go with it
        gcloud.call("queued-resources", "delete", qr, "--force", "--quiet")
    else:
        for node in found:
            gcloud.call("tpu-vm", "delete", node, "--quiet")
    print(f"deleted {what}: the slice is no longer billed", flush=True)
    return 0


def cmd_list(a, gcloud) -> int:
    nodes, queued = gcloud.list("tpu-vm"), gcloud.list("queued-resources")
    for name, record in sorted(queued.items()):
        specs = (record.get("tpu") or {}).get("nodeSpec") or []
        members = [spec.get("nodeId") or spec.get("multiNodeParams", {}).get("nodeIdPrefix", "?")
                   for spec in specs]
        print(f"queued resource {name}: {_qr_state(record)}"
              + (f" (nodes {', '.join(members)})" if members else ""))
    for name, record in sorted(nodes.items()):
        hosts = len(record.get("networkEndpoints") or [])
        print(f"TPU {name}: {record.get('acceleratorType', '?')}, {record.get('state', '?')},"
              f" {hosts} host(s)")
    if not nodes and not queued:
        print(f"no TPU slices and no queued resources in zone {gcloud.zone}")
    return 0


# ----------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="launch/tpu.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, fn, help_text):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("name", help="TPU VM name (with --num-slices N: the prefix of NAME-0..)")
        s.add_argument("--zone", required=True)
        s.add_argument("--project")
        s.add_argument("--num-slices", type=int, default=1)
        s.add_argument("--internal-ip", action="store_true", help="ssh over the internal network")
        s.set_defaults(fn=fn)
        return s

    s = command("create", cmd_create, "queue the slice(s) and wait until they are ACTIVE")
    s.add_argument("--type", required=True, help="accelerator type, e.g. v5p-128")
    s.add_argument("--runtime-version", required=True, help="TPU software version, e.g. "
                   "v2-alpha-tpuv5 (v5p) or v2-alpha-tpuv6e (v6e)")
    tier = s.add_mutually_exclusive_group()
    tier.add_argument("--spot", action="store_true", help="spot capacity (preemptible)")
    tier.add_argument("--reserved", action="store_true", help="from your reservation")
    s.add_argument("--queued-resource", help="queued resource id (default: NAME)")
    s.add_argument("--no-wait", action="store_true")
    s.add_argument("--timeout", type=float, default=0, help="seconds to wait (0: no limit)")
    s.add_argument("--poll", type=float, default=30, help="seconds between state checks")

    s = command("run", cmd_run, "ship the code and start `diffujax ARGS` on every host")
    s.epilog = ("Everything after `--` is the diffujax command line, passed on as given, e.g. "
                "-- train --config configs/tiny.yaml output_dir=gs://BUCKET/run")
    s.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--run-name", help="default: run-YYYYmmdd-HHMMSS (UTC)")
    s.add_argument("--allow-dirty", action="store_true",
                   help="ship uncommitted changes (the working tree as it is)")
    s.add_argument("--extra", default="tpu", help="pip extra to install (default tpu; '' for none)")
    s.add_argument("--no-install", action="store_true", help="skip pip install (venv must exist)")
    s.add_argument("--venv", help=f"Python environment on the hosts (default ~/{ROOT}/venv)")
    s.add_argument("--grace", type=float, default=120,
                   help="seconds a stopped job gets to save its checkpoint before SIGKILL")
    s.add_argument("--follow", action="store_true", help="then tail process 0's log")
    s.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   help=argparse.SUPPRESS)

    s = command("status", cmd_status, "state of the newest (or --run) run on every host")
    s.add_argument("--run")
    s = command("logs", cmd_logs, "print (or --follow) one process's log")
    s.add_argument("--run")
    s.add_argument("--worker", type=int, help="process index (default 0)")
    s.add_argument("--lines", type=int, default=100)
    s.add_argument("--follow", action="store_true")
    s = command("fetch", cmd_fetch, "copy the logs of every host to DEST/RUN/")
    s.add_argument("dest")
    s.add_argument("--run")
    s.add_argument("--worker", type=int, help="only this process index")
    s = command("stop", cmd_stop, "SIGTERM the job on every host (it checkpoints), SIGKILL later")
    s.add_argument("--run")
    s.add_argument("--grace", type=float, default=120)
    s = command("delete", cmd_delete, "stop the job (it checkpoints), then delete the slice(s)"
                " and their queued resource: the billing ends")
    s.add_argument("--queued-resource", help="queued resource id (default: NAME)")
    s.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    s.add_argument("--no-stop", action="store_true", help="delete without stopping the job first")
    s.add_argument("--grace", type=float, default=120,
                   help="seconds the job gets to save its checkpoint before SIGKILL")
    s = sub.add_parser("list", help="the TPU slices and queued resources of a zone",
                       description="the TPU slices and queued resources of a zone")
    s.add_argument("--zone", required=True)
    s.add_argument("--project")
    s.set_defaults(fn=cmd_list, num_slices=1, internal_ip=False)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Everything after the first `--` is the diffujax command line, passed on untouched.
    cut = argv.index("--") if "--" in argv else len(argv)
    args = build_parser().parse_args(argv[:cut])
    args.args = argv[cut + 1:]
    try:
        if args.num_slices < 1:
            raise LaunchError(f"--num-slices {args.num_slices}: must be >= 1")
        return args.fn(args, Gcloud(args.zone, args.project, args.internal_ip))
    except LaunchError as e:
        print(f"launch/tpu.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

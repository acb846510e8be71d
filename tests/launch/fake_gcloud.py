#!/usr/bin/env python3
"""A stand-in for `gcloud compute tpus ...` that the launcher tests put on PATH.

Every call is appended to $FAKE_GCLOUD_DIR/calls.jsonl. Each TPU host is a directory
$FAKE_GCLOUD_DIR/hosts/NODE/wW that serves as its home: `tpu-vm ssh --worker=W --command=C` runs
`bash -c C` there as its own process (in a new session, as sshd would), and then hangs that session
up as a dropped connection would, so only properly detached processes survive. `tpu-vm scp`
copies to and from those homes; `tpu-vm describe` reports one network endpoint per host. A queued
resource stays WAITING_FOR_RESOURCES for $FAKE_GCLOUD_QR_POLLS describes, then turns ACTIVE (its
nodes appear, $FAKE_GCLOUD_WORKERS hosts each). `list` reports nodes and queued resources in
gcloud's JSON shape; `queued-resources delete` refuses one with nodes unless `--force` (which
deletes them too), `tpu-vm delete` deletes a node; a deleted node's hosts are gone.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

STATE = os.environ["FAKE_GCLOUD_DIR"]
BOOLEAN = {"--spot", "--reserved", "--internal-ip", "--quiet", "--force"}


def parse(words):
    pos, flags = [], {}
    i = 0
    while i < len(words):
        w = words[i]
        if w.startswith("--"):
            if "=" in w:
                k, v = w.split("=", 1)
            elif w in BOOLEAN:
                k, v = w, True
            else:
                k, v = w, words[i + 1]
                i += 1
            flags[k] = v
        else:
            pos.append(w)
        i += 1
    return pos, flags


def load(name, default):
    try:
        with open(os.path.join(STATE, name)) as f:
            return json.load(f)
    except FileNotFoundError:
        return default


def save(name, value):
    with open(os.path.join(STATE, name), "w") as f:
        json.dump(value, f)


def home(node, worker):
    return os.path.join(STATE, "hosts", node, f"w{worker}")


def workers(node, flag):
    n = load("nodes.json", {}).get(node)
    if n is None:
        sys.exit(f"ERROR: (gcloud.compute.tpus.tpu-vm) NOT_FOUND: node {node}")
    return range(n) if flag == "all" else [int(flag)]


def local(spec, node_hint, worker):
    """'NODE:path' -> that host's file; anything else is a local path."""
    if ":" in spec and not spec.startswith("/"):
        node, path = spec.split(":", 1)
        return os.path.join(home(node, worker), path), node
    return spec, None


def main(argv):
    with open(os.path.join(STATE, "calls.jsonl"), "a") as f:
        f.write(json.dumps(argv) + "\n")
    if argv[:2] != ["compute", "tpus"]:
        sys.exit(f"fake gcloud: unsupported {argv}")
    group, verb = argv[2], argv[3]
    pos, flags = parse(argv[4:])
    if "--zone" not in flags:
        sys.exit("ERROR: (gcloud) --zone is required in these tests")
    nodes = load("nodes.json", {})
    if (group, verb) == ("tpu-vm", "describe"):
        node = pos[0]
        if node not in nodes:
            sys.exit(f"ERROR: NOT_FOUND: node {node}")
        print(json.dumps({"name": node, "state": "READY", "networkEndpoints": [
            {"ipAddress": f"10.0.{len(node)}.{w}"} for w in range(nodes[node])]}))
        return 0
    if (group, verb) == ("tpu-vm", "scp"):
        src, dst = pos
        for w in workers((src if ":" in src else dst).split(":")[0], flags["--worker"]):
            s, _ = local(src, None, w)
            d, _ = local(dst, None, w)
            os.makedirs(os.path.dirname(os.path.abspath(d)), exist_ok=True)
            try:
                shutil.copyfile(s, d)
            except FileNotFoundError as e:
                print(f"scp: {e}", file=sys.stderr)
                return 1
        return 0
    if (group, verb) == ("tpu-vm", "ssh"):
        rc = 0
        for w in workers(pos[0], flags["--worker"]):
            h = home(pos[0], w)
            os.makedirs(h, exist_ok=True)
            env = dict(os.environ, HOME=h)
            p = subprocess.Popen(["bash", "-c", flags["--command"]], cwd=h, env=env,
                                 start_new_session=True)
            rc = p.wait() or rc
            try:  # the connection closes: its session is hung up
                os.killpg(p.pid, signal.SIGHUP)
            except ProcessLookupError:
                pass
        return rc
    if (group, verb) == ("queued-resources", "create"):
        qrs = load("qrs.json", {})
        if "--node-id" in flags:
            names = [flags["--node-id"]]
        else:
            names = [f"{flags['--node-prefix']}-{s}" for s in range(int(flags["--node-count"]))]
        qrs[pos[0]] = {"nodes": names, "polls": int(os.environ.get("FAKE_GCLOUD_QR_POLLS", 2)),
                       "final": os.environ.get("FAKE_GCLOUD_QR_FINAL", "ACTIVE")}
        save("qrs.json", qrs)
        return 0
    if (group, verb) == ("queued-resources", "describe"):
        qrs = load("qrs.json", {})
        qr = qrs[pos[0]]
        if qr["polls"] > 0:
            qr["polls"] -= 1
            state = "WAITING_FOR_RESOURCES"
        else:
            state = qr["final"]
            if state == "ACTIVE":
                for n in qr["nodes"]:
                    nodes.setdefault(n, int(os.environ.get("FAKE_GCLOUD_WORKERS", 2)))
                save("nodes.json", nodes)
        save("qrs.json", qrs)
        print(state)
        return 0
    if (group, verb) == ("tpu-vm", "list"):
        print(json.dumps([{"name": f"projects/p/locations/{flags['--zone']}/nodes/{n}",
                           "acceleratorType": "v5p-8", "state": "READY",
                           "networkEndpoints": [{"ipAddress": f"10.0.{len(n)}.{w}"}
                                                for w in range(count)]}
                          for n, count in nodes.items()]))
        return 0
    if (group, verb) == ("queued-resources", "list"):
        qrs = load("qrs.json", {})
        print(json.dumps([{"name": f"projects/p/locations/{flags['--zone']}/queuedResources/{q}",
                           "state": {"state": "ACTIVE" if qr["polls"] <= 0 else
                                     "WAITING_FOR_RESOURCES"},
                           "tpu": {"nodeSpec": [{"nodeId": n} for n in qr["nodes"]]}}
                          for q, qr in qrs.items()]))
        return 0
    if (group, verb) == ("tpu-vm", "delete"):
        if pos[0] not in nodes:
            sys.exit(f"ERROR: NOT_FOUND: node {pos[0]}")
        _delete_node(nodes, pos[0])
        return 0
    if (group, verb) == ("queued-resources", "delete"):
        qrs = load("qrs.json", {})
        if pos[0] not in qrs:
            sys.exit(f"ERROR: NOT_FOUND: queued resource {pos[0]}")
        held = [n for n in qrs[pos[0]]["nodes"] if n in nodes]
        if held and "--force" not in flags:
            sys.exit(f"ERROR: FAILED_PRECONDITION: queued resource {pos[0]} has nodes: --force")
        for n in held:
            _delete_node(nodes, n)
        del qrs[pos[0]]
        save("qrs.json", qrs)
        return 0
    sys.exit(f"fake gcloud: unsupported {argv}")


def _delete_node(nodes, name):
    """The machine goes: whatever still runs on its hosts dies, its disks are gone."""
    del nodes[name]
    save("nodes.json", nodes)
    hosts = os.path.join(STATE, "hosts", name)
    for pid_file in glob.glob(os.path.join(hosts, "*", "diffujax", "runs", "*", "worker-*.pid")):
        try:
            with open(pid_file) as f:
                os.killpg(int(f.read()), signal.SIGKILL)
        except (ProcessLookupError, ValueError, OSError):
            pass
    shutil.rmtree(hosts, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

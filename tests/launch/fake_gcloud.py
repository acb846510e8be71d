#!/usr/bin/env python3
"""A stand-in for `gcloud compute tpus ...` that the launcher tests put on PATH.

Every call is appended to $FAKE_GCLOUD_DIR/calls.jsonl. Each TPU host is a directory
$FAKE_GCLOUD_DIR/hosts/NODE/wW that serves as its home: `tpu-vm ssh --worker=W --command=C` runs
`bash -c C` there as its own process (in a new session, as sshd would), and then hangs that session
up as a dropped connection would, so only properly detached processes survive. `tpu-vm scp`
copies to and from those homes; `tpu-vm describe` reports one network endpoint per host. A queued
resource stays WAITING_FOR_RESOURCES for $FAKE_GCLOUD_QR_POLLS describes, then turns ACTIVE (its
nodes appear, $FAKE_GCLOUD_WORKERS hosts each).
"""
import json
import os
import shutil
import signal
import subprocess
import sys

STATE = os.environ["FAKE_GCLOUD_DIR"]
BOOLEAN = {"--spot", "--reserved", "--internal-ip", "--quiet"}


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
    sys.exit(f"fake gcloud: unsupported {argv}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

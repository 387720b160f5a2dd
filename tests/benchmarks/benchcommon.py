"""Helpers shared by the benchmark scripts in this folder.

Not a test module: the benchmark scripts import it from their own folder.  It
starts real sshd nodes (tests/sshd.py), a real head (tests/cluster.py), builds
(or reuses) distribute.pyz, talks to the head's socket without starting a
Python client per poll, and records results.
"""

import datetime
import hashlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import sshd  # noqa: E402
from cluster import DISTRIBUTE, HeadProcess, node_workdirs, nodes_yaml, wait_until  # noqa: E402,F401

RESULTS = HERE / "results.jsonl"

# The client as `pip install` runs it: the module imported from its .pyc (call compile_module()
# first: PYTHONDONTWRITEBYTECODE may be set, and DISTRIBUTE compiles 7,000 lines at every start).
INSTALLED = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); sys.argv[0] = 'distribute'; "
                                   "import distribute; distribute.main()"]


def compile_module() -> None:
    import py_compile
    py_compile.compile(str(ROOT / "distribute.py"), doraise=True)


def head_behind_sshd(home: Path):
    """A head on this machine (socket group `distribute`; one node, declared with `benchcap`,
    that never answers, so jobs stay queued) and a lab member, dalice, who reaches its machine
    through a real sshd with her own key and known_hosts: (sshd, her SSH home, the head, not
    started; the head's own HOME is `home`)."""
    keys = sshd.KeyStore(home / "keys")
    head_sshd = sshd.Sshd("head", host_key=keys.get("host-head")).start()
    alice = sshd.SshClientHome("alice", key=keys.get("client"))
    alice.add_host("head", head_sshd, "dalice")
    head_env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")}
    head_env["HOME"] = str(home)
    nodes_text = ("nodes:\n  - name: away\n    host: 127.0.0.1\n    port: 9\n    user: nobody\n"
                  "    capabilities: [benchcap]\n")
    return head_sshd, alice, HeadProcess(None, nodes_text, head_env, extra=["--group", "distribute"])


def machine() -> dict:
    """What the numbers were measured on."""
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "load_before": round(os.getloadavg()[0], 2)}


def pyz_path() -> Path:
    """distribute.pyz built from this tree; rebuilt only when distribute.py or
    build_zipapp.py changed (the build keeps its wheels in a download cache)."""
    digest = hashlib.sha256()
    for name in ("distribute.py", "build_zipapp.py"):
        digest.update((ROOT / name).read_bytes())
    folder = Path(tempfile.gettempdir()) / "distribute-bench-pyz" / digest.hexdigest()[:16]
    out = folder / "distribute.pyz"
    if not out.exists():
        folder.mkdir(parents=True, exist_ok=True)
        print(f"building {out} ...", file=sys.stderr)
        part = folder / "distribute.pyz.part"
        proc = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(part)],
                              cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"build_zipapp.py failed:\n{proc.stdout[-3000:]}")
        os.replace(part, out)
    return out


class Cluster:
    """`count` sshd nodes and the head's SSH client home (aliases node1..)."""

    def __init__(self, count: int):
        sshd.ensure_users()
        sshd.ensure_privsep_dir()
        self.keys = sshd.KeyStore(Path(tempfile.mkdtemp(prefix="bench-keys-")))
        self.home = sshd.SshClientHome("bench-head", key=self.keys.get("client-head"))
        self.nodes = []
        for i in range(1, count + 1):
            node = sshd.Sshd(f"node{i}", host_key=self.keys.get(f"host-node{i}")).start()
            self.home.add_host(node.name, node, sshd.NODE_USER)
            self.nodes.append(node)

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        self.home.close()
        import shutil
        shutil.rmtree(self.keys.directory, ignore_errors=True)


def head_call(sock: Path, header: dict, payload: bytes = b"", timeout: float = 120.0):
    """One request to the head's Unix socket, in process (frames: lengths, JSON, payload)."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.settimeout(timeout)
    try:
        conn.connect(str(sock))
        body = json.dumps(header).encode()
        conn.sendall(len(body).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + body + payload)
        prefix = _read_exactly(conn, 8)
        size, payload_size = int.from_bytes(prefix[:4], "big"), int.from_bytes(prefix[4:], "big")
        reply = json.loads(_read_exactly(conn, size))
        data = _read_exactly(conn, payload_size) if payload_size else b""
        return reply, data
    finally:
        conn.close()


def _read_exactly(conn, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = conn.recv(min(size - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the head hung up")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def batch_state(sock: Path, key: str):
    reply, _ = head_call(sock, {"op": "status"})
    for batch in reply["batches"]:
        if batch["batch"] == key:
            return batch
    return None


def wait_batch_done(sock: Path, key: str, timeout: float, poll: float = 0.05) -> dict:
    """Poll the head (in process, cheap) until the batch is no longer active."""
    deadline = time.monotonic() + timeout
    while True:
        batch = batch_state(sock, key)
        if batch is not None and batch["state"] != "active":
            return batch
        if time.monotonic() > deadline:
            raise SystemExit(f"batch {key} did not finish within {timeout}s: {batch}")
        time.sleep(poll)


def shell_job_file(folder: Path, name: str, count: int, command, namespace: str = "bench",
                   capabilities=()) -> Path:
    """A shell batch of `count` jobs j00000…; `command(i)` gives job i's command."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["meta:", f"  batch_name: {name}", f"  namespace: {namespace}",
             f"  capabilities: [{', '.join(capabilities)}]", "shell:", "  jobs:"]
    for i in range(count):
        lines += [f"    - name: j{i:05d}", f"      command: {json.dumps(command(i))}"]
    path = folder / "distribute-jobs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def median(values):
    return statistics.median(values) if values else None


def report(name: str, result: dict) -> None:
    """One JSON line on stdout, appended to results.jsonl too."""
    result = dict(result, bench=name, when=datetime.datetime.now().isoformat(timespec="seconds"))
    line = json.dumps(result, sort_keys=True)
    print(line)
    with open(RESULTS, "a") as out:
        out.write(line + "\n")


def timed(argv, **kwargs) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kwargs)
    return time.perf_counter() - start

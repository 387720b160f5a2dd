"""A real head (`distribute serve` as a subprocess) over real sshd nodes, for end-to-end tests."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from distribute import socket_answers  # noqa: E402  (the product's own probe)
DISTRIBUTE = [sys.executable, str(ROOT / "distribute.py")]
NODE_PYTHON = "/usr/bin/python3"


def wait_until(condition, timeout, what):
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def nodes_yaml(nodes, workdirs, caps=None, slots=None, user="dnode", pause_dirs=None, extra=None):
    """A distribute-nodes.yaml for sshd nodes reached through the head home's aliases;
    extra: {node name: YAML text of more keys, e.g. an owner: block, indented as a node key}."""
    caps, slots, pause_dirs, extra = caps or {}, slots or {}, pause_dirs or {}, extra or {}
    lines = ["nodes:"]
    for node in nodes:
        lines += [f"  - name: {node.name}", f"    host: {node.name}", f"    user: {user}",
                  f"    workdir: {workdirs[node.name]}", f"    python: {NODE_PYTHON}",
                  f"    slots: {slots.get(node.name, 1)}",
                  f"    capabilities: [{', '.join(caps.get(node.name, []))}]"]
        if node.name in pause_dirs:
            lines.append(f"    pause_dir: {pause_dirs[node.name]}")
        if node.name in extra:
            lines += ["    " + line for line in extra[node.name].strip("\n").splitlines()]
    return "\n".join(lines) + "\n"


class HeadProcess:
    """`distribute serve` started as root with the head's SSH home, stopped at the end."""

    def __init__(self, tmp, nodes_text, env, pyz=None, extra=()):
        self.dir = Path(tempfile.mkdtemp(prefix="dhead-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.state = self.dir / "state"
        self.archive = self.dir / "archive"
        self.nodes_file = None
        if nodes_text is not None:             # None: this machine is the head's one node
            self.nodes_file = self.dir / "distribute-nodes.yaml"
            self.nodes_file.write_text(nodes_text)
        self.env = env
        self.pyz = pyz
        self.extra = list(extra)
        self.proc = None
        self.log = self.dir / "head.log"

    @property
    def socket(self):
        return self.state / "head.sock"

    def start(self):
        self.state.mkdir(exist_ok=True)
        os.chmod(self.state, 0o755)
        argv = DISTRIBUTE + ["serve", "--state", str(self.state), "--archive", str(self.archive),
                             "--supervisor-idle", "30"] + self.extra
        if self.nodes_file:
            argv += ["--nodes", str(self.nodes_file)]
        if self.pyz:
            argv += ["--pyz", str(self.pyz)]
        self.proc = subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "ab"))
        wait_until(lambda: self.proc.poll() is not None or socket_answers(str(self.socket)), 20, "the head's socket")
        assert self.proc.poll() is None, self.log.read_text()
        return self

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def cli(self, *args, env=None, check=True, head=None):
        """Run a client command against this head (local socket unless `head` is given)."""
        target = ["--head", head, "--socket", str(self.socket)] if head else ["--head", "local", "--socket", str(self.socket)]
        result = subprocess.run(DISTRIBUTE + target + [str(a) for a in args], env=env or self.env,
                                capture_output=True, text=True, timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"distribute {' '.join(map(str, args))} exited {result.returncode}:\n"
                                 f"{result.stderr}\n--- head log ---\n{self.log.read_text()[-4000:]}")
        return result

    def status(self):
        return json.loads(self.cli("status", "--all", "--json").stdout)

    def nodes(self):
        return json.loads(self.cli("nodes", "--json").stdout)["nodes"]

    def batch(self, key):
        for batch in self.status()["batches"]:
            if batch["batch"] == key:
                return batch
        return None

    def wait_nodes_up(self, count, timeout=60):
        return wait_until(lambda: sum(n["reachable"] for n in self.nodes()) >= count, timeout,
                          f"{count} nodes up\n{self.log.read_text()[-3000:]}")

    def wait_batch(self, key, timeout=120):
        def finished():
            batch = self.batch(key)
            return batch if batch and batch["state"] != "active" else None
        try:
            return wait_until(finished, timeout, f"batch {key} to finish")
        except AssertionError:
            raise AssertionError(f"batch {key} did not finish: {self.batch(key)}\n{self.log.read_text()[-4000:]}")


def pyz_of_another_build(pyz, folder):
    """The same program as another build (another archive comment, so another hash), as a
    head upgrade brings: `distribute-next.pyz` in folder."""
    import zipfile
    other = Path(folder) / "distribute-next.pyz"
    shutil.copy(pyz, other)
    with zipfile.ZipFile(other, "a") as archive:
        archive.comment = b"the next build"
    return other


def stop_local_head(head, remove=None):
    """Stop a head whose nodes are this machine, then their supervisors (found by their workdirs
    under the head's state folder), then delete its folder (`remove`, default shutil.rmtree)."""
    import psutil
    head.stop()
    workdir = f"{head.state / 'nodes'}/"
    supervisors = [p for p in psutil.process_iter(["cmdline"])
                   if any(arg.startswith(workdir) for arg in p.info["cmdline"] or [])]
    for process in supervisors:
        process.terminate()
    _, alive = psutil.wait_procs(supervisors, timeout=10)
    for process in alive:
        process.kill()
    (remove or (lambda folder: shutil.rmtree(folder, ignore_errors=True)))(head.dir)


def node_workdirs(ssh_nodes):
    """One workdir per node, owned by the node account (the nodes share this machine's disk)."""
    base = Path(tempfile.mkdtemp(prefix="dnodes-", dir="/tmp"))
    os.chmod(base, 0o755)
    dirs = {}
    for node in ssh_nodes:
        folder = base / node.name
        folder.mkdir()
        shutil.chown(folder, "dnode", "dnode")
        dirs[node.name] = folder
    return dirs

"""Day two: the head restarted, started twice, or upgraded over a previous release's state folder."""

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cluster import DISTRIBUTE, HeadProcess, pyz_of_another_build, wait_until

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def local_head():
    """A head whose one node is this machine (no nodes file), stopped afterwards."""
    process = HeadProcess(None, None, dict(os.environ))
    yield process
    process.stop()
    shutil.rmtree(process.dir, ignore_errors=True)


def serve_again(process, *extra):
    """A second `serve` on the same state folder; it must return by itself."""
    argv = DISTRIBUTE + ["serve", "--state", str(process.state), "--archive", str(process.archive)] + list(extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_second_serve_on_the_same_state_refuses_and_names_the_running_head(local_head):
    local_head.start()
    second = serve_again(local_head)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"pid {local_head.proc.pid}" in lines[0] and str(local_head.socket) in lines[0]
    assert "Traceback" not in second.stderr
    # the first head was not disturbed: it still answers on its socket
    assert local_head.status()["batches"] == []
    assert local_head.proc.poll() is None


def test_a_lock_left_by_a_killed_head_never_blocks_a_start(local_head):
    local_head.start()
    first_pid = local_head.proc.pid
    local_head.kill9()
    lock = local_head.state / "head.lock"
    assert lock.read_text().split()[0] == str(first_pid)     # the file stays; the kernel's lock does not
    local_head.start()
    assert local_head.status()["batches"] == []
    assert lock.read_text().split()[0] == str(local_head.proc.pid)


def copy_release_state(process, release):
    source = FIXTURES / f"state-{release}"
    shutil.copytree(source / "state", process.state)
    shutil.copytree(source / "archive", process.archive)


def test_a_state_folder_of_release_0_1_0_opens_with_nothing_lost(local_head):
    copy_release_state(local_head, "0.1.0")
    before = sorted(str(p.relative_to(local_head.archive)) for p in local_head.archive.rglob("*") if p.is_file())
    local_head.start()
    status = {b["batch"]: b for b in local_head.status()["batches"]}
    finished = status["alice/finished_sweep"]
    assert finished["state"] == "done"
    assert finished["jobs"]["done"] == 1 and finished["jobs"]["failed"] == 1
    # the queued batch of the old release runs under the new head, from the files it uploaded then
    done = local_head.wait_batch("bob/queued_sweep", timeout=120)
    assert done["jobs"]["done"] == 2, done
    for case, re_value in (("case_1", 1), ("case_2", 2)):
        size, case_json = (local_head.archive / "bob" / "queued_sweep" / case / "size.txt").read_text().splitlines()
        assert int(size) == len("mesh0123456789\n") and json.loads(case_json) == {"re": re_value}
    # the old archive is untouched
    after = {str(p.relative_to(local_head.archive)) for p in local_head.archive.rglob("*") if p.is_file()}
    assert set(before) <= after
    ok = json.loads((local_head.archive / "alice" / "finished_sweep" / "job_ok" / "job.json").read_text())
    assert ok["exit_code"] == 0
    db = sqlite3.connect(str(local_head.state / "distribute.sqlite"))
    try:
        from distribute import SCHEMA_VERSION
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_store_from_a_newer_release_is_refused_in_one_line(local_head):
    local_head.state.mkdir(parents=True)
    db = sqlite3.connect(str(local_head.state / "distribute.sqlite"))
    db.execute("PRAGMA user_version=999")
    db.commit()
    db.close()
    result = serve_again(local_head)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "newer release" in lines[0] and "999" in lines[0], result.stderr


def test_report_after_a_restart_draws_every_attempt_and_build(local_head, tmp_path):
    folder = tmp_path / "flaky"
    folder.mkdir()
    marker = tmp_path / "second-try"
    (folder / "distribute-jobs.yaml").write_text(f"""\
meta: {{batch_name: flaky, namespace: lab}}
shell:
  initialize:
    build: "echo built"
  jobs:
    - {{name: steady, command: "true"}}
    - {{name: flaky, retries: 2, command: "if [ -e {marker} ]; then exit 0; fi; touch {marker}; exit 5"}}
""")
    local_head.start()
    local_head.cli("add", folder / "distribute-jobs.yaml")
    assert local_head.wait_batch("lab/flaky")["jobs"]["done"] == 2
    before = local_head.cli("report", "lab/flaky", "-o", tmp_path / "before.svg").stdout
    assert before.startswith(f"wrote {tmp_path / 'before.svg'}: 3 job attempts, 1 builds")
    local_head.stop()
    local_head.start()
    after = local_head.cli("report", "lab/flaky", "-o", tmp_path / "after.svg").stdout
    assert after.startswith(f"wrote {tmp_path / 'after.svg'}: 3 job attempts, 1 builds"), after


def python_batch(folder, name, capabilities):
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    (folder / "distribute-jobs.yaml").write_text(f"""\
meta: {{batch_name: {name}, namespace: lab, capabilities: [{', '.join(capabilities)}]}}
shell:
  jobs:
    - {{name: one, command: "python3 -c 'print(6*7)' > distribute_save/answer.txt"}}
""")
    return folder / "distribute-jobs.yaml"


def test_add_right_after_a_restart_decides_on_what_nodes_offered_when_last_up(head, ssh_nodes, tmp_path):
    """The nodes are still (re)connecting when the first `add` comes: it is accepted on their
    last-known capabilities, says who is not connected yet, and refuses only what nobody offers."""
    head.wait_nodes_up(3)
    head.stop()
    for node in ssh_nodes:
        node.cut()
    head.start()
    added = head.cli("add", python_batch(tmp_path / "py", "early", ["python3"]))
    assert "can run on node1, node2, node3" in added.stdout, added.stdout
    assert "not connected yet: node1, node2, node3" in added.stdout
    refused = head.cli("add", python_batch(tmp_path / "fluent", "never", ["fluent_v9"]), check=False)
    assert refused.returncode == 2 and "no node offers fluent_v9" in refused.stderr
    for node in ssh_nodes:
        node.heal()
    done = head.wait_batch("lab/early", timeout=180)
    assert done["jobs"]["done"] == 1, done
    assert (head.archive / "lab" / "early" / "one" / "answer.txt").read_text() == "42\n"


# --- which machine is which ---------------------------------------------------------

from cluster import node_workdirs, nodes_yaml  # noqa: E402


def shell_batch(folder, name, count, command="echo $DISTRIBUTE_JOB > distribute_save/who.txt"):
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    jobs = "\n".join(f"    - {{name: j{i}, command: {json.dumps(command)}}}" for i in range(count))
    (folder / "distribute-jobs.yaml").write_text(f"meta: {{batch_name: {name}, namespace: lab}}\nshell:\n  jobs:\n{jobs}\n")
    return folder / "distribute-jobs.yaml"


@pytest.fixture
def lab_head(ssh_nodes, pyz):
    """start(workdirs) -> a head over ssh_nodes with those workdirs; stopped afterwards."""
    heads = []

    def start(workdirs, nodes=None, pyz_path=pyz):
        text = nodes_yaml(nodes or list(ssh_nodes), workdirs)
        head = HeadProcess(None, text, ssh_nodes.head_home.env(), pyz=pyz_path, extra=["--kill-grace", "2"])
        heads.append(head)
        return head.start()
    yield start
    for head in heads:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)


def test_two_machines_sharing_one_workdir_are_told_apart(lab_head, ssh_nodes, tmp_path):
    """node1 and node2 get the same workdir path (a folder on NFS, seen by both machines): one
    of them uses it, the other is refused with a line saying what is shared and what to do;
    node3 and the one that kept the folder run the batch."""
    dirs = node_workdirs(ssh_nodes)
    dirs["node2"] = dirs["node1"]
    head = lab_head(dirs)

    def settled():
        nodes = {n["name"]: n for n in head.nodes()}
        refused = [n for n in ("node1", "node2") if nodes[n]["state"] == "refused"]
        up = [n for n in ("node1", "node2", "node3") if nodes[n]["reachable"]]
        return (refused, up, nodes) if len(refused) == 1 and len(up) == 2 else None
    refused, up, nodes = wait_until(settled, 60, "one of node1/node2 refused, the others up")
    error = nodes[refused[0]]["error"]
    assert f"workdir {dirs['node1']} is in use by another machine" in error and "own disk" in error
    plain = head.cli("nodes").stdout
    assert "in use by another machine" in plain
    assert "in use by another machine" in head.log.read_text()
    head.cli("add", shell_batch(tmp_path / "b", "shared", 6))
    done = head.wait_batch("lab/shared", timeout=120)
    assert done["jobs"]["done"] == 6
    records = [json.loads(p.read_text()) for p in (head.archive / "lab" / "shared").glob("*/job.json")]
    assert {r["node"] for r in records} <= set(up) and refused[0] not in {r["node"] for r in records}
    check = subprocess.run(DISTRIBUTE + ["nodes", "--check", "--nodes", str(head.nodes_file)],
                           capture_output=True, text=True, env=ssh_nodes.head_home.env(), timeout=120)
    assert check.returncode == 1
    flagged = [line for line in check.stdout.splitlines() if "in use by another machine" in line]
    assert len(flagged) == 1 and flagged[0].split(":")[0] in ("node1", "node2"), check.stdout


def test_two_entries_reaching_one_machine_keep_the_first(lab_head, ssh_nodes, ssh_keys, tmp_path):
    """node1b is node1's machine under another address: the later entry is refused, saying so."""
    import sshd
    other = sshd.Sshd("node1b", host_key=ssh_keys.get("host-node1b"), machine_id=ssh_nodes["node1"].machine_id)
    try:
        other.start()
        ssh_nodes.head_home.add_host("node1b", other, sshd.NODE_USER)
        nodes = [ssh_nodes["node1"], other, ssh_nodes["node2"]]
        dirs = node_workdirs(nodes)
        head = lab_head(dirs, nodes=nodes)

        def refused():
            found = {n["name"]: n for n in head.nodes()}
            return found if found["node1b"]["state"] == "refused" and found["node1"]["reachable"] \
                and found["node2"]["reachable"] else None
        found = wait_until(refused, 60, "node1b refused")
        assert "node1b reaches the same machine as node1" in found["node1b"]["error"]
        assert "list each machine once" in found["node1b"]["error"]
        check = subprocess.run(DISTRIBUTE + ["nodes", "--check", "--nodes", str(head.nodes_file)],
                               capture_output=True, text=True, env=ssh_nodes.head_home.env(), timeout=120)
        lines = check.stdout.splitlines()
        assert check.returncode == 1 and any(l.startswith("node1b:") and "same machine as node1" in l for l in lines)
        assert any(l.startswith("node1: ok") for l in lines), check.stdout
    finally:
        other.stop()


def test_a_head_upgrade_replaces_every_supervisor_after_its_running_jobs(lab_head, ssh_nodes, pyz, public_tmp):
    """Jobs run under build A; the head restarts on build B: the running jobs end and are archived
    once, the queued ones start only under B, and every node reports B."""
    import hashlib
    pyz_b = pyz_of_another_build(pyz, public_tmp)
    build = {name: hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for name, p in (("A", pyz), ("B", pyz_b))}
    dirs = node_workdirs(ssh_nodes)
    head = lab_head(dirs)
    head.wait_nodes_up(3)
    assert {n["build"] for n in head.nodes()} == {build["A"]}
    gate = public_tmp / "gate"
    os.chmod(public_tmp, 0o777)          # the jobs (as dnode) leave a mark there
    command = (f"while [ ! -e {gate} ]; do sleep 0.05; done; tr '\\0' ' ' < /proc/$PPID/cmdline > distribute_save/parent.txt;"
               f" echo x >> {public_tmp}/starts-$DISTRIBUTE_JOB")
    head.cli("add", shell_batch(public_tmp / "b", "upgrade", 9, command))
    wait_until(lambda: len(head.status()["running"]) == 3, 60, "three jobs running")
    head.stop()
    head.pyz = pyz_b
    head.start()
    wait_until(lambda: all(n["reachable"] for n in head.nodes()), 60, "nodes reconnected")
    nodes = head.nodes()
    assert all(n["upgrading"] and n["build"] == build["A"] for n in nodes), nodes
    assert len(head.status()["running"]) == 3             # the old supervisors take no new job
    assert "upgrading" in head.cli("nodes").stdout
    gate.touch()
    done = head.wait_batch("lab/upgrade", timeout=180)
    assert done["jobs"]["done"] == 9, done
    wait_until(lambda: {n["build"] for n in head.nodes()} == {build["B"]}, 60, "build B on every node")
    archive = head.archive / "lab" / "upgrade"
    parents = {p.parent.name: p.read_text() for p in archive.glob("*/parent.txt")}
    assert len(parents) == 9
    under_a = [job for job, text in parents.items() if f"distribute-{build['A']}.pyz" in text]
    under_b = [job for job, text in parents.items() if f"distribute-{build['B']}.pyz" in text]
    assert len(under_a) == 3 and len(under_b) == 6, parents
    for job in parents:
        assert (public_tmp / f"starts-{job}").read_text() == "x\n"              # each ran once
        assert json.loads((archive / job / "job.json").read_text())["attempts"] == 1


# --- many clients at once --------------------------------------------------------------

import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import distribute  # noqa: E402


def frame(header, payload=b""):
    body = json.dumps(header).encode()
    return len(body).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + body + payload


def status_round_trip(sock_path):
    """Seconds for one raw `status` request on the head's socket, answered."""
    import socket as socket_module
    started = time.monotonic()
    with socket_module.socket(socket_module.AF_UNIX) as conn:
        conn.settimeout(30)
        conn.connect(str(sock_path))
        conn.sendall(frame({"op": "status"}))
        prefix = b""
        while len(prefix) < 8:
            chunk = conn.recv(8 - len(prefix))
            assert chunk, "the head closed the connection"
            prefix += chunk
    return time.monotonic() - started


class StatusProbe(threading.Thread):
    """Asks `status` over and over until stopped; keeps the slowest answer."""

    def __init__(self, sock_path):
        super().__init__(daemon=True)
        self.sock_path, self.slowest, self.count = sock_path, 0.0, 0
        self.done = threading.Event()

    def run(self):
        while not self.done.is_set():
            self.slowest = max(self.slowest, status_round_trip(self.sock_path))
            self.count += 1

    def stop(self):
        self.done.set()
        self.join(60)
        return self


async def stalled_upload(sock_path, name):
    """An `add` whose tar data stops after one header (a laptop on a dying link)."""
    reader, writer = await asyncio.open_unix_connection(str(sock_path))
    plan = dataclasses.asdict(distribute.BatchPlan("stall", name, "shell"))
    job = {"name": "a", "files": [], "command": "true", "has_script": False, "params": None}
    writer.write(frame({"op": "add", "plan": plan, "jobs": [{"plan": job, "retries": 0}], "capabilities": []}))
    channel = distribute.Channel(reader, writer)
    reply, _ = await asyncio.wait_for(channel.receive(), 60)
    assert reply.get("send"), reply
    header = distribute.ustar_header("input/big.bin", 1 << 20, 0, 0o644)
    writer.write(header + b"x" * 100)
    await writer.drain()
    return writer


def test_stalled_uploads_never_block_another_add_or_status(local_head, tmp_path):
    local_head.start()
    local_head.wait_nodes_up(1)
    loop = asyncio.new_event_loop()
    try:
        async def stall_ten():
            return await asyncio.gather(*(stalled_upload(local_head.socket, f"s{i}") for i in range(10)))
        writers = loop.run_until_complete(stall_ten())
        assert status_round_trip(local_head.socket) < 0.5
        folder = tmp_path / "eleventh"
        folder.mkdir()
        (folder / "data.txt").write_text("payload\n")
        (folder / "distribute-jobs.yaml").write_text(
            "meta: {batch_name: eleventh, namespace: lab}\nshell:\n  initialize:\n    required_files: [data.txt]\n"
            "  jobs:\n    - {name: a, command: 'cat input/data.txt > distribute_save/copy.txt'}\n")
        local_head.cli("add", folder / "distribute-jobs.yaml")
        local_head.wait_batch("lab/eleventh", timeout=120)
        assert (local_head.archive / "lab" / "eleventh" / "a" / "copy.txt").read_text() == "payload\n"
        async def hang_up():
            for writer in writers:
                writer.close()
            await asyncio.gather(*(writer.wait_closed() for writer in writers), return_exceptions=True)
        loop.run_until_complete(hang_up())
    finally:
        loop.close()
    wait_until(lambda: not list((local_head.state / "files").glob(".incoming-*")), 30,
               "the stalled uploads' folders removed once their clients hung up")


def as_lab_member(user):
    """Popen arguments that run a command as `user` with the lab's group, as a login would."""
    return {"user": user, "group": user, "extra_groups": ["distribute"]}


def test_thirty_adds_from_three_users_while_status_keeps_answering(public_tmp, pyz):
    program = public_tmp / "distribute.pyz"          # what lab members run (the head's python is root's)
    shutil.copy(pyz, program)
    os.chmod(program, 0o644)
    head = HeadProcess(None, None, dict(os.environ), extra=["--group", "distribute"])
    try:
        head.start()
        head.wait_nodes_up(1)
        clients = []
        probe = StatusProbe(head.socket)
        probe.start()
        for user in ("root", "dalice", "dbob"):
            namespace = "lab" if user == "root" else user
            for i in range(10):
                folder = public_tmp / f"{user}-{i}"
                folder.mkdir()
                (folder / "in.txt").write_text(f"{user} {i}\n")
                (folder / "distribute-jobs.yaml").write_text(
                    f"meta: {{batch_name: b{i}, namespace: {namespace}}}\nshell:\n  initialize:\n"
                    "    required_files: [in.txt]\n  jobs:\n    - {name: a, command: 'cat input/in.txt > distribute_save/o.txt'}\n")
                os.chmod(folder, 0o755)
                argv = ["/usr/bin/python3", str(program), "--head", "local", "--socket", str(head.socket), "add",
                        str(folder / "distribute-jobs.yaml")]
                home = "/root" if user == "root" else f"/home/{user}"
                clients.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                                cwd="/", **({} if user == "root" else as_lab_member(user)),
                                                env={"HOME": home, "PATH": "/usr/bin:/bin"}))
        outcomes = [(c.wait(300), c.stderr.read()) for c in clients]
        probe.stop()
        assert all(code == 0 for code, _ in outcomes), [o for o in outcomes if o[0]]
        keys = [f"{ns}/b{i}" for ns in ("lab", "dalice", "dbob") for i in range(10)]
        for key in keys:
            assert head.wait_batch(key, timeout=300)["jobs"]["done"] == 1
        print(f"\nstatus answered {probe.count} times while 30 adds ran; slowest {probe.slowest:.3f}s")
        assert probe.count > 0 and probe.slowest < 0.5
    finally:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)


# --- durability ---------------------------------------------------------------------------

class RecordingLink:
    def __init__(self, events):
        self.events = events

    async def tell(self, header):
        self.events.append(("ack", tuple(header["run_ids"])))


def test_results_are_acknowledged_only_after_they_are_on_stable_storage(tmp_path):
    """The node deletes a result when acknowledged: the flush of the archive and the store comes
    first (one for the results landed together), and a failing flush acknowledges nothing."""
    events, failures = [], [OSError(5, "Input/output error")]

    def flush(folder):
        if failures:
            raise failures.pop()
        events.append(("flush", folder))
    acks = distribute.DurableAcks([tmp_path], flush=flush)
    distribute.sync_file_system(tmp_path)              # the real one works here

    async def scenario():
        worker = asyncio.ensure_future(acks.run())
        link = RecordingLink(events)
        acks.add(link, "1.1")
        acks.add(link, "2.1")
        deadline = time.monotonic() + 20
        while not any(kind == "ack" for kind, _ in events) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        worker.cancel()
    asyncio.run(scenario())
    assert events == [("flush", tmp_path), ("ack", ("1.1", "2.1"))]

"""Hostile jobs, hostile clients and broken machines (issue 18).

Each test reproduces one hole found by an attacker with a group account or by a lab whose
machines misbehave: a job's links redirecting the head's archive writes, frames declaring
gigabytes, plans naming paths out of their folder, odd outputs (links, fifos, deep folders,
sparse files), and a head that dies under an upload.  The archive-write tests call the very
functions the head lands results with; the others run a real head.
"""

import asyncio
import dataclasses
import io
import json
import os
import tarfile
import textwrap
from pathlib import Path

import pytest

import distribute
from cluster import HeadProcess, stop_local_head, wait_until

ROOT = Path(__file__).resolve().parent.parent


def tar_with(*members):
    """A tar of (TarInfo, data or None) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def member(name, kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, 1_600_000_000
    return info


def link(name, target):
    return member(name, tarfile.SYMTYPE, target), None


def victim_file(folder: Path) -> Path:
    """A file the head's account can write, outside the archive: what an attacker aims at."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "authorized_keys"
    path.write_text("the admin's key\n")
    return path


RECORD = {"namespace": "lab", "batch": "b", "job": "j", "node": "node1", "start": "2026-01-01T00:00:00",
          "end": "2026-01-01T00:00:01", "exit_code": 0, "attempts": 1, "state": "ok", "params": {}}


def land_like_the_head(archive: Path, payload: bytes, job: str = "j") -> Path:
    """What Head.on_finished does with a finished run's results."""
    incoming, final = distribute.start_landing(archive, "lab", "b", job)
    try:
        distribute.extract_tar(payload, incoming)
        distribute.finish_landing(incoming, final, dict(RECORD, job=job))
    finally:
        distribute.remove_tree(incoming)
    return final


# --- 1. archive writes never follow a job's links ------------------------------------------------

def test_a_link_chain_that_looks_inside_cannot_redirect_job_json(tmp_path):
    """`a -> .` then `p -> a/a/.../../..`: normpath says "inside", the kernel climbs to /; job.json
    links through p to a file outside.  Landing must replace the link, not write through it."""
    victim = victim_file(tmp_path / "home")
    depth = 16                  # deeper than tmp_path; fewer links than the kernel's limit of 40
    chain = "/".join(["a"] * depth + [".."] * depth)
    payload = tar_with(link("a", "."), link("p", chain),
                       link("job.json", "p" + str(victim)),
                       (member("result.txt"), b"42\n"))
    archive = tmp_path / "archive"
    final = land_like_the_head(archive, payload)
    assert victim.read_text() == "the admin's key\n"
    landed = final / "job.json"
    assert not landed.is_symlink() and json.loads(landed.read_text())["job"] == "j"
    assert (final / "result.txt").read_text() == "42\n"


def test_files_never_land_through_a_link_inside_the_stream(tmp_path):
    """A link that points inside (allowed as data) is never used as a folder to write through,
    nor replaced-through by a later file of the same name."""
    victim = victim_file(tmp_path / "home")
    chain = "/".join(["a"] * 16 + [".."] * 16)
    for members in ([link("a", "."), link("p", chain), (member("p" + str(victim)), b"owned\n")],
                    [link("a", "."), link("p", chain), link("x", "p" + str(victim)), (member("x"), b"owned\n")]):
        dest = tmp_path / "dest"
        try:
            distribute.extract_tar(tar_with(*members), dest)
        except distribute.UnsafeArchive as exc:
            assert "refused tar entry" in str(exc)
        assert victim.read_text() == "the admin's key\n"
        distribute.remove_tree(dest)


def test_build_log_never_lands_through_a_planted_link(tmp_path):
    """Links planted in <batch>/build/ (under every temporary name the head ever used, and as the
    log's own name) are replaced, not written through."""
    victim = victim_file(tmp_path / "home")
    folder = tmp_path / "archive" / "lab" / "b" / "build"
    folder.mkdir(parents=True)
    for pid in range(os.getpid() - 50, os.getpid() + 50):
        os.symlink(victim, folder / f".node1.txt.{pid}.tmp")
    os.symlink(victim, folder / "node1.txt")
    distribute.land_build_log(tmp_path / "archive", "lab", "b", "node1", b"attacker text\n")
    assert victim.read_text() == "the admin's key\n"
    assert not (folder / "node1.txt").is_symlink()
    assert (folder / "node1.txt").read_text() == "attacker text\n"


def test_a_batch_folder_replaced_by_a_link_is_refused(tmp_path):
    """Every folder below the archive root is opened without following links."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "archive" / "lab").mkdir(parents=True)
    os.symlink(outside, tmp_path / "archive" / "lab" / "b")
    with pytest.raises(distribute.UnsafeArchive):
        distribute.land_build_log(tmp_path / "archive", "lab", "b", "node1", b"x")
    with pytest.raises(distribute.UnsafeArchive):
        distribute.start_landing(tmp_path / "archive", "lab", "b", "j")
    assert list(outside.iterdir()) == []


def test_a_job_named_build_is_refused_at_load(tmp_path):
    path = tmp_path / "distribute-jobs.yaml"
    path.write_text(textwrap.dedent("""\
        meta: {batch_name: b, namespace: lab}
        shell:
          jobs:
            - {name: ok, command: 'true'}
            - {name: build, command: 'true'}
        """))
    with pytest.raises(distribute.UserError) as error:
        distribute.load_job_file(str(path))
    assert "distribute-jobs.yaml:5:" in str(error.value) and "reserved" in str(error.value)


def test_deep_folders_are_removed_without_recursion(tmp_path):
    folder = tmp_path / "deep"
    fd = os.open(tmp_path, os.O_RDONLY)
    os.mkdir("deep", dir_fd=fd)
    current = os.open("deep", os.O_RDONLY, dir_fd=fd)
    os.close(fd)
    for _ in range(3000):                # deeper than PATH_MAX allows to name by path
        os.mkdir("d", dir_fd=current)
        below = os.open("d", os.O_RDONLY, dir_fd=current)
        os.close(current)
        current = below
    os.close(current)
    try:
        distribute.remove_tree(folder)
        assert not folder.exists()
    finally:
        distribute.remove_tree(folder)  # pytest's own clean-up recurses: never leave it a deep tree


# --- a head whose one node is this machine ---------------------------------------------------------

LOCAL_NODE = "nodes:\n  - {name: here, host: local, slots: 2}\n"


@pytest.fixture
def local_head():
    """A running head over this machine (node `here`, 2 slots); its supervisor is stopped after."""
    head = HeadProcess(None, LOCAL_NODE, dict(os.environ)).start()
    yield head
    stop_local_head(head, remove=distribute.remove_tree)       # a test leaves 3,000 nested folders


def supervisor_of(head):
    """(socket path, psutil.Process) of the local node's supervisor."""
    import psutil
    workdir = str(head.state / "nodes" / "here")
    sock = Path(workdir) / ".distribute" / "supervisor.sock"
    wait_until(lambda: distribute.socket_answers(str(sock)), 30, "the supervisor's socket")
    process = next(p for p in psutil.process_iter(["cmdline"])
                   if "supervise" in (p.info["cmdline"] or []) and workdir in (p.info["cmdline"] or []))
    return str(sock), process


def write_jobs(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "distribute-jobs.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def quick_batch(folder: Path, name: str, jobs: int = 2) -> Path:
    lines = "".join(f"    - {{name: j{i}, command: 'echo {i}'}}\n" for i in range(jobs))
    return write_jobs(folder / name, f"meta: {{batch_name: {name}, namespace: other}}\nshell:\n  jobs:\n" + lines)


def flood(sock: str, header_size: int, payload_size: int, start: bytes, send_bytes: int):
    """Declare a frame of header_size + payload_size bytes, send `start` then up to send_bytes of
    filler; returns (bytes the peer took, its reply frame or None)."""
    import socket as socketlib
    conn = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    conn.connect(sock)
    sent = 0
    try:
        conn.sendall(header_size.to_bytes(4, "big") + payload_size.to_bytes(4, "big") + start)
        chunk = b" " * (1 << 20)
        conn.settimeout(10)
        while sent < send_bytes:
            sent += conn.send(chunk)
    except (BrokenPipeError, ConnectionResetError, socketlib.timeout):
        pass
    try:
        conn.settimeout(10)
        data = b""
        while True:
            more = conn.recv(1 << 16)
            if not more:
                break
            data += more
    except (ConnectionResetError, socketlib.timeout):
        pass
    finally:
        conn.close()
    if len(data) < 8:
        return sent, None
    size = int.from_bytes(data[:4], "big")
    return sent, json.loads(data[8:8 + size])


# --- 2. one frame cannot take the head's memory ----------------------------------------------------

GiB = 1 << 30


def test_an_oversize_frame_is_refused_before_it_is_read(local_head, tmp_path):
    """A `status` declaring a 3 GiB payload (and 512 MiB actually sent), a 1 GiB header: the head
    answers one clear error before reading them, its memory stays where it was, and it serves on."""
    import psutil
    head_process = psutil.Process(local_head.proc.pid)
    local_head.wait_nodes_up(1)
    before = head_process.memory_info().rss
    sent, reply = flood(str(local_head.socket), 20, 3 * GiB, b'{"op":"status"}     ', 512 << 20)
    assert reply is not None and reply["ok"] is False and "'status' request" in reply["error"], reply
    assert "refused" in reply["error"] and "at most 64.0 KiB" in reply["error"], reply
    sent, reply = flood(str(local_head.socket), GiB, 0, b'{"op":"add","plan":', 256 << 20)
    assert reply is not None and "'add' request of 1.0 GiB is refused" in reply["error"], reply
    # an `add` announced to get the larger bound, but really a status: held to the status bound
    body = b'{"op":"add","op":"status","pad":"' + b"x" * (1 << 20) + b'"}'
    sent, reply = flood(str(local_head.socket), len(body), 0, body, 0)
    assert reply is None or reply["ok"] is False, reply
    after = head_process.memory_info().rss
    assert after - before < 64 << 20, (before, after)
    assert local_head.cli("add", quick_batch(tmp_path, "after")).returncode == 0
    assert local_head.wait_batch("other/after")["jobs"]["done"] == 2
    assert "Traceback" not in local_head.log.read_text()


def test_an_oversize_frame_is_refused_by_the_supervisor(local_head, tmp_path):
    local_head.wait_nodes_up(1)
    sock, process = supervisor_of(local_head)
    before = process.memory_info().rss
    flood(sock, 20, 3 * GiB, b'{"op":"progress"}   ', 512 << 20)
    flood(sock, GiB, 0, b'{"op":"build","plan":', 256 << 20)
    assert process.memory_info().rss - before < 64 << 20
    assert local_head.cli("add", quick_batch(tmp_path, "after")).returncode == 0
    assert local_head.wait_batch("other/after")["jobs"]["done"] == 2


# --- 3. the head checks every field of a request itself ---------------------------------------------

NESTED = '"@nested@"'


async def ask(sock: str, header, payload: bytes = b"", nested_depth: int = 0):
    """One request, its reply header.  The text NESTED in the header stands for a value nested
    nested_depth deep (written by hand: Python's own encoder gives up before a thousand)."""
    reader, writer = await asyncio.open_unix_connection(sock)
    channel = distribute.Channel(reader, writer)
    body = json.dumps(header, separators=(",", ":"))
    body = body.replace(NESTED, '{"x":' * nested_depth + "1" + "}" * nested_depth).encode()
    try:
        writer.write(len(body).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + body + payload)
        return (await asyncio.wait_for(channel.receive(), 20))[0]
    finally:
        channel.close()


def raw_add(**changes):
    plan = dataclasses.asdict(distribute.BatchPlan("evil", "raw", "shell"))
    job = {"name": "a", "files": [], "command": "true", "has_script": False, "params": None}
    header = {"op": "add", "plan": dict(plan, **changes.pop("plan", {})),
              "jobs": [{"plan": dict(job, **changes.pop("job", {})), "retries": 0}], "capabilities": []}
    header.update(changes)
    return header


BAD_REQUESTS = [
    (raw_add(job={"files": ["../../../../etc/passwd"]}), "must be a plain file name"),
    (raw_add(job={"params": {"deep": NESTED.strip('"')}}), "params nest deeper than 32 levels"),
    (raw_add(plan={"surprise": 1}), "plan: unknown key 'surprise'"),
    (raw_add(job={"name": "build"}), "reserved"),
    (raw_add(job={"name": "../x"}), "not a valid name"),
    (raw_add(plan={"namespace": ["x"]}), "plan.namespace must be text"),
    (raw_add(plan={"initial": ["/etc/shadow"]}), "must be a plain file name"),
    (raw_add(plan={"mounts": ["/a:/b"]}), "absolute container path"),
    (raw_add(jobs=[]), "no jobs"),
    (raw_add(jobs="all"), "jobs must be a list"),
    (dict(raw_add(), jobs=[{"plan": {"name": "a"}, "retries": -1}]), "retries must be between"),
    (raw_add(capabilities=["gpu; rm -rf /"]), "not a valid name"),
    ({"op": "logs", "batch": "x", "job": "y", "offset": "zero"}, "offset must be a number"),
    ({"op": "logs", "batch": "x", "job": "y", "offset": -5}, "must not be negative"),
    ({"op": "kill", "batch": {"$ne": 1}}, "batch must be text"),
    ({"op": "why"}, "ref is missing"),
    ({"op": "pull_files", "batch": "x", "paths": [1, 2]}, "every entry of paths must be text"),
    ({"op": "pull_all", "batch": "x", "filters": "^a"}, "filters must be a list"),
    ({"op": "pull_all", "batch": "x", "excludes": [None]}, "every entry of excludes must be text"),
    ({"op": "__init__"}, "unknown request '__init__'"),
    ({"op": ["status"]}, "unknown request"),
]


def test_the_head_checks_every_field_of_a_request(local_head, tmp_path):
    """A raw client's plan naming a path out of input/, params nested 970 deep, an unknown plan key
    and other malformed fields: each gets one clear error reply, nothing is added, and another
    user's batch still runs."""
    local_head.wait_nodes_up(1)
    for header, expected in BAD_REQUESTS:
        reply = asyncio.run(ask(str(local_head.socket), header, nested_depth=970))
        assert reply.get("ok") is False and expected in reply["error"], (header.get("op"), expected, reply)
        assert "\n" not in reply["error"]
    assert local_head.status()["batches"] == []
    assert local_head.cli("add", quick_batch(tmp_path, "after")).returncode == 0
    assert local_head.wait_batch("other/after")["jobs"]["done"] == 2
    log = local_head.log.read_text()
    assert "Traceback" not in log and "RecursionError" not in log


def test_the_supervisor_answers_malformed_requests_with_one_line(local_head, tmp_path):
    local_head.wait_nodes_up(1)
    sock, _ = supervisor_of(local_head)
    for header in ({"op": "start", "id": 1}, {"op": "build", "plan": {"bogus": 1}, "id": 2},
                   {"op": "tail", "run_id": 5, "id": 3}, {"op": "cleanup", "namespace": None, "id": 4},
                   {"op": "kill", "run_ids": "1.1", "grace": "soon", "id": 5}):
        reply = asyncio.run(ask(sock, header))
        assert reply.get("ok") is False and "\n" not in reply["error"], (header, reply)
    assert local_head.cli("add", quick_batch(tmp_path, "after")).returncode == 0
    assert local_head.wait_batch("other/after")["jobs"]["done"] == 2
    supervisor_log = local_head.state / "nodes" / "here" / ".distribute" / "supervisor.log"
    assert "Traceback" not in supervisor_log.read_text()


# --- 9. hostile or odd outputs ------------------------------------------------------------------------

ODD_OUTPUTS = """\
import os
os.chdir("distribute_save")
open("result.txt", "w").write("42\\n")
os.symlink("/etc/passwd", "passwd")
os.symlink("result.txt", "inner-link")
os.mkfifo("pipe")
with open("sparse.bin", "wb") as f:
    f.write(b"head")
    f.seek((256 << 20) - 4)
    f.write(b"tail")
os.mkdir("deep")
os.chdir("deep")
for _ in range(3000):              # past the interpreter's recursion limit (1000)
    os.mkdir("d")
    os.chdir("d")
open("bottom.txt", "w").write("x")
"""


def test_links_fifos_deep_folders_and_sparse_files_in_results(local_head, tmp_path):
    """A job leaves a link out, a link in, a fifo, 3,000 nested folders (past the interpreter's
    recursion limit, like the issue's 10,000) and a 256 MiB sparse file: it finishes; links and
    the fifo are left out and listed in job.json with their reason, the folders past the depth
    limit too; the sparse file lands sparse; the node cleans up."""
    script = tmp_path / "odd" / "odd.py"
    script.parent.mkdir()
    script.write_text(ODD_OUTPUTS)
    path = write_jobs(tmp_path / "odd", f"""\
        meta: {{batch_name: odd, namespace: lab}}
        shell:
          initialize:
            required_files: [{script}]
          jobs:
            - {{name: odd, command: 'python3 input/odd.py'}}
        """)
    local_head.wait_nodes_up(1)
    local_head.cli("add", path)
    batch = local_head.wait_batch("lab/odd", timeout=180)
    assert batch["jobs"]["done"] == 1, (batch, local_head.log.read_text()[-3000:])
    folder = local_head.archive / "lab" / "odd" / "odd"
    assert (folder / "result.txt").read_text() == "42\n"
    for name in ("passwd", "inner-link", "pipe"):
        assert not os.path.lexists(folder / name)
    record = json.loads((folder / "job.json").read_text())
    reasons = {e["path"]: e["reason"] for e in record["skipped"]}
    assert reasons["passwd"].startswith("a symbolic link") and reasons["inner-link"].startswith("a symbolic link")
    assert reasons["pipe"].startswith("a fifo")
    deep = [p for p, r in reasons.items() if "nested deeper than" in r]
    assert len(deep) == 1 and deep[0].startswith("deep/d/d/"), reasons
    assert not (folder / distribute.SKIPPED_FILE).exists()
    sparse = (folder / "sparse.bin").stat()
    assert sparse.st_size == 256 << 20 and sparse.st_blocks * 512 < 8 << 20, sparse
    with open(folder / "sparse.bin", "rb") as handle:
        assert handle.read(4) == b"head"
        handle.seek((256 << 20) - 4)
        assert handle.read() == b"tail"
    runs = local_head.state / "nodes" / "here" / ".distribute" / "runs"
    wait_until(lambda: not any(runs.iterdir()), 60, "the node to delete the archived run")
    supervisor_log = local_head.state / "nodes" / "here" / ".distribute" / "supervisor.log"
    assert "Traceback" not in supervisor_log.read_text() + local_head.log.read_text()
    assert "will retry" not in local_head.log.read_text()        # landed the first time


def test_result_walk_keeps_only_files_and_folders(tmp_path):
    save = tmp_path / "save"
    (save / "a" / "b").mkdir(parents=True)
    (save / "a" / "b" / "x.txt").write_text("x")
    os.symlink("/", save / "root")
    os.mkfifo(save / "a" / "fifo")
    entries, skipped = distribute.walk_folder(save, regular_only=True, max_depth=1)
    assert [name for name, _ in entries] == ["a"]
    assert {e["path"]: e["reason"].split(":")[0] for e in skipped} == {
        "root": "a symbolic link", "a/fifo": "a fifo", "a/b": "nested deeper than 1 folders"}


# --- 11. the head killed during a large add ------------------------------------------------------------

def test_head_killed_during_an_add(local_head, tmp_path):
    """The client says in one line that the head went away (exit 1); the partial upload is gone
    once the head is back, and the same add then goes through."""
    import subprocess
    import sys
    folder = tmp_path / "big"
    folder.mkdir()
    with open(folder / "big.bin", "wb") as out:
        block = bytes(range(256)) * 4096
        for _ in range(300):
            out.write(block)
    path = write_jobs(folder, f"""\
        meta: {{batch_name: big, namespace: lab}}
        shell:
          initialize:
            required_files: [{folder / 'big.bin'}]
          jobs:
            - {{name: a, command: 'wc -c < input/big.bin'}}
        """)
    local_head.wait_nodes_up(1)
    files = local_head.state / "files"
    client = subprocess.Popen([sys.executable, str(ROOT / "distribute.py"), "--head", "local", "--socket",
                               str(local_head.socket), "add", str(path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def part_arrived():
        return any(p.stat().st_size > 1 << 20 for p in files.glob(".incoming-*/**/*") if p.is_file())
    wait_until(part_arrived, 60, "the upload to begin")
    local_head.kill9()
    _, err = client.communicate(timeout=60)
    assert client.returncode == 1, err
    assert len(err.strip().splitlines()) == 1 and "went away" in err and "Traceback" not in err, err
    assert list(files.glob(".incoming-*")), "the killed head left its partial upload (the case under test)"
    local_head.start()
    assert not list(files.glob(".incoming-*"))
    local_head.cli("add", path)
    local_head.wait_batch("lab/big", timeout=120)
    assert (local_head.archive / "lab" / "big" / "a" / "stdout.txt").read_text().strip() == str(300 * 1 << 20)


# --- 4. a pause lock's cap uses a time its owner cannot set -------------------------------------------

def test_a_lock_dated_ten_years_ahead_is_still_capped(tmp_path):
    """The owner writes until=2036 and sets the file's mtime ten years ahead: the lock still ends
    at most MAX_PAUSE_SECONDS (+ slack) after it was written."""
    import time
    folder = tmp_path / "locks"
    folder.mkdir()
    os.chmod(folder, 0o1777)
    lock = folder / "pause-dalice.json"
    ten_years = 10 * 365 * 86400
    lock.write_text(json.dumps({"until": time.time() + ten_years, "pid": 1, "detached": True}))
    os.utime(lock, (time.time() + ten_years, time.time() + ten_years))
    [found] = distribute.active_pauses(folder)
    assert found.until <= time.time() + distribute.MAX_PAUSE_SECONDS + 61
    later = time.time() + distribute.MAX_PAUSE_SECONDS + 120
    assert distribute.active_pauses(folder, now=later) == []


def test_nodes_shows_the_date_a_pause_ends():
    import time
    until = time.mktime((2036, 3, 1, 9, 30, 0, 0, 0, -1))
    node = {"name": "node1", "state": "up", "paused": [{"user": "dalice", "until": distribute.now_iso(until)}],
            "running": [], "slots": 1, "capabilities": []}
    assert "paused by dalice until 2036-03-01 09:30" in distribute.format_nodes([node])[0]


# --- 8. a node's disk fills up --------------------------------------------------------------------------

@pytest.fixture
def small_node(tmp_path):
    """A head whose one node (`here`) works on a 24 MiB tmpfs (unmounted at the end)."""
    import subprocess
    import psutil
    workdir = Path(distribute.tempfile.mkdtemp(prefix="dsmall-", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "distribute-test", str(workdir)], check=True)
    head = HeadProcess(None, f"nodes:\n  - {{name: here, host: local, slots: 1, workdir: {workdir}}}\n",
                       dict(os.environ))
    try:
        yield head.start()
    finally:
        head.stop()
        for process in psutil.process_iter(["cmdline"]):
            if str(workdir) in (process.info["cmdline"] or []):
                process.kill()
        subprocess.run(["umount", "-l", str(workdir)], check=False)
        os.rmdir(workdir)
        distribute.remove_tree(head.dir)


def test_a_job_filling_the_nodes_disk_still_finishes(small_node, tmp_path):
    """The job writes past the free space: the supervisor still records it finished, the head
    archives it, the node gets its space back and the next batch runs."""
    head = small_node
    path = write_jobs(tmp_path / "fill", """\
        meta: {batch_name: fill, namespace: lab}
        shell:
          jobs:
            - {name: fill, command: 'head -c 64000000 /dev/urandom > distribute_save/fill.bin; echo wrote; exit 1'}
        """)
    head.wait_nodes_up(1)
    head.cli("add", path)
    batch = head.wait_batch("lab/fill", timeout=120)
    assert batch["jobs"]["failed"] == 1, batch
    landed = head.archive / "lab" / "fill" / "fill"
    assert 8 << 20 < (landed / "fill.bin").stat().st_size < 24 << 20
    head.cli("add", quick_batch(tmp_path, "next"))
    assert head.wait_batch("other/next", timeout=60)["jobs"]["done"] == 2


def test_shared_files_larger_than_the_nodes_free_space_are_refused_up_front(small_node, tmp_path):
    """A build whose shared input cannot fit: the node says so (need, have) before receiving it,
    instead of a broken pipe half-way."""
    folder = tmp_path / "huge"
    folder.mkdir()
    with open(folder / "big.bin", "wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(40):
            out.write(block)
    path = write_jobs(folder, f"""\
        meta: {{batch_name: huge, namespace: lab}}
        shell:
          initialize:
            required_files: [{folder / 'big.bin'}]
          jobs:
            - {{name: a, command: 'true'}}
        """)
    small_node.wait_nodes_up(1)
    small_node.cli("add", path)
    wait_until(lambda: "no space on here: need 40.0 MiB" in small_node.log.read_text(), 60,
               "the head to log the node's refusal")
    log = small_node.log.read_text()
    assert "Broken pipe" not in log and "Traceback" not in log


# --- fuzzing the head's and the supervisor's sockets ---------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63) | st.floats(allow_nan=False) | st.text(max_size=24),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=24)
HEAD_OPS = sorted(distribute.REQUEST_FIELDS)
HEAD_FIELDS = sorted({key for fields in distribute.REQUEST_FIELDS.values() for key in fields})
# the supervisor's socket is the head account's own (mode 0600): kill, ack, cleanup and a `hello`
# taking over as head are that account's to give, so they are left out of the random requests
SUPERVISOR_OPS = ["build", "start", "fetch", "tail", "progress", "hello"]
SUPERVISOR_FIELDS = ["plan", "job", "run_id", "slot", "cpus", "env", "namespace", "batch", "offset", "stream", "size"]


def headers(ops, fields):
    return st.fixed_dictionaries({"op": st.sampled_from(ops) | st.text(max_size=12), "id": st.integers(0, 9)},
                                 optional={key: JSON_VALUES for key in fields})


def frame(header, payload=b"", size=None, payload_size=None):
    body = json.dumps(header, separators=(",", ":")).encode()
    size = len(body) if size is None else size
    payload_size = len(payload) if payload_size is None else payload_size
    return size.to_bytes(4, "big") + payload_size.to_bytes(4, "big") + body + payload


@st.composite
def frames(draw, ops, fields):
    """Well-formed frames of random requests, lying sizes, deep nesting, random bytes, mutations."""
    kind = draw(st.sampled_from(["request", "sizes", "deep", "bytes", "mutated"]))
    header = draw(headers(ops, fields))
    if kind == "request":
        return frame(header, draw(st.binary(max_size=64)))
    if kind == "sizes":
        return frame(header, b"", draw(st.integers(0, 2 ** 32 - 1)), draw(st.integers(0, 2 ** 32 - 1)))
    if kind == "deep":
        depth = draw(st.integers(100, 20000))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        body = ('{"op":"%s","x":' % header["op"] + opener * depth + "1" + closer * depth + "}").encode()
        return len(body).to_bytes(4, "big") + bytes(4) + body
    if kind == "bytes":
        return draw(st.binary(max_size=256))
    data = bytearray(frame(header))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, max(0, len(data) - 1)))
        action = draw(st.sampled_from(["flip", "insert", "delete"]))
        if action == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif data:
            del data[at]
    return bytes(data)


def poke(sock: str, data: bytes) -> None:
    """Send data, close our side, read whatever comes back until the peer closes (or 10 s)."""
    import socket as socketlib
    conn = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
    conn.settimeout(10)
    try:
        conn.connect(sock)
        conn.sendall(data)
        conn.shutdown(socketlib.SHUT_WR)
        while conn.recv(1 << 16):
            pass
    except (BrokenPipeError, ConnectionResetError, socketlib.timeout):
        pass
    finally:
        conn.close()


def test_fuzzed_frames_on_both_sockets(local_head, tmp_path):
    """Random and mutated frames on the head's and the supervisor's sockets: no traceback in
    either log, memory stays bounded, and another user's batch, running meanwhile, completes."""
    import psutil
    local_head.wait_nodes_up(1)
    sock, supervisor = supervisor_of(local_head)
    head_process = psutil.Process(local_head.proc.pid)
    release = tmp_path / "release"
    other = write_jobs(tmp_path / "other", f"""\
        meta: {{batch_name: meanwhile, namespace: other}}
        shell:
          jobs:
            - {{name: waits, command: 'while [ ! -e {release} ]; do sleep 0.05; done; echo done'}}
            - {{name: quick, command: 'echo quick'}}
        """)
    local_head.cli("add", other)
    wait_until(lambda: local_head.batch("other/meanwhile")["jobs"]["running"] >= 1, 30, "the other batch to run")
    before = head_process.memory_info().rss, supervisor.memory_info().rss

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=frames(HEAD_OPS, HEAD_FIELDS))
    def fuzz_head(data):
        poke(str(local_head.socket), data)

    @settings(max_examples=100, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=frames(SUPERVISOR_OPS, SUPERVISOR_FIELDS))
    def fuzz_supervisor(data):
        poke(sock, data)

    fuzz_head()
    fuzz_supervisor()
    assert head_process.is_running() and supervisor.is_running()
    assert head_process.memory_info().rss - before[0] < 100 << 20
    assert supervisor.memory_info().rss - before[1] < 100 << 20
    release.touch()
    batch = local_head.wait_batch("other/meanwhile", timeout=120)
    assert batch["jobs"]["done"] == 2, batch
    supervisor_log = local_head.state / "nodes" / "here" / ".distribute" / "supervisor.log"
    for text in (local_head.log.read_text(), supervisor_log.read_text()):
        assert "Traceback" not in text and "Task exception" not in text and "exception" not in text.lower(), text[-3000:]

"""SPEC §7 security promises (issue 7, items 5 and 6), against a real head and real sshd nodes.

Host keys are checked, the head's socket is closed to users outside its group, one user
cannot touch another's batch, names never reach a shell unquoted, and tar streams that
try to escape their folder are refused by the head and by a node's supervisor alike.
Other users' commands run as those Unix users (runuser) from a copy of the packed
program, as they would on the head machine.
"""

import asyncio
import dataclasses
import io
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from pathlib import Path

import pytest

import distribute
from cluster import HeadProcess, node_workdirs, nodes_yaml, wait_until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def shared_dir(public_tmp):
    """A folder every test user can read (job files, the program)."""
    return public_tmp


@pytest.fixture
def as_user(pyz, shared_dir):
    """as_user(user, head, *args) -> CompletedProcess: the CLI run as another Unix user."""
    program = shared_dir / "distribute.pyz"
    shutil.copyfile(pyz, program)
    os.chmod(program, 0o644)

    def run(user, head, *args):
        home = pwd.getpwnam(user).pw_dir
        argv = ["/usr/sbin/runuser", "-u", user, "--", "/usr/bin/python3", str(program),
                "--head", "local", "--socket", str(head.socket)] + [str(a) for a in args]
        return subprocess.run(argv, env={"HOME": home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                              cwd="/tmp", capture_output=True, text=True, timeout=120)
    return run


def one_line_error(result, code, text):
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert text in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def write_job_file(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    path = folder / "distribute-jobs.yaml"
    path.write_text(textwrap.dedent(text))
    os.chmod(path, 0o644)
    return path


# --- host keys ------------------------------------------------------------------------

@pytest.mark.parametrize("tamper", ["unknown", "changed"])
def test_unknown_or_changed_host_key_refuses_the_node(ssh_nodes, pyz, tamper):
    """node3's key is missing from known_hosts, or another key is recorded for it: refused,
    said clearly, and nothing is copied there."""
    home = ssh_nodes.head_home
    known = Path(home.known_hosts)
    node1, node3 = ssh_nodes["node1"], ssh_nodes["node3"]
    address = f"[{node3.host}]:{node3.port}"
    kept = [l for l in known.read_text().splitlines() if address not in l]
    if tamper == "changed":
        kept.append(f"{address} {node1.known_hosts_line().split(None, 1)[1]}")    # node1's key, claimed for node3
    known.write_text("\n".join(kept) + "\n")
    workdirs = node_workdirs(ssh_nodes)
    process = HeadProcess(None, nodes_yaml(list(ssh_nodes), workdirs), home.env(), pyz=pyz).start()
    try:
        process.wait_nodes_up(2)
        node = wait_until(lambda: next((n for n in process.nodes() if n["name"] == "node3" and n["error"]), None),
                          30, "node3 to be refused")
        assert node["state"] == "refused" and not node["reachable"]
        assert "host key of node3" in node["error"] and "known_hosts" in node["error"]
        assert not (workdirs["node3"] / "bin").exists(), "nothing may be copied to an unverified host"
        text = process.cli("nodes").stdout
        assert "node3" in text and "host key" in text
    finally:
        process.stop()
        shutil.rmtree(process.dir, ignore_errors=True)
        shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)


# --- the head's socket ------------------------------------------------------------------

@pytest.mark.nodes(extra=["--group", "distribute", "--kill-grace", "2"])
def test_socket_is_open_to_the_heads_group_only(head, as_user):
    info = os.stat(head.socket)
    assert stat.S_IMODE(info.st_mode) == 0o660
    assert info.st_gid == __import__("grp").getgrnam("distribute").gr_gid
    member = as_user("dalice", head, "status", "--json")            # dalice is in group distribute
    assert member.returncode == 0, member.stderr
    assert json.loads(member.stdout)["batches"] == []
    outsider = as_user("dnode", head, "status")                      # dnode is not
    one_line_error(outsider, 1, "permission denied (ask the admin to add you to the head's group)")


# --- owners -----------------------------------------------------------------------------

@pytest.mark.nodes(extra=["--group", "distribute", "--kill-grace", "2"])
def test_one_user_cannot_kill_replace_resume_or_retry_anothers_batch(head, as_user, shared_dir):
    release = shared_dir / "release"
    alice_file = write_job_file(shared_dir / "alice", f"""\
        meta: {{batch_name: mine, namespace: lab}}
        shell:
          jobs:
            - {{name: ok, command: 'echo fine > distribute_save/r.txt'}}
            - {{name: bad, command: 'exit 3'}}
            - {{name: slow, command: 'while [ ! -e {release} ]; do sleep 0.05; done'}}
        """)
    bob_file = write_job_file(shared_dir / "bob", """\
        meta: {batch_name: mine, namespace: lab}
        shell:
          jobs:
            - {name: ok, command: 'echo bob was here > distribute_save/r.txt'}
        """)
    head.wait_nodes_up(3)
    added = as_user("dalice", head, "add", alice_file)
    assert added.returncode == 0, added.stderr
    wait_until(lambda: head.batch("lab/mine")["jobs"]["done"] == 1, 30, "alice's first job")

    # while it runs
    one_line_error(as_user("dbob", head, "kill", "lab/mine"), 2, "dbob may not kill lab/mine: it belongs to dalice")
    one_line_error(as_user("dbob", head, "add", "--replace", bob_file), 2,
                   "dbob may not replace lab/mine: it belongs to dalice")
    assert head.batch("lab/mine")["state"] == "active"
    release.touch()
    batch = head.wait_batch("lab/mine")
    assert batch["owner"] == "dalice" and batch["jobs"]["done"] == 2 and batch["jobs"]["failed"] == 1

    # once it is over
    one_line_error(as_user("dbob", head, "add", "--resume", bob_file), 2,
                   "dbob may not resume lab/mine: it belongs to dalice")
    one_line_error(as_user("dbob", head, "retry", "lab/mine"), 2, "dbob may not retry lab/mine: it belongs to dalice")
    one_line_error(as_user("dbob", head, "add", "--replace", bob_file), 2,
                   "dbob may not replace lab/mine: it belongs to dalice")
    after = head.batch("lab/mine")
    assert after == batch
    assert (head.archive / "lab" / "mine" / "ok" / "r.txt").read_text() == "fine\n"

    # the owner may
    retried = as_user("dalice", head, "retry", "lab/mine")
    assert retried.returncode == 0, retried.stderr
    assert head.wait_batch("lab/mine")["jobs"]["failed"] == 1


@pytest.mark.nodes(extra=["--group", "distribute", "--kill-grace", "2"])
def test_only_the_owner_and_the_admin_read_a_batchs_output(head, as_user, shared_dir):
    """`logs` (live or archived) and `pull` of another user's batch are refused (issue 18, item 5)."""
    release = shared_dir / "release"
    alice_file = write_job_file(shared_dir / "alice", f"""\
        meta: {{batch_name: secret, namespace: lab}}
        shell:
          jobs:
            - {{name: talk, command: 'echo the password is swordfish; while [ ! -e {release} ]; do sleep 0.05; done'}}
        """)
    head.wait_nodes_up(1)
    assert as_user("dalice", head, "add", alice_file).returncode == 0
    wait_until(lambda: head.batch("lab/secret")["jobs"]["running"] == 1, 30, "alice's job to run")
    wait_until(lambda: "swordfish" in as_user("dalice", head, "logs", "lab/secret/talk").stdout, 30,
               "the owner to read her running job's output")
    refused = "dbob may not read the output of lab/secret: it belongs to dalice"
    one_line_error(as_user("dbob", head, "logs", "lab/secret/talk"), 2, refused)
    release.touch()
    head.wait_batch("lab/secret")
    one_line_error(as_user("dbob", head, "logs", "lab/secret/talk"), 2, refused)
    one_line_error(as_user("dbob", head, "pull", "--batch", "lab/secret", "--dry"), 2,
                   "dbob may not pull lab/secret: it belongs to dalice")
    assert "swordfish" in as_user("dalice", head, "logs", "lab/secret/talk").stdout
    assert as_user("dalice", head, "pull", "--batch", "lab/secret", "--dry").returncode == 0
    assert "swordfish" in head.cli("logs", "lab/secret/talk").stdout            # the admin (root)


# --- names never reach a shell ------------------------------------------------------------

def test_job_named_to_inject_a_command_is_refused_at_load(head, tmp_path):
    pwned = Path(tempfile.mkdtemp(prefix="dpwn-", dir="/tmp")) / "pwned"
    job_file = write_job_file(tmp_path / "inj", f"""\
        meta: {{batch_name: inj, namespace: lab}}
        shell:
          jobs:
            - {{name: 'x; touch {pwned}', command: 'true'}}
        """)
    for command in (["check"], ["add"]):
        result = head.cli(*command, job_file, check=False)
        one_line_error(result, 2, "is not a valid name")
        assert "distribute-jobs.yaml:4:" in result.stderr
    assert head.status()["batches"] == []
    assert not pwned.exists()
    shutil.rmtree(pwned.parent, ignore_errors=True)


def injected_files(tag: str, roots):
    """Files named like the injected `touch` targets, wherever a shell's cwd may have been."""
    found = []
    for root in roots:
        found += [str(p) for p in Path(root).rglob(f"{tag}*")] if Path(root).exists() else []
    return found


def quoted_nodes_file(ssh_nodes, base: Path, tag: str):
    """Nodes whose workdir and python path hold spaces, `$(…)`, backquotes, `;` and quotes.
    (Relative `touch` targets keep the paths short: a Unix socket path has 108 bytes at most.)"""
    workdirs = {}
    for node in ssh_nodes:
        folder = base / f"{node.name} $(touch {tag}w);x'q\"" / "w"
        folder.mkdir(parents=True)
        for part in (folder, folder.parent):
            shutil.chown(part, "dnode", "dnode")
        workdirs[node.name] = folder
    python_dir = base / f"py `touch {tag}p`; $(touch {tag}q)"
    python_dir.mkdir()
    os.chmod(python_dir, 0o755)
    (python_dir / "python3").symlink_to("/usr/bin/python3")
    text = []
    for line in nodes_yaml(list(ssh_nodes), workdirs).splitlines():
        key, _, value = line.partition(": ")
        if key.strip() in ("workdir", "python"):
            value = json.dumps(str(python_dir / "python3") if key.strip() == "python" else value)
        text.append(f"{key}: {value}" if value else line)
    return "\n".join(text) + "\n", workdirs


def test_workdir_and_python_with_shell_metacharacters_are_quoted(ssh_nodes, pyz, tmp_path):
    """Every remote command quotes the node's paths, so the batch runs and nothing is injected."""
    tag = "pwn" + os.urandom(4).hex()
    base = Path(tempfile.mkdtemp(prefix="dq-", dir="/tmp"))
    os.chmod(base, 0o755)
    text, workdirs = quoted_nodes_file(ssh_nodes, base, tag)
    assert distribute.load_nodes_file(str(_write(tmp_path / "nodes.yaml", text)))[0].workdir == str(workdirs["node1"])
    process = HeadProcess(None, text, ssh_nodes.head_home.env(), pyz=pyz).start()
    try:
        process.wait_nodes_up(3)
        job_file = write_job_file(tmp_path / "q", """\
            meta: {batch_name: quoted, namespace: lab}
            shell:
              jobs:
""" + "".join(f"                - {{name: j{i}, command: 'pwd > distribute_save/where.txt'}}\n"
                        for i in range(6)))
        process.cli("add", job_file)
        batch = process.wait_batch("lab/quoted")
        assert batch["jobs"]["done"] == 6
        where = {(process.archive / "lab" / "quoted" / f"j{i}" / "where.txt").read_text().strip() for i in range(6)}
        assert where <= {str(w / "lab" / "quoted") for w in workdirs.values()}
        assert injected_files(tag, ["/home/dnode", "/tmp", "/root", base, process.dir]) == [], \
            "a shell ran part of a path as a command"
    finally:
        process.stop()
        shutil.rmtree(process.dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)


def test_workdir_too_long_for_a_socket_is_refused_at_load(tmp_path):
    """The supervisor's socket lives in <workdir>/.distribute/: a path the kernel cannot bind is a
    clear error naming the line, not a node that never comes up."""
    workdir = "/var/tmp/" + "w" * 90
    nodes = _write(tmp_path / "nodes.yaml", f"nodes:\n  - name: a\n    host: a\n    workdir: {workdir}\n")
    result = subprocess.run([sys.executable, str(ROOT / "distribute.py"), "serve", "--nodes", str(nodes),
                             "--state", str(tmp_path / "state")], capture_output=True, text=True, timeout=60)
    one_line_error(result, 2, "nodes.yaml:4:")
    assert "too long" in result.stderr


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- tar streams that try to escape -----------------------------------------------------------

def crafted_tars(outside: Path):
    """(what, tar bytes) pairs, each trying to write under `outside`; a 2 MiB file follows the
    bad entry, so a receiver that stops early must not leave its sender blocked."""
    def tar_with(*members):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for info, data in members + (_file("padding.bin", os.urandom(2 * 1024 * 1024)),):
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buffer.getvalue()

    def link(name, kind, target):
        info = tarfile.TarInfo(name)
        info.type, info.linkname = kind, target
        return info, None

    def special(name, kind):
        info = tarfile.TarInfo(name)
        info.type, info.devmajor, info.devminor = kind, 1, 3
        return info, None

    return [
        ("dot-dot", tar_with(_file(f"../../../../../../..{outside}/dotdot.txt", b"x"))),
        ("absolute path", tar_with(_file(f"{outside}/absolute.txt", b"x"))),
        ("symlink out, then through it", tar_with(link("out", tarfile.SYMTYPE, str(outside)),
                                                  _file("out/through.txt", b"x"))),
        ("relative symlink out", tar_with(link("up", tarfile.SYMTYPE, "../../../../../../../../.."),
                                          _file("up/tmp/relative.txt", b"x"))),
        ("hard link", tar_with(link("hard", tarfile.LNKTYPE, "/etc/passwd"))),
        ("character device", tar_with(special("null", tarfile.CHRTYPE))),
        ("block device", tar_with(special("disk", tarfile.BLKTYPE))),
        ("fifo", tar_with(special("pipe", tarfile.FIFOTYPE))),
    ]


def _file(name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


async def send_and_reply(sock: str, header, payload: bytes, stream: bool, go_ahead: bool = False):
    """One request with files to a distribute socket: inline in the frame, or (stream) as a tar
    until EOF after the header (after the receiver's go-ahead reply when `go_ahead`).  The
    tar is written while the reply is awaited: a receiver may refuse before reading it all."""
    reader, writer = await asyncio.open_unix_connection(sock, limit=2 ** 24)
    channel = distribute.Channel(reader, writer)

    async def write_all():
        try:
            writer.write(payload)
            await writer.drain()
            writer.write_eof()
        except ConnectionError:
            pass
    try:
        if not stream:
            return (await asyncio.wait_for(channel.request(header, payload), 20))[0]
        if go_ahead:
            first, _ = await asyncio.wait_for(channel.request(header), 20)
            assert first.get("send"), first
        else:
            await channel.send(dict(header, stream=True))
        sender = asyncio.ensure_future(write_all())
        reply, _ = await asyncio.wait_for(channel.receive(), 20)
        await asyncio.wait_for(sender, 20)          # the sender never stays blocked
        return reply
    finally:
        channel.close()


def test_supervisor_refuses_tar_streams_that_escape(head):
    """A build payload sent straight to node1's supervisor socket, inline and streamed."""
    head.wait_nodes_up(3)
    outside = Path(tempfile.mkdtemp(prefix="doutside-", dir="/tmp"))
    os.chmod(outside, 0o777)
    sock = str(head.workdirs["node1"] / ".distribute" / "supervisor.sock")
    plan = dataclasses.asdict(distribute.BatchPlan("evil", "tar", "shell"))
    try:
        for what, payload in crafted_tars(outside):
            for stream in (False, True):
                reply = asyncio.run(send_and_reply(sock, {"op": "build", "plan": plan, "id": 1}, payload, stream))
                assert reply.get("ok") is False, (what, stream, reply)
                assert "refused tar entry" in reply["error"], (what, stream, reply)
                assert list(outside.iterdir()) == [], (what, stream)
        escape = dataclasses.asdict(distribute.BatchPlan("..", "..", "shell"))
        reply = asyncio.run(send_and_reply(sock, {"op": "build", "plan": escape, "id": 2},
                                               distribute.tar_of([]), False))
        assert reply.get("ok") is False and "escapes" in reply["error"], reply
        # the supervisor still serves its head afterwards
        assert head.nodes()[0]["reachable"]
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_head_refuses_tar_streams_that_escape(head, tmp_path):
    """An `add` whose upload tar tries to escape the head's files folder."""
    outside = Path(tempfile.mkdtemp(prefix="doutside-", dir="/tmp"))
    job_file = write_job_file(tmp_path / "ok", """\
        meta: {batch_name: evil, namespace: lab}
        shell:
          jobs:
            - {name: a, command: 'true'}
        """)
    header = distribute.add_request(distribute.load_job_file(str(job_file)))
    head.wait_nodes_up(1)
    try:
        for what, payload in crafted_tars(outside):
            reply = asyncio.run(send_and_reply(str(head.socket), header, payload, True, go_ahead=True))
            assert reply.get("ok") is False and "refused tar entry" in reply["error"], (what, reply)
            assert list(outside.iterdir()) == [], what
        assert head.status()["batches"] == []
        assert head.cli("add", job_file).returncode == 0          # the name is free: nothing half-added
    finally:
        shutil.rmtree(outside, ignore_errors=True)


# --- secrets ---------------------------------------------------------------------------------------

class EchoingHomeserver:
    """A hostile or broken homeserver (or proxy) that quotes the request's token back in its errors."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                token = self.headers.get("Authorization", "")
                body = json.dumps({"errcode": "M_UNKNOWN_TOKEN", "error": f"unknown token {token}"}).encode()
                self.send_response(401)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            do_GET = do_POST = do_PUT = answer

            def log_message(self, *args):
                pass
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.nodes(extra=["--kill-grace", "2"])
def test_matrix_token_never_reaches_logs_or_json_even_when_echoed(ssh_nodes, pyz, tmp_path):
    token = "syt_" + os.urandom(16).hex()
    homeserver = EchoingHomeserver()
    config = tmp_path / "matrix.yaml"
    config.write_text(f"homeserver: {homeserver.url}\naccess_token: {token}\n")
    os.chmod(config, 0o600)
    workdirs = node_workdirs(ssh_nodes)
    process = HeadProcess(None, nodes_yaml(list(ssh_nodes), workdirs), ssh_nodes.head_home.env(), pyz=pyz,
                          extra=["--matrix-config", str(config)]).start()
    try:
        job_file = write_job_file(tmp_path / "m", """\
            meta: {batch_name: told, namespace: lab, matrix: "@alice:localhost"}
            shell:
              jobs:
                - {name: a, command: 'echo hi > distribute_save/a.txt'}
            """)
        process.wait_nodes_up(1)
        process.cli("add", job_file)
        assert process.wait_batch("lab/told")["state"] == "done"
        wait_until(lambda: "matrix: cannot notify" in process.log.read_text(), 30, "the homeserver's refusal")
        outputs = [process.log.read_text()] + [process.cli(*c).stdout for c in
                                               (["status", "--json"], ["nodes", "--json"], ["status"], ["nodes"])]
        outputs += [p.read_text(errors="replace") for p in process.archive.rglob("*") if p.is_file()]
        assert all(token not in text for text in outputs), "the access token leaked"
        assert token[8:] not in "".join(outputs)
    finally:
        process.stop()
        homeserver.close()
        shutil.rmtree(process.dir, ignore_errors=True)
        shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)

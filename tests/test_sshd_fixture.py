"""The sshd fixtures are real: OpenSSH and asyncssh clients log in with keys,
verify host keys, forward to Unix sockets, and see machines vanish and return."""

import asyncio
import grp
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import asyncssh
import psutil
import pytest

import sshd as S

TIMEOUT = 10


def ssh(home, alias, command):
    return subprocess.run(home.ssh(alias, command), env=home.env(), stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def test_users_exist_with_plain_sh():
    S.ensure_users()
    for user in ("dnode", "dalice", "dbob"):
        assert pwd.getpwnam(user).pw_shell == "/bin/sh"
    assert os.path.isdir(pwd.getpwnam("dnode").pw_dir)
    assert set(grp.getgrnam("distribute").gr_mem) >= {"dalice", "dbob"}
    assert "dnode" not in grp.getgrnam("distribute").gr_mem


def test_nodes_are_distinct_machines(ssh_nodes):
    assert ssh_nodes.names == ["node1", "node2", "node3"]
    assert len({n.host for n in ssh_nodes}) == 3
    for n in ssh_nodes:
        assert n.host.startswith("127.0.0.") and n.host != "127.0.0.1"
        assert n.start_seconds is not None
        print(f"{n.name}: {n.host}:{n.port} started in {n.start_seconds * 1000:.0f} ms")
        line = n.known_hosts_line()
        assert line.startswith(f"[{n.host}]:{n.port} ssh-ed25519 AAAA")
    assert len({n.known_hosts_line().split()[2] for n in ssh_nodes}) == 3


def test_openssh_client_logs_in_as_dnode_without_password(ssh_nodes):
    home = ssh_nodes.head_home
    for name in ssh_nodes.names:
        r = ssh(home, name, "id -un")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "dnode\n"
        assert r.stderr == ""


def test_openssh_client_refuses_unknown_host_key(ssh_nodes, ssh_keys):
    with S.SshClientHome("stranger", key=ssh_keys.get("client-head")) as home:
        home.add_host("node1", ssh_nodes["node1"], "dnode")
        home.known_hosts.write_text("")
        r = ssh(home, "node1", "id -un")
        assert r.returncode == 255
        assert "Host key verification failed" in r.stderr
        assert r.stdout == ""


def test_asyncssh_with_config_and_with_explicit_options(ssh_nodes):
    home = ssh_nodes.head_home
    node2 = ssh_nodes["node2"]

    async def main():
        async with asyncssh.connect("node1", **home.asyncssh_options()) as conn:
            assert (await conn.run("id -un", check=True)).stdout == "dnode\n"
            assert conn.get_extra_info("peername")[:2] == (ssh_nodes["node1"].host,
                                                          ssh_nodes["node1"].port)
        async with asyncssh.connect(node2.host, node2.port, username="dnode",
                                    known_hosts=str(home.known_hosts),
                                    client_keys=[str(home.identity)],
                                    config=None, agent_path=None) as conn:
            assert (await conn.run("id -un", check=True)).stdout == "dnode\n"

    run(main())


def test_asyncssh_refuses_missing_or_wrong_host_key(ssh_nodes, tmp_path):
    home = ssh_nodes.head_home
    node1, node2 = ssh_nodes["node1"], ssh_nodes["node2"]
    empty = tmp_path / "empty_known_hosts"
    empty.write_text("")
    wrong = tmp_path / "wrong_known_hosts"      # node2's key under node1's name
    wrong.write_text(f"[{node1.host}]:{node1.port} {node2.public_key()}\n")

    async def attempt(known_hosts):
        await asyncssh.connect(node1.host, node1.port, username="dnode",
                               known_hosts=str(known_hosts),
                               client_keys=[str(home.identity)], config=None, agent_path=None)

    for kh in (empty, wrong):
        with pytest.raises(asyncssh.HostKeyNotVerifiable):
            run(attempt(kh))


def test_unauthorized_key_is_refused(ssh_nodes, ssh_keys):
    # Trusts node1 but its key was never authorized there.
    with S.SshClientHome("intruder", key=ssh_keys.get("client-intruder")) as home:
        with open(home.known_hosts, "w") as f:
            f.write(ssh_nodes["node1"].known_hosts_line() + "\n")

        async def main():
            await asyncssh.connect(ssh_nodes["node1"].host, ssh_nodes["node1"].port,
                                   username="dnode", known_hosts=str(home.known_hosts),
                                   client_keys=[str(home.identity)], config=None,
                                   agent_path=None)

        with pytest.raises(asyncssh.PermissionDenied):
            run(main())


@pytest.fixture
def socket_dir():
    d = tempfile.mkdtemp(prefix="distribute-sock-")   # not under 0700 pytest dirs
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


async def _echo_server(path, mode, group=None):
    async def handle(reader, writer):
        writer.write(b"echo:" + await reader.readline())
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    os.chmod(path, mode)
    if group:
        os.chown(path, 0, grp.getgrnam(group).gr_gid)
    return server


async def _through(conn, path):
    reader, writer = await conn.open_unix_connection(str(path))
    writer.write(b"hi\n")
    data = await reader.read()
    writer.close()
    return data


def test_stream_local_forwarding_to_node_socket(ssh_nodes, socket_dir):
    path = socket_dir / "echo.sock"

    async def main():
        server = await _echo_server(path, 0o666)
        async with server, asyncssh.connect("node1", **ssh_nodes.head_home.asyncssh_options()) as conn:
            assert await _through(conn, path) == b"echo:hi\n"

    run(main())


def test_head_socket_reachable_by_lab_group_only(head_sshd, alice_home, bob_home, ssh_nodes,
                                                 socket_dir):
    # The head's socket is root:distribute 0660: dalice and dbob reach it, dnode does not.
    path = socket_dir / "head.sock"
    r = ssh(alice_home, "head", "id -un; id -Gn")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[0] == "dalice" and "distribute" in r.stdout.split("\n")[1]

    async def main():
        server = await _echo_server(path, 0o660, group="distribute")
        async with server:
            for home, user in ((alice_home, "dalice"), (bob_home, "dbob")):
                async with asyncssh.connect("head", **home.asyncssh_options()) as conn:
                    assert (await conn.run("id -un")).stdout == f"{user}\n"
                    assert await _through(conn, path) == b"echo:hi\n"
            async with asyncssh.connect("node1", **ssh_nodes.head_home.asyncssh_options()) as conn:
                with pytest.raises(asyncssh.ChannelOpenError):
                    await _through(conn, path)

    run(main())


def test_cut_drops_connections_and_heal_restores(ssh_nodes):
    home = ssh_nodes.head_home
    node = ssh_nodes["node1"]
    addr, port, key = node.host, node.port, node.public_key()

    async def main():
        conn = await asyncssh.connect("node1", **home.asyncssh_options())
        proc = await conn.create_process("echo $$; exec sleep 300")
        sleeper = int(await proc.stdout.readline())
        assert psutil.pid_exists(sleeper)

        t0 = time.monotonic()
        node.cut()
        await asyncio.wait_for(conn.wait_closed(), 5)
        print(f"cut -> connection closed in {(time.monotonic() - t0) * 1000:.0f} ms")
        with pytest.raises(OSError):
            await asyncssh.connect("node1", **home.asyncssh_options())
        # other nodes are untouched
        async with asyncssh.connect("node2", **home.asyncssh_options()) as c2:
            assert (await c2.run("id -un")).stdout == "dnode\n"

        node.heal()
        assert (node.host, node.port, node.public_key()) == (addr, port, key)
        async with asyncssh.connect("node1", **home.asyncssh_options()) as conn:
            assert (await conn.run("id -un")).stdout == "dnode\n"
        return sleeper

    sleeper = run(main())
    # A plain cut leaves commands running (like a network cut); stop() reaps them.
    assert S._alive(psutil.Process(sleeper))
    node.stop()
    assert not psutil.pid_exists(sleeper) or not S._alive(psutil.Process(sleeper))


def test_cut_crash_kills_commands_too(ssh_nodes):
    node = ssh_nodes["node3"]

    async def main():
        conn = await asyncssh.connect("node3", **ssh_nodes.head_home.asyncssh_options())
        proc = await conn.create_process("echo $$; exec sleep 300")
        sleeper = psutil.Process(int(await proc.stdout.readline()))
        node.cut(crash=True)
        await asyncio.wait_for(conn.wait_closed(), 5)
        assert not S._alive(sleeper)

    run(main())
    assert not node.running
    assert not [p for p in psutil.process_iter(["name"])
                if p.info["name"] == "sshd" and S._alive(p)
                and any(c.laddr and (c.laddr.ip, c.laddr.port) == node.address
                        for c in _conns(p))]


def _conns(p):
    try:
        return p.net_connections(kind="tcp4")
    except psutil.Error:
        return []


def test_node_environment_is_clean_and_fast(ssh_nodes):
    home = ssh_nodes.head_home
    t0 = time.monotonic()
    r = ssh(home, "node1", "true")
    ssh_seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stderr

    async def main():
        async with asyncssh.connect("node1", **home.asyncssh_options()) as conn:
            env = (await conn.run("echo $0; echo $SHELL; env", check=True)).stdout
            times = []
            for _ in range(5):
                t = time.monotonic()
                await conn.run("true", check=True)
                times.append(time.monotonic() - t)
            return env, times

    env, times = run(main())
    lines = env.splitlines()
    assert lines[0] == "sh" and lines[1] == "/bin/sh"
    names = {line.split("=", 1)[0] for line in lines[2:] if "=" in line}
    assert not {n for n in names if n.startswith("PYENV")}, names
    assert "pyenv" not in env
    print(f"\nssh subprocess 'true': {ssh_seconds * 1000:.0f} ms; "
          f"asyncssh run 'true' on an open connection: "
          f"{', '.join(f'{t * 1000:.0f}' for t in times)} ms")


def test_sshd_dies_with_the_process_that_started_it(tmp_path):
    # Start an Sshd in a child python, SIGKILL the child: PDEATHSIG takes sshd down.
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import sshd
        s = sshd.Sshd("orphan").start()
        print(s.pid, s.host, s.port, s.dir, flush=True)
        time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    tmp = None
    try:
        pid, host, port, tmp = child.stdout.readline().split()
        assert psutil.pid_exists(int(pid))
        child.kill()
        child.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and S._alive_pid(int(pid)):
            time.sleep(0.01)
        assert not S._alive_pid(int(pid))
        with pytest.raises(OSError):
            socket.create_connection((host, int(port)), timeout=1).close()
    finally:
        child.kill()
        child.wait()
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)

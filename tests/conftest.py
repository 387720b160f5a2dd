"""Shared fixtures: the packed distribute.pyz and a cluster of real OpenSSH sshd processes."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# --- pyz (built once per test session) -------------------------------------
# build_zipapp.py keeps the wheels it downloads in ~/.cache/distribute-build, so
# only the first build on a machine needs the network (about a minute); later
# ones take a few seconds.


@pytest.fixture(scope="session")
def pyz(tmp_path_factory):
    """Path of a distribute.pyz built from this tree; what build_zipapp.py
    printed is beside it, in build.log."""
    import subprocess

    folder = tmp_path_factory.mktemp("pyz")
    out = folder / "distribute.pyz"
    proc = subprocess.run([sys.executable, str(ROOT / "build_zipapp.py"), "-o", str(out)],
                          cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=1500)
    (folder / "build.log").write_text(proc.stdout)
    if proc.returncode != 0:
        pytest.fail("build_zipapp.py failed (exit %d):\n%s" % (proc.returncode, proc.stdout))
    return out


# --- sshd cluster ------------------------------------------------------------
# Real OpenSSH sshd processes on loopback addresses (implementation: sshd.py).
# Needs root; creates Unix users dnode, dalice, dbob and group distribute.

import contextlib as _contextlib

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sshd as _sshd  # noqa: E402

NODE_NAMES = ("node1", "node2", "node3")


@pytest.fixture(scope="session")
def ssh_keys(tmp_path_factory):
    """KeyStore: ed25519 key pairs made once per session, `ssh_keys.get(name)` -> path.

    Also creates the test users once (dnode, dalice, dbob; group distribute).
    """
    _sshd.ensure_users()
    _sshd.ensure_privsep_dir()
    return _sshd.KeyStore(tmp_path_factory.mktemp("ssh-keys"))


@pytest.fixture
def ssh_nodes(ssh_keys):
    """SshCluster: three running node sshds node1..node3 and `.head_home`.

    `ssh_nodes["node1"]` is an Sshd (.host, .port, .cut(), .heal());
    `ssh_nodes.head_home` is the head's SshClientHome with aliases node1..node3
    logging in as dnode: `asyncssh.connect("node1", **home.asyncssh_options())`
    or `subprocess.run(home.ssh("node1", "id -un"), env=home.env())`.
    """
    with _contextlib.ExitStack() as stack:
        home = _sshd.SshClientHome("head", key=ssh_keys.get("client-head"))
        stack.callback(home.close)
        nodes = []
        for name in NODE_NAMES:
            node = _sshd.Sshd(name, host_key=ssh_keys.get(f"host-{name}"))
            stack.callback(node.stop)
            node.start()
            home.add_host(name, node, _sshd.NODE_USER)
            nodes.append(node)
        yield _sshd.SshCluster(nodes, home)


@pytest.fixture
def head_home(ssh_nodes):
    """The head's SshClientHome (same object as ssh_nodes.head_home)."""
    return ssh_nodes.head_home


@pytest.fixture
def head_sshd(ssh_keys):
    """Sshd for the head machine (name "head"), running; lab members log in to it."""
    with _sshd.Sshd("head", host_key=ssh_keys.get("host-head")) as head:
        yield head


@pytest.fixture
def alice_home(head_sshd, ssh_keys):
    """SshClientHome of dalice's laptop: alias `head` logs in to head_sshd as dalice."""
    with _sshd.SshClientHome("alice", key=ssh_keys.get("client-alice")) as home:
        home.add_host("head", head_sshd, "dalice")
        yield home


@pytest.fixture
def bob_home(head_sshd, ssh_keys):
    """SshClientHome of dbob's laptop: alias `head` logs in to head_sshd as dbob."""
    with _sshd.SshClientHome("bob", key=ssh_keys.get("client-bob")) as home:
        home.add_host("head", head_sshd, "dbob")
        yield home


@pytest.fixture
def public_tmp():
    """A short folder under /tmp that every test account can read (pytest's tmp_path is
    root-only), removed afterwards."""
    import shutil
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="dpub-", dir="/tmp"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


# --- a head over the sshd nodes ----------------------------------------------
# `head`: `distribute serve` (a real subprocess) with node1..node3 as its nodes.
# Mark a test with @pytest.mark.nodes(caps={...}, slots={...}, extra=[...], node_yaml={...}) to shape them
# (node_yaml: more keys per node, as YAML text, e.g. an owner: block).

from cluster import HeadProcess as _HeadProcess, node_workdirs as _node_workdirs, nodes_yaml as _nodes_yaml  # noqa: E402


@pytest.fixture
def head(ssh_nodes, pyz, request):
    """A running head serving node1..node3 over SSH (`head.cli(...)`, `head.archive`, `head.workdirs`)."""
    marker = request.node.get_closest_marker("nodes")
    options = marker.kwargs if marker else {}
    workdirs = _node_workdirs(ssh_nodes)
    pause_dirs = {name: folder.parent / f"{name}-pause" for name, folder in workdirs.items()}
    for folder in pause_dirs.values():
        folder.mkdir()
        os.chmod(folder, 0o1777)
    text = _nodes_yaml(list(ssh_nodes), workdirs, caps=options.get("caps"), slots=options.get("slots"),
                       pause_dirs=pause_dirs, extra=options.get("node_yaml"))
    process = _HeadProcess(None, text, ssh_nodes.head_home.env(), pyz=pyz,
                           extra=options.get("extra", ["--kill-grace", "2"]))
    process.workdirs = workdirs
    process.pause_dirs = pause_dirs
    process.start()
    yield process
    process.stop()
    import shutil as _shutil
    _shutil.rmtree(process.dir, ignore_errors=True)
    _shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)



# --- a Matrix homeserver (Synapse), one per test session -----------------------
# Synapse lives in its own venv (Python >= 3.10), installed from the package
# registry once per machine into ~/.cache/distribute-tests (about 2 minutes) and
# reused afterwards; implementation in matrix_server.py.

import matrix_server as _matrix_server  # noqa: E402


@pytest.fixture(scope="session")
def synapse(tmp_path_factory):
    """A running Synapse on 127.0.0.1 (SQLite, no federation): `.url`, `.user` (@testuser)
    and `.bot` (@distribute-bot), each with `.user_id` and `.access_token`; `.register(name)`."""
    folder = tmp_path_factory.mktemp("synapse")
    try:
        with open(folder / "install.log", "w") as install_log:
            python = _matrix_server.synapse_venv(log=install_log)
        server = _matrix_server.Synapse(python, folder / "server").start()
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"cannot run Synapse: {exc}")
    try:
        server.user = server.register("testuser")
        server.bot = server.register("distribute-bot")
        yield server
    finally:
        server.stop()

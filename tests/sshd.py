"""Real OpenSSH sshd "machines" on loopback addresses, for tests.

Every `Sshd` is one machine: its own address 127.0.0.X, its own port, host key,
sshd_config and authorized_keys, served by a real `/usr/sbin/sshd -D` child of
the test process.  `SshClientHome` is a fake HOME for one SSH client identity
(the head's account, a lab member's laptop) with a key pair, known_hosts and an
ssh config naming the machines by alias.

    keys = KeyStore(tmpdir)                 # ed25519 key pairs, made once
    node = Sshd("node1", host_key=keys.get("host-node1")).start()
    home = SshClientHome(key=keys.get("client-head"))
    home.add_host("node1", node, NODE_USER)
    subprocess.run(home.ssh("node1", "id -un"), env=home.env())
    await asyncssh.connect("node1", **home.asyncssh_options())
    node.cut(); node.heal(); node.stop(); home.close()

Logins use dedicated Unix users whose login shell is /bin/sh (see
`ensure_users`), so a command on a node runs in a clean, fast environment.

The tests run as root: sshd needs root to switch to those users.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import grp
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Set

import psutil

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"

NODE_USER = "dnode"                  # the account the head uses on every node
LAB_USERS = ("dalice", "dbob")       # lab members who talk to the head
LAB_GROUP = "distribute"             # may use the head's socket
LOGIN_SHELL = "/bin/sh"

START_TIMEOUT = 10.0

_USERS_LOCK = "/tmp/distribute-tests-users.lock"


# ---------------------------------------------------------------------------
# Unix users
# ---------------------------------------------------------------------------


def _run(argv: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _shadow_password(user: str) -> Optional[str]:
    try:
        with open("/etc/shadow") as f:
            for line in f:
                fields = line.split(":")
                if fields[0] == user:
                    return fields[1]
    except OSError:
        pass
    return None


def _user_ok(user: str, groups: List[str]) -> bool:
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return False
    if pw.pw_shell != LOGIN_SHELL or not os.path.isdir(pw.pw_dir):
        return False
    if (_shadow_password(user) or "").startswith("!"):
        return False
    for g in groups:
        try:
            if user not in grp.getgrnam(g).gr_mem:
                return False
        except KeyError:
            return False
    return True


def _ensure_user(user: str, groups: List[str]) -> None:
    if _user_ok(user, groups):
        return
    try:
        pwd.getpwnam(user)
    except KeyError:
        # '*' rather than useradd's default '!': with UsePAM no, sshd refuses
        # even public-key logins to an account whose password field starts
        # with '!' ("account is locked").
        argv = ["useradd", "--create-home", "--shell", LOGIN_SHELL, "--password", "*"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        r = _run(argv + [user])
        if r.returncode not in (0, 9):          # 9: name already in use
            raise RuntimeError(f"useradd {user} failed: {r.stderr.strip()}")
    pw = pwd.getpwnam(user)
    fixes: List[str] = []
    if pw.pw_shell != LOGIN_SHELL:
        fixes += ["--shell", LOGIN_SHELL]
    if (_shadow_password(user) or "").startswith("!"):
        fixes += ["--password", "*"]
    missing = [g for g in groups if user not in grp.getgrnam(g).gr_mem]
    if missing:
        fixes += ["--append", "--groups", ",".join(missing)]
    if fixes:
        r = _run(["usermod"] + fixes + [user])
        if r.returncode != 0:
            raise RuntimeError(f"usermod {user} failed: {r.stderr.strip()}")
    if not os.path.isdir(pw.pw_dir):
        os.makedirs(pw.pw_dir, mode=0o755, exist_ok=True)
        os.chown(pw.pw_dir, pw.pw_uid, pw.pw_gid)


def ensure_users() -> None:
    """Create dnode, dalice, dbob (shell /bin/sh) and group distribute, once.

    Idempotent; a file lock serialises concurrent pytest sessions (useradd
    itself fails rather than waits when /etc/passwd is locked).
    """
    wanted = {NODE_USER: [], **{u: [LAB_GROUP] for u in LAB_USERS}}
    try:
        grp.getgrnam(LAB_GROUP)
        group_ok = True
    except KeyError:
        group_ok = False
    if group_ok and all(_user_ok(u, g) for u, g in wanted.items()):
        return
    if os.geteuid() != 0:
        raise RuntimeError("the sshd fixtures must run as root (they create Unix users)")
    with open(_USERS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        r = _run(["groupadd", "--force", LAB_GROUP])
        if r.returncode != 0:
            raise RuntimeError(f"groupadd {LAB_GROUP} failed: {r.stderr.strip()}")
        for user, groups in wanted.items():
            _ensure_user(user, groups)


def ensure_privsep_dir() -> None:
    os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)


# ---------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------


def generate_key(path: Path, comment: str = "") -> Path:
    """Write an ed25519 key pair at `path` and `path`.pub; return `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    r = _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment or path.name,
              "-f", str(path)])
    if r.returncode != 0:
        raise RuntimeError(f"ssh-keygen failed: {r.stderr.strip()}")
    os.chmod(path, 0o600)
    return path


class KeyStore:
    """Key pairs generated on first use and reused (session-scoped material)."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def get(self, name: str) -> Path:
        """Path of the private key `name` (its public key is next to it, .pub)."""
        path = self.directory / name
        with self._lock:
            if not path.exists():
                generate_key(path, comment=name)
        return path


def _copy_key(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    os.chmod(dst, 0o600)
    shutil.copyfile(str(src) + ".pub", str(dst) + ".pub")
    os.chmod(str(dst) + ".pub", 0o644)


# ---------------------------------------------------------------------------
# sshd
# ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl   # looked up before any fork


def _die_with_parent(parent: int) -> None:
    # Runs in the child between fork and exec.  The signal fires when the
    # *thread* that forked exits: start sshds from the main (pytest) thread.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:          # parent died before prctl took effect
        os._exit(1)


_addresses_lock = threading.Lock()
_addresses_in_use: Set[str] = set()


def _pick_address() -> str:
    """A loopback address no live Sshd of this process uses.

    Other pytest sessions may pick the same address; the port, chosen by the
    kernel for (address, 0), keeps them apart.
    """
    with _addresses_lock:
        free = [f"127.0.0.{x}" for x in range(2, 255)
                if f"127.0.0.{x}" not in _addresses_in_use]
        if not free:
            raise RuntimeError("no free 127.0.0.X address left")
        addr = random.SystemRandom().choice(free)   # immune to tests seeding random
        _addresses_in_use.add(addr)
        return addr


def _free_port(addr: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


SSHD_CONFIG = """\
ListenAddress {host}:{port}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys/%u
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowStreamLocalForwarding yes
AllowTcpForwarding yes
MaxSessions 100
MaxStartups 200
LogLevel ERROR
Subsystem sftp internal-sftp
PermitUserEnvironment no
PermitUserRC no
PrintMotd no
PrintLastLog no
UseDNS no
SetEnv DISTRIBUTE_MACHINE_ID={machine_id}
"""


class SshdError(RuntimeError):
    pass


class Sshd:
    """One sshd "machine" on its own loopback address and port.

    host_key: path of an ed25519 private key to serve (copied); a new one is
    generated when omitted.  The temporary directory lives under /tmp (not
    pytest's 0700 tmp_path) because sshd reads authorized_keys as the user.
    """

    def __init__(self, name: str, host_key: Optional[Path] = None, host: Optional[str] = None,
                 machine_id: Optional[str] = None):
        ensure_users()
        self.name = name
        # Every sshd stands for a machine of its own: sessions see their own machine id
        # (distribute reads DISTRIBUTE_MACHINE_ID before /etc/machine-id).  Give two Sshd the
        # same machine_id to have two "addresses of one machine".
        self.machine_id = machine_id or f"sshd-{name}-{os.urandom(6).hex()}"
        self._own_address = host is None
        self.host = host or _pick_address()
        self.port = 0
        self.dir = Path(tempfile.mkdtemp(prefix=f"distribute-sshd-{name}-"))
        os.chmod(self.dir, 0o755)
        (self.dir / "authorized_keys").mkdir(mode=0o755)
        self.host_key = self.dir / "ssh_host_ed25519_key"
        if host_key is None:
            generate_key(self.host_key, comment=f"host-{name}")
        else:
            _copy_key(Path(host_key), self.host_key)
        self.config = self.dir / "sshd_config"
        self.log = self.dir / "sshd.log"
        self.proc: Optional[subprocess.Popen] = None
        self._leftovers: List[psutil.Process] = []
        self._closed = False
        self.start_seconds: Optional[float] = None     # how long the last start took

    # -- public API -----------------------------------------------------------

    @property
    def address(self):
        return (self.host, self.port)

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> "Sshd":
        """Start sshd on a fresh port (the first time) and wait until it serves."""
        if self._closed:
            raise SshdError(f"{self.name}: already stopped for good")
        if self.running:
            return self
        if self.port:
            return self.heal()
        last = None
        for _ in range(5):
            self.port = _free_port(self.host)
            try:
                return self._launch()
            except SshdError as e:
                last = e
                if "Address already in use" not in str(e):
                    raise
        raise last  # type: ignore[misc]

    def heal(self) -> "Sshd":
        """Start again after cut(): same address, port and host key."""
        if not self.port:
            return self.start()
        if self.running:
            return self
        return self._launch()

    def authorize(self, user: str, public_key_line: str) -> None:
        """Let `public_key_line` ("ssh-ed25519 AAAA... comment") log in as `user`."""
        path = self.dir / "authorized_keys" / user
        with open(path, "a") as f:
            f.write(public_key_line.strip() + "\n")
        os.chmod(path, 0o644)

    def public_key(self) -> str:
        """The host public key, "ssh-ed25519 AAAA..." (no comment)."""
        return " ".join(Path(str(self.host_key) + ".pub").read_text().split()[:2])

    def known_hosts_line(self) -> str:
        """`[127.0.0.X]:PORT ssh-ed25519 AAAA...`, for a known_hosts file."""
        if not self.port:
            raise SshdError(f"{self.name}: no port yet, start() it first")
        return f"[{self.host}]:{self.port} {self.public_key()}"

    def cut(self, crash: bool = False) -> None:
        """The machine vanishes: kill the listener and every sshd session process.

        Established connections die with their session processes.  Commands
        that were running through those sessions are left running (like a
        network cut); crash=True kills them too (like a power cut).  heal()
        brings the listener back.
        """
        self._kill(everything=crash)

    def stop(self) -> None:
        """Kill sshd, its sessions and their commands; delete the temp dir."""
        if self._closed:
            return
        self._closed = True
        try:
            self._kill(everything=True)
            self._kill_procs([p for p in self._leftovers if _alive(p)])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self._own_address:
                with _addresses_lock:
                    _addresses_in_use.discard(self.host)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> "Sshd":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Sshd {self.name} {self.host}:{self.port} pid={self.pid}>"

    # -- internals ----------------------------------------------------------

    def _launch(self) -> "Sshd":
        ensure_privsep_dir()
        self.config.write_text(SSHD_CONFIG.format(host=self.host, port=self.port, dir=self.dir,
                                                   machine_id=self.machine_id))
        t0 = time.monotonic()
        log_offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            parent = os.getpid()
            self.proc = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=lambda: _die_with_parent(parent), close_fds=True)
        try:
            self._wait_ready(t0 + START_TIMEOUT, log_offset)
        except BaseException:
            self._kill(everything=True)
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, deadline: float, log_offset: int) -> None:
        """Until a TCP connect to host:port gets sshd's banner."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise SshdError(
                    f"sshd {self.name} on {self.host}:{self.port} exited with "
                    f"{self.proc.returncode}: {self.log_text()[log_offset:].strip()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    s.settimeout(max(0.1, deadline - time.monotonic()))
                    banner = s.recv(64)
                    if banner.startswith(b"SSH-"):
                        # Say hello back so sshd does not log the probe as an error.
                        s.sendall(b"SSH-2.0-probe\r\n")
                        return
            except OSError as e:
                if e.errno not in (errno.ECONNREFUSED, errno.ECONNRESET, None) \
                        and not isinstance(e, socket.timeout):
                    raise
            if time.monotonic() > deadline:
                raise SshdError(
                    f"sshd {self.name} does not accept connections on "
                    f"{self.host}:{self.port} after {START_TIMEOUT}s: "
                    f"{self.log_text()[log_offset:].strip()}")
            time.sleep(0.002)

    def _kill(self, everything: bool) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            if proc is not None:
                proc.wait()
            victims = self._stray_sessions()
            self._kill_procs(victims)
            return
        try:
            listener = psutil.Process(proc.pid)
            # A stopped listener cannot fork new sessions while we look.
            listener.send_signal(signal.SIGSTOP)
            _wait_stopped(listener)
            tree = listener.children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        sessions = [p for p in tree if _name(p) == "sshd"]
        others = [p for p in tree if _name(p) != "sshd"]
        victims = sessions + (others if everything else [])
        if not everything:
            self._leftovers += others
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        self._kill_procs(victims)
        proc.wait()
        # Belt and braces: any sshd still holding a connection to host:port.
        self._kill_procs(self._stray_sessions())

    def _stray_sessions(self) -> List[psutil.Process]:
        if not self.port:
            return []
        found = []
        try:
            conns = psutil.net_connections(kind="tcp4")
        except psutil.Error:
            return []
        for c in conns:
            if c.pid and c.laddr and (c.laddr.ip, c.laddr.port) == (self.host, self.port):
                try:
                    p = psutil.Process(c.pid)
                    if _name(p) == "sshd":
                        found.append(p)
                except psutil.NoSuchProcess:
                    pass
        return found

    @staticmethod
    def _kill_procs(procs: List[psutil.Process]) -> None:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _wait_dead(procs)


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _alive_pid(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.Error:
        return False


def _wait_dead(procs: List[psutil.Process], timeout: float = 5.0) -> None:
    # Dead means exited (its sockets are closed), zombie or not: grandchildren
    # are reaped by init, on its own schedule.
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.001)


def _wait_stopped(p: psutil.Process, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return
        time.sleep(0.0005)


# ---------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------


class SshClientHome:
    """A fake HOME for one SSH client identity.

    `~/.ssh/id_ed25519` (+ .pub), `~/.ssh/known_hosts` and `~/.ssh/config`
    with one `Host <alias>` block per machine, all with absolute paths.
    OpenSSH's `ssh` takes ~ from the passwd entry, not $HOME, so pass
    `-F <home>/.ssh/config` (see `ssh()`); asyncssh and Python follow $HOME.

    key: path of a private key to use (copied); generated when omitted.
    owner: a user name to chown the home to, when the client runs as that user
    (by default everything belongs to the test process, root).
    """

    def __init__(self, name: str = "client", key: Optional[Path] = None,
                 owner: Optional[str] = None):
        self.name = name
        self.path = Path(tempfile.mkdtemp(prefix=f"distribute-home-{name}-"))
        self.ssh_dir = self.path / ".ssh"
        self.ssh_dir.mkdir(mode=0o700)
        self.identity = self.ssh_dir / "id_ed25519"
        if key is None:
            generate_key(self.identity, comment=name)
        else:
            _copy_key(Path(key), self.identity)
        self.known_hosts = self.ssh_dir / "known_hosts"
        self.config = self.ssh_dir / "config"
        self.known_hosts.touch(mode=0o644)
        self.config.touch(mode=0o644)
        self.owner = owner
        self.hosts: Dict[str, Sshd] = {}
        self._chown()

    @property
    def public_key(self) -> str:
        return Path(str(self.identity) + ".pub").read_text().strip()

    def add_host(self, alias: str, sshd: Sshd, user: str) -> None:
        """Authorize this key on `sshd` for `user`; trust its host key; add `Host alias`."""
        sshd.authorize(user, self.public_key)
        with open(self.known_hosts, "a") as f:
            f.write(sshd.known_hosts_line() + "\n")
        with open(self.config, "a") as f:
            f.write(
                f"Host {alias}\n"
                f"    HostName {sshd.host}\n"
                f"    Port {sshd.port}\n"
                f"    User {user}\n"
                f"    IdentityFile {self.identity}\n"
                f"    IdentitiesOnly yes\n"
                f"    IdentityAgent none\n"
                f"    UserKnownHostsFile {self.known_hosts}\n"
                f"    GlobalKnownHostsFile /dev/null\n"
                f"    StrictHostKeyChecking yes\n"
                f"    BatchMode yes\n"
                f"    ConnectTimeout 5\n"
                f"    LogLevel ERROR\n\n")
        self.hosts[alias] = sshd
        self._chown()

    def env(self, **extra: str) -> Dict[str, str]:
        """Environment for a client subprocess: ours with HOME here, no agent."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")}
        env["HOME"] = str(self.path)
        env.update(extra)
        return env

    def ssh(self, alias: str, *command: str) -> List[str]:
        """argv for OpenSSH's ssh to `alias` with this home's config."""
        return ["ssh", "-F", str(self.config), alias, *command]

    def asyncssh_options(self) -> Dict[str, object]:
        """Keyword arguments for asyncssh.connect(alias, **options)."""
        return {"config": [str(self.config)]}

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _chown(self) -> None:
        if not self.owner:
            return
        pw = pwd.getpwnam(self.owner)
        os.chmod(self.path, 0o755)
        for p in [self.path, self.ssh_dir, *self.ssh_dir.iterdir()]:
            os.chown(p, pw.pw_uid, pw.pw_gid)

    def __enter__(self) -> "SshClientHome":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SshClientHome {self.name} {self.path}>"


class SshCluster:
    """Node machines and the home of the head process that reaches them.

    cluster["node1"] -> Sshd; iter(cluster) -> the Sshds in order;
    cluster.head_home -> SshClientHome with aliases node1.. (user dnode).
    """

    def __init__(self, nodes: List[Sshd], head_home: SshClientHome):
        self.nodes = list(nodes)
        self.head_home = head_home

    def __getitem__(self, name: str) -> Sshd:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def __iter__(self):
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def names(self) -> List[str]:
        return [n.name for n in self.nodes]

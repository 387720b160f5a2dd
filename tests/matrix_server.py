"""A real Matrix homeserver (Synapse, SQLite, loopback only, no federation) for tests.

Synapse needs Python >= 3.10 and many dependencies, so it lives in its own venv,
made once per machine from the package registry and kept under
~/.cache/distribute-tests/synapse-venv-<version>; later sessions reuse it.  One
server is started per test session (about 2 s once installed).  Users are
registered through the shared-secret admin API, exactly as an admin would.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

SYNAPSE_VERSION = "1.163.2"
SERVER_NAME = "localhost"
CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distribute-tests"
PYTHON_CANDIDATES = ("python3.12", "python3.11", "python3.10", "python3.13", "python3")


def _python_at_least_310(python):
    try:
        probe = subprocess.run([python, "-c", "import sys, venv; print(sys.version_info >= (3, 10))"],
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0 and probe.stdout.strip() == "True"


def find_python():
    """A Python >= 3.10 with venv: this one if it fits, else one on PATH."""
    if sys.version_info >= (3, 10):
        return sys.executable
    for name in PYTHON_CANDIDATES:
        found = shutil.which(name)
        if found and _python_at_least_310(found):
            return found
    raise RuntimeError("Synapse needs Python >= 3.10 and none was found on PATH "
                       f"(tried {', '.join(PYTHON_CANDIDATES)})")


def synapse_venv(version=SYNAPSE_VERSION, log=None):
    """The venv's python, installing matrix-synapse==version into it unless already there.

    The install is done in a scratch folder renamed into place when complete, so an
    interrupted install is never mistaken for a finished one.
    """
    final = CACHE / f"synapse-venv-{version}"
    python = final / "bin" / "python"
    if python.exists() and (final / ".complete").exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".synapse-venv-{version}-", dir=CACHE))
    try:
        steps = [[find_python(), "-m", "venv", str(scratch)],
                 [str(scratch / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                  f"matrix-synapse=={version}"]]
        for argv in steps:
            done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  timeout=1500)
            if log is not None:
                log.write(f"$ {' '.join(argv)}\n{done.stdout}\n")
            if done.returncode != 0:
                raise RuntimeError(f"installing Synapse failed: {' '.join(argv)} exited {done.returncode}:\n"
                                   f"{done.stdout[-3000:]}")
        if (final / ".complete").exists():          # another test session finished first
            return python
        shutil.rmtree(final, ignore_errors=True)     # a half-made one, interrupted before .complete
        # Only `bin/python -m ...` is used, which works from the new path (pyvenv.cfg
        # names no venv path); the scripts' #! lines are fixed up all the same.
        scratch.rename(final)
        _fix_venv_paths(final, scratch)
        (final / ".complete").write_text(version + "\n")
        return python
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fix_venv_paths(venv, old):
    """Rewrite the scratch folder's path in the venv's scripts after the rename."""
    for script in (venv / "bin").iterdir():
        if script.is_file() and not script.is_symlink():
            try:
                text = script.read_text()
            except (UnicodeDecodeError, OSError):
                continue
            if str(old) in text:
                script.write_text(text.replace(str(old), str(venv)))


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


HOMESERVER_YAML = """\
server_name: "{server_name}"
pid_file: {dir}/homeserver.pid
public_baseurl: "http://127.0.0.1:{port}/"
listeners:
  - port: {port}
    bind_addresses: ['127.0.0.1']
    type: http
    tls: false
    x_forwarded: false
    resources:
      - names: [client]
        compress: false
database:
  name: sqlite3
  args:
    database: {dir}/homeserver.db
log_config: "{dir}/log.config"
media_store_path: {dir}/media_store
signing_key_path: "{dir}/signing.key"
registration_shared_secret: "{secret}"
macaroon_secret_key: "{macaroon}"
form_secret: "{form}"
report_stats: false
bcrypt_rounds: 4
trusted_key_servers: []
suppress_key_server_warning: true
federation_domain_whitelist: []
send_federation: false
enable_metrics: false
presence:
  enabled: false
url_preview_enabled: false
rc_message: {{per_second: 1000, burst_count: 1000}}
rc_registration: {{per_second: 1000, burst_count: 1000}}
rc_login:
  address: {{per_second: 1000, burst_count: 1000}}
  account: {{per_second: 1000, burst_count: 1000}}
  failed_attempts: {{per_second: 1000, burst_count: 1000}}
rc_joins:
  local: {{per_second: 1000, burst_count: 1000}}
rc_invites:
  per_room: {{per_second: 1000, burst_count: 1000}}
  per_user: {{per_second: 1000, burst_count: 1000}}
  per_issuer: {{per_second: 1000, burst_count: 1000}}
"""

LOG_CONFIG = """\
version: 1
formatters:
  precise:
    format: '%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s'
handlers:
  file:
    class: logging.FileHandler
    formatter: precise
    filename: {dir}/homeserver.log
root:
  level: WARNING
  handlers: [file]
disable_existing_loggers: false
"""


@dataclass
class MatrixUser:
    user_id: str
    access_token: str


class Synapse:
    """One running homeserver: `.url`, `.register(name)`, `.api(method, path, token, body)`."""

    def __init__(self, python, folder):
        self.python = Path(python)
        self.dir = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.secret = os.urandom(16).hex()
        self.proc = None

    @property
    def log(self):
        return self.dir / "homeserver.log"

    def write_config(self):
        self.dir.mkdir(parents=True, exist_ok=True)
        values = dict(server_name=SERVER_NAME, dir=self.dir, port=self.port, secret=self.secret,
                      macaroon=os.urandom(16).hex(), form=os.urandom(16).hex())
        (self.dir / "homeserver.yaml").write_text(HOMESERVER_YAML.format(**values))
        (self.dir / "log.config").write_text(LOG_CONFIG.format(dir=self.dir))
        # Synapse's own format: "ed25519 <key id> <unpadded base64 seed>"; writing it
        # here saves a second Synapse start with --generate-keys.
        seed = base64.b64encode(os.urandom(32)).decode().rstrip("=")
        (self.dir / "signing.key").write_text(f"ed25519 a_test {seed}\n")

    def start(self, timeout=90):
        self.write_config()
        self.proc = subprocess.Popen(
            [str(self.python), "-m", "synapse.app.homeserver", "--config-path", str(self.dir / "homeserver.yaml")],
            stdout=open(self.dir / "stdout.txt", "ab"), stderr=subprocess.STDOUT, cwd=str(self.dir))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Synapse exited with code {self.proc.returncode}:\n"
                                   f"{(self.dir / 'stdout.txt').read_text()[-3000:]}\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/_matrix/client/versions", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Synapse did not answer on {self.url} within {timeout}s\n{self._log_tail()}")

    def _log_tail(self):
        return self.log.read_text()[-3000:] if self.log.exists() else ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, method, path, token=None, body=None, query=None):
        """One client-server API call; returns the decoded JSON (raises on HTTP errors)."""
        url = self.url + path + (("?" + urllib.parse.urlencode(query)) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return json.loads(reply.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{method} {path} -> {exc.code}: {exc.read()[:500]!r}") from None

    def register(self, localpart, admin=False):
        """Register a user through the shared-secret admin API; returns its id and token."""
        nonce = self.api("GET", "/_synapse/admin/v1/register")["nonce"]
        password = os.urandom(12).hex()
        mac = hmac.new(self.secret.encode(), digestmod=hashlib.sha1)
        mac.update(b"\x00".join(p.encode() for p in (nonce, localpart, password,
                                                     "admin" if admin else "notadmin")))
        mac_hex = mac.hexdigest()
        reply = self.api("POST", "/_synapse/admin/v1/register",
                         body={"nonce": nonce, "username": localpart, "password": password,
                               "admin": admin, "mac": mac_hex})
        return MatrixUser(reply["user_id"], reply["access_token"])

    # reading back what the head sent
    def joined_rooms(self, user):
        return self.api("GET", "/_matrix/client/v3/joined_rooms", user.access_token)["joined_rooms"]

    def invited_rooms(self, user):
        sync = self.api("GET", "/_matrix/client/v3/sync", user.access_token, query={"timeout": "0"})
        return sorted(sync.get("rooms", {}).get("invite", {}))

    def join(self, user, room_id):
        self.api("POST", f"/_matrix/client/v3/join/{urllib.parse.quote(room_id, safe='')}",
                 user.access_token, body={})

    def leave(self, user, room_id):
        self.api("POST", f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id, safe='')}/leave",
                 user.access_token, body={})

    def messages(self, user, room_id):
        """The room's m.room.message events, oldest first."""
        reply = self.api("GET", f"/_matrix/client/v3/rooms/{urllib.parse.quote(room_id, safe='')}/messages",
                         user.access_token, query={"dir": "b", "limit": "100"})
        events = [e for e in reply.get("chunk", []) if e.get("type") == "m.room.message"]
        return list(reversed(events))

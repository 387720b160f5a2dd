"""Issue 9: from zero to a lab — `service install`, `nodes --check`, `config`, shell
completion, and `report`'s timeline SVG (parsed, and rendered by a real headless Chromium)."""

import configparser
import json
import os
import pwd
import shutil
import signal
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cluster import DISTRIBUTE, NODE_PYTHON, HeadProcess, socket_answers, wait_until  # noqa: E402

import distribute  # noqa: E402

SVG = "{http://www.w3.org/2000/svg}"


def run(*args, env=None, cwd=None, timeout=120):
    return subprocess.run(DISTRIBUTE + [str(a) for a in args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture
def short_tmp(public_tmp):
    """A short folder (Unix socket paths are limited to 108 bytes), readable by all."""
    return public_tmp


# --- service install ------------------------------------------------------------

def systemd_words(line):
    """Split an ExecStart value the way systemd does for what `systemd_quote` writes:
    double-quoted words with \\\\ and \\" escapes, then %% -> % and $$ -> $."""
    words, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        assert line[i] == '"', f"unquoted word at {line[i:]!r}"
        i += 1
        word = ""
        while line[i] != '"':
            if line[i] == "\\":
                i += 1
                assert line[i] in '\\"', f"unexpected escape \\{line[i]}"
            word += line[i]
            i += 1
        i += 1
        assert "%" not in word.replace("%%", "") and "$" not in word.replace("$$", ""), word
        words.append(word.replace("%%", "%").replace("$$", "$"))
    return words


def read_unit(path):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(Path(path).read_text())
    return parser


def option_value(argv, name):
    return argv[argv.index(name) + 1]


SYSTEM_PYTHON = "/usr/bin/python3"       # what an admin has; the pyz brings the rest


def test_service_install_writes_a_unit_whose_command_serves(short_tmp, pyz, ssh_keys):   # ssh_keys: user dnode
    """The admin runs the pyz with the system's python3: the unit names absolute, systemd-quoted
    paths; systemd-analyze accepts it; its ExecStart, run for real as the unit's User=, brings
    up the head's socket."""
    program = short_tmp / "distribute.pyz"
    shutil.copy(pyz, program)
    os.chmod(program, 0o644)
    base = short_tmp / 'lab $HOME %h "q"'                 # every character systemd treats specially
    base.mkdir()
    os.chmod(base, 0o755)
    nodes_file = base / "distribute-nodes.yaml"
    # one node nobody answers for: the head runs and retries it, and starts nothing here
    nodes_file.write_text("nodes:\n  - {name: lab3, host: 127.0.0.1, port: 9, user: dnode}\n")
    os.chmod(nodes_file, 0o644)
    unit_path = short_tmp / "distribute.service"
    result = subprocess.run([SYSTEM_PYTHON, str(program), "service", "install", "--user", "dnode",
                             "--nodes", "distribute-nodes.yaml", "--state", "state", "--archive", str(base / "archive"),
                             "--output", str(unit_path)], cwd=str(base), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"wrote {unit_path}; to start the head now and at every boot:"
    assert [l.strip() for l in lines[1:]] == [f"cp {unit_path} /etc/systemd/system/distribute.service",
                                              "systemctl daemon-reload", "systemctl enable --now distribute",
                                              "journalctl -u distribute -f"]
    unit = read_unit(unit_path)
    service = unit["Service"]
    assert service["User"] == "dnode" and service["Restart"] == "on-failure"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    argv = systemd_words(service["ExecStart"])
    assert argv[:3] == [SYSTEM_PYTHON, str(program), "serve"]
    assert option_value(argv, "--nodes") == str(nodes_file)
    assert option_value(argv, "--state") == str(base / "state")
    assert option_value(argv, "--archive") == str(base / "archive")
    # the folders exist already, owned by the unit's user, who could not create them in base
    for folder in (base / "state", base / "archive"):
        assert folder.owner() == "dnode"

    verify = subprocess.run(["systemd-analyze", "verify", str(unit_path)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr

    account = pwd.getpwnam("dnode")
    env = {"PATH": "/usr/bin:/bin", "HOME": account.pw_dir, "USER": "dnode", "LOGNAME": "dnode",
           "PYTHONUNBUFFERED": "1"}                    # what systemd gives a User= service
    log = open(short_tmp / "head.log", "wb")
    head = subprocess.Popen(argv, cwd="/", env=env, user="dnode", stdout=log, stderr=log)
    try:
        wait_until(lambda: head.poll() is not None or socket_answers(base / "state" / "head.sock"), 20,
                   "the service's head to listen")
        assert head.poll() is None, (short_tmp / "head.log").read_text()
        status = subprocess.run(DISTRIBUTE + ["--head", "local", "--socket", str(base / "state" / "head.sock"),
                                              "nodes"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0 and status.stdout.startswith("lab3"), status.stderr
        assert (base / "state" / "head.sock").owner() == "dnode"
    finally:
        head.send_signal(signal.SIGTERM)                    # what `systemctl stop` sends
        assert head.wait(10) in (0, -signal.SIGTERM)        # a clean stop for systemd: no restart


def test_service_install_user_unit_and_refusals(short_tmp, pyz, ssh_keys):
    env = dict(os.environ, XDG_CONFIG_HOME=str(short_tmp / "config"), HOME=str(short_tmp))
    result = run("service", "install", "--user-unit", "--state", short_tmp / "st", env=env)
    assert result.returncode == 0, result.stderr
    unit_path = short_tmp / "config" / "systemd" / "user" / "distribute.service"
    assert result.stdout.splitlines()[1:4] == ["  systemctl --user daemon-reload",
                                               "  systemctl --user enable --now distribute",
                                               "  journalctl --user -u distribute -f"]
    unit = read_unit(unit_path)
    assert "User" not in unit["Service"] and unit["Install"]["WantedBy"] == "default.target"
    argv = systemd_words(unit["Service"]["ExecStart"])
    assert option_value(argv, "--archive") == str(short_tmp / "st" / "archive")
    runtime = short_tmp / "run"                             # the user manager's runtime dir
    runtime.mkdir(mode=0o700)
    verify = subprocess.run(["systemd-analyze", "verify", "--user", str(unit_path)],
                            env=dict(env, XDG_RUNTIME_DIR=str(runtime)), capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr

    for args, message in ((["--user", "no-such-user-x"], "no such user"),
                          (["--nodes", short_tmp / "missing.yaml"], "missing.yaml"),
                          (["--user-unit", "--user", "dnode"], "--user names the account")):
        bad = run("service", "install", "--output", short_tmp / "x.service", *args, env=env)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
    # not root, no --output: a one-line failure that says what to do
    program = short_tmp / "distribute.pyz"
    shutil.copy(pyz, program)
    os.chmod(program, 0o644)
    denied = subprocess.run([SYSTEM_PYTHON, str(program), "service", "install", "--state", str(short_tmp / "st")],
                            user="dnode", env=dict(env, HOME="/home/dnode"), capture_output=True, text=True,
                            timeout=120)
    assert denied.returncode == 1 and "permission denied" in denied.stderr and "--output" in denied.stderr


# --- nodes --check --------------------------------------------------------------

def node_entry(node, workdir, pause_dir, **extra):
    fields = {"name": node.name, "host": node.name, "user": "dnode", "python": NODE_PYTHON,
              "workdir": str(workdir), "pause_dir": str(pause_dir)}
    fields.update(extra)
    return "  - {" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in fields.items()) + "}\n"


def test_nodes_check_tells_what_each_node_lacks(ssh_nodes, short_tmp):
    home = ssh_nodes.head_home
    lab = short_tmp / "lab"                            # like /var/tmp: the node account may write there
    lab.mkdir()
    shutil.chown(lab, "dnode", "dnode")
    pause = lab / "pause"                              # created by the check itself, 1777
    good = "nodes:\n" + "".join(node_entry(n, lab / f"work-{n.name}", pause) for n in ssh_nodes)
    (short_tmp / "good.yaml").write_text(good)
    result = run("nodes", "--check", "--nodes", short_tmp / "good.yaml", env=home.env())
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    version = "%d.%d" % tuple(json.loads(subprocess.check_output(
        [NODE_PYTHON, "-c", "import sys, json; print(json.dumps(sys.version_info[:2]))"])))
    assert [l.split(" (")[0] for l in lines] == [f"{n.name}: ok" for n in ssh_nodes]
    assert all(f"(python {version}, " in l and " GiB free)" in l for l in lines), lines
    assert oct(pause.stat().st_mode & 0o7777) == "0o1777"
    assert all((lab / f"work-{n.name}").owner() == "dnode" for n in ssh_nodes)

    # every kind of problem at once
    root_owned = lab / "root-owned"
    root_owned.mkdir(mode=0o755)
    not_sticky = lab / "not-sticky"
    not_sticky.mkdir()
    os.chmod(not_sticky, 0o777)
    old_python = short_tmp / "python3.6"
    old_python.write_text("#!/bin/sh\necho 3.6\n")      # answers like an old interpreter
    os.chmod(old_python, 0o755)
    n1, n2, n3 = ssh_nodes
    broken = "nodes:\n" + "".join([
        node_entry(n1, lab / "w1", pause, python="/opt/nowhere/python3"),
        node_entry(n2, root_owned, pause, name="workdir-root"),
        node_entry(n2, root_owned / "sub", root_owned / "pause", name="cannot-create"),
        node_entry(n2, lab / "w2", not_sticky, name="pause-open"),
        node_entry(n2, lab / "w3", pause, name="old-python", python=str(old_python)),
        node_entry(n3, lab / "w4", pause, name="changed-key"),
        node_entry(n1, lab / "w5", pause, name="wrong-user", user="dalice"),
        "  - {name: gone, host: 127.0.0.1, port: 9, user: dnode}\n"])
    (short_tmp / "broken.yaml").write_text(broken)
    # node3 now shows another key than the one the head trusts (as after a reinstall, or an attack)
    known = home.known_hosts.read_text().replace(n3.public_key(), n1.public_key())
    home.known_hosts.write_text(known)
    result = run("nodes", "--check", "--nodes", short_tmp / "broken.yaml", env=home.env())
    assert result.returncode == 1, result.stdout + result.stderr
    assert "8 of 8 nodes need attention" in result.stderr and "Traceback" not in result.stderr
    by_node = dict(line.split(": ", 1) for line in result.stdout.splitlines())
    assert by_node["node1"] == "/opt/nowhere/python3 not found"
    assert by_node["workdir-root"] == f"workdir {root_owned} not writable by dnode"
    assert by_node["cannot-create"] == (f"workdir {root_owned / 'sub'} cannot be created by dnode; "
                                       f"pause dir {root_owned / 'pause'} cannot be created by dnode")
    assert by_node["pause-open"].startswith(f"pause dir {not_sticky} has mode 0777: workstation users cannot")
    assert by_node["old-python"].startswith(f"{old_python} is 3.6: too old (need 3.8 or newer")
    assert by_node["changed-key"].startswith("host key of node3 not verified")
    assert "`ssh dnode@node3`" in by_node["changed-key"]
    assert by_node["wrong-user"].startswith("SSH login to node1 refused")
    assert by_node["gone"].startswith("unreachable: cannot reach 127.0.0.1")

    # free disk below the limit
    result = run("nodes", "--check", "--nodes", short_tmp / "good.yaml", "--min-free", "100000T", env=home.env())
    assert result.returncode == 1
    assert all("free under" in l and "(below 100000.0 TiB)" in l for l in result.stdout.splitlines()[:2])
    missing = run("nodes", "--check", "--nodes", short_tmp / "nope.yaml", env=home.env())
    assert missing.returncode == 2 and "nope.yaml" in missing.stderr
    bad_size = run("nodes", "--check", "--nodes", short_tmp / "good.yaml", "--min-free", "lots", env=home.env())
    assert bad_size.returncode == 2 and "'lots'" in bad_size.stderr


# --- config and completion ------------------------------------------------------

def test_config_gives_the_default_head(short_tmp):
    env = dict(os.environ, XDG_CONFIG_HOME=str(short_tmp / "xdg"))
    env.pop("DISTRIBUTE_HEAD", None)
    env.pop("DISTRIBUTE_SOCKET", None)
    path = short_tmp / "xdg" / "distribute" / "config.yaml"
    assert run("config", env=env).stdout.strip() == f"{path}: (no defaults stored)"
    stored = run("config", "--head", "dnode@127.0.0.1:9", "--socket", "/srv/d/head.sock", env=env)
    assert stored.returncode == 0 and stored.stdout.strip() == f"wrote {path}"
    assert "head: dnode@127.0.0.1:9" in path.read_text()
    # without --head, commands go to the stored head (port 9: nobody answers, which proves where they went)
    status = run("status", env=env)
    assert status.returncode == 1 and "127.0.0.1" in status.stderr, status.stderr
    # $DISTRIBUTE_HEAD and --head win over the file
    env_wins = run("status", env=dict(env, DISTRIBUTE_HEAD="local", DISTRIBUTE_SOCKET=str(short_tmp / "no.sock")))
    assert env_wins.returncode == 1 and "no.sock" in env_wins.stderr and "127.0.0.1" not in env_wins.stderr
    flag_wins = run("--head", "local", "--socket", short_tmp / "no.sock", "status", env=env)
    assert "no.sock" in flag_wins.stderr
    assert run("config", "--head", "not a host", env=env).returncode == 2
    assert run("config", "--socket", "relative.sock", env=env).returncode == 2
    # a broken file: one line naming it; commands without a head still work; `config` repairs it
    path.write_text("head: [unclosed\n")
    broken = run("status", env=env)
    assert broken.returncode == 2 and str(path) in broken.stderr and "Traceback" not in broken.stderr
    assert run("template", "shell", "-o", short_tmp / "t" / "jobs.yaml", env=env).returncode == 0
    assert run("config", "--head", "local", env=env).returncode == 0
    assert run("config", "--unset", "head", env=env).returncode == 0
    assert "head:" not in path.read_text()


def test_shell_completion(short_tmp):
    for shell in ("bash", "zsh", "fish"):
        script = run("completion", shell)
        assert script.returncode == 0 and "_DISTRIBUTE_COMPLETE" in script.stdout, (shell, script.stderr)
    # click's protocol, as the bash script speaks it
    env = dict(os.environ, COMP_WORDS="distribute sta", COMP_CWORD="1", _DISTRIBUTE_COMPLETE="bash_complete")
    assert run(env=env).stdout.split() == ["plain,status"]
    env.update(COMP_WORDS="distribute nodes --ch", COMP_CWORD="2")
    assert "plain,--check" in run(env=env).stdout.split()
    # and the real thing: bash sources the script and completes through a `distribute` on PATH
    bindir = short_tmp / "bin"
    bindir.mkdir()
    wrapper = bindir / "distribute"
    wrapper.write_text(f"#!/bin/sh\nexec {' '.join(DISTRIBUTE)} \"$@\"\n")
    os.chmod(wrapper, 0o755)
    shell = ('source <(distribute completion bash); COMP_WORDS=(distribute sta); COMP_CWORD=1; '
             '_distribute_completion distribute sta distribute; printf "%s\\n" "${COMPREPLY[@]}"')
    done = subprocess.run(["bash", "-c", shell], env=dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}"),
                          capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["status"], done.stderr


# --- report ---------------------------------------------------------------------

REPORT_JOBS = """\
meta:
  batch_name: timeline
  namespace: lab
shell:
  initialize:
    build: "sleep 0.3; echo built"
  jobs:
{jobs}
"""


def png_pixels(path):
    """(width, height, set of RGB colours) of an 8-bit RGB/RGBA PNG, decoded with zlib alone."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks, header = 8, [], None
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + size]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            chunks.append(body)
        pos += 12 + size
    width, height, depth, colour_type = header[:4]
    assert depth == 8 and colour_type in (2, 6), header
    channels = 3 if colour_type == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * channels
    previous = bytearray(stride)
    colours = set()
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            left = line[i - channels] if i >= channels else 0
            up, corner = previous[i], previous[i - channels] if i >= channels else 0
            if kind == 1:
                line[i] = (line[i] + left) & 255
            elif kind == 2:
                line[i] = (line[i] + up) & 255
            elif kind == 3:
                line[i] = (line[i] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
                line[i] = (line[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else corner)) & 255
        colours.update(bytes(line[i:i + 3]) for i in range(0, stride, channels))
        previous = line
    return width, height, colours


def rgb(hex_colour):
    return bytes.fromhex(hex_colour.lstrip("#"))


def test_report_draws_the_batch_timeline(short_tmp):
    """A real batch on a head with two local nodes (one paused for a while): the SVG has a row
    per node used, a bar per attempt in its outcome's colour, build bars and a hatched pause;
    headless Chromium displays it."""
    pause_dir, other_pause_dir = short_tmp / "pause", short_tmp / "pause1"
    for folder in (pause_dir, other_pause_dir):
        folder.mkdir()
        os.chmod(folder, 0o1777)
    nodes = (f"nodes:\n  - {{name: local1, host: local, slots: 2, workdir: {short_tmp / 'n1'}, "
             f"pause_dir: {other_pause_dir}}}\n"
             f"  - {{name: local2, host: local, workdir: {short_tmp / 'n2'}, pause_dir: {pause_dir}}}\n")
    head = HeadProcess(None, nodes, dict(os.environ), extra=["--supervisor-idle", "3"])
    gate = short_tmp / "gate"                     # the ok jobs wait for it: the test sets the pace
    jobs = [f"    - {{name: ok{i}, command: 'while [ ! -e {gate} ]; do sleep 0.05; done; sleep 0.5'}}"
            for i in range(6)]
    jobs += ["    - {name: bad, command: 'sleep 0.2; exit 3'}",
             "    - {name: flaky, command: 'sleep 0.2; exit 4', retries: 1}"]
    batch_dir = short_tmp / "batch"
    batch_dir.mkdir()
    (batch_dir / "distribute-jobs.yaml").write_text(REPORT_JOBS.format(jobs="\n".join(jobs)))
    pause_env = dict(os.environ, DISTRIBUTE_PAUSE_DIR=str(pause_dir))
    other_pause_env = dict(os.environ, DISTRIBUTE_PAUSE_DIR=str(other_pause_dir))

    def paused_nodes():
        return {n["name"] for n in head.nodes() if n["paused"]}
    head.start()
    try:
        wait_until(lambda: sum(n["reachable"] for n in head.nodes()) == 2, 60, "both local nodes up")
        assert run("pause", "--detach", "--duration", "5m", env=pause_env).returncode == 0
        wait_until(lambda: paused_nodes() == {"local2"}, 20, "the head to see local2 paused")
        head.cli("add", batch_dir / "distribute-jobs.yaml")
        wait_until(lambda: [r["node"] for r in head.status()["running"]] == ["local1", "local1"], 60,
                   "two jobs running on local1")
        # hand over: local1 pauses (its running jobs freeze), local2 resumes and must take the rest
        assert run("pause", "--detach", "--duration", "5m", env=other_pause_env).returncode == 0
        wait_until(lambda: "local1" in paused_nodes(), 20, "the head to see local1 paused")
        assert run("resume", env=pause_env).returncode == 0
        wait_until(lambda: any(r["node"] == "local2" for r in head.status()["running"]), 60, "a job on local2")
        assert run("resume", env=other_pause_env).returncode == 0
        gate.touch()
        finished = head.wait_batch("lab/timeline", timeout=120)
        assert finished["jobs"] == {"queued": 0, "running": 0, "done": 6, "failed": 2, "killed": 0}
        status_line = head.cli("status", "--all").stdout.splitlines()[0]
        assert "lab/timeline" in status_line and "[" in status_line and "6 done" in status_line
        svg_path = short_tmp / "timeline.svg"
        out = head.cli("report", "timeline", "-o", svg_path)
        assert out.stdout.startswith(f"wrote {svg_path}: 9 job attempts")
        unknown = head.cli("report", "no-such-batch", check=False)
        assert unknown.returncode == 2 and "no-such-batch" in unknown.stderr and "Traceback" not in unknown.stderr
    finally:
        head.stop()
        shutil.move(str(head.dir), str(short_tmp / "head"))   # removed with short_tmp
    archive = short_tmp / "head" / "archive" / "lab" / "timeline"
    records = {p.parent.name: json.loads(p.read_text()) for p in archive.glob("*/job.json")}
    assert len(records) == 8 and records["flaky"]["attempts"] == 2 and records["bad"]["attempts"] == 1
    used = {r["node"] for r in records.values()} | {p.stem for p in (archive / "build").glob("*.txt")}
    assert used == {"local1", "local2"}

    root = ET.parse(svg_path).getroot()
    assert root.tag == f"{SVG}svg"
    rows = root.findall(f"{SVG}g[@class='row']")
    assert sorted(r.get("data-node") for r in rows) == sorted(used)
    attempts = root.findall(f".//{SVG}rect[@class='attempt']")
    assert len(attempts) == sum(r["attempts"] for r in records.values()) == 9
    colours = distribute.OUTCOME_COLOURS
    for bar in attempts:
        assert bar.get("fill") == colours[bar.get("data-state")]
        assert bar.find(f"{SVG}title").text.startswith(bar.get("data-job") + " (attempt ")
    outcome = {job: "ok" if r["state"] == "ok" else r["state"] for job, r in records.items()}
    for job, state in outcome.items():
        bars = [b for b in attempts if b.get("data-job") == job]
        assert bars[-1].get("data-state") == state, job
    assert [b.get("data-state") for b in attempts if b.get("data-job") == "flaky"] == ["failed", "failed"]
    for job, record in records.items():                    # the last attempt is in its node's row
        row = next(r for r in rows if r.get("data-node") == record["node"])
        assert row.findall(f"{SVG}rect[@data-job='{job}']")[-1].get("data-state") == outcome[job]
    builds = root.findall(f".//{SVG}rect[@class='build']")
    assert len(builds) == len(list((archive / "build").glob("*.txt"))) >= 1
    assert all(b.get("fill") == "url(#build-stripes)" for b in builds)
    pauses = [r for r in rows if r.findall(f"{SVG}rect[@class='pause']")]
    assert sorted(r.get("data-node") for r in pauses) == ["local1", "local2"]
    assert root.find(f".//{SVG}pattern[@id='pause-hatch']") is not None

    chromium = shutil.which("chromium")
    assert chromium, "chromium is needed to render the timeline (apt-get install chromium)"
    png = short_tmp / "timeline.png"
    profile = short_tmp / "chromium-profile"
    shot = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={profile}", f"--screenshot={png}", "--window-size=1200,600",
                           svg_path.as_uri()], capture_output=True, text=True, timeout=120)
    assert png.exists(), shot.stderr
    width, height, seen = png_pixels(png)
    assert (width, height) == (1200, 600)
    for state in ("ok", "failed"):
        assert rgb(colours[state]) in seen, f"no {state} bar drawn"
    assert len(seen) > 20                                   # text, bars, stripes: not a blank page
    shutil.copy(png, "/tmp/distribute-timeline-last.png")   # to look at by hand


def test_timeline_svg_escapes_text():
    """Names reach the SVG as text and attributes: markup in them stays text."""
    now = time.time()
    report = {"batch": "lab/<b>&'\"", "owner": "o<wner>", "state": "done", "created": now - 10, "finished": now,
              "now": now, "nodes": ["n<1>"], "counts": {"done": 1},
              "jobs": [{"job": "j</title><script>x</script>", "node": "n<1>", "attempt": 1, "start": now - 9,
                        "end": now - 1, "state": "ok", "exit_code": 0}],
              "builds": [{"node": "n<1>", "start": now - 10, "end": now - 9, "state": "ok"}],
              "pauses": [{"node": "n<1>", "start": now - 5, "end": None, "users": ["a&b"]}]}
    root = ET.fromstring(distribute.timeline_svg(report).split("\n", 1)[1])
    assert root.find(f"{SVG}g[@class='row']").get("data-node") == "n<1>"
    bar = root.find(f".//{SVG}rect[@class='attempt']")
    assert bar.get("data-job") == "j</title><script>x</script>"
    assert bar.find(f"{SVG}title").text.startswith("j</title><script>x</script> (attempt 1) on n<1>: ok")
    assert root.find(f".//{SVG}script") is None
    assert "paused by a&b" in root.find(f".//{SVG}rect[@class='pause']/{SVG}title").text

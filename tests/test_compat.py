"""Coming from the original distribute (issue 17): its nodes files and command spellings,
the docker/podman flavours, `install`, `forget`/`du`, and messages that say what to do next."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import distribute  # noqa: E402
from cluster import DISTRIBUTE, HeadProcess, wait_until  # noqa: E402


def cli(*args, cwd=None, env=None, timeout=120):
    return subprocess.run(DISTRIBUTE + [str(a) for a in args], cwd=cwd, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


# --- the original's nodes files --------------------------------------------------

# The shape of the original tool's distribute-nodes.yaml: `ip`, a name (optional there),
# capabilities, and the TCP ports its own protocol used.
ORIGINAL_NODES = """\
# nodes of the original distribute
nodes:
  - ip: "127.0.0.9"
    name: lab1
    capabilities: [gfortran, fftw, gpu, apptainer, python3]
    transport_port: 8953
    keepalive_port: 8954
    cancel_port: 8955
  - ip: "127.0.0.10"
    capabilities:
      [gcc, python3, openfoam]
"""


def test_original_nodes_file_loads_unchanged(tmp_path):
    path = tmp_path / "distribute-nodes.yaml"
    path.write_text(ORIGINAL_NODES)
    nodes = distribute.load_nodes_file(str(path))
    assert [(n.name, n.host, n.port) for n in nodes] == [("lab1", "127.0.0.9", None),
                                                         ("127.0.0.10", "127.0.0.10", None)]
    assert nodes[0].capabilities == ["gfortran", "fftw", "gpu", "apptainer", "python3"]
    assert distribute.original_ports_note(nodes).startswith(
        "note: transport_port, keepalive_port, cancel_port in the nodes file are ignored")
    # no port keys: no note
    path.write_text("nodes:\n  - {ip: 10.0.0.1, capabilities: []}\n")
    assert distribute.original_ports_note(distribute.load_nodes_file(str(path))) is None


@pytest.mark.parametrize("text, message", [
    ("nodes:\n  - {ip: 10.0.0.1, host: a}\n", "nodes[0].ip: give either host or ip"),
    ("nodes:\n  - {ip: 10.0.0.1, cancel_port: 70000}\n", "nodes[0].cancel_port: must be at most 65535"),
    ("nodes:\n  - {ip: 10.0.0.1, keepalive_port: x}\n", "nodes[0].keepalive_port: expected a whole number"),
    ("nodes:\n  - {name: a}\n", "nodes[0]: missing required key 'host'"),
])
def test_original_nodes_file_mistakes_are_one_line(tmp_path, text, message):
    path = tmp_path / "n.yaml"
    path.write_text(text)
    with pytest.raises(distribute.UserError) as caught:
        distribute.load_nodes_file(str(path))
    assert message in str(caught.value)


def test_nodes_check_and_serve_note_the_ignored_ports_once(tmp_path):
    path = tmp_path / "distribute-nodes.yaml"
    path.write_text(ORIGINAL_NODES)
    checked = cli("nodes", "--check", "--nodes", path, "--min-free", "1K")
    notes = [l for l in checked.stdout.splitlines() if l.startswith("note:")]
    assert notes == ["note: transport_port, keepalive_port, cancel_port in the nodes file are ignored: the head "
                     "reaches every node over SSH (port 22, or the node's `port:`), so no other port needs to "
                     "be open"]
    assert "lab1: unreachable" in checked.stdout           # checked under the name it was given
    head = HeadProcess(None, ORIGINAL_NODES, dict(os.environ)).start()
    try:
        wait_until(lambda: "ignored" in head.log.read_text(), 10, "the note in the head's log")
        assert head.log.read_text().count("keepalive_port") == 1
        assert [n["host"] for n in head.nodes()] == ["127.0.0.9", "127.0.0.10"]
    finally:
        head.stop()


# --- the original's command spellings ----------------------------------------------

@pytest.mark.parametrize("argv, expected, note", [
    (["server-status", "--ip", "10.1.2.3"], ["--head", "10.1.2.3", "status"], "`server-status` is `distribute status`"),
    (["server-status", "--ip=lab", "-p", "8952"], ["--head", "lab", "status"], "`--ip lab` is `--head lab`"),
    (["node-status"], ["nodes"], "`node-status` is `distribute nodes` here"),
    (["node-status", "--nodes-file", "n.yaml"], ["nodes", "--check", "--nodes", "n.yaml"], "node-status"),
    (["add", "--ip", "10.1.2.3", "--port", "8952", "jobs.yaml"], ["--head", "10.1.2.3", "add", "jobs.yaml"], "--ip"),
    (["kill", "--ip", "h", "sweep"], ["--head", "h", "kill", "sweep"], "--ip"),
    (["pull", "jobs.yaml", "--ip", "h", "include", "-i", "case1", "--include", "csv"],
     ["--head", "h", "pull", "jobs.yaml", "--filter", "case1", "--filter", "csv"], "`pull --filter RE`"),
    (["pull", "exclude", "-e", "vtk", "--exclude=case3"], ["pull", "--exclude", "vtk", "--exclude=case3"], "exclude"),
    (["--head", "local", "status"], ["--head", "local", "status"], None),
    (["template", "--output", "F.yaml", "python"], ["template", "--output", "F.yaml", "python"], None),
])
def test_original_spellings_become_ours(argv, expected, note):
    rewritten, notes = distribute.original_spelling(argv)
    assert rewritten == expected
    if note is None:
        assert notes == []
    else:
        assert len(notes) >= 1 and note in "; ".join(notes)


@pytest.mark.parametrize("command, ours", [("server", "distribute serve --nodes"), ("client", "nodes file")])
def test_original_commands_without_a_counterpart_name_ours(command, ours, tmp_path):
    result = cli(command, "--nodes-file", "x.yaml", cwd=tmp_path)
    assert result.returncode == 2
    assert ours in one_line(result.stderr) and f"`{command}` is the original distribute's" in result.stderr


def test_template_with_the_originals_argument_order(tmp_path):
    result = cli("template", "--output", "mine.yaml", "python", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert cli("check", "mine.yaml", cwd=tmp_path).returncode == 0


@pytest.fixture(scope="module")
def local_head():
    """`distribute serve` with this machine as its one node (no SSH)."""
    head = HeadProcess(None, None, dict(os.environ), extra=["--kill-grace", "1"]).start()
    try:
        yield head
    finally:
        head.stop()
        import shutil
        shutil.rmtree(head.dir, ignore_errors=True)


_names = iter(range(10 ** 6))


def finished_batch(head, folder, jobs=2, command="echo hi > distribute_save/out.txt", namespace="lab"):
    name = f"b{next(_names)}"
    folder = Path(folder) / name
    folder.mkdir(parents=True)
    (folder / "distribute-jobs.yaml").write_text(
        f"meta: {{batch_name: {name}, namespace: {namespace}}}\nshell:\n  jobs:\n"
        + "".join(f"    - {{name: j{i}, command: '{command}'}}\n" for i in range(jobs)))
    head.cli("add", folder / "distribute-jobs.yaml")
    return folder / "distribute-jobs.yaml", f"{namespace}/{name}"


def test_original_spellings_work_against_a_head(local_head, tmp_path):
    jobs, key = finished_batch(local_head, tmp_path, jobs=2)
    local_head.wait_batch(key)
    target = ["--head", "local", "--socket", local_head.socket]
    status = cli(*target, "server-status")
    assert status.returncode == 0, status.stderr
    assert key in status.stdout
    assert one_line(status.stderr) == "distribute: note: `server-status` is `distribute status` here"
    nodes = cli(*target, "node-status")
    assert nodes.returncode == 0 and "local" in nodes.stdout
    save = tmp_path / "pulled"
    pulled = cli(*target, "pull", jobs, "--save-dir", save, "include", "-i", "j1/")
    assert pulled.returncode == 0, pulled.stderr
    namespace, name = key.split("/")
    assert sorted(p.name for p in (save / namespace / name).iterdir()) == ["j1"]
    pulled = cli(*target, "pull", jobs, "--save-dir", save, "exclude", "-e", "stdout", "-e", "job.json")
    assert pulled.returncode == 0, pulled.stderr
    assert (save / namespace / name / "j0" / "out.txt").exists()
    assert not (save / namespace / name / "j0" / "stdout.txt").exists()

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
    head = HeadProcess(None, None, dict(os.environ), extra=["--kill-grace", "1", "--group", "distribute"]).start()
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


# --- docker and podman flavours ------------------------------------------------------
# No container engine is installed here: a stand-in `docker`/`podman` first on PATH records
# its argv, answers `version` as told, and for `run` does what a container would: writes into
# the host folder bound at /distribute_save and lists the one bound at /input.

STAND_IN_ENGINE = """\
#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open({record!r}, "a") as out:
    out.write(json.dumps([os.path.basename(sys.argv[0])] + args) + "\\n")
if args[:1] == ["version"]:
    if {version_sleep}:
        time.sleep({version_sleep})
    sys.exit({version_code})
if args[:1] == ["load"]:
    assert os.path.isfile(args[2]), args
    print("Loaded image: from the archive")
elif args[:1] == ["pull"]:
    print("pulled", args[1])
elif args[:1] == ["run"]:
    volumes = dict(reversed(args[i + 1].rsplit(":", 2)[:2]) for i, a in enumerate(args) if a == "--volume")
    save, given = volumes["/distribute_save"], sorted(os.listdir(volumes["/input"]))
    with open(os.path.join(save, "from_container.txt"), "w") as out:
        out.write(" ".join(given) + " job=" + os.environ["DISTRIBUTE_JOB"])
    print("container ran with", args[-1], "cpus as", args[args.index("--user") + 1])
"""


def stand_in_engines(folder, record, codes=None, sleeps=None):
    """bin/docker and bin/podman stand-ins in folder; `codes` {engine: exit code of `version`}."""
    codes, sleeps = codes or {}, sleeps or {}
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for engine in ("docker", "podman"):
        path = bin_dir / engine
        path.write_text(STAND_IN_ENGINE.format(python=sys.executable, record=str(record),
                                               version_code=codes.get(engine, 0),
                                               version_sleep=sleeps.get(engine, 0)))
        path.chmod(0o755)
    return bin_dir


def calls(record):
    return [json.loads(line) for line in Path(record).read_text().splitlines()] if Path(record).exists() else []


def image_archive(path, tags=("localhost/solver:1.2",), config="0123abcd" * 8 + ".json", gz=False):
    """A tiny stand-in for `docker save`'s output: the manifest.json the loader reads."""
    import io
    import tarfile
    data = json.dumps([{"Config": config, "RepoTags": list(tags) or None, "Layers": []}]).encode()
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


def container_batch(folder, engine, image, name="boxes", mounts="[/scratch]"):
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in (("settings.json", "{}"), ("a.json", "1"), ("b.json", "2")):
        (folder / file).write_text(text)
    (folder / "distribute-jobs.yaml").write_text(textwrap.dedent(f"""\
        meta:
          batch_name: {name}
          namespace: carol
        {engine}:
          initialize:
            image: {image}
            required_files: [settings.json]
            required_mounts: {mounts}
          jobs:
            - name: a
              required_files: [{{path: a.json, alias: case.json}}]
            - name: b
              required_files: [{{path: b.json, alias: case.json}}]
        """))
    return folder / "distribute-jobs.yaml"


def expected_run(engine, root, image, cpus, uid, gid, mounts=("/scratch",)):
    user = ["--userns=keep-id", "--user", f"{uid}:{gid}"] if engine == "podman" and uid else ["--user", f"{uid}:{gid}"]
    argv = [engine, "run", "--rm", "--init"] + user
    for name in ("DISTRIBUTE_JOB", "DISTRIBUTE_BATCH", "DISTRIBUTE_NAMESPACE", "DISTRIBUTE_CPUS"):
        argv += ["--env", name]
    argv += ["--volume", f"{root}/distribute_save:/distribute_save:rw", "--volume", f"{root}/input:/input:rw"]
    for index, mount in enumerate(mounts):
        argv += ["--volume", f"{root}/mounts/{index}:{mount}:rw"]
    return argv + [image, str(cpus)]


def run_root(argv):
    """The build directory a recorded `run` used (from its /distribute_save volume)."""
    volume = argv[argv.index("--volume") + 1]
    return os.path.dirname(volume.split(":")[0])


def test_docker_batch_runs_locally_with_the_exact_command_lines(tmp_path):
    record = tmp_path / "calls.jsonl"
    bin_dir = stand_in_engines(tmp_path, record)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    jobs = container_batch(tmp_path / "batch", "docker", "docker.io/carol/solver:2.1")
    save = tmp_path / "results"
    result = cli("run", jobs, "--save-dir", save, env=env)
    assert result.returncode == 0, result.stderr
    made = calls(record)
    assert made[0] == ["docker", "pull", "docker.io/carol/solver:2.1"]      # once, as the build
    cpus = os.cpu_count()
    assert len(made) == 3
    for argv, job in zip(made[1:], ("a", "b")):
        root = run_root(argv)
        assert root.endswith("carol/boxes")
        assert argv == expected_run("docker", root, "docker.io/carol/solver:2.1", cpus, os.getuid(), os.getgid())
        archived = save / "carol" / "boxes" / job
        assert (archived / "from_container.txt").read_text() == f"case.json settings.json job={job}"
        assert (archived / "stdout.txt").read_text() == f"container ran with {cpus} cpus as {os.getuid()}:{os.getgid()}\n"
    assert "pulled docker.io/carol/solver:2.1" in (save / "carol" / "boxes" / "build").iterdir().__next__().read_text()


def test_podman_batch_with_an_image_archive_loads_it_and_runs_the_tag(tmp_path):
    record = tmp_path / "calls.jsonl"
    bin_dir = stand_in_engines(tmp_path, record)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / "batch"
    folder.mkdir()
    image_archive(folder / "solver.tar.gz", gz=True)
    jobs = container_batch(folder, "podman", "solver.tar.gz", mounts="[]")
    result = cli("run", jobs, "--save-dir", tmp_path / "results", env=env)
    assert result.returncode == 0, result.stderr
    made = calls(record)
    assert made[0] == ["podman", "load", "--input", "solver.tar.gz"]
    assert made[1] == expected_run("podman", run_root(made[1]), "localhost/solver:1.2", os.cpu_count(),
                                   os.getuid(), os.getgid(), mounts=())
    # an untagged archive runs by its image id
    untagged = image_archive(tmp_path / "untagged.tar", tags=(), config="blobs/sha256/" + "ab" * 32)
    batch_file = container_batch(tmp_path / "other", "docker", untagged)
    assert distribute.load_job_file(str(batch_file)).image == "sha256:" + "ab" * 32


def test_podman_runs_rootless_as_the_node_account():
    assert distribute.container_user_args("podman", 1001, 1002) == ["--userns=keep-id", "--user", "1001:1002"]
    assert distribute.container_user_args("podman", 0, 0) == ["--user", "0:0"]
    assert distribute.container_user_args("docker", 1001, 1002) == ["--user", "1001:1002"]


@pytest.mark.parametrize("image, message", [
    ("~", "missing required key 'image'"),
    ("'Not A Ref'", "is neither an image reference"),
    ("-v/:/host", "is neither an image reference"),
    ("missing.tar", "file 'missing.tar' does not exist"),
    ("notimage.tar", "is not an image archive"),
    ("nomanifest.tar", "has no docker manifest.json"),
])
def test_container_image_mistakes(tmp_path, image, message):
    import tarfile
    (tmp_path / "notimage.tar").write_text("plain text")
    with tarfile.open(tmp_path / "nomanifest.tar", "w"):
        pass
    jobs = container_batch(tmp_path, "docker", image)
    result = cli("check", jobs)
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert message in line and "initialize.image" in line or message in line and "initialize" in line


def test_engine_capability_only_when_the_engine_answers(tmp_path, monkeypatch):
    bin_dir = stand_in_engines(tmp_path, tmp_path / "calls.jsonl", codes={"podman": 125}, sleeps={"docker": 30})
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    assert not distribute.engine_answers("podman")                 # on PATH, but `podman version` fails
    assert not distribute.engine_answers("docker", timeout=0.5)    # on PATH, but hangs
    bin_dir = stand_in_engines(tmp_path / "ok", tmp_path / "calls.jsonl")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    caps = distribute.probe_machine()["capabilities"]
    assert "docker" in caps and "podman" in caps


def test_docker_batch_through_a_head(tmp_path):
    """A head whose node has a working docker and a podman that does not answer: docker
    batches run there with the exact command line, podman batches are refused at add."""
    record = tmp_path / "calls.jsonl"
    bin_dir = stand_in_engines(tmp_path, record, codes={"podman": 1})
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    head = HeadProcess(None, None, env).start()
    try:
        wait_until(lambda: head.nodes()[0]["reachable"], 30, "the local node")
        caps = head.nodes()[0]["capabilities"]
        assert "docker" in caps and "podman" not in caps
        folder = tmp_path / "batch"
        folder.mkdir()
        image_archive(folder / "solver.tar")
        head.cli("add", container_batch(folder, "docker", "solver.tar"))
        batch = head.wait_batch("carol/boxes")
        assert batch["jobs"]["done"] == 2, head.log.read_text()[-2000:]
        made = [c for c in calls(record) if c[1] != "version"]
        assert made[0] == ["docker", "load", "--input", "solver.tar"]
        cpus = os.cpu_count()
        for argv in made[1:]:
            assert argv == expected_run("docker", run_root(argv), "localhost/solver:1.2", cpus,
                                        os.getuid(), os.getgid())
        for job in ("a", "b"):
            assert (head.archive / "carol" / "boxes" / job / "from_container.txt").read_text() == \
                f"case.json settings.json job={job}"
        refused = head.cli("add", container_batch(tmp_path / "p", "podman", "docker.io/x/y:1", name="pods"),
                           check=False)
        assert refused.returncode == 2 and "no node offers podman" in one_line(refused.stderr)
    finally:
        head.stop()
        import shutil
        shutil.rmtree(head.dir, ignore_errors=True)


def test_slurm_runs_registry_images_with_apptainer_and_refuses_archives(tmp_path):
    jobs = container_batch(tmp_path / "batch", "docker", "docker.io/carol/solver:2.1")
    result = cli("slurm", jobs, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    script = (tmp_path / "out" / "run-task.sh").read_text()
    assert ('exec $setsid apptainer run --bind "$task/distribute_save:/distribute_save:rw,$task/input:/input:rw,'
            '$task/mounts/0:"/scratch":rw" docker://docker.io/carol/solver:2.1 "$cpus"') in script
    assert not (tmp_path / "out" / "build.sbatch").exists()
    # the task script, run as sbatch would, with a stand-in apptainer that records its argv
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$ARGV_FILE\"\n"
        "save=$(echo \"$3\" | cut -d, -f1 | cut -d: -f1)\nls \"$(echo \"$3\" | cut -d, -f2 | cut -d: -f1)\" "
        "> \"$save/inputs.txt\"\n")
    (bin_dir / "apptainer").chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(out),
               SLURM_ARRAY_TASK_ID="0", SLURM_JOB_ID="7", SLURMD_NODENAME="n1", SLURM_CPUS_PER_TASK="3",
               ARGV_FILE=str(tmp_path / "argv.txt"))
    task = subprocess.run(["sh", str(out / "run-task.sh"), "tasks/array-1.txt"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert task.returncode == 0, task.stderr
    work = out / "work" / "a"
    assert (tmp_path / "argv.txt").read_text().splitlines() == [
        "run", "--bind", f"{work}/distribute_save:/distribute_save:rw,{work}/input:/input:rw,"
        f"{work}/mounts/0:/scratch:rw", "docker://docker.io/carol/solver:2.1", "3"]
    assert (out / "results" / "carol" / "boxes" / "a" / "inputs.txt").read_text().split() == ["case.json",
                                                                                            "settings.json"]
    folder = tmp_path / "archived"
    folder.mkdir()
    image_archive(folder / "solver.tar")
    result = cli("slurm", container_batch(folder, "podman", "solver.tar"), tmp_path / "out2")
    assert result.returncode == 2
    assert "apptainer build image.sif docker-archive:solver.tar" in one_line(result.stderr)
    assert not (tmp_path / "out2").exists()


# --- forget and du ---------------------------------------------------------------------

def test_du_and_forget_an_ended_batch(local_head, tmp_path):
    big_jobs, big = finished_batch(local_head, tmp_path, jobs=3, command="head -c 300000 /dev/zero > distribute_save/f")
    _, small = finished_batch(local_head, tmp_path, jobs=1, namespace="other")
    local_head.wait_batch(big)
    local_head.wait_batch(small)
    usage = json.loads(local_head.cli("du", "--json").stdout)
    assert usage["archive"] == str(local_head.archive)
    namespaces = {n["namespace"]: n for n in usage["namespaces"]}
    entry = next(b for b in namespaces["lab"]["batches"] if b["batch"] == big)
    assert entry["bytes"] >= 900000 and entry["files"] == 10 and entry["owner"] == "root" and entry["state"] == "done"
    assert usage["bytes"] == sum(n["bytes"] for n in usage["namespaces"])
    text = local_head.cli("du").stdout
    assert f"    {big}  (10 files; root, done)" in text and "in total" in text.splitlines()[-1]
    # asks first; no answer keeps everything
    kept = local_head.cli("forget", big, check=False)
    assert kept.returncode == 2 and "not confirmed" in kept.stderr.splitlines()[-1]
    assert "forget " + big + ": delete its 3 jobs' records and its archive (10 files, " in kept.stderr
    assert (local_head.archive / big).is_dir()
    answered = subprocess.run(DISTRIBUTE + ["--head", "local", "--socket", str(local_head.socket), "forget", big],
                              input="y\n", capture_output=True, text=True, timeout=60)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.startswith(f"forgot {big}: 10 files, ")
    assert not (local_head.archive / big).exists()
    assert local_head.batch(big) is None
    assert big not in local_head.cli("du").stdout
    # gone for pull too, which points to status; and the name can be used again
    pulled = local_head.cli("pull", "--batch", big, check=False)
    assert pulled.returncode == 2
    assert one_line(pulled.stderr).endswith(f"no batch {big!r} on this head; `distribute status` lists its batches")
    local_head.cli("add", big_jobs)
    assert local_head.wait_batch(big)["jobs"]["done"] == 3


def test_forget_refuses_an_active_batch_and_other_peoples(local_head, tmp_path, head_sshd, alice_home):
    _, running = finished_batch(local_head, tmp_path, jobs=1, command="sleep 60")
    wait_until(lambda: local_head.batch(running)["jobs"]["running"] == 1, 30, "the job to start")
    refused = local_head.cli("forget", "--yes", running, check=False)
    assert refused.returncode == 2
    assert one_line(refused.stderr).endswith(f"{running} is still active (0 queued, 1 running): wait for it to end, "
                                             f"or `distribute kill {running}` first")
    local_head.cli("kill", running)
    local_head.wait_batch(running)
    as_alice = subprocess.run(DISTRIBUTE + ["--head", "head", "--socket", str(local_head.socket), "forget", "--yes",
                                            running], env=alice_home.env(), capture_output=True, text=True, timeout=60)
    assert as_alice.returncode == 2
    assert one_line(as_alice.stderr).endswith(f"dalice may not forget {running}: it belongs to root")
    assert local_head.batch(running) is not None
    local_head.cli("forget", "--yes", running)
    assert local_head.batch(running) is None


# --- messages that say what to do next -----------------------------------------------

def test_tab_in_yaml_is_named(tmp_path):
    path = tmp_path / "distribute-jobs.yaml"
    path.write_text("meta:\n  batch_name: a\n\tnamespace: b\nshell:\n  jobs: []\n")
    result = cli("check", path)
    assert result.returncode == 2
    assert one_line(result.stderr) == (f"distribute: error: {path}:3: tab character: YAML indents "
                                       "with spaces; replace the tab at column 1 with spaces")
    nodes = tmp_path / "nodes.yaml"
    nodes.write_text("nodes:\n  - name: a\n  \thost: b\n")
    with pytest.raises(distribute.UserError,
                       match="nodes.yaml:3: tab character: YAML indents with spaces; replace the tab at column 3 with"):
        distribute.load_nodes_file(str(nodes))
    path.write_text('meta: {batch_name: a, namespace: b}\nshell:\n  jobs:\n    - {name: x, command: "a\tb"}\n')
    assert cli("check", path).returncode == 0                # a tab inside a value is fine
    config = tmp_path / "xdg" / "distribute" / "config.yaml"   # the client's config file too
    config.parent.mkdir(parents=True)
    config.write_text("head: a\n\tsocket: /x\n")
    result = cli("status", env=dict(os.environ, XDG_CONFIG_HOME=str(tmp_path / "xdg")))
    assert one_line(result.stderr) == (f"distribute: error: {config}:2: tab character: YAML indents with "
                                       "spaces; replace the tab at column 1 with spaces")


def laptop(home, tmp_path, *args):
    env = home.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    env.pop("DISTRIBUTE_HEAD", None)
    return subprocess.run(DISTRIBUTE + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=60)


def test_head_over_ssh_messages(head_sshd, alice_home, tmp_path):
    # nothing serves the socket (a wrong --socket, or serve not running)
    result = laptop(alice_home, tmp_path, "--head", "head", "--socket", "/tmp/nowhere/head.sock", "status")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert "no head is running at /tmp/nowhere/head.sock on head: is `distribute serve` running?" in line
    assert "--socket" in line
    # a head that was running and stopped
    head = HeadProcess(None, None, dict(os.environ), extra=["--group", "distribute"]).start()
    try:
        assert laptop(alice_home, tmp_path, "--head", "head", "--socket", head.socket, "status").returncode == 0
        head.stop()
        result = laptop(alice_home, tmp_path, "--head", "head", "--socket", head.socket, "status")
        assert result.returncode == 1
        assert f"no head is running at {head.socket} on head: is `distribute serve` running?" in one_line(result.stderr)
    finally:
        head.stop()
        import shutil
        shutil.rmtree(head.dir, ignore_errors=True)
    # a port where nothing listens
    result = laptop(alice_home, tmp_path, "--head", f"{head_sshd.host}:1", "status")
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"distribute: nothing listens on {head_sshd.host}:1: check the host and "
                                              "port of --head")
    # the same head from the config file: the message names where it came from
    assert laptop(alice_home, tmp_path, "config", "--head", f"{head_sshd.host}:1").returncode == 0
    result = laptop(alice_home, tmp_path, "status")
    config = tmp_path / "xdg" / "distribute" / "config.yaml"
    assert one_line(result.stderr).endswith(f"; the head {head_sshd.host}:1 comes from {config} "
                                            "(`distribute config --head` changes it)")
    # the laptop does not know the head's host key
    alice_home.known_hosts.write_text("")
    result = laptop(alice_home, tmp_path, "--head", "head", "status")
    assert result.returncode == 1
    line = one_line(result.stderr)
    assert line.startswith("distribute: the head head's SSH host key is unknown to this machine (or has changed)")
    assert f"it is not in {alice_home.path}/.ssh/known_hosts" in line
    assert "connect once with `ssh head`" in line and "`ssh-keyscan head >> ~/.ssh/known_hosts`" in line


def test_local_head_not_running_says_so(tmp_path):
    result = cli("--head", "local", "--socket", tmp_path / "head.sock", "status")
    assert result.returncode == 1
    assert one_line(result.stderr).startswith(f"distribute: no head is running at {tmp_path / 'head.sock'}: "
                                              "is `distribute serve` running?")


# --- `install` and `service install` ----------------------------------------------------

def test_install_puts_a_command_and_completion_on_path(pyz, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XDG_")}
    env.update(HOME=str(home), SHELL="/bin/bash", PATH="/usr/bin:/bin")
    first = subprocess.run([sys.executable, str(pyz), "install"], env=env, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    command = home / ".local" / "bin" / "distribute"
    completion = home / ".local" / "share" / "bash-completion" / "completions" / "distribute"
    assert first.stdout.splitlines() == [
        f"installed {command} (runs {home}/.local/lib/distribute/distribute.pyz with {sys.executable})",
        f"bash completion: {completion}",
        f"{command.parent} is not on your PATH: echo 'export PATH=\"{command.parent}:$PATH\"' >> ~/.bashrc, "
        "then open a new shell"]
    assert (home / ".local" / "lib" / "distribute" / "distribute.pyz").read_bytes() == pyz.read_bytes()
    env["PATH"] = f"{command.parent}:/usr/bin:/bin"
    helped = subprocess.run(["distribute", "--help"], env=env, capture_output=True, text=True, timeout=60)
    assert helped.returncode == 0 and "Usage: distribute" in helped.stdout and "forget" in helped.stdout
    # bash, as a user's shell would: load the completion file, complete `distribute sta<TAB>`
    script = (f"source {completion}; COMP_WORDS=(distribute sta); COMP_CWORD=1; "
              "_distribute_completion distribute sta distribute; echo \"${COMPREPLY[@]}\"")
    completed = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert completed.stdout.split() == ["status"], completed.stderr
    # again: the same files, nothing added twice
    before = {p: p.read_bytes() for p in home.rglob("*") if p.is_file() and ".cache" not in p.parts}
    again = subprocess.run([sys.executable, str(pyz), "install"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[-1] == "open a new shell, then: distribute --help"
    assert {p: p.read_bytes() for p in home.rglob("*") if p.is_file() and ".cache" not in p.parts} == before
    # fish and zsh users get theirs where those shells look
    fish = subprocess.run(["distribute", "install", "--shell", "fish", "--prefix", tmp_path / "p"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert fish.returncode == 0, fish.stderr
    assert "complete --no-files --command distribute" in (home / ".config" / "fish" / "completions" /
                                                          "distribute.fish").read_text()
    assert (tmp_path / "p" / "bin" / "distribute").exists()
    zsh = subprocess.run(["distribute", "install", "--shell", "zsh"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert f"fpath+=({home}/.local/share/zsh/site-functions)" in zsh.stdout
    assert (home / ".local" / "share" / "zsh" / "site-functions" / "_distribute").read_text().startswith("#compdef")


def test_service_install_as_root_under_pyenv_uses_a_python_the_service_user_can_run(pyz, public_tmp, ssh_keys):
    """Root's pyenv python lies under /root, which the service's account cannot enter."""
    program = public_tmp / "distribute.pyz"
    program.write_bytes(pyz.read_bytes())
    os.chmod(program, 0o644)
    unit = public_tmp / "distribute.service"
    argv = [sys.executable, str(program), "service", "install", "--user", "dnode", "--state", str(public_tmp / "st"),
            "--output", str(unit)]
    refused = subprocess.run(argv + ["--group", "distribute"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert one_line(refused.stderr) == ("distribute: error: the head's account dnode must be in --group distribute "
                                        "(it hands its socket to that group): `sudo usermod -aG distribute dnode`, "
                                        "then run this again")
    written = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert written.returncode == 0, written.stderr
    exec_start = next(l for l in unit.read_text().splitlines() if l.startswith("ExecStart="))
    assert exec_start.startswith(f'ExecStart="/usr/bin/python3" "{program}" "serve"'), exec_start
    assert f"note: ExecStart uses /usr/bin/python3: dnode cannot run the head with {sys.executable}" in written.stderr
    assert "--group GROUP" in written.stderr
    # from a source tree the system python has no click: refused, saying what to do
    source = subprocess.run(DISTRIBUTE + argv[2:], capture_output=True, text=True, timeout=240)
    assert source.returncode == 2
    assert "dnode cannot run the head with" in one_line(source.stderr) and "sudo /usr/bin/python3 distribute.pyz" in source.stderr


def test_docker_job_on_an_ssh_node_runs_as_the_node_account(ssh_nodes, pyz, public_tmp, tmp_path):
    """Through a head and real OpenSSH: the node account (dnode) runs the engine, and the
    container gets --user with dnode's uid:gid, so the archived files are the job's, not root's."""
    import pwd
    import shutil
    from cluster import node_workdirs, nodes_yaml
    record = public_tmp / "calls.jsonl"
    record.touch()
    os.chmod(record, 0o666)
    bin_dir = public_tmp / "bin"
    bin_dir.mkdir()
    for engine in ("docker", "podman"):
        path = bin_dir / engine
        path.write_text(STAND_IN_ENGINE.format(python="/usr/bin/python3", record=str(record),
                                               version_code=0 if engine == "docker" else 1, version_sleep=0))
        path.chmod(0o755)
    wrapper = public_tmp / "python3"            # the node's python3, with the stand-ins first on PATH
    wrapper.write_text(f'#!/bin/sh\nPATH={bin_dir}:$PATH\nexport PATH\nexec /usr/bin/python3 "$@"\n')
    wrapper.chmod(0o755)
    node = ssh_nodes["node1"]
    workdirs = node_workdirs(ssh_nodes)
    text = nodes_yaml([node], workdirs).replace("python: /usr/bin/python3", f"python: {wrapper}")
    head = HeadProcess(None, text, ssh_nodes.head_home.env(), pyz=pyz).start()
    try:
        head.wait_nodes_up(1)
        assert "docker" in head.nodes()[0]["capabilities"] and "podman" not in head.nodes()[0]["capabilities"]
        head.cli("add", container_batch(tmp_path / "batch", "docker", "docker.io/carol/solver:2.1"))
        batch = head.wait_batch("carol/boxes")
        assert batch["jobs"]["done"] == 2
        account = pwd.getpwnam("dnode")
        made = [c for c in calls(record) if c[1] != "version"]
        assert made[0] == ["docker", "pull", "docker.io/carol/solver:2.1"]
        cpus = head.nodes()[0]["cpus"]
        for argv in made[1:]:
            root = run_root(argv)
            assert root.startswith(str(workdirs["node1"]))
            assert argv == expected_run("docker", root, "docker.io/carol/solver:2.1", cpus,
                                        account.pw_uid, account.pw_gid)
        archived = head.archive / "carol" / "boxes" / "a"
        assert (archived / "stdout.txt").read_text() == \
            f"container ran with {cpus} cpus as {account.pw_uid}:{account.pw_gid}\n"
    finally:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)
        shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)


def test_python_api_builds_docker_batches(tmp_path):
    batch = distribute.Batch("carol", "api", "docker", image="docker.io/carol/solver:2.1", mounts=["/scratch"])
    batch.add_job("one")
    loaded = batch.validate()
    assert (loaded.flavour, loaded.image, loaded.mounts, loaded.meta.capabilities) == \
        ("docker", "docker.io/carol/solver:2.1", ["/scratch"], ["docker"])
    image_archive(tmp_path / "solver.tar")
    archived = distribute.Batch("carol", "api2", "podman", image=distribute.File(tmp_path / "solver.tar"))
    archived.add_job("one")
    path = archived.write(tmp_path / "distribute-jobs.yaml")
    again = distribute.Batch.from_file(path)
    assert again.image == distribute.File(str(tmp_path / "solver.tar")) and again.validate().image == "localhost/solver:1.2"
    with pytest.raises(distribute.UserError, match="image= is only for docker/podman batches"):
        distribute.Batch("carol", "x", "python", image="docker.io/a/b")


def test_ip_of_the_original_reaches_the_head_over_ssh(local_head, head_sshd, alice_home, tmp_path):
    _, key = finished_batch(local_head, tmp_path, jobs=1)
    local_head.wait_batch(key)
    result = laptop(alice_home, tmp_path, "--socket", local_head.socket, "server-status", "--ip", "head", "-p", "8952")
    assert result.returncode == 0, result.stderr
    assert key in result.stdout
    assert one_line(result.stderr) == ("distribute: note: `server-status` is `distribute status` here; "
                                       "`--ip head` is `--head head` here (reached over SSH)")


def test_original_pause_and_slurm_spellings():
    assert distribute.original_spelling(["help"])[0] == ["--help"]
    assert distribute.original_spelling(["help", "add"])[0] == ["add", "--help"]
    assert distribute.original_spelling(["pause", "1h30m"])[0] == ["pause", "--duration", "1h30m"]
    assert distribute.original_spelling(["pause", "--duration", "1h"]) == (["pause", "--duration", "1h"], [])
    argv, notes = distribute.original_spelling(
        ["slurm", "out", "jobs.yaml", "--cluster-username", "alice", "--cluster-address", "hpc.example",
         "--cluster-upload-destination", "/home/alice/runs"])
    assert argv == ["slurm", "--cluster-user", "alice", "--cluster-host", "hpc.example", "--cluster-dir",
                    "/home/alice/runs", "jobs.yaml", "out"]
    assert "`slurm [FILE] OUTDIR" in notes[0]
    assert distribute.original_spelling(["slurm", "jobs.yaml", "out"]) == (["slurm", "jobs.yaml", "out"], [])


def test_original_slurm_command_line_writes_the_folder(tmp_path):
    jobs = container_batch(tmp_path / "batch", "docker", "docker.io/carol/solver:2.1")
    result = cli("slurm", tmp_path / "out", jobs, "--cluster-username", "alice", "--cluster-address",
                 "hpc.example", "--cluster-upload-destination", "runs/boxes")
    assert result.returncode == 0, result.stderr
    assert "alice@hpc.example:runs/boxes/" in (tmp_path / "out" / "upload.sh").read_text()
    assert "note: the original's `slurm OUTDIR [FILE]" in one_line(result.stderr)


def test_the_head_refuses_a_raw_image_that_would_be_an_engine_option(local_head):
    """A raw client skips the job-file loader: the head itself checks the image it will hand to
    `docker run` (no `--privileged`, no `-v /:/host`), and forget/du requests are checked too."""
    import asyncio
    import dataclasses

    async def ask(header):
        reader, writer = await asyncio.open_unix_connection(str(local_head.socket))
        channel = distribute.Channel(reader, writer)
        try:
            return (await asyncio.wait_for(channel.request(header), 20))[0]
        finally:
            channel.close()

    def raw_add(flavour, image):
        plan = dataclasses.asdict(distribute.BatchPlan("evil", "raw", flavour, image=image))
        job = {"name": "a", "files": [], "command": None, "has_script": False, "params": None}
        return {"op": "add", "plan": plan, "jobs": [{"plan": job, "retries": 0}], "capabilities": []}

    for header, expected in ((raw_add("docker", "--privileged"), "plan.image: '--privileged' is not an image reference"),
                             (raw_add("podman", "-v/:/host"), "is not an image reference"),
                             (raw_add("docker", None), "plan.image must be text"),
                             (raw_add("shell", "docker.io/a/b"), "plan.image: only docker and podman batches have one"),
                             ({"op": "forget", "batch": ["x"]}, "batch must be text"),
                             ({"op": "forget", "batch": "x", "dry": "yes"}, "dry must be true/false")):
        reply = asyncio.run(ask(header))
        assert reply.get("ok") is False and expected in reply["error"], (header, reply)
    assert not any(b["batch"] == "evil/raw" for b in local_head.status()["batches"])


def test_head_messages_when_asyncssh_carries_the_client(head_sshd, alice_home, tmp_path):
    """Without `ssh` on PATH the client connects with asyncssh: the same messages."""
    no_ssh = tmp_path / "bin-without-ssh"
    no_ssh.mkdir()
    env = alice_home.env(XDG_CONFIG_HOME=str(tmp_path / "xdg"), PATH=str(no_ssh))
    env.pop("DISTRIBUTE_HEAD", None)

    def laptop_without_ssh(*args):
        return subprocess.run(DISTRIBUTE + [str(a) for a in args], env=env, capture_output=True, text=True,
                              timeout=60)
    result = laptop_without_ssh("--head", f"{head_sshd.host}:1", "status")
    assert one_line(result.stderr).startswith(f"distribute: nothing listens on {head_sshd.host}:1: check the host "
                                              "and port of --head")
    result = laptop_without_ssh("--head", "head", "--socket", "/tmp/nowhere/head.sock", "status")
    assert "no head is running at /tmp/nowhere/head.sock on head: is `distribute serve` running?" in \
        one_line(result.stderr)
    alice_home.known_hosts.write_text("")
    result = laptop_without_ssh("--head", "head", "status")
    line = one_line(result.stderr)
    assert line.startswith("distribute: the head head's SSH host key is unknown to this machine (or has changed)")
    assert f"{alice_home.path}/.ssh/known_hosts" in line and "ssh-keyscan" in line

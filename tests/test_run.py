"""`distribute run`: real batches, built and run on this machine through the real command line.

Each test writes a small batch into a temporary folder, runs
`python3 distribute.py run FILE --save-dir D` as a subprocess and then inspects the archive
(`D/<namespace>/<batch>/<job>/`) and what the jobs themselves recorded about the directory
they ran in (SPEC §3).
"""

import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cli(*args, cwd=None, env=None):
    # A user's shell does not set PYTHONUNBUFFERED; without it a python job's print() output is
    # block-buffered, and stdout.txt must still keep stdout and stderr in the order written.
    env = dict(os.environ if env is None else env)
    env.pop("PYTHONUNBUFFERED", None)
    return subprocess.run([sys.executable, str(ROOT / "distribute.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def write_files(folder: Path, files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text)


# The build appends one line to a counter file outside the workspace; its absolute path comes
# in as a shared input file (initial_files/counter_path.txt).
BUILD_PY = """\
import os
counter = open(os.path.join("initial_files", "counter_path.txt")).read().strip()
with open(counter, "a") as out:
    out.write("built\\n")
open("built_by_build.txt", "w").write("made by build.py")
print("build says hello")
print("build env", os.environ["DISTRIBUTE_BATCH"], os.environ["DISTRIBUTE_NAMESPACE"])
"""

# Every job records what it sees before touching anything, then leaves files behind.
RUN_PY = """\
import hashlib, json, os, sys
seen = {
    "cwd": os.getcwd(),
    "root": sorted(os.listdir(".")),
    "input": {name: open(os.path.join("input", name)).read() for name in sorted(os.listdir("input"))},
    "initial_files": sorted(os.listdir("initial_files")),
    "save_at_start": sorted(os.listdir("distribute_save")),
    "job_py_sha": hashlib.sha256(open("job.py", "rb").read()).hexdigest(),
    "argv0": sys.argv[0],
    "built": open("built_by_build.txt").read(),
    "env": {k: v for k, v in os.environ.items() if k.startswith("DISTRIBUTE_")},
}
with open(os.environ["DISTRIBUTE_PROGRESS"], "a") as progress:
    progress.write("100\\n")
json.dump(seen, open("distribute_save/seen.json", "w"), indent=1)
open("distribute_save/leftover_" + os.environ["DISTRIBUTE_JOB"] + ".txt", "w").write("x")
os.makedirs("distribute_save/sub/deeper")
open("distribute_save/sub/deeper/result.txt", "w").write(os.environ["DISTRIBUTE_JOB"])
print("out 1")
print("err 2", file=sys.stderr)
print("out 3")
print("err 4", file=sys.stderr)
"""


def python_batch(folder: Path, counter: Path, extra_jobs: str = "") -> Path:
    write_files(folder, {
        "build.py": BUILD_PY, "run.py": RUN_PY,
        "counter_path.txt": f"{counter}\n", "shared.txt": "shared by all\n",
        "one.txt": "only for job_1\n", "two.txt": "only for job_2\n",
        "case_1.json": '{"case": 1}', "case_2.json": '{"case": 2}',
        "distribute-jobs.yaml": f"""\
meta:
  batch_name: sweep_7
  namespace: alice
  capabilities: [python3]
python:
  initialize:
    build_file: build.py
    required_files:
      - path: counter_path.txt
      - {{path: shared.txt, alias: common.txt}}
  jobs:
    - name: job_1
      file: run.py
      required_files: [{{path: one.txt, alias: only_one.txt}}, {{path: case_1.json, alias: case.json}}]
    - name: job_2
      file: run.py
      required_files: [{{path: two.txt, alias: only_two.txt}}, {{path: case_2.json, alias: case.json}}]
    - name: job_3
      file: {{path: run.py}}
{extra_jobs}""",
    })
    return folder / "distribute-jobs.yaml"


def test_python_batch_layout_archive_and_environment(tmp_path):
    counter = tmp_path / "outside" / "build_count.txt"
    counter.parent.mkdir()
    job_file = python_batch(tmp_path / "batch", counter)
    save = tmp_path / "results"
    result = cli("run", job_file, "--save-dir", save)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""

    # the build ran exactly once for three jobs
    assert counter.read_text() == "built\n"

    batch_dir = save / "alice" / "sweep_7"
    assert sorted(p.name for p in batch_dir.iterdir()) == ["build", "job_1", "job_2", "job_3"]
    build_logs = list((batch_dir / "build").iterdir())
    assert len(build_logs) == 1 and build_logs[0].suffix == ".txt"
    node = build_logs[0].stem
    assert build_logs[0].read_text() == "build says hello\nbuild env sweep_7 alice\n"

    run_py_sha = hashlib.sha256(RUN_PY.encode()).hexdigest()
    expected_input = {
        "job_1": {"counter_path.txt": f"{counter}\n", "common.txt": "shared by all\n",
                  "only_one.txt": "only for job_1\n", "case.json": '{"case": 1}'},
        "job_2": {"counter_path.txt": f"{counter}\n", "common.txt": "shared by all\n",
                  "only_two.txt": "only for job_2\n", "case.json": '{"case": 2}'},
        "job_3": {"counter_path.txt": f"{counter}\n", "common.txt": "shared by all\n"},
    }
    cwds = set()
    for job in ("job_1", "job_2", "job_3"):
        folder = batch_dir / job
        assert sorted(p.name for p in folder.iterdir()) == sorted(
            ["job.json", "stdout.txt", "seen.json", f"leftover_{job}.txt", "sub"])
        assert (folder / "sub" / "deeper" / "result.txt").read_text() == job
        seen = json.loads((folder / "seen.json").read_text())
        cwds.add(seen["cwd"])
        # SPEC §3: build.py, initial_files/, input/, distribute_save/, job.py in the build directory
        for name in ("build.py", "initial_files", "input", "distribute_save", "job.py", "built_by_build.txt"):
            assert name in seen["root"], (job, seen["root"])
        assert "run.py" not in seen["root"]
        assert seen["initial_files"] == ["common.txt", "counter_path.txt"]
        assert seen["input"] == expected_input[job]       # job_1's files are not visible to job_2
        assert seen["save_at_start"] == []                 # even though the previous job left files
        assert seen["job_py_sha"] == run_py_sha and seen["argv0"] == "job.py"
        assert seen["built"] == "made by build.py"
        env = seen["env"]
        assert env["DISTRIBUTE_JOB"] == job
        assert env["DISTRIBUTE_BATCH"] == "sweep_7"
        assert env["DISTRIBUTE_NAMESPACE"] == "alice"
        assert env["DISTRIBUTE_CPUS"] == str(os.cpu_count())
        assert os.path.isabs(env["DISTRIBUTE_PROGRESS"])
        # stdout and stderr interleaved, in the order they were written
        assert (folder / "stdout.txt").read_text() == "out 1\nerr 2\nout 3\nerr 4\n"
        record = json.loads((folder / "job.json").read_text())
        assert record["node"] == node
        assert record["exit_code"] == 0 and record["attempts"] == 1 and record["state"] == "ok"
        assert parse_time(record["start"]) <= parse_time(record["end"])
    # one build directory, named <namespace>/<batch>, for the whole batch
    assert len(cwds) == 1 and cwds.pop().endswith(os.path.join("alice", "sweep_7"))
    assert "3 ok, 0 failed" in result.stdout


def test_failing_job_fails_the_run_but_the_others_still_run(tmp_path):
    counter = tmp_path / "count"
    job_file = python_batch(tmp_path / "batch", counter, extra_jobs="""\
    - name: broken
      file: fail.py
    - name: job_4
      file: run.py
""")
    (tmp_path / "batch" / "fail.py").write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    text = job_file.read_text()
    save = tmp_path / "results"
    result = cli("run", job_file, "--save-dir", save)
    assert result.returncode == 1, (result.stdout, result.stderr)
    message = one_line(result.stderr)
    assert "1 job failed" in message and "broken" in message
    batch_dir = save / "alice" / "sweep_7"
    broken = json.loads((batch_dir / "broken" / "job.json").read_text())
    assert broken["exit_code"] == 3 and broken["state"] == "failed" and broken["attempts"] == 1
    assert (batch_dir / "broken" / "stdout.txt").read_text() == "about to fail\n"
    for job in ("job_1", "job_2", "job_3", "job_4"):
        record = json.loads((batch_dir / job / "job.json").read_text())
        assert record["state"] == "ok" and record["exit_code"] == 0
    assert counter.read_text() == "built\n"
    assert job_file.read_text() == text


def shell_batch(folder: Path, jobs: str, build: str = "", batch: str = "shells") -> Path:
    init = f"  initialize:\n    build: {json.dumps(build)}\n" if build else ""
    write_files(folder, {"distribute-jobs.yaml": f"""\
meta:
  batch_name: {batch}
  namespace: bob
shell:
{init}  jobs:
{jobs}"""})
    return folder / "distribute-jobs.yaml"


def test_retries_until_success(tmp_path):
    count = tmp_path / "attempts"
    flaky = (f"n=$(cat {shlex.quote(str(count))} 2>/dev/null || echo 0); n=$((n+1)); "
             f"echo $n > {shlex.quote(str(count))}; echo attempt $n; [ $n -ge 3 ]")
    always = tmp_path / "always"
    hopeless = f"echo x >> {shlex.quote(str(always))}; exit 5"
    job_file = shell_batch(tmp_path / "b", f"""\
    - name: flaky
      command: {json.dumps(flaky)}
      retries: 2
    - name: hopeless
      command: {json.dumps(hopeless)}
      retries: 1
""")
    save = tmp_path / "res"
    result = cli("run", job_file, "--save-dir", save)
    assert result.returncode == 1
    assert "hopeless" in one_line(result.stderr)
    flaky_record = json.loads((save / "bob" / "shells" / "flaky" / "job.json").read_text())
    assert flaky_record["attempts"] == 3 and flaky_record["state"] == "ok" and flaky_record["exit_code"] == 0
    assert count.read_text() == "3\n"
    assert (save / "bob" / "shells" / "flaky" / "stdout.txt").read_text() == "attempt 3\n"
    hopeless_record = json.loads((save / "bob" / "shells" / "hopeless" / "job.json").read_text())
    assert hopeless_record["attempts"] == 2 and hopeless_record["state"] == "failed"
    assert hopeless_record["exit_code"] == 5
    assert always.read_text() == "x\nx\n"


def test_shell_batch_output_order_env_and_clean_save(tmp_path):
    job_file = shell_batch(tmp_path / "b", """\
    - name: talk
      command: "echo one; echo two >&2; echo three; echo four >&2; echo $DISTRIBUTE_JOB $DISTRIBUTE_BATCH $DISTRIBUTE_NAMESPACE > distribute_save/who.txt"
    - name: listing
      command: "ls -A distribute_save > at_start.txt; mv at_start.txt distribute_save/; cat tools/made_by_build"
""", build="mkdir -p tools && echo built > tools/made_by_build")
    save = tmp_path / "res"
    batch_dir = save / "bob" / "shells"
    stale = batch_dir / "stale_job"
    stale.mkdir(parents=True)
    (stale / "old.txt").write_text("old")
    other_batch = save / "bob" / "other_batch" / "keep.txt"
    other_batch.parent.mkdir(parents=True)
    other_batch.write_text("keep")

    result = cli("run", job_file, "--save-dir", save)
    assert result.returncode == 0, result.stderr
    assert (batch_dir / "talk" / "stdout.txt").read_text() == "one\ntwo\nthree\nfour\n"
    assert (batch_dir / "talk" / "who.txt").read_text() == "talk shells bob\n"
    assert (batch_dir / "listing" / "at_start.txt").read_text() == ""
    assert (batch_dir / "listing" / "stdout.txt").read_text() == "built\n"
    assert stale.exists()                       # without --clean-save earlier results stay

    result = cli("run", job_file, "--save-dir", save, "--clean-save")
    assert result.returncode == 0, result.stderr
    assert not stale.exists()
    assert sorted(p.name for p in batch_dir.iterdir()) == ["build", "listing", "talk"]
    assert other_batch.read_text() == "keep"     # only this batch's results go


def test_failing_build_names_its_log(tmp_path):
    counter = tmp_path / "count"
    job_file = python_batch(tmp_path / "batch", counter)
    (tmp_path / "batch" / "build.py").write_text(
        "print('compiler exploded')\nimport sys\nprint('on stderr', file=sys.stderr)\nsys.exit(4)\n")
    save = tmp_path / "results"
    result = cli("run", job_file, "--save-dir", save)
    assert result.returncode == 1, (result.stdout, result.stderr)
    message = one_line(result.stderr)
    logs = list((save / "alice" / "sweep_7" / "build").iterdir())
    assert len(logs) == 1
    assert str(logs[0]) in message and "exit code 4" in message
    assert logs[0].read_text() == "compiler exploded\non stderr\n"
    assert sorted(p.name for p in (save / "alice" / "sweep_7").iterdir()) == ["build"]   # no job ran


def test_failing_shell_build(tmp_path):
    job_file = shell_batch(tmp_path / "b", '    - {name: j, command: "true"}\n', build="echo nope; exit 9")
    result = cli("run", job_file, "--save-dir", tmp_path / "res")
    assert result.returncode == 1
    message = one_line(result.stderr)
    log = next((tmp_path / "res" / "bob" / "shells" / "build").iterdir())
    assert str(log) in message and log.read_text() == "nope\n"
    assert not (tmp_path / "res" / "bob" / "shells" / "j").exists()


STAND_IN_APPTAINER = """\
#!{python}
import json, os, sys
argv = sys.argv[1:]
with open({record!r}, "a") as out:
    out.write(json.dumps(argv) + "\\n")
binds = dict(item.rsplit(":", 2)[:2][::-1] for item in argv[argv.index("--bind") + 1].split(","))
save, inputs = binds["/distribute_save"], binds["/input"]
with open(os.path.join(save, "from_container.txt"), "w") as out:
    out.write(" ".join(sorted(os.listdir(inputs))))
print("container ran with", argv[-1], "cpus")
"""


def test_apptainer_command_line(tmp_path):
    """apptainer is not packaged for Debian, so a stand-in `apptainer` script goes first on PATH.

    It records its argv, writes a file into the host folder bound at /distribute_save (parsed
    from --bind) and lists the host folder bound at /input; the test checks the exact command
    line of SPEC §3 and that what the "container" wrote was archived.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "apptainer_calls.jsonl"
    stand_in = bin_dir / "apptainer"
    stand_in.write_text(STAND_IN_APPTAINER.format(python=sys.executable, record=str(record)))
    stand_in.chmod(0o755)
    folder = tmp_path / "batch"
    write_files(folder, {"solver.sif": "not an image", "settings.json": "{}", "small.json": "1", "large.json": "2",
                         "distribute-jobs.yaml": """\
meta:
  batch_name: containers
  namespace: carol
  capabilities: [apptainer]
apptainer:
  initialize:
    sif: {path: solver.sif, alias: image.sif}
    required_files: [settings.json]
    required_mounts: [/scratch, /data]
  jobs:
    - name: small
      required_files: [{path: small.json, alias: case.json}]
    - name: large
      required_files: [{path: large.json, alias: case.json}]
"""})
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    save = tmp_path / "res"
    result = cli("run", folder / "distribute-jobs.yaml", "--save-dir", save, env=env)
    assert result.returncode == 0, result.stderr
    calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(calls) == 2
    cpus = str(os.cpu_count())
    for argv, job in zip(calls, ("small", "large")):
        bind = argv[4]
        save_host = bind.split(",")[0].split(":")[0]
        root = os.path.dirname(save_host)
        assert root.endswith(os.path.join("carol", "containers")) and os.path.isabs(root)
        assert argv == ["run", "--app", "distribute", "--bind",
                        f"{root}/distribute_save:/distribute_save:rw,{root}/input:/input:rw,"
                        f"{root}/mounts/0:/scratch:rw,{root}/mounts/1:/data:rw",
                        f"{root}/image.sif", cpus]
        archived = save / "carol" / "containers" / job
        assert (archived / "from_container.txt").read_text() == "case.json settings.json"
        assert (archived / "stdout.txt").read_text() == f"container ran with {cpus} cpus\n"
        assert json.loads((archived / "job.json").read_text())["state"] == "ok"
    assert not (save / "carol" / "containers" / "build").exists()    # the image is the build


def test_examples_run_as_they_are(tmp_path):
    python_example = ROOT / "examples" / "python" / "distribute-jobs.yaml"
    save = tmp_path / "res"
    result = cli("run", python_example, "--save-dir", save)
    assert result.returncode == 0, result.stderr
    for case in ("damping_0.1", "damping_0.5", "damping_1.0"):
        folder = save / "examples" / "oscillator_demo" / case
        rows = (folder / "trajectory.csv").read_text().splitlines()
        assert rows[0] == "t,x" and len(rows) > 2
        assert f"{case}: damping" in (folder / "stdout.txt").read_text()
    assert "solver ready" in next((save / "examples" / "oscillator_demo" / "build").iterdir()).read_text()

    shell_example = ROOT / "examples" / "shell" / "distribute-jobs.yaml"
    result = cli("run", shell_example, "--save-dir", save)
    assert result.returncode == 0, result.stderr
    text = (ROOT / "examples" / "shell" / "text.txt").read_text()
    folder = save / "examples" / "word_counts"
    assert int((folder / "words" / "words.txt").read_text()) == len(text.split())
    assert int((folder / "lines" / "lines.txt").read_text()) == text.count("\n")
    histogram = (folder / "histogram" / "histogram.txt").read_text().split()
    assert histogram and histogram[0].isdigit()


def test_run_refuses_bad_file_before_running_anything(tmp_path):
    marker = tmp_path / "ran"
    job_file = shell_batch(tmp_path / "b", f"""\
    - name: good
      command: "touch {marker}"
    - name: good
      command: "true"
""")
    result = cli("run", job_file, "--save-dir", tmp_path / "res")
    assert result.returncode == 2
    assert f"{job_file}:8: shell.jobs[1].name" in one_line(result.stderr)
    assert not marker.exists() and not (tmp_path / "res").exists()

"""`distribute slurm`: the generated folder, its validation, and real runs on a real Slurm.

The unit tests read the generated scripts; the round trips start munged,
slurmctld and slurmd on this machine (tests/slurm_cluster.py), submit with the
generated submit.sh and the real sbatch, fetch with the generated fetch.sh, and
compare with what `distribute run` archives for the same job file.
"""

import json
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from slurm_cluster import SlurmUnavailable, start_slurm_cluster

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
VOLATILE_JOB_FIELDS = ("start", "end", "node")


def distribute(*args: str, cwd: Path = None, env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "distribute.py"), *args], cwd=str(cwd) if cwd else None,
                          capture_output=True, text=True, timeout=120, env=env)


def write_batch(folder: Path, text: str, files: Dict[str, str] = None) -> Path:
    """A job file plus the small files it names, in a fresh folder."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (files or {}).items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(content)
    path = folder / "distribute-jobs.yaml"
    path.write_text(text)
    return path


def shell_batch(folder: Path, jobs: int = 3, slurm: str = "", job_slurm: Dict[int, str] = None) -> Path:
    job_slurm = job_slurm or {}
    lines = [f"    - name: job{i}\n      command: \"echo {i} > distribute_save/n.txt\"\n"
             + (f"      slurm: {job_slurm[i]}\n" if i in job_slurm else "") for i in range(jobs)]
    return write_batch(folder, "meta:\n  batch_name: b\n  namespace: ns\n" + slurm
                       + "shell:\n  jobs:\n" + "".join(lines))


def sbatch_lines(script: Path) -> List[str]:
    return [l for l in script.read_text().splitlines() if l.startswith("#SBATCH")]


def task_list(out: Path, n: int) -> List[str]:
    return [line.split()[0] for line in (out / "tasks" / f"array-{n}.txt").read_text().splitlines()]


# --- the generated scripts ---------------------------------------------------

def test_one_array_carries_the_batch_options(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=3, slurm=(
        "slurm:\n  time: '1-02:00:00'\n  mem_per_cpu: 2G\n  partition: short,long\n  cpus_per_task: 4\n"
        "  account: lab\n  mail_user: a@b.org\n  mail_type: END,FAIL\n  hint: nomultithread\n  job_name: ~\n"))
    out = tmp_path / "out"
    result = distribute("slurm", str(path), str(out))
    assert result.returncode == 0, result.stderr
    assert "3 jobs in 1 job array" in result.stdout
    assert sbatch_lines(out / "array-1.sbatch") == [
        "#SBATCH --job-name=b", "#SBATCH --array=0-2", "#SBATCH --output=logs/%x-%A_%a.out",
        "#SBATCH --cpus-per-task=4", "#SBATCH --mem-per-cpu=2G", "#SBATCH --hint=nomultithread",
        "#SBATCH --time=1-02:00:00", "#SBATCH --partition=short,long", "#SBATCH --account=lab",
        "#SBATCH --mail-user=a@b.org", "#SBATCH --mail-type=END,FAIL"]
    assert task_list(out, 1) == ["job0", "job1", "job2"]
    assert not (out / "build.sbatch").exists()      # a shell batch without a build command
    assert "submit array-1.sbatch $first_after\n" in (out / "submit.sh").read_text()
    for script in ("submit.sh", "run-task.sh", "upload.sh", "fetch.sh", "array-1.sbatch"):
        assert os.stat(out / script).st_mode & stat.S_IXUSR, script
        assert subprocess.run(["sh", "-n", str(out / script)]).returncode == 0, script


def test_arrays_larger_than_max_array_size_are_split(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=5)
    out = tmp_path / "out"
    result = distribute("slurm", str(path), str(out), "--max-array-size", "2")
    assert result.returncode == 0, result.stderr
    assert "5 jobs in 3 job arrays" in result.stdout
    assert [l for l in sbatch_lines(out / "array-1.sbatch") if "--array" in l] == ["#SBATCH --array=0-1"]
    assert [l for l in sbatch_lines(out / "array-3.sbatch") if "--array" in l] == ["#SBATCH --array=0-0"]
    assert [task_list(out, n) for n in (1, 2, 3)] == [["job0", "job1"], ["job2", "job3"], ["job4"]]
    submit = (out / "submit.sh").read_text()
    assert all(f"submit array-{n}.sbatch" in submit for n in (1, 2, 3))
    assert not (out / "array-4.sbatch").exists()


def test_default_max_array_size_is_1001(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=1002)
    out = tmp_path / "out"
    assert distribute("slurm", str(path), str(out)).returncode == 0
    assert "#SBATCH --array=0-1000" in sbatch_lines(out / "array-1.sbatch")
    assert "#SBATCH --array=0-0" in sbatch_lines(out / "array-2.sbatch")
    assert task_list(out, 2) == ["job1001"]


def test_throttle_limits_running_tasks(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=5)
    out = tmp_path / "out"
    assert distribute("slurm", str(path), str(out), "--throttle", "2").returncode == 0
    assert "#SBATCH --array=0-4%2" in sbatch_lines(out / "array-1.sbatch")


def test_jobs_with_equal_overrides_share_an_array(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=5, slurm="slurm:\n  time: '10'\n  partition: p\n",
                       job_slurm={1: "{time: '2:00:00'}", 3: "{time: '2:00:00', partition: ~}", 4: "~"})
    out = tmp_path / "out"
    result = distribute("slurm", str(path), str(out))
    assert result.returncode == 0, result.stderr
    # job3's null partition means "no override", so it shares job1's options
    assert task_list(out, 1) == ["job0", "job2", "job4"]
    assert task_list(out, 2) == ["job1", "job3"]
    assert "#SBATCH --time=10" in sbatch_lines(out / "array-1.sbatch")
    assert "#SBATCH --time=2:00:00" in sbatch_lines(out / "array-2.sbatch")
    assert "#SBATCH --partition=p" in sbatch_lines(out / "array-2.sbatch")
    assert not (out / "array-3.sbatch").exists()


@pytest.mark.parametrize("key, value, message", [
    ("time", "'1h'", "is not a Slurm time"),
    ("time", "'1:2:3:4'", "is not a Slurm time"),
    ("mem_per_cpu", "4GB", "is not a Slurm size"),
    ("mem_per_cpu", "lots", "is not a Slurm size"),
    ("mail_type", "END,SOMETIMES", "'SOMETIMES' is not one of"),
    ("job_name", "'my job'", "(no spaces)"),
    ("hint", "fast", "is not one of compute_bound"),
    ("partition", "'a b'", "partition names"),
    ("account", "'x;y'", "letters, digits"),
    ("mail_user", "'a b@c'", "not a user name or mail address"),
    ("output", "'my log.txt'", "without spaces"),
])
def test_options_sbatch_would_refuse_get_our_error_first(tmp_path, key, value, message):
    path = shell_batch(tmp_path / "src", jobs=2, slurm=f"slurm:\n  nodes: 1\n  {key}: {value}\n")
    out = tmp_path / "out"
    result = distribute("slurm", str(path), str(out))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"{path}:6: slurm.{key}: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists() and list(out.parent.iterdir()) == [out.parent / "src"]


def test_a_bad_per_job_option_names_the_job(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=3, job_slurm={2: "{mem_per_cpu: 1.5G}"})
    result = distribute("slurm", str(path), str(tmp_path / "out"))
    assert result.returncode == 2
    assert f"{path}:12: shell.jobs[2].slurm.mem_per_cpu: '1.5G' is not a Slurm size" in result.stderr


@pytest.mark.parametrize("time", ["30", "30:00", "1:30:00", "2-0", "2-12:30", "2-12:30:00", "UNLIMITED"])
def test_every_slurm_time_format_is_accepted(tmp_path, time):
    path = shell_batch(tmp_path / "src", jobs=1, slurm=f"slurm:\n  time: '{time}'\n")
    out = tmp_path / "out"
    result = distribute("slurm", str(path), str(out))
    assert result.returncode == 0, result.stderr
    assert f"#SBATCH --time={time}" in sbatch_lines(out / "array-1.sbatch")


@pytest.mark.parametrize("args, message", [
    (["--max-array-size", "0"], "--max-array-size must be at least 1"),
    (["--throttle", "0"], "--throttle must be at least 1"),
    (["--cluster-host", "-oProxyCommand=x"], "is not a host name"),
    (["--cluster-host", "h", "--cluster-dir", "my dir"], "--cluster-dir 'my dir' must be a path"),
    (["--cluster-user", "u"], "--cluster-user needs --cluster-host"),
])
def test_bad_command_line_options_exit_2(tmp_path, args, message):
    path = shell_batch(tmp_path / "src", jobs=1)
    result = distribute("slurm", str(path), str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "out").exists()


def test_a_non_empty_outdir_is_refused_and_kept(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    result = distribute("slurm", str(path), str(out))
    assert result.returncode == 2 and "already exists and is not an empty folder" in result.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_too_many_arguments_exit_2(tmp_path):
    result = distribute("slurm", "a", "b", "c")
    assert result.returncode == 2 and "slurm takes [FILE] OUTDIR, got 3 arguments" in result.stderr


def test_job_file_from_the_current_folder_and_remote_commands(tmp_path):
    path = shell_batch(tmp_path / "src", jobs=1)
    result = distribute("slurm", str(tmp_path / "out"), "--cluster-host", "login.hpc.example",
                        "--cluster-user", "alice", "--save-dir", str(tmp_path / "archive"), cwd=path.parent)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert "\nssh alice@login.hpc.example 'mkdir -p -- distribute-slurm/ns/b'\n" in (out / "upload.sh").read_text()
    assert "rsync -a --partial --exclude=/results/ --exclude=/work/ --exclude=/logs/ ./ " \
           "alice@login.hpc.example:distribute-slurm/ns/b/\n" in (out / "upload.sh").read_text()
    fetch = (out / "fetch.sh").read_text()
    assert f"dest=${{1:-{tmp_path / 'archive'}}}" in fetch
    assert "alice@login.hpc.example:distribute-slurm/ns/b/results/ \"$dest/\"" in fetch
    assert "submit:  ssh alice@login.hpc.example 'sh distribute-slurm/ns/b/submit.sh'" in result.stdout


APPTAINER_LINE = ('apptainer run --app distribute --bind "$task/distribute_save:/distribute_save:rw,'
                  '$task/input:/input:rw,$task/mounts/0:"/scratch":rw" "$task/"solver.sif "$cpus"')


def test_apptainer_task_runs_the_spec_command_line(tmp_path):
    """apptainer is not packaged for Debian, so this checks the exact line in run-task.sh and then
    runs that task script (outside Slurm, with the variables sbatch would set) against a stand-in
    `apptainer` that records its arguments and writes into the bound folders."""
    src = tmp_path / "src"
    shutil.copytree(EXAMPLES / "apptainer", src)
    out = tmp_path / "out"
    result = distribute("slurm", str(src / "distribute-jobs.yaml"), str(out))
    assert result.returncode == 0, result.stderr
    assert APPTAINER_LINE in (out / "run-task.sh").read_text()
    assert not (out / "build.sbatch").exists()        # the image is the build
    assert (out / "build" / "solver.sif").read_bytes() == (src / "solver.sif").read_bytes()

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(
        "#!/bin/sh\nprintf '%s\\n' \"$@\" > \"$DISTRIBUTE_TEST_ARGV\"\n"
        "save=$(echo \"$5\" | cut -d, -f1 | cut -d: -f1)\ninput=$(echo \"$5\" | cut -d, -f2 | cut -d: -f1)\n"
        "cat \"$input/case.json\" > \"$save/seen.json\"\nls \"$input\" > \"$save/inputs.txt\"\necho ran\n")
    (bin_dir / "apptainer").chmod(0o755)
    argv_file = tmp_path / "argv.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(out),
               SLURM_ARRAY_TASK_ID="1", SLURM_JOB_ID="77", SLURMD_NODENAME="n1", SLURM_CPUS_PER_TASK="3",
               DISTRIBUTE_TEST_ARGV=str(argv_file))
    run = subprocess.run(["sh", str(out / "run-task.sh"), "tasks/array-1.txt"], cwd=str(tmp_path),
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    task = out / "work" / "large"
    assert argv_file.read_text().splitlines() == [
        "run", "--app", "distribute", "--bind",
        f"{task}/distribute_save:/distribute_save:rw,{task}/input:/input:rw,{task}/mounts/0:/scratch:rw",
        f"{task}/solver.sif", "3"]
    landed = out / "results" / "examples" / "container_demo" / "large"
    assert (landed / "seen.json").read_bytes() == (src / "large.json").read_bytes()
    assert (landed / "inputs.txt").read_text().split() == ["case.json", "settings.json"]
    assert (landed / "stdout.txt").read_text() == "ran\n"
    record = json.loads((landed / "job.json").read_text())
    assert (record["node"], record["exit_code"], record["state"], record["attempts"]) == ("n1", 0, "ok", 1)
    assert not task.exists()                          # the task's copy is gone once results landed


# --- a real Slurm --------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm():
    try:
        cluster = start_slurm_cluster()
    except SlurmUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
    yield cluster
    cluster.stop()


def archive_contents(folder: Path) -> Dict[str, object]:
    """Every file under folder by relative path: bytes, or job.json without start/end/node."""
    contents: Dict[str, object] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_dir():
            continue
        rel = str(path.relative_to(folder))
        if path.name == "job.json":
            record = json.loads(path.read_text())
            assert all(record.pop(key) for key in VOLATILE_JOB_FIELDS), rel
            contents[rel] = record
        else:
            contents[rel] = path.read_bytes()
    return contents


def submit_and_fetch(slurm, out: Path, fetched: Path, cluster_dir: Path = None) -> Dict[str, str]:
    """Upload (when the cluster dir is elsewhere), submit there, wait, fetch into `fetched`."""
    cluster_dir = cluster_dir or out
    if cluster_dir != out:
        upload = subprocess.run(["sh", str(out / "upload.sh")], capture_output=True, text=True)
        assert upload.returncode == 0, upload.stderr
    submit = slurm.run(["sh", str(cluster_dir / "submit.sh")], cwd=out.parent)
    assert submit.returncode == 0, submit.stderr
    ids = (cluster_dir / "submitted.txt").read_text().split()
    states = slurm.wait_for_jobs(ids)
    fetch = subprocess.run(["sh", str(out / "fetch.sh"), str(fetched)], capture_output=True, text=True)
    assert fetch.returncode == 0, fetch.stderr
    return states


def test_python_batch_on_slurm_matches_distribute_run(tmp_path, slurm):
    src = tmp_path / "src"
    shutil.copytree(EXAMPLES / "python", src)
    job_file = src / "distribute-jobs.yaml"
    # all of the node's cpus, so DISTRIBUTE_CPUS (printed by run.py) equals what `run` sees
    job_file.write_text(job_file.read_text() + f"slurm:\n  cpus_per_task: {slurm.cpus}\n  time: '10'\n")
    local = distribute("run", str(job_file), "--save-dir", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    out = tmp_path / "out"
    cluster_dir = tmp_path / "cluster" / "oscillator"
    made = distribute("slurm", str(job_file), str(out), "--cluster-dir", str(cluster_dir))
    assert made.returncode == 0, made.stderr

    states = submit_and_fetch(slurm, out, tmp_path / "fetched", cluster_dir)

    assert sorted(states.values()) == ["COMPLETED"] * 4      # the build and three array tasks
    expected = archive_contents(tmp_path / "local")
    assert set(expected) >= {"examples/oscillator_demo/damping_0.5/trajectory.csv",
                             f"examples/oscillator_demo/build/{slurm.node}.txt"}
    assert archive_contents(tmp_path / "fetched") == expected
    assert list((cluster_dir / "work").iterdir()) == []      # no task copies left behind
    assert not (out / "results").exists()


def test_shell_batch_with_retries_and_split_arrays_matches_distribute_run(tmp_path, slurm):
    src = tmp_path / "src"
    shutil.copytree(EXAMPLES / "shell", src)
    job_file = src / "distribute-jobs.yaml"
    job_file.write_text(job_file.read_text() + (
        "    - name: flaky\n"
        "      command: \"echo out; echo err >&2; exit 3\"\n"
        "      retries: 1\n"
        "      params: {re: 100, mesh: fine}\n"
        "    - name: cwd_and_env\n"
        "      command: \"ls -A input > distribute_save/input.txt; ls -A distribute_save | wc -l; "
        "echo $DISTRIBUTE_NAMESPACE/$DISTRIBUTE_BATCH/$DISTRIBUTE_JOB; test -d tools\"\n"))
    local = distribute("run", str(job_file), "--save-dir", str(tmp_path / "local"))
    assert local.returncode == 1, local.stderr                 # flaky fails both ways
    out = tmp_path / "out"
    made = distribute("slurm", str(job_file), str(out), "--max-array-size", "2", "--throttle", "1")
    assert made.returncode == 0, made.stderr
    assert "5 jobs in 3 job arrays" in made.stdout

    states = submit_and_fetch(slurm, out, tmp_path / "fetched")

    assert sorted(states.values()) == ["COMPLETED"] * 5 + ["FAILED"]
    expected = archive_contents(tmp_path / "local")
    flaky = expected["examples/word_counts/flaky/job.json"]
    assert (flaky["exit_code"], flaky["attempts"], flaky["state"]) == (3, 2, "failed")
    assert flaky["params"] == {"re": 100, "mesh": "fine"}
    assert expected["examples/word_counts/cwd_and_env/stdout.txt"] == b"1\nexamples/word_counts/cwd_and_env\n"
    assert archive_contents(tmp_path / "fetched") == expected


def test_submit_stops_when_sbatch_refuses_a_script(tmp_path, slurm):
    src = tmp_path / "src"
    shutil.copytree(EXAMPLES / "python", src)
    job_file = src / "distribute-jobs.yaml"
    text = job_file.read_text().replace("      file: run.py\n", "      file: run.py\n      slurm: {partition: nosuch}\n")
    job_file.write_text(text)
    out = tmp_path / "out"
    assert distribute("slurm", str(job_file), str(out)).returncode == 0

    submit = slurm.run(["sh", str(out / "submit.sh")], cwd=tmp_path)

    assert submit.returncode == 1
    lines = submit.stderr.splitlines()
    assert lines[0].startswith("submit.sh: sbatch refused array-1.sbatch: sbatch: error: ")
    assert "invalid partition" in lines[0].lower()
    build_id = submit.stdout.split("build.sbatch: Slurm job ")[1].split()[0]
    assert lines[1] == f"submit.sh: already submitted: {build_id}; cancel them with: scancel {build_id}"
    assert not (out / "submitted.txt").exists()
    slurm.wait_for_jobs([build_id])


def test_scancel_lands_partial_output_marked_killed(tmp_path, slurm):
    path = write_batch(tmp_path / "src", (
        "meta: {batch_name: long, namespace: ns}\n"
        "shell:\n  jobs:\n"
        "    - name: slow\n"
        "      command: \"echo started; echo partial > distribute_save/p.txt; sleep 120\"\n"
        "      retries: 3\n"))
    out = tmp_path / "out"
    assert distribute("slurm", str(path), str(out)).returncode == 0
    submit = slurm.run(["sh", str(out / "submit.sh")], cwd=tmp_path)
    assert submit.returncode == 0, submit.stderr
    job_id = (out / "submitted.txt").read_text().split()[0]
    started = out / "work" / "slow" / ".distribute" / "stdout.txt"
    deadline = time.monotonic() + 60
    while not (started.exists() and started.read_text() == "started\n"):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)

    begin = time.monotonic()
    assert slurm.run(["scancel", job_id]).returncode == 0
    states = slurm.wait_for_jobs([job_id])

    assert time.monotonic() - begin < 20          # not Slurm's KillWait: the job ended on SIGTERM
    assert list(states.values()) == ["CANCELLED"]
    landed = out / "results" / "ns" / "long" / "slow"
    assert (landed / "stdout.txt").read_text() == "started\n"
    assert (landed / "p.txt").read_text() == "partial\n"
    record = json.loads((landed / "job.json").read_text())
    assert (record["state"], record["attempts"]) == ("killed", 1)
    assert record["exit_code"] != 0


# --- resources and dependencies (SPEC §3 `resources:`, `meta.after`) ------------

def test_resources_become_sbatch_options_and_slurm_options_win(tmp_path):
    path = write_batch(tmp_path / "src", (
        "meta:\n  batch_name: b\n  namespace: ns\n  resources: {cpus: 4, memory: 1.5G, time: 1h30m}\n"
        "  after: [ns/sweep]\n"
        "shell:\n  jobs:\n"
        "    - {name: plain, command: 'true'}\n"
        "    - {name: gpu, command: 'true', resources: {gpus: 2, time: 26h}}\n"
        "    - {name: own, command: 'true', slurm: {cpus_per_task: 8, mem_per_cpu: 1G}}\n"))
    out = tmp_path / "out"
    result = distribute("slurm", str(path), str(out))
    assert result.returncode == 0, result.stderr
    assert sbatch_lines(out / "array-1.sbatch")[3:] == [
        "#SBATCH --cpus-per-task=4", "#SBATCH --time=01:30:00", "#SBATCH --mem=1536M"]
    assert sbatch_lines(out / "array-2.sbatch")[3:] == [
        "#SBATCH --cpus-per-task=4", "#SBATCH --time=1-02:00:00", "#SBATCH --mem=1536M", "#SBATCH --gres=gpu:2"]
    assert sbatch_lines(out / "array-3.sbatch")[3:] == [     # explicit slurm options: no --mem beside mem_per_cpu
        "#SBATCH --cpus-per-task=8", "#SBATCH --mem-per-cpu=1G", "#SBATCH --time=01:30:00"]
    note = [line for line in result.stdout.splitlines() if "note:" in line]
    assert len(note) == 1 and "meta.after (ns/sweep)" in note[0] and "AFTER=" in note[0]
    (tmp_path / "sbatch").write_text("#!/bin/sh\nexit 9\n")
    (tmp_path / "sbatch").chmod(0o755)
    bad = subprocess.run(["sh", str(out / "submit.sh")], env=dict(os.environ, AFTER="1; rm -rf /",
                                                                  PATH=f"{tmp_path}:{os.environ['PATH']}"),
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "AFTER must be Slurm job ids" in bad.stderr


def test_a_batch_after_another_starts_on_slurm_when_it_succeeded(tmp_path, slurm):
    first = write_batch(tmp_path / "a", "meta: {batch_name: first, namespace: ns}\nshell:\n  jobs:\n"
                        "    - {name: one, command: 'sleep 2; date +%s.%N > distribute_save/t.txt'}\n")
    second = write_batch(tmp_path / "b", "meta: {batch_name: second, namespace: ns, after: [first]}\n"
                         "shell:\n  jobs:\n    - name: two\n      resources: {cpus: 1, memory: 100M, time: 1m}\n"
                         "      command: 'date +%s.%N > distribute_save/t.txt; echo $SLURM_CPUS_PER_TASK'\n")
    for path, out in ((first, tmp_path / "out-a"), (second, tmp_path / "out-b")):
        made = distribute("slurm", str(path), str(out))
        assert made.returncode == 0, made.stderr
    submitted = slurm.run(["sh", str(tmp_path / "out-a" / "submit.sh")])
    assert submitted.returncode == 0, submitted.stderr
    after = (tmp_path / "out-a" / "submitted.txt").read_text()
    then = subprocess.run(["sh", str(tmp_path / "out-b" / "submit.sh")], capture_output=True, text=True,
                          env=dict(slurm.env, AFTER=after))
    assert then.returncode == 0, then.stderr
    ids = after.split() + (tmp_path / "out-b" / "submitted.txt").read_text().split()
    assert sorted(slurm.wait_for_jobs(ids).values()) == ["COMPLETED"] * 2
    for out in ("out-a", "out-b"):
        fetch = subprocess.run(["sh", str(tmp_path / out / "fetch.sh"), str(tmp_path / "fetched")],
                               capture_output=True, text=True)
        assert fetch.returncode == 0, fetch.stderr
    one = float((tmp_path / "fetched/ns/first/one/t.txt").read_text())
    two = float((tmp_path / "fetched/ns/second/two/t.txt").read_text())
    assert two > one
    assert (tmp_path / "fetched/ns/second/two/stdout.txt").read_text().strip() == "1"

"""The job lifecycle end to end on real sshd nodes: the paths a newcomer and a broken machine
take (issue 12 items 1, 2, 4, 5, 6; issue 18 items 6, 7, 10, 8/9 head side)."""

import json
import os
import subprocess
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

from cluster import DISTRIBUTE, wait_until

ROOT = Path(__file__).resolve().parent.parent


def shared_folder():
    """A folder every account (the node account too) can write: jobs leave marks there."""
    folder = Path(tempfile.mkdtemp(prefix="dlife-", dir="/tmp"))
    os.chmod(folder, 0o777)
    return folder


def shell_batch(folder, name, jobs, caps=("only1",), namespace="lab", retries=0):
    """A shell batch: `jobs` is {job name: command}."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"meta: {{batch_name: {name}, namespace: {namespace}, capabilities: [{', '.join(caps)}]}}",
             "shell:", "  jobs:"]
    for job, command in jobs.items():
        lines.append(f"    - {{name: {job}, command: {json.dumps(command)}, retries: {retries}}}")
    path = folder / "distribute-jobs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def job_record(head, key, job):
    return json.loads((head.archive / key / job / "job.json").read_text())


def node_idle(head, name):
    node = next(n for n in head.nodes() if n["name"] == name)
    return node if node["reachable"] and not node["running"] else None


def supervisor_of(workdir):
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "supervise" in cmd and str(workdir) in cmd:
            return proc
    return None


def job_processes(marker):
    return [p for p in psutil.process_iter(["cmdline"]) if marker in " ".join(p.info["cmdline"] or [])]


# --- issue 12 item 1: the first batch on a node with two slots ------------------------------

@pytest.mark.nodes(slots={"node1": 2}, caps={"node1": ["only1"]})
def test_first_template_batch_on_a_two_slot_node_runs_every_job_and_frees_both_slots(head, tmp_path):
    result = subprocess.run(DISTRIBUTE + ["template", "python", "-o", str(tmp_path / "b")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    job_file = tmp_path / "b" / "distribute-jobs.yaml"
    job_file.write_text(job_file.read_text().replace("capabilities: [python3]", "capabilities: [only1]"))
    head.wait_nodes_up(3)
    head.cli("add", job_file)
    batch = head.wait_batch("root/my_first_batch")         # the template's namespace: your login
    assert batch["jobs"]["done"] == 2, (batch, head.log.read_text()[-3000:])
    for job in ("job_1", "job_2"):
        assert (head.archive / "root/my_first_batch" / job / "result.txt").is_file()
    wait_until(lambda: node_idle(head, "node1"), 20, "node1 with both slots free")
    assert "Task exception was never retrieved" not in head.log.read_text()


@pytest.mark.nodes(slots={"node1": 2}, caps={"node1": ["only1"]})
def test_two_slots_run_two_jobs_at_once_and_show_progress_of_both(head, tmp_path):
    marks = shared_folder()
    command = (f"echo 40 > $DISTRIBUTE_PROGRESS; touch {marks}/$DISTRIBUTE_JOB.started; "
               f"while [ ! -e {marks}/go ]; do sleep 0.1; done")
    head.wait_nodes_up(3)
    head.cli("add", shell_batch(tmp_path / "b", "two", {"a": command, "b": command}))
    wait_until(lambda: (marks / "a.started").exists() and (marks / "b.started").exists(), 60,
               "both jobs running at once on node1")
    def both_show_progress():
        rows = [r for r in head.status()["running"] if r.get("progress") == 40]
        return rows if len(rows) == 2 else None
    running = wait_until(both_show_progress, 20, "progress of the jobs in both slots")
    assert sorted(r["job"] for r in running) == ["a", "b"]
    (marks / "go").touch()
    assert head.wait_batch("lab/two")["jobs"]["done"] == 2


# --- issue 12 item 2: retry after the batch has ended --------------------------------------

@pytest.mark.nodes(caps={"node1": ["only1"]})
def test_retry_after_the_end_runs_failed_and_killed_jobs_again(head, tmp_path):
    marks = shared_folder()
    folder = tmp_path / "b"
    (folder).mkdir()
    job_file = folder / "distribute-jobs.yaml"
    job_file.write_text(textwrap.dedent(f"""\
        meta: {{batch_name: slow, namespace: lab, capabilities: [only1]}}
        python:
          initialize:
            build_file: build.py
          jobs:
            - {{name: flaky, file: flaky.py}}
        """))
    (folder / "build.py").write_text("open('built.txt', 'w').write('built')\n")
    (folder / "flaky.py").write_text(textwrap.dedent(f"""\
        import os, sys
        n = len(os.listdir({str(marks)!r}))
        open(os.path.join({str(marks)!r}, "run%d" % n), "w").close()
        print("attempt", n + 1, open("built.txt").read())
        sys.exit(0 if n else 3)
        """))
    head.wait_nodes_up(3)
    head.cli("add", job_file)
    assert head.wait_batch("lab/slow")["jobs"]["failed"] == 1
    why = head.cli("why", "lab/slow/flaky").stdout
    assert "exit code 3" in why, why
    assert head.cli("retry", "lab/slow").stdout.strip() == "lab/slow: 1 jobs queued again"
    batch = head.wait_batch("lab/slow")
    assert batch["jobs"]["done"] == 1, (batch, head.log.read_text()[-3000:])
    logs = head.cli("logs", "lab/slow/flaky").stdout
    assert "attempt 2 built" in logs and "attempt 1" not in logs

    # a killed job comes back with --all and runs, not as failed
    sleeper = shell_batch(tmp_path / "k", "sleepy", {"nap": f"touch {marks}/nap-started; sleep 600"})
    head.cli("add", sleeper)
    wait_until(lambda: (marks / "nap-started").exists(), 60, "the sleeper to start")
    head.cli("kill", "lab/sleepy")
    assert head.wait_batch("lab/sleepy")["jobs"]["killed"] == 1
    sleeper.write_text(sleeper.read_text())          # same file; the job itself is re-run as stored
    (marks / "nap-started").unlink()
    assert head.cli("retry", "lab/sleepy").stdout.strip() == "lab/sleepy: 0 jobs queued again"
    assert head.cli("retry", "lab/sleepy", "--all").stdout.strip() == "lab/sleepy: 1 jobs queued again"
    wait_until(lambda: (marks / "nap-started").exists(), 60, "the killed job to run again")
    head.cli("kill", "lab/sleepy")
    assert head.wait_batch("lab/sleepy")["jobs"]["killed"] == 1


# --- issue 12 item 6: logs of a queued job, logs -f of a failing one --------------------------

@pytest.mark.nodes(caps={"node1": ["only1"]})
def test_logs_of_a_queued_job_says_so_and_follow_ends_with_the_outcome(head, tmp_path):
    marks = shared_folder()
    head.wait_nodes_up(3)
    head.cli("add", shell_batch(tmp_path / "b", "seq", {
        "first": f"echo working; while [ ! -e {marks}/go ]; do sleep 0.1; done; echo bye; exit 3",
        "second": "echo second"}))
    wait_until(lambda: head.batch("lab/seq") and head.batch("lab/seq")["jobs"]["running"] == 1, 60, "first running")
    queued = head.cli("logs", "lab/seq/second")
    assert queued.returncode == 0
    assert queued.stdout.strip() == "lab/seq/second is queued: no output yet"
    follow = subprocess.Popen(DISTRIBUTE + ["--head", "local", "--socket", str(head.socket), "logs", "-f",
                                            "lab/seq/first"], env=head.env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        (marks / "go").touch()
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 1, (out, err)
    assert out.splitlines()[:2] == ["working", "bye"]
    assert err.strip().splitlines()[-1] == "lab/seq/first failed (exit code 3)"


# --- issue 18 item 6: the supervisor killed -9 while a job runs ------------------------------

@pytest.mark.nodes(caps={"node1": ["only1"]})
def test_supervisor_killed_mid_job_new_one_watches_the_job_and_kill_works(head, tmp_path):
    marks = shared_folder()
    head.wait_nodes_up(3)
    head.cli("add", shell_batch(tmp_path / "a", "adopt", {
        "ends": f"touch {marks}/ends.started; while [ ! -e {marks}/go ]; do sleep 0.1; done; "
                "echo ok > distribute_save/out.txt"}))
    wait_until(lambda: (marks / "ends.started").exists(), 60, "the job to start")
    old = supervisor_of(head.workdirs["node1"])
    old.kill()
    wait_until(lambda: supervisor_of(head.workdirs["node1"]) not in (None, old), 60, "a new supervisor")
    (marks / "go").touch()
    batch = head.wait_batch("lab/adopt", timeout=60)
    assert batch["jobs"]["done"] == 1, (batch, head.log.read_text()[-3000:])
    wait_until(lambda: node_idle(head, "node1"), 20, "node1's slot free")

    head.cli("add", shell_batch(tmp_path / "b", "stuck", {
        "forever": f"touch {marks}/forever.started; exec sleep 987"}))
    wait_until(lambda: (marks / "forever.started").exists(), 60, "the second job to start")
    ups = head.log.read_text().count("node node1: up")
    supervisor_of(head.workdirs["node1"]).kill()
    wait_until(lambda: head.log.read_text().count("node node1: up") > ups, 60, "node1 back with a new supervisor")
    head.cli("kill", "lab/stuck")
    wait_until(lambda: head.batch("lab/stuck")["jobs"]["killed"] == 1, 60, "the adopted job killed")
    wait_until(lambda: not job_processes("sleep 987"), 20, "the job's process to be gone")
    wait_until(lambda: node_idle(head, "node1"), 20, "node1's slot free")


# --- issue 18 item 7: a node rebooted with its workdir kept ----------------------------------

@pytest.mark.nodes(caps={"node1": ["only1"]})
def test_run_from_a_previous_boot_is_requeued_even_if_its_pid_is_reused(head, tmp_path):
    marks = shared_folder()
    head.wait_nodes_up(3)
    head.cli("add", shell_batch(tmp_path / "a", "boot", {
        "job": f"n=$(ls {marks} | wc -l); touch {marks}/run$n; "
               f"if [ $n = 0 ]; then exec sleep 876; fi; echo second > distribute_save/out.txt"}))
    wait_until(lambda: (marks / "run0").exists(), 60, "the job to start")
    head.stop()
    # the machine goes down: supervisor and job die; after the reboot a stranger holds the pid
    supervisor_of(head.workdirs["node1"]).kill()
    for proc in job_processes("sleep 876"):
        proc.kill()
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        runs = head.workdirs["node1"] / ".distribute" / "runs"
        (record_file,) = [p / "record.json" for p in runs.iterdir()]
        record = json.loads(record_file.read_text())
        record["pid"] = stranger.pid
        if "boot_id" in record:                 # records that know their boot: an earlier one
            record["boot_id"] = "an-earlier-boot"
        record_file.write_text(json.dumps(record))
        head.start()
        batch = head.wait_batch("lab/boot", timeout=90)
        assert batch["jobs"]["done"] == 1, (batch, head.log.read_text()[-3000:])
        assert job_record(head, "lab/boot", "job")["attempts"] == 1
        assert stranger.poll() is None          # nobody touched the stranger's process
    finally:
        stranger.kill()
        stranger.wait()


# --- issue 18 item 10: add --replace while the old batch runs --------------------------------

@pytest.mark.nodes(slots={"node1": 2}, caps={"node1": ["only1"]})
def test_replace_while_running_keeps_old_results_out_and_runs_the_new_batch(head, tmp_path):
    marks = shared_folder()
    head.wait_nodes_up(3)
    old = {f"j{i}": f"touch {marks}/old{i}; echo old > distribute_save/who.txt; sleep 600" for i in range(2)}
    job_file = shell_batch(tmp_path / "b", "rep", old)
    head.cli("add", job_file)
    wait_until(lambda: (marks / "old0").exists() and (marks / "old1").exists(), 60, "both old jobs running")
    shell_batch(tmp_path / "b", "rep", {f"j{i}": "echo new > distribute_save/who.txt" for i in range(2)})
    head.cli("add", job_file, "--replace")
    batch = head.wait_batch("lab/rep", timeout=90)
    assert batch["jobs"]["done"] == 2, (batch, head.log.read_text()[-3000:])
    for i in range(2):
        assert (head.archive / "lab/rep" / f"j{i}" / "who.txt").read_text() == "new\n"
        assert job_record(head, "lab/rep", f"j{i}")["state"] == "ok"
    wait_until(lambda: node_idle(head, "node1"), 20, "node1's slots free")
    assert "UNIQUE constraint" not in head.log.read_text()


# --- issue 18 items 8/9 (head side): a build that cannot start ends visibly ------------------

@pytest.mark.nodes(caps={"node1": ["only1"]})
def test_build_that_cannot_start_backs_off_and_fails_the_node_visibly(head, tmp_path):
    # the batch's namespace folder on node1 is a root-owned file: every build start fails there
    blocker = head.workdirs["node1"] / "lab"
    blocker.write_text("not a folder\n")
    head.wait_nodes_up(3)
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "distribute-jobs.yaml").write_text(
        "meta: {batch_name: nospace, namespace: lab, capabilities: [only1]}\n"
        "shell:\n  initialize:\n    build: 'echo built'\n  jobs:\n    - {name: a, command: 'echo a'}\n")
    head.cli("add", folder / "distribute-jobs.yaml")
    batch = head.wait_batch("lab/nospace", timeout=90)
    assert batch["jobs"]["failed"] == 1
    why = head.cli("why", "lab/nospace/a").stdout
    assert "could not start the build on node1" in why, why
    attempts = head.log.read_text().count("build of lab/nospace could not start")
    assert 1 <= attempts <= 5, head.log.read_text()[-3000:]


# --- issue 12 item 4: serve --group of a group the head's account is not in --------------------

def test_serve_with_a_group_the_account_is_not_in_says_so(public_tmp, pyz):
    import grp
    import pwd
    user = "dalice"
    entry = pwd.getpwnam(user)
    groups = {g.gr_name for g in grp.getgrall() if user in g.gr_mem} | {grp.getgrgid(entry.pw_gid).gr_name}
    other = next(g.gr_name for g in grp.getgrall() if g.gr_name not in groups)
    os.chmod(public_tmp, 0o777)
    program = public_tmp / "distribute.pyz"
    program.write_bytes(pyz.read_bytes())
    program.chmod(0o644)
    result = subprocess.run(["/usr/bin/python3", str(program), "serve", "--state", str(public_tmp / "state"),
                             "--archive", str(public_tmp / "archive"), "--group", other],
                            capture_output=True, text=True, timeout=120, cwd=str(public_tmp),
                            env=dict(os.environ, HOME=str(public_tmp)), user=entry.pw_uid, group=entry.pw_gid,
                            extra_groups=[])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and other in lines[0] and "not a member" in lines[0], result.stderr

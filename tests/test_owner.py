"""The person at the workstation comes first (issue 14), and `pause` from the node's pyz
locks where its supervisor watches (issue 12, item 3).

The policy's decisions are pure functions, tested here with made-up samples and
an injected clock; the probe is tested on real processes of real accounts; the
rest runs a real head (`distribute serve`) over three real sshd nodes, where an
ordinary user burns CPU or logs in with a terminal (downer: an account of these
tests alone, see the `accounts` fixture).  All three nodes
share this machine, so every policy names the accounts that count (users:) and
jobs sleep instead of burning CPU: a node sees the other nodes' processes too.
"""

import datetime
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

import distribute
from cluster import wait_until
from distribute import OwnerPolicy, OwnerSample, OwnerState, owner_decide

ROOT = Path(__file__).resolve().parent.parent


# --- the nodes file -------------------------------------------------------------------------

def nodes_file(tmp_path, owner_block):
    path = tmp_path / "distribute-nodes.yaml"
    path.write_text("nodes:\n  - name: desk1\n    host: desk1\n    owner:\n"
                    + textwrap.indent(textwrap.dedent(owner_block), "      "))
    return str(path)


def test_owner_block_is_read_with_every_key(tmp_path):
    policy = distribute.load_nodes_file(nodes_file(tmp_path, """\
        busy: {cpu: 50%, for: 30s}
        console: {idle: 5m, ssh: true}
        quiet: 2m
        users: [bob]
        desk_hours:
          - {days: mon-fri, hours: "09:00-18:00", slots: 1}
          - {days: [sat, sun], hours: 10-12, slots: 0}
        vacate: {after: 30m, gpu_at_once: true}
        """))[0].owner
    assert (policy.busy_cpu, policy.busy_for, policy.console_idle, policy.console_ssh, policy.quiet) == \
        (50.0, 30.0, 300.0, True, 120.0)
    assert policy.users == ["bob"] and (policy.vacate_after, policy.vacate_gpu_at_once) == (1800.0, True)
    assert [(d.days, d.start, d.end, d.slots) for d in policy.desk_hours] == \
        [([0, 1, 2, 3, 4], 540, 1080, 1), ([5, 6], 600, 720, 0)]


def test_a_node_without_owner_block_has_no_policy(tmp_path):
    path = tmp_path / "distribute-nodes.yaml"
    path.write_text("nodes:\n  - name: desk1\n    host: desk1\n")
    assert distribute.load_nodes_file(str(path))[0].owner is None


@pytest.mark.parametrize("block, message", [
    ("busy: {cpu: lots}\n", "owner.busy.cpu: 'lots' is not a percentage like 50%"),
    ("busy: {for: 10s}\n", "owner.busy: missing required key 'cpu'"),
    ("quiet: soon\n", "owner.quiet: duration 'soon' is not like 4h, 90m, 1h30m or 60s"),
    ("console: {ssh: maybe}\n", "owner.console.ssh: expected true or false, found text"),
    ("desk_hours: [{days: mon-fri, hours: 18-9, slots: 1}]\n", "must lie within 00:00-24:00 and end after it starts"),
    ("desk_hours: [{days: someday, hours: 9-18, slots: 1}]\n", "'someday' is not a day or a range of days"),
    ("vacate: {after: 10m, gpu: yes}\n", "owner.vacate.gpu: unknown key (expected one of: after, gpu_at_once)"),
    ("idle: 5m\n", "owner.idle: unknown key"),
])
def test_bad_owner_block_is_one_line_naming_the_place(tmp_path, block, message):
    with pytest.raises(distribute.UserError) as caught:
        distribute.load_nodes_file(nodes_file(tmp_path, block))
    text = str(caught.value)
    assert message in text and ":5:" in text and "\n" not in text


def test_bad_owner_block_exits_2_from_the_command_line(tmp_path):
    path = nodes_file(tmp_path, "busy: {cpu: lots}\n")
    result = subprocess.run([sys.executable, str(ROOT / "distribute.py"), "nodes", "--check", "--nodes", path],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "owner.busy.cpu" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# --- the decisions, with made-up samples and clocks --------------------------------------------

def run_policy(policy, samples):
    """Feed (time, sample) pairs; returns the reason in force after each."""
    state, reasons = OwnerState(), []
    for now, sample in samples:
        state = owner_decide(policy, state, sample, now)
        reasons.append(state.reason)
    return reasons


def test_busy_pauses_after_its_duration_and_resumes_after_quiet():
    policy = OwnerPolicy(busy_cpu=50, busy_for=3, quiet=5)
    busy, calm = OwnerSample(73, "bob", 73), OwnerSample(10, "bob", 10)
    reasons = run_policy(policy, [(0, busy), (1, busy), (2, busy), (3, busy), (4, calm), (5, busy),
                                  (6, calm), (10, calm), (11, calm)])
    assert reasons[:3] == ["", "", ""]                     # over the limit for less than 3 s
    assert reasons[3] == "owner busy: 73% CPU by bob"      # 3 s: paused, and says why
    assert reasons[4:8] == [reasons[3]] * 4                # load came back at 5: quiet starts again at 6
    assert reasons[8] == ""                                # 5 s quiet since 6: resumed


def test_a_dip_restarts_the_busy_clock():
    policy = OwnerPolicy(busy_cpu=50, busy_for=3)
    busy, calm = OwnerSample(80, "bob", 80), OwnerSample(0)
    assert run_policy(policy, [(0, busy), (2, busy), (2.5, calm), (3, busy), (5, busy), (6, busy)]) == \
        ["", "", "", "", "", "owner busy: 80% CPU by bob"]


def test_console_input_pauses_at_once_and_busy_alone_does_not_without_a_cpu_limit():
    policy = OwnerPolicy(console_idle=300, quiet=60)
    reasons = run_policy(policy, [(0, OwnerSample(300, "bob", 300)), (1, OwnerSample(console="alice on tty2")),
                                  (50, OwnerSample()), (111, OwnerSample())])
    assert reasons == ["", "console active: alice on tty2", "console active: alice on tty2", ""]


@pytest.mark.parametrize("moment, slots", [
    (datetime.datetime(2026, 11, 30, 9, 0), 1),     # Monday 09:00: desk hours begin
    (datetime.datetime(2026, 11, 30, 8, 59), None),
    (datetime.datetime(2026, 11, 30, 17, 59), 1),
    (datetime.datetime(2026, 11, 30, 18, 0), None),  # the end is not included
    (datetime.datetime(2026, 12, 5, 11, 0), 0),      # Saturday 11:00
    (datetime.datetime(2026, 12, 5, 9, 0), None),
    (datetime.datetime(2026, 12, 4, 12, 30), 0),     # Friday lunch: both ranges, the fewest wins
])
def test_desk_hours_with_an_injected_clock(moment, slots):
    policy = OwnerPolicy(desk_hours=[distribute.DeskHours([0, 1, 2, 3, 4], 9 * 60, 18 * 60, 1),
                                     distribute.DeskHours([4, 5, 6], 10 * 60, 13 * 60, 0)])
    assert distribute.desk_slots(policy, moment) == slots


def test_vacate_after_its_time_and_gpu_jobs_at_once():
    vacates = distribute.owner_vacates
    policy = OwnerPolicy(vacate_after=600, vacate_gpu_at_once=True)
    assert not vacates(policy, None, True, 1000)                      # not paused: never
    assert not vacates(policy, 1000, False, 1599) and vacates(policy, 1000, False, 1600)
    assert vacates(policy, 1000, True, 1000)                          # holds a GPU: at once
    assert not vacates(OwnerPolicy(vacate_after=600), 1000, True, 1000)
    assert not vacates(None, 0, True, 10 ** 9)


OWNER = "downer"


def test_the_supervisor_vacates_a_gpu_job_at_once_and_keeps_the_others(tmp_path):
    """One tick of the supervisor's owner loop on a paused node: the job holding a GPU is
    killed and recorded as vacated (the head then queues it elsewhere); the other waits."""
    import asyncio
    supervisor = distribute.Supervisor(tmp_path / "work")
    supervisor.policy = OwnerPolicy(vacate_after=3600, vacate_gpu_at_once=True)
    supervisor.paused_since = time.time()
    jobs = {}
    for run_id, gpu in (("1.1", True), ("2.1", False)):
        proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
        record = distribute.RunRecord(run_id, "lab", "b", f"job{run_id[0]}", pid=proc.pid, start=time.time())
        supervisor.save_record(record)
        supervisor.live[run_id] = distribute.LiveRun(record, proc)
        if gpu:
            supervisor.gpu_runs.add(run_id)
        jobs[run_id] = proc

    async def one_tick():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(supervisor.watch_owner(), 0.5)
    try:
        asyncio.run(one_tick())
        assert jobs["1.1"].wait(timeout=10) == -signal.SIGKILL
        assert supervisor.load_record("1.1").vacated and supervisor.live["1.1"].dying
        assert jobs["2.1"].poll() is None and not supervisor.load_record("2.1").vacated
    finally:
        for proc in jobs.values():
            proc.kill()
            proc.wait()


# --- the probe, on real processes of real accounts -----------------------------------------------

def as_user(name):
    import pwd
    entry = pwd.getpwnam(name)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [], "cwd": "/"}


BURN = "while :; do :; done"


JOB_ACCOUNT = "downerjob"    # no other test uses it: its only processes are this job's


@pytest.fixture(scope="module", autouse=True)
def accounts(ssh_keys):
    """Ordinary accounts of these tests alone: `downer`, the workstation's owner, and
    `downerjob`, a job's.  (dalice and dbob run other tests' commands on this machine at
    the same time, which a policy would rightly count.)"""
    import sshd as lab
    for name in (OWNER, JOB_ACCOUNT):
        lab._ensure_user(name, [])


def test_probe_counts_the_owner_and_never_a_jobs_own_children(accounts):
    """A job whose children burn CPU, in a session of its own and in a grandchild that left
    it with setsid, counts for nothing although its account counts; downer burning counts, named."""
    job = subprocess.Popen(["sh", "-c", f"sh -c '{BURN}' & setsid sh -c '{BURN}' & {BURN}"],
                           start_new_session=True, **as_user(JOB_ACCOUNT))
    owner = None
    try:
        wait_until(lambda: len(psutil.Process(job.pid).children(recursive=True)) >= 2, 10, "the job's children")
        probe = distribute.OwnerProbe(OwnerPolicy(busy_cpu=20, users=[JOB_ACCOUNT, "downer"]))
        probe.sample([job.pid], time.time())

        def sample_after(seconds):
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                time.sleep(0.05)
            return probe.sample([job.pid], time.time())
        quiet = sample_after(1.0)
        assert quiet.cpu == 0, quiet      # three processes of the job burn: none of it is the owner's
        owner = subprocess.Popen(["sh", "-c", BURN], **as_user("downer"))
        probe.sample([job.pid], time.time())
        busy = sample_after(1.0)
        assert busy.top_user == "downer" and busy.top_cpu > 5, busy    # a loaded machine gives it little
    finally:
        for proc in [job] + ([owner] if owner else []):
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()


def test_probe_ignores_other_accounts_when_users_are_named(accounts):
    burner = subprocess.Popen(["sh", "-c", BURN], **as_user("dbob"))
    try:
        probe = distribute.OwnerProbe(OwnerPolicy(busy_cpu=20, users=["downer"]))
        probe.sample([], time.time())
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            time.sleep(0.05)
        assert probe.sample([], time.time()).cpu == 0
    finally:
        burner.kill()
        burner.wait()


# --- on real sshd nodes -----------------------------------------------------------------------------

def shell_batch(folder, name, jobs, seconds, caps=()):
    """A shell batch of `jobs` jobs that each sleep `seconds` in small steps (little CPU)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"meta: {{batch_name: {name}, namespace: lab, capabilities: [{', '.join(caps)}]}}",
             "shell:", "  jobs:"]
    steps = int(seconds * 10)
    for i in range(jobs):
        lines += [f"    - name: job_{i}",
                  f"      command: \"i=0; while [ $i -lt {steps} ]; do sleep 0.1; i=$((i+1)); done; "
                  f"echo $DISTRIBUTE_JOB > distribute_save/out.txt\""]
    (folder / "distribute-jobs.yaml").write_text("\n".join(lines) + "\n")
    return folder / "distribute-jobs.yaml"


def logs_of(head, name):
    log = head.workdirs[name] / ".distribute" / "supervisor.log"
    return (f"\n--- {name}'s supervisor log ---\n{log.read_text()[-3000:] if log.exists() else '(none)'}"
            f"\n--- head log ---\n{head.log.read_text()[-3000:]}")


def await_on(head, name, condition, timeout, what):
    """wait_until, failing with the node's supervisor log and the head's log."""
    try:
        return wait_until(condition, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{logs_of(head, name)}") from None


def node_of(head, name):
    return next(n for n in head.nodes() if n["name"] == name)


def job_processes(workdir):
    """Processes whose working directory is under a node's workdir (its jobs), found with psutil."""
    found = []
    for proc in psutil.process_iter(["cwd"]):
        if (proc.info.get("cwd") or "").startswith(str(workdir) + "/") and "/.distribute" not in proc.info["cwd"]:
            found.append(proc)
    return found


def states(procs):
    out = []
    for proc in procs:
        try:
            out.append(proc.status())
        except psutil.Error:
            pass
    return out


def all_stopped(workdir):
    found = states(job_processes(workdir))
    return bool(found) and all(s in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) for s in found)


def none_stopped(workdir):
    found = states(job_processes(workdir))
    return bool(found) and psutil.STATUS_STOPPED not in found


def archived(head, key):
    """{job name: job.json} of everything archived for a batch."""
    return {p.parent.name: json.loads(p.read_text()) for p in (head.archive / key).glob("*/job.json")}


@pytest.fixture
def burner(accounts):
    """burner(user) starts a CPU burner as that user; all are killed at the end."""
    started = []

    def start(user):
        proc = subprocess.Popen(["sh", "-c", BURN], **as_user(user))
        started.append(proc)
        return proc
    yield start
    for proc in started:
        proc.kill()
        proc.wait()


# Only downer counts and it is idle but for the burner, so a low limit is exact; a higher one
# would measure this machine's load (two cores shared with other test runs), not the policy.
BUSY_FOR, QUIET = 2, 3


@pytest.mark.nodes(node_yaml={"node2": f"owner: {{busy: {{cpu: 2%, for: {BUSY_FOR}s}}, quiet: {QUIET}s, "
                                        "users: [downer]}\n"})
def test_owner_burning_cpu_stops_that_nodes_jobs_and_they_continue_after_quiet(head, tmp_path, burner):
    head.wait_nodes_up(3)
    head.cli("add", shell_batch(tmp_path / "b", "busy", jobs=3, seconds=25))
    for name in ("node1", "node2", "node3"):
        wait_until(lambda: job_processes(head.workdirs[name]), 60, f"a job running on {name}")
    burning = burner("downer")
    started = time.monotonic()
    await_on(head, "node2", lambda: all_stopped(head.workdirs["node2"]), BUSY_FOR + 4, "node2's jobs to stop")
    assert time.monotonic() - started <= BUSY_FOR + 2
    assert none_stopped(head.workdirs["node1"]) and none_stopped(head.workdirs["node3"])
    node2 = wait_until(lambda: node_of(head, "node2")["paused"] and node_of(head, "node2"), 5, "nodes to say why")
    reason = node2["paused"][0]["reason"]
    assert reason.startswith("owner busy: ") and reason.endswith("% CPU by downer"), reason
    assert node2["paused"][0]["since"]
    shown = head.cli("nodes").stdout
    assert "paused by the owner (owner busy: " in shown and "CPU by downer, since " in shown
    status = head.cli("status").stdout
    assert "node2 paused since " in status and ": the owner (owner busy: " in status, status

    burning.kill()
    burning.wait()
    quiet_from = time.monotonic()
    wait_until(lambda: none_stopped(head.workdirs["node2"]), QUIET + 5, "node2's jobs to continue")
    assert time.monotonic() - quiet_from >= QUIET - 1       # not before Z (1 s: the sampling tick)
    wait_until(lambda: not node_of(head, "node2")["paused"], 5, "node2 to report the end of the pause")
    head.wait_batch("lab/busy", timeout=180)
    assert sorted(archived(head, "lab/busy")) == ["job_0", "job_1", "job_2"]
    svg = head.cli("report", "lab/busy", "-o", "-").stdout
    assert 'class="pause"' in svg and "CPU by downer" in svg


@pytest.mark.nodes(node_yaml={"node2": "owner: {console: {idle: 5m, ssh: true}, quiet: 2s, users: [downer]}\n",
                              "node3": "owner: {console: {idle: 5m}, quiet: 2s, users: [downer]}\n"})
def test_a_pty_login_through_sshd_counts_only_where_the_policy_says_so(head, ssh_nodes, ssh_keys, accounts):
    head.wait_nodes_up(3)
    import sshd as lab
    with lab.SshClientHome("owner-pty", key=ssh_keys.get("client-alice")) as home:
        home.add_host("desk", ssh_nodes["node2"], "downer")
        assert not node_of(head, "node2")["paused"] and not node_of(head, "node3")["paused"]
        session = subprocess.Popen(["ssh", "-tt", "-F", str(home.config), "desk", "cat"], env=home.env(),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            session.stdin.write(b"typing\n")
            session.stdin.flush()
            node2 = wait_until(lambda: node_of(head, "node2")["paused"] and node_of(head, "node2"), 15,
                               "node2 (ssh: true) to pause for the pty login")
            reason = node2["paused"][0]["reason"]
            assert reason.startswith("console active: downer on pts/") and reason.endswith("(ssh)"), reason
            # node3 sees the same terminal (one machine) but its policy leaves ssh logins out:
            # two more of its ticks later it is still running.
            paused_at = time.monotonic()
            wait_until(lambda: time.monotonic() - paused_at > 2.5 or node_of(head, "node3")["paused"], 10,
                       "two ticks")
            assert not node_of(head, "node3")["paused"]
        finally:
            session.kill()
            session.wait()
        wait_until(lambda: not node_of(head, "node2")["paused"], 15, "node2 to resume after the logout")


@pytest.mark.nodes(slots={"node1": 2}, caps={"node1": ["desk"]},
                   node_yaml={"node1": "owner: {desk_hours: [{days: mon-sun, hours: 00:00-24:00, slots: 1}]}\n"})
def test_desk_hours_leave_fewer_slots(head, tmp_path):
    head.wait_nodes_up(3)
    node1 = wait_until(lambda: node_of(head, "node1").get("slots_now") == 1 and node_of(head, "node1"), 10,
                       "node1 to report its desk hours")
    assert node1["slots"] == 2
    assert "0/1 (desk hours; 2) slots" in head.cli("nodes").stdout
    head.cli("add", shell_batch(tmp_path / "d", "desk", jobs=3, seconds=1, caps=["desk"]))
    head.wait_batch("lab/desk", timeout=120)
    spans = sorted((job["start"], job["end"]) for job in archived(head, "lab/desk").values())
    assert len(spans) == 3 and all(job["node"] == "node1" for job in archived(head, "lab/desk").values())
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # one at a time


@pytest.mark.nodes(node_yaml={"node2": "owner: {busy: {cpu: 2%, for: 1s}, quiet: 1h, users: [downer], "
                                        "vacate: {after: 2s}}\n"})
def test_a_job_paused_too_long_is_vacated_and_runs_elsewhere_without_a_retry(head, tmp_path, burner):
    head.wait_nodes_up(3)
    head.cli("add", shell_batch(tmp_path / "v", "vacate", jobs=4, seconds=12))
    wait_until(lambda: any(r.get("job") for r in node_of(head, "node2")["running"]), 60, "a job on node2")
    moved = next(r["job"] for r in node_of(head, "node2")["running"] if r.get("job"))
    burner("downer")
    head.wait_batch("lab/vacate", timeout=180)
    jobs = archived(head, "lab/vacate")
    assert sorted(jobs) == ["job_0", "job_1", "job_2", "job_3"]       # every job archived, once each
    assert all(job["state"] == "ok" and job["attempts"] == 1 for job in jobs.values()), jobs
    assert jobs[moved]["node"] != "node2"
    assert head.batch("lab/vacate")["jobs"]["done"] == 4
    assert "vacated (run" in head.log.read_text()
    assert node_of(head, "node2")["paused"]       # quiet: 1h; the node stays paused, nothing new started


# --- issue 12, item 3: `pause` with only what the node has -------------------------------------------

def test_pause_from_the_nodes_pyz_locks_where_its_supervisor_watches(head):
    """The nodes file sets pause_dir for every node here; dalice passes no option and no
    DISTRIBUTE_PAUSE_DIR, and the hint she gets works with nothing but the pyz."""
    head.wait_nodes_up(3)
    program = head.workdirs["node1"] / "bin" / "distribute.pyz"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/home/dalice", "LANG": "C.UTF-8"}
    paused = subprocess.run(["runuser", "-u", "dalice", "--", "/usr/bin/python3", str(program), "pause",
                             "--duration", "10m", "--detach"], env=env, capture_output=True, text=True, timeout=60)
    assert paused.returncode == 0, paused.stderr
    assert list(head.pause_dirs["node1"].glob("pause-dalice.json"))
    node1 = wait_until(lambda: node_of(head, "node1")["paused"] and node_of(head, "node1"), 10, "node1 paused")
    assert node1["paused"][0]["user"] == "dalice"
    hint = f"`python3 {program} resume` ends it earlier"
    assert hint in paused.stdout, paused.stdout
    resumed = subprocess.run(["runuser", "-u", "dalice", "--"] + f"python3 {program} resume".split(), env=env,
                             capture_output=True, text=True, timeout=60)
    assert resumed.returncode == 0 and "your pause has ended" in resumed.stdout, resumed.stdout + resumed.stderr
    wait_until(lambda: not node_of(head, "node1")["paused"], 10, "node1 to resume")


@pytest.mark.nodes(caps={"node2": ["owned"]},
                   node_yaml={"node2": "owner: {busy: {cpu: 60%, for: 3s}, quiet: 1h}\n"})
def test_a_jobs_own_children_never_count_as_the_owners_load(head, tmp_path):
    """With the default accounts, a job burning CPU in a child and in a grandchild that left
    its session never pauses its node.  (The job-tree rule alone, with the jobs' account
    counted, is test_probe_counts_the_owner_and_never_a_jobs_own_children: here other
    tests on this machine use the node account too.)"""
    head.wait_nodes_up(3)
    folder = tmp_path / "c"
    folder.mkdir()
    burn = "timeout 6 sh -c \\\"while :; do :; done\\\""
    (folder / "distribute-jobs.yaml").write_text(textwrap.dedent(f"""\
        meta: {{batch_name: children, namespace: lab, capabilities: [owned]}}
        shell:
          jobs:
            - name: burner
              command: "sh -c '{burn}' & setsid sh -c '{burn}' & {burn}; wait; echo ok > distribute_save/ok.txt"
        """))
    head.cli("add", folder / "distribute-jobs.yaml")
    head.wait_batch("lab/children", timeout=120)
    job = archived(head, "lab/children")["burner"]
    took = (datetime.datetime.fromisoformat(job["end"]) - datetime.datetime.fromisoformat(job["start"])).total_seconds()
    assert job["state"] == "ok" and took > 5, job     # it burned longer than the policy's 3 s, unpaused
    log = (head.workdirs["node2"] / ".distribute" / "supervisor.log").read_text()
    assert "owner policy busy > 60% CPU for 3s" in log and "owner busy" not in log, log
    assert "paused" not in head.log.read_text()


# --- `pause` and `resume` skip click's parsing, and say the same -------------------------------------

@pytest.mark.parametrize("argv, handled", [
    (["pause", "--detach", "--duration", "10m"], True), (["pause", "--duration=90s", "--detach"], True),
    (["pause"], True), (["resume"], True), (["resume", "--all"], True),
    (["pause", "--help"], False), (["pause", "--durtion", "5m"], False), (["pause", "--duration"], False),
    (["pause", "--duration", "--detach"], False), (["resume", "--everyone"], False), (["resume", "-h"], False),
    (["--head", "x", "pause"], False), (["status"], False),
])
def test_fast_path_takes_only_plain_pause_and_resume(argv, handled):
    assert (distribute.node_fast_path(argv) is not None) == handled


@pytest.mark.parametrize("argv", [
    ["pause", "--detach", "--duration", "10m"], ["pause", "--duration", "5h", "--detach"], ["resume"],
])
def test_fast_path_says_and_does_what_click_says(argv, tmp_path):
    """A command line through the fast path and through click: the same output, exit code and locks."""
    def run(fast):
        folder = tmp_path / ("fast" if fast else "click")
        env = dict(os.environ, DISTRIBUTE_PAUSE_DIR=str(folder), TZ="UTC")
        code = "import sys, distribute\n" + ("" if fast else "distribute.node_fast_path = lambda args: None\n") \
            + "distribute.main()\n"
        done = subprocess.run([sys.executable, "-c", code] + argv, cwd=str(ROOT), env=env,
                              capture_output=True, text=True, timeout=60)
        locks = sorted(p.name for p in folder.glob("pause-*.json")) if folder.exists() else []
        return done.returncode, done.stdout, done.stderr, locks
    fast, slow = run(True), run(False)
    strip_times = lambda text: __import__("re").sub(r"\d\d:\d\d:\d\d", "T", text)
    assert (fast[0], strip_times(fast[1]), fast[2], fast[3]) == (slow[0], strip_times(slow[1]), slow[2], slow[3])

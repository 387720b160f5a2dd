"""Workstation pause, node side: real job trees, the real CLI, real Unix users.

A job is a shell script that starts a child that starts a grandchild (in a
session of its own, so only the parent link finds it); all three burn CPU
counting to N and write their counter to a file.  The watcher runs in a thread
with its own event loop, as the node supervisor runs it.  `pause` and `resume`
run as subprocesses under ordinary accounts (dalice, dbob); the job runs as
dnode.  Tests run as root.
"""

import asyncio
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

import distribute

ROOT = Path(__file__).resolve().parent.parent
COUNT_TO = 400_000
LEVELS = ("root", "child", "grandchild")
STOP_WITHIN = 0.5  # the target, from `pause` printing its first line

JOB_SCRIPTS = {
    "count.sh": """\
count() {  # count to $N, writing the counter to $1.count now and then
    i=0
    while [ $i -lt $N ]; do
        i=$((i+1))
        case $i in *000) echo $i > "$1.count";; esac
    done
    echo $i > "$1.count"
}
""",
    "root.sh": """\
export N=$1; . ./count.sh
sh child.sh &
kid=$!
count root
wait $kid || exit 1
echo $(( $(cat root.count) + $(cat child.count) + $(cat grandchild.count) )) > result.txt
""",
    "child.sh": """\
. ./count.sh
setsid -w sh grandchild.sh &
kid=$!
count child
wait $kid || exit 1
""",
    "grandchild.sh": """\
. ./count.sh
count grandchild
""",
}


# --- users, folders and an interpreter every account can run ---------------------------

def ensure_user(name):
    result = subprocess.run(["useradd", "-m", "-s", "/bin/sh", name], capture_output=True, text=True)
    assert result.returncode in (0, 9), result.stderr  # 9: it already exists (another fixture made it)


@pytest.fixture(scope="session")
def accounts():
    for name in ("dalice", "dbob", "dnode"):
        ensure_user(name)


@pytest.fixture(scope="session")
def shared_tmp():
    """A folder under /tmp that the other accounts can reach (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="distpause-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def as_user(user):
    """Popen arguments that run a process as `user` alone (no group of root's left over)."""
    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": [],
            "cwd": entry.pw_dir if os.path.isdir(entry.pw_dir) else "/"}


def runs_as(user, argv, env=None):
    return subprocess.run(argv, capture_output=True, text=True, env=env, **as_user(user))


@pytest.fixture(scope="session")
def user_python(accounts, shared_tmp):
    """(python, env) with which dalice can import distribute.py and its dependencies.

    Here python3 may live under root's home; then the system python gets
    world-readable copies of click and psutil (psutil's extension is abi3)."""
    site = shared_tmp / "site"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    for python in (sys.executable, "/usr/bin/python3"):
        try:
            if runs_as("dalice", [python, "-c", "import click, psutil"], env).returncode == 0:
                return python, env
        except PermissionError:
            continue  # under root's home, out of reach
    site.mkdir()
    for module in (psutil, __import__("click")):
        shutil.copytree(Path(module.__file__).parent, site / Path(module.__file__).parent.name)
    subprocess.run(["chmod", "-R", "a+rX", str(site)], check=True)
    env["PYTHONPATH"] = str(site)
    probe = runs_as("dalice", ["/usr/bin/python3", "-c", "import click, psutil"], env)
    assert probe.returncode == 0, probe.stderr
    return "/usr/bin/python3", env


@pytest.fixture
def locks(shared_tmp, request):
    """A pause folder of its own for each test, not created yet: `pause` creates it
    (in a sticky world-writable parent, as /var/tmp is)."""
    parent = Path(tempfile.mkdtemp(prefix="locks-", dir=shared_tmp))
    parent.chmod(0o1777)
    return parent / "pause"


@pytest.fixture
def cli(user_python, locks):
    """cli(user, *args) runs the real `distribute.py` as that user, waiting for it."""
    python, env = user_python
    env = dict(env, DISTRIBUTE_PAUSE_DIR=str(locks))

    def run(user, *args):
        return runs_as(user, [python, str(ROOT / "distribute.py")] + list(args), env)

    def start(user, *args):
        return subprocess.Popen([python, str(ROOT / "distribute.py")] + list(args), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **as_user(user))

    run.start = start
    return run


# --- the job and the watcher --------------------------------------------------------------

class Job:
    """A three-level job tree running as dnode in a session of its own (as the supervisor starts jobs)."""

    def __init__(self, folder, count_to=COUNT_TO, scripts=JOB_SCRIPTS, user="dnode"):
        self.folder = folder
        folder.mkdir()
        for name, text in scripts.items():
            (folder / name).write_text(text)
        folder.chmod(0o777)
        self.proc = subprocess.Popen(["sh", "root.sh", str(count_to)], start_new_session=True,
                                     stdin=subprocess.DEVNULL, **dict(as_user(user), cwd=str(folder)))
        self.pid = self.proc.pid

    def processes(self):
        """Found independently of the code under test: psutil's descendants of the root."""
        root = psutil.Process(self.pid)
        return [root] + root.children(recursive=True)

    def counters(self):
        values = {}
        for level in LEVELS:
            path = self.folder / f"{level}.count"
            text = path.read_text().strip() if path.exists() else ""
            values[level] = int(text) if text else 0
        return values

    def wait_until_all_counting(self):
        wait_for(lambda: all(self.counters().values()) and len(self.processes()) >= 3, 30,
                 "all three levels counting")

    def states(self):
        states = {}
        for proc in self.processes():
            with_suppress(lambda: states.__setitem__(proc.pid, proc.status()))
        return states

    def all_stopped(self):
        states = self.states()  # a zombie (ended before the pause, not yet reaped) has nothing to stop
        return len(states) >= 3 and all(s in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE) for s in states.values())

    def none_stopped(self):
        return all(s != psutil.STATUS_STOPPED for s in self.states().values())

    def finish(self, timeout=120):
        code = self.proc.wait(timeout=timeout)
        return code, int((self.folder / "result.txt").read_text())

    def kill(self):
        """SIGKILL the whole tree (SIGKILL works on stopped processes too)."""
        for proc in self.processes_or_none():
            with_suppress(proc.kill)
        with_suppress(lambda: os.killpg(self.pid, signal.SIGKILL))
        if self.proc is not None:
            self.proc.wait(timeout=10)

    def processes_or_none(self):
        try:
            return self.processes()
        except psutil.NoSuchProcess:
            return []


def with_suppress(call):
    try:
        call()
    except (OSError, psutil.Error):
        pass


def wait_for(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)
    return time.monotonic()


def stays(condition, seconds):
    """condition holds at every look during `seconds` (for 'still paused' claims)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not condition():
            return False
        time.sleep(0.02)
    return condition()


class WatcherThread:
    """watch_pauses in a thread with its own event loop, as the node supervisor will run it."""

    def __init__(self, folder, roots):
        self.folder = folder
        self.roots = list(roots)
        self.changes = []
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(5)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.task = self.loop.create_task(distribute.watch_pauses(
            lambda: list(self.roots), self.changes.append, interval=0.05, folder=self.folder))
        self.ready.set()
        try:
            self.loop.run_until_complete(self.task)
        except asyncio.CancelledError:
            pass
        finally:
            self.loop.close()

    def stop(self):
        if not self.thread.is_alive():
            return
        self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive()


def make_pause_folder_as_root(locks):
    os.environ["DISTRIBUTE_PAUSE_DIR"] = str(locks)
    try:
        assert distribute.pause_dir() == locks
    finally:
        del os.environ["DISTRIBUTE_PAUSE_DIR"]


@pytest.fixture
def job_and_watcher(shared_tmp, locks, accounts):
    """A counting job tree as dnode, watched; the pause folder exists as `pause` would leave it."""
    make_pause_folder_as_root(locks)
    job = Job(Path(tempfile.mkdtemp(prefix="job-", dir=shared_tmp)) / "work")
    watcher = WatcherThread(locks, [job.pid])
    try:
        job.wait_until_all_counting()
        yield job, watcher
    finally:
        watcher.stop()
        job.kill()


def first_line(proc):
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return line, time.monotonic()


# --- the scenarios ----------------------------------------------------------------

def test_pause_stops_every_process_and_resume_lets_the_job_finish_right(job_and_watcher, cli):
    job, watcher = job_and_watcher
    waiting = cli.start("dalice", "pause", "--duration", "1m")
    line, printed = first_line(waiting)
    assert "paused this machine's jobs until" in line
    stopped_at = wait_for(job.all_stopped, 5, "every job process stopped")
    assert stopped_at - printed < STOP_WITHIN, f"stopped {stopped_at - printed:.3f}s after pause printed"
    assert {p.pid for p in job.processes()} >= {job.pid}
    assert len(job.processes()) >= 3
    frozen = job.counters()
    assert stays(lambda: job.counters() == frozen and job.all_stopped(), 0.4)
    assert [lock.user for lock in watcher.changes[-1]] == ["dalice"]

    resumed = cli("dalice", "resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "your pause has ended" in resumed.stdout
    assert "jobs on this machine continue now" in resumed.stdout
    wait_for(job.none_stopped, STOP_WITHIN, "every job process running again")
    out, err = waiting.communicate(timeout=10)
    assert waiting.returncode == 0, err
    assert "resumed: ended by `distribute resume`" in out
    wait_for(lambda: job.counters() != frozen, 5, "counters moving again")

    code, result = job.finish()
    assert code == 0
    assert result == COUNT_TO * len(LEVELS)
    assert watcher.changes[-1] == []


def test_expired_lock_resumes_jobs_by_itself(job_and_watcher, cli, locks):
    job, watcher = job_and_watcher
    done = cli("dalice", "pause", "--detach", "--duration", "2s")
    assert done.returncode == 0, done.stderr
    until = json.loads((locks / "pause-dalice.json").read_text())["until"]
    wait_for(job.all_stopped, STOP_WITHIN, "every job process stopped")
    wait_for(job.none_stopped, 10, "jobs running again after the expiry")
    # by the lock's own expiry (not the command's start, which a loaded machine delays)
    assert until - 0.1 < time.time() < until + 1.5
    code, result = job.finish()
    assert (code, result) == (0, COUNT_TO * len(LEVELS))
    assert not list(locks.glob("pause-*.json")), "the expired lock is cleaned up"


def test_two_users_pause_one_resumes_still_paused(job_and_watcher, cli):
    job, watcher = job_and_watcher
    assert cli("dalice", "pause", "--detach", "--duration", "1m").returncode == 0
    assert cli("dbob", "pause", "--detach", "--duration", "2m").returncode == 0
    wait_for(job.all_stopped, STOP_WITHIN, "every job process stopped")
    wait_for(lambda: sorted(lock.user for lock in watcher.changes[-1]) == ["dalice", "dbob"], 1,
             "the watcher reporting both pauses")

    alice_resumes = cli("dalice", "resume")
    assert "your pause has ended" in alice_resumes.stdout
    assert "stays paused by dbob until" in alice_resumes.stdout
    assert stays(job.all_stopped, 0.4)

    bob_resumes = cli("dbob", "resume")
    assert "jobs on this machine continue now" in bob_resumes.stdout
    wait_for(job.none_stopped, STOP_WITHIN, "every job process running again")
    assert job.finish() == (0, COUNT_TO * len(LEVELS))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_to_waiting_pause_resumes_jobs(job_and_watcher, cli, locks, signum):
    job, watcher = job_and_watcher
    waiting = cli.start("dalice", "pause", "--duration", "10m")
    first_line(waiting)
    wait_for(job.all_stopped, STOP_WITHIN, "every job process stopped")
    waiting.send_signal(signum)
    out, err = waiting.communicate(timeout=10)
    assert waiting.returncode == 0, err
    assert f"resumed: stopped by {signal.Signals(signum).name}" in out
    wait_for(job.none_stopped, STOP_WITHIN, "every job process running again")
    assert not list(locks.glob("pause-*.json"))


def test_killed_pause_leaves_a_stale_lock_that_stops_nothing(job_and_watcher, cli, locks):
    job, watcher = job_and_watcher
    waiting = cli.start("dalice", "pause", "--duration", "10m")
    first_line(waiting)
    wait_for(job.all_stopped, STOP_WITHIN, "every job process stopped")
    waiting.kill()  # no clean-up possible: the lock stays behind
    waiting.wait(timeout=10)
    assert list(locks.glob("pause-*.json"))
    wait_for(job.none_stopped, STOP_WITHIN, "jobs running again though the lock file is left")
    assert job.finish() == (0, COUNT_TO * len(LEVELS))


def test_stale_lock_of_dead_pauser_is_ignored_and_removed(job_and_watcher, locks):
    job, watcher = job_and_watcher
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = locks / "pause-dalice.json"
    lock.write_text(json.dumps({"user": "dalice", "until": time.time() + 600, "pid": dead.pid,
                                "detached": False, "since": time.time()}))
    garbage = locks / "pause-dbob.json"
    garbage.write_text(json.dumps({"until": time.time() + 600}))  # no pid: not a lock
    assert distribute.active_pauses(locks) == []
    assert not distribute.is_paused(locks)
    assert stays(job.none_stopped, 0.3)
    assert not lock.exists()


def test_unexpired_detached_lock_counts_and_its_expiry_is_capped(locks, job_and_watcher):
    job, watcher = job_and_watcher
    lock = locks / "pause-dalice.json"
    lock.write_text(json.dumps({"until": time.time() + 10 ** 7, "pid": 1, "detached": True}))
    [found] = distribute.active_pauses(locks)
    assert found.user == "root"  # the file's owner, whatever the file says
    assert found.until <= time.time() + distribute.MAX_PAUSE_SECONDS + 61
    wait_for(job.all_stopped, STOP_WITHIN, "every job process stopped")
    lock.unlink()
    wait_for(job.none_stopped, STOP_WITHIN, "every job process running again")


def test_replaced_pause_does_not_remove_the_newer_lock(job_and_watcher, cli, locks):
    job, watcher = job_and_watcher
    waiting = cli.start("dalice", "pause", "--duration", "10m")
    first_line(waiting)
    assert cli("dalice", "pause", "--detach", "--duration", "20m").returncode == 0
    out, _ = waiting.communicate(timeout=10)
    assert "replaced by a newer pause of yours" in out
    assert stays(job.all_stopped, 0.3)
    assert cli("dalice", "resume").returncode == 0
    wait_for(job.none_stopped, STOP_WITHIN, "every job process running again")


@pytest.mark.parametrize("duration", ["5h", "4h1s", "0s", "0", "abc", "1x", "-1h", ""])
def test_bad_durations_exit_2_with_one_line(cli, locks, duration):
    result = cli("dalice", "pause", "--duration", duration)
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "duration" in result.stderr and "Traceback" not in result.stderr
    assert not locks.exists() or not list(locks.glob("pause-*.json"))


def test_pause_folder_is_created_sticky_and_world_writable(cli, locks):
    assert cli("dalice", "pause", "--detach", "--duration", "1m").returncode == 0
    assert (locks.stat().st_mode & 0o7777) == 0o1777
    lock = locks / "pause-dalice.json"
    assert lock.stat().st_mode & 0o777 == 0o644
    assert lock.owner() == "dalice"
    # bob cannot end alice's pause: the sticky bit protects her file.
    bob = cli("dbob", "resume", "--all")
    assert bob.returncode == 2 and "only root" in bob.stderr
    assert cli("dbob", "resume").stdout.startswith("you had not paused")
    assert lock.exists()
    assert "stays paused by dalice" in cli("dbob", "resume").stdout


@pytest.mark.parametrize("problem", ["symlink", "no sticky bit"])
def test_unsafe_pause_folder_is_refused(cli, locks, shared_tmp, problem):
    real = Path(tempfile.mkdtemp(prefix="real-", dir=shared_tmp))
    if problem == "symlink":
        real.chmod(0o1777)
        locks.symlink_to(real)
    else:
        locks.mkdir()
        locks.chmod(0o777)
    result = cli("dalice", "pause", "--detach")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert str(locks) in result.stderr
    assert not list(real.iterdir()) and not list(locks.iterdir())


def test_freeze_catches_processes_started_while_stopping(shared_tmp):
    """A job that keeps forking: after freeze_tree nothing of it runs and nothing new appears."""
    spawner = {"root.sh": "while :; do (i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done) & "
                          "setsid sh -c 'i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done' & done\n"}
    job = Job(Path(tempfile.mkdtemp(prefix="job-", dir=shared_tmp)) / "work", scripts=spawner)
    try:
        wait_for(lambda: len(job.processes()) >= 5, 10, "the job forking")
        stopped = distribute.freeze_tree([job.pid])
        assert job.pid in stopped
        seen = {p.pid for p in job.processes()}
        assert set(stopped) >= seen
        wait_for(job.all_stopped, STOP_WITHIN, "SIGSTOP delivered to every process")
        assert stays(lambda: job.all_stopped() and {p.pid for p in job.processes()} == seen, 0.3)
        distribute.thaw_tree([job.pid])
        wait_for(job.none_stopped, 1, "every process running again")
    finally:
        job.kill()


def test_job_processes_lists_parents_before_children(job_and_watcher):
    job, watcher = job_and_watcher
    ordered = distribute.job_processes([job.pid])
    assert ordered[0] == job.pid
    for proc in job.processes()[1:]:
        assert ordered.index(proc.ppid()) < ordered.index(proc.pid)
    assert os.getpid() not in distribute.job_processes([job.pid, os.getpid(), 1])


def test_watcher_cancelled_while_paused_continues_the_jobs(job_and_watcher, locks):
    job, watcher = job_and_watcher
    os.environ["DISTRIBUTE_PAUSE_DIR"] = str(locks)
    try:
        distribute.write_pause_lock(locks, time.time() + 60, detached=True)
        wait_for(job.all_stopped, STOP_WITHIN, "every job process stopped")
        watcher.stop()
        assert job.none_stopped()
    finally:
        del os.environ["DISTRIBUTE_PAUSE_DIR"]


SUPERVISOR_STANDIN = """
import asyncio, subprocess, sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import distribute

async def main():
    job = subprocess.Popen(["sh", "root.sh", sys.argv[3]], start_new_session=True, stdin=subprocess.DEVNULL)
    print(job.pid, flush=True)
    watcher = asyncio.ensure_future(distribute.watch_pauses(lambda: [job.pid], folder=Path(sys.argv[2])))
    await asyncio.get_event_loop().run_in_executor(None, sys.stdin.read)  # until the test closes stdin
    watcher.cancel()
    await asyncio.gather(watcher, return_exceptions=True)
    print(await asyncio.get_event_loop().run_in_executor(None, job.wait), flush=True)

asyncio.get_event_loop().run_until_complete(main())
"""


def test_unprivileged_watcher_obeys_alice_and_ignores_a_stale_lock_it_cannot_remove(
        shared_tmp, locks, cli, user_python):
    """The supervisor runs as dnode, not root: it reads dalice's lock, and dbob's stale lock
    (sticky folder: dnode may not delete it) must not keep the job stopped."""
    python, env = user_python
    make_pause_folder_as_root(locks)  # as an admin would: the folder's owner may delete any lock
    folder = Path(tempfile.mkdtemp(prefix="job-", dir=shared_tmp)) / "work"
    job = Job.__new__(Job)
    job.folder, job.proc = folder, None
    folder.mkdir()
    for name, text in JOB_SCRIPTS.items():
        (folder / name).write_text(text)
    folder.chmod(0o777)
    standin = subprocess.Popen([python, "-c", SUPERVISOR_STANDIN, str(ROOT), str(locks), str(COUNT_TO)],
                               env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                               **dict(as_user("dnode"), cwd=str(folder)))
    try:
        job.pid = int(standin.stdout.readline())
        assert psutil.Process(job.pid).username() == "dnode"
        job.wait_until_all_counting()
        stale = runs_as("dbob", [python, "-c", (
            "import json, subprocess, sys, time; dead = subprocess.Popen(['true']); dead.wait(); "
            "open(sys.argv[1], 'w').write(json.dumps({'until': time.time() + 600, 'pid': dead.pid, "
            "'detached': False}))"), str(locks / "pause-dbob.json")], env)
        assert stale.returncode == 0, stale.stderr
        assert stays(job.none_stopped, 0.3)

        waiting = cli.start("dalice", "pause", "--duration", "5m")
        first_line(waiting)
        wait_for(job.all_stopped, STOP_WITHIN, "every job process stopped")
        assert cli("dalice", "resume").returncode == 0
        wait_for(job.none_stopped, STOP_WITHIN, "every job process running again")
        assert (locks / "pause-dbob.json").exists(), "dnode cannot remove dbob's file, and need not"
        waiting.communicate(timeout=10)

        standin.stdin.close()
        assert standin.stdout.readline().strip() == "0"
        assert int((folder / "result.txt").read_text()) == COUNT_TO * len(LEVELS)
    finally:
        if standin.poll() is None:
            standin.kill()
        if hasattr(job, "pid"):
            job.kill()
        standin.wait(timeout=10)


def test_signal_job_processes_reaches_children_outside_the_session(job_and_watcher):
    """Killing a paused job: the setsid grandchild is out of the group, yet must get the signal."""
    job, watcher = job_and_watcher
    processes = job.processes()
    assert any(os.getsid(p.pid) != job.pid for p in processes), "the grandchild has a session of its own"
    signalled = distribute.signal_job_processes([job.pid], signal.SIGKILL)
    assert {p.pid for p in processes} <= set(signalled)
    assert job.proc.wait(timeout=10) == -signal.SIGKILL
    psutil.wait_procs(processes, timeout=5)
    assert not [p for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("argv, written", [(["pause", "--detach", "--duration", "2m"], True),
                                           (["pause", "--duration=90m"], True),
                                           (["pause", "--duration", "5h"], False),     # over the maximum
                                           (["pause", "--detahc"], False),             # a typo: click says so
                                           (["pause", "--help"], False)])
def test_pause_writes_its_lock_before_the_rest_of_the_program_loads(tmp_path, argv, written):
    """The person at the workstation waits for Python to start and the lock to land, not for
    this module's definitions: with click made unimportable, the program dies loading, and
    still a plain `pause` has written its lock (only the plain forms; the rest waits for click)."""
    locks = tmp_path / "locks"
    locks.mkdir(mode=0o1777)
    locks.chmod(0o1777)
    program = ("import runpy, sys; sys.modules['click'] = None; sys.argv = [sys.argv[1]] + sys.argv[2:];"
               "runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", program, str(ROOT / "distribute.py")] + argv,
                            env=dict(os.environ, DISTRIBUTE_PAUSE_DIR=str(locks)), capture_output=True, text=True)
    assert "No module named 'click'" in result.stderr or "import of click halted" in result.stderr
    found = list(locks.glob("pause-*.json"))
    assert bool(found) == written and not list(locks.glob(".*.tmp"))
    if written:
        lock = distribute.read_pause_lock(found[0])[0]
        assert lock.user == pwd.getpwuid(os.geteuid()).pw_name and lock.detached == ("--detach" in argv)
        assert lock.until - time.time() == pytest.approx(distribute.duration_seconds(argv[-1].split("=")[-1]), abs=30)
        assert lock.pid_started is not None


@pytest.mark.parametrize("text, seconds", [("1h30m10s", 5410), ("90m", 5400), (" 4H ", 14400), ("60s", 60),
                                           ("0s", 0), ("1m1h", None), ("h", None), ("", None), ("1x", None),
                                           ("-1h", None), ("1234567890s", None), ("1h 2m", None)])
def test_durations(text, seconds):
    assert distribute.duration_seconds(text) == seconds


@pytest.mark.parametrize("user", ["dalice", "o'brien", 'say "hi"', "back\\slash", "tab\there", "jürgen", "x\x7f\x00"])
def test_the_lock_is_json_whatever_the_user_name(user):
    """`pause` writes its lock without importing json; what it writes is JSON all the same."""
    lock = {"user": user, "until": 1796000000.25, "pid": 4242, "detached": False, "since": 0.0,
            "pid_started": None, "reason": ""}
    assert json.loads(distribute.flat_json(lock)) == lock

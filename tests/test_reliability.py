"""SPEC §7 reliability promises, proved by breaking things on purpose (issue 7).

Every test runs a real head (`distribute serve`) over real OpenSSH nodes and then
kills the head, cuts a node's network, cuts a transfer in the middle or fills the
archive's disk.  Jobs are shell commands that append a line to a per-job counter
file outside every workspace (a world-writable temp folder), so a test can count
how often each job started and finished; an inotify watch on the batch's archive
folder counts how often each job's folder was renamed into place (archived).
"""

import collections
import ctypes
import datetime
import hashlib
import json
import os
import select
import shutil
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest

from cluster import HeadProcess, node_workdirs, nodes_yaml, pyz_of_another_build, wait_until

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


# --- helpers -------------------------------------------------------------------

@pytest.fixture
def counters():
    """A world-writable folder outside every workspace: jobs (running as dnode) log to it."""
    folder = Path(tempfile.mkdtemp(prefix="dcount-", dir="/tmp"))
    os.chmod(folder, 0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def counted(command: str, counters: Path) -> str:
    """`command` wrapped so that it logs one line when it starts and one when it ends."""
    return (f'echo "$PWD" >> {counters}/$DISTRIBUTE_JOB.start; {command}; '
            f'echo "$PWD" >> {counters}/$DISTRIBUTE_JOB.done')


def lines(path: Path):
    return path.read_text().splitlines() if path.exists() else []


def shell_batch(folder: Path, name: str, namespace: str, commands, capabilities=(), files=None) -> Path:
    """A shell-flavour job file; commands is {job name: command}, files {job name: [paths]}."""
    folder.mkdir(parents=True, exist_ok=True)
    caps = f", capabilities: [{', '.join(capabilities)}]" if capabilities else ""
    text = [f"meta: {{batch_name: {name}, namespace: {namespace}{caps}}}", "shell:", "  jobs:"]
    for job, command in commands.items():
        text.append(f"    - name: {job}")
        text.append(f"      command: {json.dumps(command)}")
        if files and job in files:
            text.append(f"      required_files: [{', '.join(json.dumps(str(p)) for p in files[job])}]")
    path = folder / "distribute-jobs.yaml"
    path.write_text("\n".join(text) + "\n")
    return path


IN_MOVED_TO = 0x80


class ArchiveWatch:
    """Counts how often each job folder is renamed into a batch's archive folder.

    land_job fills a hidden folder and renames it into place, also when it replaces an
    earlier copy, so one IN_MOVED_TO per visible name is one archiving of that job."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        assert self.libc.inotify_add_watch(self.fd, str(folder).encode(), IN_MOVED_TO) >= 0
        self.landed = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while not self._stop.is_set():
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 1 << 20)
            except BlockingIOError:
                continue
            offset = 0
            while offset < len(data):
                _, mask, _, size = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16:offset + 16 + size].rstrip(b"\0").decode()
                offset += 16 + size
                if mask & IN_MOVED_TO and not name.startswith("."):
                    self.landed[name] += 1

    def close(self):
        self._stop.set()
        self._thread.join(5)
        os.close(self.fd)


@pytest.fixture
def watch_archive():
    """watch_archive(folder) -> ArchiveWatch, closed at the end of the test."""
    watches = []

    def make(folder):
        watches.append(ArchiveWatch(folder))
        return watches[-1]
    yield make
    for watch in watches:
        watch.close()


def job_record(head, namespace, batch, job):
    return json.loads((head.archive / namespace / batch / job / "job.json").read_text())


def leftovers(folder: Path):
    """Temporary names that must never stay behind in an archive."""
    return [str(p) for p in folder.rglob("*") if p.name.startswith((".incoming-", ".replaced-"))
            or p.name.endswith(".distribute-part") or p.name.endswith(".tmp")]


def processes_in(workdir: Path):
    """Job processes whose working directory lies under a node's workdir."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DISTRIBUTE_JOB") and proc.cwd().startswith(str(workdir) + "/") \
                    and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            pass
    return found


def supervisor_of(workdir: Path) -> psutil.Process:
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "supervise" in cmd and str(workdir) in cmd:
            return proc
    raise AssertionError(f"no supervisor runs for {workdir}")


def head_log(head) -> str:
    return head.log.read_text(errors="replace")


def wait_log(head, text, timeout, what):
    """Wait until the head's log says `text`; on failure show the log's end."""
    try:
        wait_until(lambda: text in head_log(head), timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- head log ---\n{head_log(head)[-3000:]}") from None


# --- 1. the head crashes -----------------------------------------------------------

def test_head_kill9_reattaches_running_jobs_and_runs_the_queue_once(head, tmp_path, counters, watch_archive):
    """kill -9 the head with 3 jobs running and 20 queued, bring it back: nothing lost, nothing twice."""
    def until(name):       # a job that runs until the test creates counters/<name>
        return f"while [ ! -e {counters}/{name} ]; do sleep 0.05; done"
    commands = {"j0": counted(until("release1"), counters), "j1": counted(until("release1"), counters),
                "j2": counted(until("release2"), counters)}
    commands.update({f"q{i}": counted("sleep 0.3", counters) for i in range(20)})
    for job in commands:
        commands[job] += f"; echo {job} > distribute_save/out.txt"
    job_file = shell_batch(tmp_path / "crash", "crash", "rel", commands)
    watch = watch_archive(head.archive / "rel" / "crash")
    head.wait_nodes_up(3)
    head.cli("add", job_file)
    wait_until(lambda: all((counters / f"j{i}.start").exists() for i in range(3)), 30, "j0..j2 to start")
    running = {r["job"]: r["node"] for r in head.status()["running"]}
    assert sorted(running) == ["j0", "j1", "j2"]

    head.kill9()
    killed_at = time.time()
    # j0 and j1 end while no head is there; the supervisors keep their results
    (counters / "release1").touch()
    wait_until(lambda: lines(counters / "j0.done") and lines(counters / "j1.done"), 20, "j0, j1 to end")
    assert not any((counters / f"q{i}.start").exists() for i in range(20))

    # what a head killed while landing a job leaves behind: a hidden, half-filled folder
    half = head.archive / "rel" / "crash" / ".incoming-q0-killed"
    half.mkdir()
    (half / ".big.bin.distribute-part").write_bytes(b"half")

    head.start()
    # j2 still runs: the new head adopts it where it is
    wait_until(lambda: any(r.get("job") == "j2" for n in head.nodes() if n["name"] == running["j2"]
                           for r in n["running"]), 30, "j2 to be re-attached")
    (counters / "release2").touch()
    batch = head.wait_batch("rel/crash", timeout=120)
    assert batch["state"] == "done" and batch["jobs"]["done"] == 23

    for job in commands:
        assert len(lines(counters / f"{job}.start")) == 1, f"{job} started more than once"
        assert len(lines(counters / f"{job}.done")) == 1, f"{job} ended more than once"
        record = job_record(head, "rel", "crash", job)
        assert record["exit_code"] == 0 and record["attempts"] == 1
        assert (head.archive / "rel" / "crash" / job / "out.txt").read_text() == f"{job}\n"
    for job in ("j0", "j1", "j2"):
        record = job_record(head, "rel", "crash", job)
        assert record["node"] == running[job]      # re-attached where it ran, not restarted
        assert datetime.datetime.fromisoformat(record["start"]).timestamp() < killed_at
    wait_until(lambda: sum(watch.landed.values()) >= 23, 10, "inotify to report every landing")
    assert watch.landed == {job: 1 for job in commands}, "a job was archived twice"
    assert "requeueing" not in head_log(head)
    assert leftovers(head.archive) == []          # the half-filled folder was swept at start


@pytest.mark.nodes(caps={"node1": ["only"]}, extra=["--kill-grace", "2"])
def test_head_restart_after_the_running_job_ended_goes_on_with_the_queue(head, tmp_path, counters):
    """The one node that can run a batch ends its job while the head is down: archiving it on
    restart frees the slot, and the queue must go on from there though nothing else happens."""
    commands = {"r": counted(f"while [ ! -e {counters}/release ]; do sleep 0.05; done", counters)}
    commands.update({f"q{i}": counted("true", counters) for i in range(3)})
    job_file = shell_batch(tmp_path / "idle", "idle", "rel", commands, capabilities=["only"])
    head.wait_nodes_up(3)
    head.cli("add", job_file)
    wait_until(lambda: (counters / "r.start").exists(), 30, "r to start")
    head.kill9()
    (counters / "release").touch()
    wait_until(lambda: lines(counters / "r.done"), 20, "r to end")
    head.start()
    batch = head.wait_batch("rel/idle", timeout=30)
    assert batch["jobs"]["done"] == 4
    assert all(len(lines(counters / f"{job}.start")) == 1 for job in commands)


def test_landing_the_same_attempt_again_keeps_the_first_copy(tmp_path):
    """A head killed between landing a job and noting it lands it again after its restart:
    the second landing of the same attempt must not replace (re-archive) the first."""
    import distribute
    record = {"namespace": "rel", "batch": "b", "job": "j", "node": "node1", "attempts": 1,
              "start": "2026-01-01T00:00:00.000+00:00", "exit_code": 0}
    first = distribute.land_job(tmp_path, "rel", "b", "j", lambda f: (f / "r.txt").write_text("1"), record)
    inode = first.stat().st_ino
    again = distribute.land_job(tmp_path, "rel", "b", "j", lambda f: (f / "r.txt").write_text("1"), record)
    assert again == first and first.stat().st_ino == inode
    other = dict(record, start="2026-01-01T00:00:05.000+00:00")          # a later attempt does replace it
    distribute.land_job(tmp_path, "rel", "b", "j", lambda f: (f / "r.txt").write_text("2"), other)
    assert (first / "r.txt").read_text() == "2" and first.stat().st_ino != inode
    assert leftovers(tmp_path) == []


# --- 2. a node stops answering ---------------------------------------------------------

@pytest.mark.nodes(extra=["--node-timeout", "3", "--kill-grace", "2"])
def test_lost_node_job_runs_elsewhere_and_stale_copy_is_stopped(head, ssh_nodes, tmp_path, counters, watch_archive):
    """node2 vanishes while running a job: the job runs elsewhere; node2 comes back: its copy is killed."""
    # On node2 a job would run for a minute (the stale copy); anywhere else it takes a second.
    slow_on_node2 = counted('case "$PWD" in */node2/*) sleep 60;; *) sleep 1;; esac; '
                            'echo "$PWD" > distribute_save/where.txt', counters)
    job_file = shell_batch(tmp_path / "lost", "lost", "rel", {f"j{i}": slow_on_node2 for i in range(3)})
    watch = watch_archive(head.archive / "rel" / "lost")
    head.wait_nodes_up(3)
    head.cli("add", job_file)
    node2_job = wait_until(lambda: next((r["job"] for r in head.status()["running"] if r["node"] == "node2"
                                         and (counters / f"{r['job']}.start").exists()), None),
                           30, "a job to run on node2")
    stale = processes_in(head.workdirs["node2"])
    assert stale, "the job on node2 should be running"

    ssh_nodes["node2"].cut()                          # sshd and its sessions die; the supervisor lives on
    batch = head.wait_batch("rel/lost", timeout=60)
    assert batch["state"] == "done" and batch["jobs"]["done"] == 3
    record = job_record(head, "rel", "lost", node2_job)
    assert record["node"] != "node2" and record["exit_code"] == 0
    assert "/node2/" not in (head.archive / "rel" / "lost" / node2_job / "where.txt").read_text()
    assert f"node node2: lost, requeueing {node2_job}" in head_log(head)
    assert all(p.is_running() for p in stale), "the stale copy runs on while node2 is unreachable"
    landed_before = (head.archive / "rel" / "lost" / node2_job / "job.json").stat().st_mtime_ns

    ssh_nodes["node2"].heal()
    head.wait_nodes_up(3)
    wait_until(lambda: not processes_in(head.workdirs["node2"]), 15, "the stale copy on node2 to be stopped")
    runs = head.workdirs["node2"] / ".distribute" / "runs"
    wait_until(lambda: not any(runs.iterdir()), 15, "node2 to forget the stale run")
    assert not any("/node2/" in line for line in lines(counters / f"{node2_job}.done"))
    assert len(lines(counters / f"{node2_job}.start")) == 2     # the lost attempt and the good one
    assert job_record(head, "rel", "lost", node2_job) == record
    assert (head.archive / "rel" / "lost" / node2_job / "job.json").stat().st_mtime_ns == landed_before
    assert watch.landed == {f"j{i}": 1 for i in range(3)}
    assert head.batch("rel/lost")["jobs"]["done"] == 3
    wait_until(lambda: not (head.workdirs["node2"] / "rel" / "lost").exists(), 15,
               "node2 to delete the stale run's batch folder (nodes keep no job data)")


# --- 3. a transfer breaks in the middle --------------------------------------------------

class FinalNamesWatch:
    """Polls an archive folder while a test runs: a file under its final name must be whole."""

    def __init__(self, path: Path, size: int):
        self.path, self.size, self.seen = path, size, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self):
        while not self._stop.is_set():
            try:
                self.seen.append(self.path.stat().st_size)
            except FileNotFoundError:
                pass
            time.sleep(0.01)

    def close(self):
        self._stop.set()
        self._thread.join(5)
        return self.seen


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(MiB), b""):
            digest.update(block)
    return digest.hexdigest()


def cut_when(node, counter, threshold, what):
    """Cut `node` once `counter()` passed `threshold` bytes: in the middle of a transfer."""
    wait_until(lambda: counter() > threshold, 60, what)
    node.cut()


@pytest.mark.nodes(caps={"node1": ["big"]})
def test_transfers_cut_in_the_middle_are_retried_and_land_whole(head, ssh_nodes, tmp_path, counters, watch_archive):
    """Cut node1's connection while it receives 200 MiB of inputs, then while the head fetches
    150 MiB of results: both are retried, and the archive only ever shows whole files."""
    in_size, out_size = 200 * MiB, 150 * MiB
    data = tmp_path / "big" / "big.bin"
    data.parent.mkdir(parents=True)
    with open(data, "wb") as out:
        for _ in range(in_size // (8 * MiB)):
            out.write(os.urandom(8 * MiB))
    command = counted(f"sha256sum input/big.bin | cut -d' ' -f1 > distribute_save/in.sha; "
                      f"head -c {out_size} /dev/urandom > distribute_save/big.bin; "
                      f"sha256sum distribute_save/big.bin | cut -d' ' -f1 > {counters}/out.sha", counters)
    job_file = shell_batch(tmp_path / "big", "big", "rel", {"j": command}, capabilities=["big"],
                           files={"j": [data]})
    final = head.archive / "rel" / "big" / "j" / "big.bin"
    whole = FinalNamesWatch(final, out_size)
    watch = watch_archive(head.archive / "rel" / "big")
    node1 = ssh_nodes["node1"]
    head.wait_nodes_up(3)
    supervisor = supervisor_of(head.workdirs["node1"])
    received = supervisor.io_counters().read_chars
    head.cli("add", job_file)

    # inputs: the supervisor has read a third of them from its socket
    cut_when(node1, lambda: supervisor.io_counters().read_chars, received + in_size // 3,
             "node1 to receive a third of the inputs")
    wait_log(head, "rel/big/j could not start", 20, "the head to notice the cut")
    assert not (counters / "j.start").exists()
    node1.heal()

    # outputs: the head has fetched a quarter of them
    wait_until(lambda: (counters / "j.start").exists(), 60, "the job to start after the inputs were resent")
    sent = supervisor.io_counters().write_chars
    cut_when(node1, lambda: supervisor.io_counters().write_chars, sent + out_size // 4,
             "the head to fetch a quarter of the results")
    wait_log(head, "fetching the results of", 20, "the head to notice the cut")
    assert not final.exists()
    assert head.batch("rel/big")["jobs"]["running"] == 1
    node1.heal()

    batch = head.wait_batch("rel/big", timeout=120)
    seen = whole.close()
    assert batch["jobs"]["done"] == 1
    assert (head.archive / "rel" / "big" / "j" / "in.sha").read_text().strip() == sha256(data)
    assert sha256(final) == (counters / "out.sha").read_text().strip()
    assert seen and set(seen) == {out_size}, "big.bin was visible under its final name before it was whole"
    assert len(lines(counters / "j.start")) == 1 and len(lines(counters / "j.done")) == 1
    assert watch.landed == {"j": 1}
    assert leftovers(head.archive) == []
    # the node forgets the run when the head's acknowledgement arrives (sent once the archive is on disk)
    wait_until(lambda: not any((head.workdirs["node1"] / ".distribute" / "runs").iterdir()), 20,
               "node1 to forget the run after the head acknowledged its results")


# --- 4. the archive's disk is full ------------------------------------------------------------

@pytest.fixture
def small_archive(ssh_nodes, pyz):
    """A head whose archive is a 4 MiB tmpfs (unmounted at the end)."""
    workdirs = node_workdirs(ssh_nodes)
    process = HeadProcess(None, nodes_yaml(list(ssh_nodes), workdirs), ssh_nodes.head_home.env(), pyz=pyz,
                          extra=["--kill-grace", "2"])
    process.workdirs = workdirs
    process.archive.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0755", "distribute-test", str(process.archive)],
                   check=True)
    try:
        yield process.start()
    finally:
        process.stop()
        subprocess.run(["umount", "-l", str(process.archive)], check=False)
        shutil.rmtree(process.dir, ignore_errors=True)
        shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)


def test_full_archive_disk_keeps_the_job_pending_until_space_returns(small_archive, tmp_path, counters):
    """A result bigger than the archive's free space: one clear log line, the job stays pending
    (running, not lost), the rest of the queue goes on, and it lands once there is room."""
    head = small_archive
    size = 8 * MiB
    commands = {"big": counted(f"head -c {size} /dev/urandom > distribute_save/big.bin; "
                               f"sha256sum distribute_save/big.bin | cut -d' ' -f1 > {counters}/big.sha", counters)}
    commands.update({f"small{i}": counted(f"echo {i} > distribute_save/n.txt", counters) for i in range(6)})
    job_file = shell_batch(tmp_path / "full", "full", "rel", commands)
    head.wait_nodes_up(3)
    head.cli("add", job_file)

    wait_log(head, "archive: cannot store rel/full/big", 60, "the archive to report the full disk")
    for i in range(6):       # the rest of the queue goes on
        wait_until((head.archive / "rel" / "full" / f"small{i}" / "n.txt").exists, 60, f"small{i} to land")
    failures = [l for l in head_log(head).splitlines() if "cannot store rel/full/big" in l]
    assert "No space left on device" in failures[0] and failures[0].endswith("will retry")
    assert "Traceback" not in head_log(head)
    batch = head.batch("rel/full")
    assert batch["state"] == "active" and batch["jobs"]["running"] == 1 and batch["jobs"]["done"] == 6
    assert [r["job"] for r in head.status()["running"]] == ["big"]
    assert not (head.archive / "rel" / "full" / "big").exists()
    assert leftovers(head.archive) == []
    assert len(lines(counters / "big.done")) == 1

    subprocess.run(["mount", "-o", "remount,size=64m", str(head.archive)], check=True)
    batch = head.wait_batch("rel/full", timeout=60)
    assert batch["state"] == "done" and batch["jobs"]["done"] == 7
    assert sha256(head.archive / "rel" / "full" / "big" / "big.bin") == (counters / "big.sha").read_text().strip()
    assert len(lines(counters / "big.start")) == 1          # archived late, never run again
    assert leftovers(head.archive) == []


# --- 7. soak -------------------------------------------------------------------------------------

SOAK_JOBS = 2000


def rss_mib(head) -> float:
    return psutil.Process(head.proc.pid).memory_info().rss / MiB


def landed_count(watch) -> int:
    return sum(watch.landed.values())


def cut_for_a_while(head, node, seconds):
    """Cut `node` past the node timeout, so its jobs move elsewhere, then bring it back."""
    node.cut()
    wait_log(head, f"node {node.name}: ", 10, f"the head to notice {node.name} is gone")
    time.sleep(seconds)      # the outage itself is what is tested: it must outlast --node-timeout
    node.heal()


@pytest.mark.slow
@pytest.mark.nodes(slots={"node1": 2, "node2": 2, "node3": 2}, extra=["--node-timeout", "3", "--kill-grace", "1"])
def test_soak_2000_jobs_through_node_cuts_a_head_crash_and_an_upgrade(head, ssh_nodes, tmp_path, counters,
                                                                       watch_archive):
    started = time.monotonic()
    ran = counters / "ran.log"
    commands = {f"s{i:04d}": f'echo "$DISTRIBUTE_JOB $PWD" >> {ran}; echo "$DISTRIBUTE_JOB" > distribute_save/n.txt'
                for i in range(SOAK_JOBS)}
    job_file = shell_batch(tmp_path / "soak", "soak", "rel", commands)
    watch = watch_archive(head.archive / "rel" / "soak")
    head.wait_nodes_up(3)
    rss = {"start": rss_mib(head)}
    head.cli("add", job_file)

    def at(count):
        wait_until(lambda: landed_count(watch) >= count, 120, f"{count} jobs archived")
    at(SOAK_JOBS // 5)
    cut_for_a_while(head, ssh_nodes["node2"], 4.5)
    at(SOAK_JOBS * 2 // 5)
    rss["before kill -9"] = rss_mib(head)
    head.kill9()
    head.start()
    head.wait_nodes_up(3)
    rss["after restart"] = rss_mib(head)
    at(SOAK_JOBS * 3 // 5)
    cut_for_a_while(head, ssh_nodes["node3"], 4.5)
    at(SOAK_JOBS * 4 // 5)
    head.stop()                                    # upgraded: restarted on another build
    head.pyz = pyz_of_another_build(head.pyz, tmp_path)
    head.start()
    batch = head.wait_batch("rel/soak", timeout=240)
    new_build = hashlib.sha256(head.pyz.read_bytes()).hexdigest()[:16]
    wait_until(lambda: {n["build"] for n in head.nodes()} == {new_build}, 60, "every node on the new build")
    rss["end"] = rss_mib(head)
    elapsed = time.monotonic() - started
    print(f"\nsoak: {SOAK_JOBS} jobs in {elapsed:.0f}s; head RSS (MiB): "
          + ", ".join(f"{k} {v:.1f}" for k, v in rss.items()))

    assert batch["state"] == "done" and batch["jobs"]["done"] == SOAK_JOBS
    wait_until(lambda: landed_count(watch) >= SOAK_JOBS, 10, "inotify to report every landing")
    twice = {job: n for job, n in watch.landed.items() if n != 1}
    assert not twice, f"archived more than once: {twice}"
    assert set(watch.landed) == set(commands)
    for job in commands:
        assert (head.archive / "rel" / "soak" / job / "n.txt").read_text() == f"{job}\n"
    runs = collections.Counter(line.split()[0] for line in lines(ran))
    assert set(runs) == set(commands)
    again = {job: n for job, n in runs.items() if n > 1}
    print(f"soak: jobs that ran again after their node was cut away: {len(again)}")
    assert len(again) <= 8, again          # at most the jobs on a cut node's 2 slots, per cut
    assert leftovers(head.archive) == []
    assert rss["end"] - rss["start"] < 50, rss

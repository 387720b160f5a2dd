"""Scheduling by resources on real sshd nodes (SPEC §6 "Resources"): declared capacities are
never oversubscribed (checked from what the jobs recorded on the nodes), GPU indices from a
stand-in nvidia-smi are never shared, limits stop jobs with a reason, dependencies wait."""

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from cluster import NODE_PYTHON, HeadProcess, node_workdirs, wait_until

RECORD = ('s=$(date +%s.%N); sleep {sleep}; e=$(date +%s.%N); '
          'echo "$s $e $DISTRIBUTE_CPUS g:${{CUDA_VISIBLE_DEVICES-unset}} ${{OMP_NUM_THREADS-unset}}" '
          '> distribute_save/rec.txt')


@pytest.fixture
def resource_head(ssh_nodes, pyz):
    """A head over node1..node3 with declared capacities and no `slots`: node1 has 4 cpus, 8G and
    (through a stand-in nvidia-smi on its PATH) 4 GPUs; node2 2 cpus; node3 3 cpus, 1 kept back."""
    workdirs = node_workdirs(ssh_nodes)
    tools = Path(tempfile.mkdtemp(prefix="dgpu-", dir="/tmp"))
    os.chmod(tools, 0o755)
    (tools / "bin").mkdir()
    smi = tools / "bin" / "nvidia-smi"
    smi.write_text("#!/bin/sh\n" + "".join(f"echo 'GPU {i}: Stand-in GPU (UUID: GPU-{i})'\n" for i in range(4)))
    python = tools / "python3"
    python.write_text(f'#!/bin/sh\nPATH="{tools}/bin:$PATH" exec {NODE_PYTHON} "$@"\n')
    for path in (smi, python, tools / "bin"):
        os.chmod(path, 0o755)
    shape = {"node1": [f"python: {python}", "cpus: 4", "memory: 8G"],
             "node2": [f"python: {NODE_PYTHON}", "cpus: 2", "memory: 4G"],
             "node3": [f"python: {NODE_PYTHON}", "cpus: 4", "memory: 4G", "reserve: {cpus: 1}"]}
    lines = ["nodes:"]
    for node in ssh_nodes:
        lines += [f"  - name: {node.name}", f"    host: {node.name}", "    user: dnode",
                  f"    workdir: {workdirs[node.name]}"] + [f"    {line}" for line in shape[node.name]]
    process = HeadProcess(None, "\n".join(lines) + "\n", ssh_nodes.head_home.env(), pyz=pyz,
                          extra=["--kill-grace", "2"])
    process.start()
    yield process
    process.stop()
    shutil.rmtree(process.dir, ignore_errors=True)
    shutil.rmtree(tools, ignore_errors=True)
    shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)


def shell_batch(folder, name, jobs, meta_extra=""):
    """jobs: [(name, command, resources or None, retries)]."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"meta: {{batch_name: {name}, namespace: lab{meta_extra}}}", "shell:", "  jobs:"]
    for job, command, resources, retries in jobs:
        lines.append(f"    - name: {job}")
        lines.append(f"      command: {json.dumps(command)}")
        if resources:
            lines.append(f"      resources: {resources}")
        if retries:
            lines.append(f"      retries: {retries}")
    path = folder / "distribute-jobs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def job_records(head, key):
    out = {}
    for folder in (head.archive / key).iterdir():
        if folder.is_dir() and not folder.name.startswith(".") and folder.name != "build":
            out[folder.name] = json.loads((folder / "job.json").read_text())
    return out


def test_packing_never_oversubscribes_and_gpus_are_never_shared(resource_head, tmp_path):
    head = resource_head
    head.wait_nodes_up(3)
    nodes = {n["name"]: n for n in head.nodes()}
    assert nodes["node1"]["capacity"] == {"cpus": 4, "memory": 8 << 30, "gpus": 4}
    assert nodes["node3"]["capacity"]["cpus"] == 3                        # 4 declared, 1 reserved
    # no node could ever fit 8 cpus: refused at add, naming each node's shortfall
    refused = head.cli("add", shell_batch(tmp_path / "big", "big", [("huge", "true", "{cpus: 8}", 0)]), check=False)
    assert refused.returncode == 2
    assert "job huge fits no node: node1 needs 8 cpus, has 4; node2 needs 8 cpus, has 2; " \
           "node3 needs 8 cpus, has 3" in refused.stderr
    sizes = [("c1", "{cpus: 1}", 1, 0), ("c2", "{cpus: 2}", 2, 0), ("c3", "{cpus: 3}", 3, 0),
             ("g1", "{cpus: 1, gpus: 1}", 1, 1), ("g2", "{cpus: 1, gpus: 2}", 1, 2)]
    jobs, wanted = [], {}
    for i in range(20):
        label, resources, cpus, gpus = sizes[i % len(sizes)]
        jobs.append((f"{label}_{i}", RECORD.format(sleep=2), resources, 0))
        wanted[f"{label}_{i}"] = (cpus, gpus)
    head.cli("add", shell_batch(tmp_path / "mix", "mix", jobs))
    assert head.wait_batch("lab/mix", timeout=180)["jobs"]["done"] == 20
    capacity = {"node1": 4, "node2": 2, "node3": 3}
    spans = {name: [] for name in capacity}
    for job, record in job_records(head, "lab/mix").items():
        start, end, cpus, visible, omp = (head.archive / "lab/mix" / job / "rec.txt").read_text().split()
        want_cpus, want_gpus = wanted[job]
        assert (int(cpus), int(omp)) == (want_cpus, want_cpus), job
        visible = visible[2:]
        gpus = [] if visible in ("unset", "") else [int(g) for g in visible.split(",")]
        if record["node"] == "node1":
            assert visible != "unset", job            # on a GPU node a job sees exactly its own
        assert len(gpus) == want_gpus, (job, visible)
        if want_gpus:
            assert record["node"] == "node1"
        spans[record["node"]].append((float(start), float(end), int(cpus), set(gpus)))
    most = 0
    for node, runs in spans.items():
        for start, _, _, _ in runs:       # at each start: what runs at that moment
            now = [r for r in runs if r[0] <= start < r[1]]
            assert sum(r[2] for r in now) <= capacity[node], (node, now)
            held = [g for r in now for g in r[3]]
            assert len(held) == len(set(held)), (node, now)              # no GPU index twice
            most = max(most, len(now))
    assert most >= 2      # packed: without resources (and no `slots`) a node runs one job at a time


def test_limits_stop_jobs_with_a_reason_and_dependencies_wait(resource_head, tmp_path):
    head = resource_head
    head.wait_nodes_up(3)
    hog = ("python3 -c \"import time\nblocks = []\nwhile True:\n    blocks.append(bytearray(16 << 20))\n"
           "    for b in blocks[-1:]:\n        b[::4096] = b'x' * len(b[::4096])\n    time.sleep(0.05)\"")
    head.cli("add", shell_batch(tmp_path / "lim", "limits", [
        ("hog", hog, "{memory: 200M}", 1), ("slow", "sleep 60", "{time: 2s}", 1),
        ("fine", "sleep 10", "{time: 1m, memory: 1G}", 0)]))
    # a batch that waits for `limits`, and one that waits for a failed one
    head.cli("add", shell_batch(tmp_path / "after", "after", [("then", RECORD.format(sleep=0), None, 0)],
                                ", after: [limits], after_failed: start"))
    assert "waits for lab/limits" in head.cli("why", "lab/after").stdout
    assert head.wait_batch("lab/limits", timeout=120)["jobs"] == {
        "queued": 0, "running": 0, "done": 1, "failed": 0, "killed": 2}
    records = job_records(head, "lab/limits")
    assert records["hog"]["state"] == "killed" and records["hog"]["attempts"] == 1      # no retry
    assert records["hog"]["reason"].startswith("memory: ") and records["hog"]["reason"].endswith(" > 200M")
    assert records["slow"]["reason"] == "time limit 2s" and records["slow"]["attempts"] == 1
    assert "reason" not in records["fine"]
    status = head.cli("status", "--all").stdout
    assert "hog stopped: memory: " in status and "slow stopped: time limit 2s" in status
    report = head.cli("report", "lab/limits", "-o", tmp_path / "limits.svg").stdout
    assert "slow (attempt 1) on" in report and ": killed: time limit 2s" in report
    assert "(memory: " in (tmp_path / "limits.svg").read_text()           # the bar's title says why
    head.wait_batch("lab/after")
    then = float((head.archive / "lab/after/then/rec.txt").read_text().split()[0])
    ends = [json.loads((head.archive / "lab/limits" / j / "job.json").read_text())["end"] for j in records]
    import datetime
    assert then >= max(datetime.datetime.fromisoformat(e).timestamp() for e in ends) - 0.01
    # `after_failed` left at wait: a dependency with killed jobs holds the batch, and `why` says so
    head.cli("add", shell_batch(tmp_path / "blocked", "blocked", [("never", "true", None, 0)], ", after: [limits]"))
    why = wait_until(lambda: (lambda out: out if "ended with 2 failed or killed" in out else None)(
        head.cli("why", "lab/blocked").stdout), 30, "why to name the failed dependency")
    assert "`distribute retry lab/limits`" in why
    assert head.batch("lab/blocked")["jobs"]["queued"] == 1
    missing = head.cli("add", shell_batch(tmp_path / "orphan", "orphan", [("x", "true", None, 0)],
                                          ", after: [nosuch]"), check=False)
    assert missing.returncode == 2 and "meta.after: no batch lab/nosuch on this head" in missing.stderr


# --- the limits watchdog on its own (node side, no head) -----------------------

def test_time_limit_counts_only_unpaused_time_and_memory_names_both_sizes():
    import distribute as d
    watch = d.LimitWatch(memory=16 << 30, time=7200)
    assert watch.step(0.0, False, 0) is None
    assert watch.step(3000.0, True, 0) is None            # paused for 3000 s: not counted
    assert watch.step(7000.0, False, 1 << 30) is None     # 4000 s counted
    assert watch.step(10200.0, False, 0) == "time limit 2h"
    assert d.LimitWatch(memory=16 << 30).step(1.0, False, int(17.2 * (1 << 30))) == "memory: 17.2G > 16G"


def test_tree_rss_adds_up_a_jobs_processes():
    import subprocess
    import sys
    import distribute as d
    code = "import os, sys, time\nb = bytearray(64 << 20)\nb[::4096] = b'x' * len(b[::4096])\n" \
           "print('ready', flush=True)\ntime.sleep(30)"
    # a session leader (like a job) whose child holds 64 MiB
    proc = subprocess.Popen(["/bin/sh", "-c", f"{sys.executable} -c \"{code}\"; true"], stdout=subprocess.PIPE,
                            start_new_session=True, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert d.tree_rss(proc.pid) >= 64 << 20
    finally:
        d.signal_job_processes([proc.pid], 9)
        proc.wait()


def test_gpus_held_by_running_jobs_survive_a_head_kill9(resource_head, tmp_path):
    """After kill -9 and a restart the head re-adopts running jobs with the GPU indices they were
    given (from the node's run records), so a new job never gets the same ones."""
    head = resource_head
    head.wait_nodes_up(3)
    jobs = [(f"g{i}", RECORD.format(sleep=6), "{cpus: 1, gpus: 2}", 0) for i in range(4)]
    head.cli("add", shell_batch(tmp_path / "gpu", "gpu", jobs))
    wait_until(lambda: len([r for r in head.status()["running"] if r["batch"] == "lab/gpu"]) == 2, 60,
               "two GPU jobs running")
    head.kill9()
    head.start()
    assert head.wait_batch("lab/gpu", timeout=120)["jobs"]["done"] == 4
    runs = []
    for job in job_records(head, "lab/gpu"):
        start, end, _, visible, _ = (head.archive / "lab/gpu" / job / "rec.txt").read_text().split()
        runs.append((float(start), float(end), set(visible[2:].split(","))))
    for start, _, _ in runs:
        now = [r for r in runs if r[0] <= start < r[1]]
        held = [g for r in now for g in r[2]]
        assert len(held) == len(set(held)) and len(now) <= 2, now

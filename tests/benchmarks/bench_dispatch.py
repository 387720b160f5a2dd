"""Benchmark: dispatching many small jobs, distribute against GNU parallel --sshlogin.

    python3 tests/benchmarks/bench_dispatch.py [--rounds 3] [--jobs 1000] [--files 200]
                                               [--default-rounds 3] [--profile DIR]

Starts 4 real OpenSSH sshd nodes on loopback addresses (tests/sshd.py), a real
head (`distribute.py serve`, nodes with 2 slots each, running the packed pyz),
and then, alternately in every round:
  - trivial: `--jobs` shell jobs `true`, timed from starting `distribute add`
    to the head reporting the batch done; against
    `parallel -S 2/node1,...,2/node4 --ssh 'ssh -F cfg' true ::: 1..N`
    with ControlMaster (one SSH login per node) and without (one login per job);
  - files: `--files` jobs that each save a 1 MiB file (random bytes) which comes
    back to the head's archive; against parallel `--return --cleanup` (rsync).
For each it reports the wall time, jobs/s, and CPU: the head process, the node
supervisors (without the jobs themselves), the nodes' sshd processes, and the
client (`add`, or parallel and its ssh/rsync children), per job.

Also GNU parallel on this machine alone (`-j nodes*slots`, no SSH): the floor of dispatching.
Targets (issue 16): >= 5x parallel with ControlMaster, and within 2x of local parallel.
--profile DIR samples the head and one supervisor with py-spy (if installed)
during the rounds and leaves collapsed stacks there (head.txt, supervisor.txt).
--compare OLD.pyz also starts a head of another build (its own node workdirs, the same
sshd nodes) and runs its batch in every round too, the two builds in alternating order:
a before/after measured under the same load (medians and the ratio of the two).
"""

import argparse
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import (DISTRIBUTE, Cluster, HeadProcess, machine, median, node_workdirs, shell_job_file,  # noqa: E402
                         nodes_yaml, pyz_path, report, wait_batch_done, wait_until)

import psutil  # noqa: E402

MIB = 1024 * 1024
SAVE_COMMAND = f"head -c {MIB} /dev/urandom > distribute_save/out.bin"


# --- CPU accounting -----------------------------------------------------------

def own(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def reaped(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.children_user + t.children_system


def tree_cpu(root: psutil.Process) -> float:
    """CPU of a process, of the children it reaped, and of every live descendant
    (and what they reaped): each CPU second counted once, exited ones included."""
    total = 0.0
    for proc in [root] + root.children(recursive=True):
        try:
            total += own(proc) + reaped(proc)
        except psutil.Error:
            pass
    return total


class CpuMeter:
    """Snapshots of CPU seconds by role, for the cost of one run."""

    def __init__(self, head_pid, sshd_pids, workdirs):
        self.head = psutil.Process(head_pid)
        self.sshds = [psutil.Process(pid) for pid in sshd_pids]
        self.workdirs = [str(w) for w in workdirs]

    def supervisors(self):
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            if "supervise" in cmd and any(w in cmd for w in self.workdirs):
                found.append(proc)
        return found

    def snapshot(self):
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        sups = self.supervisors()
        sup_own = sup_jobs = 0.0
        for proc in sups:
            try:
                sup_own += own(proc)
                sup_jobs += reaped(proc) + sum(tree_cpu(c) for c in proc.children())
            except psutil.Error:
                pass
        return {"head": own(self.head) + reaped(self.head), "supervisors": sup_own, "jobs": sup_jobs,
                "sshd": sum(tree_cpu(p) for p in self.sshds),
                "client": usage.ru_utime + usage.ru_stime, "supervisor_pids": sorted(p.pid for p in sups)}

    @staticmethod
    def delta(before, after):
        out = {k: after[k] - before[k] for k in ("head", "supervisors", "jobs", "sshd", "client")}
        out["supervisors_restarted"] = before["supervisor_pids"] != after["supervisor_pids"]
        return out


# --- our side -------------------------------------------------------------------

def job_file(folder: Path, name: str, count: int, command: str) -> Path:
    return shell_job_file(folder, name, count, lambda i: command)


def run_ours(head: HeadProcess, meter: CpuMeter, work: Path, name: str, count: int, command: str,
             check_file: bool):
    path = job_file(work / name, name, count, command)
    before = meter.snapshot()
    start = time.perf_counter()
    subprocess.run(DISTRIBUTE + ["--head", "local", "--socket", str(head.socket), "add", str(path)],
                   env=head.env, check=True, stdout=subprocess.DEVNULL, cwd=str(path.parent))
    batch = wait_batch_done(head.socket, f"bench/{name}", timeout=600)
    wall = time.perf_counter() - start
    after = meter.snapshot()
    done = batch["jobs"]["done"]
    if done != count:
        raise SystemExit(f"distribute: {name}: {batch['jobs']} (expected {count} done)\n"
                         f"{head.log.read_text()[-3000:]}")
    if check_file:
        sizes = [p.stat().st_size for p in (head.archive / "bench" / name).glob("j*/out.bin")]
        if len(sizes) != count or set(sizes) != {MIB}:
            raise SystemExit(f"distribute: {name}: {len(sizes)} files archived, sizes {set(sizes)}")
    return wall, CpuMeter.delta(before, after)


# --- GNU parallel ---------------------------------------------------------------

def parallel_ssh(cluster: Cluster, control_dir):
    ssh = f"ssh -F {cluster.home.config}"
    if control_dir:
        ssh += f" -o ControlMaster=auto -o ControlPath={control_dir}/cm-%C -o ControlPersist=60"
    return ssh


def close_masters(cluster: Cluster, control_dir) -> None:
    for node in cluster.nodes:
        subprocess.run(["ssh", "-F", str(cluster.home.config), "-o", f"ControlPath={control_dir}/cm-%C",
                        "-O", "exit", node.name], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_parallel(cluster: Cluster, meter: CpuMeter, work: Path, name: str, count: int, files: bool,
                 control: bool, local_jobs: int = 0):
    """GNU parallel over the nodes' sshds, or with local_jobs, on this machine alone (no SSH)."""
    folder = work / name
    folder.mkdir(parents=True)
    control_dir = Path(tempfile.mkdtemp(prefix="cm-", dir="/tmp")) if control else None
    logins = ",".join(f"2/{node.name}" for node in cluster.nodes)
    argv = ["parallel", "--will-cite", "-S", logins, "--ssh", parallel_ssh(cluster, control_dir)]
    if local_jobs:
        argv = ["parallel", "--will-cite", "-j", str(local_jobs)]
    if files and local_jobs:
        argv += [f"head -c {MIB} /dev/urandom > {name}_{{}}.bin"]
    elif files:
        argv += ["--return", f"{name}_{{}}.bin", "--cleanup", f"head -c {MIB} /dev/urandom > {name}_{{}}.bin"]
    else:
        argv += ["true"]
    argv += [":::"] + [str(i) for i in range(count)]
    before = meter.snapshot()
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=str(folder), env=cluster.home.env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = meter.snapshot()
    if control_dir:
        close_masters(cluster, control_dir)
        shutil.rmtree(control_dir, ignore_errors=True)
    if proc.returncode != 0:
        raise SystemExit(f"parallel exited {proc.returncode}: {proc.stderr[-2000:]}")
    if files:
        sizes = [p.stat().st_size for p in folder.glob(f"{name}_*.bin")]
        if len(sizes) != count or set(sizes) != {MIB}:
            raise SystemExit(f"parallel: {name}: {len(sizes)} files returned, sizes {set(sizes)}")
    shutil.rmtree(folder, ignore_errors=True)
    return wall, CpuMeter.delta(before, after)


def start_profilers(folder, head_pid, supervisors):
    """py-spy on the head and on one supervisor, writing collapsed stacks at SIGINT."""
    if not shutil.which("py-spy"):
        raise SystemExit("--profile needs py-spy (pip install py-spy)")
    Path(folder).mkdir(parents=True, exist_ok=True)
    targets = [("head", head_pid)] + [("supervisor", p.pid) for p in supervisors[:1]]
    return [subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                              "-o", str(Path(folder) / f"{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for name, pid in targets]


# --- the run ------------------------------------------------------------------------

def summarise(runs, count, ours):
    """Medians; "coordinator" CPU is what dispatching costs on the submitting side:
    head + supervisors + `add` for us, parallel and its ssh/rsync children for it
    (our idle head and supervisors still tick during parallel's runs: not its cost)."""
    walls = [w for w, _ in runs]
    wall = median(walls)
    cpu = {k: median([c[k] for _, c in runs]) for k in ("head", "supervisors", "jobs", "sshd", "client")}
    coordinator = cpu["client"] + (cpu["head"] + cpu["supervisors"] if ours else 0.0)
    out = {"wall_s": wall, "walls_s": walls, "jobs_per_s": count / wall, "cpu_s": cpu,
           "coordinator_cpu_ms_per_job": 1000 * coordinator / count,
           "total_cpu_ms_per_job": 1000 * (coordinator + cpu["sshd"] + (cpu["jobs"] if ours else 0.0)) / count}
    if ours:
        out["head_cpu_ms_per_job"] = 1000 * (cpu["head"] + cpu["supervisors"]) / count
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--default-rounds", type=int, default=3,
                        help="rounds of parallel without ControlMaster (slow: one SSH login per job); 0 skips")
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--only", choices=("trivial", "files"), default=None)
    parser.add_argument("--pyz", default=None, help="an existing distribute.pyz (default: build one)")
    parser.add_argument("--profile", default=None, metavar="DIR", help="py-spy the head into DIR/head.txt")
    parser.add_argument("--compare", default=None, metavar="OLD_PYZ",
                        help="also run the batches on a head of this other build, alternately")
    args = parser.parse_args()
    if not shutil.which("parallel"):
        raise SystemExit("GNU parallel is not installed")

    pyz = Path(args.pyz) if args.pyz else pyz_path()
    load_before = machine()
    cluster = Cluster(args.nodes)
    work = Path(tempfile.mkdtemp(prefix="bench-dispatch-", dir="/tmp"))
    os.chmod(work, 0o755)
    head, profilers, other = None, [], None
    try:
        workdirs = node_workdirs(cluster.nodes)
        text = nodes_yaml(cluster.nodes, workdirs, slots={n.name: args.slots for n in cluster.nodes})
        env = cluster.home.env()
        head = HeadProcess(None, text, env, pyz=pyz, extra=["--kill-grace", "2", "--supervisor-idle", "120"])
        head.start()
        wait_until(lambda: sum(n["reachable"] for n in head.nodes()) >= len(cluster.nodes), 120, "nodes up")
        meter = CpuMeter(head.proc.pid, [n.pid for n in cluster.nodes], workdirs.values())
        # One small batch first: supervisors started and pyz copied, as on a head that has been up a while.
        run_ours(head, meter, work, "warmup", 16, "true", False)
        if args.compare:
            other_dirs = node_workdirs(cluster.nodes)
            other = HeadProcess(None, nodes_yaml(cluster.nodes, other_dirs,
                                                 slots={n.name: args.slots for n in cluster.nodes}),
                                env, pyz=Path(args.compare), extra=["--kill-grace", "2", "--supervisor-idle", "120"])
            other.start()
            wait_until(lambda: sum(n["reachable"] for n in other.nodes()) >= len(cluster.nodes), 120, "nodes up")
            other_meter = CpuMeter(other.proc.pid, [n.pid for n in cluster.nodes], other_dirs.values())
            run_ours(other, other_meter, work, "warmup_other", 16, "true", False)
        profilers = start_profilers(args.profile, head.proc.pid, meter.supervisors()) if args.profile else []

        kinds = [k for k in ("trivial", "files") if args.only in (None, k)]
        sides = ("ours", "other", "parallel_cm", "parallel", "parallel_local")
        runs = {f"{side}_{kind}": [] for kind in kinds for side in sides}
        for round_no in range(args.rounds):
            for kind in kinds:
                count, files = (args.jobs, False) if kind == "trivial" else (args.files, True)
                command = "true" if kind == "trivial" else SAVE_COMMAND
                mine = lambda: runs[f"ours_{kind}"].append(  # noqa: E731
                    run_ours(head, meter, work, f"{kind}{round_no}", count, command, files))
                theirs = lambda: runs[f"other_{kind}"].append(  # noqa: E731
                    run_ours(other, other_meter, work, f"o_{kind}{round_no}", count, command, files))
                for side in ((mine, theirs) if round_no % 2 == 0 else (theirs, mine)) if other else (mine,):
                    side()
                runs[f"parallel_cm_{kind}"].append(
                    run_parallel(cluster, meter, work, f"pcm_{kind}{round_no}", count, files, True))
                runs[f"parallel_local_{kind}"].append(
                    run_parallel(cluster, meter, work, f"pl_{kind}{round_no}", count, files, False,
                                 local_jobs=args.nodes * args.slots))
                if round_no < args.default_rounds:
                    runs[f"parallel_{kind}"].append(
                        run_parallel(cluster, meter, work, f"p_{kind}{round_no}", count, files, False))
                for key in (f"{side}_{kind}" for side in sides):
                    if len(runs[key]) > round_no:
                        wall, cpu = runs[key][-1]
                        print(f"round {round_no + 1} {key:<20} {wall:6.2f} s  head {cpu['head']:.2f} s  "
                              f"supervisors {cpu['supervisors']:.2f} s  client {cpu['client']:.2f} s  "
                              f"sshd {cpu['sshd']:.2f} s", file=sys.stderr)
    finally:
        for profiler in profilers:
            profiler.send_signal(signal.SIGINT)
            profiler.wait()
        for one in (head, other):
            if one is not None:
                one.stop()
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
        for one in (head, other):
            if one is not None:
                shutil.rmtree(one.dir, ignore_errors=True)

    result = {"nodes": args.nodes, "slots": args.slots, "rounds": args.rounds, "jobs": args.jobs,
              "files": args.files, "machine": dict(load_before, load_after=round(os.getloadavg()[0], 2))}
    print("medians:", file=sys.stderr)
    for kind in kinds:
        count = args.jobs if kind == "trivial" else args.files
        summary = {key[:-len(kind) - 1]: summarise(r, count, key.startswith(("ours", "other")))
                   for key, r in runs.items() if key.endswith("_" + kind) and r}
        ours, peer = summary["ours"], summary["parallel_cm"]
        summary["speedup_vs_parallel_cm"] = peer["wall_s"] / ours["wall_s"]
        if "parallel" in summary:
            summary["speedup_vs_parallel"] = summary["parallel"]["wall_s"] / ours["wall_s"]
        summary["local_parallel_over_ours"] = summary["parallel_local"]["wall_s"] / ours["wall_s"]
        summary["target_met"] = summary["speedup_vs_parallel_cm"] >= 5.0 and summary["local_parallel_over_ours"] >= 0.5
        if "other" in summary:
            summary["other_pyz"] = args.compare
            summary["other_wall_over_ours"] = summary["other"]["wall_s"] / ours["wall_s"]
            summary["other_speedup_vs_parallel_cm"] = peer["wall_s"] / summary["other"]["wall_s"]
        result[kind] = summary
        for side in sides:
            if side in summary:
                s = summary[side]
                head_part = (f"head+supervisors {s['head_cpu_ms_per_job']:5.1f} ms/job  "
                             if "head_cpu_ms_per_job" in s else "")
                print(f"  {kind:<8} {side:<12} {s['wall_s']:7.2f} s  {s['jobs_per_s']:7.1f} jobs/s  {head_part}"
                      f"coordinator CPU {s['coordinator_cpu_ms_per_job']:5.1f} ms/job  "
                      f"(with sshd and jobs {s['total_cpu_ms_per_job']:5.1f})", file=sys.stderr)
        print(f"  {kind:<8} ratio vs parallel+ControlMaster: {summary['speedup_vs_parallel_cm']:.2f}x, "
              f"local parallel / ours: {summary['local_parallel_over_ours']:.2f} (target >= 0.5)"
              + (f", vs parallel: {summary['speedup_vs_parallel']:.2f}x" if "speedup_vs_parallel" in summary else ""),
              file=sys.stderr)
        if "other" in summary:
            print(f"  {kind:<8} other build ({args.compare}): {summary['other_wall_over_ours']:.2f}x our wall time, "
                  f"its ratio vs parallel+ControlMaster {summary['other_speedup_vs_parallel_cm']:.2f}x", file=sys.stderr)
    report("dispatch", result)


if __name__ == "__main__":
    main()

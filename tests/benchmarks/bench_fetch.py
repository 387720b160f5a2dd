"""Benchmark: node -> head result fetches, and the head's CPU per GiB received.

    python3 tests/benchmarks/bench_fetch.py [--mib 256] [--jobs 2] [--rounds 3]

Run it as root (it starts sshd nodes like the test fixtures).  One sshd node, two heads on
it one after the other in every round (alternating which goes first):
  - openssh:  the head as shipped: bulk transfers through OpenSSH's `ssh` (kept master);
  - asyncssh: the same head with DISTRIBUTE_SSH=asyncssh (its bulk streams in Python);
each runs a batch of --jobs jobs that write --mib MiB of random data to distribute_save/
(each job copies a file made beforehand, so the timed part is mostly the fetch: add to done).
Beside them, `scp` of a file of the same size from the node account to this machine
(the peer).  It prints the medians of the fetch wall time (the job's "finished" to the
batch done) and the head process's CPU seconds per GiB received.
Targets (issue 16): >= 1.0x scp, head CPU <= 1.5 s per GiB.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import (Cluster, HeadProcess, machine, node_workdirs, nodes_yaml, pyz_path, report,  # noqa: E402
                         shell_job_file, wait_batch_done, wait_until)

import psutil  # noqa: E402


def head_cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run_head(cluster, pyz, work: Path, carrier: str, name: str, jobs: int, mib: int):
    """(seconds from add to done, head CPU seconds in that time) for one batch of big results."""
    workdirs = node_workdirs(cluster.nodes)
    text = nodes_yaml(cluster.nodes, workdirs, slots={n.name: jobs for n in cluster.nodes})
    env = cluster.home.env(**({"DISTRIBUTE_SSH": "asyncssh"} if carrier == "asyncssh" else {}))
    head = HeadProcess(None, text, env, pyz=pyz, extra=["--kill-grace", "2", "--supervisor-idle", "60"])
    head.start()
    try:
        wait_until(lambda: sum(n["reachable"] for n in head.nodes()) >= 1, 120, "the node up")
        warm = shell_job_file(work / f"warm-{name}", f"warm{name}", 1, lambda i: "head -c 2000000 /dev/zero > distribute_save/w.bin")
        head.cli("add", warm)
        wait_batch_done(head.socket, f"bench/warm{name}", 300)         # the bulk path set up (probe, master)
        path = shell_job_file(work / name, name, jobs, lambda i: f"cp {work / 'source.bin'} distribute_save/r.bin")
        proc = psutil.Process(head.proc.pid)
        before, start = head_cpu(proc), time.perf_counter()
        head.cli("add", path)
        wait_batch_done(head.socket, f"bench/{name}", 1800)
        wall, cpu = time.perf_counter() - start, head_cpu(proc) - before
        for i in range(jobs):
            got = head.archive / "bench" / name / f"j{i:05d}" / "r.bin"
            if got.stat().st_size != mib << 20:
                raise SystemExit(f"{got}: {got.stat().st_size} bytes")
        return wall, cpu
    finally:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)
        shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)


def run_scp(cluster, work: Path, mib: int, jobs: int):
    """scp of `jobs` files of `mib` MiB from the node account (made untimed first)."""
    node = cluster.nodes[0]
    remote = f"/tmp/bench-fetch-{os.getpid()}"
    ssh = cluster.home.ssh(node.name, f"mkdir -p {remote} && for i in $(seq {jobs}); do "
                                      f"cp {work / 'source.bin'} {remote}/r$i.bin; done")
    subprocess.run(ssh, env=cluster.home.env(), check=True)
    dest = work / f"scp-{time.monotonic_ns()}"
    dest.mkdir()
    start = time.perf_counter()
    subprocess.run(["scp", "-F", str(cluster.home.config), "-r", f"{node.name}:{remote}", str(dest)],
                   env=cluster.home.env(), check=True)
    wall = time.perf_counter() - start
    subprocess.run(cluster.home.ssh(node.name, f"rm -rf {remote}"), env=cluster.home.env(), check=True)
    shutil.rmtree(dest)
    return wall


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pyz", default=None)
    args = parser.parse_args()
    pyz = Path(args.pyz) if args.pyz else pyz_path()
    result = {"mib": args.mib, "jobs": args.jobs, "rounds": args.rounds, "machine": machine()}
    cluster = Cluster(1)
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    series = {"openssh": [], "asyncssh": [], "scp": []}
    try:
        with open(work / "source.bin", "wb") as out:
            for _ in range(args.mib):
                out.write(os.urandom(1 << 20))
        os.chmod(work / "source.bin", 0o644)
        for round_no in range(args.rounds):
            order = ["openssh", "asyncssh", "scp"] if round_no % 2 == 0 else ["scp", "asyncssh", "openssh"]
            for carrier in order:
                if carrier == "scp":
                    series["scp"].append((run_scp(cluster, work, args.mib, args.jobs), 0.0))
                else:
                    series[carrier].append(run_head(cluster, pyz, work, carrier, f"{carrier}{round_no}",
                                                    args.jobs, args.mib))
                wall, cpu = series[carrier][-1]
                print(f"round {round_no + 1} {carrier:9} {wall:7.2f} s  head CPU {cpu:6.2f} s", file=sys.stderr)
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    gib = args.mib * args.jobs / 1024
    medians = {k: statistics.median(w for w, _ in v) for k, v in series.items()}
    cpu_per_gib = {k: statistics.median(c for _, c in v) / gib for k, v in series.items() if k != "scp"}
    result.update({"median_wall_s": medians, "head_cpu_s_per_gib": cpu_per_gib, "all": series,
                   "speedup_vs_scp": {k: medians["scp"] / medians[k] for k in ("openssh", "asyncssh")}})
    print(f"{args.jobs} x {args.mib} MiB results, medians over {args.rounds} rounds:", file=sys.stderr)
    for k in ("openssh", "asyncssh"):
        print(f"  {k:9} {medians[k]:7.2f} s ({medians['scp'] / medians[k]:.2f}x scp; add to done, incl. the "
              f"jobs writing)  head CPU {cpu_per_gib[k]:.2f} s/GiB", file=sys.stderr)
    print(f"  scp       {medians['scp']:7.2f} s (the same bytes, node -> head)", file=sys.stderr)
    report("fetch", result)


if __name__ == "__main__":
    main()

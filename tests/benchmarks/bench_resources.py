"""Benchmark: packing jobs by their resources against today's fixed slots.

    python3 tests/benchmarks/bench_resources.py [--jobs 200] [--cpus 8] [--scale 1.0] [--seed 1]

Starts 3 real OpenSSH sshd nodes (tests/sshd.py) and a real head for each mode, and runs
the same `--jobs` shell jobs of mixed sizes (cpus 1, 2, 4 or 8; `sleep` 0.3, 0.6 or 1.2 s
times --scale) on nodes that declare `--cpus` cores each:
  - resources: every job says `resources: {cpus: N}`; the head packs them so the running
    requests never exceed a node's cores;
  - slots=1:   no resources, `slots: 1` (today's default, the only fixed slot count that
    never oversubscribes a node when a job may take all its cores);
  - slots=4:   no resources, `slots: 4` (more throughput, but oversubscribes: four 8-cpu
    jobs on 8 cores).
For each it reports the makespan (from `add` to the batch done) beside a lower bound:
max(total cpu-seconds / total cpus, longest job).  The jobs only sleep, so the figures
measure scheduling, not the machine.
"""

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import (DISTRIBUTE, Cluster, HeadProcess, machine, node_workdirs, pyz_path, report,  # noqa: E402
                         wait_batch_done, wait_until)
from cluster import NODE_PYTHON  # noqa: E402


def make_jobs(count: int, scale: float, seed: int):
    rnd = random.Random(seed)
    return [(rnd.choice([1, 1, 2, 2, 4, 8]), round(rnd.choice([0.3, 0.6, 1.2]) * scale, 3)) for _ in range(count)]


def job_file(folder: Path, name: str, jobs, with_resources: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"meta: {{batch_name: {name}, namespace: bench}}", "shell:", "  jobs:"]
    for i, (cpus, seconds) in enumerate(jobs):
        lines += [f"    - name: j{i:04d}", f"      command: 'sleep {seconds}'"]
        if with_resources:
            lines.append(f"      resources: {{cpus: {cpus}}}")
    path = folder / "distribute-jobs.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


def nodes_text(cluster, workdirs, cpus: int, slots) -> str:
    lines = ["nodes:"]
    for node in cluster.nodes:
        lines += [f"  - name: {node.name}", f"    host: {node.name}", "    user: dnode",
                  f"    workdir: {workdirs[node.name]}", f"    python: {NODE_PYTHON}", f"    cpus: {cpus}"]
        if slots:
            lines.append(f"    slots: {slots}")
    return "\n".join(lines) + "\n"


def run_mode(cluster, pyz, work: Path, mode: str, jobs, cpus: int) -> float:
    workdirs = node_workdirs(cluster.nodes)
    slots = {"resources": None, "slots=1": 1, "slots=4": 4}[mode]
    head = HeadProcess(None, nodes_text(cluster, workdirs, cpus, slots), cluster.home.env(), pyz=pyz,
                       extra=["--kill-grace", "2"]).start()
    try:
        wait_until(lambda: sum(n["reachable"] for n in json.loads(head.cli("nodes", "--json").stdout)["nodes"]) == 3,
                   60, "3 nodes up")
        name = mode.replace("=", "")
        path = job_file(work / name, name, jobs, mode == "resources")
        start = time.perf_counter()
        subprocess.run(DISTRIBUTE + ["--head", "local", "--socket", str(head.socket), "add", str(path)],
                       env=head.env, check=True, stdout=subprocess.DEVNULL)
        batch = wait_batch_done(head.socket, f"bench/{name}", timeout=1800)
        makespan = time.perf_counter() - start
        if batch["jobs"]["done"] != len(jobs):
            raise SystemExit(f"{mode}: {batch['jobs']}\n{head.log.read_text()[-3000:]}")
        return makespan
    finally:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)
        shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--cpus", type=int, default=8, help="cores each of the 3 nodes declares")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every job's duration")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    jobs = make_jobs(args.jobs, args.scale, args.seed)
    bound = max(sum(c * s for c, s in jobs) / (3 * args.cpus), max(s for _, s in jobs))
    pyz = pyz_path()
    cluster = Cluster(3)
    work = Path(tempfile.mkdtemp(prefix="bench-res-"))
    try:
        result = {"machine": machine(), "jobs": args.jobs, "cpus_per_node": args.cpus, "nodes": 3,
                  "lower_bound_s": round(bound, 2), "serial_s": round(sum(s for _, s in jobs), 2)}
        for mode in ("resources", "slots=1", "slots=4"):
            makespan = run_mode(cluster, pyz, work, mode, jobs, args.cpus)
            result[f"{mode}_s"] = round(makespan, 2)
            result[f"{mode}_vs_bound"] = round(makespan / bound, 2)
            print(f"{mode:>10}: makespan {makespan:6.1f} s = {makespan / bound:.2f} x the lower bound "
                  f"({bound:.1f} s)", file=sys.stderr)
        result["slots=1_over_resources"] = round(result["slots=1_s"] / result["resources_s"], 2)
        report("resources", result)
    finally:
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

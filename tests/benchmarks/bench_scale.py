"""Benchmark: a head with 100,000 queued jobs in 1,000 batches.

    python3 tests/benchmarks/bench_scale.py [--batches 1000] [--per-batch 100] [--big 10000] [--rounds 3]

A real head (`distribute.py serve`) whose one node is declared in its nodes
file (with the capability the batches need) but never answers: an SSH port
nothing listens on, so every job stays queued.  The queue is filled through the
head's socket in process (1,000 `add` requests of 100 jobs), then, alternately
in every round:
  - `distribute status --json` (the command a user types: Python start-up
    included) and the same request in process (the head's own share);
  - `distribute add` of a fresh 10,000-job batch (shell jobs; the client loads
    the YAML, the head stores the jobs) and the same in process;
  - `python3 -c pass`, the floor any Python command pays on this machine.
It reports the medians and the head's RSS.  Targets (issue 8): status <= 0.3 s,
add of 10k jobs <= 3 s, RSS <= 300 MB.
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import DISTRIBUTE, ROOT, HeadProcess, head_call, machine, median, report, shell_job_file  # noqa: E402

import psutil  # noqa: E402

sys.path.insert(0, str(ROOT))
import distribute  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_file(folder: Path, name: str, count: int) -> Path:
    return shell_job_file(folder, name, count, lambda i: f"echo {i} > distribute_save/out.txt",
                          namespace="scale", capabilities=["benchcap"])


def add_in_process(sock: Path, header: dict) -> dict:
    async def go():
        client = distribute.HeadClient("local", str(sock))
        try:
            return await client.call_with_files(header, [])
        finally:
            await client.close()
    return asyncio.run(go())


def timed_cli(argv, env, cwd=None, cpu=None):
    """Wall seconds and output; the child's CPU seconds appended to `cpu` (what survives a busy machine)."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if cpu is not None:
        cpu.append(after.children_user - before.children_user + after.children_system - before.children_system)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[2:])} exited {proc.returncode}: {proc.stderr}")
    return wall, proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--per-batch", type=int, default=100)
    parser.add_argument("--big", type=int, default=10000, help="jobs in each timed `add`")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="bench-scale-home-"))
    (home / ".ssh").mkdir(mode=0o700)
    env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID")}
    env["HOME"] = str(home)
    nodes_text = ("nodes:\n  - name: away\n    host: 127.0.0.1\n"
                  f"    port: {free_port()}\n    user: nobody\n    capabilities: [benchcap]\n")
    head = HeadProcess(None, nodes_text, env)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    result = {"batches": args.batches, "per_batch": args.per_batch, "big": args.big, "rounds": args.rounds,
              "machine": machine()}
    try:
        head.start()
        proc = psutil.Process(head.proc.pid)
        rss_idle = proc.memory_info().rss
        template = distribute.load_job_file(job_file(work / "template", "template", args.per_batch))
        header = distribute.add_request(template)
        start = time.perf_counter()
        for i in range(args.batches):
            header["plan"]["batch"] = f"b{i:05d}"
            add_in_process(head.socket, header)
        fill_s = time.perf_counter() - start
        print(f"filled {args.batches} x {args.per_batch} jobs in {fill_s:.1f} s "
              f"({args.batches / fill_s:.0f} adds/s)", file=sys.stderr)
        rss_filled = proc.memory_info().rss

        cli = DISTRIBUTE + ["--head", "local", "--socket", str(head.socket)]
        series = {k: [] for k in ("status_cli", "status_cli_cpu", "status_request", "add_cli", "add_cli_cpu",
                                  "add_request", "help_cli", "help_cli_cpu", "python_pass", "head_cpu")}
        big = distribute.load_job_file(job_file(work / "big-template", "big-template", args.big))
        big_header = distribute.add_request(big)
        for round_no in range(args.rounds):
            wall, out = timed_cli(cli + ["status", "--json"], env, cpu=series["status_cli_cpu"])
            series["status_cli"].append(wall)
            batches = json.loads(out)["batches"]
            head_before = sum(proc.cpu_times()[:2])
            start = time.perf_counter()
            reply, _ = head_call(head.socket, {"op": "status"})
            series["status_request"].append(time.perf_counter() - start)
            series["head_cpu"].append(sum(proc.cpu_times()[:2]) - head_before)
            path = job_file(work / f"big{round_no}", f"big{round_no}", args.big)
            wall, _ = timed_cli(cli + ["add", str(path)], env, cwd=str(path.parent), cpu=series["add_cli_cpu"])
            series["add_cli"].append(wall)
            big_header["plan"]["batch"] = f"bigreq{round_no}"
            start = time.perf_counter()
            add_in_process(head.socket, big_header)
            series["add_request"].append(time.perf_counter() - start)
            series["python_pass"].append(timed_cli([sys.executable, "-c", "pass"], env)[0])
            series["help_cli"].append(timed_cli(DISTRIBUTE + ["--help"], env, cpu=series["help_cli_cpu"])[0])
            queued = sum(b["jobs"]["queued"] for b in batches)
            print(f"round {round_no + 1}: status {series['status_cli'][-1]:.2f} s (request "
                  f"{series['status_request'][-1]:.3f} s, {len(batches)} batches, {queued} queued), "
                  f"add {args.big}: {series['add_cli'][-1]:.2f} s (request {series['add_request'][-1]:.2f} s), "
                  f"python -c pass {series['python_pass'][-1]:.2f} s, distribute --help {series['help_cli'][-1]:.2f} s",
                  file=sys.stderr)
        rss_end = proc.memory_info().rss
        final = head_call(head.socket, {"op": "status"})[0]
    except BaseException:
        if head.log.exists():
            print("--- head log ---\n" + head.log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)

    medians = {k: median(v) for k, v in series.items()}
    result.update({
        "fill_s": fill_s, "median_s": medians, "all_s": series,
        "queued_at_end": sum(b["jobs"]["queued"] for b in final["batches"]),
        "batches_at_end": len(final["batches"]),
        "rss_mb": {"idle": rss_idle / 1e6, "filled": rss_filled / 1e6, "end": rss_end / 1e6},
        "targets": {"status_s": 0.3, "add_10k_s": 3.0, "rss_mb": 300},
        "met": {"status": medians["status_cli"] <= 0.3, "add": medians["add_cli"] <= 3.0,
                "rss": rss_end / 1e6 <= 300}})
    print(f"medians: status --json {medians['status_cli']:.2f} s (head request {medians['status_request']:.3f} s), "
          f"add {args.big} jobs {medians['add_cli']:.2f} s (head request {medians['add_request']:.2f} s), "
          f"python -c pass {medians['python_pass']:.2f} s; head RSS {rss_end / 1e6:.0f} MB "
          f"(idle {rss_idle / 1e6:.0f} MB)", file=sys.stderr)
    print(f"CPU medians: status --json {medians['status_cli_cpu']:.2f} s (head {medians['head_cpu']:.3f} s for the "
          f"request), add {medians['add_cli_cpu']:.2f} s, distribute --help {medians['help_cli_cpu']:.2f} s",
          file=sys.stderr)
    report("scale", result)


if __name__ == "__main__":
    main()

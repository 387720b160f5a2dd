"""Benchmark: `status`, `nodes` and `logs` against a head holding 100,000 queued jobs,
on the head's machine and over SSH, beside `ssh head true` and `python3 -c pass`.

    python3 tests/benchmarks/bench_client.py [--batches 1000] [--per-batch 100] [--rounds 5]

Run it as root (like the test fixtures: it creates the test users and starts an sshd).
A head (`distribute serve`, socket group `distribute`) whose one node is declared with
the capability every batch needs but never answers, so every job stays queued; the queue
is filled through the head's socket in process.  A lab member (dalice) reaches the head's
machine through a real OpenSSH sshd with her own key and known_hosts.

The client runs as `pip install` gives it: the module imported from its .pyc (the pyz
runs the same code from its unpack cache).  Alternately, in every round:
  - python3 -c pass                     the floor of any Python command
  - status --json / nodes / logs        with --head local (on the head's machine)
  - ssh head true                       the floor of any command over SSH (a new login each time)
  - status --json / nodes / logs        with --head head: OpenSSH's ssh, the connection kept
  - status --json, asyncssh             DISTRIBUTE_SSH=asyncssh: a new asyncssh login each time
It prints medians (wall and CPU) and the differences to the floors, and one JSON line.
Targets (issue 16): local <= 0.15 s; over SSH within 0.1 s of `ssh head true`.
"""

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import INSTALLED, ROOT, compile_module, head_behind_sshd, machine, report, shell_job_file  # noqa: E402

import sshd as sshd_lib  # noqa: E402

sys.path.insert(0, str(ROOT))
import distribute  # noqa: E402


def timed(argv, env):
    """(wall seconds, CPU seconds of the child)."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, argv[-4:]))} exited {proc.returncode}: {proc.stderr}")
    return wall, after.children_user - before.children_user + after.children_system - before.children_system


def fill(sock: Path, work: Path, batches: int, per_batch: int) -> None:
    template = distribute.load_job_file(shell_job_file(work / "template", "template", per_batch,
                                                       lambda i: "true", namespace="scale",
                                                       capabilities=["benchcap"]))
    header = distribute.add_request(template)

    async def go():
        client = distribute.HeadClient("local", str(sock))
        try:
            for i in range(batches):
                header["plan"]["batch"] = f"b{i:05d}"
                await client.call_with_files(header, [])
        finally:
            await client.close()
    asyncio.run(go())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--per-batch", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    sshd_lib.ensure_users()
    sshd_lib.ensure_privsep_dir()
    compile_module()
    base = Path(tempfile.mkdtemp(prefix="bench-client-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    head_sshd, alice, head = head_behind_sshd(base)
    result = {"batches": args.batches, "per_batch": args.per_batch, "rounds": args.rounds, "machine": machine()}
    try:
        head.start()
        os.chmod(head.dir, 0o755)
        start = time.perf_counter()
        fill(head.socket, base, args.batches, args.per_batch)
        print(f"filled {args.batches} x {args.per_batch} jobs in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        local = INSTALLED + ["--head", "local", "--socket", str(head.socket)]
        remote = INSTALLED + ["--head", "head", "--socket", str(head.socket)]
        client_env = alice.env()
        # `logs` of a job of dalice's own (a queued job's output is for its owner and admins only)
        mine = shell_job_file(base / "mine", "mine", 1, lambda i: "true", namespace="dalice",
                              capabilities=["benchcap"])
        os.chmod(base / "mine", 0o755)
        timed(remote + ["add", str(mine)], client_env)
        job = "dalice/mine/j00000"
        runs = {
            "python_pass": ([sys.executable, "-c", "pass"], head.env),
            "local_status": (local + ["status", "--json"], head.env),
            "local_nodes": (local + ["nodes"], head.env),
            "local_logs": (local + ["logs", job], head.env),
            "ssh_true": (alice.ssh("head", "true"), client_env),
            "ssh_status": (remote + ["status", "--json"], client_env),
            "ssh_nodes": (remote + ["nodes"], client_env),
            "ssh_logs": (remote + ["logs", job], client_env),
            "asyncssh_status": (remote + ["status", "--json"], dict(client_env, DISTRIBUTE_SSH="asyncssh")),
        }
        timed(*runs["ssh_status"])          # the first command over SSH starts the kept connection
        series = {name: [] for name in runs}
        for round_no in range(args.rounds):
            names = list(runs) if round_no % 2 == 0 else list(reversed(list(runs)))
            for name in names:
                series[name].append(timed(*runs[name]))
            print(f"round {round_no + 1}: " + ", ".join(f"{n} {series[n][-1][0]:.3f}" for n in runs), file=sys.stderr)
    except BaseException:
        if head.log.exists():
            print("--- head log ---\n" + head.log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        head.stop()
        alice.close()
        head_sshd.stop()
        shutil.rmtree(head.dir, ignore_errors=True)
        shutil.rmtree(base, ignore_errors=True)

    wall = {n: statistics.median(x[0] for x in v) for n, v in series.items()}
    cpu = {n: statistics.median(x[1] for x in v) for n, v in series.items()}
    result.update({"median_wall_s": wall, "median_cpu_s": cpu, "all": series,
                   "targets": {"local_s": 0.15, "ssh_minus_ssh_true_s": 0.1},
                   "met": {n: (wall[n] <= 0.15 if n.startswith("local") else wall[n] - wall["ssh_true"] <= 0.1)
                           for n in wall if n.startswith(("local", "ssh_")) and n != "ssh_true"}})
    print(f"medians over {args.rounds} rounds (wall / CPU of the command), {args.batches * args.per_batch} queued:",
          file=sys.stderr)
    for name in series:
        extra = ""
        if name.startswith("local"):
            extra = f"  {wall[name] / wall['python_pass']:.2f}x python3 -c pass"
        elif name != "ssh_true" and name.startswith(("ssh", "asyncssh")):
            extra = f"  ssh head true {wall[name] - wall['ssh_true']:+.3f} s"
        print(f"  {name:16} {wall[name]:.3f} s / {cpu[name]:.3f} s{extra}", file=sys.stderr)
    report("client", result)


if __name__ == "__main__":
    main()

"""Benchmark: node -> head result fetches and client -> head `add` uploads, and the CPU
the head's machine spends per GiB received.

    python3 tests/benchmarks/bench_fetch.py [--mode fetch|add] [--mib 256] [--jobs 2] [--rounds 3]
                                            [--carriers openssh,asyncssh]

Run it as root (it starts sshd machines like the test fixtures).

--mode fetch (the default): one sshd node, a head on it per carrier in every round
(alternating the order):
  - openssh:  the head as shipped: bulk transfers through OpenSSH's `ssh` (kept master);
  - asyncssh: the same head with DISTRIBUTE_SSH=asyncssh (its bulk streams in Python);
each runs a batch of --jobs jobs that write --mib MiB of random data to distribute_save/
(each job copies a file made beforehand, so the timed part is mostly the fetch: add to done).
The peer: `scp -r` of the same files from the node account to this machine.

--mode add: a head whose one node never answers (the batch stays queued) behind an sshd
"head" machine; a lab member (dalice) runs `distribute add` of a batch of --jobs jobs each
with a --mib MiB input (required_files), through OpenSSH's `ssh` (openssh) or asyncssh
(DISTRIBUTE_SSH=asyncssh on the client).  The peer: `scp` of the same files to the head's
machine as dalice.  The timed part is the whole `add` command.

CPU counted on the receiving (head's) machine, medians per GiB:
  - head:      the `distribute serve` process alone (user + system, every thread);
  - head+ssh:  fetch: plus the `ssh` master that decrypts the node's stream (a process of
               its own, not a child of the head); add: plus the head machine's sshd
               processes serving dalice (they decrypt the upload);
  - scp:       fetch: scp and its ssh (they decrypt and write the files);
               add: the head machine's sshd processes serving dalice (scp's receiving side).
Targets (issue 16): >= 1.0x scp, head CPU <= 1.5 s per GiB.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import (INSTALLED, Cluster, HeadProcess, compile_module, head_behind_sshd, machine, node_workdirs,  # noqa: E402
                         nodes_yaml, pyz_path, report, shell_job_file, wait_batch_done, wait_until)

import psutil  # noqa: E402
import sshd as sshd_lib  # noqa: E402


def cpu_of(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


class CpuWatch:
    """CPU seconds spent by the processes `match` picks (those that start meanwhile too) from
    start() to stop(): sampled every 20 ms, so a process that exits loses its last < 20 ms."""

    def __init__(self, match):
        self.match, self.first, self.last, self.done = match, {}, {}, threading.Event()

    def sample(self, initial: bool = False) -> None:
        for proc in psutil.process_iter(["username", "name"]):
            try:
                if not self.match(proc):
                    continue
                key, cpu = (proc.pid, proc.create_time()), cpu_of(proc)
            except psutil.Error:
                continue
            self.first.setdefault(key, cpu if initial else 0.0)
            self.last[key] = cpu

    def start(self) -> "CpuWatch":
        self.sample(initial=True)
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()
        return self

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.sample()

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        self.sample()
        return sum(self.last[k] - self.first[k] for k in self.last)


def master_of(home: Path) -> psutil.Process:
    """The head's kept OpenSSH master (`ssh -f`: a process of its own, not the head's child)."""
    controls = [str(c) for c in (home / ".cache" / "distribute-ssh").glob("*.ctl")]
    found = [proc for proc in psutil.process_iter(["cmdline", "create_time"])
             if os.path.basename((proc.info["cmdline"] or [""])[0]) == "ssh"
             and any(f"ControlPath={c}" in proc.info["cmdline"] for c in controls)]
    if not found:
        raise SystemExit(f"no ssh master for {controls}")
    return max(found, key=lambda proc: proc.info["create_time"])     # an earlier round's may be idling out


def run_head(cluster, pyz, work: Path, carrier: str, name: str, jobs: int, mib: int):
    """(seconds from add to done, head CPU, head + ssh master CPU) for one batch of big results."""
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
        master = master_of(cluster.home.path) if carrier == "openssh" else None
        master_before = cpu_of(master) if master else 0.0
        before, start = cpu_of(proc), time.perf_counter()
        head.cli("add", path)
        wait_batch_done(head.socket, f"bench/{name}", 1800, poll=0.2)     # each poll costs the head CPU too
        wall, cpu = time.perf_counter() - start, cpu_of(proc) - before
        ssh_cpu = cpu_of(master) - master_before if master else 0.0
        for i in range(jobs):
            got = head.archive / "bench" / name / f"j{i:05d}" / "r.bin"
            if got.stat().st_size != mib << 20:
                raise SystemExit(f"{got}: {got.stat().st_size} bytes")
        return wall, cpu, cpu + ssh_cpu
    finally:
        head.stop()
        shutil.rmtree(head.dir, ignore_errors=True)
        shutil.rmtree(next(iter(workdirs.values())).parent, ignore_errors=True)


def run_scp(cluster, work: Path, mib: int, jobs: int):
    """scp of `jobs` files of `mib` MiB from the node account (made untimed first):
    (wall, 0, CPU of scp and its ssh)."""
    node = cluster.nodes[0]
    remote = f"/tmp/bench-fetch-{os.getpid()}"
    ssh = cluster.home.ssh(node.name, f"mkdir -p {remote} && for i in $(seq {jobs}); do "
                                      f"cp {work / 'source.bin'} {remote}/r$i.bin; done")
    subprocess.run(ssh, env=cluster.home.env(), check=True)
    dest = work / f"scp-{time.monotonic_ns()}"
    dest.mkdir()
    before, start = os.times(), time.perf_counter()
    subprocess.run(["scp", "-F", str(cluster.home.config), "-r", f"{node.name}:{remote}", str(dest)],
                   env=cluster.home.env(), check=True)
    wall, after = time.perf_counter() - start, os.times()
    subprocess.run(cluster.home.ssh(node.name, f"rm -rf {remote}"), env=cluster.home.env(), check=True)
    shutil.rmtree(dest)
    return wall, 0.0, after.children_user - before.children_user + after.children_system - before.children_system


def dalice_processes(proc: psutil.Process) -> bool:
    return proc.info["username"] == "dalice"


def run_add(head, alice, work: Path, carrier: str, name: str, jobs: int, mib: int):
    """(seconds of `distribute add`, head CPU, head + head-side sshd CPU) for a batch whose
    jobs carry `jobs` inputs of `mib` MiB."""
    folder = work / name
    folder.mkdir()
    lines = ["meta:", f"  batch_name: {name}", "  namespace: dalice", "  capabilities: [benchcap]", "shell:", "  jobs:"]
    for i in range(jobs):
        lines += [f"    - name: j{i:05d}", "      command: 'true'",
                  f"      required_files: [{{path: {work / f'source{i}.bin'}, alias: in.bin}}]"]
    (folder / "distribute-jobs.yaml").write_text("\n".join(lines) + "\n")
    env = alice.env(**({"DISTRIBUTE_SSH": "asyncssh"} if carrier == "asyncssh" else {}))
    argv = INSTALLED + ["--head", "head", "--socket", str(head.socket), "add", str(folder / "distribute-jobs.yaml")]
    proc = psutil.Process(head.proc.pid)
    watch = CpuWatch(dalice_processes).start()
    before, start = cpu_of(proc), time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - start, cpu_of(proc) - before
    sshd_cpu = watch.stop()
    if done.returncode != 0:
        raise SystemExit(f"add exited {done.returncode}: {done.stderr}\n{head.log.read_text()[-2000:]}")
    landed = sum(f.stat().st_size for f in (head.state / "files").rglob("*.bin"))
    if landed < jobs * (mib << 20):
        raise SystemExit(f"{landed} bytes landed on the head")
    shutil.rmtree(head.state / "files", ignore_errors=True)   # the batch is never run: its inputs go
    shutil.rmtree(folder)
    return wall, cpu, cpu + sshd_cpu


def run_scp_up(alice, work: Path, jobs: int):
    """scp of the same inputs to the head's machine as dalice: (wall, 0, head-side sshd and scp CPU)."""
    remote = Path(tempfile.mkdtemp(prefix="bench-add-scp-", dir="/var/tmp"))
    shutil.chown(remote, "dalice")
    watch = CpuWatch(dalice_processes).start()
    start = time.perf_counter()
    subprocess.run(["scp", "-F", str(alice.config)] + [str(work / f"source{i}.bin") for i in range(jobs)]
                   + [f"head:{remote}/"], env=alice.env(), check=True)
    wall = time.perf_counter() - start
    cpu = watch.stop()
    shutil.rmtree(remote)
    return wall, 0.0, cpu


def make_source(path: Path, mib: int) -> None:
    with open(path, "wb") as out:
        for _ in range(mib):
            out.write(os.urandom(1 << 20))
    os.chmod(path, 0o644)


def measure(args, work: Path, carriers):
    """{carrier or "scp": [(wall, head CPU, head machine CPU), ...]} over the rounds."""
    series = {name: [] for name in carriers + ["scp"]}
    if args.mode == "fetch":
        pyz = Path(args.pyz) if args.pyz else pyz_path()
        cluster = Cluster(1)
        make_source(work / "source.bin", args.mib)
        runs = {"scp": lambda r: run_scp(cluster, work, args.mib, args.jobs)}
        for carrier in carriers:
            runs[carrier] = (lambda c: lambda r: run_head(cluster, pyz, work, c, f"{c}{r}", args.jobs, args.mib))(carrier)
        cleanup = [cluster.close]
    else:
        sshd_lib.ensure_users()
        sshd_lib.ensure_privsep_dir()
        compile_module()
        head_sshd, alice, head = head_behind_sshd(work)
        head.start()
        os.chmod(head.dir, 0o755)
        cleanup = [head.stop, alice.close, head_sshd.stop, lambda: shutil.rmtree(head.dir, ignore_errors=True)]
        for i in range(args.jobs):
            make_source(work / f"source{i}.bin", args.mib)
        runs = {"scp": lambda r: run_scp_up(alice, work, args.jobs)}
        for carrier in carriers:
            runs[carrier] = (lambda c: lambda r: run_add(head, alice, work, c, f"{c}{r}", args.jobs, args.mib))(carrier)
        runs["openssh" if "openssh" in carriers else carriers[0]](-1)          # the kept connection started
    try:
        for round_no in range(args.rounds):
            order = carriers + ["scp"] if round_no % 2 == 0 else ["scp"] + carriers[::-1]
            for name in order:
                series[name].append(runs[name](round_no))
                wall, cpu, machine_cpu = series[name][-1]
                print(f"round {round_no + 1} {name:9} {wall:7.2f} s  head CPU {cpu:6.2f} s  with ssh {machine_cpu:6.2f} s"
                      f"  (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
    finally:
        for step in cleanup:
            step()
    return series


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("fetch", "add"), default="fetch")
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--carriers", default="openssh,asyncssh")
    parser.add_argument("--pyz", default=None)
    args = parser.parse_args()
    carriers = [c for c in args.carriers.split(",") if c]
    if not carriers or set(carriers) - {"openssh", "asyncssh"}:
        parser.error("--carriers: openssh and/or asyncssh")
    result = {"mode": args.mode, "mib": args.mib, "jobs": args.jobs, "rounds": args.rounds, "machine": machine()}
    work = Path(tempfile.mkdtemp(prefix=f"bench-{args.mode}-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    try:
        series = measure(args, work, carriers)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    gib = args.mib * args.jobs / 1024
    medians = {k: statistics.median(w for w, _, _ in v) for k, v in series.items()}
    head_cpu = {k: statistics.median(c for _, c, _ in v) / gib for k, v in series.items() if k != "scp"}
    machine_cpu = {k: statistics.median(m for _, _, m in v) / gib for k, v in series.items()}
    result.update({"median_wall_s": medians, "head_cpu_s_per_gib": head_cpu, "with_ssh_cpu_s_per_gib": machine_cpu,
                   "all": series, "load_after": round(os.getloadavg()[0], 2),
                   "speedup_vs_scp": {k: medians["scp"] / medians[k] for k in carriers}})
    what = "results fetched (add to done, incl. the jobs writing)" if args.mode == "fetch" else "inputs uploaded by `add`"
    print(f"{args.jobs} x {args.mib} MiB {what}, medians over {args.rounds} rounds:", file=sys.stderr)
    for k in carriers:
        print(f"  {k:9} {medians[k]:7.2f} s ({medians['scp'] / medians[k]:.2f}x scp)  head CPU {head_cpu[k]:.2f} s/GiB"
              f"  head + ssh {machine_cpu[k]:.2f} s/GiB", file=sys.stderr)
    print(f"  scp       {medians['scp']:7.2f} s (the same bytes)  receiving side CPU {machine_cpu['scp']:.2f} s/GiB",
          file=sys.stderr)
    report(args.mode, result)


if __name__ == "__main__":
    main()

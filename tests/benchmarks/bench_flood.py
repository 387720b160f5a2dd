"""Benchmark: 8 nodes finish big results at the same moment; does the head keep dispatching
and does `status` keep answering?

    python3 tests/benchmarks/bench_flood.py [--nodes 8] [--mib 256] [--steady 2000]
                                            [--nodes-at-full-priority]

Run it as root (it starts sshd nodes like the test fixtures).  A head with --nodes real
OpenSSH sshd nodes (2 slots each).  Each node gets one "flood" job (a batch per node, pinned
by a capability only that node has) that waits for one agreed moment and then copies
--mib MiB of random data into distribute_save/: all results are ready at once and the head
fetches them all together.  A "steady" batch of --steady `true` jobs, added a second before,
runs on every node's other slot through the flood.  During the flood the bench asks `status` again and again, two ways:
  - the head's answer alone (the request over its Unix socket, in this process), 4 times a second,
  - the real command line as a user runs it (`distribute status`, its own interpreter start),
    one after another in a thread of its own,
and counts the steady jobs that ended while results were arriving (dispatch going on).
The nodes all run on this machine, so by default their side (sshd sessions, supervisors, jobs)
runs at nice 19, standing in for machines of their own.
Target (issue 16): `status` answers in < 0.2 s during the flood, and the head keeps dispatching.
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
from benchcommon import (DISTRIBUTE, Cluster, HeadProcess, batch_state, head_call, machine,  # noqa: E402
                         node_workdirs, nodes_yaml, pyz_path, report, shell_job_file, wait_batch_done,
                         wait_until)
import sshd as sshd_lib  # noqa: E402  (tests/, which benchcommon put on the path)


def nodes_in_the_background(cluster: Cluster) -> None:
    """The nodes here share this machine's cores with the head; in a lab each is a machine of
    its own.  Their sshds (whose sessions inherit it) and the node account's processes (the
    supervisors and their jobs) get the lowest priority, so what is timed is the head's side:
    the head, its `ssh` clients and `status`."""
    import psutil
    for node in cluster.nodes:
        psutil.Process(node.pid).nice(19)
    for proc in psutil.process_iter(["username"]):
        if proc.info["username"] == sshd_lib.NODE_USER:
            try:
                proc.nice(19)
            except psutil.Error:
                pass


def sample_status(sock: Path, env, stop: threading.Event, samples: dict) -> None:
    """The head's answer to `status` four times a second, and the whole command (its own
    interpreter start) in a thread of its own, until told to stop."""
    cli = DISTRIBUTE + ["--head", "local", "--socket", str(sock), "status", "--all", "--json"]

    def commands():
        while not stop.is_set():
            start = time.perf_counter()
            subprocess.run(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            samples["cli"].append((time.time(), time.perf_counter() - start))
            stop.wait(0.5)
    thread = threading.Thread(target=commands)
    thread.start()
    while not stop.is_set():
        start = time.perf_counter()
        head_call(sock, {"op": "status", "all": True})
        samples["head"].append((time.time(), time.perf_counter() - start))
        stop.wait(0.25)
    thread.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--steady", type=int, default=2000)
    parser.add_argument("--pyz", default=None)
    parser.add_argument("--head-log", default=None,
                        help="keep the head's log here, written in asyncio's debug mode (it names every "
                             "event-loop step that took over 0.1 s)")
    parser.add_argument("--nodes-at-full-priority", action="store_true",
                        help="leave the node-side processes at normal priority (they compete with the head)")
    args = parser.parse_args()
    pyz = Path(args.pyz) if args.pyz else pyz_path()
    cluster = Cluster(args.nodes)
    work = Path(tempfile.mkdtemp(prefix="bench-flood-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    head, result = None, {"nodes": args.nodes, "mib": args.mib, "steady": args.steady, "machine": machine()}
    try:
        with open(work / "source.bin", "wb") as out:
            for _ in range(args.mib):
                out.write(os.urandom(1 << 20))
        os.chmod(work / "source.bin", 0o644)
        workdirs = node_workdirs(cluster.nodes)
        caps = {node.name: [f"only-{node.name}"] for node in cluster.nodes}
        text = nodes_yaml(cluster.nodes, workdirs, caps=caps, slots={n.name: 2 for n in cluster.nodes})
        env = cluster.home.env(**({"PYTHONASYNCIODEBUG": "1"} if args.head_log else {}))
        head = HeadProcess(None, text, env, pyz=pyz, extra=["--kill-grace", "2", "--supervisor-idle", "300"])
        head.start()
        wait_until(lambda: sum(n["reachable"] for n in head.nodes()) >= args.nodes, 180, "nodes up")
        warm = shell_job_file(work / "warm", "warm", 2 * args.nodes, lambda i: "head -c 2000000 /dev/zero > distribute_save/w.bin")
        head.cli("add", warm)
        wait_batch_done(head.socket, "bench/warm", 600)            # supervisors and bulk paths set up
        if not args.nodes_at_full_priority:
            nodes_in_the_background(cluster)

        moment = time.time() + 20 + args.nodes                    # every flood job has started by then
        for node in cluster.nodes:
            path = shell_job_file(work / f"flood-{node.name}", f"flood-{node.name}", 1,
                                  lambda i: f"while [ $(date +%s) -lt {int(moment)} ]; do sleep 0.05; done; "
                                            f"cp {work / 'source.bin'} distribute_save/r.bin",
                                  capabilities=[f"only-{node.name}"])
            head.cli("add", path)
        steady = shell_job_file(work / "steady", "steady", args.steady, lambda i: "true")
        samples = {"head": [], "cli": []}
        stop = threading.Event()
        sampler = threading.Thread(target=sample_status, args=(head.socket, env, stop, samples))
        sampler.start()
        time.sleep(max(0.0, moment - 1.0 - time.time()))       # the steady jobs run through the flood
        head.cli("add", steady)
        flood_done = None
        try:
            for node in cluster.nodes:
                wait_batch_done(head.socket, f"bench/flood-{node.name}", 1800, poll=0.2)
            flood_done = time.time()
            wait_batch_done(head.socket, "bench/steady", 1800, poll=0.2)
        finally:
            stop.set()
            sampler.join()
        steady_counts = batch_state(head.socket, "bench/steady")["jobs"]
        window = (moment, flood_done)
        during = {kind: [s for t, s in values if window[0] <= t <= window[1]] for kind, values in samples.items()}
        steady_during = sum(1 for p in (head.archive / "bench" / "steady").glob("j*/job.json")
                            if window[0] <= p.stat().st_mtime <= window[1])
        for node in cluster.nodes:
            got = head.archive / "bench" / f"flood-{node.name}" / "j00000" / "r.bin"
            if got.stat().st_size != args.mib << 20:
                raise SystemExit(f"{got}: {got.stat().st_size} bytes")
        result.update({
            "flood_s": flood_done - moment, "steady_jobs": steady_counts,
            "steady_ended_during_flood": steady_during,
            "status_head_s": {"median": statistics.median(during["head"]), "max": max(during["head"]),
                              "samples": len(during["head"])} if during["head"] else None,
            "status_cli_s": {"median": statistics.median(during["cli"]), "max": max(during["cli"]),
                             "samples": len(during["cli"])} if during["cli"] else None,
        })
    finally:
        if head is not None:
            head.stop()
            if args.head_log:
                shutil.copyfile(head.log, args.head_log)
            shutil.rmtree(head.dir, ignore_errors=True)
        cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    gib = args.nodes * args.mib / 1024
    print(f"{args.nodes} nodes x {args.mib} MiB ready at once ({gib:.1f} GiB): all archived "
          f"{result['flood_s']:.1f} s after the moment", file=sys.stderr)
    print(f"  steady `true` jobs that ended while the results arrived: {result['steady_ended_during_flood']}",
          file=sys.stderr)
    for kind, label in (("status_head_s", "status, the head's answer"), ("status_cli_s", "status, the command")):
        figures = result[kind]
        if figures:
            print(f"  {label:28} median {figures['median'] * 1000:6.1f} ms, max {figures['max'] * 1000:6.1f} ms "
                  f"({figures['samples']} samples during the flood; target < 200 ms)", file=sys.stderr)
    report("flood", result)


if __name__ == "__main__":
    main()

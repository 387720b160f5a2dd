"""Benchmark: how fast `pause` stops a node's jobs and `resume` lets them go on.

Not collected by pytest (run it by hand):

    python3 tests/benchmarks/bench_pause.py [--rounds 30] [--jobs 2] [--interval 0.05]
                                            [--pyz distribute.pyz] [--compare OLD.py]

It starts --jobs job trees (a shell that starts a child that starts a grandchild
in a session of its own, all burning CPU), runs `watch_pauses` in a thread with
its own event loop as the node supervisor does, and then, each round, runs the
real CLI:
  - `distribute.py pause --duration 10m`, timing from the command's own start
    (and from its first line of output) to the moment every job process is in state T;
  - `distribute.py resume`, timing from its exit to the moment no job process is
    stopped (negative: the jobs ran again before `resume` had finished printing).
It prints the median and 95th percentile of each, then one JSON line.  In the same
rounds it measures the floor, `python3 -I -c pass` plus one watcher tick, and, with
--compare, the same pause through another distribute.py (e.g. `git show
main:distribute.py > /tmp/old.py`), so the ratio is of figures taken side by side.
"""

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

import distribute  # noqa: E402

BURN = "while :; do :; done"
JOB = f"sh -c 'setsid sh -c \"{BURN}\" & {BURN}' & {BURN}\n"


def start_jobs(count, folder):
    script = folder / "job.sh"
    script.write_text(JOB)
    return [subprocess.Popen(["sh", str(script)], start_new_session=True, stdin=subprocess.DEVNULL)
            for _ in range(count)]


def tree_pids(root_pid):
    import psutil
    root = psutil.Process(root_pid)
    return [root.pid] + [child.pid for child in root.children(recursive=True)]


def states(pids):
    found = []
    for pid in pids:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            data = stat.read()
        found.append(data[data.rindex(b")") + 2:].split()[0].decode())
    return found


def wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit("timed out: the watcher did not act within 10 s")
        time.sleep(0.0005)
    return time.monotonic()


def run_watcher(folder, roots, interval):
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    def body():
        asyncio.set_event_loop(loop)
        holder["task"] = loop.create_task(distribute.watch_pauses(lambda: roots, interval=interval, folder=folder))
        ready.set()
        try:
            loop.run_until_complete(holder["task"])
        except asyncio.CancelledError:
            pass

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    ready.wait()

    def stop():
        loop.call_soon_threadsafe(holder["task"].cancel)
        thread.join()
    return stop


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--interval", type=float, default=0.05, help="the watcher's tick (s)")
    parser.add_argument("--pyz", default=None, help="run `pause` from this distribute.pyz, as on a node")
    parser.add_argument("--compare", default=None, help="another distribute.py (or .pyz) to time alike")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-pause-"))
    locks = work / "locks"
    env = dict(os.environ, DISTRIBUTE_PAUSE_DIR=str(locks))
    os.environ["DISTRIBUTE_PAUSE_DIR"] = str(locks)
    distribute.pause_dir()
    jobs = start_jobs(args.jobs, work)
    roots = [job.pid for job in jobs]
    time.sleep(0.3)  # let every job start its child and grandchild (no event to wait for)
    pids = [pid for root in roots for pid in tree_pids(root)]
    stop_watcher = run_watcher(locks, roots, args.interval)
    command = [sys.executable, str(args.pyz or ROOT / "distribute.py")]
    variants = {"this": command}
    if args.compare:
        variants["compare"] = [sys.executable, str(args.compare)]
    to_stopped, to_running, from_start, floor = [], [], {name: [] for name in variants}, []
    try:
        for _ in range(args.rounds):
            started = time.monotonic()
            subprocess.run([sys.executable, "-I", "-c", "pass"], check=True)
            floor.append(time.monotonic() - started + args.interval)
            for name, argv in variants.items():
                started = time.monotonic()
                pause = subprocess.Popen(argv + ["pause", "--duration", "10m"], env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                pause.stdout.readline()
                printed = time.monotonic()
                stopped = wait_until(lambda: all(s == "T" for s in states(pids)))
                from_start[name].append(stopped - started)
                if name == "this":
                    to_stopped.append(stopped - printed)

                subprocess.run(argv + ["resume"], env=env, check=True, capture_output=True)
                returned = time.monotonic()
                running = wait_until(lambda: all(s != "T" for s in states(pids)))
                if name == "this":
                    to_running.append(running - returned)
                pause.communicate(timeout=10)
    finally:
        stop_watcher()
        for root in roots:
            os.killpg(root, signal.SIGKILL)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def figures(values):
        return {"median": statistics.median(values), "p95": percentile(values, 0.95), "max": max(values)}

    result = {
        "rounds": args.rounds, "jobs": args.jobs, "processes": len(pids), "interval_s": args.interval,
        "command": " ".join(command[1:]),
        "start_to_all_stopped_s": {name: figures(values) for name, values in from_start.items()},
        "floor_s": figures(floor),
        "pause_to_all_stopped_s": {"median": statistics.median(to_stopped), "p95": percentile(to_stopped, 0.95),
                                   "max": max(to_stopped)},
        "resume_to_all_running_s": {"median": statistics.median(to_running), "p95": percentile(to_running, 0.95),
                                    "max": max(to_running)},
    }
    print(f"{len(pids)} job processes in {args.jobs} jobs, {args.rounds} rounds, watcher tick {args.interval}s")
    floor_p95 = result["floor_s"]["p95"]
    for name, numbers in result["start_to_all_stopped_s"].items():
        print(f"  pause (its start) -> all stopped [{name}]: median {numbers['median'] * 1000:.1f} ms, "
              f"p95 {numbers['p95'] * 1000:.1f} ms ({numbers['p95'] / floor_p95:.2f}x the floor's p95)")
    print(f"  floor (python3 -I -c pass + one tick): median {result['floor_s']['median'] * 1000:.1f} ms, "
          f"p95 {floor_p95 * 1000:.1f} ms")
    for key, label in (("pause_to_all_stopped_s", "pause (first line) -> all stopped"),
                       ("resume_to_all_running_s", "resume (returned)  -> all running")):
        numbers = result[key]
        print(f"  {label}: median {numbers['median'] * 1000:.1f} ms, p95 {numbers['p95'] * 1000:.1f} ms, "
              f"max {numbers['max'] * 1000:.1f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Benchmark: start-up of `python3 distribute.pyz --help`, warm and cold, and the pyz size.

    python3 tests/benchmarks/bench_startup.py [--rounds 7]

warm: the per-user unpack cache is in place (one start made it);
cold: HOME and XDG_CACHE_HOME point at an empty folder, so the start unpacks
the native wheels and the pure-Python code first.
Beside them, alternately in the same rounds, the floor every Python program
pays on this machine (`python3 -c pass`), and
`parallel --version` (GNU parallel, a Perl program) as the peer.
Targets (issue 8): warm <= 0.15 s, cold <= 1 s.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import machine, median, pyz_path, report  # noqa: E402


def run_timed(argv, env):
    """(wall seconds, CPU seconds of the child): CPU is what survives a loaded machine."""
    before = os.times()
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = os.times()
    return wall, (after.children_user - before.children_user) + (after.children_system - before.children_system)


def record(series, key, measured) -> None:
    series[key].append(measured[0])
    series.setdefault(key + "_cpu", []).append(measured[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pyz", default=None, help="an existing distribute.pyz (default: build one)")
    args = parser.parse_args()

    pyz = Path(args.pyz) if args.pyz else pyz_path()
    python = sys.executable
    warm_home = Path(tempfile.mkdtemp(prefix="bench-startup-warm-"))
    # as a user's shell has it: PYTHONDONTWRITEBYTECODE would make the cold start compile every module
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("XDG_CACHE_HOME", "PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    warm_env = dict(base_env, HOME=str(warm_home))
    subprocess.run([python, str(pyz), "--help"], env=warm_env, check=True, stdout=subprocess.DEVNULL)

    series = {"warm": [], "cold": [], "python_pass": [], "parallel": []}
    cold_homes = []
    try:
        for _ in range(args.rounds):
            record(series, "warm", run_timed([python, str(pyz), "--help"], warm_env))
            cold_home = Path(tempfile.mkdtemp(prefix="bench-startup-cold-"))
            cold_homes.append(cold_home)
            record(series, "cold", run_timed([python, str(pyz), "--help"], dict(base_env, HOME=str(cold_home))))
            record(series, "python_pass", run_timed([python, "-c", "pass"], base_env))
            if shutil.which("parallel"):
                record(series, "parallel", run_timed(["parallel", "--version"], base_env))
    finally:
        shutil.rmtree(warm_home, ignore_errors=True)
        for home in cold_homes:
            shutil.rmtree(home, ignore_errors=True)

    medians = {k: median(v) for k, v in series.items()}
    result = {"rounds": args.rounds, "pyz_bytes": pyz.stat().st_size, "machine": machine(),
              "median_s": medians, "all_s": series,
              "targets": {"warm_s": 0.15, "cold_s": 1.0},
              "met": {"warm": medians["warm"] <= 0.15, "cold": medians["cold"] <= 1.0}}
    print(f"pyz {pyz} : {pyz.stat().st_size / 1e6:.1f} MB; {args.rounds} rounds, medians:", file=sys.stderr)
    for key in ("warm", "cold", "python_pass", "parallel"):
        if medians.get(key) is not None:
            print(f"  {key:<12} wall {medians[key] * 1000:7.0f} ms   CPU {medians[key + '_cpu'] * 1000:7.0f} ms",
                  file=sys.stderr)
    print(f"  warm / python -c pass = {medians['warm'] / medians['python_pass']:.1f}x wall", file=sys.stderr)
    report("startup", result)


if __name__ == "__main__":
    main()

"""Benchmark: `distribute pull` beside `rsync -a` and `scp -r`, over the same sshd.

Not collected by pytest (run it by hand, as root: it creates the test users and
starts an sshd, like the test fixtures):

    python3 tests/benchmarks/bench_pull.py [--rounds 3] [--small 10000] [--big-mib 1024]

It starts an OpenSSH sshd (tests/sshd.py) for a "head" machine that the client
reaches as dalice with its own key and known_hosts, and a head (`distribute serve`,
this machine as its one node).  A batch is run through the head; then the bench
writes into that batch's archive folder
  - small/: --small files of 4 KiB in 100 folders,
  - big/:   one file of --big-mib MiB,
and, for each tree, runs alternating rounds of
  - ours:  `distribute --head head --socket S pull --batch B --filter ^small/` (the client
           as installed: the module from its .pyc), three ways: over the SSH connection an
           earlier command left (OpenSSH's ssh, ControlPersist), after closing it (so the run
           logs in, like rsync and scp), and with DISTRIBUTE_SSH=asyncssh,
  - rsync: `rsync -a -e 'ssh -F config' head:ARCHIVE/small/ DEST/`,
  - scp:   `scp -F config -r head:ARCHIVE/small DEST/`,
each into a new empty destination (checked afterwards: same file count and bytes),
after `sync`; the small trees are deleted only after all rounds (deleting 10,000 files
slows the file system for a while, which would fall on whoever runs next).
It prints each tool's median wall time, the rate and our ratio to each peer, and
one JSON line with everything.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import sshd as sshd_lib  # noqa: E402

from cluster import DISTRIBUTE, socket_answers, wait_until  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchcommon import INSTALLED, compile_module  # noqa: E402


class Head:
    """`distribute serve` with this machine as its node, socket group `distribute`."""

    def __init__(self, base: Path):
        self.state, self.archive = base / "state", base / "archive"
        self.state.mkdir(mode=0o755)
        self.log = base / "head.log"
        self.proc = subprocess.Popen(
            DISTRIBUTE + ["serve", "--state", str(self.state), "--archive", str(self.archive),
                          "--group", "distribute", "--supervisor-idle", "30"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "ab"))
        wait_until(lambda: self.proc.poll() is not None or socket_answers(self.socket), 30, "the head")
        if self.proc.poll() is not None:
            raise SystemExit(self.log.read_text())

    @property
    def socket(self):
        return self.state / "head.sock"

    def local(self, *args):
        return subprocess.run(DISTRIBUTE + ["--head", "local", "--socket", str(self.socket)] + [str(a) for a in args],
                              check=True, capture_output=True, text=True).stdout

    def run_batch(self, folder: Path) -> Path:
        folder.mkdir()
        (folder / "distribute-jobs.yaml").write_text(
            "meta: {batch_name: bench, namespace: lab}\nshell:\n  jobs:\n"
            "    - {name: seed, command: 'echo seed > distribute_save/seed.txt'}\n")
        self.local("add", folder / "distribute-jobs.yaml")

        def done():
            batches = json.loads(self.local("status", "--all", "--json"))["batches"]
            return batches and batches[0]["state"] != "active"
        wait_until(done, 120, "the seed batch")
        return self.archive / "lab" / "bench"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)


def write_trees(root: Path, small: int, big_mib: int) -> None:
    block = os.urandom(4096)
    for i in range(small):
        folder = root / "small" / f"d{i % 100:02d}"
        if i < 100:
            folder.mkdir(parents=True)
        # distinct contents, so nothing can shortcut on equal files
        (folder / f"f{i:05d}.dat").write_bytes(i.to_bytes(4, "little") + block[4:])
    (root / "big").mkdir()
    chunk = os.urandom(1 << 20)
    with open(root / "big" / "flow.bin", "wb") as out:
        for i in range(big_mib):
            out.write(i.to_bytes(4, "little") + chunk[4:])
    for top, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(top, name), 0o755)


def tree_size(folder: Path):
    count = size = 0
    for top, _, files in os.walk(folder):
        for name in files:
            count += 1
            size += os.lstat(os.path.join(top, name)).st_size
    return count, size


def timed(argv, env, dest: Path, tree: Path, expect, keep: bool, before=None):
    """Run argv into dest (new and empty); check what landed; seconds taken.  With keep, dest
    stays until the caller deletes it: removing 10,000 files leaves the file system slower
    for a while (even after sync), which would fall on whoever runs next."""
    dest.mkdir(parents=True)
    os.sync()                   # the previous run's dirty pages do not compete with this one
    if before is not None:
        before()
    start = time.perf_counter()
    result = subprocess.run(argv, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{argv[0:3]} failed ({result.returncode}): {result.stderr}")
    got = tree_size(tree)
    if got != expect:
        raise SystemExit(f"{' '.join(argv[:4])}: got {got} (files, bytes), expected {expect}")
    if not keep:
        shutil.rmtree(dest)
    return elapsed


TOOLS = ("distribute", "distribute-cold", "distribute-asyncssh", "rsync", "scp")


def tool_commands(tree: str, dest: Path, archive: Path, head, home):
    """{tool: (argv, where its files land, environment, what to do untimed before)} pulling
    archive/tree into dest.  distribute: the client as installed, over the SSH connection it
    keeps (made by an earlier command); -cold: that connection closed first, so the run pays
    a login like rsync and scp do; -asyncssh: DISTRIBUTE_SSH=asyncssh (no ssh used)."""
    ours = INSTALLED + ["--head", "head", "--socket", str(head.socket), "pull", "--batch", "lab/bench",
                        "--filter", f"^{tree}/", "--save-dir", str(dest)]
    env = home.env()
    return {
        "distribute": (ours, dest / "lab" / "bench" / tree, env, None),
        "distribute-cold": (ours, dest / "lab" / "bench" / tree, env, lambda: close_kept_connection(home)),
        "distribute-asyncssh": (ours, dest / "lab" / "bench" / tree, dict(env, DISTRIBUTE_SSH="asyncssh"), None),
        "rsync": (["rsync", "-a", "-e", f"ssh -F {home.config}", f"head:{archive / tree}/", f"{dest}/"], dest, env, None),
        "scp": (["scp", "-F", str(home.config), "-r", f"head:{archive / tree}", f"{dest}/"], dest / tree, env, None),
    }


def close_kept_connection(home) -> None:
    for control in (home.path / ".cache" / "distribute-ssh").glob("*.ctl"):
        subprocess.run(["ssh", "-o", f"ControlPath={control}", "-O", "exit", "head"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", type=int, default=10_000, help="how many 4 KiB files")
    parser.add_argument("--big-mib", type=int, default=1024, help="size of the big file")
    parser.add_argument("--dir", default=None, help="work folder (default: a new one under /var/tmp)")
    args = parser.parse_args()

    sshd_lib.ensure_users()
    sshd_lib.ensure_privsep_dir()
    compile_module()
    base = Path(tempfile.mkdtemp(prefix="bench-pull-", dir=args.dir or "/var/tmp"))
    os.chmod(base, 0o755)
    keys = sshd_lib.KeyStore(base / "keys")
    head_sshd = sshd_lib.Sshd("head", host_key=keys.get("host-head")).start()
    home = sshd_lib.SshClientHome("bench", key=keys.get("client"))
    home.add_host("head", head_sshd, "dalice")
    env = home.env()
    head = None
    try:
        head = Head(base)
        archive = head.run_batch(base / "batch")
        print(f"writing {args.small} x 4 KiB and {args.big_mib} MiB into {archive} ...", flush=True)
        write_trees(archive, args.small, args.big_mib)
        subprocess.run(INSTALLED + ["--head", "head", "--socket", str(head.socket), "status"], env=env, check=True,
                       stdout=subprocess.DEVNULL)          # the kept connection, as after any earlier command
        out = base / "out"
        results = {}
        for tree in ("small", "big"):
            expect = tree_size(archive / tree)
            keep = tree == "small"          # many files: delete them only after all rounds
            times = {name: [] for name in TOOLS}
            for round_ in range(args.rounds):
                order = list(times) if round_ % 2 == 0 else list(reversed(list(times)))
                for name in order:
                    dest = out / tree / f"{name}-{round_}"
                    argv, landed, tool_env, before = tool_commands(tree, dest, archive, head, home)[name]
                    times[name].append(timed(argv, tool_env, dest, landed, expect, keep, before))
                    print(f"  {tree:5} round {round_ + 1}: {name:10} {times[name][-1]:7.2f} s", flush=True)
            shutil.rmtree(out / tree)
            os.sync()
            medians = {name: statistics.median(values) for name, values in times.items()}
            results[tree] = {"files": expect[0], "bytes": expect[1], "times": times, "median": medians,
                             "mib_per_s": {n: expect[1] / (1 << 20) / t for n, t in medians.items()},
                             "speedup_vs_scp": medians["scp"] / medians["distribute"],
                             "speedup_vs_rsync": medians["rsync"] / medians["distribute"],
                             "cold_vs_scp": medians["scp"] / medians["distribute-cold"],
                             "cold_vs_rsync": medians["rsync"] / medians["distribute-cold"]}
        print()
        for tree, r in results.items():
            print(f"{tree}: {r['files']} files, {r['bytes'] / (1 << 20):.0f} MiB")
            for name, t in r["median"].items():
                print(f"  {name:10} median {t:7.2f} s  {r['mib_per_s'][name]:8.1f} MiB/s")
            print(f"  distribute is {r['speedup_vs_scp']:.2f}x scp -r, {r['speedup_vs_rsync']:.2f}x rsync -a "
                  f"(connection kept); {r['cold_vs_scp']:.2f}x / {r['cold_vs_rsync']:.2f}x with a new login")
        print(json.dumps({"bench": "pull", "rounds": args.rounds, "cpus": os.cpu_count(),
                          "loadavg_at_end": os.getloadavg(), "results": results}))
    finally:
        if head:
            head.stop()
        home.close()
        head_sshd.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()

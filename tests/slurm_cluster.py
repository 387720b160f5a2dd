"""A real one-machine Slurm cluster for tests: Debian's munged, slurmctld and slurmd.

Everything lives under one temporary folder (key, socket, state, spool, logs,
slurm.conf); the daemons run in the foreground as children of the test process
and are stopped by `stop()`.  Clients (sbatch, scontrol, scancel) find this
cluster through SLURM_CONF in `cluster.env`.  No accounting daemon: job states
come from `scontrol show job`.  When something cannot start, SlurmUnavailable
says exactly what and shows the daemon's last log lines.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel")
PACKAGES = "munge slurmctld slurmd slurm-client"
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED"}


class SlurmUnavailable(Exception):
    """Slurm could not be started on this machine; the message says why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class SlurmCluster:
    root: Path
    node: str
    cpus: int
    processes: Dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> Dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, argv: List[str], cwd: Optional[Path] = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=str(cwd) if cwd else None, env=self.env, capture_output=True,
                              text=True, timeout=timeout)

    def job_states(self, job_id: str) -> Dict[str, str]:
        """'<id>' or '<id>_<task>' -> JobState for one job or a whole array."""
        out = self.run(["scontrol", "-o", "show", "job", job_id])
        if out.returncode != 0:
            raise AssertionError(f"scontrol show job {job_id} failed: {out.stderr.strip()}")
        states = {}
        for line in out.stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            key = fields["JobId"] if "ArrayTaskId" not in fields else f"{fields['ArrayJobId']}_{fields['ArrayTaskId']}"
            states[key] = fields["JobState"]
        return states

    def wait_for_jobs(self, job_ids: List[str], timeout: float = 120) -> Dict[str, str]:
        """Poll scontrol until every job (and every array task) is in a final state."""
        deadline = time.monotonic() + timeout
        while True:
            states: Dict[str, str] = {}
            for job_id in job_ids:
                states.update(self.job_states(job_id))
            if states and all(state in TERMINAL_STATES for state in states.values()):
                return states
            if time.monotonic() > deadline:
                raise AssertionError(f"Slurm jobs not finished after {timeout}s: {states}\n"
                                     f"slurmctld log:\n{_tail(self.root / 'slurmctld.log')}")
            time.sleep(0.2)

    def stop(self) -> None:
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.run(["scancel", "--full", "--quiet", f"--user={os.getuid()}"], timeout=20)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)


def _slurm_conf(root: Path, node: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=distribute-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_min_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MaxArraySize=1001
MailProg=/bin/true
MpiDefault=none
ReturnToService=2
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _start(cluster: SlurmCluster, name: str, argv: List[str], log: Path) -> None:
    with open(log, "ab") as out:
        cluster.processes[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                                   stdin=subprocess.DEVNULL, env=cluster.env)


def _await(cluster: SlurmCluster, what: str, ready, logs: List[Path], timeout: float = 30) -> None:
    """Poll `ready()` until true; fail naming `what` and showing the logs if a daemon dies or time runs out."""
    deadline = time.monotonic() + timeout
    while not ready():
        dead = [n for n, p in cluster.processes.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not ready after {timeout}s"
            shown = "\n".join(f"--- {log.name}:\n{_tail(log)}" for log in logs)
            raise SlurmUnavailable(f"Slurm test cluster: {what}: {why}\n{shown}")
        time.sleep(0.1)


def start_slurm_cluster() -> SlurmCluster:
    """Start munged, slurmctld and slurmd under a fresh folder in /tmp; raises SlurmUnavailable."""
    missing = [b for b in BINARIES if not shutil.which(b) and not os.path.exists(f"/usr/sbin/{b}")]
    if missing:
        raise SlurmUnavailable(f"Slurm test cluster: {', '.join(missing)} not installed "
                               f"(apt-get install {PACKAGES})")
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm test cluster: slurmd must run as root to start jobs; "
                               f"these tests run as uid {os.geteuid()}")
    # munged insists that every folder above its socket is world-searchable.
    root = Path(tempfile.mkdtemp(prefix="distribute-slurm-", dir="/tmp"))
    root.chmod(0o755)
    for sub in ("munge", "state", "spool"):
        (root / sub).mkdir(mode=0o755)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    node = socket.gethostname().split(".")[0]
    cluster = SlurmCluster(root=root, node=node, cpus=os.cpu_count() or 1)
    cluster.conf.write_text(_slurm_conf(root, node, cluster.cpus, free_port(), free_port()))
    sbin = lambda b: shutil.which(b) or f"/usr/sbin/{b}"
    try:
        munge_log = root / "munged.log"
        _start(cluster, "munged", [sbin("munged"), "-F", f"--key-file={key}", f"--socket={root}/munge/munge.socket",
                                   f"--pid-file={root}/munge/munged.pid", f"--log-file={munge_log}",
                                   f"--seed-file={root}/munge/munged.seed"], root / "munged.out")
        _await(cluster, "munged", lambda: (root / "munge" / "munge.socket").exists(),
               [root / "munged.out", munge_log])
        _start(cluster, "slurmctld", [sbin("slurmctld"), "-D", "-f", str(cluster.conf)], root / "slurmctld.out")
        _start(cluster, "slurmd", [sbin("slurmd"), "-D", "-N", node, "-f", str(cluster.conf)], root / "slurmd.out")

        def node_idle() -> bool:
            out = cluster.run(["scontrol", "-o", "show", "node", node], timeout=10)
            return out.returncode == 0 and "State=IDLE" in out.stdout

        _await(cluster, "waiting for the node to become idle", node_idle,
               [root / "slurmctld.out", root / "slurmctld.log", root / "slurmd.out", root / "slurmd.log"])
    except BaseException:
        cluster.stop()
        raise
    return cluster

"""distribute: run batches of simulations on the workstations a lab already owns.

One head machine keeps the queue (SQLite) and the archive; it reaches every
workstation ("node") over plain SSH, copies this very file there (packed as
distribute.pyz), and hands out jobs by capability.  Users talk to the head from
their laptops, again over SSH.  This module is the whole program; read it top
to bottom, it follows the data:

   0. `pause`, before anything loads
   1. configuration and errors          9. workstation pause
   2. names, paths and durations       10. the node-side supervisor
   3. job files and nodes files        11. pulling results
   4. job files built in code          12. Matrix notifications
   5. local runs and the archive       13. the head daemon
   6. the Slurm transpiler             14. the client
   7. the head's store, scheduling     15. service, node checks, config, reports
   8. wire format and transports       16. the command line

It must parse on CPython 3.8 (node-side commands run on old workstations):
no `match`, no `X | Y` types at run time, and asyncssh is imported only where
the head or a client needs it.
"""

from __future__ import annotations

import os
import sys
import time


# ---------------------------------------------------------------------------
# 0. `pause`, before anything else loads
#
# The person at a workstation who types `pause` wants the machine back now,
# and defining the rest of this module takes longer than stopping the jobs
# should (a tenth of a second).  So when this file runs as the program and the
# command is a plain `pause`, the lock is written first, with nothing but os,
# pwd and json; then the module loads and `pause` goes on as usual, writing
# the same lock again.  This section owns the lock's file name and writing,
# the choice of the pause folder, and reading `pause`'s command line; section
# 9 owns the rest (who may write a lock, how the supervisor reads it, when it
# goes stale).
# ---------------------------------------------------------------------------

DEFAULT_PAUSE_DIR = "/var/tmp/distribute"
MAX_PAUSE_SECONDS = 4 * 3600
PAUSE_DEFAULT_DURATION = "1h"
PAUSE_LOCK_PREFIX = "pause-"
PAUSE_LOCK_SUFFIX = ".json"
# Beside the distribute.pyz a head installed (<workdir>/bin/), the node's pause folder as the
# nodes file sets it, so that `pause` run from that pyz locks where the supervisor watches.
PAUSE_DIR_NOTE = "pause-dir"
_LOCK_NAME_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
_DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}


def duration_seconds(text: str) -> Optional[int]:
    """'1h30m10s', '90m', '4h', '60s' -> seconds; None for anything else (parse_duration says why)."""
    total, digits, units = 0, "", "hms"
    for char in text.strip().lower():
        if "0" <= char <= "9":
            digits += char
        elif char in units and 0 < len(digits) <= 9:
            total += int(digits) * _DURATION_UNITS[char]
            digits, units = "", units[units.index(char) + 1:]
        else:
            return None
    return None if digits or units == "hms" else total


def pause_request(args: List[str]) -> Optional[Tuple[str, bool]]:
    """(duration, detach) of `pause` with its plain options; None for anything else
    (--help, a typo, global options), which goes through click with its help and errors."""
    if args[:1] != ["pause"]:
        return None
    rest, duration, detach, index = args[1:], PAUSE_DEFAULT_DURATION, False, 0
    while index < len(rest):
        arg = rest[index]
        if arg == "--detach":
            detach = True
        elif arg == "--duration" and index + 1 < len(rest) and not rest[index + 1].startswith("-"):
            duration, index = rest[index + 1], index + 1
        elif arg.startswith("--duration=") and len(arg) > len("--duration="):
            duration = arg.partition("=")[2]
        else:
            return None
        index += 1
    return duration, detach


def running_pyz() -> Optional[str]:
    """The distribute.pyz this process runs from, if any.  Its bootstrap imports this module
    from an unpacked copy in ~/.cache, so __file__ does not lead to it; the bootstrap knows."""
    archive = getattr(sys.modules.get("_distribute_boot"), "ARCHIVE", None)
    if archive and os.path.isfile(archive):
        return archive
    container = os.path.dirname(os.path.abspath(__file__))
    return container if os.path.isfile(container) else None


def noted_pause_dir() -> Optional[str]:
    """The pause folder noted beside the running distribute.pyz, if any (and sound)."""
    pyz = running_pyz()
    if not pyz:
        return None
    try:
        with open(os.path.join(os.path.dirname(pyz), PAUSE_DIR_NOTE), encoding="utf-8") as note:
            text = note.read().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text if text.startswith("/") and "\n" not in text else None


def configured_pause_folder() -> str:
    """Where `pause` locks: $DISTRIBUTE_PAUSE_DIR, else the folder the head noted beside
    the running pyz, else /var/tmp/distribute."""
    return os.environ.get("DISTRIBUTE_PAUSE_DIR") or noted_pause_dir() or DEFAULT_PAUSE_DIR


def pause_folder_problem(folder: str, info: os.stat_result) -> Optional[str]:
    """Why a lock folder is unsafe (another user could swap or empty it behind our back), if it is."""
    import stat
    if stat.S_ISLNK(info.st_mode):
        return f"pause folder {folder} is a symlink; point DISTRIBUTE_PAUSE_DIR at a real folder"
    if not stat.S_ISDIR(info.st_mode):
        return f"pause folder {folder} is not a folder"
    if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
        return f"pause folder {folder} is world-writable without the sticky bit (fix: chmod 1777 {folder})"
    return None


def current_user() -> str:
    return _user_of_uid(os.geteuid())


def _user_of_uid(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid{uid}"


def process_start_time(pid: int) -> Optional[float]:
    """When pid started (epoch seconds), or None when it cannot be seen.  From /proc where
    there is one (as psutil computes it, without importing psutil: `pause` starts faster)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            data = stat_file.read()
        with open("/proc/uptime", "rb") as uptime_file:     # not /proc/stat's btime: slow to read
            boot = int(time.time() - float(uptime_file.read().split()[0]))   # whole seconds, as btime
        return boot + int(data[data.rindex(b")") + 2:].split()[19]) / os.sysconf("SC_CLK_TCK")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, IndexError):
        pass
    import psutil
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def pause_lock_name(user: str) -> str:
    safe = "".join(char if char in _LOCK_NAME_CHARS else "_" for char in user)
    return f"{PAUSE_LOCK_PREFIX}{safe}{PAUSE_LOCK_SUFFIX}"


def flat_json(record: Dict[str, Any]) -> str:
    """A flat record (str, int, float, bool, None values) as JSON, without importing json
    (a few milliseconds `pause` would wait for, on a machine whose cores its jobs fill)."""
    def value(v: Any) -> str:
        if v is None or isinstance(v, bool):
            return {None: "null", True: "true", False: "false"}[v]
        if isinstance(v, (int, float)) and v == v and v not in (float("inf"), float("-inf")):
            return repr(v)
        if isinstance(v, str):
            return '"' + "".join(c if c not in '"\\' and c >= " " else f"\\u{ord(c):04x}" for c in v) + '"'
        raise ValueError(f"{v!r} has no place in a flat record")
    return "{" + ", ".join(f"{value(str(k))}: {value(v)}" for k, v in record.items()) + "}"


def write_lock_file(folder: str, name: str, lock: Dict[str, Any]) -> None:
    """Write a lock atomically (a new file beside it, then a rename over it), mode 0644.
    OSError as it comes: filename2 is set when the rename was refused."""
    data = flat_json(lock).encode()
    for attempt in range(100):
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{time.monotonic_ns()}.{attempt}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            break
        except FileExistsError:
            continue
    else:
        raise FileExistsError(f"no free temporary name in {folder}")
    try:
        try:
            os.fchmod(fd, 0o644)
            os.write(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(folder, name))
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def lock_before_loading(argv: List[str]) -> None:
    """A plain `pause`'s lock, written before the rest of this module loads (see above).
    Anything unusual is left to the command itself, which reports it in its own words."""
    request = pause_request(argv)
    seconds = duration_seconds(request[0]) if request else None
    if not seconds or seconds > MAX_PAUSE_SECONDS:
        return
    folder, pid, now = configured_pause_folder(), os.getpid(), time.time()
    try:
        if pause_folder_problem(folder, os.lstat(folder)):
            return
        user = current_user()
        write_lock_file(folder, pause_lock_name(user), {
            "user": user, "until": now + seconds, "pid": pid, "detached": request[1], "since": now,
            "pid_started": process_start_time(pid), "reason": ""})
    except (OSError, ValueError):
        return


if sys.argv[1:2] == ["pause"] and (__name__ == "__main__" or running_pyz()):
    lock_before_loading(sys.argv[1:])

import contextlib  # noqa: E402  (the rest loads after a `pause`'s lock is written)
import dataclasses  # noqa: E402
import errno  # noqa: E402
import io  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import stat  # noqa: E402
from dataclasses import field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

try:                        # inside distribute.pyz: put the bundled native wheels on sys.path
    import _distribute_boot
    _distribute_boot.setup()
except ImportError:
    pass

import click


class LazyModule:
    """A standard module imported on first use, so each command loads only what it touches
    (`python3 -X importtime distribute.pyz --help` shows what a start costs)."""

    def __init__(self, name: str):
        self.__name = name

    def __getattr__(self, attr: str):
        module = __import__(self.__name)
        globals()[self.__name] = module         # later uses skip this proxy
        return getattr(module, attr)


datetime = LazyModule("datetime")
hashlib = LazyModule("hashlib")
json = LazyModule("json")
shlex = LazyModule("shlex")
shutil = LazyModule("shutil")
signal = LazyModule("signal")
socket = LazyModule("socket")
subprocess = LazyModule("subprocess")
tarfile = LazyModule("tarfile")
tempfile = LazyModule("tempfile")

_UNMADE_RECORDS: set = set()
_RECORDS_LOCK = __import__("_thread").allocate_lock()


def record(cls):
    """A dataclass, made when its class is first used (an instance, or record_fields) rather
    than when this module loads: making all forty of them took a fifth of every command's
    start, and a command uses a handful."""
    def first_init(self, *args, **kwargs):
        make_record(cls)
        cls.__init__(self, *args, **kwargs)
    cls.__init__ = first_init
    _UNMADE_RECORDS.add(cls)
    return cls


def make_record(cls) -> None:
    with _RECORDS_LOCK:
        if cls in _UNMADE_RECORDS:
            del cls.__init__
            dataclasses.dataclass(cls)
            _UNMADE_RECORDS.discard(cls)


def record_fields(cls) -> Tuple[dataclasses.Field, ...]:
    make_record(cls)
    return dataclasses.fields(cls)


__version__ = "0.1.0"


# ---------------------------------------------------------------------------
# 1. Configuration and errors
#
# Two kinds of failure reach the user: bad input (exit 2) and an operation that
# could not be done (exit 1).  Both print one line; only bugs print tracebacks.
# ---------------------------------------------------------------------------

EXIT_FAILED = 1
EXIT_USAGE = 2

JOBS_FILE = "distribute-jobs.yaml"
NODES_FILE = "distribute-nodes.yaml"
DEFAULT_NODE_WORKDIR = "/var/tmp/distribute-work"   # not the pause folder, which is world-writable


class UserError(Exception):
    """Bad input: a file, a name or an option the user can fix.  Exit code 2."""


class Failed(Exception):
    """The input was fine but the operation could not be done.  Exit code 1."""


def one_line(text: str) -> str:
    """Messages for people are one line, whatever a file name or value held."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def log(message: str) -> None:
    """One timestamped line on stderr: the head's and the supervisor's log (never secrets).
    A log on a full disk loses the line, never the process that wrote it."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"{now_iso()} {message}\n")
        sys.stderr.flush()


def import_asyncssh():
    """asyncssh, for the head and clients only (nodes may run older Pythons without it)."""
    try:
        import asyncssh
    except ImportError:
        raise Failed(f"this command needs CPython 3.10 or newer with asyncssh (this is "
                     f"{sys.version.split()[0]}); node commands (node, pause, resume) work here") from None
    return asyncssh


# ---------------------------------------------------------------------------
# 2. Names, paths and durations
#
# Everything that becomes a file name or a folder on some machine passes
# through here first, so nothing can climb out of the folder it belongs to.
# ---------------------------------------------------------------------------

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
CAPABILITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
RESERVED_JOB_NAMES = ("build",)         # the archive's <batch>/build/ holds the build logs


def name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a namespace, batch or job name (None when it can)."""
    if NAME_RE.match(name):
        return None
    return (f"{name!r} is not a valid name: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters")


def alias_problem(alias: str) -> Optional[str]:
    """Why `alias` cannot be a plain file name inside input/ (None when it can)."""
    if alias in ("", ".", ".."):
        return f"{alias!r} is not a file name"
    if "/" in alias or "\\" in alias:
        return f"{alias!r} must be a plain file name, without '/'"
    if any(ord(c) < 32 or 0xD800 <= ord(c) <= 0xDFFF for c in alias) \
            or len(alias.encode("utf-8", "replace")) > 255:
        return f"{alias!r} is not a usable file name"
    return None


def reserved_job_name_problem(name: str) -> Optional[str]:
    """Why `name` cannot be a job's name although it is a valid name (None when it can)."""
    if name in RESERVED_JOB_NAMES:
        return (f"job name {name!r} is reserved: the archive keeps the build logs in <batch>/{name}/; "
                "rename the job")
    return None


def inside(root: Path, *parts: str) -> Path:
    """root/parts, refusing anything that would land outside root."""
    path = root.joinpath(*parts)
    resolved_root = os.path.abspath(root)
    resolved = os.path.abspath(path)
    if resolved != resolved_root and not resolved.startswith(resolved_root + os.sep):
        raise UserError(f"path {'/'.join(parts)!r} escapes {root}")
    return path




def parse_duration(text: str, maximum: Optional[float] = None) -> int:
    """'1h30m10s', '90m', '4h', '60s' -> seconds.  Zero, garbage or too long: UserError."""
    total = duration_seconds(text) if text else None
    if total is None:
        raise UserError(f"duration {text!r} is not like 4h, 90m, 1h30m or 60s")
    if total <= 0:
        raise UserError(f"duration {text!r} must be longer than zero")
    if maximum is not None and total > maximum:
        raise UserError(f"duration {text!r} is longer than the maximum of {format_duration(maximum)}")
    return total


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs or not seconds else ""]
    return "".join(parts)


def now_iso(timestamp: Optional[float] = None) -> str:
    moment = datetime.datetime.fromtimestamp(time.time() if timestamp is None else timestamp,
                                             datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds")


def human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


# ---------------------------------------------------------------------------
# 3. Job files and nodes files
#
# YAML comes in as a node tree (so every value keeps its line), is checked
# field by field, and leaves as dataclasses.  Every mistake is reported as
# "file:line: key: what is wrong" and stops before anything is sent anywhere.
# ---------------------------------------------------------------------------

FLAVOURS = ("python", "apptainer", "shell", "docker", "podman")
CONTAINER_ENGINES = ("docker", "podman")     # flavours named after the engine that runs them
SLURM_KEYS = ("job_name", "output", "nodes", "ntasks", "cpus_per_task", "mem_per_cpu", "hint",
              "time", "partition", "account", "mail_user", "mail_type")


@record
class FileSpec:
    """A file on the submitting machine and the name it gets on the node."""
    path: str
    alias: str


@record
class SlurmOptions:
    job_name: Optional[str] = None
    output: Optional[str] = None
    nodes: Optional[int] = None
    ntasks: Optional[int] = None
    cpus_per_task: Optional[int] = None
    mem_per_cpu: Optional[str] = None
    hint: Optional[str] = None
    time: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    mail_user: Optional[str] = None
    mail_type: Optional[str] = None
    mem: Optional[str] = None                # from resources.memory (not a job-file key)
    gres: Optional[str] = None               # from resources.gpus (not a job-file key)


@record
class Resources:
    """What a job asks of a node (SPEC §3 `resources:`); None: not asked."""
    cpus: Optional[int] = None
    memory: Optional[int] = None             # bytes
    gpus: Optional[int] = None
    time: Optional[int] = None               # seconds of wall-clock, paused time excluded

    def merged(self, over: Optional["Resources"]) -> "Resources":
        """These defaults with `over`'s own values on top."""
        if over is None:
            return Resources(self.cpus, self.memory, self.gpus, self.time)
        return Resources(*(o if o is not None else d for d, o in
                           zip(dataclasses.astuple(self), dataclasses.astuple(over))))

    def given(self) -> bool:
        return any(value is not None for value in dataclasses.astuple(self))


@record
class Meta:
    batch_name: str
    namespace: str
    capabilities: List[str] = field(default_factory=list)
    matrix: Optional[str] = None
    resources: Optional[Resources] = None    # the batch's default for its jobs
    after: List[str] = field(default_factory=list)   # namespace/batch that must be done first
    after_failed: str = "wait"               # or "start": what a failed dependency means


@record
class Job:
    name: str
    required_files: List[FileSpec] = field(default_factory=list)
    file: Optional[FileSpec] = None          # python flavour: becomes job.py
    command: Optional[str] = None            # shell flavour
    retries: int = 0
    slurm: Optional[SlurmOptions] = None
    params: Optional[Dict[str, Any]] = None  # sweep parameters, kept in job.json
    resources: Optional[Resources] = None    # the job's own, meta.resources merged in


@record
class JobFile:
    """A whole batch as written in distribute-jobs.yaml."""
    path: str
    meta: Meta
    flavour: str
    jobs: List[Job]
    build: Optional[FileSpec] = None         # python: build.py; apptainer: the .sif
    build_command: Optional[str] = None      # shell flavour
    initial_files: List[FileSpec] = field(default_factory=list)
    mounts: List[str] = field(default_factory=list)   # apptainer required_mounts
    slurm: Optional[SlurmOptions] = None
    image: Optional[str] = None              # docker/podman: the image to run (build: its archive, if any)

    def shared_files(self) -> List[FileSpec]:
        """Files every job of the batch needs: sent to a node once."""
        return ([self.build] if self.build else []) + list(self.initial_files)

    def all_files(self) -> List[FileSpec]:
        files = self.shared_files()
        for job in self.jobs:
            files += ([job.file] if job.file else []) + job.required_files
        return files


@record
class NodeSpec:
    """One workstation of distribute-nodes.yaml."""
    name: str
    host: str
    user: Optional[str] = None
    port: Optional[int] = None
    capabilities: List[str] = field(default_factory=list)
    slots: int = 1
    workdir: str = DEFAULT_NODE_WORKDIR
    python: str = "python3"
    pause_dir: Optional[str] = None          # where `distribute pause` locks live there
    ignored: List[str] = field(default_factory=list)    # the original's port keys, accepted and unused
    owner: Optional["OwnerPolicy"] = None     # when the workstation's people come first (issue 14)
    slots_given: bool = field(default=False, compare=False)   # `slots` written: caps jobs with resources too
    cpus: Optional[int] = None               # overrides of the probed capacity
    memory: Optional[int] = None
    gpus: Optional[int] = None
    reserve: Optional[Resources] = None      # kept back for the workstation's owner

    @property
    def is_local(self) -> bool:
        return self.host == "local"


# The `owner:` block of a node: when the supervisor pauses by itself for the people
# at the workstation.  All of it optional; without the block nothing is automatic.
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


@record
class DeskHours:
    """Fewer slots on these weekdays (0 = Monday) between start and end (minutes after midnight)."""
    days: List[int]
    start: int
    end: int
    slots: int


@record
class OwnerPolicy:
    busy_cpu: Optional[float] = None      # percent of one core used by the owners' processes ...
    busy_for: float = 10.0                # ... for this long: pause
    console_idle: Optional[float] = None  # a terminal of theirs with input this recently: pause
    console_ssh: bool = False             # and a terminal opened through sshd counts too
    quiet: float = 60.0                   # resume after this long without either
    users: Optional[List[str]] = None     # whose activity counts (None: every uid >= 1000 but ours)
    desk_hours: List[DeskHours] = field(default_factory=list)
    vacate_after: Optional[float] = None  # a job paused this long is stopped and run elsewhere
    vacate_gpu_at_once: bool = False      # a job holding a GPU is, at once

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "OwnerPolicy":
        """From the wire (the head's hello); unknown keys are ignored."""
        known = {f.name for f in record_fields(cls)}
        policy = cls(**{k: v for k, v in data.items() if k in known})
        policy.desk_hours = [DeskHours(**d) for d in data.get("desk_hours") or []]
        return policy


def _owner_duration(y: "_Y") -> float:
    text = y.text()
    try:
        return float(parse_duration(text))
    except UserError as exc:
        raise y.fail(str(exc)) from None


def _owner_days(y: "_Y") -> List[int]:
    """'mon-fri', 'sat,sun' or a list of day names."""
    parts = [p.text() for p in y.sequence()] if y.kind == "a list" else y.text().split(",")
    days: List[int] = []
    for part in (p.strip().lower() for p in parts):
        first, _, last = part.partition("-")
        if first[:3] not in _DAYS or (last and last[:3] not in _DAYS):
            raise y.fail(f"{part!r} is not a day or a range of days like mon-fri")
        a, b = _DAYS.index(first[:3]), _DAYS.index((last or first)[:3])
        days += [(a + i) % 7 for i in range((b - a) % 7 + 1)]
    return sorted(set(days))


def _owner_hours(y: "_Y") -> Tuple[int, int]:
    """'09:00-18:00' or '9-18' -> minutes after midnight (end may be 24:00)."""
    match = re.match(r"\s*(\d{1,2})(?::(\d\d))?\s*-\s*(\d{1,2})(?::(\d\d))?\s*\Z", y.text())
    if not match:
        raise y.fail(f"{y.text()!r} is not an hour range like 09:00-18:00")
    start = int(match.group(1)) * 60 + int(match.group(2) or 0)
    end = int(match.group(3)) * 60 + int(match.group(4) or 0)
    if not 0 <= start < end <= 24 * 60:
        raise y.fail(f"{y.text()!r}: the range must lie within 00:00-24:00 and end after it starts")
    return start, end


def _owner_policy(y: "_Y") -> OwnerPolicy:
    keys = y.mapping(("busy", "console", "quiet", "users", "desk_hours", "vacate"))
    policy = OwnerPolicy()
    if "busy" in keys:
        busy = keys["busy"].mapping(("cpu", "for"), required=("cpu",))
        cpu = busy["cpu"].text().strip().rstrip("%")
        try:
            policy.busy_cpu = float(cpu)
        except ValueError:
            raise busy["cpu"].fail(f"{cpu!r} is not a percentage like 50%") from None
        if not 0 < policy.busy_cpu < 10000:
            raise busy["cpu"].fail("must be a percentage of one core above 0 (200% is two cores)")
        if "for" in busy:
            policy.busy_for = _owner_duration(busy["for"])
    if "console" in keys:
        console = keys["console"].mapping(("idle", "ssh"))
        policy.console_idle = _owner_duration(console["idle"]) if "idle" in console else 300.0
        if "ssh" in console:
            if not console["ssh"].node.tag.endswith(":bool"):
                raise console["ssh"].fail(f"expected true or false, found {console['ssh'].kind}")
            policy.console_ssh = console["ssh"].node.value.lower() in ("true", "yes", "on", "y")
    if "quiet" in keys:
        policy.quiet = _owner_duration(keys["quiet"])
    if "users" in keys:
        policy.users = [item.text() for item in keys["users"].sequence()]
        for item, user in zip(keys["users"].sequence(), policy.users):
            if not re.match(r"[A-Za-z_][A-Za-z0-9_.-]*\$?\Z", user):
                raise item.fail(f"{user!r} is not a user name")
    for item in keys["desk_hours"].sequence() if "desk_hours" in keys else []:
        desk = item.mapping(("days", "hours", "slots"), required=("hours", "slots"))
        start, end = _owner_hours(desk["hours"])
        days = _owner_days(desk["days"]) if "days" in desk else list(range(7))
        policy.desk_hours.append(DeskHours(days, start, end, desk["slots"].integer(minimum=0)))
    if "vacate" in keys:
        vacate = keys["vacate"].mapping(("after", "gpu_at_once"))
        if "after" in vacate:
            policy.vacate_after = _owner_duration(vacate["after"])
        if "gpu_at_once" in vacate:
            if not vacate["gpu_at_once"].node.tag.endswith(":bool"):
                raise vacate["gpu_at_once"].fail(f"expected true or false, found {vacate['gpu_at_once'].kind}")
            policy.vacate_gpu_at_once = vacate["gpu_at_once"].node.value.lower() in ("true", "yes", "on", "y")
    return policy


class _Y:
    """A YAML node with the file and key path that lead to it, so errors can say where."""

    def __init__(self, node: Any, file: str, path: str):
        self.node, self.file, self.path = node, file, path

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, message: str) -> UserError:
        where = f"{self.path}: " if self.path else ""
        return UserError(one_line(f"{self.file}:{self.line}: {where}{message}"))

    @property
    def kind(self) -> str:
        tag = getattr(self.node, "tag", "")
        if tag.endswith(":map"):
            return "a mapping"
        if tag.endswith(":seq"):
            return "a list"
        if tag.endswith(":null"):
            return "empty (null)"
        if tag.endswith(":bool"):
            return "true/false"
        if tag.endswith(":int") or tag.endswith(":float"):
            return "a number"
        return "text"

    def is_null(self) -> bool:
        return self.node.tag.endswith(":null")

    def mapping(self, allowed: Iterable[str], required: Iterable[str] = ()) -> Dict[str, "_Y"]:
        import yaml
        if not isinstance(self.node, yaml.MappingNode):
            raise self.fail(f"expected a mapping with keys {', '.join(allowed)}, found {self.kind}")
        allowed = tuple(allowed)
        out: Dict[str, _Y] = {}
        for key_node, value_node in self.node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            child_path = f"{self.path}.{key}" if self.path else str(key)
            if key not in allowed:
                raise _Y(key_node, self.file, child_path).fail(
                    f"unknown key (expected one of: {', '.join(allowed)})")
            if key in out:
                raise _Y(key_node, self.file, child_path).fail("key given twice")
            out[key] = _Y(value_node, self.file, child_path)
        for key in required:
            if key not in out or out[key].is_null():
                raise self.fail(f"missing required key {key!r}")
        return out

    def sequence(self, allow_null: bool = False) -> List["_Y"]:
        import yaml
        if allow_null and self.is_null():
            return []
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.fail(f"expected a list, found {self.kind}")
        return [_Y(child, self.file, f"{self.path}[{i}]") for i, child in enumerate(self.node.value)]

    def text(self) -> str:
        import yaml
        tag = self.node.tag
        if not isinstance(self.node, yaml.ScalarNode) or not (tag.endswith(":str") or tag.endswith(":int")):
            raise self.fail(f"expected text, found {self.kind}")
        return self.node.value

    def optional_text(self) -> Optional[str]:
        return None if self.is_null() else self.text()

    def integer(self, minimum: int = 0) -> int:
        import yaml
        if not self.node.tag.endswith(":int") or not isinstance(self.node, yaml.ScalarNode):
            raise self.fail(f"expected a whole number, found {self.kind}")
        try:    # YAML 1.1 ints: 0x1f, 0o17, 017, 1_000, 1:30 (base 60)
            value = yaml.constructor.SafeConstructor().construct_yaml_int(self.node)
        except (ValueError, TypeError, yaml.YAMLError):
            raise self.fail(f"{self.node.value!r} is not a usable whole number") from None
        if value < minimum:
            raise self.fail(f"must be at least {minimum}")
        return value

    def name(self) -> str:
        value = self.text()
        problem = name_problem(value)
        if problem:
            raise self.fail(problem)
        return value

    def plain(self) -> Any:
        """The value as ordinary Python data (for free-form sections such as params)."""
        import yaml
        try:    # dates and the like become text: the value must fit in job.json
            value = yaml.constructor.SafeConstructor().construct_document(self.node)
            return json.loads(json.dumps(value, default=str))
        except (yaml.YAMLError, ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            raise self.fail(f"cannot be read as plain data: {problem}") from None


def yaml_tab_problem(text: str, mark) -> Optional[str]:
    """A YAML error caused by a tab in the indentation, said so (PyYAML only says
    "found character that cannot start any token"): "LINE: tab character: ..." to put
    after the file's name."""
    lines = text.splitlines()
    if mark is None or mark.line >= len(lines):
        return None
    line = lines[mark.line]
    if "\t" not in line[:mark.column + 1]:
        return None
    return (f"{mark.line + 1}: tab character: YAML indents with spaces; replace the tab at column "
            f"{line.index(chr(9)) + 1} with spaces")


def read_yaml(path: str) -> _Y:
    """Parse a YAML file into a located node tree; every failure is a one-line UserError."""
    import yaml
    if os.path.isdir(path):
        raise UserError(f"{path}: is a directory, expected a YAML file")
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[:exc.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {raw[exc.start]:#04x})") from None
    if not text.strip() or all(not l.strip() or l.lstrip().startswith("#") for l in text.splitlines()):
        raise UserError(f"{path}: the file is empty")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        node = yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}" if mark else path
        tab = yaml_tab_problem(text, mark)
        if tab:
            raise UserError(f"{path}:{tab}") from None
        raise UserError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{path}: YAML error: {first}") from None
    except RecursionError:
        raise UserError(f"{path}: YAML error: nested too deeply") from None
    if node is None:
        raise UserError(f"{path}: the file is empty")
    return _Y(node, path, "")


def _file_spec(y: _Y, base: Path, default_alias: Optional[str] = None) -> FileSpec:
    """`path` or `{path, alias}` -> FileSpec with an absolute path that exists."""
    import yaml
    if isinstance(y.node, yaml.MappingNode):
        keys = y.mapping(("path", "alias"), required=("path",))
        path_y = keys["path"]
        rel = path_y.text()
        alias_y = keys.get("alias")
        alias = alias_y.optional_text() if alias_y else None
    else:
        path_y, rel, alias_y, alias = y, y.text(), None, None
    full = (base / rel) if not os.path.isabs(rel) else Path(rel)
    try:
        if "\0" in rel:
            raise ValueError("NUL byte")
        exists, regular = full.exists(), full.is_file()
    except (OSError, ValueError):   # too long, NUL byte, not encodable...
        raise path_y.fail(f"{rel!r} is not a usable path") from None
    if not exists:
        raise path_y.fail(f"file {rel!r} does not exist (looked at {full})")
    if not regular:
        raise path_y.fail(f"{rel!r} is not a regular file")
    alias = alias or default_alias or full.name
    problem = alias_problem(alias)
    if problem:
        raise (alias_y or y).fail(problem)
    return FileSpec(str(full), alias)


def _file_list(y: Optional[_Y], base: Path) -> List[FileSpec]:
    if y is None:
        return []
    files = [_file_spec(item, base) for item in y.sequence(allow_null=True)]
    seen: Dict[str, str] = {}
    for item, spec in zip(y.sequence(allow_null=True), files):
        if spec.alias in seen:
            raise item.fail(f"two files would both be called {spec.alias!r} in input/ "
                            f"({seen[spec.alias]} and {spec.path}); give one an alias")
        seen[spec.alias] = spec.path
    return files


def _slurm_options(y: Optional[_Y]) -> Optional[SlurmOptions]:
    if y is None or y.is_null():
        return None
    keys = y.mapping(SLURM_KEYS)
    values: Dict[str, Any] = {}
    for key, value in keys.items():
        if value.is_null():
            continue
        values[key] = value.integer(minimum=1) if key in ("nodes", "ntasks", "cpus_per_task") else value.text()
    return SlurmOptions(**values)


def _capabilities(y: Optional[_Y]) -> List[str]:
    if y is None:
        return []
    caps = []
    for item in y.sequence(allow_null=True):
        cap = item.text()
        if not CAPABILITY_RE.match(cap):
            raise item.fail(f"{cap!r} is not a capability name (letters, digits, '.', '_', '+', '-')")
        caps.append(cap)
    return caps


_SIZE_RE = re.compile(r"([0-9]{1,15})(?:\.([0-9]{1,9}))?\s*([KMGT]?)(i?B)?\Z", re.I)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'16G', '512M', '1.5T', '2GiB', '1048576' -> bytes (binary units, as Slurm's).  Garbage: UserError."""
    match = _SIZE_RE.match(str(text).strip())
    if not match:
        raise UserError(f"size {text!r} is not like 16G, 512M or 1.5T")
    whole, fraction, unit, _ = match.groups()
    return int((int(whole) + float("0." + (fraction or "0"))) * _SIZE_UNITS[unit.upper()])


def format_size(size: float) -> str:
    """Bytes as the shortest of 17.2G, 512M, 3K (what `memory:` accepts, one decimal at most)."""
    for unit in ("T", "G", "M", "K"):
        scale = _SIZE_UNITS[unit]
        if size >= scale:
            value = size / scale
            return f"{value:.0f}{unit}" if abs(value - round(value)) < 0.05 else f"{value:.1f}{unit}"
    return f"{int(size)}"


def _resources(y: Optional[_Y], least_cpus: int = 1) -> Optional[Resources]:
    """`resources: {cpus, memory, gpus, time}` (each optional)."""
    if y is None or y.is_null():
        return None
    keys = y.mapping(("cpus", "memory", "gpus", "time"))
    out = Resources()
    if "cpus" in keys and not keys["cpus"].is_null():
        out.cpus = keys["cpus"].integer(minimum=least_cpus)
    if "gpus" in keys and not keys["gpus"].is_null():
        out.gpus = keys["gpus"].integer(minimum=0)
    for key in ("cpus", "gpus"):
        if getattr(out, key) is not None and getattr(out, key) > 1 << 20:
            raise keys[key].fail("is more than any machine has")
    if "memory" in keys and not keys["memory"].is_null():
        try:
            out.memory = parse_size(keys["memory"].text())
        except UserError as exc:
            raise keys["memory"].fail(str(exc)) from None
        if out.memory <= 0 and least_cpus:
            raise keys["memory"].fail("must be more than zero")
    if "time" in keys and not keys["time"].is_null():
        try:
            out.time = parse_duration(keys["time"].text())
        except UserError as exc:
            raise keys["time"].fail(str(exc)) from None
    return out


def _after(y: Optional[_Y], namespace: str) -> List[str]:
    """`after: [namespace/batch, batch, …]` -> ['namespace/batch', …] (a bare name: this namespace)."""
    if y is None:
        return []
    out: List[str] = []
    for item in y.sequence(allow_null=True):
        ref = item.text()
        parts = ref.split("/")
        if len(parts) == 1:
            parts = [namespace] + parts
        if len(parts) != 2 or any(name_problem(p) for p in parts):
            raise item.fail(f"{ref!r} is not a batch: write namespace/batch or batch")
        key = "/".join(parts)
        if key not in out:
            out.append(key)
    return out


def _meta(y: _Y) -> Meta:
    keys = y.mapping(("batch_name", "namespace", "capabilities", "matrix", "resources", "after",
                      "after_failed"),
                     required=("batch_name", "namespace"))
    matrix = keys["matrix"].optional_text() if "matrix" in keys else None
    if matrix is not None and not re.match(r"@[^:\s]+:[^\s]+\Z", matrix):
        raise keys["matrix"].fail(f"{matrix!r} is not a Matrix user id like @alice:example.org")
    meta = Meta(batch_name=keys["batch_name"].name(), namespace=keys["namespace"].name(),
                capabilities=_capabilities(keys.get("capabilities")), matrix=matrix,
                resources=_resources(keys.get("resources")))
    meta.after = _after(keys.get("after"), meta.namespace)
    if f"{meta.namespace}/{meta.batch_name}" in meta.after:
        raise keys["after"].fail("a batch cannot wait for itself")
    if "after_failed" in keys:
        meta.after_failed = keys["after_failed"].text()
        if meta.after_failed not in ("wait", "start"):
            raise keys["after_failed"].fail(f"{meta.after_failed!r} is not 'wait' or 'start'")
    return meta


_INIT_KEYS = {"python": ("build_file", "required_files"),
              "apptainer": ("sif", "required_files", "required_mounts"),
              "shell": ("build", "required_files"),
              "docker": ("image", "required_files", "required_mounts"),
              "podman": ("image", "required_files", "required_mounts")}
_JOB_KEYS = {"python": ("name", "file", "required_files", "retries", "slurm", "params", "resources"),
             "apptainer": ("name", "required_files", "retries", "slurm", "params", "resources"),
             "shell": ("name", "command", "required_files", "retries", "slurm", "params", "resources"),
             "docker": ("name", "required_files", "retries", "slurm", "params", "resources"),
             "podman": ("name", "required_files", "retries", "slurm", "params", "resources")}


def _job(y: _Y, flavour: str, base: Path, defaults: Optional[Resources] = None) -> Job:
    required = ("name", "file") if flavour == "python" else ("name", "command") if flavour == "shell" else ("name",)
    keys = y.mapping(_JOB_KEYS[flavour], required=required)
    job = Job(name=keys["name"].name(), required_files=_file_list(keys.get("required_files"), base))
    if flavour == "python":
        job.file = _file_spec(keys["file"], base, default_alias="job.py")
        job.file.alias = "job.py"
    if flavour == "shell":
        job.command = keys["command"].text()
    if "retries" in keys:
        job.retries = keys["retries"].integer(minimum=0)
    job.slurm = _slurm_options(keys.get("slurm"))
    own = _resources(keys.get("resources"))
    if own is not None or defaults is not None:
        job.resources = (defaults or Resources()).merged(own)
    if "params" in keys and not keys["params"].is_null():
        params_y = keys["params"]
        if params_y.kind != "a mapping":
            raise params_y.fail(f"expected a mapping of parameter names to values, found {params_y.kind}")
        params_y.mapping(tuple(str(k.value) for k, _ in params_y.node.value))     # duplicate names
        job.params = params_y.plain()
    return job


def _mount(y: _Y) -> str:
    mount = y.text()
    if not mount.startswith("/") or ":" in mount or "," in mount or ".." in mount.split("/"):
        raise y.fail(f"{mount!r} must be an absolute container path without ':', ',' or '..'")
    return mount


# docker/podman images: a registry reference, or an image archive (`docker save`, also
# gzipped) that travels with the batch and is `load`ed on each node.  The reference
# an archive loads as comes from its manifest.json, read here on the submitting machine.
IMAGE_REF_RE = re.compile(r"[a-z0-9][a-z0-9._-]*(?::[0-9]{1,5})?(?:/[a-z0-9][a-z0-9._-]*)*"
                          r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?\Z")
IMAGE_ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")


def image_problem(image: str) -> Optional[str]:
    """Why `image` cannot be given to `docker run` (None when it is a reference or an image id)."""
    if IMAGE_REF_RE.match(image) or re.match(r"sha256:[0-9a-f]{64}\Z", image):
        return None
    return f"{one_line(repr(image))[:200]} is not an image reference (like docker.io/you/solver:1.0)"


def _container_image(y: _Y, base: Path) -> Tuple[Optional[FileSpec], str]:
    """(the archive to send or None, the image reference to run)."""
    import yaml
    if isinstance(y.node, yaml.ScalarNode):
        text = y.text()
        local = (base / text) if not os.path.isabs(text) else Path(text)
        if not text.lower().endswith(IMAGE_ARCHIVE_SUFFIXES) and not local.is_file():
            if not IMAGE_REF_RE.match(text):
                raise y.fail(f"{text!r} is neither an image reference (like docker.io/you/solver:1.0) "
                             "nor an image archive file")
            return None, text
    spec = _file_spec(y, base)
    return spec, image_archive_reference(spec.path, y)


def image_archive_reference(path: str, y: _Y) -> str:
    """The name an image archive loads as: its first tag, else its image id (sha256:...)."""
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if member.isfile() and member.name in ("manifest.json", "./manifest.json"):
                    manifest = json.load(tar.extractfile(member))
                    break
            else:
                manifest = None
    except (OSError, tarfile.TarError, EOFError, ValueError) as exc:
        raise y.fail(f"{path} is not an image archive ({one_line(str(exc)) or type(exc).__name__}); "
                     "make one with `docker save -o FILE.tar IMAGE`") from None
    if not isinstance(manifest, list) or not manifest or not isinstance(manifest[0], dict):
        raise y.fail(f"{path} has no docker manifest.json; make the archive with `docker save -o FILE.tar IMAGE` "
                     "(or `podman save`)")
    tags = manifest[0].get("RepoTags") or []
    config = str(manifest[0].get("Config", ""))
    digest = re.sub(r"\.json\Z", "", config.rpartition("/")[2])
    reference = tags[0] if tags and isinstance(tags[0], str) else f"sha256:{digest}"
    if image_problem(reference):
        raise y.fail(f"{path}: its manifest names the image {reference!r}, which is not a usable reference")
    return reference


def load_job_file(path: str) -> JobFile:
    """Read and check a distribute-jobs.yaml; raises UserError naming file, line and key."""
    root = read_yaml(path)
    base = Path(path).resolve().parent
    keys = root.mapping(("meta", "slurm") + FLAVOURS, required=("meta",))
    flavours = [f for f in FLAVOURS if f in keys]
    if not flavours:
        raise root.fail(f"no job section: add one of {', '.join(f + ':' for f in FLAVOURS)}")
    if len(flavours) > 1:
        raise keys[flavours[1]].fail(f"only one job section is allowed, found {' and '.join(flavours)}")
    flavour = flavours[0]
    section = keys[flavour].mapping(("initialize", "jobs"), required=("jobs",))
    batch = JobFile(path=str(path), meta=_meta(keys["meta"]), flavour=flavour, jobs=[],
                    slurm=_slurm_options(keys.get("slurm")))
    init = section["initialize"].mapping(_INIT_KEYS[flavour]) if "initialize" in section else {}
    if flavour == "python":
        if "build_file" not in init or init["build_file"].is_null():
            raise (section.get("initialize") or keys[flavour]).fail("missing required key 'build_file'")
        batch.build = _file_spec(init["build_file"], base)
        batch.build.alias = "build.py"
    elif flavour == "apptainer":
        if "sif" not in init or init["sif"].is_null():
            raise (section.get("initialize") or keys[flavour]).fail("missing required key 'sif'")
        batch.build = _file_spec(init["sif"], base)
        batch.mounts = [_mount(m) for m in init["required_mounts"].sequence(allow_null=True)] \
            if "required_mounts" in init else []
    elif flavour in CONTAINER_ENGINES:
        if "image" not in init or init["image"].is_null():
            raise (section.get("initialize") or keys[flavour]).fail(
                "missing required key 'image' (a registry reference like docker.io/you/solver:1.0, "
                "or an image archive file made by `docker save`)")
        batch.build, batch.image = _container_image(init["image"], base)
        batch.mounts = [_mount(m) for m in init["required_mounts"].sequence(allow_null=True)] \
            if "required_mounts" in init else []
        if flavour not in batch.meta.capabilities:      # only nodes where the engine answers
            batch.meta.capabilities.append(flavour)
    elif "build" in init:
        batch.build_command = init["build"].optional_text()
    batch.initial_files = _file_list(init.get("required_files"), base)
    job_nodes = section["jobs"].sequence()
    if not job_nodes:
        raise section["jobs"].fail("the job list is empty")
    seen: Dict[str, int] = {}
    for item in job_nodes:
        job = _job(item, flavour, base, batch.meta.resources)
        name_y = item.mapping(_JOB_KEYS[flavour])["name"]
        if job.name in RESERVED_JOB_NAMES:
            raise name_y.fail(reserved_job_name_problem(job.name))
        if job.name in seen:
            raise name_y.fail(f"job name {job.name!r} is used twice (first at line {seen[job.name]})")
        seen[job.name] = name_y.line
        initial = {f.alias: f.path for f in batch.initial_files}
        for spec in job.required_files:
            if spec.alias in initial and initial[spec.alias] != spec.path:
                raise item.fail(f"{spec.alias!r} is both an initialize file and a file of this job; "
                                "give one an alias")
        batch.jobs.append(job)
    return batch


# The original distribute's nodes files: `ip` for the host, a name optional, and the
# TCP ports its own protocol needed.  SSH needs none of them: they are accepted and
# ignored (`serve` and `nodes --check` say so once).
ORIGINAL_PORT_KEYS = ("transport_port", "keepalive_port", "cancel_port")
ORIGINAL_NODE_KEYS = ("ip",) + ORIGINAL_PORT_KEYS


def _original_node_keys(item: _Y, keys: Dict[str, _Y]) -> Dict[str, _Y]:
    """`ip` becomes `host` (and the name, when none is given); port keys must be port numbers."""
    if "ip" in keys:
        if "host" in keys:
            raise keys["ip"].fail("give either host or ip (the original's name for it), not both")
        keys["host"] = keys.pop("ip")
        keys.setdefault("name", keys["host"])
    for key in ("name", "host"):
        if key not in keys or keys[key].is_null():
            raise item.fail(f"missing required key {key!r}")
    for key in ORIGINAL_PORT_KEYS:
        if key in keys and not keys[key].is_null() and keys[key].integer(minimum=1) > 65535:
            raise keys[key].fail("must be at most 65535")
    return keys


def original_ports_note(nodes: List[NodeSpec]) -> Optional[str]:
    """One note line when the nodes file carries the original's port keys, else None."""
    keys = sorted({key for node in nodes for key in node.ignored}, key=ORIGINAL_PORT_KEYS.index)
    if not keys:
        return None
    return (f"note: {', '.join(keys)} in the nodes file are ignored: the head reaches every node over "
            "SSH (port 22, or the node's `port:`), so no other port needs to be open")


def load_nodes_file(path: str) -> List[NodeSpec]:
    """Read and check a distribute-nodes.yaml."""
    root = read_yaml(path)
    items = root.mapping(("nodes",), required=("nodes",))["nodes"].sequence()
    if not items:
        raise root.fail("the node list is empty")
    nodes: List[NodeSpec] = []
    for item in items:
        keys = item.mapping(("name", "host", "user", "port", "capabilities", "slots", "workdir", "python",
                             "pause_dir", "owner", "cpus", "memory", "gpus", "reserve") + ORIGINAL_NODE_KEYS)
        keys = _original_node_keys(item, keys)
        node = NodeSpec(name=keys["name"].name(), host=keys["host"].text(),
                        capabilities=_capabilities(keys.get("capabilities")),
                        ignored=[k for k in ORIGINAL_PORT_KEYS if k in keys])
        if not re.match(r"[A-Za-z0-9_.:\[\]-]+\Z", node.host) or node.host.startswith("-"):
            raise keys["host"].fail(f"{node.host!r} is not a host name")
        if "user" in keys and not keys["user"].is_null():
            node.user = keys["user"].text()
            if not re.match(r"[A-Za-z_][A-Za-z0-9_.-]*\$?\Z", node.user):
                raise keys["user"].fail(f"{node.user!r} is not a user name")
        if "port" in keys and not keys["port"].is_null():
            node.port = keys["port"].integer(minimum=1)
            if node.port > 65535:
                raise keys["port"].fail("must be at most 65535")
        if "slots" in keys:
            node.slots = keys["slots"].integer(minimum=1)
            node.slots_given = True
        _node_capacity(node, keys)
        if "workdir" in keys:
            node.workdir = keys["workdir"].text()
            if not node.workdir.startswith("/"):
                raise keys["workdir"].fail("must be an absolute path")
            if len(supervisor_socket(node.workdir).encode()) > 107:     # the kernel's limit for a socket path
                raise keys["workdir"].fail("is too long: the supervisor's socket "
                                           f"{supervisor_socket(node.workdir)!r} would exceed 107 bytes")
        if "python" in keys:
            node.python = keys["python"].text()
        if "pause_dir" in keys:
            node.pause_dir = keys["pause_dir"].text()
            if not node.pause_dir.startswith("/"):
                raise keys["pause_dir"].fail("must be an absolute path")
        if "owner" in keys and not keys["owner"].is_null():
            node.owner = _owner_policy(keys["owner"])
        if any(n.name == node.name for n in nodes):
            raise keys["name"].fail(f"node name {node.name!r} is used twice")
        nodes.append(node)
    return nodes


def _node_capacity(node: NodeSpec, keys: Dict[str, _Y]) -> None:
    """A node's `cpus`, `memory`, `gpus` (overriding what is probed) and `reserve`."""
    for key in ("cpus", "memory", "gpus"):
        if key not in keys or keys[key].is_null():
            continue
        if key == "memory":
            try:
                node.memory = parse_size(keys[key].text())
            except UserError as exc:
                raise keys[key].fail(str(exc)) from None
        else:
            setattr(node, key, keys[key].integer(minimum=1 if key == "cpus" else 0))
            if getattr(node, key) > 1 << 20:
                raise keys[key].fail("is more than any machine has")
    if "reserve" in keys and not keys["reserve"].is_null():
        node.reserve = _resources(keys["reserve"], least_cpus=0)
        if node.reserve is not None and node.reserve.time is not None:
            raise keys["reserve"].fail("time: a node reserves cpus, memory and gpus only")


def describe_batch(batch: JobFile) -> Tuple[int, int]:
    """(number of distinct files, bytes to upload) for a batch."""
    paths = {spec.path for spec in batch.all_files()}
    return len(paths), sum(os.path.getsize(p) for p in paths)


# ---------------------------------------------------------------------------
# 4. Building job files in code: the Python API and sweeps
#
# The Python API (SPEC §6): build job files in code (`Batch`, `File`), turn
# parameter lists into one job each (`sweep`), and pick jobs by their parameters
# (`parse_where`, behind `pull --where`).  A code-built batch is checked by
# writing it as YAML and loading that with load_job_file, so it obeys exactly
# the rules, and gets the same errors, as a hand-written file.
# ---------------------------------------------------------------------------


PathLike = Union[str, "os.PathLike[str]"]


@record
class File:
    """A file a batch or job needs, and the name it gets in input/ (default: its own)."""
    path: str
    alias: Optional[str] = None

    def __post_init__(self) -> None:
        # Made absolute at once, so a later chdir cannot change which file is meant.
        self.path = os.path.abspath(os.fspath(self.path))


def _as_file(value: Any, what: str) -> File:
    if isinstance(value, File):
        return value
    if isinstance(value, (str, os.PathLike)):
        return File(value)
    raise UserError(f"{what}: expected a path or File(path, alias), found {type(value).__name__}")


def _as_files(values: Any, what: str) -> List[File]:
    if values is None:
        return []
    if isinstance(values, (str, os.PathLike, File)):
        values = [values]
    return [_as_file(value, what) for value in values]


def _slurm_data(value: Any, what: str) -> Optional[Dict[str, Any]]:
    """SlurmOptions or a plain dict -> the mapping written under `slurm:`."""
    if value is None:
        return None
    if isinstance(value, SlurmOptions):
        return {k: v for k, v in dataclasses.asdict(value).items() if v is not None}
    if isinstance(value, dict):
        return dict(value)
    raise UserError(f"{what}: slurm must be SlurmOptions or a dict, found {type(value).__name__}")


def _yaml_path(path: str, folder: Optional[Path]) -> str:
    """Relative to the job file's folder when the file lies inside it, else absolute."""
    if folder is None:
        return path
    relative = os.path.relpath(path, os.path.abspath(folder))
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return path
    return relative


def _relabel(message: str, yaml_path: str, label: str) -> str:
    """Errors about a generated YAML file name the batch instead of a file the user never saw."""
    if not message.startswith(yaml_path + ":"):
        return message
    return f"{label}: " + re.sub(r"\A(\d+:)?\s*", "", message[len(yaml_path) + 1:])


@record
class BatchJob:
    """One job of a Batch, as add_job or sweep made it."""
    name: str
    file: Optional[File] = None          # python flavour: becomes job.py
    command: Optional[str] = None        # shell flavour
    files: List[File] = field(default_factory=list)
    retries: int = 0
    params: Optional[Dict[str, Any]] = None
    slurm: Any = None                    # SlurmOptions, a dict of SLURM_KEYS, or None
    resources: Optional[Dict[str, Any]] = None   # {cpus, memory, gpus, time}, as in a job file


@record
class Batch:
    """A job file built in code: add jobs, then `write()` it or `validate()` it.

    `build` is the python flavour's build file, `build_command` the shell one's,
    `sif` the apptainer image, `image` the docker/podman one (a registry reference,
    or File(archive)); paths may be str, Path or File (with an alias).
    """
    namespace: str
    name: str
    flavour: str = "python"
    capabilities: List[str] = field(default_factory=list)
    matrix: Optional[str] = None
    build: Any = None
    build_command: Optional[str] = None
    sif: Any = None
    initial_files: List[Any] = field(default_factory=list)
    mounts: List[str] = field(default_factory=list)
    slurm: Any = None
    jobs: List[BatchJob] = field(default_factory=list)
    image: Any = None
    resources: Optional[Dict[str, Any]] = None   # the jobs' default {cpus, memory, gpus, time}
    after: List[str] = field(default_factory=list)   # batches that must be done first

    _ONLY_FOR = (("build", "python"), ("build_command", "shell"), ("sif", "apptainer"),
                 ("mounts", "apptainer docker podman"), ("image", "docker podman"))

    def __post_init__(self) -> None:
        if self.flavour not in FLAVOURS:
            raise UserError(f"Batch flavour {self.flavour!r}: use one of {', '.join(FLAVOURS)}")
        for what, value in (("namespace", self.namespace), ("name", self.name)):
            _check_api_name(value, f"Batch {what}")
        for attr, owner in self._ONLY_FOR:
            if getattr(self, attr) and self.flavour not in owner.split():
                raise UserError(f"{self.label}: {attr}= is only for {owner.replace(' ', '/')} batches")
        self.build = _as_file(self.build, f"{self.label}: build") if self.build is not None else None
        self.sif = _as_file(self.sif, f"{self.label}: sif") if self.sif is not None else None
        self.initial_files = _as_files(self.initial_files, f"{self.label}: initial_files")
        self.capabilities = list(self.capabilities or [])
        self.mounts = list(self.mounts or [])

    @property
    def label(self) -> str:
        return f"batch {self.namespace}/{self.name}"

    def add_job(self, name: str, file: Any = None, command: Optional[str] = None, files: Any = None,
                retries: int = 0, params: Optional[Dict[str, Any]] = None, slurm: Any = None,
                resources: Optional[Dict[str, Any]] = None) -> BatchJob:
        """Append a job; python jobs need `file`, shell jobs `command`, apptainer jobs neither."""
        _check_api_name(name, f"{self.label}: job name")
        where = f"{self.label}: job {name!r}"
        if any(job.name == name for job in self.jobs):
            raise UserError(f"{self.label}: job name {name!r} is used twice")
        if self.flavour == "python" and file is None:
            raise UserError(f"{where}: a python job needs file= (the script that runs as job.py)")
        if self.flavour == "shell" and command is None:
            raise UserError(f"{where}: a shell job needs command=")
        if file is not None and self.flavour != "python":
            raise UserError(f"{where}: file= is only for python batches (shell jobs take command=)")
        if command is not None and self.flavour != "shell":
            raise UserError(f"{where}: command= is only for shell batches")
        if params is not None and not isinstance(params, dict):
            raise UserError(f"{where}: params must be a dict, found {type(params).__name__}")
        if resources is not None and not isinstance(resources, dict):
            raise UserError(f"{where}: resources must be a dict like {{'cpus': 4, 'memory': '16G'}}")
        job = BatchJob(name, _as_file(file, f"{where}: file") if file is not None else None, command,
                       _as_files(files, f"{where}: files"), retries, dict(params) if params else None, slurm,
                       dict(resources) if resources else None)
        self.jobs.append(job)
        return job

    def to_yaml(self, folder: Optional[PathLike] = None) -> str:
        """The job file's text; paths inside `folder` (the file's folder) are written relative."""
        import yaml
        document = self._document(Path(folder) if folder is not None else None)
        try:
            body = yaml.safe_dump(document, sort_keys=False, default_flow_style=False,
                                  allow_unicode=True, width=1000)
        except yaml.YAMLError as exc:
            raise UserError(f"{self.label}: cannot be written as YAML ({exc}); "
                            "params must be numbers, text, true/false, lists or dicts") from None
        return "# Written by the distribute Python API; check it with `distribute check`.\n" + body

    def validate(self) -> JobFile:
        """Check the batch exactly as `distribute check` would; UserError on the first problem."""
        with tempfile.TemporaryDirectory(prefix="distribute-api-") as scratch:
            loaded = self._load_generated(self.to_yaml(), Path(scratch) / JOBS_FILE)
        loaded.path = self.label
        return loaded

    def write(self, path: PathLike = JOBS_FILE) -> Path:
        """Write the job file (into a folder: as distribute-jobs.yaml); nothing is written if invalid."""
        target = Path(path)
        if target.is_dir():
            target = target / JOBS_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        text = self.to_yaml(target.parent)
        write_atomically(target, lambda tmp: self._load_generated(text, tmp))
        return target

    @classmethod
    def from_file(cls, path: PathLike) -> "Batch":
        """A Batch holding what a job file says (checked by load_job_file)."""
        loaded = load_job_file(os.fspath(path))
        python, apptainer = loaded.flavour == "python", loaded.flavour == "apptainer"
        batch = cls(loaded.meta.namespace, loaded.meta.batch_name, loaded.flavour,
                    capabilities=list(loaded.meta.capabilities), matrix=loaded.meta.matrix,
                    build=File(loaded.build.path) if python and loaded.build else None,
                    build_command=loaded.build_command,
                    sif=_file_of(loaded.build) if apptainer and loaded.build else None,
                    initial_files=[_file_of(spec) for spec in loaded.initial_files],
                    mounts=list(loaded.mounts), slurm=loaded.slurm,
                    image=(_file_of(loaded.build) if loaded.build else loaded.image)
                    if loaded.flavour in CONTAINER_ENGINES else None)
        for job in loaded.jobs:
            batch.add_job(job.name, file=File(job.file.path) if job.file else None, command=job.command,
                          files=[_file_of(spec) for spec in job.required_files], retries=job.retries,
                          params=job.params, slurm=job.slurm)
        return batch

    def _load_generated(self, text: str, where: Path) -> JobFile:
        where.write_text(text, encoding="utf-8")
        try:
            return load_job_file(str(where))
        except UserError as exc:
            raise UserError(_relabel(str(exc), str(where), self.label)) from None

    def _document(self, folder: Optional[Path]) -> Dict[str, Any]:
        meta: Dict[str, Any] = {"batch_name": self.name, "namespace": self.namespace,
                                "capabilities": list(self.capabilities)}
        if self.matrix is not None:
            meta["matrix"] = self.matrix
        if self.resources:
            meta["resources"] = dict(self.resources)
        if self.after:
            meta["after"] = list(self.after)
        document: Dict[str, Any] = {"meta": meta}
        if self.slurm is not None:
            document["slurm"] = _slurm_data(self.slurm, self.label)
        init: Dict[str, Any] = {}
        if self.build is not None:
            init["build_file"] = _yaml_path(self.build.path, folder)  # renamed build.py anyway
        if self.build_command is not None:
            init["build"] = self.build_command
        if self.sif is not None:
            init["sif"] = _file_entry(self.sif, folder)
        if self.image is not None:
            init["image"] = _file_entry(self.image, folder) if isinstance(self.image, File) else str(self.image)
        if self.initial_files:
            init["required_files"] = [_file_entry(f, folder) for f in self.initial_files]
        if self.mounts:
            init["required_mounts"] = list(self.mounts)
        section: Dict[str, Any] = {"initialize": init} if init else {}
        section["jobs"] = [self._job_entry(job, folder) for job in self.jobs]
        document[self.flavour] = section
        return document

    def _job_entry(self, job: BatchJob, folder: Optional[Path]) -> Dict[str, Any]:
        entry: Dict[str, Any] = {"name": job.name}
        if job.file is not None:
            entry["file"] = _yaml_path(job.file.path, folder)   # always runs as job.py
        if job.command is not None:
            entry["command"] = job.command
        if job.files:
            entry["required_files"] = [_file_entry(f, folder) for f in job.files]
        if job.retries:
            entry["retries"] = job.retries
        if job.slurm is not None:
            entry["slurm"] = _slurm_data(job.slurm, f"{self.label}: job {job.name!r}")
        if job.params:
            entry["params"] = job.params
        if job.resources:
            entry["resources"] = dict(job.resources)
        return entry


def _check_api_name(value: Any, what: str) -> None:
    if not isinstance(value, str):
        raise UserError(f"{what}: expected text, found {type(value).__name__}")
    problem = name_problem(value)
    if problem:
        raise UserError(f"{what}: {problem}")


def _file_entry(file: File, folder: Optional[Path]) -> Any:
    path = _yaml_path(file.path, folder)
    return path if file.alias is None else {"path": path, "alias": file.alias}


def _file_of(spec: FileSpec) -> File:
    """A loaded FileSpec back as a File; an alias equal to the file's own name is left out."""
    return File(spec.path, None if spec.alias == os.path.basename(spec.path) else spec.alias)


# Sweeps: one job per combination of parameter values, each with its values in
# a generated input file (aliased to one fixed name, so every job reads the
# same path) and in `params`, which the archive keeps in job.json.

def write_params_json(path: Path, params: Dict[str, Any]) -> None:
    """The default sweep input writer: the job's parameters as a JSON object."""
    try:
        text = json.dumps(params, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise UserError(f"sweep: cannot write {params!r} as JSON ({exc}); pass writer=") from None
    path.write_text(text + "\n")


def sweep_job_name(params: Dict[str, Any]) -> str:
    """`{'re': 1000, 'nx': 128}` -> 're_1000-nx_128', cut to the job name rule."""
    raw = "-".join(f"{key}_{_name_part(value)}" for key, value in params.items())
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).lstrip("._-")[:128]
    return name or "job"


def _name_part(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, float):
        return repr(value)     # shortest round-trip form: 0.5, 1e-05
    return str(value)


def _sweep_combinations(parameters: Any, zipped: bool) -> List[Dict[str, Any]]:
    """The parameter dicts of a sweep, in a stable order (first parameter varies slowest)."""
    if not isinstance(parameters, dict) or not parameters:
        raise UserError("sweep: give the parameters as a non-empty dict: name -> list of values")
    lists: Dict[str, List[Any]] = {}
    for key, values in parameters.items():
        if not isinstance(key, str) or not key:
            raise UserError(f"sweep: parameter name {key!r} must be non-empty text")
        if isinstance(values, (str, bytes, dict)) or not isinstance(values, Iterable):
            raise UserError(f"sweep: parameter {key!r} needs a list of values, found {type(values).__name__}")
        lists[key] = list(values)
        if not lists[key]:
            raise UserError(f"sweep: parameter {key!r} has no values")
    keys = list(lists)
    if zipped:
        lengths = {len(values) for values in lists.values()}
        if len(lengths) > 1:
            counts = ", ".join(f"{key} has {len(values)}" for key, values in lists.items())
            raise UserError(f"sweep(zip=True): the parameter lists must have equal lengths ({counts})")
        rows: Iterable[Tuple[Any, ...]] = zip(*lists.values())
    else:
        rows = itertools.product(*lists.values())
    return [dict(zip(keys, row)) for row in rows]


def _sweep_names(batch: Batch, combinations: List[Dict[str, Any]],
                 name: Optional[Callable[[Dict[str, Any]], str]]) -> List[str]:
    """One job name per combination; two combinations (or an existing job) sharing one: UserError."""
    existing = {job.name for job in batch.jobs}
    first: Dict[str, Dict[str, Any]] = {}
    names = []
    for combination in combinations:
        job_name = name(dict(combination)) if name else sweep_job_name(combination)
        if job_name in existing:
            raise UserError(f"sweep: job name {job_name!r} (from {combination}) is already a job of {batch.label}")
        if job_name in first:
            raise UserError(f"sweep: parameters {first[job_name]} and {combination} both give the job name "
                            f"{job_name!r}; pass name= to name the jobs yourself")
        first[job_name] = combination
        names.append(job_name)
    return names


def sweep(batch: Batch, parameters: Dict[str, Iterable[Any]], folder: PathLike, *, zip: bool = False,
          alias: str = "params.json", writer: Optional[Callable[[Path, Dict[str, Any]], None]] = None,
          name: Optional[Callable[[Dict[str, Any]], str]] = None, file: Any = None,
          command: Optional[str] = None, files: Any = None, retries: int = 0, slurm: Any = None
          ) -> List[BatchJob]:
    """Add one job per combination of `parameters` to `batch` and return those jobs.

    Combinations are the cartesian product (first parameter varies slowest), or,
    with zip=True, the lists taken side by side (equal lengths required).  Each
    job is named from its values (`re_1000-nx_128`, or `name(params)`), gets
    `params`, and a file `<folder>/<job name><alias suffix>` written by
    `writer(path, params)` (JSON by default) that it sees as input/<alias>.
    `file`, `command`, `files`, `retries` and `slurm` go to every job as in add_job.
    Put `folder` next to the job file so the file can name it relatively.
    """
    combinations = _sweep_combinations(parameters, zipped=zip)
    names = _sweep_names(batch, combinations, name)
    problem = alias_problem(alias)
    if problem:
        raise UserError(f"sweep: alias {problem}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    extra = _as_files(files, "sweep: files")
    jobs: List[BatchJob] = []
    try:
        for index, combination in enumerate(combinations):
            job_name = names[index]     # (the builtin zip is shadowed by the argument)
            target = folder / (job_name + Path(alias).suffix)
            jobs.append(batch.add_job(job_name, file=file, command=command, files=extra + [File(target, alias)],
                                      retries=retries, params=combination, slurm=slurm))
            (writer or write_params_json)(target, dict(combination))
    except BaseException:
        # All or nothing for the batch: a half-added sweep would be easy to write out by mistake.
        batch.jobs[:] = [job for job in batch.jobs if job not in jobs]
        raise
    return jobs


# `--where`: a tiny expression language over a job's parameters, parsed here by
# hand (never eval) so that text typed on a command line can only compare.
#
#   expr       := disjunction
#   disjunction:= conjunction ("or" conjunction)*
#   conjunction:= negation ("and" negation)*
#   negation   := "not" negation | "(" disjunction ")" | NAME OP VALUE
#   OP         := == != < <= > >=      VALUE := number | 'text' | "text" | true | false
#
# A parameter the job lacks makes every comparison on it false (so `not` of one
# is true).  Values of different kinds (number, text, true/false, other) are
# never equal and never ordered: `==` and orderings are false, `!=` true.

WHERE_MAX_LENGTH = 1000
WHERE_MAX_DEPTH = 50

_WHERE_TOKEN_RE = re.compile(r"""
    (?P<space>\s+)
  | (?P<number>[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<paren>[()])
  | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
""", re.VERBOSE | re.DOTALL)

_WHERE_WORDS = {"and": "and", "or": "or", "not": "not"}
_WHERE_BOOLS = {"true": True, "false": False, "True": True, "False": False}


@record
class _Token:
    kind: str          # name, value, op, and, or, not, (, ), end
    text: str
    column: int        # 1-based, for error messages
    value: Any = None


def _where_error(expr: str, column: int, message: str, found: Optional[str] = None) -> UserError:
    return UserError(f"--where {expr!r}: {message} at column {column}" + (f", found {found}" if found else ""))


def _unexpected_character(char: str) -> str:
    if char in "\"'":
        return "unterminated string starting"
    if char == "=":
        return "'=' is not an operator (use '==')"
    if char == "!":
        return "'!' is not an operator (use '!=' or 'not')"
    return f"unexpected character {char!r}"


def _where_tokens(expr: str) -> List[_Token]:
    tokens: List[_Token] = []
    position = 0
    while position < len(expr):
        match = _WHERE_TOKEN_RE.match(expr, position)
        if match is None:
            raise _where_error(expr, position + 1, _unexpected_character(expr[position]))
        kind, text, column = match.lastgroup or "", match.group(), position + 1
        position = match.end()
        if kind == "number":
            is_int = re.match(r"[-+]?[0-9]+\Z", text)
            tokens.append(_Token("value", text, column, int(text) if is_int else float(text)))
        elif kind == "string":
            tokens.append(_Token("value", text, column, re.sub(r"\\(.)", r"\1", text[1:-1], flags=re.DOTALL)))
        elif kind == "word" and text in _WHERE_BOOLS:
            tokens.append(_Token("value", text, column, _WHERE_BOOLS[text]))
        elif kind == "word":
            tokens.append(_Token(_WHERE_WORDS.get(text, "name"), text, column))
        elif kind in ("op", "paren"):
            tokens.append(_Token(text if kind == "paren" else "op", text, column))
    tokens.append(_Token("end", "", len(expr) + 1))
    return tokens


def _where_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "text" if isinstance(value, str) else "other"


def _where_compare(value: Any, op: str, literal: Any) -> bool:
    if _where_kind(value) != _where_kind(literal):
        return op == "!="
    if op == "==":
        return bool(value == literal)
    if op == "!=":
        return bool(value != literal)
    if isinstance(literal, bool):
        return False       # true/false have no order
    if op == "<":
        return bool(value < literal)
    if op == "<=":
        return bool(value <= literal)
    if op == ">":
        return bool(value > literal)
    return bool(value >= literal)


def _where_comparison(name: str, op: str, literal: Any) -> Callable[[Dict[str, Any]], bool]:
    def test(params: Dict[str, Any]) -> bool:
        return name in params and _where_compare(params[name], op, literal)
    return test


class _WhereParser:
    """Recursive descent over the tokens; nesting is capped so no input can exhaust the stack."""

    def __init__(self, expr: str):
        self.expr = expr
        self.tokens = _where_tokens(expr)
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        self.index = min(self.index + 1, len(self.tokens) - 1)
        return token

    def fail(self, token: _Token, expected: str) -> UserError:
        found = "the end" if token.kind == "end" else repr(token.text)
        return _where_error(self.expr, token.column, f"expected {expected}", found)

    def parse(self) -> Callable[[Dict[str, Any]], bool]:
        test = self.disjunction()
        if self.peek().kind != "end":
            raise self.fail(self.peek(), "'and', 'or' or the end")
        return test

    def disjunction(self) -> Callable[[Dict[str, Any]], bool]:
        return self.chain("or", self.conjunction, any)

    def conjunction(self) -> Callable[[Dict[str, Any]], bool]:
        return self.chain("and", self.negation, all)

    def chain(self, keyword: str, operand, combine) -> Callable[[Dict[str, Any]], bool]:
        """operand (keyword operand)*, combined by any() or all()."""
        tests = [operand()]
        while self.peek().kind == keyword:
            self.take()
            tests.append(operand())
        return tests[0] if len(tests) == 1 else (lambda params: combine(t(params) for t in tests))

    def negation(self) -> Callable[[Dict[str, Any]], bool]:
        token = self.take()
        if token.kind == "not":
            inner = self.nested(token, self.negation)
            return lambda params: not inner(params)
        if token.kind == "(":
            inner = self.nested(token, self.disjunction)
            if self.peek().kind != ")":
                closing = self.fail(self.peek(), "')'")
                raise UserError(f"{closing}; the '(' at column {token.column} is not closed")
            self.take()
            return inner
        if token.kind != "name":
            raise self.fail(token, "a parameter name, 'not' or '('")
        op = self.take()
        if op.kind != "op":
            raise self.fail(op, f"a comparison (== != < <= > >=) after {token.text!r}")
        literal = self.take()
        if literal.kind != "value":
            raise self.fail(literal, "a value (a number, 'text', true or false)")
        return _where_comparison(token.text, op.text, literal.value)

    def nested(self, token: _Token, parse: Callable[[], Callable[[Dict[str, Any]], bool]]
               ) -> Callable[[Dict[str, Any]], bool]:
        self.depth += 1
        if self.depth > WHERE_MAX_DEPTH:
            raise _where_error(self.expr, token.column, f"nested more than {WHERE_MAX_DEPTH} deep")
        try:
            return parse()
        finally:
            self.depth -= 1


def parse_where(expr: str) -> Callable[[Dict[str, Any]], bool]:
    """Compile a `--where` expression into a test on a job's params dict.

    `re>=1000 and nx==128`, `solver == "piso" or not (dt < 0.01)`: comparisons of
    a parameter with a number, quoted text or true/false, joined by and/or/not
    and parentheses.  Bad syntax raises UserError naming the column.
    """
    if not isinstance(expr, str):
        raise UserError(f"--where: expected text, found {type(expr).__name__}")
    if len(expr) > WHERE_MAX_LENGTH:
        raise UserError(f"--where: the expression is {len(expr)} characters long, the limit is {WHERE_MAX_LENGTH}")
    test = _WhereParser(expr).parse()
    return lambda params: bool(isinstance(params, dict) and test(params))


# ---------------------------------------------------------------------------
# 5. Local runs and the archive
#
# What a job sees on a node (SPEC §3) and how its results land in the archive
# (SPEC §6).  `run`, the node supervisor and the head all use these, so a batch
# behaves the same on a laptop as on the lab's machines.
# ---------------------------------------------------------------------------

@record
class BatchPlan:
    """What a machine needs to know to build a batch: no paths of the submitter's laptop."""
    namespace: str
    batch: str
    flavour: str
    build_alias: Optional[str] = None       # build.py, or the .sif's name
    build_command: Optional[str] = None
    initial: List[str] = field(default_factory=list)
    mounts: List[str] = field(default_factory=list)
    image: Optional[str] = None             # docker/podman: the reference to run
    after: List[str] = field(default_factory=list)     # namespace/batch keys that must be done first
    after_failed: str = "wait"
    uses_resources: bool = False            # some job has resources (set by the head at `add`)

    @classmethod
    def of(cls, batch: JobFile) -> "BatchPlan":
        return cls(batch.meta.namespace, batch.meta.batch_name, batch.flavour,
                   batch.build.alias if batch.build else None, batch.build_command,
                   [f.alias for f in batch.initial_files], list(batch.mounts), batch.image,
                   after=list(batch.meta.after), after_failed=batch.meta.after_failed)


@record
class JobPlan:
    """What a machine needs to know to run one job of a built batch."""
    name: str
    files: List[str] = field(default_factory=list)
    command: Optional[str] = None
    has_script: bool = False
    params: Optional[Dict[str, Any]] = None
    cpus: int = 0           # resources: 0 cpus means none were asked (the job takes a slot)
    memory: int = 0         # bytes, 0: no limit
    gpus: int = 0
    time: int = 0           # seconds, 0: no limit

    @classmethod
    def of(cls, job: Job) -> "JobPlan":
        plan = cls(job.name, [f.alias for f in job.required_files], job.command, job.file is not None,
                   job.params)
        if job.resources is not None and job.resources.given():
            plan.cpus = job.resources.cpus or 1
            plan.memory, plan.gpus, plan.time = (job.resources.memory or 0, job.resources.gpus or 0,
                                                 job.resources.time or 0)
        return plan


class Workspace:
    """The build directory of one batch on one machine, laid out as SPEC §3 says.

    A job runs with `root` as its working directory.  When a node runs two jobs
    of the same batch at once, the second gets a shadow directory whose entries
    link to the build's, with its own input/ and distribute_save/.
    """

    PRIVATE = ("input", "distribute_save", "job.py", "mounts", ".distribute")

    def __init__(self, root: Path):
        self.root = Path(root)

    input = property(lambda self: self.root / "input")
    save = property(lambda self: self.root / "distribute_save")
    initial = property(lambda self: self.root / "initial_files")
    private = property(lambda self: self.root / ".distribute")

    def create(self) -> None:
        for folder in (self.root, self.initial, self.input, self.save, self.private):
            folder.mkdir(parents=True, exist_ok=True)

    def shadow(self, slot: int) -> "Workspace":
        """A sibling workspace for a second job of the batch running at the same time."""
        twin = self.shadow_of(slot)
        for folder in (twin.root, twin.input, twin.save, twin.private):     # initial_files/ is the build's
            folder.mkdir(parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            link = twin.root / entry.name
            if entry.name in self.PRIVATE or os.path.lexists(link):
                continue
            os.symlink(entry, link)
        return twin

    def shadow_of(self, slot: int) -> "Workspace":
        """Where the job in `slot` runs (slot 0: the build directory itself)."""
        return Workspace(self.root.with_name(f"{self.root.name}.slot{slot}")) if slot else self

    def place_initial(self, sources: Dict[str, str]) -> None:
        """Copy the batch's shared files (alias -> source path) into place."""
        for alias, source in sources.items():
            shutil.copyfile(source, inside(self.initial, alias))

    def place_build_file(self, plan: BatchPlan, source: str) -> None:
        if plan.build_alias:
            shutil.copyfile(source, inside(self.root, plan.build_alias))

    def reset_for_job(self, plan: BatchPlan) -> None:
        """input/ holds just the initial files, distribute_save/ and mounts are empty."""
        for folder in (self.input, self.save, self.root / "mounts"):
            try:
                os.rmdir(folder)                # the usual case: an empty folder (never a link)
            except FileNotFoundError:
                pass
            except OSError:
                remove_tree(folder)
        self.input.mkdir()
        self.save.mkdir()
        for alias in plan.initial:
            shutil.copyfile(inside(self.initial, alias), inside(self.input, alias))
        for index, _ in enumerate(plan.mounts):
            (self.root / "mounts" / str(index)).mkdir(parents=True)

    def prepare_job(self, plan: BatchPlan, sources: Dict[str, str], script: Optional[str]) -> None:
        """Refresh input/ (initial files + this job's), empty distribute_save/ and mounts."""
        self.reset_for_job(plan)
        for alias, source in sources.items():
            shutil.copyfile(source, inside(self.input, alias))
        if script is not None:
            shutil.copyfile(script, self.root / "job.py")

    def progress_file(self, job: str) -> Path:
        return self.private / f"progress-{job}"

    def build_argv(self, plan: BatchPlan, python: str) -> Optional[List[str]]:
        if plan.flavour == "python":
            return [python, plan.build_alias or "build.py"]
        if plan.flavour == "shell" and plan.build_command:
            return ["/bin/sh", "-c", plan.build_command]
        if plan.flavour in CONTAINER_ENGINES:     # fetch the image once per node and batch
            if plan.build_alias:
                return [plan.flavour, "load", "--input", plan.build_alias]
            return [plan.flavour, "pull", plan.image or ""]
        return None     # apptainer: the image is the build

    def job_argv(self, plan: BatchPlan, job: JobPlan, python: str, cpus: int) -> List[str]:
        if plan.flavour == "python":
            return [python, "job.py"]
        if plan.flavour == "shell":
            return ["/bin/sh", "-c", job.command or ""]
        if plan.flavour in CONTAINER_ENGINES:
            return container_argv(self, plan, cpus)
        return apptainer_argv(self, plan, cpus)

    def job_env(self, plan: BatchPlan, job: JobPlan, cpus: int, extra: Optional[Dict[str, str]] = None
                ) -> Dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")     # keeps print() and tracebacks in order in stdout.txt
        env.update(DISTRIBUTE_JOB=job.name, DISTRIBUTE_BATCH=plan.batch,
                   DISTRIBUTE_NAMESPACE=plan.namespace, DISTRIBUTE_CPUS=str(cpus),
                   DISTRIBUTE_PROGRESS=str(self.progress_file(job.name)))
        env.update(extra or {})
        return env


def apptainer_argv(ws: Workspace, plan: BatchPlan, cpus: int) -> List[str]:
    """The exact command line of SPEC §3 for an apptainer job."""
    binds = [f"{ws.save}:/distribute_save:rw", f"{ws.input}:/input:rw"]
    binds += [f"{ws.root / 'mounts' / str(i)}:{mount}:rw" for i, mount in enumerate(plan.mounts)]
    return ["apptainer", "run", "--app", "distribute", "--bind", ",".join(binds),
            str(ws.root / (plan.build_alias or "image.sif")), str(cpus)]


CONTAINER_ENV = ("DISTRIBUTE_JOB", "DISTRIBUTE_BATCH", "DISTRIBUTE_NAMESPACE", "DISTRIBUTE_CPUS")


def container_user_args(engine: str, uid: int, gid: int) -> List[str]:
    """Run as the node account, so what the job writes is its files, not root's.  Rootless
    podman maps that account to itself with keep-id (rootful podman cannot)."""
    if engine == "podman" and uid != 0:
        return ["--userns=keep-id", "--user", f"{uid}:{gid}"]
    return ["--user", f"{uid}:{gid}"]


def container_argv(ws: Workspace, plan: BatchPlan, cpus: int) -> List[str]:
    """`docker run` (or podman) for one job: distribute_save and input bound as apptainer's
    are, the job's DISTRIBUTE_* variables passed in, the container removed when it ends."""
    # --init: the engine's tiny init is PID 1 and passes a kill's SIGTERM on to the job (a job
    # that is PID 1 itself would ignore it, and outlive `kill` once the client is SIGKILLed)
    argv = [plan.flavour, "run", "--rm", "--init"] + container_user_args(plan.flavour, os.getuid(), os.getgid())
    for name in CONTAINER_ENV:
        argv += ["--env", name]
    binds = [f"{ws.save}:/distribute_save:rw", f"{ws.input}:/input:rw"]
    binds += [f"{ws.root / 'mounts' / str(i)}:{mount}:rw" for i, mount in enumerate(plan.mounts)]
    for bind in binds:
        argv += ["--volume", bind]
    return argv + [plan.image or "", str(cpus)]


def read_progress(path: Path) -> Optional[float]:
    """The last line of a job's progress file as a percentage ('42', '42.5' or '3/10')."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.path.getsize(path) - 256))
            lines = handle.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return None
    if not lines:
        return None
    text = lines[-1].strip()
    try:
        if "/" in text:
            done, total = text.split("/", 1)
            return max(0.0, min(100.0, 100.0 * float(done) / float(total)))
        return max(0.0, min(100.0, float(text)))
    except (ValueError, ZeroDivisionError):
        return None


# The archive: <archive>/<namespace>/<batch>/<job>/ holds what the job saved,
# stdout.txt and job.json.  A job's folder appears complete or not at all: it is
# filled under a hidden name and renamed into place.  Build logs live beside the
# jobs in <batch>/build/<node>.txt, which is why no job may be named `build`.
#
# Archive writes never follow a link a job could have left: every folder below
# the archive's root is opened relative to its parent's descriptor with
# O_NOFOLLOW, and every file is created under a fresh name (O_CREAT|O_EXCL|
# O_NOFOLLOW) and renamed within its folder, which replaces a link instead of
# writing through it.  The kernel enforces this; a checked path string could be
# redirected between the check and the write.

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC


class UnsafeArchive(Failed):
    """A tar stream tried to write outside its folder, or held a device or link out."""


def _plain_part(part: str) -> str:
    if part in ("", ".", "..") or "/" in part or "\0" in part:
        raise UnsafeArchive(f"refused path part {part!r}")
    return part


def open_regular_file(path: Union[str, Path], extra_flags: int = 0) -> Optional[Tuple[int, os.stat_result]]:
    """(descriptor, stat) of path opened for reading, never through a link; None when it is
    not a regular file that can be opened (gone, a link, a folder, a FIFO)."""
    import stat
    try:
        fd = os.open(str(path), os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC | extra_flags)
    except OSError:
        return None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return fd, info


def read_up_to(fd: int, size: int) -> bytes:
    """size bytes from fd's position on; fewer only where the file ends sooner."""
    data = os.read(fd, size) if size else b""
    while data and len(data) < size:
        more = os.read(fd, size - len(data))
        if not more:
            break
        data += more
    return data


def open_folder_at(dir_fd: int, name: str, create: bool = False) -> int:
    """The folder `name` inside the folder dir_fd, opened without following a link
    (made first when missing and `create`)."""
    _plain_part(name)
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=dir_fd)
    try:
        return os.open(name, FOLDER_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeArchive(f"{name!r} is a link or a file where a folder belongs") from None
        raise


@contextlib.contextmanager
def folder_fd(root: PathLike, *parts: str, create: bool = True) -> Iterator[int]:
    """A descriptor of root/parts.  `root` is taken as given (the admin chose it); each part
    below it is opened with O_NOFOLLOW, and made when missing if `create`."""
    if create:
        os.makedirs(str(root), exist_ok=True)
    fd = os.open(str(root), os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        for part in parts:
            child = open_folder_at(fd, part, create)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"


def write_file_at(dir_fd: int, name: str, content: Union[bytes, Callable[[Any], None]], mode: int = 0o644) -> None:
    """Make `name` in the folder dir_fd hold `content` (bytes, or a function writing to a binary
    file): written under a fresh name and renamed over whatever stood there, never through it."""
    _plain_part(name)
    tmp = temp_name(name)
    fd = os.open(tmp, NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as out:
            if callable(content):
                content(out)
            else:
                out.write(content)
        replace_at(dir_fd, tmp, name)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def replace_at(dir_fd: int, source: str, target: str, target_fd: Optional[int] = None) -> None:
    """rename(2) within descriptors; a folder standing at the target is deleted first."""
    target_fd = dir_fd if target_fd is None else target_fd
    try:
        os.replace(source, target, src_dir_fd=dir_fd, dst_dir_fd=target_fd)
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
            raise
        remove_at(target_fd, target)
        os.replace(source, target, src_dir_fd=dir_fd, dst_dir_fd=target_fd)


def read_file_at(dir_fd: int, name: str, limit: int = 1 << 20) -> Optional[bytes]:
    """The first `limit` bytes of the regular file `name` in dir_fd (None if missing or a link)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as handle:
        if not stat_is_regular(os.fstat(fd).st_mode):
            return None
        return handle.read(limit)


# Folders are walked and deleted without recursion and with a bounded number of open
# descriptors, whatever their depth (a job can leave 10,000 nested folders): a folder
# found deeper than this is first moved up to the top, then deleted from there.
REMOVE_DEPTH = 64


def remove_at(dir_fd: int, name: str) -> None:
    """rm -rf `name` inside the folder dir_fd: never follows a link, never recurses."""
    try:
        os.unlink(name, dir_fd=dir_fd)
        return
    except FileNotFoundError:
        return
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.EPERM):
            raise
    pending = [name]
    while pending:
        top = pending.pop()
        stack = [(dir_fd, top, open_folder_at(dir_fd, top))]
        try:
            while stack:
                _, _, fd = stack[-1]
                deeper = None
                with os.scandir(fd) as entries:
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            deeper = entry.name
                            break
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(entry.name, dir_fd=fd)
                if deeper is None:
                    parent, folder, fd = stack.pop()
                    os.close(fd)
                    os.rmdir(folder, dir_fd=parent)
                elif len(stack) >= REMOVE_DEPTH:
                    moved = f".removing-{os.urandom(6).hex()}"
                    os.rename(deeper, moved, src_dir_fd=fd, dst_dir_fd=dir_fd)
                    pending.append(moved)
                else:
                    stack.append((fd, deeper, open_folder_at(fd, deeper)))
        finally:
            for _, _, fd in stack:
                os.close(fd)


def remove_tree(path: PathLike) -> None:
    """rm -rf path (shutil.rmtree recurses: a deep enough tree raises RecursionError)."""
    path = os.path.abspath(str(path))
    with contextlib.suppress(FileNotFoundError):
        with folder_fd(os.path.dirname(path), create=False) as fd:
            remove_at(fd, os.path.basename(path))


_LIBC = []


def sync_file_system(path: PathLike) -> None:
    """Put everything written on the file system holding `path` on stable storage (Linux
    syncfs(2): one call for all the files and folders of many landed results; os.sync()
    where it is missing)."""
    if not _LIBC:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        _LIBC.append(getattr(libc, "syncfs", None))
    syncfs = _LIBC[0]
    if syncfs is None:
        os.sync()
        return
    fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        if syncfs(fd) != 0:
            import ctypes
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def batch_archive(archive: Path, namespace: str, batch: str) -> Path:
    return inside(Path(archive), namespace, batch)


def land_job(archive: Path, namespace: str, batch: str, job: str, fill, record: Dict[str, Any]) -> Path:
    """Create the job's archive folder atomically; `fill(folder)` puts the files in."""
    incoming, final = start_landing(archive, namespace, batch, job)
    try:
        fill(incoming)
        return finish_landing(incoming, final, record)
    except BaseException:
        remove_tree(incoming)
        raise


def start_landing(archive: Path, namespace: str, batch: str, job: str) -> Tuple[Path, Path]:
    """A hidden folder to fill with a job's results, and the name it will get."""
    parent = batch_archive(archive, namespace, batch)
    final = inside(parent, _plain_part(job))
    with folder_fd(archive, namespace, batch) as fd:
        while True:
            incoming = f".incoming-{job}-{os.urandom(6).hex()}"
            try:
                os.mkdir(incoming, 0o755, dir_fd=fd)
                return parent / incoming, final
            except FileExistsError:
                continue


def finish_landing(incoming: Path, final: Path, record: Dict[str, Any]) -> Path:
    """Add job.json and rename the filled folder into place (replacing an earlier one).
    Everything goes through the batch folder's descriptor: whatever links the job's files
    hold, job.json is a new file and the renames move names, never link targets."""
    with folder_fd(final.parent, create=False) as batch_fd:
        with _fd_closing(open_folder_at(batch_fd, incoming.name)) as incoming_fd:
            record = dict(record, **skipped_outputs(incoming_fd))
            write_file_at(incoming_fd, "job.json", json_bytes(record))
        if landed_already(final, record, batch_fd):
            remove_at(batch_fd, incoming.name)
            return final
        try:
            os.rename(incoming.name, final.name, src_dir_fd=batch_fd, dst_dir_fd=batch_fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
            old = f".replaced-{final.name}-{os.urandom(6).hex()}"
            os.rename(final.name, old, src_dir_fd=batch_fd, dst_dir_fd=batch_fd)
            os.rename(incoming.name, final.name, src_dir_fd=batch_fd, dst_dir_fd=batch_fd)
            remove_at(batch_fd, old)
    return final


def skipped_outputs(folder_fd_: int) -> Dict[str, Any]:
    """{"skipped": [...]} from the list the node sent along with a job's results (then removed),
    or {} (see job_result_entries)."""
    data = read_file_at(folder_fd_, SKIPPED_FILE)
    if data is None:
        return {}
    remove_at(folder_fd_, SKIPPED_FILE)
    try:
        listed = json.loads(data)
    except ValueError:
        return {}
    if not isinstance(listed, list):
        return {}
    kept = [{"path": str(e.get("path"))[:4096], "reason": str(e.get("reason"))[:200]}
            for e in listed[:MAX_SKIPPED_LISTED + 1] if isinstance(e, dict)]
    return {"skipped": kept} if kept else {}


@contextlib.contextmanager
def _fd_closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def landed_already(final: Path, record: Dict[str, Any], batch_fd: Optional[int] = None) -> bool:
    """Whether `final` holds this very attempt's results already: a head killed after landing
    them but before noting so gets them again after its restart, and must not archive twice."""
    try:
        if batch_fd is None:
            with folder_fd(final.parent, create=False) as fd:
                return landed_already(final, record, fd)
        with _fd_closing(open_folder_at(batch_fd, final.name)) as job_fd:
            landed = json.loads(read_file_at(job_fd, "job.json") or b"null")
    except (OSError, ValueError, UnsafeArchive):
        return False
    return isinstance(landed, dict) and record.get("start") is not None and \
        all(landed.get(key) == record.get(key) for key in ("node", "start", "attempts"))


def remove_unfinished_landings(archive: Path) -> None:
    """Hidden folders and files a killed head was still filling or swapping out: never
    visible as results, and their jobs are archived again from the nodes."""
    for pattern in ("*/*/.incoming-*", "*/*/.replaced-*", "*/*/.removing-*", "*/*/build/.*.tmp"):
        for path in Path(archive).glob(pattern):
            with contextlib.suppress(OSError, UnsafeArchive):
                remove_tree(path)


def land_build_log(archive: Path, namespace: str, batch: str, node: str, source: Union[Path, bytes]) -> Path:
    """<batch>/build/<node>.txt: a file's copy, or the bytes given."""
    final = inside(batch_archive(archive, namespace, batch) / "build", _plain_part(f"{node}.txt"))
    data = source if isinstance(source, bytes) else None
    with folder_fd(archive, namespace, batch, "build") as fd:
        if data is not None:
            write_file_at(fd, final.name, data)
        else:
            with open(source, "rb") as handle:
                write_file_at(fd, final.name, lambda out: shutil.copyfileobj(handle, out, 1 << 20))
    return final


def write_atomically(final: Path, write) -> None:
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def copy_tree_into(source: Path, dest: Path) -> None:
    """Copy source's contents into the existing folder dest, keeping symlinks as links."""
    for entry in os.scandir(source):
        target = dest / entry.name
        if entry.is_dir(follow_symlinks=False):
            shutil.copytree(entry.path, target, symlinks=True)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry.path), target)
        else:
            shutil.copy2(entry.path, target)


@record
class JobOutcome:
    name: str
    exit_code: int
    attempts: int
    start: float
    end: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


def run_process(argv: List[str], cwd: Path, env: Dict[str, str], log: Path) -> int:
    """Run one build or job with stdout and stderr interleaved into `log`."""
    with open(log, "ab") as out:
        try:
            proc = subprocess.Popen(argv, cwd=str(cwd), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except FileNotFoundError:
            out.write(f"distribute: {argv[0]}: command not found\n".encode())
            return 127
        try:
            return proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise


def job_record(plan: BatchPlan, job: JobPlan, node: str, outcome: JobOutcome, state: str) -> Dict[str, Any]:
    return {"namespace": plan.namespace, "batch": plan.batch, "job": job.name, "node": node,
            "start": now_iso(outcome.start), "end": now_iso(outcome.end),
            "exit_code": outcome.exit_code, "attempts": outcome.attempts, "state": state,
            "params": job.params or {}}


def run_batch_locally(batch: JobFile, save_dir: Path, clean_save: bool, echo) -> List[JobOutcome]:
    """`distribute run`: build once and run every job here, one after another."""
    plan = BatchPlan.of(batch)
    node = socket.gethostname().split(".")[0] or "local"
    archive_batch = batch_archive(save_dir, plan.namespace, plan.batch)
    if clean_save and archive_batch.exists():
        shutil.rmtree(archive_batch)
    cpus = os.cpu_count() or 1
    python = shutil.which("python3") or sys.executable
    with tempfile.TemporaryDirectory(prefix="distribute-run-") as scratch:
        ws = Workspace(Path(scratch) / plan.namespace / plan.batch)
        ws.create()
        ws.place_initial({f.alias: f.path for f in batch.initial_files})
        if batch.build:
            ws.place_build_file(plan, batch.build.path)
        argv = ws.build_argv(plan, python)
        if argv:
            echo(f"building {plan.namespace}/{plan.batch} ...")
            log = ws.private / "build.txt"
            code = run_process(argv, ws.root, ws.job_env(plan, JobPlan("build"), cpus), log)
            where = land_build_log(save_dir, plan.namespace, plan.batch, node, log)
            if code != 0:
                raise Failed(f"the build of {plan.namespace}/{plan.batch} failed with exit code {code}; "
                             f"its output is in {where}")
        outcomes = []
        for job in batch.jobs:
            outcomes.append(run_job_locally(ws, plan, job, python, cpus, node, save_dir, echo))
    return outcomes


def run_job_locally(ws: Workspace, plan: BatchPlan, job: Job, python: str, cpus: int, node: str,
                    save_dir: Path, echo) -> JobOutcome:
    job_plan = JobPlan.of(job)
    log = ws.private / f"stdout-{job.name}.txt"
    start, attempts = time.time(), 0
    while True:
        attempts += 1
        log.write_bytes(b"")
        ws.prepare_job(plan, {f.alias: f.path for f in job.required_files}, job.file.path if job.file else None)
        code = run_process(ws.job_argv(plan, job_plan, python, cpus), ws.root,
                           ws.job_env(plan, job_plan, cpus), log)
        if code == 0 or attempts > job.retries:
            break
    outcome = JobOutcome(job.name, code, attempts, start, time.time())

    def fill(folder: Path) -> None:
        copy_tree_into(ws.save, folder)
        shutil.copyfile(log, folder / "stdout.txt")

    land_job(save_dir, plan.namespace, plan.batch, job.name, fill,
             job_record(plan, job_plan, node, outcome, "ok" if outcome.ok else "failed"))
    echo(f"  {job.name}: {'ok' if outcome.ok else f'failed (exit code {code})'} "
         f"in {outcome.end - outcome.start:.1f}s")
    return outcome


# ---------------------------------------------------------------------------
# 6. The Slurm transpiler
#
# The Slurm transpiler (`distribute slurm`, SPEC §6 and §8): pure functions from
# a loaded JobFile to a folder that runs the batch on a Slurm cluster with the
# same directory contract as our nodes.  The folder is also the working tree on
# the cluster, because there the scripts find everything relative to the
# directory sbatch was called from (SLURM_SUBMIT_DIR):
#   build/              the build directory of SPEC §3 (build.py or the .sif, initial_files/)
#   jobs/<job>/         the job's own input/, job.py or command, job.json.in
#   tasks/array-N.txt   line i: "<job> <retries>" for array task i of array-N.sbatch
#   build.sbatch        the build, once (python; shell with a build command)
#   array-N.sbatch      one job array per group of jobs with equal slurm options
#   run-task.sh         what every array task runs
#   submit.sh, upload.sh, fetch.sh, README.txt
#   work/<job>/         (made on the cluster) a task's private copy of build/
#   results/<ns>/<batch>/<job>/   (made on the cluster) our archive layout
# ---------------------------------------------------------------------------


DEFAULT_MAX_ARRAY_SIZE = 1001
SLURM_MAIL_TYPES = ("NONE", "BEGIN", "END", "FAIL", "REQUEUE", "ALL", "INVALID_DEPEND", "STAGE_OUT",
                    "TIME_LIMIT", "TIME_LIMIT_90", "TIME_LIMIT_80", "TIME_LIMIT_50", "ARRAY_TASKS")
SLURM_HINTS = ("compute_bound", "memory_bound", "multithread", "nomultithread")
_SLURM_TIME_RE = re.compile(r"(?:\d+-\d+(?::\d+){0,2}|\d+(?::\d+){0,2}|UNLIMITED|INFINITE)\Z", re.I)
_SLURM_MEM_RE = re.compile(r"\d+[KMGTkmgt]?\Z")
_SLURM_WORD_RE = re.compile(r"[A-Za-z0-9_.-]+\Z")
_SLURM_PARTITION_RE = re.compile(r"[A-Za-z0-9_.-]+(?:,[A-Za-z0-9_.-]+)*\Z")
_SLURM_MAIL_USER_RE = re.compile(r"[A-Za-z0-9._%+-]+(?:@[A-Za-z0-9.-]+)?\Z")
_SLURM_PATH_RE = re.compile(r"[^\s'\"\\]+\Z")
_CLUSTER_DIR_RE = re.compile(r"[A-Za-z0-9_./+@-]+\Z")
_CLUSTER_USER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*\$?\Z")
_CLUSTER_HOST_RE = re.compile(r"[A-Za-z0-9_.:\[\]-]+\Z")
# job.json is written on the cluster by sed from a template with these markers.
_JSON_SLOTS = ("node", "start", "end", "exit_code", "attempts", "state")


@record
class SlurmArray:
    """One sbatch script: a job array over jobs that share the same slurm options."""
    script: str
    options: SlurmOptions
    jobs: List[Job]

    @property
    def task_list(self) -> str:
        return f"tasks/{self.script.rsplit('.', 1)[0]}.txt"


@record
class ClusterTarget:
    """Where the folder goes: `[user@]host:dir`, or a local (shared) directory when host is None."""
    directory: str
    host: Optional[str] = None
    user: Optional[str] = None

    @property
    def rsync_prefix(self) -> str:
        if not self.host:
            return ""
        return f"{self.user}@{self.host}:" if self.user else f"{self.host}:"

    @property
    def ssh_destination(self) -> Optional[str]:
        if not self.host:
            return None
        return f"{self.user}@{self.host}" if self.user else self.host


def slurm_option_problem(key: str, value: Any) -> Optional[str]:
    """Why sbatch would refuse `value` for the option `key` (None when it is fine)."""
    text = str(value)
    if key == "job_name" and not NAME_RE.match(text):
        return (f"{text!r} must be letters, digits, '.', '_' and '-' "
                "(no spaces), starting with a letter or digit")
    if key == "time" and not _SLURM_TIME_RE.match(text):
        return (f"{text!r} is not a Slurm time: use minutes, MM:SS, HH:MM:SS, "
                "D-HH, D-HH:MM or D-HH:MM:SS")
    if key == "mem_per_cpu" and not _SLURM_MEM_RE.match(text):
        return f"{text!r} is not a Slurm size: a whole number with an optional K, M, G or T (e.g. 4G)"
    if key == "hint" and text not in SLURM_HINTS:
        return f"{text!r} is not one of {', '.join(SLURM_HINTS)}"
    if key == "mail_type":
        bad = [t for t in text.split(",") if t.upper() not in SLURM_MAIL_TYPES]
        if bad:
            return f"{bad[0]!r} is not one of {', '.join(SLURM_MAIL_TYPES)} (comma-separated)"
    if key == "partition" and not _SLURM_PARTITION_RE.match(text):
        return f"{text!r} must be partition names (letters, digits, '_', '.', '-') separated by commas"
    if key == "account" and not _SLURM_WORD_RE.match(text):
        return f"{text!r} must be letters, digits, '_', '.' and '-'"
    if key == "mail_user" and not _SLURM_MAIL_USER_RE.match(text):
        return f"{text!r} is not a user name or mail address"
    if key == "output" and not _SLURM_PATH_RE.match(text):
        return f"{text!r} must be a path without spaces, quotes or backslashes"
    return None


def _yaml_line(path: str, keys: List[Any]) -> Optional[int]:
    """The line of the value at `keys` (str for mapping keys, int for list items) in a YAML file."""
    import yaml
    try:
        node = read_yaml(path).node
        for key in keys:
            if isinstance(key, int) and isinstance(node, yaml.SequenceNode):
                node = node.value[key]
            elif isinstance(node, yaml.MappingNode):
                node = next(v for k, v in node.value if k.value == key)
            else:
                return None
        return node.start_mark.line + 1
    except (UserError, StopIteration, IndexError):
        return None


def _slurm_option_where(batch: JobFile, job_index: Optional[int], key: str) -> str:
    """'file:line: key path' of a slurm option, found again in the YAML (the JobFile keeps no lines)."""
    keys: List[Any] = ["slurm", key] if job_index is None else [batch.flavour, "jobs", job_index, "slurm", key]
    label = ".".join(f"[{k}]" if isinstance(k, int) else k for k in keys).replace(".[", "[")
    line = _yaml_line(batch.path, keys) if os.path.isfile(batch.path) else None
    return f"{batch.path}:{line}: {label}" if line else f"{batch.path}: {label}"


def check_slurm_options(batch: JobFile) -> None:
    """Refuse, naming file, line and key, any slurm option that sbatch would refuse."""
    sources: List[Tuple[Optional[int], Optional[SlurmOptions]]] = [(None, batch.slurm)]
    sources += list(enumerate(job.slurm for job in batch.jobs))
    for job_index, options in sources:
        if options is None:
            continue
        for key, value in dataclasses.asdict(options).items():
            problem = None if value is None else slurm_option_problem(key, value)
            if problem:
                raise UserError(f"{_slurm_option_where(batch, job_index, key)}: {problem}")


def effective_slurm_options(batch: JobFile, job: Job) -> SlurmOptions:
    """The batch's slurm options with the job's own (non-null) overrides on top; the job's
    resources fill in --cpus-per-task, --mem, --gres=gpu:N and --time where no slurm option
    says otherwise (an explicit mem_per_cpu keeps --mem out: sbatch takes only one)."""
    merged = dataclasses.asdict(batch.slurm or SlurmOptions())
    overrides = dataclasses.asdict(job.slurm or SlurmOptions())
    merged.update({key: value for key, value in overrides.items() if value is not None})
    wanted = job.resources or Resources()
    if wanted.cpus and merged["cpus_per_task"] is None:
        merged["cpus_per_task"] = wanted.cpus
    if wanted.memory and merged["mem_per_cpu"] is None:
        merged["mem"] = f"{-(-wanted.memory // (1 << 20))}M"
    if wanted.gpus:
        merged["gres"] = f"gpu:{wanted.gpus}"
    if wanted.time and merged["time"] is None:
        merged["time"] = slurm_time(wanted.time)
    return SlurmOptions(**merged)


def slurm_time(seconds: int) -> str:
    """Seconds as Slurm's D-HH:MM:SS (or HH:MM:SS under a day)."""
    days, rest = divmod(int(seconds), 86400)
    clock_text = f"{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
    return f"{days}-{clock_text}" if days else clock_text


def slurm_after_note(batch: JobFile) -> Optional[str]:
    """One line on meta.after: Slurm cannot know another batch's job ids when this one is
    written, so submit.sh takes them from AFTER (the other batch's submitted.txt)."""
    if not batch.meta.after:
        return None
    return (f"meta.after ({', '.join(batch.meta.after)}) becomes a Slurm dependency only when you submit with "
            "AFTER=\"$(cat OTHER/submitted.txt)\" sh submit.sh (OTHER: the folder that batch was submitted from)")


def plan_slurm_arrays(batch: JobFile, max_array_size: int) -> List[SlurmArray]:
    """Group jobs by equal slurm options (in order of first use), then cut each group
    into arrays of at most max_array_size tasks (indices 0..size-1 < MaxArraySize)."""
    if max_array_size < 1:
        raise UserError(f"--max-array-size must be at least 1, not {max_array_size}")
    groups: Dict[Tuple[Any, ...], Tuple[SlurmOptions, List[Job]]] = {}
    for job in batch.jobs:
        options = effective_slurm_options(batch, job)
        key = dataclasses.astuple(options)
        groups.setdefault(key, (options, []))[1].append(job)
    arrays: List[SlurmArray] = []
    for options, jobs in groups.values():
        for start in range(0, len(jobs), max_array_size):
            arrays.append(SlurmArray(f"array-{len(arrays) + 1}.sbatch", options,
                                     jobs[start:start + max_array_size]))
    return arrays


def sbatch_lines(options: SlurmOptions, default_name: str, default_output: str) -> List[str]:
    """#SBATCH lines for the options that are set; sbatch parses these itself, no shell."""
    flags = [("job-name", options.job_name or default_name), ("output", options.output or default_output),
             ("nodes", options.nodes), ("ntasks", options.ntasks), ("cpus-per-task", options.cpus_per_task),
             ("mem-per-cpu", options.mem_per_cpu), ("hint", options.hint), ("time", options.time),
             ("partition", options.partition), ("account", options.account),
             ("mail-user", options.mail_user), ("mail-type", options.mail_type),
             ("mem", options.mem), ("gres", options.gres)]
    return [f"#SBATCH --{flag}={value}" for flag, value in flags if value is not None]


def _fill(template: str, **values: str) -> str:
    """Put already shell-safe values into a script template's @KEY@ slots."""
    for key, value in values.items():
        template = template.replace(f"@{key.upper()}@", value)
    return template


_RUN_TASK_SH = r'''#!/bin/sh
# One array task of @LABEL@, written by `distribute slurm`.  It runs the job named
# on line SLURM_ARRAY_TASK_ID+1 of the task list $1 in work/<job>/, a private copy
# of build/ (tasks run at the same time), and lands its results in
# results/<namespace>/<batch>/<job>/ exactly as our archive does.
set -u
namespace=@NAMESPACE@
batch=@BATCH@
base=${SLURM_SUBMIT_DIR:?"submit with submit.sh"}
cd "$base" || exit 1
line=$(sed -n "$((${SLURM_ARRAY_TASK_ID:?"not a Slurm array task"} + 1))p" "$1")
job=${line% *}
retries=${line##* }
if [ -z "$line" ] || [ ! -d "jobs/$job" ]; then
    echo "distribute: no job for array task $SLURM_ARRAY_TASK_ID in $1" >&2
    exit 1
fi
node=${SLURMD_NODENAME:-$(hostname -s)}
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
task=$base/work/$job
results=$base/results/$namespace/$batch
now() { date -u +%Y-%m-%dT%H:%M:%S.%3N+00:00; }
@CHECK@
# What the build made is shared through links; input/, distribute_save/ and job.py are the task's own.
rm -rf "$task"
mkdir -p "$task/.distribute" "$results"
for entry in "$base/build"/* "$base/build"/.[!.]* "$base/build"/..?*; do
    [ -e "$entry" ] || [ -L "$entry" ] || continue
    case ${entry##*/} in input|distribute_save|job.py|mounts|.distribute) continue ;; esac
    ln -s "$entry" "$task/${entry##*/}"
done

prepare() {
    rm -rf "$task/input" "$task/distribute_save" "$task/mounts"
    mkdir "$task/input" "$task/distribute_save"
@PREPARE@    cp -R "$base/jobs/$job/input/." "$task/input/"
}

run() {
    cd "$task" || exit 1
    export DISTRIBUTE_JOB="$job" DISTRIBUTE_BATCH="$batch" DISTRIBUTE_NAMESPACE="$namespace" \
        DISTRIBUTE_CPUS="$cpus" DISTRIBUTE_PROGRESS="$task/.distribute/progress-$job"
    exec $setsid @RUN@
}

# The job gets its own process group (setsid), so a kill reaches everything it started.
setsid=""
if command -v setsid > /dev/null 2>&1; then
    setsid=setsid
fi

# Slurm sends SIGTERM to this script at the time limit and on scancel: pass it on to the
# job, and keep what the job left, marked killed.
killed=""
trap 'killed=yes' TERM
start=$(now)
attempts=0
while :; do
    attempts=$((attempts + 1))
    prepare
    (run) > "$task/.distribute/stdout.txt" 2>&1 < /dev/null &
    child=$!
    [ -z "$killed" ] || kill -TERM "-$child" "$child" 2> /dev/null
    wait "$child"
    code=$?
    if [ -n "$killed" ]; then
        kill -TERM "-$child" "$child" 2> /dev/null
        wait "$child"
        code=$?
    fi
    if [ "$code" -eq 0 ] || [ "$attempts" -gt "$retries" ] || [ -n "$killed" ]; then
        break
    fi
done
end=$(now)
state=ok
[ "$code" -eq 0 ] || state=failed
[ -z "$killed" ] || state=killed

# Results appear complete or not at all: fill a hidden folder, then rename it into place.
stamp=${SLURM_JOB_ID:-$$}
incoming=$results/.incoming-$job-$stamp
rm -rf "$incoming"
mkdir "$incoming"
cp -a "$task/distribute_save/." "$incoming/"
cp "$task/.distribute/stdout.txt" "$incoming/stdout.txt"
sed -e "s/__distribute_node__/$node/" -e "s/__distribute_start__/$start/" \
    -e "s/__distribute_end__/$end/" -e "s/\"__distribute_exit_code__\"/$code/" \
    -e "s/\"__distribute_attempts__\"/$attempts/" -e "s/__distribute_state__/$state/" \
    "$base/jobs/$job/job.json.in" > "$incoming/job.json"
if [ -e "$results/$job" ]; then
    mv "$results/$job" "$results/.replaced-$job-$stamp"
    mv "$incoming" "$results/$job"
    rm -rf "$results/.replaced-$job-$stamp"
else
    mv "$incoming" "$results/$job"
fi
rm -rf "$task"
echo "distribute: $job: $state (exit code $code, $attempts attempt(s)) on $node"
exit "$code"
'''

_BUILD_SBATCH = r'''#!/bin/sh
@SBATCH@
# The build of @LABEL@, written by `distribute slurm`: runs once in build/, before
# the array tasks (they depend on it with afterok).  Its output lands in
# results/<namespace>/<batch>/build/<node>.txt as on our nodes.
set -u
base=${SLURM_SUBMIT_DIR:?"submit with submit.sh"}
node=${SLURMD_NODENAME:-$(hostname -s)}
logs=$base/results/@NAMESPACE@/@BATCH@/build
mkdir -p "$logs" "$base/build/input" "$base/build/distribute_save" "$base/build/.distribute"
cd "$base/build" || exit 1
export DISTRIBUTE_JOB=build DISTRIBUTE_BATCH=@BATCH@ DISTRIBUTE_NAMESPACE=@NAMESPACE@ \
    DISTRIBUTE_CPUS="${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}" \
    DISTRIBUTE_PROGRESS="$base/build/.distribute/progress-build"
@BUILD@ > .distribute/build.txt 2>&1 < /dev/null
code=$?
cp .distribute/build.txt "$logs/.$node.txt.tmp" && mv "$logs/.$node.txt.tmp" "$logs/$node.txt"
if [ "$code" -ne 0 ]; then
    echo "distribute: the build of @LABEL@ failed with exit code $code; its output is in $logs/$node.txt" >&2
fi
exit "$code"
'''

_ARRAY_SBATCH = r'''#!/bin/sh
@SBATCH@
# @LABEL@, written by `distribute slurm`: @COUNT@ job(s), one array task each;
# task i runs the job on line i+1 of @TASKS@.
exec /bin/sh "${SLURM_SUBMIT_DIR:?"submit with submit.sh"}/run-task.sh" @TASKS@
'''

_SUBMIT_SH = r'''#!/bin/sh
# Submit @LABEL@ to Slurm, written by `distribute slurm`.
# Run it on the cluster, from anywhere:  sh submit.sh
set -u
cd "$(dirname "$0")" || exit 1
if ! command -v sbatch > /dev/null 2>&1; then
    echo "submit.sh: sbatch is not on PATH: run this on a login node of the cluster" >&2
    exit 1
fi
mkdir -p logs @DIRS@
submitted=""
# AFTER="id id ..." (another batch's submitted.txt): start only once those Slurm jobs succeeded.
after=$(printf '%s' "${AFTER-}" | tr -s ' \n' '::' | sed 's/^://; s/:$//')
case "$after" in
    *[!0-9:_]*) echo "submit.sh: AFTER must be Slurm job ids, not $AFTER" >&2; exit 1 ;;
esac
first_after=""
[ -z "$after" ] || first_after="--dependency=afterok:$after"
# submit SCRIPT [SBATCH OPTIONS...]: sets $id, or stops with sbatch's reason.
submit() {
    script=$1
    shift
    if ! answer=$(sbatch --parsable "$@" "$script" 2> logs/sbatch-errors.txt); then
        echo "submit.sh: sbatch refused $script: $(tr '\n' ' ' < logs/sbatch-errors.txt)" >&2
        if [ -n "$submitted" ]; then
            echo "submit.sh: already submitted:$submitted; cancel them with: scancel$submitted" >&2
        fi
        exit 1
    fi
    cat logs/sbatch-errors.txt >&2
    id=$(printf '%s\n' "$answer" | tail -n 1)
    id=${id%%;*}
    submitted="$submitted $id"
    echo "$script: Slurm job $id"
}
@SUBMITS@
echo "$submitted" > submitted.txt
echo "submitted @LABEL@ (@COUNT@ job(s)); watch with: squeue -j $(echo $submitted | tr ' ' ,)"
'''

_UPLOAD_SH = r'''#!/bin/sh
# Copy this folder to the cluster (written by `distribute slurm`); then run submit.sh there.
set -eu
cd "$(dirname "$0")"
@MKDIR@
exec rsync -a --partial --exclude=/results/ --exclude=/work/ --exclude=/logs/ ./ @DEST@/
'''

_FETCH_SH = r'''#!/bin/sh
# Fetch the results of @LABEL@ from the cluster into our archive layout,
# <DIR>/<namespace>/<batch>/<job>/ (written by `distribute slurm`).  Usage: sh fetch.sh [DIR]
set -eu
dest=${1:-@SAVE_DIR@}
mkdir -p "$dest"
exec rsync -a --delay-updates --exclude='.incoming-*' --exclude='.replaced-*' @SOURCE@/results/ "$dest/"
'''


def _shell_list(values: Iterable[str]) -> str:
    return " ".join(shlex.quote(v) for v in values)


def slurm_job_command(batch: JobFile) -> str:
    """The shell line run-task.sh runs in the task's directory: SPEC §3's command for the flavour."""
    if batch.flavour == "python":
        return '"${DISTRIBUTE_PYTHON:-python3}" job.py'
    if batch.flavour == "shell":
        return '/bin/sh -c "$(cat "$base/jobs/$job/command.txt")"'
    binds = '"$task/distribute_save:/distribute_save:rw,$task/input:/input:rw'
    for index, mount in enumerate(batch.mounts):
        binds += f',$task/mounts/{index}:"{shlex.quote(mount)}":rw'
    binds += '"'
    if batch.flavour in CONTAINER_ENGINES:      # clusters have apptainer, which runs registry images
        return f'apptainer run --bind {binds} {shlex.quote("docker://" + (batch.image or ""))} "$cpus"'
    sif = shlex.quote(batch.build.alias if batch.build else "image.sif")
    return f'apptainer run --app distribute --bind {binds} "$task/"{sif} "$cpus"'


def slurm_build_command(batch: JobFile) -> Optional[str]:
    if batch.flavour == "python":
        return '"${DISTRIBUTE_PYTHON:-python3}" build.py'
    if batch.flavour == "shell" and batch.build_command:
        return '/bin/sh -c "$(cat "$base/build-command.txt")"'
    return None


def run_task_script(batch: JobFile) -> str:
    prepare = "".join(f'    cp "$base/build/initial_files/"{shlex.quote(f.alias)} "$task/input/"{shlex.quote(f.alias)}\n'
                      for f in batch.initial_files)
    prepare += "".join(f'    mkdir -p "$task/mounts/{i}"\n' for i, _ in enumerate(batch.mounts))
    if batch.flavour == "python":
        prepare += '    cp "$base/jobs/$job/job.py" "$task/job.py"\n'
    check = ""
    if batch.flavour in ("apptainer",) + CONTAINER_ENGINES:
        check = ('case $task in *[,:]*)\n'
                 '    echo "distribute: $task contains \',\' or \':\', which apptainer --bind cannot take" >&2\n'
                 '    exit 1 ;;\nesac\n')
    meta = batch.meta
    return _fill(_RUN_TASK_SH, label=f"{meta.namespace}/{meta.batch_name}",
                 namespace=shlex.quote(meta.namespace), batch=shlex.quote(meta.batch_name),
                 check=check, prepare=prepare, run=slurm_job_command(batch))


def build_sbatch_script(batch: JobFile, build_command: str) -> str:
    meta = batch.meta
    options = batch.slurm or SlurmOptions()
    lines = sbatch_lines(dataclasses.replace(options, output=None), f"{meta.batch_name}-build",
                         "logs/%x-%j.out")
    return _fill(_BUILD_SBATCH, sbatch="\n".join(lines), label=f"{meta.namespace}/{meta.batch_name}",
                 namespace=shlex.quote(meta.namespace), batch=shlex.quote(meta.batch_name),
                 build=build_command)


def array_sbatch_script(batch: JobFile, array: SlurmArray, throttle: Optional[int]) -> str:
    meta = batch.meta
    lines = sbatch_lines(array.options, meta.batch_name, "logs/%x-%A_%a.out")
    lines.insert(1, f"#SBATCH --array=0-{len(array.jobs) - 1}" + (f"%{throttle}" if throttle else ""))
    return _fill(_ARRAY_SBATCH, sbatch="\n".join(lines), label=f"{meta.namespace}/{meta.batch_name}",
                 count=str(len(array.jobs)), tasks=array.task_list)


def submit_script(batch: JobFile, arrays: List[SlurmArray], has_build: bool) -> str:
    meta = batch.meta
    dirs = [f"results/{meta.namespace}/{meta.batch_name}"]
    dirs += sorted({os.path.dirname(a.options.output) for a in arrays
                    if a.options.output and os.path.dirname(a.options.output)
                    and "%" not in os.path.dirname(a.options.output)})
    after = " $first_after"
    submits = []
    if has_build:
        submits += ["submit build.sbatch $first_after", "build=$id"]
        after = ' --dependency="afterok:$build" --kill-on-invalid-dep=yes'
    submits += [f"submit {a.script}{after}" for a in arrays]
    return _fill(_SUBMIT_SH, label=f"{meta.namespace}/{meta.batch_name}", dirs=_shell_list(dirs),
                 submits="\n".join(submits), count=str(len(batch.jobs)))


def cluster_target(batch: JobFile, outdir: Path, user: Optional[str], host: Optional[str],
                   directory: Optional[str]) -> ClusterTarget:
    """Check --cluster-user/--cluster-host/--cluster-dir; the default dir is the folder itself
    (no host: it already is on the cluster) or distribute-slurm/<ns>/<batch> in the remote home."""
    if user is not None and not _CLUSTER_USER_RE.match(user):
        raise UserError(f"--cluster-user {user!r} is not a user name")
    if user is not None and host is None:
        raise UserError("--cluster-user needs --cluster-host")
    if host is not None and (not _CLUSTER_HOST_RE.match(host) or host.startswith("-")):
        raise UserError(f"--cluster-host {host!r} is not a host name")
    if directory is None:
        directory = (f"distribute-slurm/{batch.meta.namespace}/{batch.meta.batch_name}" if host
                     else os.path.abspath(outdir))
    elif not _CLUSTER_DIR_RE.match(directory) or directory.startswith("-"):
        raise UserError(f"--cluster-dir {directory!r} must be a path of letters, digits and _ . / + @ - "
                        "(apptainer binds and rsync cannot take spaces, ':' or ',')")
    return ClusterTarget(directory=directory.rstrip("/") or "/", host=host, user=user)


def _copy_job_inputs(folder: Path, batch: JobFile) -> None:
    """build/ as SPEC §3 lays it out before the build, and jobs/<job>/ with the job's own files."""
    build = folder / "build"
    for sub in ("initial_files", "input", "distribute_save"):
        (build / sub).mkdir(parents=True)
    for spec in batch.initial_files:
        shutil.copyfile(spec.path, inside(build / "initial_files", spec.alias))
    if batch.build:
        shutil.copyfile(batch.build.path, inside(build, batch.build.alias))
    if batch.build_command:
        (folder / "build-command.txt").write_text(batch.build_command)
    plan = BatchPlan.of(batch)
    for job in batch.jobs:
        job_folder = inside(folder / "jobs", job.name)
        (job_folder / "input").mkdir(parents=True)
        for spec in job.required_files:
            shutil.copyfile(spec.path, inside(job_folder / "input", spec.alias))
        if job.file:
            shutil.copyfile(job.file.path, job_folder / "job.py")
        if job.command is not None:
            (job_folder / "command.txt").write_text(job.command)
        slots = {name: f"__distribute_{name}__" for name in _JSON_SLOTS}
        record = job_record(plan, JobPlan.of(job), slots["node"],
                            JobOutcome(job.name, 0, 0, 0.0, 0.0), slots["state"])
        record.update({name: slots[name] for name in ("start", "end", "exit_code", "attempts")})
        write_json(job_folder / "job.json.in", record)


def _make_cluster_dir(target: ClusterTarget) -> str:
    """The line of upload.sh that creates the folder first: rsync makes only the last level."""
    mkdir = f"mkdir -p -- {shlex.quote(target.directory)}"
    if target.ssh_destination:
        return f"ssh {shlex.quote(target.ssh_destination)} {shlex.quote(mkdir)}"
    return mkdir


def _write_script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def slurm_instructions(outdir: Path, target: ClusterTarget) -> List[str]:
    """The three commands a user runs: upload, submit, fetch."""
    folder = shlex.quote(str(outdir))
    remote = target.ssh_destination
    submit = (f"ssh {shlex.quote(remote)} {shlex.quote(f'sh {target.directory}/submit.sh')}" if remote
              else f"sh {shlex.quote(target.directory + '/submit.sh')}")
    return [f"upload:  sh {folder}/upload.sh", f"submit:  {submit}", f"fetch:   sh {folder}/fetch.sh"]


_SLURM_README = """\
@LABEL@ for Slurm, written by `distribute slurm`.

  1. upload:  sh upload.sh        (rsync this folder to @DEST@)
  2. submit:  sh submit.sh        (on the cluster; stops and says why if sbatch refuses a script)
  3. fetch:   sh fetch.sh [DIR]   (results into DIR/<namespace>/<batch>/<job>/, default @SAVE_DIR@)

build.sbatch (if present) runs the build once in build/; the array-N.sbatch job
arrays start after it succeeds.  Every array task runs one job in work/<job>/,
whose entries link to build/, with its own input/ (initial files + the job's
files) and distribute_save/, and lands distribute_save/, stdout.txt and job.json
in results/<namespace>/<batch>/<job>/.  Slurm's own logs go to logs/.
"""


def write_slurm_folder(batch: JobFile, outdir: Path, target: ClusterTarget, max_array_size: int,
                       throttle: Optional[int], save_dir: str) -> List[SlurmArray]:
    """Write the whole folder, or nothing: it is assembled beside outdir and renamed into place."""
    check_slurm_options(batch)
    if batch.flavour in CONTAINER_ENGINES and batch.build is not None:
        raise UserError(f"{batch.path}: slurm cannot run the image archive {batch.build.alias}: Slurm clusters "
                        f"run containers with apptainer, which takes registry images; push the image and give "
                        f"initialize.image as a reference, or build a .sif from it (`apptainer build image.sif "
                        f"docker-archive:{batch.build.alias}`) and use an apptainer: section")
    if throttle is not None and throttle < 1:
        raise UserError(f"--throttle must be at least 1, not {throttle}")
    arrays = plan_slurm_arrays(batch, max_array_size)
    outdir = Path(outdir)
    if outdir.exists() and (not outdir.is_dir() or any(outdir.iterdir())):
        raise UserError(f"{outdir} already exists and is not an empty folder; choose another OUTDIR")
    outdir.parent.mkdir(parents=True, exist_ok=True)
    meta = batch.meta
    label = f"{meta.namespace}/{meta.batch_name}"
    staging = Path(tempfile.mkdtemp(prefix=f".{outdir.name}-", dir=outdir.parent))
    try:
        _copy_job_inputs(staging, batch)
        build_command = slurm_build_command(batch)
        if build_command:
            _write_script(staging / "build.sbatch", build_sbatch_script(batch, build_command))
        (staging / "tasks").mkdir()
        for array in arrays:
            _write_script(staging / array.script, array_sbatch_script(batch, array, throttle))
            (staging / array.task_list).write_text("".join(f"{job.name} {job.retries}\n" for job in array.jobs))
        _write_script(staging / "run-task.sh", run_task_script(batch))
        _write_script(staging / "submit.sh", submit_script(batch, arrays, build_command is not None))
        source = shlex.quote(target.rsync_prefix + target.directory)
        _write_script(staging / "upload.sh", _fill(_UPLOAD_SH, dest=source, mkdir=_make_cluster_dir(target)))
        _write_script(staging / "fetch.sh", _fill(_FETCH_SH, label=label, source=source,
                                                  save_dir=shlex.quote(os.path.abspath(save_dir))))
        (staging / "README.txt").write_text(_fill(_SLURM_README, label=label, save_dir=os.path.abspath(save_dir),
                                                  dest=target.rsync_prefix + target.directory))
        staging.chmod(0o755)
        if outdir.exists():
            outdir.rmdir()
        os.rename(staging, outdir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return arrays


# ---------------------------------------------------------------------------
# 7. The head's store and scheduling
#
# SQLite (WAL) under the head's --state folder holds batches, jobs, attempts
# and builds: everything needed to carry on after a crash.  Scheduling is a set
# of pure functions over small snapshots of that state, tested on their own.
# ---------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL, owner TEXT NOT NULL,
    flavour TEXT NOT NULL, plan TEXT NOT NULL, capabilities TEXT NOT NULL, matrix TEXT,
    created REAL NOT NULL, finished REAL, state TEXT NOT NULL DEFAULT 'active');
CREATE UNIQUE INDEX IF NOT EXISTS batch_name ON batches(namespace, name) WHERE state != 'replaced';
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY, batch_id INTEGER NOT NULL REFERENCES batches(id), idx INTEGER NOT NULL,
    name TEXT NOT NULL, plan TEXT NOT NULL, retries INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0, run_id TEXT,
    node TEXT, started REAL, ended REAL, exit_code INTEGER, progress REAL, slot INTEGER);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(batch_id, state, idx);
CREATE INDEX IF NOT EXISTS jobs_running ON jobs(state) WHERE state = 'running';
CREATE TABLE IF NOT EXISTS builds (
    batch_id INTEGER NOT NULL, node TEXT NOT NULL, state TEXT NOT NULL, PRIMARY KEY (batch_id, node));
"""

JOB_STATES = ("queued", "running", "done", "failed", "killed")


@record
class BatchRow:
    id: int
    namespace: str
    name: str
    owner: str
    flavour: str
    plan: BatchPlan
    capabilities: List[str]
    matrix: Optional[str]
    created: float
    state: str
    finished: Optional[float] = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@record
class JobRow:
    id: int
    batch_id: int
    name: str
    plan: JobPlan
    retries: int
    state: str
    attempts: int
    run_id: Optional[str]
    node: Optional[str]
    started: Optional[float]
    ended: Optional[float]
    exit_code: Optional[int]
    progress: Optional[float]
    slot: Optional[int]
    reason: Optional[str] = None        # why it failed or was killed, for `why`
    gpus: Optional[List[int]] = None    # the GPU indices a running job holds on its node (never shared)
    starts: int = 0                     # times it was started, ever: run ids are "<job id>.<start>"


@record
class BuildRow:
    batch_id: int
    node: str
    state: str                      # running | ok | failed | backoff (waiting to try again)
    slot: Optional[int] = None      # the slot a running build holds
    tries: int = 0                  # failures in a row (build could not start, jobs could not start)
    reason: Optional[str] = None
    retry_at: Optional[float] = None


# The schema has a version (SQLite's user_version).  Release 0.1.0 wrote no version
# (0); each step below upgrades a store by one version, in one transaction, so a
# lab's state folder from any earlier release opens under this one.  A store from
# a newer release is refused rather than guessed at.
SCHEMA_VERSION = 6
MIGRATIONS = {
    1: SCHEMA,          # 0.1.0 made these tables without a version: IF NOT EXISTS adopts them
    2: """
CREATE TABLE spans (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL, node TEXT NOT NULL, started REAL NOT NULL, ended REAL,
    state TEXT NOT NULL, batch_id INTEGER, job_id INTEGER, job TEXT NOT NULL DEFAULT '',
    attempt INTEGER NOT NULL DEFAULT 0, exit_code INTEGER, users TEXT NOT NULL DEFAULT '[]');
CREATE INDEX spans_by_batch ON spans(batch_id, kind);
CREATE INDEX spans_open ON spans(kind, node) WHERE ended IS NULL;
""",                # every attempt, build and pause, for `report` after a restart too
    3: """
CREATE TABLE nodes (name TEXT PRIMARY KEY, facts TEXT NOT NULL, seen REAL NOT NULL);
""",                # what each node reported when it was last up (capabilities, cores, version...)
    4: """
ALTER TABLE jobs ADD COLUMN reason TEXT;
ALTER TABLE jobs ADD COLUMN gpus TEXT;
ALTER TABLE builds ADD COLUMN slot INTEGER;
ALTER TABLE builds ADD COLUMN tries INTEGER NOT NULL DEFAULT 0;
ALTER TABLE builds ADD COLUMN reason TEXT;
ALTER TABLE builds ADD COLUMN retry_at REAL;
CREATE INDEX IF NOT EXISTS jobs_stopped ON jobs(batch_id) WHERE reason IS NOT NULL;
ALTER TABLE spans ADD COLUMN reason TEXT;
""",                # why a job failed or was stopped (`why`, a limit); a running job's GPU indices;
                    # a build's slot, failures in a row, back-off
    5: """
CREATE TABLE id_floor (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
""",                # ids never come back after `forget` (a stale run id must never name a new job)
    6: """
ALTER TABLE jobs ADD COLUMN starts INTEGER NOT NULL DEFAULT 0;
UPDATE jobs SET starts = max(attempts, coalesce(CAST(substr(run_id, instr(run_id, '.') + 1) AS INTEGER), 0));
""",                # every start of a job has its own run id, also after `retry` counted attempts afresh
}


def migrate_store(db, path: Path) -> None:
    """Bring the store at `path` up to SCHEMA_VERSION (one transaction per step)."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise Failed(f"{path} was written by a newer release of distribute (store version {version}, "
                     f"this one knows up to {SCHEMA_VERSION}): run that release, or a new state folder")
    for step in range(version + 1, SCHEMA_VERSION + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[step].split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version={step}")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        if version:
            log(f"head: store {path} upgraded to version {step}")


@record
class TimelineSpan:
    """One job attempt, build or pause on one node, as `report` draws it."""
    kind: str                        # "job", "build" or "pause"
    node: str
    start: float
    end: Optional[float] = None      # None: still going
    state: str = "running"           # job: ok/failed/killed/running; build: ok/failed/running; pause: paused
    batch_id: Optional[int] = None   # None for pauses: they belong to the node
    job_id: Optional[int] = None
    job: str = ""
    attempt: int = 0
    exit_code: Optional[int] = None
    users: List[str] = field(default_factory=list)
    id: Optional[int] = None
    reason: Optional[str] = None     # why a job was stopped (a memory or time limit)


class Store:
    """The head's database.  One connection, used from the event loop only.  Every SQL
    statement of the head is here; rows are read by column name.

    WAL with synchronous=NORMAL.  NORMAL may lose the last commits in a power cut (never
    corrupt the store): a lost claim only means a job is queued again, and the node's
    stale copy is stopped when it reconnects.  Before a node is told to delete a result,
    DurableAcks flushes the store's file system with the archive's, so a result both
    sides consider archived is on disk on the head (one flush for all results landed
    together, off the event loop: an fsync per commit cost the loop milliseconds a job)."""

    def __init__(self, path: Path):
        import sqlite3
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        migrate_store(self.db, path)
        self._plans: Dict[int, BatchPlan] = {}                  # plans never change: decoded once

    def transaction(self):
        """BEGIN ... COMMIT (ROLLBACK on an exception)."""
        return _Transaction(self.db)

    def schema_version(self) -> int:
        return self.db.execute("PRAGMA user_version").fetchone()[0]

    # batches
    def add_batch(self, namespace: str, name: str, owner: str, plan: BatchPlan, capabilities: List[str],
                  matrix: Optional[str], jobs: List[Tuple[JobPlan, int]]) -> int:
        with self.transaction():
            batch_id = self._next_id("batches")
            self.db.execute(
                "INSERT INTO batches (id, namespace, name, owner, flavour, plan, capabilities, matrix, created)"
                " VALUES (?,?,?,?,?,?,?,?,?)",
                (batch_id, namespace, name, owner, plan.flavour, json.dumps(dataclasses.asdict(plan)),
                 json.dumps(capabilities), matrix, time.time()))
            first = self._next_id("jobs")
            self.db.executemany(
                "INSERT INTO jobs (id, batch_id, idx, name, plan, retries) VALUES (?,?,?,?,?,?)",
                ((first + i, batch_id, i, job.name, json.dumps(vars(job)), retries)    # JobPlan is flat: vars() is 3x faster than asdict()
                 for i, (job, retries) in enumerate(jobs)))
        return batch_id

    def _next_id(self, table: str) -> int:
        """The next id of `batches` or `jobs`: past every id ever used, forgotten ones too."""
        assert table in ("batches", "jobs")
        used = self.db.execute(f"SELECT MAX(id) FROM {table}").fetchone()[0] or 0
        floor = self.db.execute("SELECT value FROM id_floor WHERE name=?", (table,)).fetchone()
        return max(used, floor[0] if floor else 0) + 1

    def _batch(self, row) -> BatchRow:
        plan = self._plans.get(row["id"])
        if plan is None:
            plan = self._plans[row["id"]] = BatchPlan(**json.loads(row["plan"]))
        return BatchRow(row["id"], row["namespace"], row["name"], row["owner"], row["flavour"], plan,
                        json.loads(row["capabilities"]), row["matrix"], row["created"], row["state"],
                        row["finished"])

    def batch(self, batch_id: int) -> Optional[BatchRow]:
        row = self.db.execute("SELECT * FROM batches WHERE id=?", (batch_id,)).fetchone()
        return self._batch(row) if row else None

    def find_batch(self, namespace: Optional[str], name: str) -> Optional[BatchRow]:
        sql = "SELECT * FROM batches WHERE name=? AND state != 'replaced'"
        args: Tuple = (name,)
        if namespace:
            sql, args = sql + " AND namespace=?", (name, namespace)
        rows = self.db.execute(sql + " ORDER BY id DESC", args).fetchall()
        if len(rows) > 1:
            raise UserError(f"batch name {name!r} exists in several namespaces: write NAMESPACE/{name}")
        return self._batch(rows[0]) if rows else None

    def namespace_owner(self, namespace: str) -> Optional[str]:
        """Who started the first batch still known in `namespace` (None: nobody)."""
        row = self.db.execute("SELECT owner FROM batches WHERE namespace=? ORDER BY id LIMIT 1",
                              (namespace,)).fetchone()
        return row["owner"] if row else None

    def active_batches(self) -> List[BatchRow]:
        rows = self.db.execute("SELECT * FROM batches WHERE state='active' ORDER BY created, id").fetchall()
        return [self._batch(r) for r in rows]

    def status_rows(self, limit: int = 10000) -> List[Tuple[int, str, str, str, str, float, Optional[float],
                                                            Dict[str, int]]]:
        """(id, namespace, name, owner, state, created, finished, {job state: count}) of the
        latest batches, oldest first: no plan decoding, and counts only from the first listed
        batch on.  Two queries that walk the jobs_by_state index in its own order: a single
        JOIN ... GROUP BY needs a temporary B-tree and is 5x slower at 100k jobs."""
        rows = [tuple(r) for r in self.db.execute(
            "SELECT id, namespace, name, owner, state, created, finished FROM batches"
            " WHERE state != 'replaced' ORDER BY id DESC LIMIT ?", (limit,)).fetchall()]
        rows.reverse()
        counts: Dict[int, Dict[str, int]] = {}
        if rows:
            for batch_id, state, count in self.db.execute(
                    "SELECT batch_id, state, COUNT(*) FROM jobs WHERE batch_id >= ? GROUP BY batch_id, state",
                    (rows[0][0],)):
                counts.setdefault(batch_id, {})[state] = count
        return [row + (counts.get(row[0], {}),) for row in rows]

    def set_batch_state(self, batch_id: int, state: str) -> None:
        self.db.execute("UPDATE batches SET state=?, finished=? WHERE id=?",
                        (state, time.time() if state != "active" else None, batch_id))

    def batch_counts(self, batch_id: int) -> Dict[str, int]:
        return {row[0]: row[1] for row in self.db.execute(
            "SELECT state, COUNT(*) FROM jobs WHERE batch_id=? GROUP BY state", (batch_id,))}

    def has_jobs_in(self, batch_id: int, state: str, node: Optional[str] = None) -> bool:
        """Whether any job of the batch is in `state` (on `node`): one index probe, whatever the size."""
        sql, args = "SELECT 1 FROM jobs WHERE batch_id=? AND state=?", (batch_id, state)
        if node is not None:
            sql, args = sql + " AND node=?", args + (node,)
        return self.db.execute(sql + " LIMIT 1", args).fetchone() is not None

    # jobs
    def _job(self, row) -> JobRow:
        return JobRow(row["id"], row["batch_id"], row["name"], JobPlan(**json.loads(row["plan"])), row["retries"],
                      row["state"], row["attempts"], row["run_id"], row["node"], row["started"], row["ended"],
                      row["exit_code"], row["progress"], row["slot"], row["reason"],
                      json.loads(row["gpus"]) if row["gpus"] else None, row["starts"])

    def job(self, job_id: int) -> Optional[JobRow]:
        row = self.db.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def job_by_name(self, batch_id: int, name: str) -> Optional[JobRow]:
        row = self.db.execute("SELECT * FROM jobs WHERE batch_id=? AND name=?", (batch_id, name)).fetchone()
        return self._job(row) if row else None

    def jobs(self, batch_id: int, state: Optional[str] = None) -> List[JobRow]:
        if state:
            rows = self.db.execute("SELECT * FROM jobs WHERE batch_id=? AND state=? ORDER BY idx",
                                   (batch_id, state))
        else:
            rows = self.db.execute("SELECT * FROM jobs WHERE batch_id=? ORDER BY idx", (batch_id,))
        return [self._job(r) for r in rows]

    def next_queued(self, batch_id: int) -> Optional[JobRow]:
        row = self.db.execute("SELECT * FROM jobs WHERE batch_id=? AND state='queued' ORDER BY idx LIMIT 1",
                              (batch_id,)).fetchone()
        return self._job(row) if row else None

    def running_batches(self) -> List[Tuple[str, int]]:
        """(node, batch id) of the running jobs, each pair once (no rows decoded)."""
        return [(node or "", batch_id) for node, batch_id in
                self.db.execute("SELECT DISTINCT node, batch_id FROM jobs WHERE state='running'")]

    def running_jobs(self, node: Optional[str] = None) -> List[JobRow]:
        if node is None:
            return [self._job(r) for r in self.db.execute("SELECT * FROM jobs WHERE state='running'")]
        return [self._job(r) for r in self.db.execute("SELECT * FROM jobs WHERE state='running' AND node=?",
                                                      (node,))]

    def mark_started(self, job_id: int, run_id: str, node: str, slot: int,
                     gpus: Optional[List[int]] = None) -> None:
        self.db.execute("UPDATE jobs SET state='running', run_id=?, node=?, slot=?, started=?, ended=NULL,"
                        " exit_code=NULL, progress=NULL, reason=NULL, gpus=?, attempts=attempts+1,"
                        " starts=starts+1 WHERE id=?",
                        (run_id, node, slot, time.time(), json.dumps(gpus) if gpus else None, job_id))

    def set_gpus(self, job_id: int, gpus: Optional[List[int]]) -> None:
        """A running job's GPU indices, as its node's run record says (adopted after a reconnection)."""
        self.db.execute("UPDATE jobs SET gpus=? WHERE id=?", (json.dumps(gpus) if gpus else None, job_id))

    def mark_ended(self, job_id: int, state: str, exit_code: Optional[int], reason: Optional[str] = None) -> None:
        self.db.execute("UPDATE jobs SET state=?, exit_code=?, ended=?, reason=? WHERE id=?",
                        (state, exit_code, time.time(), reason, job_id))

    def requeue(self, job_id: int, count_attempt: bool) -> None:
        """Back to the queue; the slot it held is free (slots are derived from running jobs)."""
        self.db.execute("UPDATE jobs SET state='queued', run_id=NULL, node=NULL, slot=NULL,"
                        " attempts=attempts - ? WHERE id=?", (0 if count_attempt else 1, job_id))

    def end_queued(self, batch_id: int, state: str, reason: Optional[str] = None) -> int:
        return self.db.execute("UPDATE jobs SET state=?, ended=?, reason=? WHERE batch_id=? AND state='queued'",
                               (state, time.time(), reason, batch_id)).rowcount

    def queue_again(self, batch_id: int, states: Iterable[str]) -> int:
        """`retry`: jobs in `states` are queued again with their attempts counted afresh."""
        marks = ",".join("?" * len(tuple(states)))
        return self.db.execute(
            f"UPDATE jobs SET state='queued', run_id=NULL, node=NULL, slot=NULL, exit_code=NULL, reason=NULL,"
            f" attempts=0 WHERE batch_id=? AND state IN ({marks})", (batch_id,) + tuple(states)).rowcount

    def set_reason(self, job_id: int, reason: Optional[str]) -> None:
        self.db.execute("UPDATE jobs SET reason=? WHERE id=?", (reason, job_id))

    def reasons(self, batch_ids: Iterable[int]) -> List[Tuple[int, str, str]]:
        """(batch id, job name, reason) of the jobs of these batches stopped for a reason (a limit,
        a lost node; not a plain `kill`, whose reason is "killed")."""
        ids = list(batch_ids)
        if not ids:
            return []
        return self.db.execute("SELECT batch_id, name, reason FROM jobs WHERE state='killed' AND reason IS NOT NULL"
                               " AND reason != 'killed' AND batch_id >= ? ORDER BY batch_id, idx",
                               (min(ids),)).fetchall()

    def set_progress(self, job_id: int, progress: Optional[float]) -> None:
        self.db.execute("UPDATE jobs SET progress=? WHERE id=?", (progress, job_id))

    # timeline spans
    def add_span(self, span: TimelineSpan) -> None:
        span.id = self.db.execute(
            "INSERT INTO spans (kind, node, started, ended, state, batch_id, job_id, job, attempt, exit_code,"
            " users, reason) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            (span.kind, span.node, span.start, span.end, span.state, span.batch_id, span.job_id, span.job,
             span.attempt, span.exit_code, json.dumps(span.users), span.reason)).lastrowid

    def update_span(self, span: TimelineSpan) -> None:
        self.db.execute("UPDATE spans SET ended=?, state=?, users=? WHERE id=?",
                        (span.end, span.state, json.dumps(span.users), span.id))

    def _span(self, row) -> TimelineSpan:
        (id_, kind, node, started, ended, state, batch_id, job_id, job, attempt, exit_code, users) = row[:12]
        return TimelineSpan(kind, node, started, ended, state, batch_id, job_id, job, attempt, exit_code,
                            json.loads(users), id_, row[12] if len(row) > 12 else None)

    def open_span(self, kind: str, node: str, batch_id: Optional[int]) -> Optional[TimelineSpan]:
        row = self.db.execute("SELECT * FROM spans WHERE kind=? AND node=? AND batch_id IS ? AND ended IS NULL"
                              " ORDER BY id DESC LIMIT 1", (kind, node, batch_id)).fetchone()
        return self._span(row) if row else None

    def batch_spans(self, batch_id: int) -> List[TimelineSpan]:
        return [self._span(r) for r in self.db.execute("SELECT * FROM spans WHERE batch_id=? ORDER BY id",
                                                       (batch_id,))]

    def pause_spans(self, nodes: Iterable[str], first: float, last: float) -> List[TimelineSpan]:
        """Pauses on these nodes that overlap [first, last] (open ones count as going on)."""
        nodes = list(nodes)
        if not nodes:
            return []
        marks = ",".join("?" * len(nodes))
        rows = self.db.execute(f"SELECT * FROM spans WHERE kind='pause' AND node IN ({marks}) AND started <= ?"
                               " AND (ended IS NULL OR ended >= ?) ORDER BY id", (*nodes, last, first))
        return [self._span(r) for r in rows]

    # what nodes reported
    def remember_node(self, name: str, facts: Dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO nodes (name, facts, seen) VALUES (?,?,?)",
                        (name, json.dumps(facts), time.time()))

    def known_nodes(self) -> Dict[str, Dict[str, Any]]:
        return {name: json.loads(facts) for name, facts in self.db.execute("SELECT name, facts FROM nodes")}


    # builds: one row per (batch, node) the node has been asked to build
    def builds(self, batch_id: Optional[int] = None, node: Optional[str] = None) -> List[BuildRow]:
        sql, args = "SELECT * FROM builds WHERE 1=1", ()      # type: Tuple
        if batch_id is not None:
            sql, args = sql + " AND batch_id=?", args + (batch_id,)
        if node is not None:
            sql, args = sql + " AND node=?", args + (node,)
        return [BuildRow(r["batch_id"], r["node"], r["state"], r["slot"], r["tries"], r["reason"], r["retry_at"])
                for r in self.db.execute(sql, args)]

    def build(self, batch_id: int, node: str) -> Optional[BuildRow]:
        found = self.builds(batch_id, node)
        return found[0] if found else None

    def put_build(self, build: BuildRow) -> None:
        self.db.execute("INSERT OR REPLACE INTO builds (batch_id, node, state, slot, tries, reason, retry_at)"
                        " VALUES (?,?,?,?,?,?,?)", (build.batch_id, build.node, build.state, build.slot,
                                                    build.tries, build.reason, build.retry_at))

    def drop_builds(self, batch_id: Optional[int] = None, node: Optional[str] = None,
                    keep_failed: bool = False) -> None:
        sql, args = "DELETE FROM builds WHERE 1=1", ()      # type: Tuple
        if batch_id is not None:
            sql, args = sql + " AND batch_id=?", args + (batch_id,)
        if node is not None:
            sql, args = sql + " AND node=?", args + (node,)
        if keep_failed:
            sql += " AND state != 'failed'"
        self.db.execute(sql, args)

    def busy_slots(self, node: str) -> Dict[int, str]:
        """slot -> run id or "build:<batch id>": what holds each busy slot of a node, from the
        running jobs and builds (so a slot is freed by whatever ends the job or build)."""
        held = {row["slot"] or 0: row["run_id"] or "" for row in self.db.execute(
            "SELECT slot, run_id FROM jobs WHERE state='running' AND node=?", (node,))}
        for row in self.db.execute("SELECT slot, batch_id FROM builds WHERE node=? AND state='running'", (node,)):
            held[row["slot"] or 0] = f"build:{row['batch_id']}"
        return held

    # forget and du
    def forget_batch(self, namespace: str, name: str) -> int:
        """Delete every record of NAMESPACE/NAME (replaced runs of it too); returns how many jobs."""
        with self.transaction():
            ids = [r[0] for r in self.db.execute("SELECT id FROM batches WHERE namespace=? AND name=?",
                                                 (namespace, name))]
            for table in ("batches", "jobs"):       # ids of what goes are never handed out again
                self.db.execute("INSERT OR REPLACE INTO id_floor (name, value) VALUES (?, ?)",
                                (table, self._next_id(table) - 1))
            for batch_id in ids:
                self._plans.pop(batch_id, None)
            jobs = 0
            for batch_id in ids:
                jobs += self.db.execute("DELETE FROM jobs WHERE batch_id=?", (batch_id,)).rowcount
                self.db.execute("DELETE FROM builds WHERE batch_id=?", (batch_id,))
                self.db.execute("DELETE FROM spans WHERE batch_id=?", (batch_id,))
                self.db.execute("DELETE FROM batches WHERE id=?", (batch_id,))
        return jobs

    def batch_owners(self) -> Dict[Tuple[str, str], Tuple[str, str]]:
        """{(namespace, name): (owner, state)} of every batch that was not replaced."""
        return {(ns, name): (owner, state) for ns, name, owner, state in self.db.execute(
            "SELECT namespace, name, owner, state FROM batches WHERE state != 'replaced' ORDER BY id")}


class _Transaction:
    """BEGIN ... COMMIT; inside another transaction a savepoint of it (its changes commit with
    the outer one, or are undone alone when it raises)."""

    def __init__(self, db):
        self.db = db
        self.nested = False

    def __enter__(self):
        self.nested = self.db.in_transaction
        self.db.execute("SAVEPOINT nested" if self.nested else "BEGIN")

    def __exit__(self, kind, *_):
        if not self.nested:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")
            return
        if kind is not None:
            self.db.execute("ROLLBACK TO nested")
        self.db.execute("RELEASE nested")


# Scheduling: which batch a node with a free slot should take next.

@record
class Amount:
    """Cores, bytes of memory and GPUs: a node's capacity, a job's request, what is in use."""
    cpus: int = 0
    memory: int = 0
    gpus: int = 0

    def plus(self, other: "Amount") -> "Amount":
        return Amount(self.cpus + other.cpus, self.memory + other.memory, self.gpus + other.gpus)

    def minus(self, other: "Amount") -> "Amount":
        return Amount(self.cpus - other.cpus, self.memory - other.memory, self.gpus - other.gpus)


@record
class Allocation:
    """What one running job holds on a node: its request, its GPU indices, when its time is up."""
    request: Amount
    gpus: List[int] = field(default_factory=list)
    ends: Optional[float] = None        # start + time limit (None: no limit, end unknown)


@record
class NodeView:
    name: str
    capabilities: List[str]
    gpus: int
    free_slots: int
    paused: bool = False
    reachable: bool = True
    upgrading: bool = False          # its supervisor is another build: it finishes, then is replaced
    capacity: Optional[Amount] = None   # None: not known yet (never connected)
    used: Amount = field(default_factory=Amount)
    jobs: int = 0                       # jobs and builds running there
    slots: int = 1
    slots_cap: Optional[int] = None     # `slots` written in the nodes file: caps jobs with resources too
    running: List[Allocation] = field(default_factory=list)

    @property
    def free(self) -> Amount:
        return (self.capacity or Amount()).minus(self.used)


@record
class BatchView:
    id: int
    owner: str
    created: float
    capabilities: List[str]
    queued: int
    built_on: List[str] = field(default_factory=list)     # nodes where the build succeeded
    failed_on: List[str] = field(default_factory=list)    # nodes where the build failed
    request: Optional[Amount] = None    # the next queued job's resources (None: it asked none, takes a slot)
    time: int = 0                       # the next queued job's time limit (0: none)
    waiting: Optional[str] = None       # why it may not start yet (meta.after)

    @property
    def needs_gpu(self) -> bool:
        return "gpu" in self.capabilities or (self.request is not None and self.request.gpus > 0)


def missing_capabilities(needed: Iterable[str], offered: Iterable[str]) -> List[str]:
    offered = set(offered)
    return [cap for cap in needed if cap not in offered]


def nodes_for_capabilities(needed: Iterable[str], offers: Dict[str, Tuple[List[str], bool]],
                           probeable: Iterable[str]) -> Tuple[List[str], List[str]]:
    """Which nodes could run a batch needing `needed`.  `offers` maps each node to (what it
    offers as far as the head knows: declared, plus probed now or when last up; whether it
    has ever reported).  Returns (nodes known to offer everything, nodes never seen yet
    whose probe could still add what they lack: only `probeable` capabilities can)."""
    needed = list(needed)
    probeable = set(probeable)
    known, maybe = [], []
    for name, (offered, seen) in offers.items():
        missing = missing_capabilities(needed, offered)
        if not missing:
            known.append(name)
        elif not seen and set(missing) <= probeable:
            maybe.append(name)
    return known, maybe


def why_not(node: NodeView, batch: BatchView) -> Optional[str]:
    """Why `node` cannot take a job of `batch` right now (None: it can)."""
    if not node.reachable:
        return "unreachable"
    missing = missing_capabilities(batch.capabilities, node.capabilities)
    if missing:
        return f"lacks {', '.join(missing)}"
    if node.name in batch.failed_on:
        return "the batch's build failed there"
    if batch.waiting:
        return batch.waiting
    request = batch_request(node, batch)
    if node.capacity is not None and request is not None:
        short = shortfall(request, node.capacity)
        if short:
            return short
    if node.paused:
        return "paused"
    if node.upgrading:
        return "its supervisor is being upgraded (after its running jobs end)"
    if batch.request is None and node.free_slots <= 0:
        return "busy"
    if batch.request is not None and node.slots_cap is not None and node.jobs >= node.slots_cap:
        return f"busy: {node.jobs} of {node.slots_cap} slots in use"
    if node.capacity is not None and request is not None and not fits(request, node.free):
        return in_use(request, node.used, node.capacity)
    return None


def pick_batch(node: NodeView, batches: List[BatchView], last_owner: Optional[str]) -> Optional[BatchView]:
    """SPEC §6 order: on a GPU node, batches that need a GPU first; then the next owner in
    round-robin order after `last_owner`; within that owner a batch already built on this
    node, else the oldest.  Fairness across owners comes before build reuse, so one
    person's long sweep never starves another's few jobs (builds are kept per node until
    the node is done with a batch, so switching batches does not repeat them)."""
    eligible = [b for b in batches if b.queued > 0 and why_not(node, b) is None]
    if not eligible:
        return None
    if node.gpus > 0 and any(b.needs_gpu for b in eligible):
        eligible = [b for b in eligible if b.needs_gpu]
    owners = sorted({b.owner for b in eligible})
    later = [o for o in owners if last_owner is not None and o > last_owner]
    owner = later[0] if later else owners[0]
    mine = [b for b in eligible if b.owner == owner]
    built = [b for b in mine if node.name in b.built_on]
    return min(built or mine, key=lambda b: (b.created, b.id))


# Resources (SPEC §6 "Resources").  A node's capacity is what it has (probed, or written in
# the nodes file) minus what it keeps for its owner (`reserve`).  A job with `resources`
# asks for its cpus, memory and gpus; a job without asks for its slot's share of the node
# (cpus // slots, gpus // slots), so with no resources anywhere `slots` work as before and
# the two kinds share a node without oversubscribing it.  Jobs start only where their
# request fits in what is free, so the running requests never exceed the capacity.

def node_capacity(probed: Dict[str, Any], spec: NodeSpec) -> Amount:
    """Probed cores, memory and GPUs, or the nodes file's overrides, minus its reserve."""
    have = Amount(spec.cpus if spec.cpus is not None else int(probed.get("cpus") or 1),
                  spec.memory if spec.memory is not None else int(probed.get("memory") or 0),
                  spec.gpus if spec.gpus is not None else int(probed.get("gpus") or 0))
    keep = spec.reserve or Resources()
    return Amount(max(0, have.cpus - (keep.cpus or 0)), max(0, have.memory - (keep.memory or 0)),
                  max(0, have.gpus - (keep.gpus or 0)))


def job_request(plan: JobPlan) -> Optional[Amount]:
    """What a job with resources asks for; None for a job without (it takes a slot)."""
    return Amount(plan.cpus, plan.memory, plan.gpus) if plan.cpus else None


def slot_share(capacity: Amount, slots: int) -> Amount:
    """What a job without resources holds: its slot's share of the node."""
    slots = max(1, slots)     # (fewer cores than slots: a share of 0, so slots alone decide, as before)
    return Amount(capacity.cpus // slots, 0, capacity.gpus // slots)


def batch_request(node: NodeView, batch: BatchView) -> Optional[Amount]:
    if batch.request is not None:
        return batch.request
    return slot_share(node.capacity, node.slots) if node.capacity is not None else None


def fits(request: Amount, free: Amount) -> bool:
    return request.cpus <= free.cpus and request.memory <= free.memory and request.gpus <= free.gpus


def _amounts(amount: Amount) -> List[Tuple[str, int, str]]:
    return [("cpus", amount.cpus, str(amount.cpus)), ("memory", amount.memory, format_size(amount.memory)),
            ("gpus", amount.gpus, str(amount.gpus))]


def shortfall(request: Amount, capacity: Amount) -> Optional[str]:
    """'needs 32 cpus, has 16' for what the node can never give the job (None: it fits an empty node)."""
    parts = [f"needs {text} {'memory' if key == 'memory' else key}, has {have_text}"
             for (key, want, text), (_, have, have_text) in zip(_amounts(request), _amounts(capacity))
             if want > have]
    return "; ".join(parts) or None


def in_use(request: Amount, used: Amount, capacity: Amount) -> str:
    """'24 of 32 cpus in use' for each resource too short for `request` now."""
    parts = []
    for (key, want, _), (_, busy, busy_text), (_, have, have_text) in zip(
            _amounts(request), _amounts(used), _amounts(capacity)):
        if want > have - busy:
            what = "memory" if key == "memory" else key
            parts.append(f"{busy_text} of {have_text} {what} in use (needs {format_size(want) if key == 'memory' else want})")
    return "; ".join(parts) or "busy"


def assign_gpus(count: int, taken: Iterable[int], total: int) -> Optional[List[int]]:
    """The lowest `count` GPU indices nobody holds (None: not enough free).  Never shared."""
    held = set(taken)
    free = [index for index in range(total) if index not in held]
    return free[:count] if len(free) >= count else None


def fit_problem(requests: Iterable[Tuple[str, Amount]], nodes: Dict[str, Optional[Amount]]) -> Optional[str]:
    """None when each job fits some node's capacity (or a node's capacity is unknown yet);
    else one line: the first job no node could ever fit, and the shortfall on each node."""
    if not nodes or any(capacity is None for capacity in nodes.values()):
        return None
    seen = set()
    for name, request in requests:
        key = dataclasses.astuple(request)
        if key in seen:
            continue
        seen.add(key)
        if any(fits(request, capacity) for capacity in nodes.values()):
            continue
        return (f"job {name} fits no node: " +
                "; ".join(f"{node} {shortfall(request, capacity)}" for node, capacity in nodes.items()))
    return None


def room_at(node: NodeView, request: Amount, now: float) -> Optional[float]:
    """When enough running jobs will have ended, by their time limits, for `request` to fit
    (now if it fits already; None when that depends on a job without a time limit)."""
    free = node.free
    if fits(request, free):
        return now
    for job in sorted(node.running, key=lambda a: float("inf") if a.ends is None else a.ends):
        if job.ends is None:
            return None
        free = free.plus(job.request)
        if fits(request, free):
            return max(now, job.ends)
    return None


def pick_for_node(node: NodeView, batches: List[BatchView], last_owner: Optional[str],
                  held: Optional[int] = None, held_elsewhere: Iterable[int] = (),
                  now: Optional[float] = None) -> Tuple[Optional[BatchView], Optional[int]]:
    """The batch `node` takes a job of now, and the batch it is held for (None: not held).

    Anti-starvation (a reservation with backfill): when the batch whose turn it is on this
    node (pick_batch's order, as if the node were empty) has a next job with resources that
    fits the node but not what is free now, the node is held for it: it starts no other job
    except one whose `time` limit ends before the running jobs, by their own time limits,
    leave room for the held job (backfill).  A batch holds one node at a time; a hold ends
    when its job starts there, or the batch has nothing queued or can no longer run there.
    Jobs without resources never hold a node (slots behave as before)."""
    if held is None and all(b.request is None for b in batches):
        return pick_batch(node, batches, last_owner), None     # no resources asked: nothing to hold for
    now = time.time() if now is None else now
    empty = dataclasses.replace(node, used=Amount(), jobs=0, free_slots=node.slots, running=[])
    target = next((b for b in batches if b.id == held and b.queued > 0), None) if held is not None else None
    if target is not None and why_not(empty, target) is not None:
        target = None
    if target is None:
        turn = pick_batch(empty, batches, last_owner)
        if turn is not None and turn.request is not None and why_not(node, turn) is not None \
                and turn.id not in set(held_elsewhere):
            target = turn
    if target is None:
        return pick_batch(node, batches, last_owner), None
    if why_not(node, target) is None:
        return target, None
    until = room_at(node, target.request or Amount(), now)
    backfill = [b for b in batches if b.id != target.id and b.request is not None and b.time
                and until is not None and now + b.time <= until]
    return pick_batch(node, backfill, last_owner), target.id


def dependency_wait(after: List[str], ended: Dict[str, Tuple[str, Dict[str, int]]],
                    after_failed: str = "wait") -> Optional[str]:
    """Why a batch with `meta.after` must wait (None: it may start).  `ended` maps each
    dependency still on the head to (batch state, {job state: count}); one no longer there
    was forgotten, which only an ended batch can be.  Rule: a dependency must have ended;
    one that ended with failed or killed jobs holds the batch back until they are retried
    and succeed (or the batch says `after_failed: start`)."""
    for key in after:
        if key not in ended:
            continue
        state, counts = ended[key]
        total = sum(counts.values())
        if state == "active" or counts.get("queued", 0) or counts.get("running", 0):
            return f"waits for {key} ({counts.get('done', 0)} of {total} jobs done)"
        bad = counts.get("failed", 0) + counts.get("killed", 0)
        if bad and after_failed != "start":
            return (f"waits for {key}, which ended with {bad} failed or killed job(s): "
                    f"`distribute retry {key}` until they succeed, or kill this batch")
    return None


def gpu_for_slot(slot: int, slots: int, gpus: int) -> Optional[str]:
    """CUDA_VISIBLE_DEVICES for a job in `slot`: each slot its own share of the GPUs."""
    if gpus <= 0:
        return None
    if slots <= 1:
        return ",".join(str(i) for i in range(gpus))
    if slots >= gpus:
        return str(slot % gpus)
    per = gpus // slots
    return ",".join(str(i) for i in range(slot * per, (slot + 1) * per))


# The job lifecycle as one state machine over the store.  Each transition takes what
# happened (a node's event, a client's request, the clock), updates the store in one
# transaction, and returns the actions the head must perform (start a build, tell a node,
# land results...).  No I/O here: the head executes the actions, the tests read them.
# A job is queued -> running -> done | failed | killed; the only way back to the queue is
# `requeue` (which also frees its slot: slots are derived from running jobs and builds).

NODE_FAILURES = 3               # build or start failures of a batch on one node before it gives up there
LANDING_TRIES = 10              # landing attempts of a job's results (over about 6 minutes) before the job fails
BACKOFF_BASE = 2.0              # seconds; doubles with every failure


def backoff(tries: int, base: float = BACKOFF_BASE, cap: float = 300.0) -> float:
    """Seconds to wait after the `tries`-th failure in a row."""
    return min(cap, base * 2 ** max(0, tries - 1))


@record
class Action:
    """One thing for the head to do.  op: start_build, start_job, tell, land, land_later,
    build_log, notify, drop_files, wake_at, log."""
    op: str
    node: Optional[str] = None
    batch_id: Optional[int] = None
    job_id: Optional[int] = None
    run_id: Optional[str] = None
    slot: Optional[int] = None
    info: Dict[str, Any] = field(default_factory=dict)


@record
class NodeState:
    """What the lifecycle needs to know of a node (the head's link keeps it current)."""
    name: str
    slots: int
    capabilities: List[str] = field(default_factory=list)
    gpus: int = 0
    up: bool = False
    paused: bool = False
    upgrading: bool = False         # an outdated supervisor: it finishes its work, takes no new
    capacity: Optional[int] = None  # the slots it may fill now (fewer during its owner's desk hours)
    resources: Optional[Amount] = None  # cores, memory, GPUs after its reserve (None: not known yet)
    slots_cap: Optional[int] = None     # written `slots` and desk hours: cap jobs with resources too
    cpus: int = 1                       # probed cores (a job without resources gets its slot's share)


def resource_header(node: NodeState, plan: JobPlan, slot: int, gpus: List[int]) -> Dict[str, Any]:
    """cpus, environment and GPU indices for a job's start request."""
    if not plan.cpus:                           # no resources: as before, but its own GPUs
        share = gpu_for_slot(slot, node.slots, node.gpus)
        env = {"CUDA_VISIBLE_DEVICES": share} if share is not None else {}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
        return {"cpus": max(1, node.cpus // max(1, node.slots)), "env": env, "gpus": gpus}
    env = {}
    if gpus or node.gpus or (node.resources is not None and node.resources.gpus):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, gpus))
    return {"cpus": plan.cpus, "env": env, "gpus": gpus}


def tell(node: str, **message: Any) -> Action:
    return Action("tell", node, info=message)


class Lifecycle:
    """The transitions; see the comment above."""

    def __init__(self, store: Store):
        self.store = store
        self.nodes: Dict[str, NodeState] = {}
        self.last_owner: Optional[str] = None       # round-robin cursor of the scheduler
        self.holds: Dict[str, int] = {}             # node -> batch id it is held for (anti-starvation)

    # helpers
    def busy(self, node: str) -> Dict[int, str]:
        return self.store.busy_slots(node)

    def free_slot(self, node: NodeState, busy: Optional[Dict[int, str]] = None) -> Optional[int]:
        busy = self.busy(node.name) if busy is None else busy
        if len(busy) >= (node.slots if node.capacity is None else min(node.slots, node.capacity)):
            return None
        return next((slot for slot in range(node.slots) if slot not in busy), None)

    def node_view(self, node: NodeState, busy: Optional[Dict[int, str]] = None) -> NodeView:
        """What the scheduling functions see of a node: its free slots and, once its capacity is
        known, what its running jobs hold (derived from the store: requests from their plans,
        GPU indices from their rows, ends from their start and time limit).  `busy`: its busy
        slots, when the caller has just read them."""
        busy = self.busy(node.name) if busy is None else busy
        slots_now = node.slots if node.capacity is None else min(node.slots, node.capacity)
        view = NodeView(node.name, node.capabilities, node.gpus, max(0, slots_now - len(busy)), node.paused,
                        node.up, node.upgrading)
        view.jobs, view.slots = len(busy), node.slots
        if node.resources is None:              # never connected: capacity unknown, slots decide
            view.slots_cap = slots_now
            return view
        view.capacity = node.resources
        view.gpus = node.resources.gpus
        for job in self.store.running_jobs(node.name):
            request = job_request(job.plan) or slot_share(node.resources, node.slots)
            ends = (job.started or 0) + job.plan.time if job.plan.time else None
            view.running.append(Allocation(request, list(job.gpus or []), ends))
            view.used = view.used.plus(request)
        view.slots_cap = node.slots_cap
        return view

    def dependency_reason(self, batch: BatchRow) -> Optional[str]:
        """Why `meta.after` holds the batch back (None: it may start)."""
        if not batch.plan.after:
            return None
        ended: Dict[str, Tuple[str, Dict[str, int]]] = {}
        for key in batch.plan.after:
            namespace, _, name = key.partition("/")
            other = self.store.find_batch(namespace, name)
            if other is not None and other.id != batch.id:
                ended[key] = (other.state, self.store.batch_counts(other.id))
        return dependency_wait(batch.plan.after, ended, batch.plan.after_failed)

    def next_request(self, view: BatchView, batch: BatchRow) -> None:
        """Note what the batch's next queued job asks for (jobs without resources take a slot)."""
        following = self.store.next_queued(batch.id) if batch.plan.uses_resources else None
        view.request, view.time = (job_request(following.plan), following.plan.time) if following else (None, 0)

    def capable(self, batch: BatchRow) -> List[str]:
        return [n.name for n in self.nodes.values() if not missing_capabilities(batch.capabilities, n.capabilities)]

    def _requeue(self, job: JobRow, count_attempt: bool, why: str) -> List[Action]:
        """The one way back to the queue (its slot is free as soon as the row is).  A job whose
        batch was killed meanwhile (its kill may never have reached the node) ends killed instead."""
        batch = self.store.batch(job.batch_id)
        if batch is not None and batch.state != "active":
            self.store.mark_ended(job.id, "killed", None, "killed")
            return [Action("log", info={"text": f"{why}; its batch was killed, so it ends killed instead"})] + \
                self.end_batch_if_done(job.batch_id)
        self.store.requeue(job.id, count_attempt)
        return [Action("log", info={"text": why})]

    # scheduling
    def batch_views(self, now: float) -> Tuple[Dict[int, BatchRow], List[BatchView]]:
        batches = {b.id: b for b in self.store.active_batches()}
        builds = self.store.builds()
        views = []
        # a node still running jobs of a replaced batch of the same name keeps that folder busy
        running_keys: Dict[str, set] = {}
        for node_name, batch_id in self.store.running_batches():
            running_keys.setdefault(node_name, set()).add(batch_id)
        for build in builds:
            if build.state == "running":
                running_keys.setdefault(build.node, set()).add(build.batch_id)
        for batch in batches.values():
            if not self.store.has_jobs_in(batch.id, "queued"):
                continue
            mine = [b for b in builds if b.batch_id == batch.id]
            built = [b.node for b in mine if b.state == "ok" and not (b.retry_at and b.retry_at > now)]
            blocked = [b.node for b in mine if b.state in ("failed", "running") or (b.retry_at and b.retry_at > now)]
            for node, batch_ids in running_keys.items():
                for other in batch_ids - {batch.id}:
                    row = batches.get(other) or self.store.batch(other)
                    if row is not None and row.key == batch.key:
                        blocked.append(node)
            view = BatchView(batch.id, batch.owner, batch.created, batch.capabilities, 1, built, blocked)
            self.next_request(view, batch)
            view.waiting = self.dependency_reason(batch)
            views.append(view)
        return batches, views

    def schedule(self, now: float) -> List[Action]:
        """Fill every usable node as far as its slots and resources allow (SPEC §6 order, see
        pick_batch; a large job's reservation and backfill, see pick_for_node; `meta.after`).
        One transaction: the jobs a pass starts are claimed in one commit, or none is."""
        with self.store.transaction():
            return self._schedule(now)

    def _schedule(self, now: float) -> List[Action]:
        actions: List[Action] = []
        seen: Dict[str, Tuple[NodeView, Dict[int, str]]] = {}   # a node's view, until it starts something
        batches, views = self.batch_views(now)
        later = [b.retry_at for b in self.store.builds() if b.retry_at and b.retry_at > now]
        if later:
            actions.append(Action("wake_at", info={"at": min(later)}))
        for name in [n for n in self.holds if n not in self.nodes or not self.nodes[n].up or self.nodes[n].paused]:
            del self.holds[name]                    # a node that cannot start anything holds nothing
        views = [v for v in views if v.queued > 0]
        progress = bool(views)
        while progress:
            progress = False
            for node in self.nodes.values():
                if not node.up or node.paused:
                    continue
                if node.name not in seen:
                    busy = self.busy(node.name)
                    seen[node.name] = (self.node_view(node, busy), busy)
                view, busy = seen[node.name]
                elsewhere = [b for n, b in self.holds.items() if n != node.name]
                choice, hold = pick_for_node(view, views, self.last_owner, self.holds.get(node.name), elsewhere, now)
                if hold is None:
                    self.holds.pop(node.name, None)
                else:
                    self.holds[node.name] = hold
                if choice is None:
                    continue
                slot = self.free_slot(node, busy) if choice.request is None or node.resources is None else \
                    next(i for i in itertools.count() if i not in busy)
                if slot is None:
                    continue
                progress = True
                del seen[node.name]                 # it starts a job or a build: read it afresh
                self.last_owner = choice.owner
                batch = batches[choice.id]
                build = self.store.build(batch.id, node.name)
                if build is not None and build.state == "ok":
                    job = self.store.next_queued(batch.id)
                    if job is None:
                        choice.queued = 0
                        views = [v for v in views if v.queued > 0]
                        continue
                    gpus: List[int] = []
                    if node.resources is not None:
                        request = job_request(job.plan) or slot_share(node.resources, node.slots)
                        taken = [i for held in view.running for i in held.gpus]
                        gpus = assign_gpus(request.gpus, taken, node.resources.gpus) or []
                    run_id = f"{job.id}.{job.starts + 1}"
                    self.store.mark_started(job.id, run_id, node.name, slot, gpus)
                    actions.append(Action("start_job", node.name, batch.id, job.id, run_id, slot,
                                          info=resource_header(node, job.plan, slot, gpus)))
                    if not self.store.has_jobs_in(batch.id, "queued"):
                        choice.queued = 0
                    else:
                        self.next_request(choice, batch)
                else:
                    tries = build.tries if build is not None else 0
                    self.store.put_build(BuildRow(batch.id, node.name, "running", slot, tries))
                    choice.failed_on.append(node.name)
                    actions.append(Action("start_build", node.name, batch.id, slot=slot))
                views = [v for v in views if v.queued > 0]
        return actions

    # builds
    def build_not_started(self, batch_id: int, node: str, reason: str, now: float) -> List[Action]:
        """The build could not even start there (no space, refused): back off, give up after a few."""
        build = self.store.build(batch_id, node)
        if build is None or build.state != "running":
            return []
        return self._node_failure(batch_id, node, build.tries + 1, f"could not start the build on {node}: {reason}",
                                  now, state_if_retry="backoff")

    def _node_failure(self, batch_id: int, node: str, tries: int, reason: str, now: float,
                      state_if_retry: str) -> List[Action]:
        batch = self.store.batch(batch_id)
        if tries >= NODE_FAILURES:
            self.store.put_build(BuildRow(batch_id, node, "failed", None, tries, reason))
            actions = [Action("log", info={"text": f"node {node}: giving up on {batch.key} after {tries} failures: "
                                                   f"{reason}"})]
            return actions + [tell(node, op="cleanup", namespace=batch.namespace, batch=batch.name)] \
                + self.fail_if_unbuildable(batch)
        retry_at = now + backoff(tries)
        self.store.put_build(BuildRow(batch_id, node, state_if_retry, None, tries, reason, retry_at))
        return [Action("wake_at", info={"at": retry_at})]

    def built(self, node: str, namespace: str, name: str, exit_code: Optional[int], error: Optional[str],
              log_bytes: bytes) -> List[Action]:
        building = [b for b in self.store.builds(node=node) if b.state == "running"]
        batch = next((row for row in (self.store.batch(b.batch_id) for b in building)
                      if row is not None and (row.namespace, row.name) == (namespace, name)), None)
        if batch is None:                       # a build nobody waits for any more
            return self.forget_workspace(node, {"namespace": namespace, "batch": name})
        build = self.store.build(batch.id, node)
        if batch.state != "active":             # killed or replaced while it built: its slot is free now
            self.store.drop_builds(batch.id, node)
            return self.forget_workspace(node, {"namespace": namespace, "batch": name})
        actions = [Action("build_log", node, batch.id, info={"data": log_bytes, "ok": exit_code == 0})]
        if exit_code == 0:
            self.store.put_build(BuildRow(batch.id, node, "ok"))
            return actions
        reason = f"build failed on {node}: " + (error or f"exit code {exit_code}")
        self.store.put_build(BuildRow(batch.id, node, "failed", None, build.tries + 1, reason))
        actions.append(Action("log", info={"text": f"node {node}: build of {batch.key} failed "
                                                   f"({error or f'exit code {exit_code}'})"}))
        actions.append(tell(node, op="cleanup", namespace=batch.namespace, batch=batch.name))
        return actions + self.fail_if_unbuildable(batch)

    def fail_if_unbuildable(self, batch: BatchRow) -> List[Action]:
        """When every node that could run the batch failed its build, its jobs cannot run."""
        capable = self.capable(batch)
        failed = {b.node: b.reason for b in self.store.builds(batch.id) if b.state == "failed"}
        if not capable or any(node not in failed for node in capable):
            return []
        reason = "; ".join(failed[node] or f"build failed on {node}" for node in capable)
        self.store.end_queued(batch.id, "failed", reason)
        return self.end_batch_if_done(batch.id)

    # jobs
    def job_not_started(self, job_id: int, run_id: str, node: str, reason: str, now: float) -> List[Action]:
        job = self.store.job(job_id)
        if job is None or job.run_id != run_id or job.state != "running":
            return []
        key = self.store.batch(job.batch_id).key
        actions = self._requeue(job, False, f"node {node}: {key}/{job.name} could not start: {reason}")
        build = self.store.build(job.batch_id, node)
        tries = (build.tries if build else 0) + 1
        state = "ok" if build is not None and build.state == "ok" and "not built" not in reason else "backoff"
        return actions + self._node_failure(job.batch_id, node, tries, f"could not start jobs on {node}: {reason}",
                                            now, state_if_retry=state)

    def finished(self, node: str, run: Dict[str, Any]) -> List[Action]:
        """A node reports a run ended (an event, or found on reconnection)."""
        run_id = str(run.get("run_id"))
        job = self.store.job(run_job_id(run_id))
        if job is None or job.run_id != run_id or job.state != "running" or job.node != node:
            return [Action("log", info={"text": f"node {node}: discarding stale run {run_id}"}),
                    tell(node, op="ack", run_ids=[run_id])] + self.forget_workspace(node, run)
        batch = self.store.batch(job.batch_id)
        if batch.state == "replaced":           # a replaced batch's results never land under the new one
            self.store.mark_ended(job.id, "killed", run.get("exit_code"), "replaced")
            return [tell(node, op="ack", run_ids=[run_id])] + self.end_batch_if_done(batch.id)
        if run.get("lost") or (run.get("vacated") and not run.get("killed")):
            # lost with its machine or supervisor, or vacated for the workstation's owner: it runs
            # again elsewhere, no retry used, nothing of this attempt archived
            why = f"lost ({run.get('lost')})" if run.get("lost") else "vacated"
            actions = [Action("attempt", node, batch.id, job.id, run_id, info={"run": run, "state": "vacated"})] \
                if run.get("vacated") else []
            if batch.state == "active":
                actions += self._requeue(job, False, f"node {node}: {batch.key}/{job.name} {why} "
                                                     f"(run {run_id}), queued again")
            else:
                self.store.mark_ended(job.id, "killed", run.get("exit_code"), why)
            return actions + [tell(node, op="ack", run_ids=[run_id])] + self.end_batch_if_done(batch.id)
        return [Action("land", node, batch.id, job.id, run_id, job.slot, info={"run": run})]

    def outcome(self, run: Dict[str, Any]) -> str:
        if run.get("killed"):
            return "killed"
        return "done" if run.get("exit_code") == 0 else "failed"

    def landed(self, node: str, job_id: int, run: Dict[str, Any], progress: Optional[float]) -> List[Action]:
        run_id = str(run.get("run_id"))
        job = self.store.job(job_id)
        if job is None or job.run_id != run_id or job.state != "running":
            return [tell(node, op="ack", run_ids=[run_id])]
        batch = self.store.batch(job.batch_id)
        state, code = self.outcome(run), run.get("exit_code")
        actions: List[Action] = []
        with self.store.transaction():      # on disk before the ack goes out (DurableAcks flushes first)
            self.store.set_progress(job.id, progress)
            if state == "failed" and job.attempts <= job.retries and batch.state == "active":
                actions += self._requeue(job, True, f"{batch.key}/{job.name} failed (exit code {code}) on {node}; "
                                                    f"attempt {job.attempts} of {job.retries + 1}, trying again")
            else:
                reason = f"exit code {code} on {node}" + (f", attempt {job.attempts} of {job.retries + 1}"
                                                          if job.retries else "") if state == "failed" else None
                if run.get("reason"):               # stopped by its memory or time limit
                    reason = str(run["reason"])
                self.store.mark_ended(job.id, state, code, reason)
        actions.append(tell(node, op="ack", run_ids=[run_id]))
        return actions + self.release_build_if_done(node, batch) + self.end_batch_if_done(batch.id)

    def landing_failed(self, node: str, job_id: int, run: Dict[str, Any], reason: str, tries: int) -> List[Action]:
        """Results could not be archived: try again later, ever more slowly, then fail the job."""
        job = self.store.job(job_id)
        run_id = str(run.get("run_id"))
        if job is None or job.run_id != run_id or job.state != "running":
            return []
        if tries < LANDING_TRIES:
            return [Action("land_later", node, job.batch_id, job.id, run_id, job.slot,
                           info={"run": run, "tries": tries, "delay": backoff(tries, 5.0, 60.0)})]
        self.store.mark_ended(job.id, "failed", run.get("exit_code"),
                              f"its results could not be archived after {tries} tries: {reason}")
        batch = self.store.batch(job.batch_id)
        return [Action("log", info={"text": f"archive: giving up on {batch.key}/{job.name}: {reason}"})] \
            + self.release_build_if_done(node, batch) + self.end_batch_if_done(batch.id)

    def forget_workspace(self, node: str, run: Dict[str, Any]) -> List[Action]:
        """A node keeps the batch folder of a stale run: delete it unless the node builds or runs
        that batch meanwhile."""
        namespace, name = run.get("namespace"), run.get("batch")
        for batch in self.store.active_batches():
            if batch.namespace == namespace and batch.name == name and (
                    self.store.build(batch.id, node) is not None or self.store.has_jobs_in(batch.id, "running", node)):
                return []
        return [tell(node, op="cleanup", namespace=namespace, batch=name)]

    def release_build_if_done(self, node: str, batch: BatchRow) -> List[Action]:
        """Delete the node's build directory once it has nothing more to do for the batch."""
        if batch.state == "active" and self.store.has_jobs_in(batch.id, "queued"):
            return []
        if self.store.has_jobs_in(batch.id, "running", node):
            return []
        build = self.store.build(batch.id, node)
        if build is not None and build.state != "failed":
            self.store.drop_builds(batch.id, node)
        return [tell(node, op="cleanup", namespace=batch.namespace, batch=batch.name)]

    def end_batch_if_done(self, batch_id: int) -> List[Action]:
        batch = self.store.batch(batch_id)
        if batch is None or self.store.has_jobs_in(batch_id, "queued") or self.store.has_jobs_in(batch_id, "running"):
            return []
        if batch.state == "active":
            self.store.set_batch_state(batch_id, "done")
        elif batch.state not in ("killed",):
            return []                               # ended already, or replaced: nothing to announce
        cleanups = []
        for build in self.store.builds(batch_id):   # a build under way holds its slot until it reports
            if build.state != "running":            # the others' folders go (a node that ran its last job
                self.store.drop_builds(batch_id, build.node)    # while others were queued still has one)
                cleanups.append(tell(build.node, op="cleanup", namespace=batch.namespace, batch=batch.name))
        counts = self.store.batch_counts(batch_id)
        text = (f"batch {batch.key}: finished ({counts.get('done', 0)} ok, {counts.get('failed', 0)} failed, "
                f"{counts.get('killed', 0)} killed)")
        if batch.state == "killed":
            self.store.set_batch_state(batch_id, "killed")      # stamps when it ended
        return cleanups + [Action("log", info={"text": text}),
                           Action("notify", batch_id=batch_id, info={"counts": counts})]

    # requests
    def kill(self, batch_id: int) -> Tuple[int, int, List[Action]]:
        batch = self.store.batch(batch_id)
        with self.store.transaction():
            dropped = self.store.end_queued(batch_id, "killed", "killed")
            running = self.store.jobs(batch_id, "running")
            if batch.state == "active":
                self.store.set_batch_state(batch_id, "killed")
        actions = [tell(job.node or "", op="kill", run_ids=[job.run_id]) for job in running]
        if not running:
            actions += self.end_batch_if_done(batch_id)
        return dropped, len(running), actions

    def retry(self, batch_id: int, states: Tuple[str, ...]) -> Tuple[int, List[Action]]:
        """Queue a batch's failed (and killed) jobs again, also after it ended: its files are kept."""
        with self.store.transaction():
            count = self.store.queue_again(batch_id, states)
            if count:
                self.store.set_batch_state(batch_id, "active")
                for build in self.store.builds(batch_id):    # every node may try to build it again
                    if build.state in ("failed", "backoff"):
                        self.store.drop_builds(batch_id, build.node)
        return count, []

    def replace(self, batch_id: int) -> List[Action]:
        """`add --replace`: the old batch is killed and forgotten; what it still runs ends as killed."""
        _, _, actions = self.kill(batch_id)
        self.store.set_batch_state(batch_id, "replaced")
        for build in self.store.builds(batch_id):    # a build under way keeps its slot and folder till it ends
            if build.state != "running":
                self.store.drop_builds(batch_id, build.node)
        return [a for a in actions if a.op == "tell"] + [Action("drop_files", batch_id=batch_id)]

    # nodes
    def node_lost(self, node: str) -> List[Action]:
        """Gone longer than the node timeout: its jobs run elsewhere (without using a retry)."""
        actions: List[Action] = []
        with self.store.transaction():
            for job in self.store.running_jobs(node):
                actions += self._requeue(job, False, f"node {node}: lost, requeueing {job.name} (run {job.run_id})")
            self.store.drop_builds(node=node, keep_failed=True)
        return actions

    def reconcile(self, node: str, runs: List[Dict[str, Any]]) -> List[Action]:
        """After (re)connecting: adopt runs we still expect, archive finished ones, stop stale ones."""
        actions: List[Action] = []
        seen = set()
        for run in runs:
            run_id = str(run.get("run_id"))
            seen.add(run_id)
            job = self.store.job(run_job_id(run_id))
            current = job is not None and job.run_id == run_id and job.state == "running" and job.node == node
            if not current and run.get("state") == "running":
                actions.append(tell(node, op="kill", run_ids=[run_id], grace=0))
            elif current and run.get("state") == "running" and not run.get("killed") and \
                    self.store.batch(job.batch_id).state in ("killed", "replaced"):
                actions.append(tell(node, op="kill", run_ids=[run_id]))     # a kill lost with the connection
            elif run.get("state") == "finished":
                actions += self.finished(node, run)
            if current and run.get("gpus") and not job.gpus:     # what it was given, from its record
                self.store.set_gpus(job.id, [int(i) for i in run["gpus"]])
        for job in self.store.running_jobs(node):
            if job.run_id not in seen:
                actions += self._requeue(job, False, f"node {node}: run {job.run_id} of job {job.name} is unknown "
                                                     "there; requeueing")
        for build in self.store.builds(node=node):
            if build.state == "running":          # a build the node forgot (it restarted): start over
                self.store.drop_builds(build.batch_id, node)
        return actions


def run_job_id(run_id: str) -> int:
    head, _, _ = str(run_id).partition(".")
    return int(head) if head.isdigit() else -1


# ---------------------------------------------------------------------------
# 8. Wire format, tar streams and transports
#
# Head, supervisor and clients exchange frames: an 8-byte prefix (header and
# payload lengths), a JSON header, then raw payload bytes.  Files travel as tar
# streams, checked member by member on arrival.  A transport reaches one
# machine: the local one directly, any other over one persistent SSH connection.
# ---------------------------------------------------------------------------

MAX_HEADER = 64 * 1024 * 1024
INLINE_LIMIT = 1024 * 1024          # results up to this size ride along with the "finished" event
PROTOCOL = 2                    # 2: hello carries build, pid, machine identity; runs are adopted by pid

# Every frame is bounded by what its op needs, checked on the 8-byte prefix and the op
# (the header's first key, as Channel.send writes it) before another byte is read: a
# peer declaring gigabytes is refused before anything is allocated.  A frame whose op
# turns out to differ from the one it announced is held to the real op's bounds.
SMALL_HEADER = 64 * 1024
KiB, MiB = 1024, 1024 * 1024
HEAD_FRAMES = {"add": (16 * MiB, 0), "pull_files": (16 * MiB, 0), "pull": (1 * MiB, 0), "pull_all": (1 * MiB, 0)}
SUPERVISOR_FRAMES = {"build": (4 * MiB, 16 * MiB), "start": (4 * MiB, 16 * MiB), "ack": (4 * MiB, 0),
                     "kill": (4 * MiB, 0)}
NODE_FRAMES = (MAX_HEADER, 64 * MiB)        # what a supervisor sends its head: events, replies
_OP_RE = re.compile(rb'\A\{"op":"([A-Za-z_]{1,32})"')


def frame_bounds(table: Dict[str, Tuple[int, int]]) -> Callable[[Optional[str]], Tuple[int, int]]:
    """(largest header, largest payload) of a frame with op `op`, from `table` or small."""
    return lambda op: table.get(op or "", (SMALL_HEADER, 0))


class ProtocolError(Failed):
    """The other side spoke something that is not our protocol (or hung up)."""


class BadFrame(ProtocolError):
    """A frame that is not one: its header is no JSON object, or one nested past reading."""


class FrameTooLarge(BadFrame):
    """A frame declared more than its op may carry; nothing of it was read."""


SMALL_FRAME = 64 * 1024     # a payload up to this size goes out in the same write as its header


class Channel:
    """Frames over a pair of asyncio-like streams; sends are serialised by a lock."""

    def __init__(self, reader, writer):
        import asyncio
        self.reader, self.writer = reader, writer
        self._lock = asyncio.Lock()

    async def send(self, header: Dict[str, Any], payload: bytes = b"") -> None:
        if "op" in header:
            header = dict({"op": header["op"]}, **header)       # first: receivers bound frames by it
        body = json.dumps(header, separators=(",", ":")).encode()
        frame = len(body).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + body
        async with self._lock:
            if payload and len(payload) <= SMALL_FRAME:     # one write: one SSH packet, not two
                self.writer.write(frame + payload)
            else:
                self.writer.write(frame)
                if payload:
                    self.writer.write(payload)
            await self.writer.drain()

    async def receive(self, bounds: Optional[Callable[[Optional[str]], Tuple[int, int]]] = None
                      ) -> Tuple[Dict[str, Any], bytes]:
        """The next frame; with `bounds` (see frame_bounds), one larger than its op may carry
        raises FrameTooLarge before its body is read."""
        import asyncio
        try:
            prefix = await self.reader.readexactly(8)
            size, payload_size = int.from_bytes(prefix[:4], "big"), int.from_bytes(prefix[4:], "big")
            start, op = b"", None
            if bounds is not None:
                start = await self.reader.readexactly(min(size, 64))
                match = _OP_RE.match(start)
                op = match.group(1).decode() if match else None
            check_frame(op, size, payload_size, bounds)
            header = json.loads(start + await self.reader.readexactly(size - len(start)))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
            if bounds is not None and header.get("op") != op:
                check_frame(header.get("op"), size, payload_size, bounds)
            payload = await self.reader.readexactly(payload_size) if payload_size else b""
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise ProtocolError("connection closed") from exc
        except RecursionError:
            raise BadFrame("the request nests deeper than JSON is read here") from None
        except ValueError as exc:
            raise BadFrame(f"bad frame: {one_line(str(exc))[:200]}") from None
        return header, payload

    async def request(self, header: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
        await self.send(header, payload)
        return await self.receive()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


def check_frame(op: Any, size: int, payload_size: int, bounds) -> None:
    most_header, most_payload = bounds(op if isinstance(op, str) else None) if bounds else (MAX_HEADER, 1 << 32)
    if size > most_header or payload_size > most_payload:
        what = f"a {op!r} request" if isinstance(op, str) else "a request"
        raise FrameTooLarge(f"{what} of {human_bytes(size + payload_size)} is refused: at most "
                            f"{human_bytes(most_header + most_payload)}")


EMPTY_TAR = bytes(1024)      # the end marker alone: what a job without files sends


def tar_of(entries: Iterable[Tuple[str, str]]) -> bytes:
    """A tar (in memory) of (name in archive, path on disk) pairs."""
    entries = list(entries)
    if not entries:
        return EMPTY_TAR
    plain = plain_files_tar(entries)
    if plain is not None:
        return plain
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, path in entries:
            tar.add(path, arcname=name, recursive=False)
    return buffer.getvalue()


def plain_files_tar(entries: List[Tuple[str, str]]) -> Optional[bytes]:
    """tar_of's usual case, a few regular files with short ASCII names (a job's stdout.txt
    and small results): ustar headers made directly (see ustar_header), whole seconds, no
    owner names, no padding to tarfile's 10 KiB records.  None when any entry is something
    else (a folder, a link, a long name): then tarfile writes it all, as before."""
    parts = []
    for name, path in entries:
        opened = open_regular_file(path)
        if opened is None:
            return None
        fd, info = opened
        try:
            header = ustar_header(name, info.st_size, int(info.st_mtime), info.st_mode & 0o777)
            if header is None:
                return None
            data = read_up_to(fd, info.st_size)
            if len(data) < info.st_size:
                return None                     # it shrank meanwhile
        finally:
            os.close(fd)
        parts += [header, data, bytes(-len(data) % 512)]
    parts.append(bytes(1024))
    return b"".join(parts)


def check_tar_entry(name: str, kind: bytes, linkname: str, dest: Path) -> List[str]:
    """The parts of the path a tar entry may land at under dest; UnsafeArchive if it may not."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or not parts or "\0" in name:
        raise UnsafeArchive(f"refused tar entry {name!r}: it escapes its folder")
    if kind not in TAR_REGULAR and kind not in (TAR_FOLDER, TAR_SYMLINK):
        raise UnsafeArchive(f"refused tar entry {name!r}: not a regular file, folder or symlink")
    if kind == TAR_SYMLINK:
        resolved = os.path.normpath(os.path.join(os.path.dirname(str(dest.joinpath(*parts))), linkname))
        if linkname.startswith("/") or "\0" in linkname or not (resolved + os.sep).startswith(str(dest) + os.sep):
            raise UnsafeArchive(f"refused tar entry {name!r}: symlink to {linkname!r} points outside")
    return parts


# The tar reader.  Python's tarfile costs tens of microseconds per member (and copies every
# byte through two more layers), which is most of the time a pull of 10,000 small files takes;
# this reader parses the headers distribute's own writers make (ustar, pax for long names and
# big numbers, GNU long names too) and hands out each file's bytes as views into 1 MiB reads.
# Anything else (hard links, devices, fifos, sparse or global headers) is refused.

TAR_REGULAR, TAR_FOLDER, TAR_SYMLINK = (b"0", b"\0", b"7"), b"5", b"2"
TAR_PAX, TAR_LONG_NAME, TAR_LONG_LINK, TAR_GLOBAL = b"x", b"L", b"K", b"g"
TAR_MAX_META = 1 << 20          # a pax header or GNU long name larger than this is refused
ZERO_BLOCK = bytes(512)


class TarSource:
    """A tar stream (bytes, a file object, or a descriptor) read in large chunks and handed
    out as 512-byte header blocks and views of file data, without copying it again."""

    CHUNK = 1 << 20

    def __init__(self, source, on_bytes: Optional[Callable[[int], None]] = None):
        self.read: Callable[[int], bytes]
        if isinstance(source, (bytes, bytearray)):
            self.buf, self.read = bytes(source), lambda size: b""
        elif isinstance(source, int):
            self.buf, self.read = b"", lambda size: os.read(source, size)
        else:
            self.buf, self.read = b"", source.read
        self.view, self.pos, self.offset, self.on_bytes = memoryview(self.buf), 0, 0, on_bytes

    def fill(self) -> bool:
        """Read the next chunk (everything in hand is used); False at the end of the stream."""
        data = self.read(self.CHUNK)
        if not data:
            return False
        if self.on_bytes is not None:
            self.on_bytes(len(data))
        self.offset += len(self.buf)
        self.buf, self.view, self.pos = data, memoryview(data), 0
        return True

    def tell(self) -> int:
        return self.offset + self.pos

    def cut(self) -> ProtocolError:
        return ProtocolError(f"the tar stream ended early, after {self.tell()} bytes: the transfer broke off")

    def block(self) -> Optional[bytes]:
        """The next 512-byte block; None when the stream ends right here."""
        end = self.pos + 512
        if end <= len(self.buf):
            self.pos = end
            return self.buf[end - 512:end]
        pieces, have = [self.buf[self.pos:]], len(self.buf) - self.pos
        self.pos = len(self.buf)
        while have < 512:
            if not self.fill():
                if have == 0:
                    return None
                raise self.cut()
            self.pos = min(512 - have, len(self.buf))
            pieces.append(self.buf[:self.pos])
            have += self.pos
        return b"".join(pieces)

    def data(self, size: int) -> memoryview:
        """Between 1 and size bytes of the stream, a view into the chunk in hand."""
        if self.pos == len(self.buf) and not self.fill():
            raise self.cut()
        end = min(self.pos + size, len(self.buf), self.pos + self.CHUNK)
        piece, self.pos = self.view[self.pos:end], end
        return piece

    def exactly(self, size: int) -> bytes:
        return b"".join(bytes(piece) for piece in iter_data(self, size))

    def skip(self, size: int) -> None:
        while size:
            size -= len(self.data(size))

    def drain(self) -> None:
        """Read to the end (a sender still writing the end marker's second block finishes)."""
        self.pos = len(self.buf)
        while self.fill():
            self.pos = len(self.buf)


def iter_data(source: TarSource, size: int) -> Iterator[memoryview]:
    while size:
        piece = source.data(size)
        size -= len(piece)
        yield piece


def tar_number(field: bytes, what: str, offset: int) -> int:
    """A tar header's number: octal text, or base-256 (GNU) for big ones."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (256 ** (len(field) - 1)) if field[0] == 0xff else value
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise ProtocolError(f"broken tar stream: the header at byte {offset} has a bad {what}") from None


def tar_text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def tar_header(block: bytes, offset: int) -> Tuple[str, bytes, int, int, float, str]:
    """(name, type, size, mode, mtime, link target) of a 512-byte ustar/GNU header block."""
    numbers = None
    if block[107] in (0, 32) and block[135] in (0, 32) and block[147] in (0, 32) and block[154] in (0, 32):
        with contextlib.suppress(ValueError):       # the usual: octal digits ending in NUL or space
            numbers = int(block[148:154], 8), int(block[124:135], 8), int(block[100:107], 8), int(block[136:147], 8)
    checksum, size, mode, mtime = numbers or (
        tar_number(block[148:156], "checksum", offset), tar_number(block[124:136], "size", offset),
        tar_number(block[100:108], "mode", offset), tar_number(block[136:148], "mtime", offset))
    if checksum != sum(block) - sum(block[148:156]) + 256 and \
            checksum != sum(struct_unpack_signed(block)) + 256:
        raise ProtocolError(f"broken tar stream: the header at byte {offset} has a bad checksum")
    kind = block[156:157]
    name = tar_text(block[:100])
    if kind == b"\0" and name.endswith("/"):
        kind = TAR_FOLDER                    # the old way to write a folder
    if block[345] and block[257:262] == b"ustar" and kind not in (TAR_LONG_NAME, TAR_LONG_LINK, b"S"):
        name = tar_text(block[345:500]) + "/" + name
    if size < 0 or size >= 1 << 62:
        raise ProtocolError(f"broken tar stream: the header at byte {offset} has a bad size")
    return name, kind, size, mode, mtime, tar_text(block[157:257]) if block[157] else ""


def struct_unpack_signed(block: bytes) -> Tuple[int, ...]:
    import struct
    return struct.unpack("148b8x356b", block)


def pax_records(data: bytes, offset: int) -> Dict[str, str]:
    """The "LENGTH key=value\\n" records of a pax header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            length = 0
        if space < 0 or length <= space - pos or pos + length > len(data) or data[pos + length - 1:pos + length] != b"\n":
            raise ProtocolError(f"broken tar stream: the pax header at byte {offset} is malformed")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def extract_tar(source, dest: Path, on_bytes: Optional[Callable[[int], None]] = None, direct: bool = False) -> int:
    """Extract a tar (bytes, a readable file object or a descriptor, read as a stream) into
    dest, refusing anything unsafe before writing it, and a stream cut short (no end marker).
    on_bytes(count) hears of every chunk read.  direct: big files around the page cache (what
    the head receives: see SparseWriter).  Returns the bytes written."""
    dest = Path(os.path.abspath(dest))
    dest.mkdir(parents=True, exist_ok=True)
    if isinstance(source, (bytes, bytearray)) and len(source) >= 1024 and source.count(0) == len(source):
        return 0            # an empty tar (just its end marker): most jobs send no files
    stream = TarSource(source, on_bytes)
    _UMASK.clear()
    written = extract_members(stream, dest, direct)
    stream.drain()
    return written


def extract_members(stream: TarSource, dest: Path, direct: bool = False) -> int:
    """extract_tar's loop.  Every write goes through descriptors opened below dest with
    O_NOFOLLOW (section 5): a link that arrived earlier in the stream, or stood in dest
    before, is never written through."""
    written = 0
    folders = FolderCache(dest)
    pax: Dict[str, str] = {}
    try:
        while True:
            block = stream.block()
            if block is None:
                raise stream.cut()
            if block == ZERO_BLOCK:
                return written                  # the end-of-archive marker
            offset = stream.tell() - 512
            name, kind, size, mode, mtime, linkname = tar_header(block, offset)
            if kind in (TAR_PAX, TAR_LONG_NAME, TAR_LONG_LINK):
                if size > TAR_MAX_META:
                    raise ProtocolError(f"broken tar stream: a header of {size} bytes at byte {offset}")
                meta = stream.exactly(size)
                stream.skip(-size % 512)
                if kind == TAR_PAX:
                    pax.update(pax_records(meta, offset))
                else:
                    pax["path" if kind == TAR_LONG_NAME else "linkpath"] = tar_text(meta)
                continue
            if pax:
                name, linkname = pax.get("path", name), pax.get("linkpath", linkname)
                try:
                    size = int(pax.get("size", size))
                    mtime = float(pax.get("mtime", mtime))
                except ValueError:
                    raise ProtocolError(f"broken tar stream: the pax header before byte {offset} has a bad "
                                        f"number") from None
                if any(key.startswith("GNU.sparse.") for key in pax) or not 0 <= size < 1 << 62:
                    raise UnsafeArchive(f"refused tar entry {name!r}: a sparse or oversized entry")
                pax = {}
            if kind == TAR_GLOBAL:
                raise UnsafeArchive(f"refused tar entry {name!r}: a global pax header")
            parts = check_tar_entry(name, kind, linkname, dest)
            try:
                dir_fd = folders.get(parts[:-1])
                leaf = parts[-1]
                if kind == TAR_FOLDER:
                    folders.get(parts)
                elif kind == TAR_SYMLINK:
                    folders.remove(dir_fd, leaf)
                    os.symlink(linkname, leaf, dir_fd=dir_fd)
                else:
                    land_file(stream, folders, dir_fd, leaf, size, mode, mtime, direct)
                    stream.skip(-size % 512)
                    written += size
            except UnsafeArchive as exc:
                raise UnsafeArchive(f"refused tar entry {name!r}: {exc}") from None
    finally:
        folders.close()


_UMASK: List[int] = []


def process_umask() -> int:
    """This process's umask, read without changing it (other threads may be creating files);
    read again at each extraction's start (extract_tar clears it)."""
    if not _UMASK:
        umask = 0o777                                   # unknown: every mode gets its fchmod
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open("/proc/self/status") as status:
                umask = int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
        _UMASK.append(umask)
    return _UMASK[0]


class FolderCache:
    """Descriptors of the folders under dest an extraction writes into, each opened (and made
    when missing) part by part with O_NOFOLLOW; a few hundred kept open at most."""

    LIMIT = 256

    def __init__(self, dest: Path):
        self.root = os.open(str(dest), os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
        self.fds: Dict[Tuple[str, ...], int] = {(): self.root}

    def get(self, parts: List[str]) -> int:
        key = tuple(parts)
        fd = self.fds.get(key)
        if fd is None:
            parent = self.get(parts[:-1])
            if len(self.fds) >= self.LIMIT:
                self.clear(keep=key[:-1])
                parent = self.fds[key[:-1]]
            fd = self.fds[key] = open_folder_at(parent, parts[-1], create=True)
        return fd

    def remove(self, dir_fd: int, name: str) -> None:
        """Delete what stands at name (a folder with everything in it); forget folders opened below."""
        remove_at(dir_fd, name)
        self.clear(keep=next(k for k, fd in self.fds.items() if fd == dir_fd))

    def clear(self, keep: Tuple[str, ...] = ()) -> None:
        """Close every descriptor but the root's and those of keep and its parents."""
        for key in list(self.fds):
            if key and key != keep[:len(key)]:
                os.close(self.fds.pop(key))

    def close(self) -> None:
        self.clear()
        os.close(self.root)


PART_SUFFIX = ".distribute-part"
ZERO_CHUNK = bytes(1 << 20)
HOLE_MIN = 64 * 1024            # a run of zeros this long (or longer) in a received file becomes a hole
STAGE_SIZE = 1 << 20            # SparseWriter's buffer: a whole number of HOLE_MIN blocks
DIRECT_MIN = 8 << 20            # a received file this large is written around the page cache (O_DIRECT)
DIRECT_BLOCK = 4096             # what O_DIRECT writes must be a multiple of (the largest disk block)


class SparseWriter:
    """Writes a file's bytes in order into fd, leaving every HOLE_MIN block of zeros aligned
    in the file as a hole, whatever sizes the pieces come in: they are gathered in a buffer of
    whole blocks first, so how the stream was cut cannot change how sparse a file lands.

    With `direct` (the head receiving results and uploads), a file of DIRECT_MIN or more is
    written with O_DIRECT where the file system allows it: from the page-aligned buffer
    straight to the disk, without copying every byte into new page-cache pages first, which
    is most of the CPU a buffered write of a big new file costs (measured: 2-3 s per GiB of
    system time on a VM, 0.3 s direct).  The head flushes what it archived before telling the
    node anyway (DurableAcks), so waiting for the disk costs it nothing; a client's pull keeps
    the page cache (a slow disk must not slow its transfer).  The last bytes that do not fill
    a disk block, and every write a file system refuses so, go the usual way."""

    def __init__(self, fd: int, size: int, direct: bool = False):
        self.fd, self.holes = fd, False
        self.sparse = size >= HOLE_MIN          # a smaller file cannot hold a hole: written as it comes
        if self.sparse:
            self.buffer = memoryview(stage_buffer())
            self.filled, self.offset = 0, 0     # bytes in the buffer; where its first one goes in the file
            self.direct = (direct and size >= DIRECT_MIN and file_system_type(fd) in LOCAL_DISK_FILE_SYSTEMS
                           and direct_writes(fd, True))

    def write(self, piece) -> None:
        if not self.sparse:
            write_all(self.fd, piece)
            return
        view = memoryview(piece)
        while view:
            take = min(len(view), STAGE_SIZE - self.filled)
            self.buffer[self.filled:self.filled + take] = view[:take]
            self.filled += take
            view = view[take:]
            if self.filled == STAGE_SIZE:
                self.flush()

    def flush(self) -> None:
        """The buffer's bytes into the file, each whole block of zeros left out (a hole)."""
        start = 0
        for pos in range(0, self.filled - HOLE_MIN + 1, HOLE_MIN):
            if self.is_zero(self.buffer[pos:pos + HOLE_MIN]):
                self.put(start, pos)
                start, self.holes = pos + HOLE_MIN, True
        self.put(start, self.filled)
        self.offset += self.filled
        self.filled = 0

    def put(self, start: int, end: int) -> None:
        """buffer[start:end] into the file at its place."""
        if self.direct and (end - start) % DIRECT_BLOCK:      # a file's last bytes
            cut = end - (end - start) % DIRECT_BLOCK
            self.put(start, cut)
            self.buffered()
            start = cut
        while start < end:
            try:
                start += os.pwrite(self.fd, self.buffer[start:end], self.offset + start)
            except OSError as exc:
                if not (self.direct and exc.errno == errno.EINVAL):
                    raise
                self.buffered()                 # the file system wants other alignments

    def buffered(self) -> None:
        direct_writes(self.fd, False)
        self.direct = False

    @staticmethod
    def is_zero(block) -> bool:
        return block[0] == 0 and block[-1] == 0 and ZERO_CHUNK.startswith(block)

    def finish(self, size: int) -> None:
        """The last bytes, and the file's length when it ends in a hole."""
        if self.sparse:
            self.flush()
            if self.holes:
                os.ftruncate(self.fd, size)


# O_DIRECT only where it is plain and fast: on NFS every direct write is a round trip of its own
# to the server, and FUSE or overlay file systems may take the flag and handle it badly.
LOCAL_DISK_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs"})
_FILE_SYSTEM_TYPES: Dict[int, str] = {}


def file_system_type(fd: int) -> str:
    """The type of the file system fd is on ("ext4", "nfs4", ...), from /proc/self/mountinfo by
    device number; "" when unknown (no /proc, a device it does not list)."""
    device = os.fstat(fd).st_dev
    if device not in _FILE_SYSTEM_TYPES:
        wanted, found = f"{os.major(device)}:{os.minor(device)}", ""
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
                for line in mounts:
                    fields, _, rest = line.partition(" - ")
                    fields = fields.split()
                    if len(fields) > 2 and fields[2] == wanted and rest:
                        found = rest.split()[0]
                        break
        except OSError:
            pass
        _FILE_SYSTEM_TYPES[device] = found
    return _FILE_SYSTEM_TYPES[device]


def direct_writes(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for fd; False where the system or the file system has none."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        import fcntl
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except (ImportError, OSError):
        return False
    return True


_STAGE: List[Any] = []          # a threading.local holding each landing thread's buffer


def stage_buffer():
    """This thread's page-aligned STAGE_SIZE buffer for SparseWriter, made on its first big
    file and kept for the next ones (fresh memory costs page faults; reused, it costs none)."""
    import mmap
    import threading
    if not _STAGE:
        _STAGE.append(threading.local())
    local = _STAGE[0]
    if getattr(local, "buffer", None) is None:
        local.buffer = mmap.mmap(-1, STAGE_SIZE)
    return local.buffer


def land_file(stream: TarSource, folders: "FolderCache", dir_fd: int, name: str, size: int, mode: int,
              mtime: float, direct: bool = False) -> None:
    """Write one regular file's `size` bytes from the stream under a temporary name in the
    folder dir_fd (never through a link), then rename it into place: a few system calls for
    a small file.  Long runs of zeros become holes: a sparse file a job left stays sparse
    instead of filling the disk."""
    part = f".{name}{PART_SUFFIX}"
    mode &= 0o777
    try:
        fd = os.open(part, NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    except FileExistsError:
        os.unlink(part, dir_fd=dir_fd)          # a killed transfer's leftover (a link is removed, not followed)
        fd = os.open(part, NEW_FILE_FLAGS, mode, dir_fd=dir_fd)
    try:
        try:
            out, remaining = SparseWriter(fd, size, direct), size
            while remaining:
                piece = stream.data(remaining)
                out.write(piece)
                remaining -= len(piece)
            out.finish(size)
            if mode & process_umask():
                os.fchmod(fd, mode)             # the umask took bits away at creation
            os.utime(fd, (mtime, mtime))
        finally:
            os.close(fd)
        try:
            os.replace(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            folders.remove(dir_fd, name)        # a folder stood there: it goes, and what was open below it
            os.replace(part, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(part, dir_fd=dir_fd)
        raise


PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                     "aes128-ctr", "aes192-ctr", "aes256-ctr")


def folder_entries(folder: Path) -> List[Tuple[str, str]]:
    """(name in archive, path) for everything under folder, links kept as links."""
    return walk_folder(folder)[0]


RESULT_DEPTH = 128          # a job's folders nested deeper are left out of its results (and listed)


def walk_folder(folder: PathLike, regular_only: bool = False, max_depth: Optional[int] = None
                ) -> Tuple[List[Tuple[str, str]], List[Dict[str, str]]]:
    """(name in archive, path) for everything under folder, each folder before what it holds,
    without recursion (os.walk recurses: 10,000 nested folders raise RecursionError).  With
    `regular_only`, only folders and regular files are taken; links, fifos, sockets, devices,
    folders nested past `max_depth` and what cannot be read are returned as skipped
    ({"path", "reason"}) instead."""
    entries: List[Tuple[str, str]] = []
    skipped: List[Dict[str, str]] = []
    stack = [("", os.fspath(folder), 0)]
    while stack:
        rel_top, top, depth = stack.pop()
        try:
            with os.scandir(top) as listing:
                found = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            if rel_top:
                skipped.append({"path": rel_top, "reason": f"cannot be read: {exc.strerror or exc}"})
            continue
        below = []
        for entry in found:
            rel = f"{rel_top}/{entry.name}" if rel_top else entry.name
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                skipped.append({"path": rel, "reason": f"cannot be read: {exc.strerror or exc}"})
                continue
            if stat.S_ISDIR(mode):
                if max_depth is not None and depth >= max_depth:
                    skipped.append({"path": rel, "reason": f"nested deeper than {max_depth} folders"})
                    continue
                entries.append((rel, entry.path))
                below.append((rel, entry.path, depth + 1))
            elif stat.S_ISREG(mode) or not regular_only:
                entries.append((rel, entry.path))
            else:
                skipped.append({"path": rel, "reason": f"{special_kind(mode)}: only files and folders are kept"})
        stack.extend(reversed(below))
    return entries, skipped


def special_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a fifo"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return kind
    return "not a regular file"


TAR_ENTRY_OVERHEAD = 1536      # a member's header block, and a PAX header for a long name


def entries_size(entries: Iterable[Tuple[str, str]]) -> int:
    """About the size of a tar of the entries (which decides whether it travels inline)."""
    total = 0
    for _, path in entries:
        total += TAR_ENTRY_OVERHEAD
        with contextlib.suppress(OSError):
            info = os.lstat(path)
            total += info.st_size if stat_is_regular(info.st_mode) else 0
    return total


def write_entries_to_fd(fd: int, entries: List[Tuple[str, str]]) -> None:
    """Write a tar of the entries into fd (a pipe, or a plain socket handed over: blocking or
    not), then close it; runs in a thread of its own.  When every entry is a regular file (a
    batch's uploads, most results) TarWriter writes them (big ones by sendfile, not through
    Python's buffers); else tarfile, which knows links and folders too."""
    try:
        regular = all(stat.S_ISREG(os.lstat(path).st_mode) for _, path in entries)
    except OSError:
        regular = False                     # tarfile says which entry is missing
    try:
        if regular:
            out = TarWriter(fd)
            for name, path in entries:
                with open(path, "rb") as handle:
                    out.add(name, handle.fileno(), os.fstat(handle.fileno()))
            out.finish()
        else:
            with tarfile.open(fileobj=DescriptorWriter(fd), mode="w|", bufsize=1 << 20,
                              format=tarfile.PAX_FORMAT) as tar:
                for name, path in entries:
                    tar.add(path, arcname=name, recursive=False)
    except (BrokenPipeError, ConnectionResetError):
        pass                                # the receiver went away or refused: it says why
    finally:
        os.close(fd)


class DescriptorWriter:
    """A file object's write() for tarfile, onto a descriptor that may be non-blocking."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        write_all(self.fd, data)
        return len(data)


async def in_own_thread(function, *args: Any) -> Any:
    """Run a blocking function in a thread of its own and await its result.  Transfers use
    this rather than the loop's shared pool: a tar thread waits for data that only the event
    loop hands it, so a pool filled with such threads (six slow uploads) would wait forever."""
    import asyncio
    import threading
    loop = asyncio.get_event_loop()
    future = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result = function(*args)
        except BaseException as exc:          # handed to the awaiting task
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)
    threading.Thread(target=work, name=getattr(function, "__name__", "transfer"), daemon=True).start()
    return await future


async def fd_ready(fd: int, writable: bool) -> None:
    """Wait until a non-blocking pipe end can be read (or written) without blocking."""
    import asyncio
    loop = asyncio.get_event_loop()
    ready = loop.create_future()
    add, remove = (loop.add_writer, loop.remove_writer) if writable else (loop.add_reader, loop.remove_reader)
    add(fd, lambda: ready.done() or ready.set_result(None))
    try:
        await ready
    finally:
        remove(fd)


async def read_pipe(fd: int, size: int) -> bytes:
    while True:
        try:
            return os.read(fd, size)
        except BlockingIOError:
            await fd_ready(fd, writable=False)


async def write_pipe(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await fd_ready(fd, writable=True)


async def send_tar_stream(writer, entries: List[Tuple[str, str]]) -> None:
    """Stream a tar of the entries to writer, then half-close it (the tar ends at EOF).
    Large files never sit in memory: a thread writes the tar (see send_from_thread)."""
    await send_from_thread(writer, write_entries_to_fd, entries)
    if writer.can_write_eof():
        writer.write_eof()


async def send_from_thread(writer, produce: Callable[..., None], *args: Any) -> None:
    """Run produce(fd, *args) in a thread of its own (it closes fd when done): fd is the socket
    under writer itself when that is a plain Unix one (a client's connection to the head, an
    OpenSSH forward, sshd's to a supervisor), so no byte passes through the event loop; else
    a pipe the loop empties into writer (relay_from_thread).  Cancelled, the socket is shut
    down, so the thread's next write fails and it ends."""
    import asyncio
    transport = getattr(writer, "transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        await relay_from_thread(writer, produce, *args)
        return
    transport.set_write_buffer_limits(0)
    await writer.drain()                # what asyncio held is out: from here the thread writes the socket
    try:
        await in_own_thread(produce, os.dup(sock.fileno()), *args)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            sock.shutdown(socket.SHUT_RDWR)
        raise


async def relay_from_thread(writer, produce: Callable[..., None], *args: Any) -> None:
    """Run produce(fd, *args) in a thread of its own, writing into a pipe (it closes fd when
    done) that the event loop empties into writer as it drains."""
    import asyncio
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    producer = asyncio.ensure_future(in_own_thread(produce, write_fd, *args))
    try:
        while True:
            chunk = await read_pipe(read_fd, 1 << 20)
            if not chunk:
                break
            writer.write(chunk)
            await writer.drain()
    finally:
        os.close(read_fd)
        await producer


async def stream_and_reply(channel: Channel, entries: List[Tuple[str, str]]) -> Dict[str, Any]:
    """Send a tar of the entries on channel while awaiting the receiver's reply: a receiver that
    refuses before reading it all (no space, a refused entry) is heard, not taken for a broken pipe."""
    import asyncio
    sender = asyncio.ensure_future(send_tar_stream(channel.writer, entries))
    reply: Dict[str, Any] = {}
    try:
        reply, _ = await channel.receive()
    finally:
        if not sender.done() and not reply.get("ok"):
            sender.cancel()                 # refused or cut: nobody reads the rest
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await sender
    return reply


def extract_then_close(source, dest: Path, on_bytes=None, direct: bool = False) -> int:
    """extract_tar, then close the pipe it read: a writer still feeding it gets EPIPE
    instead of blocking for ever when extraction stops early (refused entry, full disk)."""
    try:
        return extract_tar(source, dest, on_bytes, direct)
    finally:
        source.close()


class SocketSource:
    """A file-like reader (for the extractor thread) of the bytes an asyncio StreamReader had
    buffered, then of its socket itself until EOF, waiting for data as a blocking read would."""

    def __init__(self, buffered: bytes, sock):
        self.buffered, self.sock = buffered, sock

    def read(self, size: int = -1) -> bytes:
        import select
        size = size if size > 0 else 1 << 20
        if self.buffered:
            data, self.buffered = self.buffered[:size], self.buffered[size:]
            return data
        while True:
            try:
                return os.read(self.sock.fileno(), size)         # read(2): counted as the process's reads
            except (BlockingIOError, InterruptedError):
                select.select([self.sock], [], [])

    def close(self) -> None:
        self.sock.close()


def plain_socket_of(reader):
    """(transport, socket) under an asyncio StreamReader on a Unix socket, else (None, None)
    (asyncssh's readers have their own buffers and flow control)."""
    transport = getattr(reader, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX or not isinstance(getattr(reader, "_buffer", None), bytearray):
        return None, None
    return transport, sock


async def receive_tar(reader, dest: Path, on_bytes=None, direct: bool = False) -> int:
    """Extract the tar that arrives on reader until EOF into dest, in a thread, safely;
    on_bytes(count) (called in that thread) hears of every chunk; direct as in extract_tar.
    On a plain Unix socket (the local head, an OpenSSH forward) the thread reads the socket
    itself: passing each chunk through the event loop cost 4x the CPU of extracting it."""
    import asyncio
    transport, sock = plain_socket_of(reader)
    if transport is not None:
        transport.pause_reading()
        buffered = bytes(reader._buffer)
        reader._buffer.clear()
        source = SocketSource(buffered, socket.socket(fileno=os.dup(sock.fileno())))
        try:
            return await in_own_thread(extract_then_close, source, dest, on_bytes, direct)
        finally:
            source.close()
            with contextlib.suppress(Exception):
                transport.resume_reading()
    read_fd, write_fd = os.pipe()
    widen_pipe(write_fd)
    os.set_blocking(write_fd, False)
    source = os.fdopen(read_fd, "rb", buffering=0)
    extractor = asyncio.ensure_future(in_own_thread(extract_then_close, source, dest, on_bytes, direct))
    try:
        while True:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            await write_pipe(write_fd, chunk)
    finally:
        os.close(write_fd)
        try:
            return await extractor
        finally:
            source.close()


def quote_argv(argv: List[str]) -> str:
    """One shell-safe command line: every argument quoted (sshd hands it to a shell)."""
    import shlex
    return " ".join(shlex.quote(str(a)) for a in argv)


class LocalTransport:
    """This machine, no SSH: the embedded default."""

    def __init__(self, node: NodeSpec):
        self.node = node

    async def connect(self) -> None:
        return None

    async def run(self, argv: List[str], stdin: bytes = b"") -> Tuple[int, bytes, bytes]:
        import asyncio
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.PIPE,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(stdin)
        return proc.returncode or 0, out, err

    async def open_socket(self, path: str):
        import asyncio
        return await asyncio.open_unix_connection(path, limit=2 ** 24)

    open_bulk_socket = open_socket

    async def close(self) -> None:
        return None

    def describe_error(self, exc: BaseException) -> str:
        return str(exc) or type(exc).__name__


class SshTransport:
    """One node over one persistent asyncssh connection; every channel reuses it.

    Host keys are checked against known_hosts (asyncssh's default, honouring
    ~/.ssh/config), never skipped.  aes-gcm comes first: it is the fastest cipher
    where the CPU has AES instructions, which is every lab machine of the last decade."""

    def __init__(self, node: NodeSpec, connect_timeout: float = 15.0):
        self.node = node
        self.conn = None
        self.connect_timeout = connect_timeout

    async def connect(self) -> None:
        asyncssh = import_asyncssh()
        options: Dict[str, Any] = {}
        if self.node.port:
            options["port"] = self.node.port
        if self.node.user:
            options["username"] = self.node.user
        self.conn = await asyncssh.connect(
            self.node.host, encryption_algs=PREFERRED_CIPHERS, compression_algs=None,
            keepalive_interval=5, keepalive_count_max=3, connect_timeout=self.connect_timeout, **options)
        await enable_server_nodelay(self.conn)

    async def run(self, argv: List[str], stdin: bytes = b"") -> Tuple[int, bytes, bytes]:
        result = await self.conn.run(quote_argv(argv), input=stdin, encoding=None, check=False)
        return result.exit_status if result.exit_status is not None else 255, result.stdout or b"", \
            result.stderr or b""

    async def open_socket(self, path: str):
        """A stream to a Unix socket on the node: stream-local forwarding when sshd allows
        it, else a relay process (`node attach`) on an exec channel."""
        asyncssh = import_asyncssh()
        try:
            return await self.conn.open_unix_connection(path)
        except asyncssh.ChannelOpenError:
            process = await self.conn.create_process(
                quote_argv(self.relay_argv(path)), encoding=None)
            return process.stdout, process.stdin

    def relay_argv(self, path: str) -> List[str]:
        return [self.node.python, self.remote_pyz, "node", "attach", "--socket", path]

    remote_pyz = ""
    bulk: Any = None        # the OpenSshForward bulk transfers take, False when they stay on asyncssh

    async def open_bulk_socket(self, path: str):
        """A stream for one bulk transfer (results, uploads): through OpenSSH's `ssh` where it is
        installed, so the decryption runs in its process, not in the head's; else open_socket."""
        if self.bulk is None:
            self.bulk = False
            program, forward = openssh_program(), None
            try:
                forward = program and OpenSshForward(program, self.node.host, self.node.user, self.node.port, path)
            except Failed as exc:
                log(f"node {self.node.name}: bulk transfers stay on asyncssh ({exc})")
            if forward and forward.usable and await self.bulk_works(forward):
                self.bulk = forward
        if self.bulk and self.bulk.remote == path:
            try:
                return await self.bulk.open()
            except (Failed, OSError) as exc:
                log(f"node {self.node.name}: a bulk transfer goes over asyncssh ({one_line(str(exc))})")
        return await self.open_socket(path)

    async def bulk_works(self, forward) -> bool:
        """Whether the forward reaches the supervisor (sshd may forbid stream-local forwarding)."""
        import asyncio
        try:
            channel = Channel(*await forward.open())
            try:
                reply, _ = await asyncio.wait_for(channel.request({"op": "hello", "id": 0}), 30)
            finally:
                channel.close()
            return bool(reply.get("ok"))
        except (Failed, OSError, asyncio.TimeoutError) as exc:
            log(f"node {self.node.name}: bulk transfers stay on asyncssh ({one_line(str(exc) or type(exc).__name__)})")
            return False

    async def close(self) -> None:
        if self.bulk:
            import asyncio
            await asyncio.get_event_loop().run_in_executor(None, self.bulk.stop)
            self.bulk = None
        if self.conn is not None:
            self.conn.close()
            with contextlib.suppress(Exception):
                await self.conn.wait_closed()
            self.conn = None

    def describe_error(self, exc: BaseException) -> str:
        asyncssh = import_asyncssh()
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return (f"host key of {self.node.host} not verified ({exc.reason}): it is unknown or has "
                    "changed; check the head's known_hosts")
        if isinstance(exc, asyncssh.PermissionDenied):
            return f"SSH login to {self.node.host} refused: {exc.reason}"
        if isinstance(exc, asyncssh.DisconnectError):
            return f"SSH to {self.node.host}: {exc.reason}"
        if isinstance(exc, OSError):
            return f"cannot reach {self.node.host}: {exc.strerror or exc}"
        return f"{self.node.host}: {exc or type(exc).__name__}"


async def enable_server_nodelay(conn) -> None:
    """sshd turns Nagle off for a connection only once some session has a pseudo-terminal;
    without that, small replies can wait ~40 ms for a delayed ACK.  One pty command fixes it
    for every later channel."""
    with contextlib.suppress(Exception):
        await conn.run("true", term_type="dumb", check=False)


def transport_for(node: NodeSpec):
    return LocalTransport(node) if node.is_local else SshTransport(node)


# OpenSSH's `ssh`, where it is installed, carries the client's streams: its crypto is C in a
# process of its own (asyncssh's is Python in ours, about 4.5 s of CPU per GiB), and one master
# connection kept for a while (ControlPersist) makes every later command skip the handshake.
# asyncssh remains the fallback when there is no `ssh` (or DISTRIBUTE_SSH=asyncssh).

SSH_PERSIST_SECONDS = 300           # an idle master connection exits after this long


def openssh_program() -> Optional[str]:
    """The `ssh` to carry streams with, or None for asyncssh."""
    if os.environ.get("DISTRIBUTE_SSH", "").strip().lower() == "asyncssh":
        return None
    return shutil.which("ssh")


def ssh_config_file() -> Optional[str]:
    """$HOME/.ssh/config when HOME is not the passwd entry's home.  asyncssh (and so our
    fallback) reads ~/.ssh from $HOME, OpenSSH from the passwd entry; this keeps both alike."""
    import pwd
    home = os.path.expanduser("~")
    try:
        passwd_home = pwd.getpwuid(os.getuid()).pw_dir
    except KeyError:
        passwd_home = ""
    config = os.path.join(home, ".ssh", "config")
    if os.path.realpath(home) == os.path.realpath(passwd_home) or not os.path.isfile(config):
        return None
    return config


def private_runtime_dir() -> Path:
    """A folder only this user can enter, for SSH control and forwarded sockets:
    $XDG_RUNTIME_DIR/distribute-ssh, else ~/.cache/distribute-ssh."""
    import stat
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    base = Path(runtime) if runtime and os.path.isdir(runtime) else Path(os.path.expanduser("~"), ".cache")
    folder = base / "distribute-ssh"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        raise Failed(f"cannot make {folder}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise Failed(f"{folder} must be a folder of yours that only you can open "
                     f"(remove it, or chmod 700 it)")
    return folder


def openssh_problem(text: str) -> Tuple[str, str]:
    """(kind, last line) of what an `ssh` that could not connect wrote on stderr; kinds as
    in head_problem: host-key, denied, refused, no-such-host, timeout, other."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    joined = " ".join(lines)
    last = lines[-1] if lines else "no reason given"
    for kind, marks in (("host-key", ("Host key verification failed", "host key is known",
                                      "HOST IDENTIFICATION HAS CHANGED")),
                        ("denied", ("Permission denied",)), ("refused", ("Connection refused",)),
                        ("no-such-host", ("Could not resolve hostname", "Name or service not known")),
                        ("timeout", ("timed out",))):
        if any(mark in joined for mark in marks):
            return kind, last
    return "other", last


def openssh_failure(host: str, text: str, user: Optional[str] = None, port: Optional[int] = None,
                    head: bool = False) -> str:
    """One line for an `ssh` that could not connect, from what it wrote on stderr: in a lab
    member's terms when it was the way to the head, in the admin's when to a node."""
    kind, last = openssh_problem(text)
    if head:
        return head_problem(kind, user, host, port, f"ssh to {host} failed: {last}")
    if kind == "host-key":
        return (f"host key of {host} not verified: it is unknown or has changed; check your "
                f"known_hosts (run `ssh {host}` once and compare the fingerprint)")
    if kind == "denied":
        return f"SSH login to {host} refused: {last}"
    return f"ssh to {host} failed: {last}"


def cpu_has_aes() -> bool:
    """Whether this machine's CPU has AES instructions (x86 `aes`, ARM `aes` in /proc/cpuinfo;
    True where that cannot be read)."""
    try:
        with open("/proc/cpuinfo") as info:
            return any(line.split(":", 1)[0].strip() in ("flags", "Features") and "aes" in line.split(":", 1)[1].split()
                       for line in info)
    except OSError:
        return True


def unix_connect(path: str):
    """A blocking stream socket connected to the Unix socket at path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except BaseException:
        sock.close()
        raise
    return sock


def request_on_socket(sock, header: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
    """One request and its reply over a blocking socket, in Channel's frames (a command that
    asks one thing needs no event loop: importing asyncio alone costs more than the answer)."""
    body = json.dumps(header, separators=(",", ":")).encode()
    reader = sock.makefile("rb", buffering=1 << 16)

    def exactly(size: int) -> bytes:
        try:
            data = reader.read(size) if size else b""
        except ConnectionError:
            data = b""
        if len(data) != size:
            raise ProtocolError("connection closed")
        return data
    try:
        sock.sendall(len(body).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + body + payload)
    except ConnectionError:
        raise ProtocolError("connection closed") from None
    prefix = exactly(8)
    size, payload_size = int.from_bytes(prefix[:4], "big"), int.from_bytes(prefix[4:], "big")
    if size > MAX_HEADER:
        raise ProtocolError("frame header too large")
    try:
        reply = json.loads(exactly(size))
    except ValueError as exc:
        raise ProtocolError(f"bad frame: {exc}") from None
    return reply, exactly(payload_size)


class OpenSshForward:
    """A Unix socket here leading to a Unix socket on another machine, through one OpenSSH
    master connection (ControlMaster) that stays up SSH_PERSIST_SECONDS after its last use.

    Host keys are checked by ssh against the user's known_hosts (BatchMode: an unknown key
    is refused, never asked about or accepted).  The control and forwarded sockets live in
    private_runtime_dir(), made by ssh with mode 0600: nobody else can use the connection."""

    def __init__(self, ssh: str, host: str, user: Optional[str], port: Optional[int], remote: str,
                 persist: int = SSH_PERSIST_SECONDS):
        self.ssh, self.host, self.user, self.port, self.remote, self.persist = ssh, host, user, port, remote, persist
        self.to_head = False            # a lab member's way to the head (errors in their terms), not a node's
        self.config = ssh_config_file()
        key = hashlib.sha256(repr((host, user, port, remote, self.config)).encode()).hexdigest()[:20]
        folder = private_runtime_dir()
        self.control, self.local, self.log_path, self.lock_path = (
            folder / f"{key}.{suffix}" for suffix in ("ctl", "sock", "log", "lock"))

    @property
    def usable(self) -> bool:
        """Unix socket paths are limited to 108 bytes: a very long HOME cannot host ours."""
        return len(str(self.control)) < 100

    def master_argv(self, ciphers: Optional[List[str]] = None) -> List[str]:
        argv = [self.ssh] + (["-F", self.config] if self.config else [])
        argv += ["-o", "Ciphers=" + ",".join(ciphers)] if ciphers else []
        argv += ["-o", "BatchMode=yes", "-o", "ControlMaster=yes", "-o", f"ControlPath={self.control}",
                 "-o", f"ControlPersist={self.persist}", "-o", "ExitOnForwardFailure=yes",
                 "-o", "StreamLocalBindUnlink=yes", "-o", "StreamLocalBindMask=0177",
                 "-L", f"{self.local}:{self.remote}", "-N", "-f"]
        argv += (["-l", self.user] if self.user else []) + (["-p", str(self.port)] if self.port else [])
        return argv + ["--", self.host]

    async def open(self):
        """(reader, writer) on the remote socket, starting the master when none answers."""
        import asyncio
        with contextlib.suppress(OSError):
            return await asyncio.open_unix_connection(str(self.local), limit=2 ** 24)
        await asyncio.get_event_loop().run_in_executor(None, self.start_unless_up)
        return await asyncio.open_unix_connection(str(self.local), limit=2 ** 24)

    def connect(self):
        """A blocking socket on the remote socket (what a one-request command needs: no asyncio)."""
        try:
            return unix_connect(str(self.local))
        except OSError:
            self.start_unless_up()
            return unix_connect(str(self.local))

    def start_unless_up(self) -> None:
        """Start the master, unless another command did while we waited for the lock."""
        import fcntl
        lock = os.open(str(self.lock_path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            with contextlib.suppress(OSError):
                unix_connect(str(self.local)).close()
                return
            self.start()
        finally:
            os.close(lock)

    def start(self) -> None:
        for leftover in (self.control, self.local):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        with open(os.open(str(self.log_path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as err:
            try:
                code = subprocess.run(self.master_argv(self.ciphers()), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=err, timeout=120).returncode
            except subprocess.TimeoutExpired:
                raise Failed(f"ssh to {self.host}: no answer within 120 s") from None
        if code != 0 or not self.local.exists():
            text = self.log_path.read_text(errors="replace")
            raise Failed(one_line(openssh_failure(self.host, text, self.user, self.port, self.to_head)))

    def ciphers(self) -> Optional[List[str]]:
        """The ciphers ssh would offer this host (its configuration as `ssh -G` reads it), AES-GCM
        first where the CPU has AES instructions: there it moves a GiB in about 60% of the time
        chacha20-poly1305 (OpenSSH's first choice) takes, in ssh and in sshd.  Only the order
        changes, never the set; None (ssh decides) when anything is unclear."""
        if not cpu_has_aes():
            return None
        argv = [self.ssh] + (["-F", self.config] if self.config else []) + ["-G"]
        argv += (["-l", self.user] if self.user else []) + (["-p", str(self.port)] if self.port else [])
        try:
            out = subprocess.run(argv + ["--", self.host], stdin=subprocess.DEVNULL, capture_output=True,
                                 text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        offered = next((line.split()[1].split(",") for line in out.splitlines()
                        if line.startswith("ciphers ") and len(line.split()) == 2), None)
        if not offered:
            return None
        first = [c for c in ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") if c in offered]
        return first + [c for c in offered if c not in first] if first else None

    def stop(self) -> None:
        """Ask the master to exit now (the head does when it stops; clients let it idle out)."""
        if self.control.exists():
            subprocess.run([self.ssh, "-o", f"ControlPath={self.control}", "-O", "exit", "--", self.host],
                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------
# 9. Workstation pause
#
# The node side of a pause.  This section owns the pause locks (one JSON
# file per pausing user in pause_dir()), deciding whether the node is paused,
# stopping and continuing a job's whole process tree, and the watcher the node
# supervisor runs.  The lock is the only channel between `pause` (run by any
# local user) and the supervisor (run by the head's account), so everything
# here trusts files only as far as their owner and their age allow.
# ---------------------------------------------------------------------------

_PAUSE_LOCK_MAX_BYTES = 4096
# A lock can claim any expiry; none keeps jobs stopped longer than the maximum
# pause (plus a little clock slack) after it was written.
_PAUSE_LOCK_SLACK = 60.0
# Directory mtimes can be coarse (1 s on some file systems): while the folder
# changed this recently, re-read it on every tick instead of trusting the stamp.
_RACY_STAMP_SECONDS = 2.0
# While paused, look for processes that escaped (or were continued by hand) this often.
_PAUSE_RESWEEP_SECONDS = 1.0
_FREEZE_MAX_ROUNDS = 100


@record
class PauseLock:
    """One user's pause: jobs stay stopped until `until` (epoch seconds)."""
    user: str
    until: float
    pid: int                  # the waiting `pause` process (for --detach: the one that wrote it)
    detached: bool
    since: float = 0.0        # when the lock was written
    pid_started: Optional[float] = None  # pid's start time, so a reused pid is not taken for it
    reason: str = ""          # set only for the supervisor's own pauses (owner policy), never read from a file


def pause_dir() -> Path:
    """The lock folder ($DISTRIBUTE_PAUSE_DIR, else the one the head noted beside the running
    pyz, else /var/tmp/distribute), created sticky and world-writable."""
    folder = Path(configured_pause_folder())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(folder)
        # mkdir's mode is filtered by the umask; every local user must be able to add their lock.
        os.chmod(folder, 0o1777)
    except FileExistsError:
        pass
    except OSError as exc:
        raise Failed(f"cannot create the pause folder {folder}: {exc.strerror}") from None
    check_pause_dir(folder)
    return folder


def note_pause_dir(folder: str) -> None:
    """`node start`: note the supervisor's pause folder beside the pyz it runs from."""
    pyz = running_pyz()
    if pyz:
        note = Path(pyz).parent / PAUSE_DIR_NOTE
        with contextlib.suppress(OSError):    # a read-only bin folder: `pause` falls back to the default
            if not note.exists() or note.read_text().strip() != folder:
                write_atomically(note, lambda tmp: (tmp.write_text(folder + "\n"), os.chmod(tmp, 0o644)))


def resume_command() -> str:
    """How this workstation's users run `resume` (a node may have nothing but the pyz)."""
    pyz = running_pyz()
    return f"python3 {shlex.quote(pyz)} resume" if pyz else "distribute resume"


def check_pause_dir(folder: Path) -> None:
    """Refuse a lock folder that another user could swap or empty behind our back."""
    problem = pause_folder_problem(str(folder), os.lstat(folder))
    if problem:
        raise UserError(problem)


def pause_lock_path(folder: Path, user: str) -> Path:
    return folder / pause_lock_name(user)


def write_pause_lock(folder: Path, until: float, detached: bool, pid: Optional[int] = None) -> PauseLock:
    """Atomically write (or replace) the calling user's lock; returns what was written."""
    pid = os.getpid() if pid is None else pid
    lock = PauseLock(current_user(), until, pid, detached, time.time(), process_start_time(pid))
    path = pause_lock_path(folder, lock.user)
    try:
        write_lock_file(str(folder), path.name, dataclasses.asdict(lock))
    except PermissionError as exc:
        if exc.filename2 is None:
            raise Failed(f"cannot write a pause lock in {folder}: permission denied "
                         f"(the folder needs mode 1777)") from None
        raise Failed(f"cannot replace {path}: it belongs to {_owner_name(path)}; ask root to remove it") from None
    return lock


def _owner_name(path: Path) -> str:
    try:
        return _user_of_uid(os.lstat(path).st_uid)
    except OSError:
        return "someone else"


def remove_pause_lock(folder: Path, user: str, pid: Optional[int] = None) -> bool:
    """End `user`'s pause; with pid, only if the lock is still that process's.  True if one was removed."""
    path = pause_lock_path(folder, user)
    if pid is not None:
        found = read_pause_lock(path)
        if found is None or found[0].pid != pid:
            return False
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except PermissionError:
        raise Failed(f"cannot remove {path}: permission denied") from None
    return True


def read_pause_lock(path: Path) -> Optional[Tuple[PauseLock, os.stat_result]]:
    """The lock in `path` and the file's stat, or None for anything that is not a sound lock file."""
    opened = open_regular_file(path, os.O_NONBLOCK)   # a FIFO planted under a lock's name must not hang us
    if opened is None:
        return None
    fd, info = opened
    try:
        data = json.loads(os.read(fd, _PAUSE_LOCK_MAX_BYTES).decode())
        lock = PauseLock(
            # Who paused is whoever owns the file: a lock cannot speak for someone else.
            user=_user_of_uid(info.st_uid),
            until=min(float(data["until"]), lock_written_at(info) + MAX_PAUSE_SECONDS + _PAUSE_LOCK_SLACK),
            pid=int(data["pid"]), detached=bool(data["detached"]), since=float(data.get("since") or 0.0),
            pid_started=None if data.get("pid_started") is None else float(data["pid_started"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    finally:
        os.close(fd)
    return lock, info


# When a lock was written, by clocks its owner cannot set: st_mtime is whatever `touch -d`
# says, but the kernel stamps st_ctime itself on every change (a utime included), and
# this process remembers (monotonic) when it first saw each version of each lock file.
_LOCKS_FIRST_SEEN: Dict[Tuple[int, int, int], float] = {}


def lock_written_at(info: os.stat_result) -> float:
    """The earliest of the lock's inode change time and when this process first saw it."""
    key = (info.st_dev, info.st_ino, info.st_ctime_ns)
    first_seen = _LOCKS_FIRST_SEEN.setdefault(key, time.monotonic())
    if len(_LOCKS_FIRST_SEEN) > 4096:              # locks come and go: forget old versions
        _LOCKS_FIRST_SEEN.clear()
        _LOCKS_FIRST_SEEN[key] = first_seen
    return min(info.st_ctime, time.time() - (time.monotonic() - first_seen))


def pauser_alive(lock: PauseLock, thorough: bool = True) -> bool:
    """Whether the process waiting on a non-detached lock still runs (pid reuse checked when thorough)."""
    if lock.detached:
        return True
    try:
        os.kill(lock.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, it is just someone else's
    if not thorough or lock.pid_started is None:
        return True
    started = process_start_time(lock.pid)
    # None: exists but hidden from us (hidepid); give it the benefit of the doubt.
    return started is None or abs(started - lock.pid_started) < 1.0


def _lock_files(folder: Path) -> List[Path]:
    return [folder / name for name in os.listdir(folder)
            if name.startswith(PAUSE_LOCK_PREFIX) and name.endswith(PAUSE_LOCK_SUFFIX)]


def _remove_if_unchanged(path: Path, seen: Optional[os.stat_result]) -> None:
    """Drop a stale lock, unless its user replaced it since we read it (or it is not ours to drop)."""
    with contextlib.suppress(OSError):
        now = os.lstat(path)
        if seen is None or (now.st_ino, now.st_dev, now.st_mtime_ns) == (seen.st_ino, seen.st_dev, seen.st_mtime_ns):
            os.unlink(path)


def active_pauses(folder: Optional[Path] = None, now: Optional[float] = None) -> List[PauseLock]:
    """The pauses in force, soonest to end first.  Stale locks are ignored, and removed when we may."""
    folder = pause_dir() if folder is None else folder
    now = time.time() if now is None else now
    try:
        paths = _lock_files(folder)
    except OSError:
        return []  # no readable folder: no pause can be in force
    found = []
    for path in paths:
        read = read_pause_lock(path)
        if read is None:
            info = _lstat_or_none(path)
            # Locks are written atomically, so an unreadable one is garbage, not half-written.
            if info is not None and now - info.st_mtime > 10:
                _remove_if_unchanged(path, info)
            continue
        lock, info = read
        if lock.until > now and pauser_alive(lock):
            found.append(lock)
        else:
            _remove_if_unchanged(path, info)
    return sorted(found, key=lambda lock: (lock.until, lock.user))


def _lstat_or_none(path: Path) -> Optional[os.stat_result]:
    try:
        return os.lstat(path)
    except OSError:
        return None


def is_paused(folder: Optional[Path] = None) -> bool:
    """For the supervisor, before it starts a job or a build."""
    return bool(active_pauses(folder))


def clock_time(timestamp: float) -> str:
    """A local wall-clock time for people: '14:05:09', with the date when it is not today."""
    moment = time.localtime(timestamp)
    if time.strftime("%Y-%m-%d", moment) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S", moment)


def describe_pauses(pauses: List[PauseLock]) -> str:
    """'alice until 14:05:09, bob until 15:00:00' (for `resume` and `nodes`)."""
    return ", ".join(f"{lock.user} until {clock_time(lock.until)}" for lock in pauses)


# --- stopping and continuing a job's processes -------------------------------
#
# A job is the process tree under its root, which the supervisor starts as the
# leader of a new session (pgid == sid == pid).  Members: everything in that
# group or session, plus every descendant of a member (a child that called
# setsid() or setpgid() is still found through its parent).  Stopping is done
# top-down and repeated until a pass finds nobody new: a process that forks
# while we stop it either has its child already (the next pass sees it) or
# has its fork restarted after the SIGSTOP (the kernel does that), so the
# repetition converges.  Continuing is bottom-up, children before parents:
# a parent that wakes up first could take a still-stopped child for hung.

@record
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int       # start time in clock ticks (or any value that changes when a pid is reused)
    state: str       # 'R', 'S', 'T' (stopped), 'Z' ...
    ticks: int = 0   # CPU time used so far (user + system, clock ticks), for the owner policy
    tty: int = 0     # controlling terminal (device number), 0 for none
    comm: str = ""


def process_table() -> Dict[int, ProcInfo]:
    """Every visible process.  Reads /proc directly: psutil.process_iter is ~5x slower here."""
    if not os.path.isdir("/proc/self"):
        return _process_table_psutil()
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as stat_file:
                data = stat_file.read()
        except OSError:
            continue  # it just ended
        # comm (field 2) may hold spaces and parentheses: split after its last ')'.
        cut = data.rindex(b")")
        rest = data[cut + 2:].split()
        table[int(name)] = ProcInfo(int(name), int(rest[1]), int(rest[2]), int(rest[3]), int(rest[19]),
                                    rest[0].decode(), int(rest[11]) + int(rest[12]), int(rest[4]),
                                    data[data.index(b"(") + 1:cut].decode("utf-8", "replace"))
    return table


def _process_table_psutil() -> Dict[int, ProcInfo]:
    import psutil
    table = {}
    for proc in psutil.process_iter(["ppid", "create_time", "status"]):
        try:
            table[proc.pid] = ProcInfo(proc.pid, proc.info["ppid"] or 0, os.getpgid(proc.pid),
                                       os.getsid(proc.pid), int(proc.info["create_time"] * 100),
                                       "T" if proc.info["status"] == psutil.STATUS_STOPPED else "R")
        except (OSError, TypeError):
            continue
    return table


def _job_roots(root_pids: Iterable[int]) -> List[int]:
    """Roots that are safe to signal as groups: never init, never our own group or session."""
    ours = {os.getpid(), os.getpgrp(), os.getsid(0)}
    return sorted({pid for pid in root_pids if pid > 1 and pid not in ours})


def job_processes(root_pids: Iterable[int], table: Optional[Dict[int, ProcInfo]] = None) -> List[int]:
    """Every process of the given jobs, parents before their children."""
    roots = set(_job_roots(root_pids))
    table = process_table() if table is None else table
    members = {pid for pid, proc in table.items()
               if pid in roots or proc.pgid in roots or proc.sid in roots}
    children: Dict[int, List[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    # Breadth-first from the members whose parent is not one: parents come out first.
    ordered = sorted((pid for pid in members if table[pid].ppid not in members),
                     key=lambda pid: (pid not in roots, pid))
    seen = set(ordered)
    for pid in ordered:  # grows while we walk it
        for child in sorted(children.get(pid, ())):
            if child not in seen:
                seen.add(child)
                ordered.append(child)
    ours = os.getpid()
    return [pid for pid in ordered if pid != ours]


def _send(pid: int, signum: int, group: bool = False) -> None:
    try:
        (os.killpg if group else os.kill)(pid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # ended meanwhile, or not ours to signal


def stop_job_processes(root_pids: Iterable[int]) -> Dict[int, int]:
    """SIGSTOP every process of the jobs; returns {pid: start} of everything stopped."""
    roots = _job_roots(root_pids)
    for root in roots:
        _send(root, signal.SIGSTOP, group=True)  # the whole group at once, before any scan
    stopped: Dict[int, int] = {}
    for _ in range(_FREEZE_MAX_ROUNDS):
        table = process_table()
        fresh = [pid for pid in job_processes(roots, table) if pid not in stopped]
        if not fresh:
            break
        for pid in fresh:
            _send(pid, signal.SIGSTOP)
            stopped[pid] = table[pid].start
    return stopped


def freeze_tree(root_pids: Iterable[int]) -> List[int]:
    """SIGSTOP every process of each job (group, session and descendants); returns their pids."""
    return sorted(stop_job_processes(root_pids))


def signal_job_processes(root_pids: Iterable[int], signum: int) -> List[int]:
    """Send signum to every process of the jobs, including children that left the job's
    session (a killpg alone misses them); returns the pids signalled."""
    roots = _job_roots(root_pids)
    ordered = job_processes(roots)
    for pid in ordered:
        _send(pid, signum)
    for root in roots:
        _send(root, signum, group=True)
    return ordered


def thaw_tree(root_pids: Iterable[int], also: Optional[Dict[int, int]] = None) -> List[int]:
    """SIGCONT every process of each job, children first; `also` ({pid: start}, from
    stop_job_processes) adds processes stopped earlier that left the tree, if still the same."""
    roots = _job_roots(root_pids)
    table = process_table()
    ordered = job_processes(roots, table)
    strays = [pid for pid, start in (also or {}).items()
              if pid not in ordered and pid in table and table[pid].start == start]
    for pid in strays + ordered[::-1]:
        _send(pid, signal.SIGCONT)
    for root in roots:
        _send(root, signal.SIGCONT, group=True)  # anyone who joined the group since the scan
    return sorted(set(strays + ordered))


# --- the watcher -------------------------------------------------------------

@record
class PauseWatch:
    """What the watcher knows between ticks: the pauses in force and what it stopped."""
    folder: Path
    stamp: Optional[Tuple[int, int]] = None         # (inode, mtime_ns) of the folder at the last read
    pauses: List[PauseLock] = field(default_factory=list)
    next_expiry: float = float("inf")
    stopped: Dict[int, int] = field(default_factory=dict)  # pid -> start, everything we stopped
    stopped_roots: set = field(default_factory=set)
    last_sweep: float = 0.0
    settled: bool = False  # False until the first tick: a restarted supervisor thaws leftovers
    in_force: List[Tuple[str, float, str]] = field(default_factory=list)   # at the last tick
    all_pauses: List[PauseLock] = field(default_factory=list)   # locks and owner pauses at the last tick

    def poll(self, now: float) -> List[PauseLock]:
        """The pauses in force; costs one stat() per tick unless something changed."""
        try:
            info = os.stat(self.folder)
        except OSError:
            self.stamp, self.pauses, self.next_expiry = None, [], float("inf")
            return self.pauses
        stamp = (info.st_ino, info.st_mtime_ns)
        if (stamp != self.stamp or time.time() - info.st_mtime < _RACY_STAMP_SECONDS
                or now >= self.next_expiry
                or not all(pauser_alive(lock, thorough=False) for lock in self.pauses)):
            self.stamp = stamp
            self.pauses = active_pauses(self.folder, now)
            self.next_expiry = min((lock.until for lock in self.pauses), default=float("inf"))
        return self.pauses

    def step(self, roots: Iterable[int], now: Optional[float] = None, extra: Iterable[PauseLock] = ()) -> bool:
        """One tick: stop or continue jobs as the pauses (and `extra`, the supervisor's own
        pauses for the workstation's owner) say.  True when the pauses changed."""
        now = time.time() if now is None else now
        before = self.in_force
        pauses = self.poll(now) + list(extra)
        self.in_force = [(lock.user, lock.until, lock.reason) for lock in pauses]
        self.all_pauses = pauses
        roots = set(_job_roots(roots))
        if pauses:
            # Every tick: jobs started meanwhile.  Every second: all of them again, for
            # processes continued by hand or missed while a job was being started.
            sweep = now - self.last_sweep >= _PAUSE_RESWEEP_SECONDS
            targets = roots if sweep else roots - self.stopped_roots
            if targets:
                self.stopped.update(stop_job_processes(targets))
            self.stopped_roots |= roots
            if sweep:
                self.last_sweep = now
        elif self.stopped_roots or self.stopped or not self.settled:
            self.release(roots)
        self.settled = True
        return before != self.in_force

    def release(self, roots: Iterable[int] = ()) -> None:
        """Continue everything we stopped (also on shutdown: never leave jobs stopped)."""
        thaw_tree(set(roots) | self.stopped_roots, also=self.stopped)
        self.stopped, self.stopped_roots, self.last_sweep = {}, set(), 0.0


async def watch_pauses(job_roots: Callable[[], List[int]],
                       on_change: Optional[Callable[[List[PauseLock]], None]] = None,
                       interval: float = 0.05, folder: Optional[Path] = None,
                       extra: Callable[[], List[PauseLock]] = list) -> None:
    """Run forever in the supervisor's event loop: stop every job while any pause is in force.

    job_roots() gives the root pids of the running jobs (each a session leader);
    extra() the supervisor's own pauses (owner policy), which stop jobs exactly as locks do;
    on_change(pauses) is called whenever who pauses or until when changes.
    Cancelling the task continues whatever it stopped."""
    import asyncio
    watch = PauseWatch(pause_dir() if folder is None else folder)
    try:
        while True:
            if watch.step(job_roots(), extra=extra()) and on_change is not None:
                on_change(list(watch.all_pauses))
            await asyncio.sleep(interval)
    finally:
        watch.release(job_roots())


# --- the owner policy: pausing by itself for the people at the workstation ----
#
# Decided on the node, once a second, so it works while the head is away.  Two
# signals, both readable without root: CPU used by the owners' processes that are
# not distribute's (a job's whole tree never counts, however it forks), and a
# terminal of theirs with recent input (the tty's access time, which is what `w`
# shows as idle; a terminal opened through sshd counts only when the policy says
# so).  The decision itself is a pure function of the policy, the last state and
# one sample, so it is tested without processes.

_OWNER_TICK = 1.0


def desk_slots(policy: OwnerPolicy, moment: datetime.datetime) -> Optional[int]:
    """The node's slots at this local time: the fewest of the desk-hour ranges it falls in, None outside."""
    minute = moment.hour * 60 + moment.minute
    found = [d.slots for d in policy.desk_hours if moment.weekday() in d.days and d.start <= minute < d.end]
    return min(found) if found else None


@record
class OwnerSample:
    """What the owners did since the last sample."""
    cpu: float = 0.0                 # percent of one core, all counted processes together
    top_user: str = ""               # who used most of it
    top_cpu: float = 0.0
    console: Optional[str] = None    # 'alice on pts/3 (ssh)' when a terminal of theirs is active
    top_process: str = ""            # 'make (pid 1234)': the busiest counted process, for the log


@record
class OwnerState:
    busy_since: Optional[float] = None   # start of the current run of samples over the CPU limit
    reason: str = ""                     # while the policy pauses the node: why ...
    who: str = ""                        # ... because of whom ...
    since: float = 0.0                   # ... and since when
    quiet_since: Optional[float] = None  # while paused: since when nothing counted


def owner_decide(policy: OwnerPolicy, state: OwnerState, sample: OwnerSample, now: float) -> OwnerState:
    """One step of the policy: pause after busy_for seconds of load or at console input, resume
    after `quiet` seconds with neither."""
    busy = policy.busy_cpu is not None and sample.cpu > policy.busy_cpu
    busy_since = (now if state.busy_since is None else state.busy_since) if busy else None
    console = sample.console if policy.console_idle is not None else None
    if not state.reason:
        if console:
            return OwnerState(busy_since, f"console active: {console}", console.split(" ")[0], now)
        if busy and now - busy_since >= policy.busy_for:
            return OwnerState(busy_since, f"owner busy: {sample.top_cpu:.0f}% CPU by {sample.top_user}",
                              sample.top_user, now)
        return OwnerState(busy_since)
    if busy or console:
        return dataclasses.replace(state, busy_since=busy_since, quiet_since=None)
    quiet_since = now if state.quiet_since is None else state.quiet_since
    if now - quiet_since >= policy.quiet:
        return OwnerState()
    return dataclasses.replace(state, busy_since=None, quiet_since=quiet_since)


def describe_owner_policy(policy: OwnerPolicy) -> str:
    """One line for logs: 'busy > 50% CPU for 30s, console idle < 5m, resume after 1m quiet, ...'."""
    parts = []
    if policy.busy_cpu is not None:
        parts.append(f"busy > {policy.busy_cpu:g}% CPU for {format_duration(policy.busy_for)}")
    if policy.console_idle is not None:
        parts.append(f"console input within {format_duration(policy.console_idle)}"
                     + (" (ssh logins too)" if policy.console_ssh else ""))
    if parts:
        parts.append(f"resume after {format_duration(policy.quiet)} quiet")
    if policy.users is not None:
        parts.append(f"users {', '.join(policy.users) or 'none'}")
    for desk in policy.desk_hours:
        parts.append(f"{desk.slots} slots on {','.join(_DAYS[d] for d in desk.days)} "
                     f"{desk.start // 60:02d}:{desk.start % 60:02d}-{desk.end // 60:02d}:{desk.end % 60:02d}")
    if policy.vacate_after is not None:
        parts.append(f"vacate after {format_duration(policy.vacate_after)}")
    if policy.vacate_gpu_at_once:
        parts.append("vacate GPU jobs at once")
    return ", ".join(parts) or "empty"


def owner_vacates(policy: Optional[OwnerPolicy], paused_since: Optional[float], holds_gpu: bool,
                  now: float) -> bool:
    """Whether a running job of a node paused since `paused_since` must make room (run elsewhere)."""
    if policy is None or paused_since is None:
        return False
    if holds_gpu and policy.vacate_gpu_at_once:
        return True
    return policy.vacate_after is not None and now - paused_since >= policy.vacate_after


def _proc_uid(pid: int) -> Optional[int]:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


class OwnerProbe:
    """Measures the owners' activity between two calls of sample() (Linux /proc and /dev)."""

    def __init__(self, policy: OwnerPolicy):
        import pwd
        self.policy = policy
        self.own_uid = os.getuid()
        self.allowed: Optional[set] = None
        if policy.users is not None:
            self.allowed = set()
            for name in policy.users:
                with contextlib.suppress(KeyError):
                    self.allowed.add(pwd.getpwnam(name).pw_uid)
        self.last: Dict[int, Tuple[int, int]] = {}     # pid -> (start, ticks) at the last sample
        self.last_time: Optional[float] = None
        self.jobs_own: Dict[int, int] = {}             # pid -> start of every process seen in a job

    def counts(self, uid: int) -> bool:
        """Whose processes and terminals count: the policy's users, else every person's
        account (uid >= 1000, not nobody) but the one running the jobs."""
        if self.allowed is not None:
            return uid in self.allowed
        return uid >= 1000 and uid != self.own_uid and uid != 65534

    def sample(self, job_roots: Iterable[int], now: float) -> OwnerSample:
        table = process_table()
        # A job's process stays the job's after its root ended (a job's leftovers, or one that
        # exited between samples), and so do the processes it starts.
        ours = set(job_processes(job_roots, table)) | {
            pid for pid, start in self.jobs_own.items() if pid in table and table[pid].start == start}
        children: Dict[int, List[int]] = {}
        for proc in table.values():
            children.setdefault(proc.ppid, []).append(proc.pid)
        pending = list(ours)
        while pending:
            for child in children.get(pending.pop(), ()):
                if child not in ours:
                    ours.add(child)
                    pending.append(child)
        self.jobs_own = {pid: table[pid].start for pid in ours}
        ours.add(os.getpid())
        used: Dict[int, int] = {}
        busiest = (0, 0)
        current: Dict[int, Tuple[int, int]] = {}
        for pid, proc in table.items():
            current[pid] = (proc.start, proc.ticks)
            if pid in ours or pid == 2 or proc.ppid == 2 or self.last_time is None:
                continue           # our jobs, kernel threads, or no earlier sample to compare with
            before = self.last.get(pid)
            delta = proc.ticks - before[1] if before is not None and before[0] == proc.start else proc.ticks
            if delta <= 0:
                continue
            uid = _proc_uid(pid)
            if uid is not None and self.counts(uid):
                used[uid] = used.get(uid, 0) + delta
                busiest = max(busiest, (delta, pid))
        elapsed = None if self.last_time is None else max(now - self.last_time, 1e-3)
        self.last, self.last_time = current, now
        sample = OwnerSample(console=self.console(table, now) if self.policy.console_idle is not None else None)
        if elapsed is not None and used:
            scale = 100.0 / (os.sysconf("SC_CLK_TCK") * elapsed)
            top = max(used, key=used.get)
            sample.cpu = sum(used.values()) * scale
            sample.top_user, sample.top_cpu = _user_of_uid(top), used[top] * scale
            sample.top_process = f"{table[busiest[1]].comm} (pid {busiest[1]}, ppid {table[busiest[1]].ppid})"
        return sample

    def console(self, table: Dict[int, ProcInfo], now: float) -> Optional[str]:
        """'alice on tty2' or 'alice on pts/3 (ssh)': a counted person's terminal with input
        within the policy's idle time and a process on it."""
        import glob
        for path in sorted(glob.glob("/dev/tty[0-9]*") + glob.glob("/dev/pts/[0-9]*")):
            try:
                info = os.stat(path)
            except OSError:
                continue
            if not self.counts(info.st_uid) or now - info.st_atime > (self.policy.console_idle or 0):
                continue
            holders = [proc for proc in table.values() if proc.tty == info.st_rdev]
            if not holders:
                continue
            remote = any(_under_sshd(proc, table) for proc in holders)
            if remote and not self.policy.console_ssh:
                continue
            return f"{_user_of_uid(info.st_uid)} on {path[5:]}" + (" (ssh)" if remote else "")
        return None


def _under_sshd(proc: ProcInfo, table: Dict[int, ProcInfo]) -> bool:
    seen = 0
    while proc is not None and seen < 64:
        if proc.comm.startswith("sshd"):
            return True
        proc, seen = table.get(proc.ppid), seen + 1
    return False


# ---------------------------------------------------------------------------
# 10. The node-side supervisor
#
# One long-lived process per node (`distribute node supervise`), started by the
# head over SSH and detached from it.  It builds batches, starts every job
# process itself, keeps each run's record and results on the node's disk until
# the head has archived them, freezes jobs while someone pauses the machine,
# and exits by itself once it is idle and no head has been connected for a while.
# ---------------------------------------------------------------------------

PROBED_TOOLS = ("apptainer", "singularity", "python3", "gfortran", "mpirun", "gcc", "nvcc",
                "openfoam", "simpleFoam", "matlab", "julia", "R", "docker")
PROBEABLE_CAPABILITIES = PROBED_TOOLS + ("gpu", "podman")      # what a node's probe may find


def engine_answers(engine: str, timeout: float = 5.0) -> bool:
    """Whether a container engine works here, not just lies on PATH: `docker version` needs
    the daemon and the right to use it; `podman version` a usable user setup."""
    if not shutil.which(engine):
        return False
    try:
        return subprocess.run([engine, "version"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=timeout).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def machine_identity() -> Dict[str, str]:
    """Which machine this is: its machine id (systemd's; DISTRIBUTE_MACHINE_ID first, for
    containers and test labs whose "machines" share one kernel), boot id and hostname."""
    machine = os.environ.get("DISTRIBUTE_MACHINE_ID", "").strip()
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        if machine:
            break
        with contextlib.suppress(OSError):
            machine = Path(path).read_text().strip()
    boot = ""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    hostname = socket.gethostname()
    return {"machine_id": machine or f"host:{hostname}", "boot_id": boot, "hostname": hostname}


# A workdir belongs to one machine.  Its supervisor claims it in .distribute/machine.json
# and refreshes the claim; another machine reaching the same folder (NFS home folders)
# finds a fresh claim that is not its own and is refused.  A claim older than this is
# a machine that stopped using the folder, and may be taken over.
CLAIM_REFRESH = 30.0
CLAIM_STALE = 120.0


def workdir_claim(home: Path) -> Optional[Dict[str, Any]]:
    """The machine that claims this workdir, with its claim's age; None if nobody (fresh)."""
    path = home / "machine.json"
    try:
        age = time.time() - os.stat(path).st_mtime
        claim = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(claim, dict) or age > CLAIM_STALE:
        return None
    return claim


def lock_workdir(home: Path) -> Optional[int]:
    """One supervisor per workdir: an exclusive flock on .distribute/supervisor.lock held for the
    supervisor's life (two started at once, by one head or two, cannot both serve; the kernel
    drops the lock with the process).  None if another supervisor holds it."""
    import fcntl
    fd = os.open(str(home / "supervisor.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | _CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def claim_workdir(home: Path, identity: Dict[str, str]) -> None:
    write_atomically(home / "machine.json", lambda tmp: tmp.write_text(json.dumps(identity)))


def foreign_claim_problem(workdir: Path, identity: Dict[str, str]) -> Optional[str]:
    """Why this machine must not use `workdir`: another machine uses it right now."""
    claim = workdir_claim(workdir / ".distribute")
    if claim is None or claim.get("machine_id") == identity["machine_id"]:
        return None
    return shared_workdir_message(str(workdir), claim.get("hostname"))


def shared_workdir_message(workdir: str, other_host: Any) -> str:
    return (f"workdir {workdir} is in use by another machine, {other_host}: two machines share it "
            "(a folder on NFS?); give each node a workdir on its own disk")


def probe_machine() -> Dict[str, Any]:
    """Capabilities found on PATH, cores, memory and GPUs of this machine."""
    caps = [tool for tool in PROBED_TOOLS if tool not in CONTAINER_ENGINES and shutil.which(tool)]
    caps += [engine for engine in CONTAINER_ENGINES if engine_answers(engine)]
    gpus = 0
    if shutil.which("nvidia-smi"):
        with contextlib.suppress(Exception):
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).stdout.decode()
            gpus = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    if gpus:
        caps.append("gpu")
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return dict(machine_identity(), capabilities=caps, cpus=os.cpu_count() or 1, memory=memory, gpus=gpus,
                python=sys.version.split()[0], version=__version__)


@record
class RunRecord:
    """One attempt of one job on this node, as kept on the node's disk."""
    run_id: str
    namespace: str
    batch: str
    job: str
    state: str = "running"           # running | finished
    pid: Optional[int] = None
    start: float = 0.0
    end: Optional[float] = None
    exit_code: Optional[int] = None
    killed: bool = False
    slot: int = 0
    boot_id: Optional[str] = None    # the machine's boot the run started in
    pid_start: Optional[float] = None   # when its process started: a reused pid is not the job
    lost: Optional[str] = None       # why it ended unseen (no exit code): the head runs it again
    vacated: bool = False            # stopped to make room for the workstation's owner: run it elsewhere
    reason: Optional[str] = None     # why it was stopped (a limit: 'memory: 17.2G > 16G', 'time limit 2h')
    gpus: Optional[List[int]] = None     # the GPU indices it was given


# --- limits: a job past its memory or time is stopped -------------------------
#
# No root, no cgroups: the supervisor samples each limited job's process tree a few
# times a second, adds up its resident memory, and counts its run time while the
# machine is not paused.  A job over a limit is stopped like a `kill` and its run
# record says why; the head archives it as killed, with that reason, and does not
# retry it (the same job would hit the same limit again).

@record
class LimitWatch:
    """One job's limits and the run time it has used so far (paused time left out)."""
    memory: int = 0          # bytes, 0: none
    time: int = 0            # seconds, 0: none
    used: float = 0.0
    last: Optional[float] = None

    def step(self, now: float, paused: bool, rss: int) -> Optional[str]:
        """Account the time since the last step; the reason to stop the job, if any."""
        if self.last is not None and not paused:
            self.used += max(0.0, now - self.last)
        self.last = now
        if self.memory and rss > self.memory:
            return f"memory: {format_size(rss)} > {format_size(self.memory)}"
        if self.time and self.used >= self.time:
            return f"time limit {format_duration(self.time)}"
        return None


def tree_rss(root: int, table: Optional[Dict[int, ProcInfo]] = None) -> int:
    """Resident memory (bytes) of every process of the job under `root`."""
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
    total = 0
    for pid in job_processes([root], table):
        try:
            with open(f"/proc/{pid}/statm", "rb") as statm:
                total += int(statm.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            with contextlib.suppress(Exception):
                import psutil
                total += psutil.Process(pid).memory_info().rss
    return total


async def watch_limits(limits: Dict[str, LimitWatch], roots: Callable[[], Dict[str, int]],
                       paused: Callable[[], bool], stop: Callable[[str, str], None],
                       interval: float = 0.25) -> None:
    """Run forever in the supervisor: stop(run_id, reason) for each job over a limit.
    roots() gives {run_id: root pid} of the running jobs that may still be stopped."""
    import asyncio
    while True:
        await asyncio.sleep(interval)
        live = roots()
        watched = [(run_id, watch) for run_id, watch in limits.items() if run_id in live]
        if not watched:
            continue
        table = process_table() if any(w.memory for _, w in watched) else None
        now, frozen = time.time(), paused()
        for run_id, watch in watched:
            reason = watch.step(now, frozen, tree_rss(live[run_id], table) if watch.memory else 0)
            if reason:
                limits.pop(run_id, None)
                stop(run_id, reason)


def boot_id() -> Optional[str]:
    """This boot of the machine (a run recorded under another boot died with it)."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def adopt_verdict(record: RunRecord, this_boot: Optional[str], pid_started: Optional[float]) -> Optional[str]:
    """Whether a run recorded as running by an earlier supervisor still runs (None) or why it is
    lost.  `pid_started` is when the process with the recorded pid started (None: no such process)."""
    if record.boot_id and this_boot and record.boot_id != this_boot:
        return "the node restarted"
    if not record.pid or pid_started is None:
        return "its process ended while no supervisor watched it"
    if record.pid_start is not None and abs(pid_started - record.pid_start) > 1.0:
        return "its process ended while no supervisor watched it (the pid is another process's now)"
    return None


def watch_children_by_pidfd() -> None:
    """Python 3.9 to 3.11 wait for each child process in a thread of its own (a thread started
    per job); with Linux's pidfd the event loop itself hears it end (what 3.12 does anyway)."""
    import asyncio
    watcher = getattr(asyncio, "PidfdChildWatcher", None)
    if watcher is None or sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))       # novermin (3.9+: checked by hasattr above)
    except OSError:                     # a kernel before 5.3, or a sandbox that refuses it
        return
    chosen = watcher()
    chosen.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(chosen)


class TaskOwner:
    """Owns a process's background tasks (the head's, a supervisor's).  Each one's end is seen
    (done callback): a failure is logged with what the task was doing, never left as "Task
    exception was never retrieved"."""

    def __init__(self, who: str = "head"):
        self.who = who
        self.tasks: set = set()

    def spawn(self, coroutine, what: str):
        import asyncio
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(lambda done: self._ended(done, what))
        return task

    def _ended(self, task, what: str) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log(f"{self.who}: {what} failed: {type(exc).__name__}: {one_line(str(exc))}")

    async def close(self) -> None:
        import asyncio
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@record
class LiveRun:
    """The supervisor's state of one running job: its record, and the process (ours, or one an
    earlier supervisor started and this one adopted: then only its pid)."""
    record: RunRecord
    proc: Any = None
    dying: bool = False

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else self.record.pid


class Supervisor:
    """The node side of distribute; see the section comment."""

    def __init__(self, workdir: Path, idle_timeout: float = 600.0):
        self.workdir = Path(os.path.abspath(workdir))
        self.home = self.workdir / ".distribute"
        self.runs_dir = self.home / "runs"
        self.socket_path = self.home / "supervisor.sock"
        self.idle_timeout = idle_timeout
        self.head: Optional[Channel] = None
        self.head_seen = time.time()
        self.live: Dict[str, LiveRun] = {}         # run_id -> a running job (one place for its state)
        self.build_procs: Dict[str, Any] = {}      # batch key -> build process
        self.builds: Dict[str, Any] = {}           # batch key -> task
        self.tasks = TaskOwner("supervisor")       # every task this supervisor started
        self.boot = boot_id()
        self.python = shutil.which("python3") or sys.executable
        self.machine = probe_machine()
        self.build = program_bytes()[1]            # the head replaces a supervisor of another build
        self.pause_locks: List[Any] = []
        self.paused_since: Optional[float] = None  # when the first of the pauses in force began
        self.policy: Optional[OwnerPolicy] = None  # the owner policy the head sent (issue 14)
        self.owner = OwnerState()
        self.owner_slots: Optional[int] = None     # desk hours: the slots the head may use now
        self.gpu_runs: set = set()                 # run_ids of jobs holding a GPU
        self.limits: Dict[str, LimitWatch] = {}    # run_id -> its memory and time limits
        self.node_name = self.machine["hostname"]    # what the head calls this node, once it said so

    # records on disk
    def run_dir(self, run_id: str) -> Path:
        if not re.match(r"[0-9]+\.[0-9]+\Z", run_id):
            raise ProtocolError(f"bad run id {run_id!r}")
        return self.runs_dir / run_id

    def save_record(self, record: RunRecord) -> None:
        save_run_record(self.run_dir(record.run_id), vars(record))     # flat: vars() is asdict() without its copies

    def load_record(self, run_id: str) -> Optional[RunRecord]:
        try:
            return RunRecord(**json.loads((self.run_dir(run_id) / "record.json").read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def all_records(self) -> List[RunRecord]:
        if not self.runs_dir.exists():
            return []
        records = [self.load_record(entry.name) for entry in os.scandir(self.runs_dir)
                   if re.match(r"[0-9]+\.[0-9]+\Z", entry.name)]
        return [r for r in records if r is not None]

    def workspace(self, namespace: str, batch: str) -> Workspace:
        return Workspace(inside(self.workdir, namespace, batch))

    # the server
    async def serve(self) -> None:
        import asyncio
        self.home.mkdir(parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        self.workdir_lock = lock_workdir(self.home)
        if self.workdir_lock is None:
            log(f"supervisor: another supervisor serves {self.workdir} already; leaving it that")
            return
        self.runs_dir.mkdir(exist_ok=True)
        watch_children_by_pidfd()
        self.adopt_orphans()            # after the lock: two supervisors never adopt the same runs
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        server = await asyncio.start_unix_server(self.on_connection, path=str(self.socket_path),
                                                 limit=2 ** 24)
        os.chmod(self.socket_path, 0o600)
        watcher = asyncio.ensure_future(self.watch_pauses())
        owner = asyncio.ensure_future(self.watch_owner())
        limiter = asyncio.ensure_future(watch_limits(
            self.limits, lambda: {key: run.pid for key, run in self.live.items() if run.pid and not run.dying},
            self.is_paused, self.stop_for_limit))
        claimed = 0.0
        try:
            while not self.idle_long_enough():
                if time.time() - claimed > CLAIM_REFRESH:
                    with contextlib.suppress(OSError):         # a full disk must not stop the jobs
                        claim_workdir(self.home, self.machine_identity())
                    claimed = time.time()
                await asyncio.sleep(1.0)
                if owner.done():            # a bug in the owner policy must not end the supervisor
                    log(f"supervisor: the owner policy failed ({owner.exception()!r}); restarting it")
                    owner = asyncio.ensure_future(self.watch_owner())
        finally:
            owner.cancel()
            watcher.cancel()
            limiter.cancel()
            await asyncio.gather(watcher, limiter, return_exceptions=True)
            server.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def machine_identity(self) -> Dict[str, str]:
        return {key: self.machine[key] for key in ("machine_id", "boot_id", "hostname")}

    def idle_long_enough(self) -> bool:
        if self.head is not None or self.live or self.builds:
            self.head_seen = time.time()
            return False
        return time.time() - self.head_seen > self.idle_timeout

    def spawn(self, coroutine, what: str):
        """A task this supervisor owns: its failure is logged, never lost."""
        return self.tasks.spawn(coroutine, what)

    def adopt_orphans(self) -> None:
        """Runs an earlier supervisor recorded as running: a process that still runs is watched
        until it ends; one that is gone (or from an earlier boot) is lost, and the head runs it
        again without using a retry (its exit code is unknown)."""
        for record in self.all_records():
            if record.state != "running":
                continue
            lost = adopt_verdict(record, self.boot, process_start_time(record.pid) if record.pid else None)
            if lost:
                record.state, record.end, record.lost = "finished", time.time(), lost
                self.save_record(record)
                continue
            self.live[record.run_id] = LiveRun(record)
            self.spawn(self.watch_adopted(record), f"watching run {record.run_id}")

    async def watch_adopted(self, record: RunRecord) -> None:
        """Poll an adopted job's process (not our child: no exit code) until it is gone."""
        import asyncio
        while process_start_time(record.pid) is not None and pid_alive(record.pid):
            await asyncio.sleep(0.25)
        self.end_run(record, None, lost="its supervisor was restarted; the exit code is unknown")

    async def watch_pauses(self) -> None:
        """Freeze jobs while someone pauses this machine; jobs being killed are left alone."""
        def roots() -> List[int]:
            return [run.pid for run in self.live.values() if run.pid and not run.dying] + \
                [proc.pid for proc in self.build_procs.values()]

        def changed(locks) -> None:
            if not locks:
                self.paused_since = None
            elif not self.pause_locks:
                self.paused_since = time.time()
            self.pause_locks = list(locks)
            self.notify({"event": "paused", "locks": [dataclasses.asdict(l) for l in locks]})

        def owner_pause() -> List[PauseLock]:
            state = self.owner
            return [PauseLock(state.who, 0.0, 0, True, state.since, reason=state.reason)] if state.reason else []
        try:
            await watch_pauses(roots, changed, extra=owner_pause)
        except (UserError, Failed) as exc:
            log(f"supervisor: pausing is unavailable here: {exc}")

    def is_paused(self) -> bool:
        """Whether the jobs here are frozen now (their run time does not count)."""
        return bool(self.pause_locks)

    def stop_for_limit(self, run_id: str, reason: str) -> None:
        """A job went past its memory or time limit: stop it, and say why in its record."""
        run = self.live.get(run_id)
        if run is None or run.dying:
            return
        log(f"supervisor: stopping run {run_id}: {reason}")
        run.record.killed, run.record.reason, run.dying = True, reason, True
        with contextlib.suppress(OSError):
            self.save_record(run.record)
        if run.pid:
            self.spawn(terminate_tree(run.pid, 2.0, run.proc), f"stopping run {run_id}")

    async def watch_owner(self) -> None:
        """Apply the owner policy once a second: pause for the owner (the pause watcher does the
        stopping), tell the head the desk-hour slots, vacate jobs paused too long."""
        import asyncio
        probe: Optional[OwnerProbe] = None
        reported: Any = None
        while True:
            now, policy = time.time(), self.policy
            if policy is None:
                probe, self.owner, self.owner_slots = None, OwnerState(), None
            else:
                if probe is None or probe.policy is not policy:
                    probe = OwnerProbe(policy)
                if policy.busy_cpu is not None or policy.console_idle is not None:
                    roots = [run.pid for run in self.live.values() if run.pid] + \
                        [proc.pid for proc in self.build_procs.values()]
                    before = self.owner.reason
                    sample = probe.sample(roots, now)
                    self.owner = owner_decide(policy, self.owner, sample, now)
                    if self.owner.reason != before:
                        busiest = f"; busiest: {sample.top_process}" if sample.top_process else ""
                        log(f"supervisor: {self.owner.reason or 'the owner is quiet again'}{busiest}")
                self.owner_slots = desk_slots(policy, datetime.datetime.fromtimestamp(now))
                for run_id, run in list(self.live.items()):
                    if run.pid and not run.dying and owner_vacates(
                            policy, self.paused_since, run_id in self.gpu_runs, now):
                        self.vacate(run_id, run)
            if self.owner_slots != reported:
                reported = self.owner_slots
                self.notify({"event": "owner", "slots": self.owner_slots})
            await asyncio.sleep(_OWNER_TICK)

    def vacate(self, run_id: str, run: LiveRun) -> None:
        """Stop a paused job for good so that the head runs it elsewhere (no retry used)."""
        record = run.record
        log(f"supervisor: vacating run {run_id} ({record.namespace}/{record.batch}/{record.job}), "
            f"paused since {clock_time(self.paused_since or time.time())}")
        record.vacated, run.dying = True, True
        self.save_record(record)
        signal_job_processes([run.pid], signal.SIGKILL)

    def notify(self, event: Dict[str, Any], payload: bytes = b"") -> None:
        """Send an event to the head if one is connected; records on disk cover the rest."""
        head = self.head
        if head is not None:
            async def send() -> None:
                with contextlib.suppress(Exception):
                    await head.send(event, payload)
            self.spawn(send(), "sending an event to the head")

    async def on_connection(self, reader, writer) -> None:
        channel = Channel(reader, writer)
        try:
            while True:
                header, payload = await channel.receive(frame_bounds(SUPERVISOR_FRAMES))
                op = header.get("op")
                handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
                try:
                    if handler is None:
                        raise ProtocolError(f"unknown operation {op!r}")
                    reply = await handler(channel, header, payload)
                except (Failed, UserError, OSError) as exc:     # a refusal or a full disk: say so, stay connected
                    reply = ({"ok": False, "error": str(exc)}, b"")
                except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
                    reply = ({"ok": False, "error": bad_request(op, exc)}, b"")
                if reply is not None:
                    await channel.send(dict(reply[0], reply_to=header.get("id")), reply[1])
                if header.get("stream"):
                    break           # a channel carrying a tar until EOF serves that one request
        except ProtocolError:
            pass
        finally:
            if self.head is channel:
                self.head = None
                self.head_seen = time.time()
            channel.close()

    # operations
    async def op_hello(self, channel: Channel, header, payload):
        """The head (re)connects: it becomes the one that gets events."""
        if header.get("head"):
            if self.head is not None and self.head is not channel:
                self.head.close()
            self.head = channel
            if "policy" in header:           # the nodes file's owner policy travels with the hello
                policy = header["policy"]
                self.policy = OwnerPolicy.from_dict(policy) if isinstance(policy, dict) else None
                if self.policy is not None:
                    log(f"supervisor: owner policy {describe_owner_policy(self.policy)}")
            self.node_name = str(header.get("node") or self.node_name)[:128]
        runs = [dataclasses.asdict(r) for r in self.all_records()]
        return dict(self.machine, ok=True, runs=runs, paused=[dataclasses.asdict(l) for l in self.pause_locks],
                    owner_slots=self.owner_slots, workspaces=self.workspaces(), protocol=PROTOCOL,
                    build=self.build, pid=os.getpid()), b""

    def workspaces(self) -> List[Dict[str, str]]:
        """The batch folders on this node that no build is filling right now (a slot shadow
        goes with its batch), so a head can delete those it no longer needs."""
        found = []
        for ns_dir in sorted(self.workdir.iterdir()) if self.workdir.is_dir() else []:
            if not ns_dir.is_dir() or ns_dir.is_symlink() or not NAME_RE.match(ns_dir.name):
                continue
            for entry in sorted(ns_dir.iterdir()):
                name = re.sub(r"\.slot\d+\Z", "", entry.name)
                building = f"{ns_dir.name}/{name}" in self.builds
                if entry.is_dir() and NAME_RE.match(name) and name == entry.name and not building:
                    found.append({"namespace": ns_dir.name, "batch": name})
        return found

    async def op_build(self, channel: Channel, header, payload):
        plan = BatchPlan(**header["plan"])
        ws = self.workspace(plan.namespace, plan.batch)
        if f"{plan.namespace}/{plan.batch}" in self.builds:
            # asked again by a head that restarted meanwhile: the running build will report
            while header.get("stream") and await channel.reader.read(1 << 20):
                pass
            return {"ok": True, "already": True}, b""
        busy = [r.record.job for r in self.live.values()
                if (r.record.namespace, r.record.batch) == (plan.namespace, plan.batch)]
        if busy:
            raise Failed(f"{plan.namespace}/{plan.batch} still runs here ({', '.join(busy)}): "
                         "its folder cannot be rebuilt now")
        if ws.root.exists():
            remove_tree(ws.root)        # any depth: a job may have left 10,000 nested folders
        ws.create()
        await self.receive_files(channel, header, payload, ws.root)
        key = f"{plan.namespace}/{plan.batch}"
        self.builds[key] = self.spawn(self.run_build(ws, plan, header.get("env") or {}), f"the build of {key}")
        return {"ok": True}, b""

    async def run_build(self, ws: Workspace, plan: BatchPlan, env: Dict[str, str]) -> None:
        """Build, then tell the head how it went, whatever happens (an error is a failed build)."""
        import asyncio
        log_file = ws.private / "build.txt"
        key = f"{plan.namespace}/{plan.batch}"
        code: Optional[int] = 0
        error: Optional[str] = None
        text = b""
        try:
            log_file.write_bytes(b"")
            argv = ws.build_argv(plan, self.python)
            if argv:
                while is_paused(pause_dir()):
                    await asyncio.sleep(0.2)
                code = await self.spawn_and_wait(argv, ws.root, ws.job_env(plan, JobPlan("build"),
                                                 self.machine["cpus"], env), log_file, build=key)
            with open(log_file, "rb") as handle:
                handle.seek(max(0, os.path.getsize(log_file) - 4 * 1024 * 1024))
                text = handle.read()
        except (OSError, Failed, UserError) as exc:
            code, error = None, one_line(str(exc))
        finally:
            self.builds.pop(key, None)
        self.notify({"event": "built", "namespace": plan.namespace, "batch": plan.batch, "exit_code": code,
                     "error": error}, text)

    async def spawn_and_wait(self, argv: List[str], cwd: Path, env: Dict[str, str], log: Path,
                             build: Optional[str] = None, run: Optional[LiveRun] = None) -> int:
        """Start one build or job process in its own session and wait for it; while the
        machine is paused it starts frozen."""
        import asyncio
        with open(log, "ab") as out:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, cwd=str(cwd), env=env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=subprocess.STDOUT, start_new_session=True)
            except OSError as exc:
                out.write(f"distribute: cannot start {argv[0]}: {exc.strerror}\n".encode())
                return 127
        if run is not None:
            run.proc = proc
            run.record.pid, run.record.pid_start = proc.pid, process_start_time(proc.pid)
            with contextlib.suppress(OSError):      # a full disk: the process is watched all the same
                self.save_record(run.record)
        else:
            self.build_procs[build or ""] = proc
        if self.pause_locks:
            freeze_tree([proc.pid])
        try:
            return await proc.wait()
        finally:
            if run is None:
                self.build_procs.pop(build or "", None)

    async def op_start(self, channel: Channel, header, payload):
        plan, job = BatchPlan(**header["plan"]), JobPlan(**header["job"])
        run_id, slot = header["run_id"], int(header.get("slot", 0))
        ws = self.workspace(plan.namespace, plan.batch)
        if not ws.root.exists():
            raise Failed(f"{plan.namespace}/{plan.batch} is not built on this node")
        if slot:
            ws = ws.shadow(slot)
        ws.reset_for_job(plan)
        await self.receive_files(channel, header, payload, ws.root)
        folder = self.run_dir(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        record = RunRecord(run_id, plan.namespace, plan.batch, job.name, start=time.time(), slot=slot,
                           boot_id=self.boot, gpus=header.get("gpus"))
        self.save_record(record)
        cpus = int(header.get("cpus") or self.machine["cpus"])
        env = ws.job_env(plan, job, cpus, header.get("env") or {})
        if job.cpus and "OMP_NUM_THREADS" not in os.environ:     # a job with resources: its cpus
            env["OMP_NUM_THREADS"] = str(cpus)
        if job.memory or job.time:
            self.limits[run_id] = LimitWatch(job.memory, job.time)
        run = self.live[run_id] = LiveRun(record)
        if env.get("CUDA_VISIBLE_DEVICES"):
            self.gpu_runs.add(run_id)
        self.spawn(self.run_job(ws, plan, job, run, env, cpus), f"run {run_id}")
        return {"ok": True}, b""

    def job_workspace(self, record: RunRecord) -> Workspace:
        return self.workspace(record.namespace, record.batch).shadow_of(record.slot)

    async def run_job(self, ws: Workspace, plan: BatchPlan, job: JobPlan, run: LiveRun,
                      env: Dict[str, str], cpus: int) -> None:
        folder = self.run_dir(run.record.run_id)
        argv = ws.job_argv(plan, job, self.python, cpus)
        code: Optional[int] = None
        try:
            code = await self.spawn_and_wait(argv, ws.root, env, folder / "stdout.txt", run=run)
        finally:
            self.end_run(run.record, code)

    def end_run(self, record: RunRecord, code: Optional[int], lost: Optional[str] = None) -> None:
        """A job's process is gone: keep its results with the record and tell the head."""
        record.state, record.end, record.exit_code = "finished", time.time(), code
        record.lost = None if record.killed else lost
        self.live.pop(record.run_id, None)
        folder = self.run_dir(record.run_id)
        ws = self.job_workspace(record)
        self.gpu_runs.discard(record.run_id)
        self.limits.pop(record.run_id, None)
        if record.reason:
            with contextlib.suppress(OSError):
                with open(folder / "stdout.txt", "ab") as out:
                    out.write(f"distribute: stopped: {record.reason}\n".encode())
        if not record.lost:                     # a lost run's results are not its results
            with contextlib.suppress(FileNotFoundError, OSError):
                os.rename(ws.save, folder / "save")
        with contextlib.suppress(OSError):
            (folder / "save").mkdir(exist_ok=True)
        progress = read_progress(ws.progress_file(record.job))
        self.save_record(record)
        self.notify(*self.finished_event(record, progress))

    def finished_event(self, record: RunRecord, progress: Optional[float] = None
                       ) -> Tuple[Dict[str, Any], bytes]:
        size = entries_size(self.result_entries(record.run_id))
        event = {"event": "finished", "run": dict(vars(record)), "size": size, "progress": progress}
        if size <= INLINE_LIMIT:
            return dict(event, inline=True), self.result_tar(record.run_id)
        return dict(event, inline=False), b""

    def result_entries(self, run_id: str) -> List[Tuple[str, str]]:
        return job_result_entries(self.run_dir(run_id))

    def result_tar(self, run_id: str) -> bytes:
        return tar_of(self.result_entries(run_id))

    async def receive_files(self, channel: Channel, header, payload: bytes, dest: Path) -> None:
        """Files come inline (small) or, on a channel of their own, as a tar until EOF."""
        check_space(dest, header.get("size") if header.get("stream") else len(payload), self.node_name)
        if header.get("stream"):
            await receive_tar(channel.reader, dest)
        else:
            extract_tar(payload, dest)

    async def op_fetch(self, channel: Channel, header, payload):
        """Stream a run's results as a tar on this channel (results too large to ride along
        with the "finished" event), then half-close it."""
        record = self.load_record(header["run_id"])
        if record is None or record.state != "finished":
            raise Failed(f"no finished run {header['run_id']}")
        await channel.send({"ok": True, "stream": True, "reply_to": header.get("id")})
        await send_tar_stream(channel.writer, self.result_entries(record.run_id))
        return None

    async def op_ack(self, channel: Channel, header, payload):
        """The head has archived (or discarded) a run: forget it."""
        for run_id in header.get("run_ids", []):
            remove_run_folder(self.run_dir(run_id))
        return None

    async def op_kill(self, channel: Channel, header, payload):
        grace = float(header.get("grace", 10.0))
        for run_id in header.get("run_ids", []):
            run = self.live.get(run_id)
            if run is None or run.dying:
                continue
            run.record.killed, run.dying = True, True
            with contextlib.suppress(OSError):
                self.save_record(run.record)
            if run.pid:
                self.spawn(terminate_tree(run.pid, grace, run.proc), f"stopping run {run_id}")
        return None

    async def op_cleanup(self, channel: Channel, header, payload):
        """The head is done with a batch on this node: delete its build directory."""
        ws = self.workspace(header["namespace"], header["batch"])
        for folder in [ws.root] + list(ws.root.parent.glob(glob_escape(ws.root.name) + ".slot*")):
            with contextlib.suppress(OSError):
                remove_tree(folder)
        with contextlib.suppress(OSError):
            ws.root.parent.rmdir()
        return None

    async def op_tail(self, channel: Channel, header, payload):
        """Bytes of a run's output from `offset` on (for `logs -f`)."""
        log = self.run_dir(header["run_id"]) / "stdout.txt"
        record = self.load_record(header["run_id"])
        try:
            with open(log, "rb") as handle:
                handle.seek(int(header.get("offset", 0)))
                data = handle.read(4 * 1024 * 1024)
        except OSError:
            data = b""
        return {"ok": True, "state": record.state if record else "unknown"}, data

    async def op_progress(self, channel: Channel, header, payload):
        out = {}
        for run in self.live.values():          # each job's own slot folder
            out[run.record.run_id] = read_progress(self.job_workspace(run.record).progress_file(run.record.job))
        return {"ok": True, "progress": out}, b""


# What a job left in distribute_save/ travels as regular files and folders only: a link
# (which could point anywhere), a fifo (which blocks its reader) or a device is left out,
# as are folders nested past RESULT_DEPTH, and the archive's job.json lists each with
# its reason.  The list rides along in the results as SKIPPED_FILE.
SKIPPED_FILE = ".distribute-skipped.json"
MAX_SKIPPED_LISTED = 1000


def job_result_entries(run_folder: Path) -> List[Tuple[str, str]]:
    """The tar entries of a finished run: its saved files, stdout.txt and the list of what was left out."""
    entries, skipped = walk_folder(run_folder / "save", regular_only=True, max_depth=RESULT_DEPTH)
    entries = [e for e in entries if e[0] != SKIPPED_FILE]
    if (run_folder / "stdout.txt").exists():
        entries.append(("stdout.txt", str(run_folder / "stdout.txt")))
    if skipped:
        listed = skipped[:MAX_SKIPPED_LISTED]
        if len(skipped) > len(listed):
            listed.append({"path": "...", "reason": f"{len(skipped) - len(listed)} more left out"})
        try:
            with folder_fd(run_folder, create=False) as fd:
                write_file_at(fd, SKIPPED_FILE, json.dumps(listed).encode())
            entries.append((SKIPPED_FILE, str(run_folder / SKIPPED_FILE)))
        except OSError as exc:          # a full disk: the results still go, without the list
            log(f"supervisor: cannot list what {run_folder.name} left out: {exc.strerror or exc}")
    return entries


# A full disk on a node: a job that writes past the free space still ends as finished.  Its
# record.json is written padded to RECORD_RESERVE bytes, so that when a later version cannot
# get a new file (ENOSPC) it overwrites the reserved blocks in place.  Files for a build or a
# job are refused up front, with the space needed and free, when they cannot fit.
RECORD_RESERVE = 4096
SPACE_MARGIN = 1 << 20


def save_run_record(folder: Path, data: Dict[str, Any]) -> None:
    text = json.dumps(data).encode()
    padded = text.ljust(RECORD_RESERVE) if len(text) < RECORD_RESERVE else text
    try:
        try:
            write_atomically(folder / "record.json", lambda tmp: write_new_file(tmp, padded))
        except FileNotFoundError:               # the run's folder is not there yet
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(folder / "record.json", lambda tmp: write_new_file(tmp, padded))
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT) or len(padded) > RECORD_RESERVE:
            raise
        fd = os.open(folder / "record.json", os.O_WRONLY | os.O_NOFOLLOW | _CLOEXEC)
        try:
            if os.fstat(fd).st_size != RECORD_RESERVE:
                raise
            os.pwrite(fd, padded, 0)
        finally:
            os.close(fd)
        log(f"supervisor: disk full: record of run {data.get('run_id')} overwritten in its reserved place")


def write_new_file(path: Path, data: bytes) -> None:
    """What path.write_bytes(data) does, in three system calls (no buffered file object)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _CLOEXEC, 0o666)
    try:
        write_all(fd, data)
    finally:
        os.close(fd)


def check_space(dest: Path, size: Any, node: str) -> None:
    """Refuse files that cannot fit in dest's file system, before receiving them."""
    if not isinstance(size, int) or size <= 0:
        return
    try:
        free = shutil.disk_usage(str(dest)).free
    except OSError:
        return
    if size + SPACE_MARGIN > free:
        raise Failed(f"no space on {node}: need {human_bytes(size)}, have {human_bytes(free)} "
                     f"free in {dest.parent}")


def bad_request(op: Any, exc: BaseException) -> str:
    """One line (logged, and the reply's error) for a request whose fields a handler choked on."""
    text = f"bad {one_line(repr(op))[:40]} request: {type(exc).__name__}: {one_line(str(exc))[:200]}"
    log(f"supervisor: {text}")
    return text


def remove_run_folder(folder: Path) -> None:
    """Delete an archived run's folder: a handful of unlinks for the usual record.json,
    stdout.txt and empty save/ (once per job, so cheaper than rmtree); rmtree otherwise."""
    try:
        for name in ("record.json", "stdout.txt"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / name)
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(folder / "save")
        os.rmdir(folder)
    except OSError:
        with contextlib.suppress(OSError):
            remove_tree(folder)         # any depth: a job may leave 10,000 nested folders


def glob_escape(name: str) -> str:
    import glob
    return glob.escape(name)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def terminate_tree(pid: int, grace: float, proc=None) -> None:
    """SIGTERM every process of the job (children that left its session too), waking it
    if paused, then SIGKILL whatever is left after `grace`.  `proc`: our child, if it is one
    (an adopted job is only a pid)."""
    import asyncio
    for sig in (signal.SIGTERM, signal.SIGCONT):
        signal_job_processes([pid], sig)
    deadline = time.time() + grace
    if proc is not None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(proc.wait(), grace)
    else:
        while time.time() < deadline and pid_alive(pid):
            await asyncio.sleep(0.1)
    if proc is None or proc.returncode is None:
        signal_job_processes([pid], signal.SIGKILL)


def supervisor_socket(workdir: str) -> str:
    return str(Path(workdir) / ".distribute" / "supervisor.sock")


def start_supervisor_detached(workdir: Path, idle_timeout: float, argv0: List[str],
                              pause_folder: Optional[str] = None, replace: bool = False) -> str:
    """Start a supervisor for workdir unless one answers already (with `replace`, stop that
    one first: the head upgrades it); return when it listens.  Refuses a workdir that
    another machine uses."""
    sock_path = supervisor_socket(str(workdir))
    problem = foreign_claim_problem(Path(workdir), machine_identity())
    if problem:
        raise Failed(problem)
    if replace:
        stop_supervisor(sock_path)
    if socket_answers(sock_path):
        return "running"
    home = Path(workdir) / ".distribute"
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    log = open(home / "supervisor.log", "ab")
    pause = ["--pause-dir", pause_folder] if pause_folder else []
    subprocess.Popen(argv0 + ["node", "supervise", "--workdir", str(workdir), "--idle-timeout", str(idle_timeout)]
                     + pause,
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        if socket_answers(sock_path):
            return "started"
        time.sleep(0.02)
    raise Failed(f"the supervisor did not start; see {home / 'supervisor.log'}")


def stop_supervisor(sock_path: str, grace: float = 10.0) -> bool:
    """Stop the supervisor listening on sock_path (found by the socket's peer credentials,
    so any release's supervisor is found); its jobs, in sessions of their own, go on."""
    import struct
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(sock_path)
        creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return False
    finally:
        probe.close()
    pid = struct.unpack("3i", creds)[0]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if b"supervise" not in cmdline or pid == os.getpid():
        return False
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while pid_alive(pid) and time.time() < deadline:
        time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    return True


def socket_answers(path) -> bool:
    """Whether something accepts connections on the Unix socket at path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(os.fspath(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def relay_stdio_to_socket(path: str) -> None:
    """`node attach`: copy stdin to the supervisor's socket and its replies to stdout, for
    sshd setups that forbid stream-local forwarding."""
    import selectors
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    selector = selectors.DefaultSelector()
    selector.register(sys.stdin.buffer.raw, selectors.EVENT_READ, "in")
    selector.register(conn, selectors.EVENT_READ, "sock")
    while True:
        for key, _ in selector.select():
            if key.data == "in":
                data = os.read(sys.stdin.fileno(), 1 << 16)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    selector.unregister(sys.stdin.buffer.raw)
                    continue
                conn.sendall(data)
            else:
                data = conn.recv(1 << 16)
                if not data:
                    return
                os.write(sys.stdout.fileno(), data)


# ---------------------------------------------------------------------------
# 11. Pulling results
#
# The head lists a batch's archive (filtered by regular
# expressions and job parameters), the client asks only for what it lacks, and
# the files come back as one tar stream, each landing under a temporary name
# first.
# ---------------------------------------------------------------------------

@record
class PullSelection:
    filters: List[str] = field(default_factory=list)
    excludes: List[str] = field(default_factory=list)
    where: Optional[str] = None

    @classmethod
    def of(cls, header: Dict[str, Any]) -> "PullSelection":
        selection = cls(list(header.get("filters", [])), list(header.get("excludes", [])), header.get("where"))
        selection.compile()
        return selection

    def compile(self):
        def compiled(option: str, patterns: List[str]):
            out = []
            for pattern in patterns:
                try:
                    out.append(re.compile(pattern))
                except re.error as exc:
                    raise UserError(f"{option} {pattern!r}: not a regular expression ({exc})") from None
            return out
        test = parse_where(self.where) if self.where else None
        return compiled("--filter", self.filters), compiled("--exclude", self.excludes), test

    def header(self) -> Dict[str, Any]:
        return {"filters": self.filters, "excludes": self.excludes, "where": self.where}


def archive_manifest(root: Path, selection: PullSelection) -> List[Dict[str, Any]]:
    """Every archived file under a batch folder that the selection keeps."""
    filters, excludes, where = selection.compile()
    files: List[Dict[str, Any]] = []
    if not root.is_dir():
        return files
    for job_dir in sorted(os.scandir(root), key=lambda e: e.name):
        if job_dir.name.startswith(".") or not job_dir.is_dir(follow_symlinks=False):
            continue
        if where is not None:
            try:
                params = json.loads(Path(job_dir.path, "job.json").read_text()).get("params") or {}
            except (OSError, ValueError):
                params = {}
            if not where(dict(params, job=job_dir.name)):
                continue
        prefix = len(os.path.join(str(root), ""))      # os.walk's paths start with root/: cheaper than relpath
        for top, dirs, names in os.walk(job_dir.path):
            dirs.sort()
            for name in sorted(names):
                full = os.path.join(top, name)
                rel = full[prefix:]
                if filters and not any(p.search(rel) for p in filters):
                    continue
                if any(p.search(rel) for p in excludes):
                    continue
                info = os.lstat(full)
                if not stat_is_regular(info.st_mode):
                    continue
                files.append({"path": rel, "size": info.st_size, "mtime": int(info.st_mtime),
                              "mode": info.st_mode & 0o777})
    return files


def stat_is_regular(mode: int) -> bool:
    import stat
    return stat.S_ISREG(mode)


def check_archive_rel(rel: str) -> str:
    """rel, if it names something inside a batch folder (plain string work: it runs per file)."""
    parts = rel.split("/")
    if not rel or rel.startswith("/") or ".." in parts or any(p.startswith(".incoming-") for p in parts):
        raise UserError(f"refused path {rel!r}")
    return rel


def file_sha256(path: Path) -> Optional[str]:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def open_archived_file(root: Path, rel: str, checked_dirs: Optional[set] = None):
    """root/rel opened for reading if it is a regular file reached through no symlink
    (a client may name any path, not only what the manifest listed); else None.
    checked_dirs remembers folders already found symlink-free (one realpath per folder)."""
    path = os.path.join(str(root), check_archive_rel(rel))    # the realpath test below keeps it inside
    folder = os.path.dirname(path)
    if checked_dirs is None or folder not in checked_dirs:
        if os.path.realpath(folder) != os.path.join(os.path.realpath(root), *rel.split("/")[:-1]):
            return None
        if checked_dirs is not None:
            checked_dirs.add(folder)
    opened = open_regular_file(path, os.O_NONBLOCK)
    return ArchivedFile(*opened) if opened is not None else None


class ArchivedFile(io.FileIO):
    """An archive file open for reading, with what fstat said when it was opened."""

    def __init__(self, fd: int, info: os.stat_result):
        super().__init__(fd, "rb")
        self.info = info


def split_known_files(root: Path, paths: List[str], hashes: Dict[str, str]) -> Tuple[List[str], List[str]]:
    """(paths to send, paths whose content the client already has: same sha256)."""
    wanted, same = [], []
    for rel in paths:
        known = hashes.get(rel)
        handle = open_archived_file(root, rel) if known else None
        if handle is not None:
            digest = hashlib.sha256()
            with handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
            if digest.hexdigest() == known:
                same.append(rel)
                continue
        wanted.append(rel)
    return wanted, same


def write_tar_to_fd(fd: int, root: Path, paths: List[str]) -> None:
    """Write a tar of root/paths into fd (a pipe, or the client's socket: blocking or not),
    then close it; runs in a thread of its own.  Only regular files go in, whatever the
    client asked for."""
    widen_pipe(fd)
    out = TarWriter(fd)
    try:
        checked_dirs: set = set()
        for rel in paths:
            handle = open_archived_file(root, rel, checked_dirs)
            if handle is None:
                continue
            with handle:
                out.add(rel, handle.fileno(), handle.info)
        out.finish()
    except (BrokenPipeError, ConnectionResetError):
        pass                                # the client went away: nothing more to send
    finally:
        os.close(fd)


class TarWriter:
    """A tar stream written to a descriptor: small files gathered into 1 MiB writes, large
    ones sent by the kernel from the page cache (sendfile) instead of through Python."""

    FLUSH = 1 << 20
    SENDFILE_MIN = 256 * 1024

    def __init__(self, fd: int):
        self.fd, self.buffer, self.sendfile = fd, bytearray(), hasattr(os, "sendfile")

    def add(self, rel: str, fd: int, info: os.stat_result) -> None:
        """One member: the file open at fd (fstat said info), under the name rel."""
        size, mtime, mode = info.st_size, int(info.st_mtime), info.st_mode & 0o777
        header = ustar_header(rel, size, mtime, mode)
        if header is None:                          # long or non-ASCII name, huge file: tarfile's PAX
            member = tarfile.TarInfo(rel)
            member.size, member.mtime, member.mode = size, mtime, mode
            header = member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        self.buffer += header
        if size >= self.SENDFILE_MIN:
            self.flush()
            self.send_file(rel, fd, size)
        elif size:
            data = read_up_to(fd, size)
            if len(data) < size:
                raise Failed(f"{rel}: the file shrank while being sent")
            self.buffer += data
        self.buffer += bytes(-size % tarfile.BLOCKSIZE)
        if len(self.buffer) >= self.FLUSH:
            self.flush()

    def send_file(self, rel: str, fd: int, size: int) -> None:
        offset = 0
        while offset < size:
            if self.sendfile:
                try:
                    sent = os.sendfile(self.fd, fd, offset, min(size - offset, 1 << 30))
                except BlockingIOError:
                    wait_writable(self.fd)
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
                        raise
                    self.sendfile = False           # not to this kind of descriptor: copy
                    continue
            else:
                chunk = os.pread(fd, min(size - offset, 1 << 20), offset)
                write_all(self.fd, chunk)
                sent = len(chunk)
            if not sent:
                raise Failed(f"{rel}: the file shrank while being sent")
            offset += sent

    def flush(self) -> None:
        if self.buffer:
            write_all(self.fd, self.buffer)
            self.buffer = bytearray()

    def finish(self) -> None:
        self.buffer += bytes(2 * tarfile.BLOCKSIZE)      # end of archive
        self.flush()


def wait_writable(fd: int) -> None:
    """Until fd takes more, or is shut down (poll hears of that; select's write set does not)."""
    import select
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        poller.poll()
    else:
        select.select([], [fd], [])


def write_all(fd: int, data) -> None:
    """All of data into fd, waiting when a non-blocking one is full."""
    with memoryview(data) as view:
        while view:
            try:
                view = view[os.write(fd, view):]
            except BlockingIOError:
                wait_writable(fd)


def ustar_header(name: str, size: int, mtime: int, mode: int) -> Optional[bytes]:
    """The 512-byte ustar header tarfile would write for a plain file (uid/gid 0, no
    owner names), made in a few microseconds; None when the name or numbers do not fit."""
    if len(name) > 100 or not name.isascii() or not 0 <= size < 8 ** 11 or not 0 <= mtime < 8 ** 11:
        return None
    header = b"".join((name.encode().ljust(100, b"\0"), b"%07o\0" % mode, b"0000000\0", b"0000000\0",
                       b"%011o\0" % size, b"%011o\0" % mtime, b"        0", bytes(100),
                       b"ustar\x0000", bytes(247)))
    return header[:148] + b"%06o\0 " % sum(header) + header[156:]


async def send_archive_tar(writer, root: Path, paths: List[str]) -> None:
    """Stream a tar of root/paths to writer from a thread of its own: straight into the
    socket under writer when it is a plain Unix one (every client's connection to the head
    is), else through a pipe the event loop empties into writer."""
    await send_from_thread(writer, write_tar_to_fd, root, paths)


def widen_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe buffer (64 KiB by default): fewer hops between threads."""
    with contextlib.suppress(ImportError, OSError, ValueError):
        import fcntl
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)


# ---------------------------------------------------------------------------
# 12. Matrix notifications
#
# Matrix notifications.  When a batch with `meta.matrix` ends, the head sends that
# user one message through the Matrix client-server API, in a direct room it
# creates once and remembers (STATE/matrix-rooms.json, also listed in the bot's
# m.direct so clients show it as a chat).  All network work runs on one worker
# thread, one message at a time: a slow or dead homeserver never stalls the event
# loop and never touches a batch; a failure is one line in the head's log, and the
# message waits in an outbox on disk to be tried again (after a restart too).  The
# access token lives only in MatrixConfig and the Authorization header: it is
# never logged, printed or put in a URL.
# ---------------------------------------------------------------------------

MATRIX_CONFIG_KEYS = ("homeserver", "access_token", "room_store")
MATRIX_TIMEOUT = 20.0                   # seconds per homeserver request
MATRIX_FAILED_JOBS_SHOWN = 5
MATRIX_LINES_PER_JOB = 3
MATRIX_TAIL_BYTES = 256 * 1024          # how much of a failed job's stdout.txt is searched
MATRIX_ERROR_LINE = re.compile(r"error|exception|traceback|fatal|panic|abort|segmentation fault|killed|"
                               r"no such file|not found|denied", re.IGNORECASE)


@record
class MatrixConfig:
    """serve --matrix-config: which homeserver, as which bot, where rooms are remembered."""
    homeserver: str                                 # base URL without a trailing slash
    access_token: str = field(repr=False)           # the secret: never printed nor logged
    room_store: Path = field(default=Path("matrix-rooms.json"))


def load_matrix_config(path: Path, state: Path) -> MatrixConfig:
    """Read and check --matrix-config; every problem is a one-line UserError naming file and line.

    The file holds a bot's access token, so, like ssh with a private key, we refuse
    one that other users may read or change.
    """
    keys = read_yaml(str(path)).mapping(MATRIX_CONFIG_KEYS, required=("homeserver", "access_token"))
    refuse_shared_secret_file(path)
    homeserver = matrix_homeserver_url(keys["homeserver"])
    token_y = keys["access_token"]
    if not re.fullmatch(r"[\x21-\x7e]+", token_y.text()):      # it goes into an HTTP header
        raise token_y.fail("must be one word of printable ASCII: the bot's access token")
    store_y = keys.get("room_store")
    store = store_y.optional_text() if store_y else None
    if store is not None and not store.strip():
        raise store_y.fail("must be a file path")
    room_store = Path(os.path.abspath(path)).parent / store if store else state / "matrix-rooms.json"
    return MatrixConfig(homeserver, token_y.text(), room_store)


def refuse_shared_secret_file(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"{path}: holds an access token but other users may read or change it "
                        f"(mode {mode:04o}); run: chmod 600 {path}")


def matrix_homeserver_url(y: _Y) -> str:
    """The homeserver's base URL: https://host[:port][/prefix]; plain http only on loopback."""
    import ipaddress
    import urllib.parse
    text = y.text().strip()
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port                                                  # checks the port number
    except ValueError as exc:
        raise y.fail(f"not a usable URL ({exc})") from None
    if re.search(r"\s", text) or parts.scheme not in ("http", "https") or not parts.hostname:
        raise y.fail("expected the homeserver's URL, like https://matrix.example.org")
    if parts.username or parts.password or parts.query or parts.fragment:   # may hold secrets: not echoed
        raise y.fail("give the homeserver's base URL only (no user, password, ?query or #fragment)")
    if parts.scheme == "http":
        try:
            loopback = parts.hostname == "localhost" or ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise y.fail("use https:// (over plain http the access token would cross the network readable)")
    return text.rstrip("/")


class MatrixError(Exception):
    """A homeserver call that failed.  The message names the call, never the token."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status


def _matrix_opener():
    """urllib without redirects: a redirect would carry the Authorization header elsewhere."""
    import urllib.request

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            return None                 # urllib then raises HTTPError for the 3xx answer

    return urllib.request.build_opener(NoRedirects)


def _q(text: str) -> str:
    """One path segment (user id, room id, event type): quoted whole, never parsed."""
    import urllib.parse
    return urllib.parse.quote(text, safe="")


class MatrixClient:
    """The few client-server API calls the head needs, over urllib (stdlib only)."""

    def __init__(self, homeserver: str, token: str, timeout: float = MATRIX_TIMEOUT):
        self.homeserver, self._token, self.timeout = homeserver, token, timeout
        self._opener = _matrix_opener()
        self._user_id: Optional[str] = None

    def call(self, method: str, path: str, body: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """One request; JSON in and out.  A rate limit (429) is waited out twice at most."""
        import urllib.error
        import urllib.request
        data = None if body is None else json.dumps(body).encode("utf-8")
        for attempt in range(3):
            request = urllib.request.Request(self.homeserver + path, data=data, method=method, headers={
                "Authorization": f"Bearer {self._token}", "Content-Type": "application/json",
                "User-Agent": f"distribute/{__version__}"})
            try:
                with self._opener.open(request, timeout=self.timeout) as reply:
                    answer = json.loads(reply.read() or b"{}")
                return answer if isinstance(answer, dict) else {}
            except urllib.error.HTTPError as exc:
                detail = _matrix_error_detail(exc)
                if exc.code == 429 and attempt < 2:
                    time.sleep(min(float(detail.get("retry_after_ms") or 1000) / 1000.0, 10.0))
                    continue
                quoted = f"{detail.get('errcode', '')} {detail.get('error', '')}"
                text = quoted.replace(self._token, "[token]")[:200].strip()   # a server or proxy may echo it
                raise MatrixError(f"{method} {path}: HTTP {exc.code}" + (f" {text}" if text else ""),
                                  exc.code) from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", None) or exc
                raise MatrixError(f"{method} {self.homeserver}{path}: {reason}") from None
            except ValueError:
                raise MatrixError(f"{method} {path}: the answer is not JSON") from None
        raise MatrixError(f"{method} {path}: still rate-limited")

    def user_id(self) -> str:
        if self._user_id is None:
            self._user_id = str(self.call("GET", "/_matrix/client/v3/account/whoami")["user_id"])
        return self._user_id

    def membership(self, room_id: str, user: str) -> Optional[str]:
        """`user`'s membership of the room ("join", "invite", "leave"...), None if unknown to us."""
        try:
            state = self.call("GET", f"/_matrix/client/v3/rooms/{_q(room_id)}/state/m.room.member/{_q(user)}")
        except MatrixError as exc:
            if exc.status in (403, 404):    # we are not in the room, or the user never was
                return None
            raise
        return state.get("membership")

    def create_direct_room(self, user: str) -> str:
        reply = self.call("POST", "/_matrix/client/v3/createRoom", {
            "preset": "trusted_private_chat", "is_direct": True, "invite": [user],
            "name": "distribute", "topic": "Messages from the distribute head when your batches end"})
        return str(reply["room_id"])

    def direct_rooms(self) -> Dict[str, List[str]]:
        """The bot's m.direct account data: user id -> direct room ids."""
        try:
            data = self.call("GET", f"/_matrix/client/v3/user/{_q(self.user_id())}/account_data/m.direct")
        except MatrixError as exc:
            if exc.status == 404:
                return {}
            raise
        return {k: [r for r in v if isinstance(r, str)] for k, v in data.items() if isinstance(v, list)}

    def set_direct_rooms(self, rooms: Dict[str, List[str]]) -> None:
        self.call("PUT", f"/_matrix/client/v3/user/{_q(self.user_id())}/account_data/m.direct", rooms)

    def send_text(self, room_id: str, body: str, txn: str = "") -> str:
        txn = txn or f"distribute-{os.urandom(12).hex()}"   # one per message, kept across retries and restarts
        reply = self.call("PUT", f"/_matrix/client/v3/rooms/{_q(room_id)}/send/m.room.message/{txn}",
                          {"msgtype": "m.text", "body": body})
        return str(reply.get("event_id", ""))


def _matrix_error_detail(exc) -> Dict[str, Any]:
    try:
        detail = json.loads(exc.read(4096) or b"{}")
        return detail if isinstance(detail, dict) else {}
    except (OSError, ValueError):
        return {}


class MatrixRooms:
    """The direct room of each user, per bot, in a small JSON file (mode 0600).

    Only the notifier's single worker thread reads and writes it."""

    def __init__(self, path: Path):
        self.path = path

    def _load(self) -> Dict[str, Dict[str, str]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}                   # lost or damaged: rooms are found again through m.direct
        return data if isinstance(data, dict) else {}

    def get(self, bot: str, user: str) -> Optional[str]:
        room = self._load().get(bot, {}).get(user)
        return room if isinstance(room, str) else None

    def put(self, bot: str, user: str, room: str) -> None:
        data = self._load()
        data.setdefault(bot, {})[user] = room
        self.path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: Path) -> None:
            fd = os.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        write_atomically(self.path, write)


@record
class BatchNotice:
    """What one message says about a finished batch; gathered on the event loop."""
    user: str
    batch: str                                      # namespace/name
    counts: Dict[str, int]
    wall_seconds: float
    archive: Path
    failed: List[Tuple[str, Optional[int]]]         # (job, exit code) of the first failed jobs
    failed_total: int
    txn: str = ""                                   # the homeserver drops a repeated transaction id


class MatrixOutbox:
    """Messages not yet delivered: one JSON file each in STATE/matrix-outbox/, written
    before the first try and deleted once the homeserver took the message.  A head
    that stops (or dies) first sends them when it starts again, with the same
    transaction id, which the homeserver deduplicates: each goes out once."""

    def __init__(self, folder: Path):
        self.folder = folder

    def put(self, notice: BatchNotice) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        notice.txn = notice.txn or f"distribute-{os.urandom(12).hex()}"
        path = self.folder / f"{notice.txn}.json"
        data = dict(dataclasses.asdict(notice), archive=str(notice.archive))
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(data)))
        return path

    def load(self, path: Path) -> Optional[BatchNotice]:
        try:
            data = json.loads(path.read_text())
            data["archive"] = Path(data["archive"])
            data["failed"] = [tuple(f) for f in data["failed"]]
            return BatchNotice(**data)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log(f"matrix: cannot read the pending message {path}: {exc}")
            return None

    def pending(self) -> List[Path]:
        return sorted(self.folder.glob("distribute-*.json"), key=lambda p: p.stat().st_mtime) \
            if self.folder.is_dir() else []

    def sent(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def job_error_lines(stdout: Path, count: int = MATRIX_LINES_PER_JOB) -> List[str]:
    """The last lines near the end of a job's output that look like errors, else its last lines."""
    try:
        with open(stdout, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - MATRIX_TAIL_BYTES))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    lines = [line.strip()[:200] for line in tail.splitlines() if line.strip()]
    errors = [line for line in lines if MATRIX_ERROR_LINE.search(line)]
    return (errors or lines)[-count:]


def matrix_message(notice: BatchNotice) -> str:
    """The text of the message (m.text, plain); reads the failed jobs' archived output."""
    counts = notice.counts
    lines = [f"distribute: batch {notice.batch} finished: {counts.get('done', 0)} ok, "
             f"{counts.get('failed', 0)} failed, {counts.get('killed', 0)} killed "
             f"in {format_duration(notice.wall_seconds)}",
             f"archive: {notice.archive}"]
    if notice.failed:
        lines += ["", "failed jobs:"]
    for job, code in notice.failed:
        stdout = notice.archive / job / "stdout.txt"
        if stdout.exists():
            lines.append(f"  {job} (exit code {code}):")
            lines += [f"    {line}" for line in job_error_lines(stdout)]
        else:
            lines.append(f"  {job}: never ran (its build failed? see {notice.archive / 'build'})")
    if notice.failed_total > len(notice.failed):
        lines.append(f"  ... and {notice.failed_total - len(notice.failed)} more")
    lines += ["", "get the results:", f"  distribute pull --batch {notice.batch}"]
    return "\n".join(lines)


MATRIX_RETRY_DELAYS = (60.0, 300.0, 900.0, 3600.0)     # then the message waits for the next start


class MatrixNotifier:
    """Sends batch messages from one worker thread; `submit` returns at once.

    The thread is a daemon fed by a queue (not an executor, whose threads are joined
    at exit): a head stopped while the homeserver hangs stops at once.  Messages not
    yet sent wait in the outbox; a failed one is tried again after 1, 5, 15 and 60
    minutes, then at the head's next start."""

    def __init__(self, config: MatrixConfig, outbox: MatrixOutbox):
        self.config = config
        self.client = MatrixClient(config.homeserver, config.access_token)
        self.rooms = MatrixRooms(config.room_store)
        self.outbox = outbox
        self._queue = None

    def submit(self, task: Callable[..., Any], *args: Any) -> None:
        import queue
        import threading
        if self._queue is None:
            self._queue = queue.Queue()
            threading.Thread(target=self._work, args=(self._queue,), name="matrix", daemon=True).start()
        self._queue.put((task, args))

    @staticmethod
    def _work(tasks) -> None:
        while True:
            task, args = tasks.get()
            task(*args)                 # each task logs its own failures

    def check_login(self) -> bool:
        """At start: tell the admin now, not at the first batch, when the token or URL is wrong."""
        try:
            log(f"matrix: batch messages come from {self.client.user_id()} on {self.config.homeserver}")
            return True
        except Exception as exc:        # only logged: the homeserver may come back later
            log(f"matrix: cannot log in to {self.config.homeserver}: {exc}")
            return False

    def send_later(self, path: Path, tries: int = 0) -> None:
        """Deliver the message kept at `path` (from the worker thread, now or after a delay)."""
        if tries == 0:
            self.submit(self.deliver, path, 0)
            return
        import threading
        timer = threading.Timer(MATRIX_RETRY_DELAYS[tries - 1], self.submit, (self.deliver, path, tries))
        timer.daemon = True
        timer.start()

    def deliver(self, path: Path, tries: int = 0) -> bool:
        notice = self.outbox.load(path)
        if notice is None:
            return False
        try:
            room = self.direct_room(notice.user)
            self.client.send_text(room, matrix_message(notice), notice.txn)
        except Exception as exc:        # whatever goes wrong, the batch is not affected
            if tries < len(MATRIX_RETRY_DELAYS):
                later = f"trying again in {format_duration(MATRIX_RETRY_DELAYS[tries])}"
                self.send_later(path, tries + 1)
            else:
                later = f"it waits in {path} for the head's next start"
            log(f"matrix: cannot notify {notice.user} about {notice.batch}: {exc}; {later}")
            return False
        self.outbox.sent(path)
        log(f"matrix: told {notice.user} that {notice.batch} finished")
        return True

    def direct_room(self, user: str) -> str:
        """The room shared with `user`: remembered, else listed in m.direct, else created now."""
        bot = self.client.user_id()
        remembered = self.rooms.get(bot, user)
        if remembered and self.still_shared(remembered, user):
            return remembered
        direct = self.client.direct_rooms()
        for room in direct.get(user, []):
            if room != remembered and self.still_shared(room, user):
                self.rooms.put(bot, user, room)
                return room
        room = self.client.create_direct_room(user)
        self.rooms.put(bot, user, room)
        try:
            direct[user] = [room] + [r for r in direct.get(user, []) if r != room]
            self.client.set_direct_rooms(direct)
        except MatrixError as exc:      # the room works without it; clients just list it as a group
            log(f"matrix: cannot mark the room with {user} as direct: {exc}")
        log(f"matrix: created a direct room with {user}")
        return room

    def still_shared(self, room: str, user: str) -> bool:
        return self.client.membership(room, user) in ("join", "invite")


def matrix_notifier(config: HeadConfig) -> Optional[MatrixNotifier]:
    """serve: load --matrix-config before serving (a bad file exits 2) and check the login."""
    if config.matrix_config is None:
        return None
    notifier = MatrixNotifier(load_matrix_config(config.matrix_config, config.state),
                              MatrixOutbox(config.state / "matrix-outbox"))
    notifier.submit(notifier.check_login)
    for path in notifier.outbox.pending():         # left by a head that stopped before sending them
        notifier.send_later(path)
    return notifier


def notify_batch_finished(head: "Head", batch: BatchRow, counts: Dict[str, int]) -> None:
    """Head.on_batch_finished: gather the facts here (store access is loop-only), send elsewhere."""
    if head.matrix is None:
        log(f"matrix: {batch.key} asks for a message to {batch.matrix}, but the head has no --matrix-config")
        return
    try:
        failed = head.store.jobs(batch.id, "failed")
        notice = BatchNotice(batch.matrix, batch.key, dict(counts), time.time() - batch.created,
                             batch_archive(head.config.archive, batch.namespace, batch.name),
                             [(j.name, j.exit_code) for j in failed[:MATRIX_FAILED_JOBS_SHOWN]], len(failed))
    except Exception as exc:            # a message is never worth disturbing the batch's bookkeeping
        log(f"matrix: cannot prepare the message about {batch.key}: {exc}")
        return
    try:
        path = head.matrix.outbox.put(notice)
    except OSError as exc:
        log(f"matrix: cannot keep the message about {batch.key} in {head.matrix.outbox.folder}: {exc}")
        return
    head.matrix.send_later(path)


# ---------------------------------------------------------------------------
# 13. The head daemon
#
# `distribute serve`: one asyncio process.  A NodeLink per node keeps its SSH
# connection and supervisor channel alive; the Head turns events (job finished,
# build done, node paused or lost, batch added) into store updates, archive
# writes and new work, and answers clients on a Unix socket.
# ---------------------------------------------------------------------------

def default_state_dir() -> Path:
    if os.environ.get("DISTRIBUTE_STATE"):
        return Path(os.environ["DISTRIBUTE_STATE"])
    system = Path("/var/lib/distribute")
    if os.access(system, os.W_OK) or (os.geteuid() == 0 and not system.exists()):
        return system
    return Path.home() / ".local" / "state" / "distribute"


def default_socket_candidates() -> List[Path]:
    found = [Path(os.environ["DISTRIBUTE_STATE"]) / "head.sock"] if os.environ.get("DISTRIBUTE_STATE") else []
    return found + [Path("/var/lib/distribute/head.sock"),
                    Path.home() / ".local" / "state" / "distribute" / "head.sock"]


REMOTE_SOCKET = "/var/lib/distribute/head.sock"
PROGRESS_WAIT = 0.1     # `status` waits this long for busy nodes' progress, then shows their last answer


def program_argv() -> List[str]:
    """How to run this very program again on this machine (the pyz, or distribute.py)."""
    return [sys.executable, running_pyz() or os.path.abspath(__file__)]


def program_bytes(pyz: Optional[Path] = None) -> Tuple[bytes, str]:
    """The pyz the head copies to nodes (--pyz, else the one running), and its hash.
    Running from source, a thin pyz of this module alone is made (the nodes' python3
    must then have click, pyyaml and psutil)."""
    here = os.path.abspath(__file__)
    container = running_pyz()
    if pyz is not None:
        data = Path(pyz).read_bytes()
    elif container:
        data = Path(container).read_bytes()
    else:
        import zipfile
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, text in (("distribute.py", Path(here).read_bytes()),
                               ("__main__.py", b"import distribute\ndistribute.main()\n")):
                info = zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                zf.writestr(info, text)
        data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()[:16]


@record
class HeadConfig:
    state: Path
    archive: Path
    nodes: List[NodeSpec]
    pyz: Optional[Path] = None
    node_timeout: float = 120.0
    supervisor_idle: float = 600.0
    kill_grace: float = 10.0
    matrix_config: Optional[Path] = None
    group: Optional[str] = None
    shared_namespaces: List[str] = field(default_factory=list)   # namespaces anyone may add batches to

    @property
    def socket_path(self) -> Path:
        return self.state / "head.sock"


def hold_head_lock(state: Path, socket_path: Path) -> int:
    """One head per state folder: an exclusive flock on STATE/head.lock, held for the
    head's life.  The kernel drops it with the process (kill -9 and power cuts
    included), so a lock left by a dead head never blocks a start.  Returns its fd."""
    import fcntl
    path = state / "head.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise Failed(f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").split()
        os.close(fd)
        pid = holder[0] if holder else "unknown"
        where = holder[1] if len(holder) > 1 else str(socket_path)
        raise Failed(f"a head is already serving {state} (pid {pid}, socket {where}); "
                     "stop it first, or give this one another --state") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket_path}\n".encode())
    return fd


NODE_FACTS = ("capabilities", "cpus", "memory", "gpus", "hostname", "python", "version", "machine_id",
              "build")   # kept per node


class NodeRefused(Failed):
    """A node the head must not use until the admin changes something (said in the message)."""


def parse_json_line(out: bytes) -> Dict[str, Any]:
    """The last line of a command's output, as JSON; {} if it is not."""
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        value = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class NodeLink:
    """The head's side of one node: connection, supervisor channel, slots, pause state."""

    def __init__(self, spec: NodeSpec, head: "Head"):
        self.spec, self.head = spec, head
        self.transport = transport_for(spec)
        self.state = "connecting"
        self.error: Optional[str] = None
        self.info: Dict[str, Any] = {}
        self.channel: Optional[Channel] = None
        self.paused: List[Dict[str, Any]] = []
        self.owner_slots: Optional[int] = None        # desk hours: fewer slots right now (the node says)
        self.down_since: Optional[float] = time.time()
        self.pending: Dict[int, Any] = {}
        self.next_id = 0
        self.last_known: Dict[str, Any] = {}         # what it reported when last up (kept in the store)
        self.conflict: Optional[str] = None          # why it is refused: its machine is listed twice
        self.replace_supervisor = False              # next connection replaces an outdated supervisor

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def capabilities(self) -> List[str]:
        """Declared plus probed: probed now, or when the node was last up (also before this head)."""
        probed = self.info.get("capabilities") if self.info else self.last_known.get("capabilities", [])
        return sorted(set(self.spec.capabilities) | set(probed or []))

    @property
    def ever_seen(self) -> bool:
        return bool(self.info or self.last_known)

    @property
    def workdir(self) -> str:
        if self.spec.is_local and self.spec.workdir == DEFAULT_NODE_WORKDIR:
            return str(self.head.config.state / "nodes" / self.name)
        return self.spec.workdir

    @property
    def up(self) -> bool:
        return self.state == "up"

    @property
    def slots(self) -> Dict[int, str]:
        """slot -> run id, or "build:<batch id>" (from the store: never out of step with it)."""
        return self.head.store.busy_slots(self.name)

    def node_state(self) -> NodeState:
        state = NodeState(self.name, self.spec.slots, self.capabilities, int(self.info.get("gpus", 0)),
                          self.up, bool(self.paused), self.outdated, self.capacity)
        if self.info:                               # connected: its capacity is known
            state.resources = node_capacity(self.info, self.spec)
            state.cpus = int(self.info.get("cpus") or 1)
        caps = [c for c in (self.spec.slots if self.spec.slots_given else None, self.owner_slots) if c is not None]
        state.slots_cap = min(caps) if caps else None   # written slots, and fewer in the owner's desk hours
        return state

    @property
    def capacity(self) -> int:
        """The slots the head may fill now: fewer during the node's desk hours."""
        return self.spec.slots if self.owner_slots is None else max(0, min(self.spec.slots, self.owner_slots))

    def view(self) -> NodeView:
        return NodeView(self.name, self.capabilities, int(self.info.get("gpus", 0)),
                        max(0, self.capacity - len(self.slots)), bool(self.paused), self.up, self.outdated)

    @property
    def expected_build(self) -> str:
        """The build this node's supervisor should run: what the head copies there (a local
        node runs the head's own program)."""
        return self.head.local_build if self.spec.is_local else self.head.program[1]

    @property
    def outdated(self) -> bool:
        """Its supervisor is another build, or speaks another protocol: it gets no new work (only
        the fetch, ack and kill every release speaks) and is replaced once its jobs end."""
        return self.up and (self.info.get("build") != self.expected_build or self.info.get("protocol") != PROTOCOL)

    def refuse(self, reason: str) -> None:
        """Stop using this node (another entry reaches its machine): its loop reconnects and
        is refused with `reason` until the nodes file changes."""
        self.conflict = reason
        if self.channel is not None:
            self.channel.close()

    async def run_forever(self) -> None:
        import asyncio
        backoff = 0.5
        while True:
            try:
                await self.connect_once()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as exc:                     # any failure: node is down, retry
                self.error = self.transport.describe_error(exc)
                refused = "host key" in self.error or isinstance(exc, NodeRefused)
                self.state = "refused" if refused else "down"
                log(f"node {self.name}: {self.error}")
            self.mark_down()
            await self.transport.close()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 30.0 if self.state != "refused" else 60.0)

    def mark_down(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.state == "up":
            self.state = "down"
        if self.down_since is None:
            self.down_since = time.time()
        for future in self.pending.values():
            if not future.done():
                future.set_exception(ProtocolError(f"node {self.name} went away"))
        self.pending.clear()

    async def connect_once(self) -> None:
        # a node that is down or refused stays so (with its reason) until a connection succeeds
        await self.transport.connect()
        argv0 = await self.install_program()
        pause = ["--pause-dir", self.spec.pause_dir] if self.spec.pause_dir else []
        replace = ["--replace"] if self.replace_supervisor else []
        code, out, err = await self.transport.run(
            argv0 + ["node", "start", "--workdir", self.workdir, "--idle-timeout",
                     str(self.head.config.supervisor_idle)] + pause + replace)
        if code != 0:
            text = (err or out).decode("utf-8", "replace").strip().splitlines()
            reason = text[-1] if text else f"exit code {code}"
            if "in use by another machine" in reason:
                raise NodeRefused(reason.replace("distribute: ", "", 1))
            raise Failed(f"cannot start the supervisor: {reason}")
        self.replace_supervisor = False
        started = parse_json_line(out)
        if isinstance(self.transport, SshTransport):
            self.transport.remote_pyz = argv0[1]
        reader, writer = await self.transport.open_socket(supervisor_socket(self.workdir))
        self.channel = Channel(reader, writer)
        policy = dataclasses.asdict(self.spec.owner) if self.spec.owner else None
        hello, _ = await self.channel.request({"op": "hello", "head": True, "id": 0, "node": self.name,
                                              "policy": policy})
        if not hello.get("ok"):
            raise Failed(f"supervisor refused: {hello.get('error')}")
        if started.get("machine_id") and hello.get("machine_id") != started["machine_id"]:
            raise NodeRefused(shared_workdir_message(self.workdir, hello.get("hostname")))
        self.owner_slots = hello.get("owner_slots")
        self.last_known = {key: hello.get(key) for key in NODE_FACTS}
        self.head.store.remember_node(self.name, self.last_known)
        self.conflict = self.head.machine_conflict(self)
        if self.conflict:
            raise NodeRefused(self.conflict)
        self.info, self.paused = hello, hello.get("paused", [])
        if hello.get("build") != self.expected_build or hello.get("protocol") != PROTOCOL:
            log(f"node {self.name}: its supervisor runs build {hello.get('build') or 'of release ' + str(hello.get('version'))}"
                f" (protocol {hello.get('protocol')}), this head {self.expected_build} (protocol {PROTOCOL}): "
                "no new work there; it is replaced once its running jobs end")
        self.state, self.error, self.down_since = "up", None, None
        log(f"node {self.name}: up ({', '.join(self.capabilities) or 'no capabilities'})")
        await self.head.apply(self.head.life.reconcile(self.name, hello.get("runs", [])))
        for workspace in hello.get("workspaces", []):
            await self.head.apply(self.head.life.forget_workspace(self.name, workspace))
        self.head.wake()
        await self.read_events()

    async def install_program(self) -> List[str]:
        """Copy distribute.pyz to the node unless it already has this exact build."""
        if self.spec.is_local:
            return program_argv()
        data, digest = self.head.program
        folder = f"{self.workdir}/bin"
        remote = f"{folder}/distribute-{digest}.pyz"
        code, _, _ = await self.transport.run(["test", "-f", remote])
        if code != 0:
            # readable by everyone: the workstation's users run `pause` from it
            script = ('mkdir -p "$1" && chmod 755 "$1" && cat > "$2.part" && chmod 644 "$2.part" && '
                      'mv "$2.part" "$2" && ln -sfn "${2##*/}" "$1/distribute.pyz"')
            code, _, err = await self.transport.run(["sh", "-c", script, "sh", folder, remote], stdin=data)
            if code != 0:
                raise Failed(f"cannot copy distribute.pyz to {remote}: {err.decode(errors='replace').strip()}")
        return [self.spec.python, remote]

    async def read_events(self) -> None:
        while True:
            header, payload = await self.channel.receive(lambda op: NODE_FRAMES)
            if "event" in header:
                await self.head.on_event(self, header, payload)
                continue
            future = self.pending.pop(header.get("reply_to"), None)
            if future is not None and not future.done():
                future.set_result((header, payload))

    async def request(self, header: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
        import asyncio
        if self.channel is None:
            raise ProtocolError(f"node {self.name} is not connected")
        self.next_id += 1
        future = asyncio.get_event_loop().create_future()
        self.pending[self.next_id] = future
        await self.channel.send(dict(header, id=self.next_id), payload)
        reply, data = await future
        if not reply.get("ok", True):
            raise Failed(reply.get("error") or "the node refused")
        return reply, data

    async def open_data_channel(self) -> Channel:
        """A channel of its own to the supervisor, for one bulk transfer."""
        if not self.up:
            raise ProtocolError(f"node {self.name} is not connected")
        reader, writer = await self.transport.open_bulk_socket(supervisor_socket(self.workdir))
        return Channel(reader, writer)

    async def send_files(self, header: Dict[str, Any], entries: List[Tuple[str, str]]) -> Dict[str, Any]:
        """A request carrying files: inline on the control channel when small, else streamed
        as a tar on a data channel."""
        if entries_size(entries) <= INLINE_LIMIT:
            reply, _ = await self.request(header, tar_of(entries))
            return reply
        with self.transfer_breaks_off():
            channel = await self.open_data_channel()
            try:
                await channel.send(dict(header, stream=True, size=entries_size(entries)))
                reply = await stream_and_reply(channel, entries)
            finally:
                channel.close()
        if not reply.get("ok", True):
            raise Failed(reply.get("error") or "the node refused")
        return reply

    async def fetch_results(self, run_id: str, dest: Path) -> None:
        with self.transfer_breaks_off():
            channel = await self.open_data_channel()
            try:
                reply, _ = await channel.request({"op": "fetch", "run_id": run_id})
                if not reply.get("ok"):
                    raise Failed(reply.get("error") or "the node refused")
                await receive_tar(channel.reader, dest, direct=True)
            finally:
                channel.close()

    @contextlib.contextmanager
    def transfer_breaks_off(self) -> Iterator[None]:
        """A connection dying under a bulk transfer raises what callers expect of a lost node
        (ProtocolError), not a stray socket or SSH error.  Disk errors pass unchanged."""
        asyncssh = import_asyncssh()
        try:
            yield
        except (ConnectionError, EOFError, asyncssh.Error) as exc:
            raise ProtocolError(f"transfer with node {self.name} broke off: {exc or type(exc).__name__}") from None

    async def tell(self, header: Dict[str, Any]) -> None:
        """A one-way message; lost if the node is away (records on the node cover that)."""
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.send(header)


async def keep_running(start, what: str) -> None:
    """Run a long-lived coroutine; when it fails, log why and start it again a second later."""
    import asyncio
    while True:
        try:
            await start()
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log(f"head: {what} stopped ({type(exc).__name__}: {one_line(str(exc))}); restarting it")
            await asyncio.sleep(1.0)


class TransferGate:
    """Bounds the uploads and pulls a head serves at once: `total` in all and `each` per user;
    more wait their turn (queued, never refused), and a user's waiting ones hold no place of
    another's.  (Result fetches are bounded by the nodes' slots.)"""

    def __init__(self, total: int = 64, each: int = 16):
        self.limits = (total, each)
        self.total = None
        self.users: Dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def slot(self, user: str):
        import asyncio
        if self.total is None:
            self.total = asyncio.Semaphore(self.limits[0])
        mine = self.users.setdefault(user, asyncio.Semaphore(self.limits[1]))
        async with mine:
            async with self.total:
                yield


class DurableAcks:
    """A node deletes its copy of a result when the head acknowledges it, so the head first puts
    the archived files and the store's record of them on stable storage.  Results landed
    within a few milliseconds of each other share one flush (syncfs of the archive's and the
    state folder's file systems, in a thread of its own): one flush per job would cost the
    event loop several milliseconds each.  A failing flush sends nothing and is tried again;
    the results wait on their nodes meanwhile."""

    def __init__(self, folders: List[Path], flush=sync_file_system):
        seen, self.folders = set(), []
        for folder in folders:                      # one flush per file system
            device = os.stat(folder).st_dev
            if device not in seen:
                seen.add(device)
                self.folders.append(folder)
        self.flush = flush
        self.pending: Dict[Any, List[str]] = {}     # link -> run ids landed, not yet acknowledged
        self._ready = None

    def add(self, link: Any, run_id: str) -> None:
        import asyncio
        self.pending.setdefault(link, []).append(run_id)
        if self._ready is None:
            self._ready = asyncio.Event()
        self._ready.set()

    def flush_all(self) -> None:
        for folder in self.folders:
            self.flush(folder)

    async def run(self) -> None:
        """The head's task: flush, then acknowledge everything landed before the flush."""
        import asyncio
        backoff = 0.5
        if self._ready is None:
            self._ready = asyncio.Event()
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self.pending = self.pending, {}
            try:
                await in_own_thread(self.flush_all)
            except OSError as exc:
                log(f"archive: cannot flush to disk ({exc}); results stay on their nodes, trying again "
                    f"in {backoff:.0f}s")
                for link, run_ids in batch.items():
                    self.pending.setdefault(link, [])[:0] = run_ids
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 60.0)
                self._ready.set()
                continue
            backoff = 0.5
            for link, run_ids in batch.items():
                await link.tell({"op": "ack", "run_ids": run_ids})


class Head:
    """The scheduler, archivist and API server; see the section comment.  The job lifecycle's
    decisions are the Lifecycle's (section 7); the head performs the actions they return."""

    def __init__(self, config: HeadConfig):
        self.config = config
        config.state.mkdir(parents=True, exist_ok=True)
        config.archive.mkdir(parents=True, exist_ok=True)
        remove_unfinished_landings(config.archive)
        self.store = Store(config.state / "distribute.sqlite")
        self.life = Lifecycle(self.store)
        self.files = config.state / "files"
        remove_unfinished_uploads(self.files)
        self.links = {spec.name: NodeLink(spec, self) for spec in config.nodes}
        for name, facts in self.store.known_nodes().items():
            if name in self.links:
                self.links[name].last_known = facts
        self.archiving: set = set()                 # run ids being archived right now (never twice at once)
        self.progress_heard: Dict[str, Dict[str, Optional[float]]] = {}   # node: its last progress answer
        self.progress_asking: Dict[str, Any] = {}   # node: the question in flight (one at a time)
        self.program = program_bytes(config.pyz)
        self.tasks = TaskOwner()
        self._local_build: Optional[str] = None
        self.acks = DurableAcks([config.archive, config.state])
        self.transfers = TransferGate()
        self._wake = None
        self._timer = None
        self.matrix = None

    # the main loop
    async def serve(self) -> None:
        import asyncio
        self._wake = asyncio.Event()
        for build in self.store.builds():
            if build.state == "running":            # builds in flight when the head stopped: ask again
                self.store.drop_builds(build.batch_id, build.node)
        server = await self.start_api()
        loops = [self.tasks.spawn(keep_running(link.run_forever, f"the link to node {link.name}"), link.name)
                 for link in self.links.values()]
        loops.append(self.tasks.spawn(keep_running(self.watch_lost_nodes, "the lost-node watcher"), "watcher"))
        loops.append(self.tasks.spawn(keep_running(self.acks.run, "acknowledging results"), "acks"))
        log(f"head: serving on {self.config.socket_path}, {len(self.links)} node(s), "
            f"archive {self.config.archive}")
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self.schedule()
        finally:
            server.close()
            await self.tasks.close()

    def wake(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def wake_at(self, when: float) -> None:
        import asyncio
        loop = asyncio.get_event_loop()
        delay = max(0.0, when - time.time())
        if self._timer is not None and self._timer.when() <= loop.time() + delay:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_later(delay + 0.01, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self.wake()

    @property
    def local_build(self) -> str:
        """The build of this head's own program, which local nodes run."""
        if self._local_build is None:
            self._local_build = self.program[1] if not self.config.pyz else program_bytes()[1]
        return self._local_build

    def machine_conflict(self, link: NodeLink) -> Optional[str]:
        """Two entries of the nodes file reaching one machine: the one listed first keeps it, a
        later one is refused (several `host: local` entries are a way to try a lab on one
        machine, and are allowed)."""
        machine = link.last_known.get("machine_id")
        if not machine:
            return None
        for other in self.links.values():
            if other is link:
                break
            if other.last_known.get("machine_id") == machine and not (other.spec.is_local and link.spec.is_local):
                return (f"{link.name} reaches the same machine as {other.name} ({link.last_known.get('hostname')}, "
                        f"machine id {str(machine)[:12]}): list each machine once in the nodes file")
        later = list(self.links.values())
        for other in later[later.index(link) + 1:]:
            if other.up and other.last_known.get("machine_id") == machine \
                    and not (other.spec.is_local and link.spec.is_local):
                other.refuse(f"{other.name} reaches the same machine as {link.name}: list each machine once")
        return None

    def replace_outdated_supervisors(self) -> None:
        """An outdated supervisor (another build) gets no new work; once it runs no job and no
        build, reconnecting replaces it with this head's build."""
        busy = {job.node for job in self.store.running_jobs()}
        building = {b.node for b in self.store.builds() if b.state == "running"}
        for link in self.links.values():
            if link.outdated and not link.replace_supervisor and link.name not in busy | building:
                log(f"node {link.name}: replacing its supervisor with build {link.expected_build}")
                link.replace_supervisor = True
                if link.channel is not None:
                    link.channel.close()

    async def watch_lost_nodes(self) -> None:
        """Requeue the jobs of a node that has been away longer than the node timeout."""
        import asyncio
        while True:
            await asyncio.sleep(1.0)
            self.replace_outdated_supervisors()
            for link in self.links.values():
                if link.up or link.down_since is None or time.time() - link.down_since < self.config.node_timeout:
                    continue
                if self.store.running_jobs(link.name) or self.store.builds(node=link.name):
                    await self.apply(self.life.node_lost(link.name))

    async def schedule(self) -> None:
        self.life.nodes = {name: link.node_state() for name, link in self.links.items()}
        await self.apply(self.life.schedule(time.time()), wake=False)

    # performing the lifecycle's actions
    async def apply(self, actions: List[Action], wake: bool = True) -> None:
        """Perform what a transition decided, then let the scheduler look again (slots may be free)."""
        for action in actions:
            link = self.links.get(action.node or "")
            if action.op == "log":
                log(action.info["text"])
            elif action.op == "tell" and link is not None:
                message = dict(action.info)
                if message.get("op") == "kill":
                    message.setdefault("grace", self.config.kill_grace)
                if message.get("op") == "ack":      # once the archive and the store are on disk
                    for run_id in message.get("run_ids", []):
                        self.acks.add(link, run_id)
                    continue
                await link.tell(message)
            elif action.op == "start_build" and link is not None:
                self.tasks.spawn(self.start_build(link, action), f"starting a build on {link.name}")
            elif action.op == "start_job" and link is not None:
                self.tasks.spawn(self.start_job(link, action), f"starting run {action.run_id} on {link.name}")
            elif action.op == "land" and link is not None:
                if action.info.get("inline"):
                    await self.land(link, action)
                else:                               # a long transfer of its own
                    self.tasks.spawn(self.land(link, action), f"archiving run {action.run_id}")
            elif action.op == "land_later" and link is not None:
                self.tasks.spawn(self.land_later(link, action), f"archiving run {action.run_id} again")
            elif action.op == "build_log":
                batch = self.store.batch(action.batch_id)
                timeline_build_ended(self, batch.id, action.node, action.info["ok"])
                self.archive_build_log(batch, action.node, action.info["data"])
            elif action.op == "attempt":
                job = self.store.job(action.job_id)
                if job is not None:
                    timeline_attempt(self, action.batch_id, job, action.node, action.info["run"], action.info["state"])
            elif action.op == "notify":
                self.on_batch_finished(self.store.batch(action.batch_id), action.info["counts"])
            elif action.op == "drop_files":
                shutil.rmtree(self.files / str(action.batch_id), ignore_errors=True)
            elif action.op == "wake_at":
                self.wake_at(action.info["at"])
        if wake:
            self.wake()

    def job_env(self, link: NodeLink, slot: int) -> Dict[str, str]:
        gpus = gpu_for_slot(slot, link.spec.slots, int(link.info.get("gpus", 0)))
        return {"CUDA_VISIBLE_DEVICES": gpus} if gpus is not None else {}

    def resource_view(self, link: NodeLink) -> NodeView:
        """A node as the scheduler sees it now (capacity, what its running jobs hold: from the store)."""
        return self.life.node_view(link.node_state())

    async def start_build(self, link: NodeLink, action: Action) -> None:
        batch = self.store.batch(action.batch_id)
        timeline_build_started(self, batch.id, link.name)
        try:
            entries = folder_entries(self.files / str(batch.id) / "shared")
            await link.send_files({"op": "build", "plan": dataclasses.asdict(batch.plan),
                                   "env": self.job_env(link, action.slot or 0)}, entries)
        except Exception as exc:                    # refused, no space, connection lost: told below
            reason = one_line(str(exc) or type(exc).__name__)
            log(f"node {link.name}: build of {batch.key} could not start: {reason}")
            timeline_build_ended(self, batch.id, link.name, False)
            await self.apply(self.life.build_not_started(batch.id, link.name, reason, time.time()))

    async def start_job(self, link: NodeLink, action: Action) -> None:
        batch, job = self.store.batch(action.batch_id), self.store.job(action.job_id)
        try:
            entries = folder_entries(self.files / str(batch.id) / "jobs" / job.name)
            header = {"op": "start", "run_id": action.run_id, "slot": action.slot,
                      "plan": vars(batch.plan), "job": vars(job.plan)}      # flat dataclasses
            header.update(action.info or resource_header(link.node_state(), job.plan, action.slot or 0, []))
            await link.send_files(header, entries)     # cpus, env (CUDA_VISIBLE_DEVICES) and gpus
        except Exception as exc:
            reason = one_line(str(exc) or type(exc).__name__)
            await self.apply(self.life.job_not_started(job.id, action.run_id, link.name, reason, time.time()))

    # events from nodes
    async def on_event(self, link: NodeLink, header: Dict[str, Any], payload: bytes) -> None:
        kind = header.get("event")
        if kind == "finished" and isinstance(header.get("run"), dict):
            actions = self.life.finished(link.name, header["run"])
            for action in actions:
                if action.op == "land":
                    action.info.update(inline=bool(header.get("inline")), payload=payload,
                                       progress=header.get("progress"))
            await self.apply(actions)
        elif kind == "built":
            await self.apply(self.life.built(link.name, str(header.get("namespace")), str(header.get("batch")),
                                             header.get("exit_code"), header.get("error"), payload))
        elif kind == "paused":
            timeline_pauses(self, link.name, header.get("locks", []))
            link.paused = header.get("locks", [])
            log(f"node {link.name}: {'paused by ' + ', '.join(l.get('reason') or l['user'] for l in link.paused) if link.paused else 'resumed'}")
        elif kind == "owner":                     # desk hours began or ended there
            link.owner_slots = header.get("slots")
            log(f"node {link.name}: {link.capacity} of {link.spec.slots} slots now (desk hours)")
        self.wake()

    def archive_build_log(self, batch: BatchRow, node: str, data: bytes) -> None:
        land_build_log(self.config.archive, batch.namespace, batch.name, node, bytes(data))

    async def land(self, link: NodeLink, action: Action) -> None:
        """Archive a finished run's results (inline, or fetched from the node), then tell the
        lifecycle; a failure is retried later, ever more slowly, and ends visible."""
        run, run_id = action.info["run"], str(action.run_id)
        if run_id in self.archiving:            # a reconnect and a retry may both bring it here
            return
        job, batch = self.store.job(action.job_id), self.store.batch(action.batch_id)
        state = self.life.outcome(run)
        record = {"namespace": batch.namespace, "batch": batch.name, "job": job.name, "node": link.name,
                  "start": now_iso(run.get("start")), "end": now_iso(run.get("end") or time.time()),
                  "exit_code": run.get("exit_code"), "attempts": job.attempts,
                  "state": "ok" if state == "done" else state, "params": job.plan.params or {}}
        if run.get("reason"):                   # stopped by its memory or time limit
            record["reason"] = run["reason"]
        self.archiving.add(run_id)
        try:
            incoming, final = start_landing(self.config.archive, batch.namespace, batch.name, job.name)
            try:
                if action.info.get("inline"):
                    extract_tar(action.info.get("payload") or b"", incoming)
                else:
                    await link.fetch_results(run_id, incoming)
                finish_landing(incoming, final, record)
            finally:
                shutil.rmtree(incoming, ignore_errors=True)
        except ProtocolError as exc:
            self.archiving.discard(run_id)
            log(f"node {link.name}: fetching the results of {run_id} broke off ({exc}); "
                "they stay on the node until it is back")
            if link.up:                          # only the transfer broke: try again later
                tries = int(action.info.get("tries", 0)) + 1
                await self.apply(self.life.landing_failed(link.name, job.id, run, str(exc), tries))
            return                               # else its reconnection brings the run again
        except (OSError, Failed) as exc:
            self.archiving.discard(run_id)
            tries = int(action.info.get("tries", 0)) + 1
            log(f"archive: cannot store {batch.key}/{job.name}: {one_line(str(exc))} (try {tries} of "
                f"{LANDING_TRIES}); " + ("will retry" if tries < LANDING_TRIES else "giving up"))
            await self.apply(self.life.landing_failed(link.name, job.id, run, one_line(str(exc)), tries))
            return
        self.archiving.discard(run_id)
        with self.store.transaction():          # the attempt's span and the job's end: one commit
            timeline_attempt(self, batch.id, job, link.name, run, state)
            actions = self.life.landed(link.name, job.id, run, action.info.get("progress"))
        await self.apply(actions)

    async def land_later(self, link: NodeLink, action: Action) -> None:
        import asyncio
        await asyncio.sleep(action.info["delay"])
        if link.up:
            await self.land(link, Action("land", link.name, action.batch_id, action.job_id, action.run_id,
                                         action.slot, info=dict(action.info, inline=False, payload=b"")))

    def on_batch_finished(self, batch: BatchRow, counts: Dict[str, int]) -> None:
        """Hook for notifications (Matrix)."""
        if batch.matrix:
            notify_batch_finished(self, batch, counts)      # sends from a worker thread

    def batch_counts(self, batch_id: int) -> Dict[str, int]:
        return self.store.batch_counts(batch_id)

    # the client API
    async def start_api(self):
        import asyncio
        path = self.config.socket_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o117)
        try:
            server = await asyncio.start_unix_server(self.on_client, path=str(path), limit=2 ** 24)
        finally:
            os.umask(old)
        os.chmod(path, 0o660)
        if self.config.group:
            import grp
            os.chown(path, -1, grp.getgrnam(self.config.group).gr_gid)
        return server

    async def on_client(self, reader, writer) -> None:
        channel = Channel(reader, writer)
        user = peer_user(writer.get_extra_info("socket"))
        try:
            try:
                header, payload = await channel.receive(frame_bounds(HEAD_FRAMES))
            except BadFrame as exc:
                await channel.send({"ok": False, "error": str(exc), "code": EXIT_USAGE})
                return
            op = header.get("op")
            handler = getattr(self, f"api_{op}", None) if isinstance(op, str) and op in REQUEST_FIELDS else None
            try:
                if handler is None:
                    raise UserError(f"unknown request {one_line(repr(op))[:80]}")
                problem = request_problem(header)
                if problem:
                    raise UserError(f"bad {op} request: {problem}")
                await handler(channel, user, header, payload)
            except UserError as exc:
                await channel.send({"ok": False, "error": str(exc), "code": EXIT_USAGE})
            except Failed as exc:
                await channel.send({"ok": False, "error": str(exc), "code": EXIT_FAILED})
            except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
                # a request the checks above let through and a handler choked on: one line, never a traceback
                log(f"head: {op} request from {user['name']} failed: {type(exc).__name__}: {one_line(str(exc))[:200]}")
                await channel.send({"ok": False, "error": f"the head could not handle this {op} request "
                                    f"({type(exc).__name__}); see its log", "code": EXIT_FAILED})
        except ProtocolError:
            pass
        finally:
            channel.close()

    def is_admin(self, user: Dict[str, Any]) -> bool:
        return user["uid"] in (0, os.geteuid())

    def lookup_batch(self, ref: str) -> BatchRow:
        namespace, _, name = ref.rpartition("/")
        batch = self.store.find_batch(namespace or None, name)
        if batch is None:
            raise UserError(f"no batch {ref!r} on this head; `distribute status --all` lists its batches")
        return batch

    def check_namespace(self, user: Dict[str, Any], namespace: str) -> None:
        """A namespace belongs to whoever started its first batch, unless the head's admin
        shares it (serve --shared-namespace)."""
        if namespace in self.config.shared_namespaces or self.is_admin(user):
            return
        owner = self.store.namespace_owner(namespace)
        if owner is not None and owner != user["name"]:
            raise UserError(f"namespace {namespace} belongs to {owner} (who started its first batch): use your "
                            f"own, e.g. namespace: {user['name']}, or ask the head's admin to share it "
                            f"(serve --shared-namespace {namespace})")

    def check_owner(self, user: Dict[str, Any], batch: BatchRow, what: str) -> None:
        if user["name"] != batch.owner and not self.is_admin(user):
            raise UserError(f"{user['name']} may not {what} {batch.key}: it belongs to {batch.owner}")

    async def api_add(self, channel: Channel, user: Dict[str, Any], header: Dict[str, Any], payload: bytes):
        plan, jobs, capabilities = check_add_request(header)
        capable, maybe = self.capable_nodes(capabilities)
        self.check_resources(plan, jobs, capable + maybe)
        plan.uses_resources = any(job.cpus for job, _ in jobs)
        if header.get("show_caps") or header.get("dry"):
            await channel.send({"ok": True, "dry": True, "capable": capable, "maybe": maybe,
                                "not_connected": self.nodes_not_connected(), "nodes": self.node_report()})
            return
        if not capable and not maybe:
            raise UserError(self.no_node_message(capabilities))
        existing = self.store.find_batch(plan.namespace, plan.batch)
        skip: set = set()
        if existing is not None:
            if header.get("resume"):
                skip = {j.name for j in self.store.jobs(existing.id, "done")}
                if self.batch_counts(existing.id).get("running") or self.batch_counts(existing.id).get("queued"):
                    raise UserError(f"{existing.key} is still running; wait for it or kill it first")
            elif not header.get("replace"):
                raise UserError(f"a batch {existing.key} exists already: use --resume to run only the jobs "
                                "that did not succeed, or --replace to start over")
            self.check_owner(user, existing, "replace" if header.get("replace") else "resume")
        self.check_namespace(user, plan.namespace)
        # Everything checked: now the files (nothing changes until they are all here).
        self.files.mkdir(parents=True, exist_ok=True)
        incoming = Path(tempfile.mkdtemp(prefix=".incoming-", dir=self.files))
        try:
            async with self.transfers.slot(user["name"]):
                await channel.send({"ok": True, "send": True})
                await receive_tar(channel.reader, incoming, direct=True)
            if existing is not None:
                await self.apply(self.life.replace(existing.id))
                if header.get("replace"):
                    shutil.rmtree(batch_archive(self.config.archive, plan.namespace, plan.batch), ignore_errors=True)
            todo = [(job, retries) for job, retries in jobs if job.name not in skip]
            batch_id = self.store.add_batch(plan.namespace, plan.batch, user["name"], plan, capabilities,
                                            header.get("matrix"), todo)
            os.rename(incoming, self.files / str(batch_id))
        finally:
            if os.path.lexists(incoming):       # the upload broke off or was refused: no trace left
                remove_tree(incoming)
        batch = self.store.batch(batch_id)
        log(f"batch {batch.key}: added by {user['name']}, {len(todo)} job(s)")
        await self.apply(self.life.end_batch_if_done(batch_id) if not todo else [])
        await channel.send({"ok": True, "batch": batch.key, "jobs": len(todo), "skipped": len(skip),
                            "capable": capable, "maybe": maybe, "not_connected": self.nodes_not_connected()})

    def check_resources(self, plan: BatchPlan, jobs: List[Tuple[JobPlan, int]], capable: List[str]) -> None:
        """Refuse resources that are not numbers, a batch no capable node could ever fit, and
        a dependency that is not on this head."""
        for job, _ in jobs:
            for key in ("cpus", "memory", "gpus", "time"):
                value = getattr(job, key)
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise UserError(f"job {job.name}: resources.{key} must be a whole number, not {value!r}")
        facts = {name: self.links[name].info or self.links[name].last_known for name in capable}
        nodes = {name: node_capacity(facts[name], self.links[name].spec) if facts[name].get("cpus") else None
                 for name in capable}
        problem = fit_problem(((job.name, request) for job, _ in jobs
                               for request in [job_request(job)] if request is not None), nodes)
        if problem:
            raise UserError(problem)
        if plan.after_failed not in ("wait", "start"):
            raise UserError(f"meta.after_failed must be 'wait' or 'start', not {plan.after_failed!r}")
        for key in plan.after:
            namespace, _, name = str(key).partition("/")
            if name_problem(namespace) or name_problem(name):
                raise UserError(f"meta.after: {key!r} is not namespace/batch")
            if self.store.find_batch(namespace, name) is None:
                raise UserError(f"meta.after: no batch {key} on this head; add it first")

    def capable_nodes(self, capabilities: List[str]) -> Tuple[List[str], List[str]]:
        """(nodes that offer all of `capabilities`, nodes never seen that still might): a head
        that just started decides on what its nodes offered when last up, not on who has
        connected again yet."""
        offers = {l.name: (l.capabilities, l.ever_seen) for l in self.links.values()}
        return nodes_for_capabilities(capabilities, offers, PROBEABLE_CAPABILITIES)

    def nodes_not_connected(self) -> List[str]:
        return [l.name for l in self.links.values() if not l.up]

    def no_node_message(self, capabilities: List[str]) -> str:
        offered = set()
        for link in self.links.values():
            offered |= set(link.capabilities)
        missing = [c for c in capabilities if c not in offered]
        if missing:
            return f"no node offers {', '.join(missing)} (needed by meta.capabilities)"
        return f"no single node offers all of {', '.join(capabilities)}"

    def node_report(self) -> List[Dict[str, Any]]:
        out = []
        for link in self.links.values():
            running = []
            for slot, holder in sorted(link.slots.items()):
                if holder.startswith("build:"):
                    batch = self.store.batch(int(holder.split(":")[1]))
                    running.append({"slot": slot, "build": batch.key if batch else None})
                    continue
                job = self.store.job(run_job_id(holder)) if holder else None
                batch = self.store.batch(job.batch_id) if job else None
                running.append({"slot": slot, "job": job.name if job else None,
                                "batch": batch.key if batch else None, "run_id": holder})
            out.append({"name": link.name, "host": link.spec.host, "state": link.state, "error": link.error,
                        "reachable": link.up, "version": link.info.get("version"),
                        "build": link.info.get("build"), "upgrading": link.outdated,
                        "machine": link.info.get("hostname"),
                        "capabilities": link.capabilities, "slots": link.spec.slots,
                        "cpus": link.info.get("cpus"), "memory": link.info.get("memory"),
                        "gpus": link.info.get("gpus"), "running": running,
                        **self.resource_report(link),
                        "paused": [{"user": l.get("user"), "until": now_iso(l.get("until")) if l.get("until") else None,
                                    "reason": l.get("reason") or None,
                                    "since": now_iso(l.get("since")) if l.get("since") else None}
                                   for l in link.paused],
                        "slots_now": link.capacity, "gave_up": self.gave_up_on(link.name)})
        return out

    def gave_up_on(self, node: str) -> List[Dict[str, Any]]:
        """Active batches this node gave up on (build failed, or kept failing to start), and why."""
        out = []
        for build in self.store.builds(node=node):
            batch = self.store.batch(build.batch_id)
            if build.state == "failed" and batch is not None and batch.state == "active":
                out.append({"batch": batch.key, "reason": build.reason})
        return out

    def resource_report(self, link: NodeLink) -> Dict[str, Any]:
        """`nodes --json`: capacity (after the reserve) and what running jobs hold."""
        view = self.resource_view(link)
        if view.capacity is None:
            return {"capacity": None, "used": None}
        held = self.life.holds.get(link.name)
        batch = self.store.batch(held) if held is not None else None
        return {"capacity": dataclasses.asdict(view.capacity), "used": dataclasses.asdict(view.used),
                "held_for": batch.key if batch is not None and batch.state == "active" else None}

    async def api_nodes(self, channel, user, header, payload):
        await channel.send({"ok": True, "nodes": self.node_report()})

    async def api_status(self, channel, user, header, payload):
        batches = []
        mine_only = header.get("all") is False          # the CLI's default; older clients get everything
        hidden = 0
        rows = self.store.status_rows()
        shown = set()
        for batch_id, namespace, name, owner, state, created, finished, c in rows:
            if mine_only and (owner != user["name"] or state != "active"):
                hidden += 1
                continue
            shown.add(batch_id)
            batches.append({"batch": f"{namespace}/{name}", "owner": owner, "state": state,
                            "created": now_iso(created), "finished": now_iso(finished) if finished else None,
                            "jobs": {s: c.get(s, 0) for s in JOB_STATES}})
        keys = {batch_id: f"{namespace}/{name}" for batch_id, namespace, name, *_ in rows if batch_id in shown}
        stopped = [{"batch": keys[b], "job": name, "reason": reason}      # stopped by a limit, or lost
                   for b, name, reason in self.store.reasons(keys) if b in keys]
        running = []
        progress = await self.running_progress()
        for job in self.store.running_jobs():
            batch = self.store.batch(job.batch_id)
            if mine_only and batch is not None and batch.owner != user["name"]:
                continue
            link = self.links.get(job.node or "")
            running.append({"batch": batch.key if batch else None, "job": job.name, "node": job.node,
                            "started": now_iso(job.started) if job.started else None,
                            "progress": progress.get(job.run_id or "", job.progress),
                            "paused": bool(link is not None and link.paused)})
        paused = [{"node": link.name, "since": min([l.get("since") or time.time() for l in link.paused]),
                   "why": [pause_label(l) + ("" if l.get("reason") else f" until {clock_time(l.get('until') or 0)}")
                           for l in link.paused]}
                  for link in self.links.values() if link.paused]      # issue 14: say why, since when
        await channel.send({"ok": True, "batches": batches, "running": running, "hidden": hidden,
                            "paused_nodes": paused, "stopped": stopped})

    async def running_progress(self) -> Dict[str, Optional[float]]:
        """What running jobs last wrote to their progress file, asked of every busy node at once.
        `status` waits PROGRESS_WAIT at most: a node slow to answer (sending results, far away)
        shows what it said last time, and its answer still lands for the next `status`."""
        import asyncio
        asking = []
        for link in self.links.values():
            if link.up and link.slots:
                task = self.progress_asking.get(link.name)
                if task is None or task.done():
                    task = self.tasks.spawn(self.ask_progress(link), f"asking node {link.name} for progress")
                    self.progress_asking[link.name] = task
                asking.append(task)
        if asking:
            await asyncio.wait(asking, timeout=PROGRESS_WAIT)
        merged: Dict[str, Optional[float]] = {}
        for heard in self.progress_heard.values():
            merged.update(heard)
        return merged

    async def ask_progress(self, link: NodeLink) -> None:
        import asyncio
        try:
            reply, _ = await asyncio.wait_for(link.request({"op": "progress"}), 10.0)
        except (Failed, asyncio.TimeoutError):
            return
        self.progress_heard[link.name] = reply.get("progress", {})

    async def api_report(self, channel, user, header, payload):
        """A batch's attempts, builds and pauses, for `report`'s timeline."""
        await channel.send(batch_report(self, self.lookup_batch(str(header.get("batch", "")))))

    async def api_kill(self, channel, user, header, payload):
        batch = self.lookup_batch(header["batch"])
        self.check_owner(user, batch, "kill")
        stopped = await self.kill_batch(batch)
        await channel.send({"ok": True, "batch": batch.key, "dropped": stopped[0], "stopped": stopped[1]})

    async def kill_batch(self, batch: BatchRow) -> Tuple[int, int]:
        dropped, stopped, actions = self.life.kill(batch.id)
        await self.apply(actions)
        return dropped, stopped

    async def api_retry(self, channel, user, header, payload):
        batch = self.lookup_batch(header["batch"])
        self.check_owner(user, batch, "retry")
        states = ("failed",) if header.get("failed_only", True) else ("failed", "killed")
        if not (self.files / str(batch.id)).is_dir():
            raise UserError(f"{batch.key}'s files are gone from the head: add it again (--resume runs only the "
                            "jobs that did not succeed)")
        count, actions = self.life.retry(batch.id, states)
        if count:
            log(f"batch {batch.key}: {count} job(s) queued again by {user['name']}")
        await self.apply(actions)
        await channel.send({"ok": True, "batch": batch.key, "requeued": count})

    def lookup_job_ref(self, ref: str) -> Tuple[BatchRow, Optional[JobRow]]:
        """BATCH, NAMESPACE/BATCH, BATCH/JOB or NAMESPACE/BATCH/JOB."""
        with contextlib.suppress(UserError):
            return self.lookup_batch(ref), None
        batch_ref, _, job_name = ref.rpartition("/")
        if not batch_ref:
            raise UserError(f"no batch {ref!r} on this head")
        batch = self.lookup_batch(batch_ref)
        job = self.store.job_by_name(batch.id, job_name)
        if job is None:
            raise UserError(f"no job {job_name!r} in {batch.key}")
        return batch, job

    async def api_why(self, channel, user, header, payload):
        batch, job = self.lookup_job_ref(header["ref"])
        builds = {b.node: b for b in self.store.builds(batch.id)}
        view = BatchView(batch.id, batch.owner, batch.created, batch.capabilities, 1,
                         [n for n, b in builds.items() if b.state == "ok"],
                         [n for n, b in builds.items() if b.state == "failed"])
        waiting = job if job is not None and job.state == "queued" else self.store.next_queued(batch.id)
        if waiting is not None:
            view.request, view.time = job_request(waiting.plan), waiting.plan.time
        view.waiting = self.life.dependency_reason(batch)
        reasons = {}
        for link in self.links.values():
            node = self.resource_view(link)
            reason = why_not(node, view)
            build = builds.get(link.name)
            held = self.life.holds.get(link.name)
            if reason is None and held is not None and held != batch.id:
                other = self.store.batch(held)
                if other is not None and other.state == "active":
                    reason = f"held for the next job of {other.key}, which needs more room (large jobs go first)"
            if link.state == "refused":
                reason = link.error
            elif reason == "the batch's build failed there" and build is not None and build.reason:
                reason = build.reason
            elif reason is None and build is not None and build.retry_at and build.retry_at > time.time():
                reason = f"{build.reason}; trying again at {clock_time(build.retry_at)}"
            elif reason == "busy":
                reason = "busy with " + ", ".join(r.get("job") or f"build of {r.get('build')}"
                                                  for r in next(n for n in self.node_report()
                                                                if n["name"] == link.name)["running"])
                if link.capacity < link.spec.slots:
                    reason += f" (desk hours: {link.capacity} of {link.spec.slots} slots)"
            elif reason == "paused":
                reason = "paused by " + ", ".join(pause_label(l) for l in link.paused)
            elif reason == "unreachable" and link.error:
                reason = f"unreachable: {link.error}"
            reasons[link.name] = reason or "can run it: it will when its turn comes"
        state = job.state if job else batch.state
        if state not in ("queued", "active"):
            reasons = {}
        await channel.send({"ok": True, "batch": batch.key, "job": job.name if job else None, "state": state,
                            "node": job.node if job else None, "reasons": reasons,
                            "reason": job.reason if job else None,
                            "exit_code": job.exit_code if job else None})

    async def api_logs(self, channel, user, header, payload):
        batch = self.lookup_batch(header["batch"])
        job = self.store.job_by_name(batch.id, header["job"])
        if job is None:
            raise UserError(f"no job {header['job']!r} in {batch.key}")
        offset = int(header.get("offset", 0))
        link = self.links.get(job.node or "")
        if job.state in ("queued", "running"):      # see README: who reads whose output
            self.check_owner(user, batch, "read the live output of")
        outcome = {"exit_code": job.exit_code, "reason": job.reason, "job": f"{batch.key}/{job.name}"}
        if job.state == "queued":               # a retried job's old output is not its output
            await channel.send(dict(outcome, ok=True, state="queued", offset=0), b"")
            return
        if job.state == "running" and link is not None and link.up:
            reply, data = await link.request({"op": "tail", "run_id": job.run_id, "offset": offset})
            await channel.send(dict(outcome, ok=True, state="running", offset=offset + len(data)), data)
            return
        path = batch_archive(self.config.archive, batch.namespace, batch.name) / job.name / "stdout.txt"
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(16 * 1024 * 1024)
        except OSError:
            data = b""
        await channel.send(dict(outcome, ok=True, state=job.state, offset=offset + len(data)), data)

    async def api_pull(self, channel, user, header, payload):
        """The manifest of a batch's archive, filtered, and how many jobs are not finished."""
        batch = self.lookup_batch(header["batch"])
        selection = PullSelection.of(header)
        root = batch_archive(self.config.archive, batch.namespace, batch.name)
        # a big archive takes seconds to list: not on the loop that serves everyone else
        import asyncio
        files = await asyncio.get_event_loop().run_in_executor(None, archive_manifest, root, selection)
        counts = self.batch_counts(batch.id)
        await channel.send({"ok": True, "batch": batch.key, "files": files,
                            "unfinished": counts.get("queued", 0) + counts.get("running", 0)})

    async def api_pull_files(self, channel, user, header, payload):
        """Stream the requested archive files as one tar; files whose hash the client
        already has are only named in the header ("same")."""
        import asyncio
        batch = self.lookup_batch(header["batch"])
        root = batch_archive(self.config.archive, batch.namespace, batch.name)
        loop = asyncio.get_event_loop()
        paths = [str(p) for p in header.get("paths", [])]
        for rel in paths:
            check_archive_rel(rel)                      # a UserError before anything is sent
        # hashing may read gigabytes: not on the loop that serves everyone else
        wanted, same = await loop.run_in_executor(None, split_known_files, root, paths, header.get("hashes") or {})
        async with self.transfers.slot(user["name"]):
            await channel.send({"ok": True, "same": same, "stream": True})
            await send_archive_tar(channel.writer, root, wanted)
        if channel.writer.can_write_eof():
            channel.writer.write_eof()

    async def api_pull_all(self, channel, user, header, payload):
        """`pull` and `pull_files` in one request: every archived file the selection keeps,
        streamed right after a header that counts them (what a pull into a new folder wants:
        no manifest to send, nor a list of paths to send back)."""
        import asyncio
        batch = self.lookup_batch(header["batch"])
        selection = PullSelection.of(header)
        root = batch_archive(self.config.archive, batch.namespace, batch.name)
        files = await asyncio.get_event_loop().run_in_executor(None, archive_manifest, root, selection)
        counts = self.batch_counts(batch.id)
        async with self.transfers.slot(user["name"]):
            await channel.send({"ok": True, "batch": batch.key, "files": len(files),
                                "bytes": sum(f["size"] for f in files), "stream": True,
                                "unfinished": counts.get("queued", 0) + counts.get("running", 0)})
            await send_archive_tar(channel.writer, root, [f["path"] for f in files])
        if channel.writer.can_write_eof():
            channel.writer.write_eof()

    async def api_forget(self, channel, user, header, payload):
        """Delete an ended batch's archive folder and records (owner or admin); `dry` only
        checks and says what would go."""
        import asyncio
        batch = self.lookup_batch(str(header.get("batch", "")))
        self.check_owner(user, batch, "forget")
        counts = self.batch_counts(batch.id)
        if batch.state == "active" or counts.get("queued") or counts.get("running"):
            raise UserError(f"{batch.key} is still active ({counts.get('queued', 0)} queued, "
                            f"{counts.get('running', 0)} running): wait for it to end, or "
                            f"`distribute kill {batch.key}` first")
        root = batch_archive(self.config.archive, batch.namespace, batch.name)
        files, size = await asyncio.get_event_loop().run_in_executor(None, folder_usage, root)
        if not header.get("dry"):
            if root.exists():
                gone = root.with_name(f".forgotten-{batch.name}-{os.getpid()}")   # vanishes at once
                os.rename(root, gone)
                await in_own_thread(remove_tree, gone)
            self.store.forget_batch(batch.namespace, batch.name)
            with contextlib.suppress(OSError, UnsafeArchive):
                remove_tree(self.files / str(batch.id))
            log(f"batch {batch.key}: forgotten by {user['name']} ({files} files, {human_bytes(size)})")
        await channel.send({"ok": True, "batch": batch.key, "files": files, "bytes": size,
                            "jobs": sum(counts.values()), "dry": bool(header.get("dry"))})

    async def api_du(self, channel, user, header, payload):
        """Space the archive takes, per namespace and batch."""
        import asyncio
        usage = await asyncio.get_event_loop().run_in_executor(None, archive_usage, self.config.archive)
        owners = self.store.batch_owners()
        for namespace in usage:
            for entry in namespace["batches"]:
                owner, state = owners.get((namespace["namespace"], entry["batch"].split("/", 1)[1]),
                                          (None, "unknown"))
                entry.update(owner=owner, state=state)
        await channel.send({"ok": True, "archive": str(self.config.archive), "namespaces": usage,
                            "bytes": sum(n["bytes"] for n in usage)})


def folder_usage(root: Path) -> Tuple[int, int]:
    """(files, bytes) under root, symlinks not followed; (0, 0) when it does not exist."""
    files = size = 0
    for top, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(top, name)).st_size
                files += 1
    return files, size


def archive_usage(archive: Path) -> List[Dict[str, Any]]:
    """[{namespace, bytes, files, batches: [{batch, bytes, files}]}], biggest first."""
    out = []
    for ns_dir in sorted(Path(archive).iterdir()) if Path(archive).is_dir() else []:
        if not ns_dir.is_dir() or ns_dir.is_symlink() or ns_dir.name.startswith("."):
            continue
        batches = []
        for batch_dir in sorted(ns_dir.iterdir()):
            if batch_dir.is_dir() and not batch_dir.is_symlink() and not batch_dir.name.startswith("."):
                files, size = folder_usage(batch_dir)
                batches.append({"batch": f"{ns_dir.name}/{batch_dir.name}", "bytes": size, "files": files})
        batches.sort(key=lambda b: -b["bytes"])
        out.append({"namespace": ns_dir.name, "bytes": sum(b["bytes"] for b in batches),
                    "files": sum(b["files"] for b in batches), "batches": batches})
    out.sort(key=lambda n: -n["bytes"])
    return out


def remove_unfinished_uploads(files: Path) -> None:
    """The `.incoming-*` folders of uploads a killed head was receiving: never a batch's files."""
    for path in Path(files).glob(".incoming-*"):
        with contextlib.suppress(OSError, UnsafeArchive):
            remove_tree(path)


def peer_user(sock) -> Dict[str, Any]:
    """The Unix user on the other end of the API socket (SO_PEERCRED): the batch owner."""
    import pwd
    import struct
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return {"uid": uid, "name": name}


# --- what a client may ask ---------------------------------------------------
# The head checks every field of a request itself: a raw socket client skips the
# job-file loader, so nothing it sends may fail later inside the head or on a node
# (a path out of input/, params nested deeper than JSON encoders go, a bad type).

PARAMS_DEPTH = 32
MAX_RETRIES = 1000
_STR, _LIST, _DICT, _BOOL, _INT = str, list, dict, bool, int
_OPT_STR = (str, type(None))
REQUEST_FIELDS: Dict[str, Dict[str, Tuple[Any, bool]]] = {   # op -> field -> (type, required)
    "status": {"all": (_BOOL, False)}, "nodes": {},
    "kill": {"batch": (_STR, True)},
    "retry": {"batch": (_STR, True), "failed_only": (_BOOL, False)},
    "why": {"ref": (_STR, True)},
    "logs": {"batch": (_STR, True), "job": (_STR, True), "offset": (_INT, False)},
    "report": {"batch": (_STR, True)},
    "forget": {"batch": (_STR, True), "dry": (_BOOL, False)},
    "du": {},
    "pull": {"batch": (_STR, True), "filters": (_LIST, False), "excludes": (_LIST, False), "where": (_OPT_STR, False)},
    "pull_files": {"batch": (_STR, True), "paths": (_LIST, False), "hashes": (_DICT, False)},
    "pull_all": {"batch": (_STR, True), "filters": (_LIST, False), "excludes": (_LIST, False), "where": (_OPT_STR, False)},
    "add": {"plan": (_DICT, True), "jobs": (_LIST, True), "capabilities": (_LIST, False), "matrix": (_OPT_STR, False),
            "dry": (_BOOL, False), "show_caps": (_BOOL, False), "resume": (_BOOL, False), "replace": (_BOOL, False)},
}
_LIST_ITEMS = {"filters": str, "excludes": str, "paths": str, "capabilities": str}


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "text", bool: "true/false", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _type_problem(key: str, value: Any, kind: Any) -> Optional[str]:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        return f"{key} must be {_kind(kinds[0]())}, not {_kind(value)}"
    if not isinstance(value, kinds):
        return f"{key} must be {_kind(kinds[0]())}, not {_kind(value)}"
    return None


def request_problem(header: Dict[str, Any]) -> Optional[str]:
    """Why a client's request (its header) is malformed, None when every field has its type."""
    for key, (kind, required) in REQUEST_FIELDS[header["op"]].items():
        if key not in header:
            if required:
                return f"{key} is missing"
            continue
        problem = _type_problem(key, header[key], kind)
        if problem:
            return problem
        if key in _LIST_ITEMS and any(not isinstance(item, str) for item in header[key]):
            return f"every entry of {key} must be text"
        if key == "hashes" and any(not isinstance(v, str) for v in header[key].values()):
            return "every hash must be text"
        if key == "offset" and header[key] < 0:
            return "offset must not be negative"
    return None


def nesting_depth(value: Any) -> int:
    """How deeply lists and mappings nest in value (without recursion: any depth is measured)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _fields(what: str, value: Any, cls) -> Dict[str, Any]:
    """value as keyword arguments of the dataclass cls: a mapping with only cls's fields."""
    if not isinstance(value, dict):
        raise UserError(f"{what} must be a mapping, not {_kind(value)}")
    known = [f.name for f in record_fields(cls)]
    unknown = [k for k in value if k not in known]
    if unknown:
        raise UserError(f"{what}: unknown key {one_line(repr(unknown[0]))[:80]} (known: {', '.join(known)})")
    return value


def _check(what: str, value: Any, kind: Any) -> Any:
    problem = _type_problem(what, value, kind)
    if problem:
        raise UserError(problem)
    return value


def _check_alias(what: str, alias: Any) -> None:
    _check(what, alias, str)
    problem = alias_problem(alias)
    if problem:
        raise UserError(f"{what}: {problem}")


def mount_problem(mount: str) -> Optional[str]:
    if not mount.startswith("/") or ":" in mount or "," in mount or ".." in mount.split("/"):
        return f"{mount!r} must be an absolute container path without ':', ',' or '..'"
    return None


def check_batch_plan(value: Any) -> BatchPlan:
    data = _fields("plan", value, BatchPlan)
    for key in ("namespace", "batch", "flavour"):
        if key not in data:
            raise UserError(f"plan: {key} is missing")
    plan = BatchPlan(**data)
    for key in ("namespace", "batch"):
        problem = name_problem(_check(f"plan.{key}", getattr(plan, key), str))
        if problem:
            raise UserError(f"plan.{key}: {problem}")
    if plan.flavour not in FLAVOURS:
        raise UserError(f"plan.flavour must be one of {', '.join(FLAVOURS)}")
    if plan.build_alias is not None:
        _check_alias("plan.build_alias", plan.build_alias)
    _check("plan.build_command", plan.build_command, _OPT_STR)
    for alias in _check("plan.initial", plan.initial, list):
        _check_alias("plan.initial", alias)
    for mount in _check("plan.mounts", plan.mounts, list):
        problem = mount_problem(_check("plan.mounts", mount, str))
        if problem:
            raise UserError(f"plan.mounts: {problem}")
    if plan.flavour in CONTAINER_ENGINES or plan.image is not None:     # an engine's argument: never an option
        problem = image_problem(_check("plan.image", plan.image, str)) if plan.flavour in CONTAINER_ENGINES \
            else "only docker and podman batches have one"
        if problem:
            raise UserError(f"plan.image: {problem}")
    for key in _check("plan.after", plan.after, list):
        _check("plan.after", key, str)
    _check("plan.after_failed", plan.after_failed, str)
    return plan


def check_job_plan(index: int, value: Any) -> Tuple[JobPlan, int]:
    where = f"jobs[{index}]"
    entry = _check(where, value, dict)
    unknown = [k for k in entry if k not in ("plan", "retries")]
    if unknown:
        raise UserError(f"{where}: unknown key {one_line(repr(unknown[0]))[:80]} (known: plan, retries)")
    data = _fields(f"{where}.plan", entry.get("plan"), JobPlan)
    if "name" not in data:
        raise UserError(f"{where}.plan: name is missing")
    job = JobPlan(**data)
    problem = name_problem(_check(f"{where}.name", job.name, str)) or reserved_job_name_problem(job.name)
    if problem:
        raise UserError(f"{where}.name: {problem}")
    where = f"job {job.name}"
    for alias in _check(f"{where}: files", job.files, list):
        _check_alias(f"{where}: files", alias)
    _check(f"{where}: command", job.command, _OPT_STR)
    _check(f"{where}: has_script", job.has_script, bool)
    _check(f"{where}: params", job.params, (dict, type(None)))
    if job.params is not None and nesting_depth(job.params) > PARAMS_DEPTH:
        raise UserError(f"{where}: params nest deeper than {PARAMS_DEPTH} levels")
    for key in ("cpus", "memory", "gpus", "time"):
        if _check(f"{where}: resources.{key}", getattr(job, key), int) < 0:
            raise UserError(f"{where}: resources.{key} must not be negative")
    retries = _check(f"{where}: retries", entry.get("retries", 0), int)
    if not 0 <= retries <= MAX_RETRIES:
        raise UserError(f"{where}: retries must be between 0 and {MAX_RETRIES}")
    return job, retries


def check_add_request(header: Dict[str, Any]) -> Tuple[BatchPlan, List[Tuple[JobPlan, int]], List[str]]:
    """An `add` request's plan, jobs and capabilities, every field checked (UserError if not)."""
    plan = check_batch_plan(header.get("plan"))
    if not header["jobs"]:
        raise UserError("the batch has no jobs")
    jobs = [check_job_plan(i, j) for i, j in enumerate(header["jobs"])]
    names: set = set()
    for job, _ in jobs:
        if job.name in names:
            raise UserError(f"job name {job.name!r} is used twice")
        names.add(job.name)
    capabilities = list(header.get("capabilities", []))
    for capability in capabilities:
        if not CAPABILITY_RE.match(capability):
            raise UserError(f"capability {one_line(repr(capability))[:80]} is not a valid name")
    matrix = header.get("matrix")
    if matrix is not None and not re.match(r"@[^:\s]+:[^\s]+\Z", matrix):
        raise UserError(f"{one_line(repr(matrix))[:80]} is not a Matrix user id like @alice:example.org")
    return plan, jobs, capabilities


# ---------------------------------------------------------------------------
# 14. The client
#
# Commands on a user's machine reach the head's Unix socket: directly with
# `--head local`, else through one SSH connection to the head (stream-local
# forwarding), honouring ~/.ssh/config, the agent and known_hosts.
# ---------------------------------------------------------------------------

def parse_head(text: str) -> Tuple[Optional[str], str, Optional[int]]:
    """'[user@]host[:port]' -> (user, host, port)."""
    match = re.match(r"(?:([A-Za-z_][A-Za-z0-9_.-]*)@)?([A-Za-z0-9_.-]+|\[[0-9a-fA-F:]+\])(?::(\d{1,5}))?\Z", text)
    if not match or match.group(2).startswith("-"):
        raise UserError(f"--head {text!r} is not like [user@]host[:port] or 'local'")
    return match.group(1), match.group(2).strip("[]"), int(match.group(3)) if match.group(3) else None


def head_connect_problem(exc: BaseException, user: Optional[str], host: str, port: Optional[int]) -> str:
    """Why asyncssh's connection to the head failed, and what to do, in the user's terms."""
    import asyncio
    import errno
    asyncssh = import_asyncssh()
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        kind = "host-key"
    elif isinstance(exc, asyncssh.PermissionDenied):
        kind = "denied"
    elif isinstance(exc, OSError) and (exc.errno == errno.ECONNREFUSED or f"[Errno {errno.ECONNREFUSED}]" in str(exc)):
        kind = "refused"
    elif isinstance(exc, socket.gaierror):
        kind = "no-such-host"
    elif isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        kind = "timeout"
    else:
        kind = "other"
    return head_problem(kind, user, host, port, SshTransport(NodeSpec("head", host)).describe_error(exc))


def head_problem(kind: str, user: Optional[str], host: str, port: Optional[int], other: str) -> str:
    """What a lab member reads when SSH to the head fails (whichever SSH carried it)."""
    login = f"{user + '@' if user else ''}{host}"
    where = f"{host}:{port or 22}"
    if kind == "host-key":
        keyscan = f"ssh-keyscan {f'-p {port} ' if port else ''}{host} >> ~/.ssh/known_hosts"
        return (f"the head {host}'s SSH host key is unknown to this machine (or has changed): it is not in "
                f"{Path.home() / '.ssh' / 'known_hosts'}; connect once with `ssh {f'-p {port} ' if port else ''}"
                f"{login}` and accept the key after comparing its fingerprint with the head's admin, "
                f"or add it with `{keyscan}`")
    if kind == "denied":
        return (f"the head {host} refused your SSH login as {user or current_user()}: add your public key to "
                f"that account's ~/.ssh/authorized_keys there (`ssh-copy-id {login}`)")
    if kind == "refused":
        return (f"nothing listens on {where}: check the host and port of --head (the port is SSH's: 22 unless "
                "the head's sshd uses another)")
    if kind == "no-such-host":
        return f"cannot find the head {host}: no such host name (check --head, or your ~/.ssh/config)"
    if kind == "timeout":
        return f"the head {where} did not answer: is the machine up and on this network?"
    return other


def head_socket_problem(path: str, head: Optional[str], reason: str = "") -> str:
    """The head's machine answered, but nothing serves the API socket there."""
    if "prohibited" in reason.lower():
        return (f"the SSH server on {head} does not forward to the head's socket ({reason}): its admin "
                "must allow it (AllowStreamLocalForwarding yes in sshd_config)")
    where = f"{path} on {head}" if head else path
    return (f"no head is running at {where}: is `distribute serve` running? If it is, the socket is "
            "elsewhere (give --socket STATE/head.sock) or your account may not use it (the head's admin "
            "adds you to its --group)")


class HeadClient:
    """One connection to the head's API; each request opens its own channel on it: a
    Unix socket forwarded by OpenSSH's `ssh` (kept for a while, see OpenSshForward), else
    asyncssh's stream-local forwarding."""

    origin: Optional[str] = None      # where the head came from when not --head: named in errors

    def __init__(self, head: Optional[str], socket_path: Optional[str]):
        self.head, self.socket_path, self.conn = head, socket_path, None
        self.forward: Any = None            # an OpenSshForward, False when asyncssh carries it

    def unreachable(self, message: str) -> Failed:
        return Failed(message + (f"; {self.origin}" if self.origin else ""))

    def local_socket(self) -> str:
        if self.socket_path:
            return self.socket_path
        for candidate in default_socket_candidates():
            if candidate.exists():
                return str(candidate)
        raise UserError("no head runs on this machine (no head.sock found): start `distribute serve`, "
                        "or give --head [user@]host")

    async def open(self) -> Channel:
        import asyncio
        if self.head in (None, "", "local"):
            path = self.local_socket()
            try:
                reader, writer = await asyncio.open_unix_connection(path, limit=2 ** 24)
            except (FileNotFoundError, PermissionError, ConnectionRefusedError) as exc:
                raise self.unreachable(local_socket_failure(path, exc)) from None
            return Channel(reader, writer)
        if self.openssh_forward():
            try:
                reader, writer = await self.forward.open()
            except Failed as exc:
                raise self.unreachable(str(exc)) from None
            return ForwardedChannel(reader, writer, self.closed_socket_message())
        asyncssh = import_asyncssh()
        if self.conn is None:
            user, host, port = parse_head(self.head)
            options: Dict[str, Any] = {}
            if user:
                options["username"] = user
            if port:
                options["port"] = port
            try:
                self.conn = await asyncssh.connect(host, encryption_algs=PREFERRED_CIPHERS,
                                                   compression_algs=None, **options)
                await enable_server_nodelay(self.conn)
            except (OSError, asyncssh.Error) as exc:
                raise self.unreachable(head_connect_problem(exc, user, host, port)) from None
        path = self.socket_path or REMOTE_SOCKET
        try:
            reader, writer = await self.conn.open_unix_connection(path)
        except asyncssh.ChannelOpenError as exc:
            raise self.unreachable(head_socket_problem(path, self.head, exc.reason)) from None
        return Channel(reader, writer)

    def openssh_forward(self) -> Optional[OpenSshForward]:
        """The OpenSshForward to the head, or None when asyncssh must carry the connection."""
        if self.forward is None:
            program = openssh_program()
            if program:
                user, host, port = parse_head(self.head)
                forward = OpenSshForward(program, host, user, port, self.socket_path or REMOTE_SOCKET)
                forward.to_head = True
            self.forward = forward if program and forward.usable else False
        return self.forward or None

    def closed_socket_message(self) -> str:
        """What to say when SSH reached the head's machine but nothing answered on the socket."""
        message = head_socket_problem(self.socket_path or REMOTE_SOCKET, self.head)
        return message + (f"; {self.origin}" if self.origin else "")

    async def call(self, header: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
        channel = await self.open()
        try:
            with self.head_may_go_away():
                reply, data = await channel.request(header, payload)
        finally:
            channel.close()
        return checked_reply(reply), data

    def call_blocking(self, header: Dict[str, Any], payload: bytes = b"") -> Optional[Tuple[Dict[str, Any], bytes]]:
        """call() without an event loop, for a head on this machine or behind an OpenSshForward;
        None when only asyncssh can reach the head."""
        forwarded = self.head not in (None, "", "local")
        if not forwarded:
            path = self.local_socket()
            try:
                sock = unix_connect(path)
            except (FileNotFoundError, PermissionError, ConnectionRefusedError) as exc:
                raise self.unreachable(local_socket_failure(path, exc)) from None
        elif self.openssh_forward():
            try:
                sock = self.forward.connect()
            except Failed as exc:
                raise self.unreachable(str(exc)) from None
        else:
            return None
        with sock:
            try:
                reply, data = request_on_socket(sock, header, payload)
            except ProtocolError as exc:
                if forwarded and str(exc) == "connection closed":       # ssh never reached the far socket
                    raise Failed(self.closed_socket_message()) from None
                raise
        return checked_reply(reply), data

    async def call_with_files(self, header: Dict[str, Any], entries: List[Tuple[str, str]]
                              ) -> Dict[str, Any]:
        """A request the head first accepts, then the files as one tar stream, then the answer."""
        channel = await self.open()
        try:
            with self.head_may_go_away():
                reply, _ = await channel.request(header)
                if reply.get("ok") and reply.get("send"):
                    await send_tar_stream(channel.writer, entries)
                    reply, _ = await channel.receive()
        finally:
            channel.close()
        if not reply.get("ok"):
            raise (UserError if reply.get("code") == EXIT_USAGE else Failed)(reply.get("error") or "refused")
        return reply

    @contextlib.contextmanager
    def head_may_go_away(self) -> Iterator[None]:
        """The head stopping (killed, restarted, its machine gone) in the middle of a request
        is one line, exit 1: a half-sent request is never kept by the head."""
        errors: Tuple[type, ...] = (ConnectionError, EOFError, ProtocolError)
        if self.conn is not None:
            errors += (import_asyncssh().Error,)
        try:
            yield
        except errors as exc:
            if isinstance(exc, BadFrame):
                raise
            where = "local" if self.head in (None, "", "local") else self.head
            raise Failed(f"the head ({where}) went away in the middle of this request "
                         f"({one_line(str(exc)) or type(exc).__name__}); nothing half-sent is kept: "
                         "try again once it is back (distribute status tells)") from None

    async def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def local_socket_failure(path: str, exc: OSError) -> str:
    """Why the head's socket on this machine did not answer, and what to do."""
    if isinstance(exc, PermissionError):
        return f"{path}: permission denied (ask the admin to add you to the head's group)"
    return head_socket_problem(path, None)


def checked_reply(reply: Dict[str, Any]) -> Dict[str, Any]:
    """The head's reply, or its refusal raised (exit 2 for bad input, else 1)."""
    if not reply.get("ok"):
        message = reply.get("error") or "the head refused"
        raise (UserError if reply.get("code") == EXIT_USAGE else Failed)(message)
    return reply


class ForwardedChannel(Channel):
    """A channel through an OpenSshForward: ssh accepts it here before reaching the far socket,
    so a first reply that never comes means the far socket could not be reached."""

    def __init__(self, reader, writer, unreachable: str):
        super().__init__(reader, writer)
        self.unreachable, self.answered = unreachable, False

    async def receive(self, bounds=None) -> Tuple[Dict[str, Any], bytes]:
        try:
            result = await super().receive(bounds)
        except ProtocolError:
            if self.answered:
                raise
            raise Failed(self.unreachable) from None
        self.answered = True
        return result


def head_client(ctx_obj: Dict[str, Any]) -> HeadClient:
    """A client for the head the command line (or config, or environment) names."""
    client = HeadClient(ctx_obj.get("head"), ctx_obj.get("socket"))
    client.origin = ctx_obj.get("origin")
    return client


def run_client(ctx_obj: Dict[str, Any], work) -> Any:
    """Run `work(client)` against the head the command line names, then disconnect."""
    import asyncio

    async def go():
        client = head_client(ctx_obj)
        try:
            return await work(client)
        finally:
            await client.close()
    return asyncio.run(go())


def client_call(ctx_obj: Dict[str, Any], header: Dict[str, Any], payload: bytes = b"") -> Tuple[Dict[str, Any], bytes]:
    answer = head_client(ctx_obj).call_blocking(header, payload)
    if answer is not None:
        return answer
    return run_client(ctx_obj, lambda client: client.call(header, payload))


def batch_upload(batch: JobFile) -> List[Tuple[str, str]]:
    """The files a batch travels with: shared/ (build file, initial_files/) and jobs/<name>/."""
    entries: List[Tuple[str, str]] = []
    if batch.build:
        entries.append((f"shared/{batch.build.alias}", batch.build.path))
    entries += [(f"shared/initial_files/{f.alias}", f.path) for f in batch.initial_files]
    for job in batch.jobs:
        if job.file:
            entries.append((f"jobs/{job.name}/job.py", job.file.path))
        entries += [(f"jobs/{job.name}/input/{f.alias}", f.path) for f in job.required_files]
    return entries


def add_request(batch: JobFile, **flags: Any) -> Dict[str, Any]:
    return dict({"op": "add", "plan": dataclasses.asdict(BatchPlan.of(batch)),
                 "jobs": [{"plan": vars(JobPlan.of(j)), "retries": j.retries} for j in batch.jobs],  # flat dataclass
                 "capabilities": batch.meta.capabilities, "matrix": batch.meta.matrix}, **flags)


def readable_json(document: Dict[str, Any]) -> str:
    """`--json` output: an object with one list element per line, as readable as indent=2 for
    lists of records and greppable, yet written by json's C encoder (indent= takes the pure-Python
    one, which was a third of `status --json`'s time with 100,000 jobs queued)."""
    parts = []
    for key, value in document.items():
        if isinstance(value, list) and value:
            items = ",\n    ".join(json.dumps(item) for item in value)
            parts.append(f"  {json.dumps(key)}: [\n    {items}\n  ]")
        else:
            parts.append(f"  {json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(parts) + "\n}"


def format_status(reply: Dict[str, Any]) -> List[str]:
    lines = []
    running_by_batch: Dict[str, List[Dict[str, Any]]] = {}
    for job in reply.get("running", []):
        running_by_batch.setdefault(job["batch"], []).append(job)
    for batch in reply.get("batches", []):
        jobs = batch["jobs"]
        total = sum(jobs.values()) or 1
        bar = status_bar(jobs, total)
        lines.append(f"{batch['batch']:<32} {batch['owner']:<10} {batch['state']:<7} {bar} "
                     f"{jobs['done']} done, {jobs['running']} running, {jobs['queued']} queued, "
                     f"{jobs['failed']} failed" + (f", {jobs['killed']} killed" if jobs["killed"] else ""))
        for job in running_by_batch.get(batch["batch"], []):
            progress = f" {job['progress']:.0f}%" if job.get("progress") is not None else ""
            paused = " (paused)" if job.get("paused") else ""
            lines.append(f"    {job['job']} on {job['node']}{progress}{paused}")
        for job in reply.get("stopped", []):
            if job["batch"] == batch["batch"]:
                lines.append(f"    {job['job']} stopped: {job['reason']}")
    for node in reply.get("paused_nodes", []):
        lines.append(f"{node['node']} paused since {clock_time(node['since'])}: {'; '.join(node['why'])}")
    return lines or ["no batches"]


def status_bar(jobs: Dict[str, int], total: int, width: int = 20) -> str:
    cells = ""
    for state, mark in (("done", "#"), ("failed", "x"), ("killed", "x"), ("running", ">"), ("queued", ".")):
        cells += mark * int(round(width * jobs.get(state, 0) / total))
    return "[" + (cells + "." * width)[:width] + "]"


def local_date_time(iso: Optional[str]) -> str:
    """'2026-11-30 14:05' in this machine's time zone, from the head's ISO time."""
    try:
        moment = datetime.datetime.fromisoformat(str(iso))
    except ValueError:
        return str(iso)
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(moment.timestamp()))


def format_nodes(nodes: List[Dict[str, Any]]) -> List[str]:
    lines = []
    for node in nodes:
        state = "upgrading" if node.get("upgrading") else node["state"]
        if node["paused"]:
            state = "paused by " + ", ".join(
                f"{p['user']} until {local_date_time(p['until'])}" if not p.get("reason")
                else f"the owner ({p['reason']}, since {local_date_time(p['since'])})"
                for p in node["paused"])
        busy = ", ".join(r.get("job") and f"{r['batch']}/{r['job']}" or f"build {r.get('build')}"
                         for r in node["running"]) or "idle"
        slots = node["slots"] if node.get("slots_now", node["slots"]) == node["slots"] else \
            f"{node['slots_now']} (desk hours; {node['slots']})"
        lines.append(f"{node['name']:<12} {state:<12} {len(node['running'])}/{slots} slots  {busy}")
        lines.append(f"{'':<12} capabilities: {', '.join(node['capabilities']) or '-'}"
                     + (f"; {node['cpus']} cpus" if node.get("cpus") else "")
                     + (f", {node['gpus']} gpus" if node.get("gpus") else "")
                     + (f"; version {node['version']}" if node.get("version") else "")
                     + (f" (build {node['build']})" if node.get("build") else ""))
        if node.get("capacity"):
            have, used = node["capacity"], node["used"]
            lines.append(f"{'':<12} in use: {used['cpus']}/{have['cpus']} cpus, {format_size(used['memory'])}/"
                         f"{format_size(have['memory'])} memory, {used['gpus']}/{have['gpus']} gpus"
                         + (f"; held for {node['held_for']}" if node.get("held_for") else ""))
        if node.get("error"):
            lines.append(f"{'':<12} {node['error']}")
        for given_up in node.get("gave_up") or []:
            lines.append(f"{'':<12} gave up on {given_up['batch']}: {given_up['reason']}")
    return lines


def plan_pull(dest: Path, files: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], Dict[str, str], int]:
    """Which files to ask for: missing or different ones (size, then mtime, then hash).
    Returns (wanted, {path: local sha256 when only the mtime differs}, files already here)."""
    wanted, hashes, present = [], {}, 0
    if not dest.is_dir():                   # a first pull: no need to look for each file
        return list(files), hashes, present
    base = str(dest)
    for entry in files:
        local = os.path.join(base, entry["path"])
        try:
            info = os.stat(local)
        except OSError:
            wanted.append(entry)
            continue
        if info.st_size == entry["size"] and int(info.st_mtime) == entry["mtime"]:
            present += 1
            continue
        if info.st_size == entry["size"]:
            hashes[entry["path"]] = file_sha256(local) or ""
        wanted.append(entry)
    return wanted, hashes, present


def remove_partial_files(dest: Path) -> None:
    """Leftovers of an interrupted pull never stay around (they never had a final name)."""
    if dest.is_dir():
        for top, _, names in os.walk(dest):
            for name in names:
                if name.endswith(PART_SUFFIX):
                    os.unlink(os.path.join(top, name))


class Progress:
    """Bytes, rate and ETA on one terminal line; silent when not a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.start = self.last = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.enabled and (now - self.last > 0.2 or self.done >= self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-6)
            eta = (self.total - self.done) / rate if rate > 0 else 0
            sys.stderr.write(f"\r{human_bytes(self.done)} / {human_bytes(self.total)}  "
                             f"{human_bytes(rate)}/s  ETA {format_duration(eta) if eta >= 1 else '0s'}   ")
            sys.stderr.flush()

    def finish(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


async def receive_tar_stream(channel: Channel, dest: Path, progress: Progress) -> None:
    """Extract the raw tar bytes that follow a reply header, in a thread, as they arrive
    (reading the socket itself where it is a plain one: see receive_tar)."""
    await receive_tar(channel.reader, dest, progress.advance)


async def pull_batch(client: HeadClient, batch_ref: str, selection: PullSelection, save_dir: Path,
                     dry: bool, show_progress: bool) -> Dict[str, Any]:
    if not dry and "/" in batch_ref and not inside(save_dir, *batch_ref.split("/", 1)).is_dir():
        summary = await pull_into_new_folder(client, batch_ref, selection, save_dir, show_progress)
        if summary is not None:
            return summary
    manifest, _ = await client.call(dict(selection.header(), op="pull", batch=batch_ref))
    namespace, name = manifest["batch"].split("/", 1)
    dest = inside(save_dir, namespace, name)
    wanted, hashes, present = plan_pull(dest, manifest["files"])
    summary = {"batch": manifest["batch"], "destination": str(dest), "files": len(manifest["files"]),
               "up_to_date": present, "unfinished_jobs": manifest["unfinished"],
               "bytes": sum(e["size"] for e in wanted), "transferred": 0, "wanted": wanted}
    if dry or not wanted:
        return summary
    remove_partial_files(dest)
    dest.mkdir(parents=True, exist_ok=True)
    channel = await client.open()
    try:
        reply, _ = await channel.request({"op": "pull_files", "batch": manifest["batch"],
                                          "paths": [e["path"] for e in wanted], "hashes": hashes})
        if not reply.get("ok"):
            raise Failed(reply.get("error") or "the head refused")
        by_path = {e["path"]: e for e in wanted}
        for rel in reply.get("same", []):
            os.utime(dest / rel, (by_path[rel]["mtime"], by_path[rel]["mtime"]))
            summary["up_to_date"] += 1
        progress = Progress(sum(by_path[p]["size"] for p in by_path if p not in reply.get("same", [])),
                            show_progress)
        await receive_tar_stream(channel, dest, progress)
        progress.finish()
        summary["transferred"] = progress.done
    finally:
        channel.close()
    return summary


async def pull_into_new_folder(client: HeadClient, batch_ref: str, selection: PullSelection, save_dir: Path,
                               show_progress: bool) -> Optional[Dict[str, Any]]:
    """A pull into a folder that does not exist yet wants every file the selection keeps: one
    request (pull_all) has them streamed at once.  None when the usual way must run instead: the
    head is older (it does not know pull_all), refused (the usual way says why), or the batch's
    folder exists after all (the head named the batch otherwise)."""
    channel = await client.open()
    try:
        reply, _ = await channel.request(dict(selection.header(), op="pull_all", batch=batch_ref))
        if not reply.get("ok") or not isinstance(reply.get("batch"), str) or "/" not in reply["batch"]:
            return None
        namespace, name = reply["batch"].split("/", 1)
        dest = inside(save_dir, namespace, name)
        if dest.is_dir():
            return None
        dest.mkdir(parents=True, exist_ok=True)
        progress = Progress(int(reply.get("bytes") or 0), show_progress)
        await receive_tar_stream(channel, dest, progress)
        progress.finish()
    finally:
        channel.close()
    return {"batch": reply["batch"], "destination": str(dest), "files": reply["files"], "up_to_date": 0,
            "unfinished_jobs": reply["unfinished"], "bytes": reply["bytes"], "transferred": progress.done,
            "wanted": None}


def split_job_ref(ref: str) -> Tuple[str, str]:
    batch, _, job = ref.rpartition("/")
    if not batch or not job:
        raise UserError(f"{ref!r} is not BATCH/JOB (or NAMESPACE/BATCH/JOB)")
    return batch, job


# ---------------------------------------------------------------------------
# 15. Around the commands: service, node checks, config, reports
#
# What a lab needs around the commands: a systemd unit for the head, a check of
# every node before the head first reaches it, the client's default head and
# shell completion, and a timeline picture of a batch.  Head-only code (3.10+).
# ---------------------------------------------------------------------------

# --- `service install`: the head as a systemd service -----------------------

SYSTEM_UNIT_DIR = "/etc/systemd/system"
SYSTEM_STATE_DIR = "/var/lib/distribute"       # what clients' --head finds without --socket


def systemd_quote(arg: str) -> str:
    """One ExecStart word, double-quoted for systemd: `%` (specifiers) and `$`
    (variables) are doubled, `\\` and `"` escaped; control characters refused."""
    if any(ord(c) < 32 or ord(c) == 127 for c in arg):
        raise UserError(f"{arg!r}: a path with control characters cannot go into a systemd unit")
    text = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{text}"'


@record
class ServiceUnit:
    """What `service install` writes: the serve command line and who runs it."""
    argv: List[str]                      # absolute program path first
    system: bool                         # a system unit (User=) or a user unit (systemctl --user)
    user: Optional[str] = None           # User= of a system unit
    state_directory: bool = False        # let systemd create /var/lib/distribute for User=

    def text(self) -> str:
        service = ["Type=simple", "ExecStart=" + " ".join(systemd_quote(a) for a in self.argv),
                   "Restart=on-failure", "RestartSec=5s", "Environment=PYTHONUNBUFFERED=1",
                   # only the head stops: a local node's detached supervisor and its jobs live in
                   # this unit's cgroup and must outlive a head restart, as they do on other nodes
                   "KillMode=process", "TimeoutStopSec=30s"]
        if self.system and self.user:
            service.insert(0, f"User={self.user}")
        if self.state_directory:
            service.append("StateDirectory=distribute")
        wanted = "multi-user.target" if self.system else "default.target"
        return "\n".join(
            ["# Written by `distribute service install`; `distribute service install --help` says how to",
             "# change it.  Logs: journalctl" + ("" if self.system else " --user") + " -u distribute",
             "[Unit]", "Description=distribute head: batches of jobs on the lab's workstations",
             "After=network-online.target", "Wants=network-online.target", "",
             "[Service]"] + service + ["", "[Install]", f"WantedBy={wanted}", ""])


def service_user(requested: Optional[str]) -> str:
    """The account the head runs as: --user, else whoever called sudo, else ourselves."""
    import pwd
    name = requested or os.environ.get("SUDO_USER") or current_user()
    try:
        pwd.getpwnam(name)
    except KeyError:
        raise UserError(f"--user {name}: no such user on this machine") from None
    return name


def service_argv(nodes_file: Optional[str], state: Path, archive: Path, group: Optional[str],
                 matrix_config: Optional[str]) -> List[str]:
    """`distribute serve ...` with every path absolute (systemd starts in /)."""
    argv = [os.path.abspath(a) for a in program_argv()] + ["serve"]
    if nodes_file:
        load_nodes_file(nodes_file)                  # a bad nodes file fails now, not at boot
        argv += ["--nodes", os.path.abspath(nodes_file)]
    argv += ["--state", str(state), "--archive", str(archive)]
    if group:
        import grp
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise UserError(f"--group {group}: no such group") from None
        if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
            raise UserError(f"--group {group}: {current_user()} is not a member of it, so the head cannot give "
                            f"it the socket; add the account to the group (then log in again) or drop --group")
        argv += ["--group", group]
    if matrix_config:
        if not os.path.isfile(matrix_config):
            raise UserError(f"--matrix-config {matrix_config}: no such file")
        argv += ["--matrix-config", os.path.abspath(matrix_config)]
    return argv


def prepare_service_dirs(folders: List[Path], owner: Optional[str]) -> List[Path]:
    """Create missing state/archive folders, owned by the service's user when we are root."""
    created = []
    for folder in folders:
        if folder.exists():
            continue
        folder.mkdir(parents=True)
        created.append(folder)
        if owner and os.geteuid() == 0:
            shutil.chown(folder, owner)
    return created


def user_unit_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "systemd" / "user" / "distribute.service"


def enable_commands(system: bool, written: Path) -> List[str]:
    """The commands that make systemd run the unit now and at every boot."""
    if system:
        target = Path(SYSTEM_UNIT_DIR) / "distribute.service"
        sudo = "" if os.geteuid() == 0 else "sudo "
        copy = [] if written == target else [f"{sudo}cp {shlex.quote(str(written))} {target}"]
        return copy + [f"{sudo}systemctl daemon-reload", f"{sudo}systemctl enable --now distribute",
                       f"{sudo}journalctl -u distribute -f"]
    target = user_unit_path()
    copy = [] if written == target else [f"cp {shlex.quote(str(written))} {shlex.quote(str(target))}"]
    return copy + ["systemctl --user daemon-reload", "systemctl --user enable --now distribute",
                   "journalctl --user -u distribute -f",
                   f"loginctl enable-linger {current_user()}   # keeps it running when you log out"]


def serves_as(user: str, python: str, program: str) -> bool:
    """Whether `user` can run the head as `python program` (3.10+, the program readable and
    its imports there): tried for real, as that user, with the environment systemd gives."""
    import pwd
    account = pwd.getpwnam(user)
    env = {"PATH": "/usr/bin:/bin", "HOME": account.pw_dir, "USER": user, "LOGNAME": user}
    try:
        for argv in ([python, "-c", "import sys; sys.exit(sys.version_info < (3, 10))"], [python, program, "--version"]):
            if subprocess.run(argv, user=account.pw_uid, group=account.pw_gid, extra_groups=[], cwd="/", env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              timeout=120).returncode != 0:
                return False
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def service_python(user: str, python: str, program: str) -> Tuple[str, Optional[str]]:
    """The python3 for ExecStart that `user` can run (root's pyenv python is not one), and a
    note when it is not the one running now; none at all: a UserError saying what to do."""
    candidates = [python] + [p for p in ("/usr/bin/python3", "/usr/local/bin/python3")
                             if p != python and os.path.isfile(p)]
    for candidate in candidates:
        if serves_as(user, candidate, program):
            note = None if candidate == python else (f"note: ExecStart uses {candidate}: {user} cannot run the head "
                                                     f"with {python}")
            return candidate, note
    raise UserError(f"{user} cannot run the head with {' or '.join(candidates)} and {program} (a python3 of 3.10 "
                    f"or newer that {user} may execute, and the program readable by {user}, are needed): put "
                    f"distribute.pyz where {user} can read it and run `sudo /usr/bin/python3 distribute.pyz "
                    "service install ...`")


def group_member_problem(user: str, group: str) -> Optional[str]:
    """The head gives its socket to --group: its account must be a member to do so."""
    import grp
    import pwd
    try:
        entry, account = grp.getgrnam(group), pwd.getpwnam(user)
    except KeyError:
        return None                 # service_argv names a missing group
    if account.pw_gid == entry.gr_gid or user in entry.gr_mem or user == "root":
        return None
    return (f"the head's account {user} must be in --group {group} (it hands its socket to that group): "
            f"`sudo usermod -aG {group} {user}`, then run this again")


def install_service(user: Optional[str], nodes_file: Optional[str], state: Optional[str],
                    archive: Optional[str], group: Optional[str], matrix_config: Optional[str],
                    output: Optional[str], system: bool) -> Tuple[Path, List[str], List[str]]:
    """Write the unit file; return where, the commands to enable it, and notes."""
    owner = service_user(user) if system else current_user()
    if system:
        state_dir = Path(state).resolve() if state else Path(SYSTEM_STATE_DIR)
        default_output = Path(SYSTEM_UNIT_DIR) / "distribute.service"
    else:
        state_dir = Path(state).resolve() if state else default_state_dir().resolve()
        default_output = user_unit_path()
    archive_dir = Path(archive).resolve() if archive else state_dir / "archive"
    argv, notes = service_argv(nodes_file, state_dir, archive_dir, group, matrix_config), []
    if group and group_member_problem(owner, group):
        raise UserError(group_member_problem(owner, group))
    if system and os.geteuid() == 0 and owner != "root":
        argv[0], note = service_python(owner, argv[0], argv[1])
        notes += [note] if note else []
    if system and not group:
        notes.append(f"note: only {owner} and root may use this head; to let the lab in, install again with "
                     f"--group GROUP ({owner} and the lab's accounts in it)")
    unit = ServiceUnit(argv, system, owner if system else None,
                       state_directory=system and state_dir == Path(SYSTEM_STATE_DIR))
    target = Path(output).resolve() if output else default_output
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(target, lambda tmp: tmp.write_text(unit.text()))
        # systemd makes StateDirectory= itself, owned by User=, and serve makes the archive in it
        made_by_systemd = unit.state_directory and (archive_dir == state_dir or state_dir in archive_dir.parents)
        prepare_service_dirs([] if made_by_systemd else [state_dir, archive_dir], owner if system else None)
    except PermissionError as exc:
        raise Failed(f"cannot write {exc.filename or target}: permission denied; run this as root "
                     "(sudo), or write the unit elsewhere with --output FILE") from None
    return target, enable_commands(system, target), notes


# --- `nodes --check`: what each node still needs, before the head reaches it --

DEFAULT_MIN_FREE = "5G"
MIN_NODE_PYTHON = (3, 8)

# (sizes such as --min-free are read by parse_size, section 3)


# One round trip per node; prints key=value lines.  $1 python, $2 workdir, $3 pause dir.
# The pause dir is made before the workdir: by default they are the same folder, and it
# must be 1777 (every workstation user writes a lock there), as `distribute pause` makes it.
NODE_CHECK_SCRIPT = r'''
py=$1 wd=$2 pd=$3
echo "user=$(id -un)"
out=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>&1); rc=$?
if [ $rc -eq 0 ]; then echo "python=$out"
elif [ $rc -eq 127 ] || [ $rc -eq 126 ]; then echo "python-missing=$rc"
else echo "python-error=$(printf '%s\n' "$out" | tail -n 1)"; fi
if [ -L "$pd" ]; then echo "pause=symlink"
elif [ -d "$pd" ]; then echo "pause-mode=$(stat -c %a "$pd")"
elif [ -e "$pd" ]; then echo "pause=not-a-folder"
elif mkdir -p "$(dirname "$pd")" 2>/dev/null && { mkdir -m 1777 "$pd" 2>/dev/null || [ -d "$pd" ]; }; then
  echo "pause-mode=$(stat -c %a "$pd")"
else echo "pause=cannot-create"; fi
if mkdir -p "$wd" 2>/dev/null; then
  t="$wd/.distribute-check.$$"
  if (: > "$t") 2>/dev/null; then rm -f "$t"; echo "workdir=ok"; else echo "workdir=unwritable"; fi
else echo "workdir=cannot-create"; fi
d=$wd
while [ ! -d "$d" ]; do d=$(dirname "$d"); done
df -Pk "$d" 2>/dev/null | awk 'NR==2 {print "free-kib=" $4}'
mid=$DISTRIBUTE_MACHINE_ID
[ -n "$mid" ] || mid=$(cat /etc/machine-id 2>/dev/null || cat /var/lib/dbus/machine-id 2>/dev/null)
echo "machine-id=$mid"
echo "hostname=$(uname -n)"
c="$wd/.distribute/machine.json"
if [ -f "$c" ]; then echo "claim=$(tr -d '\n' < "$c")"; echo "claim-age=$(( $(date +%s) - $(stat -c %Y "$c") ))"; fi
'''


@record
class NodeCheck:
    """The outcome of checking one node: what is missing, and the facts found."""
    name: str
    problems: List[str] = field(default_factory=list)
    python: Optional[str] = None
    free: Optional[int] = None
    machine: Optional[str] = None
    hostname: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def line(self) -> str:
        if self.problems:
            return f"{self.name}: " + "; ".join(self.problems)
        facts = [f"python {self.python}"] + ([f"{human_bytes(self.free)} free"] if self.free is not None else [])
        return f"{self.name}: ok ({', '.join(facts)})"


def check_node_workdir(spec: NodeSpec) -> str:
    """The workdir the head will use there (a local node's default lives under the state dir)."""
    if spec.is_local and spec.workdir == DEFAULT_NODE_WORKDIR:
        return str(default_state_dir().resolve() / "nodes" / spec.name)
    return spec.workdir


def connection_problem(transport, exc: BaseException, timeout: float) -> str:
    """Why the head cannot log in there, and what fixes it."""
    import asyncio
    asyncssh = import_asyncssh()
    spec = transport.node
    if isinstance(exc, asyncio.TimeoutError):
        return f"unreachable: {spec.host} did not answer within {timeout:.0f}s"
    text = transport.describe_error(exc)
    login = f"{spec.user + '@' if spec.user else ''}{spec.host}"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return f"{text} (connect once with `ssh {login}` as {current_user()}, compare the fingerprint, accept it)"
    if isinstance(exc, asyncssh.PermissionDenied):
        return f"{text} (add {current_user()}'s public key to ~/.ssh/authorized_keys of {login})"
    if isinstance(exc, (OSError, asyncssh.DisconnectError)):
        return f"unreachable: {text}"
    return text


def judge_node_facts(check: NodeCheck, facts: Dict[str, str], spec: NodeSpec, workdir: str,
                     pause_folder: str, min_free: int) -> None:
    """Turn the check script's key=value lines into problems, in the order an admin fixes them."""
    user = facts.get("user", spec.user or "the node account")
    if "python" in facts:
        try:
            version = tuple(int(p) for p in facts["python"].split("."))
        except ValueError:
            version = ()
        if version < MIN_NODE_PYTHON:
            check.problems.append(f"{spec.python} is {facts['python']}: too old (need "
                                  f"{'.'.join(map(str, MIN_NODE_PYTHON))} or newer; set `python:` in the nodes file)")
        check.python = facts["python"]
    elif "python-missing" in facts:
        check.problems.append(f"{spec.python} not found")
    else:
        check.problems.append(f"{spec.python} does not run: {facts.get('python-error') or 'no answer'}")
    if facts.get("workdir") == "cannot-create":
        check.problems.append(f"workdir {workdir} cannot be created by {user}")
    elif facts.get("workdir") != "ok":
        check.problems.append(f"workdir {workdir} not writable by {user}")
    pause_problem = {"symlink": "is a symlink", "not-a-folder": "is not a folder",
                     "cannot-create": f"cannot be created by {user}"}.get(facts.get("pause", ""))
    if pause_problem:
        check.problems.append(f"pause dir {pause_folder} {pause_problem}")
    elif "pause-mode" in facts:
        mode = int(facts["pause-mode"], 8)
        if mode & 0o1002 != 0o1002:
            check.problems.append(f"pause dir {pause_folder} has mode {mode:04o}: workstation users cannot "
                                  f"pause (fix: chmod 1777 {pause_folder})")
    check.machine = facts.get("machine-id") or None
    check.hostname = facts.get("hostname")
    try:
        claim = json.loads(facts["claim"]) if int(facts.get("claim-age", CLAIM_STALE + 1)) <= CLAIM_STALE else {}
    except (KeyError, ValueError):
        claim = {}
    if isinstance(claim, dict) and claim.get("machine_id") and check.machine \
            and claim["machine_id"] != check.machine:
        check.problems.append(shared_workdir_message(workdir, claim.get("hostname")))
    if "free-kib" in facts:
        check.free = int(facts["free-kib"]) * 1024
        if check.free < min_free:
            check.problems.append(f"only {human_bytes(check.free)} free under {workdir} "
                                  f"(below {human_bytes(min_free)})")


async def check_node(spec: NodeSpec, min_free: int, timeout: float) -> NodeCheck:
    """Log in to one node the way the head does and look at what it will need."""
    import asyncio
    check = NodeCheck(spec.name)
    transport = LocalTransport(spec) if spec.is_local else SshTransport(spec, connect_timeout=timeout)
    workdir = check_node_workdir(spec)
    pause_folder = spec.pause_dir or DEFAULT_PAUSE_DIR
    try:
        await asyncio.wait_for(transport.connect(), timeout + 5)
        code, out, err = await asyncio.wait_for(
            transport.run(["sh", "-c", NODE_CHECK_SCRIPT, "sh", spec.python, workdir, pause_folder]), timeout + 30)
    except Exception as exc:                  # every way a login fails is a finding, not a crash
        check.problems.append(connection_problem(transport, exc, timeout))
        return check
    finally:
        await transport.close()
    facts = dict(line.split("=", 1) for line in out.decode("utf-8", "replace").splitlines() if "=" in line)
    if "user" not in facts:
        text = (err or out).decode("utf-8", "replace").strip().splitlines()
        check.problems.append(f"the check did not run there (exit {code}): {text[-1] if text else 'no output'}")
        return check
    judge_node_facts(check, facts, spec, workdir, pause_folder, min_free)
    return check


def check_nodes(nodes_file: str, min_free: str, timeout: float = 15.0) -> List[NodeCheck]:
    """Check every node of the nodes file at once; results in the file's order."""
    import asyncio
    nodes = load_nodes_file(nodes_file)
    limit = parse_size(min_free)

    async def all_nodes() -> List[NodeCheck]:
        return list(await asyncio.gather(*(check_node(spec, limit, timeout) for spec in nodes)))
    checks = asyncio.run(all_nodes())
    flag_machines_listed_twice(checks, nodes)
    return checks


def flag_machines_listed_twice(checks: List[NodeCheck], nodes: List[NodeSpec]) -> None:
    """Entries reaching one machine (other than `host: local` ones): the first one listed is
    kept, the later ones are problems, as the head decides (said once their own problems,
    which an admin fixes first, are gone)."""
    first: Dict[str, str] = {}
    for check, spec in zip(checks, nodes):
        if not check.machine or spec.is_local:
            continue
        if check.machine in first and check.ok:
            check.problems.append(f"reaches the same machine as {first[check.machine]} ({check.hostname}): "
                                  "list each machine once in the nodes file")
        first.setdefault(check.machine, check.name)


def print_node_checks(nodes_file: Optional[str], min_free: str) -> None:
    """`nodes --check`: one line per node; exit 1 when any node lacks something."""
    path = nodes_file or NODES_FILE
    if not os.path.exists(path):
        raise UserError(f"no nodes file {path}: give --nodes FILE")
    note = original_ports_note(load_nodes_file(path))
    if note:
        click.echo(note)
    checks = check_nodes(path, min_free)
    for check in checks:
        click.echo(check.line())
    bad = [c.name for c in checks if not c.ok]
    if bad:
        raise Failed(f"{len(bad)} of {len(checks)} nodes need attention: {', '.join(bad)}")


# --- `config` and `completion`: the client's defaults ------------------------

CONFIG_KEYS = ("head", "socket")
# Commands that never talk to a head: a broken config file must not stop them
# (above all `config`, which repairs it).
COMMANDS_WITHOUT_HEAD = ("config", "completion", "install", "node", "pause", "resume", "serve", "service", "run",
                         "template", "check", "slurm", "demo")


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "distribute" / "config.yaml"


def read_client_config() -> Dict[str, str]:
    """The stored defaults ({} when there is no config file)."""
    import yaml
    path = config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise UserError(f"{path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        if yaml_tab_problem(text, mark):
            raise UserError(f"{path}:{yaml_tab_problem(text, mark)}") from None
        raise UserError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc}); "
                        "rewrite it with `distribute config --head ...`") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a mapping of {', '.join(CONFIG_KEYS)}")
    for key, value in data.items():
        if key not in CONFIG_KEYS:
            raise UserError(f"{path}: unknown key {key!r} (known: {', '.join(CONFIG_KEYS)})")
        if not isinstance(value, str):
            raise UserError(f"{path}: {key}: must be a string")
    return data


def check_head_value(head: str) -> str:
    if head != "local":
        parse_head(head)
    return head


def write_client_config(values: Dict[str, str]) -> Path:
    import yaml
    path = config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# distribute's defaults for this user; `distribute config --help` says how to change them\n"
    text += yaml.safe_dump({k: values[k] for k in CONFIG_KEYS if values.get(k)}, default_flow_style=False)
    write_atomically(path, lambda tmp: tmp.write_text(text))
    return path


def resolve_head(head: Optional[str], socket_path: Optional[str],
                 command: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """--head (or $DISTRIBUTE_HEAD), else the config file's head, else None (the local head).
    The config's socket goes with the config's head only."""
    if head is not None or command in COMMANDS_WITHOUT_HEAD:
        return head, socket_path
    stored = read_client_config()
    if "head" not in stored:
        return head, socket_path
    return stored["head"], socket_path or stored.get("socket")


def head_origin(head: Optional[str], given: Optional[str], from_environment: bool) -> Optional[str]:
    """Where the head a command talks to came from, when the command line did not name it."""
    if given is None and head is not None:
        return f"the head {head} comes from {config_path()} (`distribute config --head` changes it)"
    if from_environment and head is not None:
        return f"the head {head} comes from $DISTRIBUTE_HEAD"
    return None


COMPLETION_SHELLS = ("bash", "zsh", "fish")


def completion_script(shell: str) -> str:
    """click's completion script for `distribute` (it calls `distribute` with _DISTRIBUTE_COMPLETE set)."""
    from click.shell_completion import get_completion_class
    completer = get_completion_class(shell)
    if completer is None:
        raise UserError(f"no completion for {shell!r}: use one of {', '.join(COMPLETION_SHELLS)}")
    return completer(cli, {}, "distribute", "_DISTRIBUTE_COMPLETE").source()


# --- `install`: a `distribute` command (and completion) on this machine ---------
# The pyz is copied to PREFIX/lib/distribute/ and PREFIX/bin/distribute runs it with
# the python3 that ran `install`; completion goes where the user's shell finds it by
# itself (zsh needs one fpath line, which is printed).  Running it again replaces the
# same files: a way to upgrade too.

WRAPPER = """#!/bin/sh
# Written by `distribute install`; run it again to upgrade.
exec {python} {program} "$@"
"""


def completion_target(shell: str, home: Path) -> Path:
    data = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    config = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return {"bash": data / "bash-completion" / "completions" / "distribute",
            "zsh": data / "zsh" / "site-functions" / "_distribute",
            "fish": config / "fish" / "completions" / "distribute.fish"}[shell]


def install_command(prefix: Path, shell: Optional[str]) -> List[str]:
    """Install the command and the completion; return what to tell the user."""
    prefix = prefix.expanduser().resolve()
    home = Path.home()
    shell = shell or os.path.basename(os.environ.get("SHELL", "")) or "bash"
    if shell not in COMPLETION_SHELLS:
        raise UserError(f"no completion for the shell {shell!r}: give --shell {'|'.join(COMPLETION_SHELLS)}")
    pyz = running_pyz()
    if pyz:
        program = prefix / "lib" / "distribute" / "distribute.pyz"
        if os.path.abspath(pyz) != str(program):
            program.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(program, lambda tmp: shutil.copyfile(pyz, tmp))
    else:
        program = Path(os.path.abspath(__file__))     # from a source tree: run it where it is
    command = prefix / "bin" / "distribute"
    command.parent.mkdir(parents=True, exist_ok=True)
    text = WRAPPER.format(python=shlex.quote(sys.executable), program=shlex.quote(str(program)))
    write_atomically(command, lambda tmp: (tmp.write_text(text), tmp.chmod(0o755)))
    completion = completion_target(shell, home)
    completion.parent.mkdir(parents=True, exist_ok=True)
    script = completion_script(shell)
    write_atomically(completion, lambda tmp: tmp.write_text(script))
    lines = [f"installed {command} (runs {program} with {sys.executable})",
             f"{shell} completion: {completion}"]
    if shell == "zsh":
        lines.append(f"zsh: put `fpath+=({completion.parent})` before `compinit` in ~/.zshrc once")
    on_path = [os.path.realpath(p) for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    if os.path.realpath(command.parent) not in on_path:
        rc = {"bash": "~/.bashrc", "zsh": "~/.zshrc", "fish": None}[shell]
        lines.append(f"{command.parent} is not on your PATH: "
                     + (f"fish_add_path {command.parent}" if rc is None else
                        f"echo 'export PATH=\"{command.parent}:$PATH\"' >> {rc}") + ", then open a new shell")
    else:
        lines.append("open a new shell, then: distribute --help")
    return lines


# --- `report`: what happened to a batch, as a timeline ------------------------
# The store keeps one span per job attempt, build and pause (table `spans`), so a
# report drawn after a head restart still shows every attempt.


def timeline_add(head: "Head", span: TimelineSpan) -> None:
    head.store.add_span(span)


def timeline_open_span(head: "Head", kind: str, node: str, batch_id: Optional[int] = None):
    return head.store.open_span(kind, node, batch_id)


def timeline_build_started(head: "Head", batch_id: int, node: str) -> None:
    timeline_add(head, TimelineSpan("build", node, time.time(), batch_id=batch_id))


def timeline_build_ended(head: "Head", batch_id: int, node: str, ok: bool) -> None:
    span = timeline_open_span(head, "build", node, batch_id)
    if span is not None:
        span.end, span.state = time.time(), "ok" if ok else "failed"
        head.store.update_span(span)


def timeline_attempt(head: "Head", batch_id: int, job: JobRow, node: str, run: Dict[str, Any],
                     state: str) -> None:
    """A finished attempt, with the node's own start and end times."""
    end = run.get("end") or time.time()
    timeline_add(head, TimelineSpan("job", node, run.get("start") or job.started or end, end,
                                    "ok" if state == "done" else state, batch_id, job.id, job.name,
                                    job.attempts, run.get("exit_code"), reason=run.get("reason")))


def pause_label(lock: Dict[str, Any]) -> str:
    """Who paused, for the timeline: a user, or 'the owner (owner busy: 73% CPU by bob)'."""
    return f"the owner ({lock['reason']})" if lock.get("reason") else str(lock.get("user"))


def timeline_pauses(head: "Head", node: str, locks: List[Dict[str, Any]]) -> None:
    """A node's pause locks changed: open a span when the first appears, close it with the last."""
    span = timeline_open_span(head, "pause", node)
    users = sorted({pause_label(lock) for lock in locks})
    if locks and span is None:
        since = [lock.get("since") for lock in locks if lock.get("since")]
        timeline_add(head, TimelineSpan("pause", node, min(since + [time.time()]), state="paused", users=users))
    elif locks and not set(users) <= set(span.users):
        span.users = sorted(set(span.users) | set(users))
        head.store.update_span(span)
    elif not locks and span is not None:
        span.end = time.time()
        head.store.update_span(span)


def batch_report(head: "Head", batch: BatchRow) -> Dict[str, Any]:
    """Every attempt, build and pause of a batch, times in seconds since the epoch."""
    recorded = head.store.batch_spans(batch.id)
    seen = {(s.job_id, s.attempt) for s in recorded if s.kind == "job"}
    jobs = [{"job": s.job, "node": s.node, "attempt": s.attempt, "start": s.start, "end": s.end,
             "state": s.state, "exit_code": s.exit_code, "reason": s.reason} for s in recorded if s.kind == "job"]
    for job in head.store.jobs(batch.id):
        if job.node is None or job.started is None or job.state == "queued" or (job.id, job.attempts) in seen:
            continue                              # never started, or already recorded above
        running = job.state == "running"
        jobs.append({"job": job.name, "node": job.node, "attempt": job.attempts, "start": job.started,
                     "end": None if running else job.ended, "state": "ok" if job.state == "done" else job.state,
                     "exit_code": job.exit_code, "reason": job.reason})
    builds = [{"node": s.node, "start": s.start, "end": s.end, "state": s.state} for s in recorded
              if s.kind == "build" and (s.end is not None or getattr(head.store.build(batch.id, s.node), "state", None) == "running")]
    used = {j["node"] for j in jobs} | {b["node"] for b in builds}
    ends = [t for t in [batch.finished] + [j["end"] for j in jobs] if t]
    first = min([batch.created] + [j["start"] for j in jobs] + [b["start"] for b in builds])
    last = max(ends) if batch.state != "active" and ends else time.time()
    pauses = [{"node": s.node, "start": s.start, "end": s.end, "users": s.users}
              for s in head.store.pause_spans(sorted(used), first, last)]
    recorded_pauses = {p["node"] for p in pauses if p["end"] is None}
    for name in sorted(used - recorded_pauses):
        link = head.links.get(name)
        if link is not None and link.paused:      # paused since before this head saw it
            since = [l.get("since") for l in link.paused if l.get("since")]
            pauses.append({"node": name, "start": min(since + [time.time()]), "end": None,
                           "users": sorted({pause_label(l) for l in link.paused})})
    jobs.sort(key=lambda j: (j["start"], j["job"]))
    return {"ok": True, "batch": batch.key, "owner": batch.owner, "state": batch.state,
            "created": batch.created, "finished": batch.finished, "now": time.time(),
            "nodes": [n for n in head.links if n in used], "jobs": jobs, "builds": builds, "pauses": pauses,
            "counts": dict(head.batch_counts(batch.id))}


# The picture: standalone SVG built with ElementTree (which escapes every text and attribute).

SVG_NS = "http://www.w3.org/2000/svg"
OUTCOME_COLOURS = {"ok": "#2e7d32", "failed": "#c62828", "killed": "#ef6c00", "running": "#1565c0"}
BUILD_COLOUR = "#6a1b9a"
SVG_WIDTH = 1200
SVG_LEFT = 150                   # node names
SVG_RIGHT = 30
SVG_TOP = 64                     # title and time axis
LANE_HEIGHT = 18
ROW_PADDING = 6


def nice_step(span: float, ticks: int = 8) -> float:
    """A round tick distance (seconds) giving about `ticks` ticks over `span`."""
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400):
        if span / step <= ticks:
            return float(step)
    return 86400.0 * max(1, int(span / 86400 / ticks) + 1)


def assign_lanes(spans: List[Dict[str, Any]], now: float) -> int:
    """Give each span of one node a lane so none overlap (several slots run at once); returns the lane count."""
    lane_ends: List[float] = []
    for span in sorted(spans, key=lambda s: s["start"]):
        end = span["end"] or now
        for lane, lane_end in enumerate(lane_ends):
            if lane_end <= span["start"]:
                span["lane"], lane_ends[lane] = lane, end
                break
        else:
            span["lane"] = len(lane_ends)
            lane_ends.append(end)
    return max(1, len(lane_ends))


def _svg(parent, tag: str, text: Optional[str] = None, **attrs: Any):
    """A child element; attribute names in Python spelling (font_size, class_) become SVG's."""
    import xml.etree.ElementTree as ET
    element = ET.SubElement(parent, tag, {k.rstrip("_").replace("_", "-"): str(v) for k, v in attrs.items()})
    if text is not None:
        element.text = text
    return element


def clock(timestamp: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(timestamp))


def span_title(span: Dict[str, Any], kind: str, now: float) -> str:
    end = span["end"] or now
    took = format_duration(end - span["start"])
    when = f"{clock(span['start'])}–{clock(end) if span['end'] else 'now'}"
    if kind == "job":
        code = f", exit code {span['exit_code']}" if span.get("exit_code") is not None else ""
        code += f" ({span['reason']})" if span.get("reason") else ""
        return f"{span['job']} (attempt {span['attempt']}) on {span['node']}: {span['state']}{code}, {took}, {when}"
    if kind == "build":
        return f"build on {span['node']}: {span['state']}, {took}, {when}"
    return f"paused by {', '.join(span['users']) or 'someone'} on {span['node']}: {took}, {when}"


def svg_defs(root) -> None:
    defs = _svg(root, "defs")
    hatch = _svg(defs, "pattern", id="pause-hatch", width=8, height=8, patternUnits="userSpaceOnUse",
                 patternTransform="rotate(45)")
    _svg(hatch, "rect", width=8, height=8, fill="#9e9e9e", fill_opacity="0.25")
    _svg(hatch, "line", x1=0, y1=0, x2=0, y2=8, stroke="#424242", stroke_width=3, stroke_opacity="0.6")
    stripes = _svg(defs, "pattern", id="build-stripes", width=6, height=6, patternUnits="userSpaceOnUse",
                   patternTransform="rotate(-45)")
    _svg(stripes, "rect", width=6, height=6, fill=BUILD_COLOUR)
    _svg(stripes, "line", x1=0, y1=0, x2=0, y2=6, stroke="#ce93d8", stroke_width=2)


def timeline_svg(report: Dict[str, Any]) -> str:
    """The batch as a standalone SVG: one row per node, one bar per attempt, builds striped,
    pauses hatched; every bar's <title> is its tooltip."""
    import xml.etree.ElementTree as ET
    now = report["now"]
    jobs, builds, pauses = report["jobs"], report["builds"], report["pauses"]
    nodes = list(report["nodes"]) or ["(no node)"]
    start = min([report["created"]] + [s["start"] for s in jobs + builds])
    end = max([start + 1] + [s["end"] or now for s in jobs + builds]
              + ([report["finished"]] if report.get("finished") else []))
    scale = (SVG_WIDTH - SVG_LEFT - SVG_RIGHT) / (end - start)

    def x_of(t: float) -> float:
        return round(SVG_LEFT + (min(max(t, start), end) - start) * scale, 2)

    lanes = {n: assign_lanes([s for s in jobs + builds if s["node"] == n], now) for n in nodes}
    rows_height = sum(lanes[n] * LANE_HEIGHT + 2 * ROW_PADDING for n in nodes)
    height = SVG_TOP + rows_height + 60
    root = ET.Element("svg", {"xmlns": SVG_NS, "width": str(SVG_WIDTH), "height": str(height),
                              "viewBox": f"0 0 {SVG_WIDTH} {height}", "font-family": "sans-serif",
                              "font-size": "12"})
    _svg(root, "title", f"distribute: timeline of {report['batch']}")
    svg_defs(root)
    _svg(root, "rect", width=SVG_WIDTH, height=height, fill="#ffffff")
    counts = report.get("counts", {})
    summary = ", ".join(f"{counts[s]} {'ok' if s == 'done' else s}" for s in JOB_STATES if counts.get(s))
    _svg(root, "text", f"{report['batch']} ({report['owner']}): {summary or 'no jobs'}; "
                       f"{len(jobs)} attempts on {len(report['nodes'])} nodes, {format_duration(end - start)}, "
                       f"from {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(start))}",
         x=10, y=22, font_size=15, font_weight="bold")
    axis = _svg(root, "g", class_="axis")
    step = nice_step(end - start)
    tick = 0.0
    while tick <= end - start + 1e-9:
        x = x_of(start + tick)
        _svg(axis, "line", x1=x, y1=SVG_TOP - 8, x2=x, y2=SVG_TOP + rows_height, stroke="#e0e0e0")
        _svg(axis, "text", "+" + format_duration(tick), x=x, y=SVG_TOP - 12, text_anchor="middle",
             fill="#616161", font_size=11)
        tick += step
    y = SVG_TOP
    for index, name in enumerate(nodes):
        y += svg_row(root, name, index, y, lanes[name], x_of, now,
                     [s for s in jobs if s["node"] == name], [s for s in builds if s["node"] == name],
                     [s for s in pauses if s["node"] == name])
    svg_legend(root, y + 30)
    ET.indent(root)  # novermin  (clients run 3.10+)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def svg_row(root, name: str, index: int, y: float, lanes: int, x_of, now: float, jobs, builds, pauses) -> float:
    """One node's row: background, name, build bars, attempt bars, pause hatching; returns its height."""
    row_height = lanes * LANE_HEIGHT + 2 * ROW_PADDING
    row = _svg(root, "g", class_="row", data_node=name)
    _svg(row, "rect", class_="row-background", x=0, y=y, width=SVG_WIDTH, height=row_height,
         fill="#9e9e9e", fill_opacity="0.08" if index % 2 else "0.2")   # the time grid shows through
    _svg(row, "text", name, x=10, y=y + row_height / 2 + 4, font_weight="bold")
    for span in builds:
        bar = _svg(row, "rect", class_="build", data_state=span["state"], x=x_of(span["start"]),
                   y=y + ROW_PADDING + span["lane"] * LANE_HEIGHT + 1,
                   width=max(3.0, round(x_of(span["end"] or now) - x_of(span["start"]), 2)),
                   height=LANE_HEIGHT - 2, fill="url(#build-stripes)",
                   stroke=OUTCOME_COLOURS["failed"] if span["state"] == "failed" else BUILD_COLOUR)
        _svg(bar, "title", span_title(span, "build", now))
    for span in jobs:
        left, right = x_of(span["start"]), x_of(span["end"] or now)
        top = y + ROW_PADDING + span["lane"] * LANE_HEIGHT + 1
        bar = _svg(row, "rect", class_="attempt", data_state=span["state"], data_job=span["job"],
                   x=left, y=top, width=max(2.0, round(right - left - 1, 2)), height=LANE_HEIGHT - 2,
                   rx=2, fill=OUTCOME_COLOURS.get(span["state"], "#757575"))
        _svg(bar, "title", span_title(span, "job", now))
        if right - left > 7 * len(span["job"]) + 6:
            _svg(row, "text", span["job"], x=left + 4, y=top + LANE_HEIGHT - 6, fill="#ffffff",
                 font_size=11, pointer_events="none")
    for span in pauses:
        bar = _svg(row, "rect", class_="pause", x=x_of(span["start"]), y=y + 1,
                   width=max(3.0, round(x_of(span["end"] or now) - x_of(span["start"]), 2)),
                   height=row_height - 2, fill="url(#pause-hatch)", stroke="#424242", stroke_dasharray="4 2")
        _svg(bar, "title", span_title(span, "pause", now))
    return row_height


def svg_legend(root, y: float) -> None:
    legend = _svg(root, "g", class_="legend")
    x = 10
    entries = list(OUTCOME_COLOURS.items()) + [("build", "url(#build-stripes)"), ("paused", "url(#pause-hatch)")]
    for label, fill in entries:
        _svg(legend, "rect", x=x, y=y - 11, width=24, height=14, fill=fill, stroke="#424242", stroke_width="0.5")
        _svg(legend, "text", label, x=x + 30, y=y)
        x += 110


# ---------------------------------------------------------------------------
# 16. The command line
#
# Thin: each command parses its options, calls the sections above, and prints.
# ---------------------------------------------------------------------------

# Starting points written by `distribute template`: each is accepted by
# `distribute check` as written, together with the small scripts it names.

TEMPLATES: Dict[str, Dict[str, str]] = {
    "python": {
        JOBS_FILE: """\
# A python batch: build.py runs once per machine, then job files run one by one.
meta:
  batch_name: my_first_batch      # unique within your namespace
  namespace: my_name              # your login (`template` writes it): namespaces belong to people
  capabilities: [python3]         # every one must be offered by a node
  matrix: ~                       # or "@you:example.org" for a message when done
python:
  initialize:
    build_file: build.py          # runs as `python3 build.py` in the build directory
    required_files:               # copied into input/ before every job
      - path: shared_input.txt
  jobs:
    - name: job_1
      file: run.py                # runs as `python3 job.py`
      required_files:
        - {path: params_1.txt, alias: params.txt}
    - name: job_2
      file: run.py
      required_files:
        - {path: params_2.txt, alias: params.txt}
      retries: 1                  # run again once if it exits non-zero
""",
        "build.py": "# Runs once per machine and batch: compile or download what the jobs need.\nprint('build done')\n",
        "run.py": """\
# Runs once per job with the build directory as working directory.
import os
params = open("input/params.txt").read().strip()
with open("distribute_save/result.txt", "w") as out:   # everything here is archived
    out.write(f"{os.environ['DISTRIBUTE_JOB']}: {params}\\n")
with open(os.environ["DISTRIBUTE_PROGRESS"], "a") as progress:
    progress.write("100\\n")
""",
        "shared_input.txt": "shared by every job\n",
        "params_1.txt": "1\n",
        "params_2.txt": "2\n",
    },
    "shell": {
        JOBS_FILE: """\
# A shell batch: one command per job, run by /bin/sh in the build directory.
meta:
  batch_name: my_shell_batch
  namespace: my_name
  capabilities: []
shell:
  initialize:
    build: "echo building; mkdir -p bin"   # optional, runs once per machine
    required_files:
      - path: shared_input.txt
  jobs:
    - name: count_words
      command: "wc -w input/shared_input.txt > distribute_save/words.txt"
    - name: greet
      command: "echo hello from $DISTRIBUTE_JOB > distribute_save/hello.txt"
""",
        "shared_input.txt": "shared by every job\n",
    },
    "apptainer": {
        JOBS_FILE: """\
# An apptainer batch: every job runs
#   apptainer run --app distribute --bind <save>:/distribute_save:rw,<input>:/input:rw <sif> <cpus>
# Replace solver.sif (an empty placeholder) with your image, built with an %apprun distribute section.
meta:
  batch_name: my_container_batch
  namespace: my_name
  capabilities: [apptainer]
apptainer:
  initialize:
    sif: solver.sif
    required_files:
      - path: shared_input.txt
    required_mounts: []           # e.g. [/scratch]: a fresh host folder bound there per job
  jobs:
    - name: job_1
      required_files:
        - {path: params_1.txt, alias: params.txt}
    - name: job_2
      required_files:
        - {path: params_2.txt, alias: params.txt}
""",
        "solver.sif": "",
        "shared_input.txt": "shared by every job\n",
        "params_1.txt": "1\n",
        "params_2.txt": "2\n",
    },
}
for _engine in CONTAINER_ENGINES:
    TEMPLATES[_engine] = {
        JOBS_FILE: f"""\
# A {_engine} batch: every job runs, as the node's account, with the container removed afterwards:
#   {_engine} run --rm --init --user UID:GID --volume <save>:/distribute_save:rw --volume <input>:/input:rw IMAGE <cpus>
# The image's entrypoint gets <cpus> as its argument; what it writes to /distribute_save is archived.
meta:
  batch_name: my_{_engine}_batch
  namespace: my_name
  capabilities: [{_engine}]       # nodes where `{_engine} version` works
{_engine}:
  initialize:
    image: docker.io/your_name/solver:latest   # a registry reference, or an archive: solver.tar (`{_engine} save`)
    required_files:
      - path: shared_input.txt
    required_mounts: []           # e.g. [/scratch]: a fresh host folder bound there per job
  jobs:
    - name: job_1
      required_files:
        - {{path: params_1.txt, alias: params.txt}}
    - name: job_2
      required_files:
        - {{path: params_2.txt, alias: params.txt}}
""",
        "shared_input.txt": "shared by every job\n",
        "params_1.txt": "1\n",
        "params_2.txt": "2\n",
    }


def write_template(flavour: str, output: str) -> List[Path]:
    """Write a template job file and the scripts it names; never overwrite a file."""
    files = TEMPLATES[flavour]
    target = Path(output)
    # `-o DIR` (existing or not): the job file goes inside; only a *.yaml/*.yml name is a file name
    if target.is_dir() or output.endswith(("/", os.sep)) or target.suffix.lower() not in (".yaml", ".yml"):
        target = target / JOBS_FILE
    folder = target.parent
    planned = {target: files[JOBS_FILE]}
    planned.update({folder / name: text for name, text in files.items() if name != JOBS_FILE})
    clashes = [str(p) for p in planned if p.exists()]
    if clashes:
        raise UserError(f"{clashes[0]} already exists; choose another place with -o")
    login = current_user()
    if name_problem(login) is None:         # the namespace is yours: your login, unless it is no valid name
        planned[target] = re.sub(r"namespace: my_name( *)", lambda m: "namespace: " + login.ljust(
            len("my_name") + len(m.group(1)) if m.group(1) else 0), planned[target])
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in planned.items():
        path.write_text(text)
    return list(planned)


def find_job_file(path: Optional[str]) -> str:
    if path:
        return path
    if os.path.exists(JOBS_FILE):
        return JOBS_FILE
    raise UserError(f"no job file given and no {JOBS_FILE} in {os.getcwd()}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="distribute")
@click.option("--head", envvar="DISTRIBUTE_HEAD", default=None, metavar="[USER@]HOST[:PORT]|local",
              help="The head to talk to (default: $DISTRIBUTE_HEAD, else `distribute config`'s, "
                   "else the head on this machine).")
@click.option("--socket", "socket_path", envvar="DISTRIBUTE_SOCKET", default=None, metavar="PATH",
              help="The head's API socket on the head machine.")
@click.pass_context
def cli(ctx: click.Context, head: Optional[str], socket_path: Optional[str]) -> None:
    """Run batches of simulations on your lab's workstations, over SSH."""
    given = head
    head, socket_path = resolve_head(head, socket_path, ctx.invoked_subcommand)   # else the config file
    ctx.obj = {"head": head, "socket": socket_path, "origin": head_origin(
        head, given, ctx.get_parameter_source("head") == click.core.ParameterSource.ENVIRONMENT)}


@cli.command()
@click.argument("flavour", type=click.Choice(FLAVOURS))
@click.option("-o", "--output", default=JOBS_FILE, show_default=True,
              help="Where to write the job file (its scripts go beside it).")
def template(flavour: str, output: str) -> None:
    """Write a commented starting job file (and the small files it names)."""
    for path in write_template(flavour, output):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("file", required=False)
def check(file: Optional[str]) -> None:
    """Validate a job file and list its jobs and files."""
    batch = load_job_file(find_job_file(file))
    count, size = describe_batch(batch)
    meta = batch.meta
    click.echo(f"{batch.path}: {meta.namespace}/{meta.batch_name}, {batch.flavour} batch, "
               f"{len(batch.jobs)} job{'s' if len(batch.jobs) != 1 else ''}")
    click.echo(f"  capabilities: {', '.join(meta.capabilities) or '(none)'}")
    for job in batch.jobs[:50]:
        names = [f.alias for f in job.required_files]
        click.echo(f"  {job.name}" + (f"  [{', '.join(names)}]" if names else ""))
    if len(batch.jobs) > 50:
        click.echo(f"  ... and {len(batch.jobs) - 50} more")
    click.echo(f"  {count} file{'s' if count != 1 else ''} to upload, {human_bytes(size)} in total")


@cli.command()
@click.argument("file", required=False)
@click.option("--save-dir", default="distribute-results", show_default=True,
              help="Where results land: <save-dir>/<namespace>/<batch>/<job>/.")
@click.option("--clean-save", is_flag=True, help="Delete this batch's earlier results first.")
def run(file: Optional[str], save_dir: str, clean_save: bool) -> None:
    """Run a whole batch on this machine, without a head."""
    batch = load_job_file(find_job_file(file))
    outcomes = run_batch_locally(batch, Path(save_dir), clean_save, click.echo)
    failed = [o.name for o in outcomes if not o.ok]
    where = batch_archive(Path(save_dir), batch.meta.namespace, batch.meta.batch_name)
    click.echo(f"{len(outcomes) - len(failed)} ok, {len(failed)} failed; results in {where}")
    if failed:
        raise Failed(f"{len(failed)} job{'s' if len(failed) != 1 else ''} failed: {', '.join(failed[:10])}")


# `distribute slurm`: the command around write_slurm_folder (section "Slurm transpiler").

@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="[FILE] OUTDIR")
@click.option("--cluster-user", default=None, metavar="USER", help="Your user name on the cluster.")
@click.option("--cluster-host", default=None, metavar="HOST",
              help="The cluster's login node (default: the folder already is on the cluster).")
@click.option("--cluster-dir", default=None, metavar="DIR",
              help="Where the folder goes on the cluster [default: distribute-slurm/<namespace>/<batch>].")
@click.option("--max-array-size", default=DEFAULT_MAX_ARRAY_SIZE, show_default=True, type=int,
              help="The cluster's MaxArraySize: bigger batches are split into several arrays.")
@click.option("--throttle", default=None, type=int, metavar="N",
              help="Run at most N tasks of each array at once (sbatch --array=...%N).")
@click.option("--save-dir", default="distribute-results", show_default=True,
              help="Where fetch.sh puts results: <save-dir>/<namespace>/<batch>/<job>/.")
def slurm(paths: Tuple[str, ...], cluster_user: Optional[str], cluster_host: Optional[str],
          cluster_dir: Optional[str], max_array_size: int, throttle: Optional[int], save_dir: str) -> None:
    """Write OUTDIR: a batch as sbatch job arrays, with submit/upload/fetch scripts."""
    if len(paths) > 2:
        raise UserError(f"slurm takes [FILE] OUTDIR, got {len(paths)} arguments")
    file, outdir = (None, paths[0]) if len(paths) == 1 else paths
    batch = load_job_file(find_job_file(file))
    target = cluster_target(batch, Path(outdir), cluster_user, cluster_host, cluster_dir)
    arrays = write_slurm_folder(batch, Path(outdir), target, max_array_size, throttle, save_dir)
    tasks = sum(len(a.jobs) for a in arrays)
    click.echo(f"wrote {outdir}: {batch.meta.namespace}/{batch.meta.batch_name}, {tasks} job"
               f"{'s' if tasks != 1 else ''} in {len(arrays)} job array{'s' if len(arrays) != 1 else ''}")
    if slurm_after_note(batch):
        click.echo(f"  note: {slurm_after_note(batch)}")
    for line in slurm_instructions(Path(outdir).resolve(), target):
        click.echo(f"  {line}")

@cli.command()
@click.option("--nodes", "nodes_file", default=None, metavar="FILE",
              help="distribute-nodes.yaml (default: this machine is the one node).")
@click.option("--archive", default=None, metavar="DIR", help="Where results are kept (default: STATE/archive).")
@click.option("--state", default=None, metavar="DIR", help="Queue database and socket (default: /var/lib/"
              "distribute if writable, else ~/.local/state/distribute).")
@click.option("--pyz", default=None, metavar="FILE", help="The distribute.pyz to copy to nodes.")
@click.option("--node-timeout", default=120.0, show_default=True, help="Seconds before a silent node's jobs move.")
@click.option("--kill-grace", default=10.0, show_default=True, help="Seconds between SIGTERM and SIGKILL.")
@click.option("--supervisor-idle", default=600.0, show_default=True,
              help="Seconds an idle node supervisor waits for a head before it exits.")
@click.option("--matrix-config", default=None, metavar="FILE", help="Matrix homeserver and token (YAML).")
@click.option("--group", default=None, metavar="GROUP",
              help="Unix group whose members may use the head (the socket is mode 0660).")
@click.option("--shared-namespace", "shared", multiple=True, metavar="NAMESPACE",
              help="A namespace everyone may add batches to (repeatable); others belong to whoever started "
                   "their first batch.")
def serve(nodes_file, archive, state, pyz, node_timeout, kill_grace, supervisor_idle, matrix_config,
          group, shared) -> None:
    """Run the head daemon."""
    import asyncio
    state_dir = (Path(state) if state else default_state_dir()).resolve()
    nodes = load_nodes_file(nodes_file) if nodes_file else [NodeSpec("local", "local")]
    if original_ports_note(nodes):
        log(original_ports_note(nodes))
    config = HeadConfig(state=state_dir, archive=Path(archive).resolve() if archive else state_dir / "archive",
                        nodes=nodes, pyz=Path(pyz) if pyz else None, node_timeout=node_timeout,
                        kill_grace=kill_grace, supervisor_idle=supervisor_idle,
                        matrix_config=Path(matrix_config) if matrix_config else None, group=group,
                        shared_namespaces=list(shared))
    if group:
        import grp
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise UserError(f"--group {group}: no such group") from None
        if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
            raise UserError(f"--group {group}: {current_user()} is not a member of it, so the head cannot give "
                            f"it the socket; add the account to the group (then log in again) or drop --group")
    if config.pyz and not config.pyz.is_file():
        raise UserError(f"--pyz {pyz}: no such file")
    matrix = matrix_notifier(config)            # a bad --matrix-config exits 2 before serving
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = hold_head_lock(state_dir, config.socket_path)     # held until this process ends
    head = Head(config)
    head.matrix = matrix
    try:
        asyncio.run(head.serve())
    except KeyboardInterrupt:
        log("head: stopped")
    finally:
        os.close(lock)


@cli.command()
@click.argument("file", required=False)
@click.option("--dry", is_flag=True, help="Check and show which nodes could run it; send nothing.")
@click.option("--show-caps", is_flag=True, help="List every node's capabilities.")
@click.option("--resume", is_flag=True, help="Re-add an existing batch, skipping jobs that succeeded.")
@click.option("--replace", is_flag=True, help="Replace an existing batch (its archive is deleted).")
@click.pass_obj
def add(obj, file, dry, show_caps, resume, replace) -> None:
    """Submit a batch to the head (uploads its files)."""
    if resume and replace:
        raise UserError("--resume and --replace exclude each other")
    batch = load_job_file(find_job_file(file))
    flags = {"dry": dry, "show_caps": show_caps, "resume": resume, "replace": replace}
    reply = run_client(obj, lambda client: client.call_with_files(add_request(batch, **flags), batch_upload(batch)))
    if show_caps:
        for node in reply["nodes"]:
            click.echo(f"{node['name']:<12} {node['state']:<10} {', '.join(node['capabilities']) or '-'}")
        return
    if dry:
        count, size = describe_batch(batch)
        click.echo(f"{batch.meta.namespace}/{batch.meta.batch_name}: {len(batch.jobs)} jobs, {count} files, "
                   f"{human_bytes(size)}; could run on: {where_it_runs(reply) or 'no node'}")
        return
    skipped = f" ({reply['skipped']} already done)" if reply.get("skipped") else ""
    click.echo(f"added {reply['batch']}: {reply['jobs']} jobs queued{skipped}; can run on {where_it_runs(reply)}")


def where_it_runs(reply: Dict[str, Any]) -> str:
    """`add`'s answer in words: capable nodes, and those the head has not reached yet."""
    parts = [", ".join(reply.get("capable") or [])] if reply.get("capable") else []
    if reply.get("maybe"):
        parts.append(f"{', '.join(reply['maybe'])} if its probe finds what the batch needs")
    if reply.get("not_connected"):
        parts.append(f"(not connected yet: {', '.join(reply['not_connected'])}; "
                     "judged by what it offered when last up)")
    return " ".join(parts)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (documented in the README).")
@click.option("--watch", is_flag=True, help="Refresh every 2 seconds until interrupted.")
@click.option("--all", "everyone", is_flag=True, help="Everyone's batches, ended ones too (default: your active ones).")
@click.pass_obj
def status(obj, as_json, watch, everyone) -> None:
    """Show your active batches: done, running, queued and failed jobs, where, progress."""
    while True:
        reply, _ = client_call(obj, {"op": "status", "all": everyone})
        if as_json:
            click.echo(readable_json({key: reply.get(key, []) for key in
                                      ("batches", "running", "stopped", "paused_nodes")}))
        else:
            if watch:
                click.clear()
            lines = format_status(reply)
            if not reply["batches"] and reply.get("hidden"):
                lines = [f"no active batches of yours; status --all shows everyone's and ended ones "
                         f"({reply['hidden']})"]
            click.echo("\n".join(lines))
        if not watch:
            return
        time.sleep(2)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--check", is_flag=True, help="On the head machine, no head needed: log in to every node of "
              "the nodes file and tell what each lacks.")
@click.option("--nodes", "nodes_file", default=None, metavar="FILE", help=f"With --check [default: {NODES_FILE}].")
@click.option("--min-free", default=DEFAULT_MIN_FREE, show_default=True, metavar="SIZE",
              help="With --check: free disk a node's workdir needs.")
@click.pass_obj
def nodes(obj, as_json, check, nodes_file, min_free) -> None:
    """Show each node: reachable, version, capabilities, running jobs, paused until."""
    if check:
        return print_node_checks(nodes_file, min_free)
    reply, _ = client_call(obj, {"op": "nodes"})
    if as_json:
        click.echo(readable_json({"nodes": reply["nodes"]}))
    else:
        click.echo("\n".join(format_nodes(reply["nodes"])))


@cli.command()
@click.argument("batch")
@click.pass_obj
def kill(obj, batch) -> None:
    """Drop a batch's queued jobs and stop its running ones."""
    reply, _ = client_call(obj, {"op": "kill", "batch": batch})
    click.echo(f"killed {reply['batch']}: {reply['dropped']} queued jobs dropped, {reply['stopped']} stopped")


@cli.command()
@click.argument("batch")
@click.option("--failed", "failed_only", is_flag=True, default=True,
              help="Queue failed jobs again (the default); killed ones stay killed.")
@click.option("--all", "everything", is_flag=True, help="Also queue killed jobs again.")
@click.pass_obj
def retry(obj, batch, failed_only, everything) -> None:
    """Queue a batch's failed jobs again."""
    reply, _ = client_call(obj, {"op": "retry", "batch": batch, "failed_only": failed_only and not everything})
    click.echo(f"{reply['batch']}: {reply['requeued']} jobs queued again")


@cli.command()
@click.argument("ref", metavar="BATCH[/JOB]")
@click.pass_obj
def why(obj, ref) -> None:
    """For each node, say why a waiting job does not run there."""
    reply, _ = client_call(obj, {"op": "why", "ref": ref})
    target = f"{reply['batch']}/{reply['job']}" if reply.get("job") else reply["batch"]
    click.echo(f"{target}: {reply['state']}" + (f" on {reply['node']}" if reply.get("node") else ""))
    if reply.get("reason"):
        click.echo(f"  {reply['reason']}")
    for node, reason in reply["reasons"].items():
        click.echo(f"  {node}: {reason}")


@cli.command()
@click.argument("ref", metavar="BATCH/JOB")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the job runs.")
@click.pass_obj
def logs(obj, ref, follow) -> None:
    """Print a job's output (stdout and stderr), live while it runs."""
    batch, job = split_job_ref(ref)
    offset = 0
    while True:
        reply, data = client_call(obj, {"op": "logs", "batch": batch, "job": job, "offset": offset})
        if data:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        offset = reply["offset"]
        name = reply.get("job") or ref
        if reply["state"] == "queued" and not follow:
            click.echo(f"{name} is queued: no output yet")
            return
        if reply["state"] in ("running", "queued") and follow:
            if not data:
                time.sleep(0.5)
            continue
        if follow and reply["state"] in ("done", "failed", "killed"):
            click.echo(logs_outcome(name, reply), err=True)
            if reply["state"] != "done":
                raise SystemExit(EXIT_FAILED)
        return


def logs_outcome(name: str, reply: Dict[str, Any]) -> str:
    """The last line of `logs -f`: how the job ended."""
    if reply["state"] == "done":
        return f"{name} finished (exit code 0)"
    if reply["state"] == "failed" and reply.get("exit_code") is not None:
        return f"{name} failed (exit code {reply['exit_code']})"
    return f"{name} {reply['state']}" + (f": {reply['reason']}" if reply.get("reason") else "")


@cli.command()
@click.argument("file", required=False)
@click.option("--batch", "batch_ref", metavar="NAMESPACE/BATCH", help="Instead of a job file's meta.")
@click.option("--filter", "filters", multiple=True, metavar="RE", help="Keep only paths matching (repeatable).")
@click.option("--exclude", "excludes", multiple=True, metavar="RE", help="Then drop paths matching (repeatable).")
@click.option("--where", default=None, metavar="EXPR", help="Keep jobs whose parameters match, e.g. 're>=1000 and nx==128'.")
@click.option("--dry", is_flag=True, help="List what would come, with sizes; write nothing.")
@click.option("--save-dir", default=".", show_default=True, help="Files land in SAVE_DIR/<namespace>/<batch>/.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
@click.pass_obj
def pull(obj, file, batch_ref, filters, excludes, where, dry, save_dir, as_json) -> None:
    """Fetch archived results, only what is missing or changed."""
    import asyncio
    selection = PullSelection(list(filters), list(excludes), where)
    selection.compile()
    if not batch_ref:
        meta = load_job_file(find_job_file(file)).meta
        batch_ref = f"{meta.namespace}/{meta.batch_name}"

    async def go():
        client = head_client(obj)
        try:
            return await pull_batch(client, batch_ref, selection, Path(save_dir), dry,
                                    sys.stderr.isatty() and not as_json)
        finally:
            await client.close()
    summary = asyncio.run(go())
    wanted = summary.pop("wanted")
    if as_json:
        if dry:
            summary["would_transfer"] = [{"path": e["path"], "size": e["size"]} for e in wanted]
        click.echo(json.dumps(summary, indent=2))
        return
    if dry:
        for entry in wanted:
            click.echo(f"{human_bytes(entry['size']):>10}  {entry['path']}")
        click.echo(f"{len(wanted)} files, {human_bytes(summary['bytes'])} would come to "
                   f"{summary['destination']} ({summary['up_to_date']} already there)")
    else:
        pulled = summary["files"] if wanted is None else len(wanted)      # None: all of them (a new folder)
        click.echo(f"{summary['batch']}: {pulled} files, {human_bytes(summary['transferred'])} pulled to "
                   f"{summary['destination']}; {summary['up_to_date']} already up to date")
    if summary["unfinished_jobs"]:
        click.echo(f"note: {summary['unfinished_jobs']} jobs are not finished yet; pull again later for their results")


@cli.command()
@click.option("--dir", "folder", default="distribute-demo", show_default=True,
              help="Where the demo keeps its head state, nodes and archive.")
@click.option("--nodes", "node_count", default=2, show_default=True, help="How many local nodes.")
def demo(folder, node_count) -> None:
    """Run a real batch through head, scheduler, supervisors and archive on this machine."""
    import asyncio
    root = Path(folder).resolve()
    if root.exists():
        shutil.rmtree(root)
    jobs_dir = root / "batch"
    write_template("python", str(jobs_dir / JOBS_FILE))
    nodes_file = root / NODES_FILE
    nodes_file.write_text("nodes:\n" + "".join(
        f"  - {{name: local{i + 1}, host: local, workdir: {root / 'nodes' / f'local{i + 1}'}}}\n"
        for i in range(node_count)))
    state = root / "state"
    head = subprocess.Popen(program_argv() + ["serve", "--nodes", str(nodes_file), "--state", str(state),
                                              "--archive", str(root / "archive"), "--supervisor-idle", "5"],
                            stderr=open(root / "head.log", "wb"))
    obj = {"head": "local", "socket": str(state / "head.sock")}
    try:
        wait_for(lambda: (state / "head.sock").exists() and socket_answers(str(state / "head.sock")), 20,
                 f"the head did not start; see {root / 'head.log'}")
        batch = load_job_file(str(jobs_dir / JOBS_FILE))
        reply, _ = asyncio.run(_retry_add(obj, batch))
        click.echo(f"added {reply['batch']} ({reply['jobs']} jobs) to a head with {node_count} local nodes")
        done = None

        def finished() -> bool:
            nonlocal done
            status_reply, _ = client_call(obj, {"op": "status"})
            done = status_reply["batches"][-1]
            return done["state"] != "active"
        wait_for(finished, 120, "the demo batch did not finish in 2 minutes")
        click.echo("\n".join(format_status(client_call(obj, {"op": "status"})[0])))
        click.echo(f"results: {root / 'archive' / batch.meta.namespace / batch.meta.batch_name}")
    finally:
        head.terminate()
        head.wait()


async def _retry_add(obj, batch: JobFile):
    """Add a batch once the local nodes are up (the head refuses batches no node can run)."""
    import asyncio
    deadline = time.time() + 30
    while True:
        client = HeadClient(obj["head"], obj["socket"])
        try:
            return await client.call_with_files(add_request(batch), batch_upload(batch)), b""
        except UserError:
            if time.time() > deadline:
                raise
            await asyncio.sleep(0.1)


def wait_for(condition, timeout: float, message: str) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise Failed(message)
        time.sleep(0.05)


@cli.group(name="node")
def node_group() -> None:
    """Node-side commands (the head runs these over SSH)."""


@node_group.command("start")
@click.option("--workdir", required=True)
@click.option("--idle-timeout", default=600.0)
@click.option("--pause-dir", default=None, help="Where pause locks live (default $DISTRIBUTE_PAUSE_DIR or "
              f"{DEFAULT_PAUSE_DIR}).")
@click.option("--replace", is_flag=True, help="Stop a running supervisor first (the head upgrades it).")
def node_start(workdir, idle_timeout, pause_dir, replace) -> None:
    """Start the supervisor for WORKDIR unless it runs already; print its socket and this
    machine's identity (one JSON line)."""
    note_pause_dir(pause_dir or os.environ.get("DISTRIBUTE_PAUSE_DIR") or DEFAULT_PAUSE_DIR)
    state = start_supervisor_detached(Path(workdir), idle_timeout, program_argv(), pause_dir, replace)
    click.echo(json.dumps(dict(machine_identity(), socket=supervisor_socket(workdir), state=state)))


@node_group.command("supervise")
@click.option("--workdir", required=True)
@click.option("--idle-timeout", default=600.0)
@click.option("--pause-dir", default=None)
def node_supervise(workdir, idle_timeout, pause_dir) -> None:
    """Run the supervisor in the foreground."""
    import asyncio
    if pause_dir:
        os.environ["DISTRIBUTE_PAUSE_DIR"] = pause_dir
    asyncio.run(Supervisor(Path(workdir), idle_timeout).serve())


@node_group.command("attach")
@click.option("--socket", "socket_path", required=True)
def node_attach(socket_path) -> None:
    """Relay stdin/stdout to the supervisor's socket."""
    relay_stdio_to_socket(socket_path)

# `pause` and `resume`: run by a workstation's own user, who may not be root.
# They only write and remove that user's lock; the node supervisor does the
# stopping.  A waiting `pause` must end its pause however it ends itself.

_PAUSE_NOTE_EVERY = 300.0  # without a terminal, a line every 5 minutes is enough


class PauseInterrupted(Exception):
    """A signal ended a waiting `pause`."""


@contextlib.contextmanager
def signals_end_pause() -> Iterator[None]:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) raise PauseInterrupted, once."""
    fired: List[int] = []

    def handler(signum, _frame):
        if not fired:  # a second Ctrl-C must not interrupt the clean-up
            fired.append(signum)
            raise PauseInterrupted(signal.Signals(signum).name)

    previous = {signum: signal.signal(signum, handler)
                for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def wait_out_pause(folder: Path, lock: PauseLock, echo_line: Callable[[str, bool], None]) -> str:
    """Wait until the pause is over, showing the time left; returns why it ended."""
    path = pause_lock_path(folder, lock.user)
    last_note = time.monotonic()
    while True:
        left = lock.until - time.time()
        if left <= 0:
            return "the time is up"
        found = read_pause_lock(path)
        if found is None:
            return "ended by `distribute resume`"
        if found[0].pid != lock.pid:
            return f"replaced by a newer pause of yours, until {clock_time(found[0].until)}"
        if time.monotonic() - last_note >= _PAUSE_NOTE_EVERY:
            last_note = time.monotonic()
            echo_line(f"still paused, {format_duration(left)} left", False)
        echo_line(f"paused, {format_duration(left)} left (until {clock_time(lock.until)}); "
                  "Ctrl-C resumes", True)
        time.sleep(min(0.2, max(left, 0.01)))


def pause_echo(tty: bool) -> Callable[[str, bool], None]:
    """On a terminal, one line that updates in place; elsewhere only the occasional note."""
    def echo_line(text: str, live: bool) -> None:
        if tty and live:
            click.echo(f"\r\033[K{text}", nl=False)
        elif not tty and not live:
            click.echo(text)
    return echo_line


@cli.command()
@click.option("--duration", default=PAUSE_DEFAULT_DURATION, show_default=True, metavar="DURATION",
              help="How long: 4h, 90m, 1h30m10s, 60s (at most 4h).")
@click.option("--detach", is_flag=True,
              help="Return at once; the pause ends at its expiry or at `distribute resume`.")
def pause(duration: str, detach: bool) -> None:
    """Stop every job on this workstation while you use it (SIGSTOP, resumed by SIGCONT).

    Without --detach it waits, showing the time left, and resumes on Ctrl-C,
    when the terminal closes, on SIGTERM, or when the time is up."""
    seconds = parse_duration(duration, maximum=MAX_PAUSE_SECONDS)
    folder = pause_dir()
    if detach:
        lock = write_pause_lock(folder, time.time() + seconds, detached=True)
        click.echo(f"paused this machine's jobs until {clock_time(lock.until)} ({format_duration(seconds)}); "
                   f"`{resume_command()}` ends it earlier")
        return
    tty = sys.stdout.isatty()
    with signals_end_pause():
        lock = None
        try:
            lock = write_pause_lock(folder, time.time() + seconds, detached=False)
            click.echo(f"paused this machine's jobs until {clock_time(lock.until)} "
                       f"({format_duration(seconds)}); Ctrl-C resumes them")
            reason = wait_out_pause(folder, lock, pause_echo(tty))
        except PauseInterrupted as exc:
            reason = f"stopped by {exc}"
        finally:
            if lock is not None:
                remove_pause_lock(folder, lock.user, pid=lock.pid)
        with contextlib.suppress(OSError):  # the terminal may be gone (SIGHUP)
            click.echo(("\r\033[K" if tty else "") + f"resumed: {reason}")
            report_other_pauses(folder)


def report_other_pauses(folder: Path) -> None:
    others = active_pauses(folder)
    if others:
        click.echo(f"this machine stays paused by {describe_pauses(others)}")
    else:
        click.echo("jobs on this machine continue now")


@cli.command()
@click.option("--all", "everyone", is_flag=True, help="End every user's pause (root only).")
def resume(everyone: bool) -> None:
    """End your pause of this workstation's jobs (started with `distribute pause`)."""
    folder = pause_dir()
    if everyone:
        if os.geteuid() != 0:
            raise UserError("`resume --all` ends other users' pauses too: only root may do that")
        ended = [lock.user for lock in active_pauses(folder)]
        for path in _lock_files(folder):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        click.echo(f"ended the pauses of {', '.join(ended)}" if ended else "nobody had paused this machine")
    else:
        user = current_user()
        in_force = any(lock.user == user for lock in active_pauses(folder))
        # Remove even a stale lock of ours, but only call it an ended pause if it was in force.
        removed = remove_pause_lock(folder, user)
        click.echo("your pause has ended" if in_force and removed else "you had not paused this machine")
    report_other_pauses(folder)

# `service install`, `config`, `completion` and `report` (`nodes --check` is an option of `nodes`).

@cli.group(name="service")
def service_group() -> None:
    """Run the head as a systemd service."""


@service_group.command("install")
@click.option("--user", "user", default=None, metavar="USER",
              help="Who runs the head (system unit; default: whoever called sudo, else you).")
@click.option("--nodes", "nodes_file", default=None, metavar="FILE",
              help="distribute-nodes.yaml (default: this machine is the one node).")
@click.option("--state", default=None, metavar="DIR",
              help=f"Queue database and socket [default: {SYSTEM_STATE_DIR}; for --user-unit "
                   "~/.local/state/distribute].")
@click.option("--archive", default=None, metavar="DIR", help="Where results are kept [default: STATE/archive].")
@click.option("--group", default=None, metavar="GROUP",
              help="Unix group whose members may use the head (the head's account must be in it too).")
@click.option("--matrix-config", default=None, metavar="FILE", help="Matrix homeserver and token (YAML).")
@click.option("--output", default=None, metavar="PATH",
              help=f"Where the unit goes [default: {SYSTEM_UNIT_DIR}/distribute.service, for --user-unit "
                   "~/.config/systemd/user/distribute.service].")
@click.option("--system/--user-unit", "system", default=True, show_default=True,
              help="A system unit (starts at boot, User=) or a unit of your own systemd --user.")
def service_install(user, nodes_file, state, archive, group, matrix_config, output, system) -> None:
    """Write a systemd unit that runs `distribute serve`, and say how to enable it."""
    if user and not system:
        raise UserError("--user names the account of a system unit; a --user-unit runs as you")
    target, commands, notes = install_service(user, nodes_file, state, archive, group, matrix_config, output,
                                              system)
    click.echo(f"wrote {target}; to start the head now and at every boot:")
    for line in commands:
        click.echo(f"  {line}")
    for line in notes:
        click.echo(line, err=True)


@cli.command(name="config")
@click.option("--head", default=None, metavar="[USER@]HOST[:PORT]|local",
              help="The head your commands talk to when --head is not given.")
@click.option("--socket", "socket_path", default=None, metavar="PATH",
              help="The head's API socket on the head machine (when it is not the default).")
@click.option("--unset", "unset", multiple=True, type=click.Choice(CONFIG_KEYS), help="Forget a stored value.")
@click.option("--show", is_flag=True, help="Print the stored values (the default without options).")
def config_command(head, socket_path, unset, show) -> None:
    """Store your default head (in ~/.config/distribute/config.yaml)."""
    changing = head is not None or socket_path is not None or bool(unset)
    try:
        values = read_client_config()
    except UserError:
        if not changing:
            raise
        values = {}                               # a broken file is what `config --head` repairs
    if changing:
        for key in unset:
            values.pop(key, None)
        if head is not None:
            values["head"] = check_head_value(head)
        if socket_path is not None:
            if not socket_path.startswith("/"):
                raise UserError(f"--socket {socket_path}: must be an absolute path on the head machine")
            values["socket"] = socket_path
        click.echo(f"wrote {write_client_config(values)}")
        if not show:
            return
    click.echo(f"{config_path()}:" + ("" if values else " (no defaults stored)"))
    for key in CONFIG_KEYS:
        if key in values:
            click.echo(f"  {key}: {values[key]}")
    if os.environ.get("DISTRIBUTE_HEAD"):
        click.echo(f"  (DISTRIBUTE_HEAD={os.environ['DISTRIBUTE_HEAD']} overrides the stored head)")


@cli.command(name="install")
@click.option("--prefix", default="~/.local", show_default=True, metavar="DIR",
              help="The command goes to DIR/bin, the program to DIR/lib/distribute.")
@click.option("--shell", type=click.Choice(COMPLETION_SHELLS), default=None,
              help="Whose completion to install [default: from $SHELL].")
def install(prefix, shell) -> None:
    """Put a `distribute` command (and shell completion) on this machine; again to upgrade."""
    try:
        lines = install_command(Path(prefix), shell)
    except PermissionError as exc:
        raise Failed(f"cannot write {exc.filename}: permission denied; choose a --prefix of yours") from None
    for line in lines:
        click.echo(line)


@cli.command(name="completion")
@click.argument("shell", type=click.Choice(COMPLETION_SHELLS))
def completion_command(shell) -> None:
    """Print the shell completion script for bash, zsh or fish.

    \b
    bash:  distribute completion bash > ~/.local/share/bash-completion/completions/distribute
    zsh:   distribute completion zsh > ~/.zfunc/_distribute  (with fpath+=~/.zfunc before compinit)
    fish:  distribute completion fish > ~/.config/fish/completions/distribute.fish"""
    click.echo(completion_script(shell), nl=False)


@cli.command()
@click.argument("batch", metavar="BATCH")
@click.option("-o", "--output", default=None, metavar="FILE",
              help="Where the SVG goes ('-' for standard output) [default: BATCH-timeline.svg].")
@click.pass_obj
def report(obj, batch, output) -> None:
    """Draw a batch's timeline as an SVG: a row per node, a bar per job attempt."""
    reply, _ = client_call(obj, {"op": "report", "batch": batch})
    svg = timeline_svg(reply)
    if output == "-":
        click.echo(svg, nl=False)
        return
    target = Path(output or f"{reply['batch'].rpartition('/')[2]}-timeline.svg")
    try:
        write_atomically(target, lambda tmp: tmp.write_text(svg))
    except OSError as exc:
        raise Failed(f"cannot write {target}: {exc.strerror}") from None
    click.echo(f"wrote {target}: {len(reply['jobs'])} job attempts, {len(reply['builds'])} builds and "
               f"{len(reply['pauses'])} pauses on {len(reply['nodes'])} nodes")
    for span in reply["jobs"]:
        if span.get("reason"):
            click.echo(f"  {span['job']} (attempt {span['attempt']}) on {span['node']}: {span['state']}: {span['reason']}")


# `forget` and `du`: the archive does not only grow.

@cli.command()
@click.argument("batch", metavar="BATCH")
@click.option("--yes", is_flag=True, help="Do not ask; delete at once.")
@click.pass_obj
def forget(obj, batch, yes) -> None:
    """Delete an ended batch's archived results and its record on the head (owner or admin)."""
    ask = {"op": "forget", "batch": batch, "dry": True}
    if not yes:
        found, _ = client_call(obj, ask)
        prompt = (f"forget {found['batch']}: delete its {found['jobs']} jobs' records and its archive "
                  f"({found['files']} files, {human_bytes(found['bytes'])}) on the head?")
        try:
            confirmed = click.confirm(prompt, default=False, err=True)
        except click.exceptions.Abort:
            confirmed = False
        if not confirmed:
            raise UserError(f"not confirmed: {found['batch']} is kept (`forget --yes` deletes without asking)")
    reply, _ = client_call(obj, dict(ask, dry=False))
    click.echo(f"forgot {reply['batch']}: {reply['files']} files, {human_bytes(reply['bytes'])} freed")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (documented in the README).")
@click.pass_obj
def du(obj, as_json) -> None:
    """Show the space the head's archive takes, per namespace and batch."""
    reply, _ = client_call(obj, {"op": "du"})
    if as_json:
        click.echo(json.dumps({k: reply[k] for k in ("archive", "bytes", "namespaces")}, indent=2))
        return
    for namespace in reply["namespaces"]:
        click.echo(f"{human_bytes(namespace['bytes']):>10}  {namespace['namespace']}/")
        for entry in namespace["batches"]:
            who = ", ".join(x for x in (entry.get("owner"), entry.get("state")) if x)
            click.echo(f"{human_bytes(entry['bytes']):>10}    {entry['batch']}  ({entry['files']} files; {who})")
    click.echo(f"{human_bytes(reply['bytes']):>10}  in total, in {reply['archive']}")


def _not_yet(name: str, help_text: str):
    @click.pass_context
    def command(ctx, **_):
        raise UserError(f"`{name}` is not available yet in this version")
    command.__doc__ = help_text
    return cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(
        click.argument("args", nargs=-1, type=click.UNPROCESSED)(command))


for _name, _help in (("serve", "Run the head daemon."), ("add", "Submit a batch to the head."),
                     ("status", "Show batches and their jobs."), ("nodes", "Show the nodes."),
                     ("kill", "Stop a batch."), ("pull", "Fetch archived results."),
                     ("logs", "Show a job's output."), ("why", "Say why a job waits."),
                     ("retry", "Queue failed jobs again."), ("pause", "Pause the jobs on this workstation."),
                     ("resume", "Resume the jobs on this workstation."),
                     ("slurm", "Transpile a batch for a Slurm cluster."), ("node", "Node-side commands (used by the head).")):
    if _name not in cli.commands:
        _not_yet(_name, _help)


# The original distribute's spellings: the ones with a meaning here are rewritten to
# ours (with one note line, so people learn the new names); the others get one line
# naming what to use instead.

_ORIGINAL_RENAMED = {"server-status": "status", "node-status": "nodes"}
_ORIGINAL_GONE = {
    "server": "the head is `distribute serve --nodes distribute-nodes.yaml --archive DIR` here "
              "(the original's --save-path is --archive; --temp-dir and --port are not needed)",
    "client": "nodes run no `distribute client` here: list the machine in the head's nodes file and the "
              "head starts what it needs over SSH (README: Coming from the original)",
}
_GLOBAL_OPTIONS = ("--head", "--socket")


def original_spelling(argv: List[str]) -> Tuple[List[str], List[str]]:
    """(our argv, notes) for a command line in the original's spelling: `server-status`,
    `node-status [--nodes-file F]`, `--ip HOST [--port N]`, `pull ... include -i RE` /
    `exclude -e RE`.  A command that has no counterpart here is a UserError naming ours."""
    argv = list(argv)
    index = 0                                   # the command: the first word after global options
    while index < len(argv) and argv[index].startswith("-"):
        index += 2 if argv[index] in _GLOBAL_OPTIONS else 1
    if index >= len(argv):
        return argv, []
    command, rest, notes = argv[index], argv[index + 1:], []
    if command in _ORIGINAL_GONE:
        raise UserError(f"`{command}` is the original distribute's: {_ORIGINAL_GONE[command]}")
    if command == "help":                       # the original's `help [COMMAND]`
        return argv[:index] + rest[:1] + ["--help"], []
    if command in _ORIGINAL_RENAMED:
        notes.append(f"`{command}` is `distribute {_ORIGINAL_RENAMED[command]}` here")
        if command == "node-status":
            rest = _rename_option(rest, ("--nodes-file",), "--nodes")
            if "--nodes" in rest or any(a.startswith("--nodes=") for a in rest):
                rest = ["--check"] + rest
        command = _ORIGINAL_RENAMED[command]
    head: List[str] = []
    if any(a == "--ip" or a.startswith("--ip=") for a in rest):
        kept: List[str] = []
        words = iter(rest)
        for word in words:
            if word == "--ip":
                head = ["--head", next(words, "")]
            elif word.startswith("--ip="):
                head = ["--head", word[5:]]
            elif word in ("-p", "--port"):      # the original's TCP port: SSH needs none
                next(words, None)
            elif not word.startswith("--port="):
                kept.append(word)
        rest = kept
        notes.append(f"`--ip {head[1]}` is `--head {head[1]}` here (reached over SSH)")
    if command == "pause" and rest and not rest[0].startswith("-"):
        rest = ["--duration"] + rest
        notes.append(f"`pause {rest[1]}` is `pause --duration {rest[1]}` here")
    original_slurm = {"--cluster-username": "--cluster-user", "--cluster-address": "--cluster-host",
                      "--cluster-upload-destination": "--cluster-dir"}
    if command == "slurm" and any(a.partition("=")[0] in original_slurm for a in rest):
        for old, new in original_slurm.items():
            rest = _rename_option(rest, (old,), new)
        words, positional, kept = iter(rest), [], []
        for word in words:                      # the original took OUTDIR first, then the job file
            if word.startswith("--cluster-") and "=" not in word:
                kept += [word, next(words, "")]
            elif word.startswith("-"):
                kept.append(word)
            else:
                positional.append(word)
        rest = kept + positional[::-1]
        notes.append("the original's `slurm OUTDIR [FILE] --cluster-username/--cluster-address/"
                     "--cluster-upload-destination` is `slurm [FILE] OUTDIR --cluster-user/--cluster-host/"
                     "--cluster-dir` here")
    if command == "pull" and ("include" in rest or "exclude" in rest):
        rest = [word for word in rest if word not in ("include", "exclude")]
        rest = _rename_option(rest, ("-i", "--include"), "--filter")
        rest = _rename_option(rest, ("-e",), "--exclude")
        notes.append("`pull include -i RE` / `exclude -e RE` are `pull --filter RE` / `--exclude RE` here")
    return argv[:index] + head + [command] + rest, notes


def _rename_option(words: List[str], old: Tuple[str, ...], new: str) -> List[str]:
    out = []
    for word in words:
        name, eq, value = word.partition("=")
        out.append(new + eq + value if name in old else word)
    return out


def node_fast_path(args: List[str]) -> Optional[Callable[[], None]]:
    """`pause` and `resume` with their plain options, run without click's parsing: what the
    person at a workstation types when they need it now.  Anything else (--help, a typo,
    global options) returns None and goes through click, with its help and errors."""
    if args[:1] == ["resume"]:
        return (lambda: resume.callback(everyone=bool(args[1:]))) if args[1:] in ([], ["--all"]) else None
    request = pause_request(args)
    return None if request is None else (lambda: pause.callback(duration=request[0], detach=request[1]))


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: one-line errors, exit 2 for bad input and 1 for failures."""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        fast = node_fast_path(argv)
        if fast is not None:
            fast()
            code = 0
        else:
            argv, notes = original_spelling(argv)
            if notes:
                click.echo(f"distribute: note: {'; '.join(notes)}", err=True)
            code = cli.main(args=argv, prog_name="distribute", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        code = 130
    except UserError as exc:
        click.echo(f"distribute: error: {one_line(str(exc))}", err=True)
        code = EXIT_USAGE
    except Failed as exc:
        click.echo(f"distribute: {one_line(str(exc))}", err=True)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

"""distribute: run batches of simulations on the workstations a lab already owns.

One head machine keeps the queue (SQLite) and the archive; it reaches every
workstation ("node") over plain SSH, copies this very file there (packed as
distribute.pyz), and hands out jobs by capability.  Users talk to the head from
their laptops, again over SSH.  This module is the whole program; read it top
to bottom, it follows the data:

  1. configuration and errors        6. transports (local and SSH)
  2. names, paths and durations      7. the node-side supervisor
  3. job files and nodes files       8. the head daemon
  4. local runs and the archive      9. the client
  5. the head's store, scheduling   10. the command line

It must parse on CPython 3.8 (node-side commands run on old workstations):
no `match`, no `X | Y` types at run time, and asyncssh is imported only where
the head or a client needs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

import click

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
DEFAULT_PAUSE_DIR = "/var/tmp/distribute"
DEFAULT_NODE_WORKDIR = "/var/tmp/distribute"
MAX_PAUSE_SECONDS = 4 * 3600


class UserError(Exception):
    """Bad input: a file, a name or an option the user can fix.  Exit code 2."""


class Failed(Exception):
    """The input was fine but the operation could not be done.  Exit code 1."""


# ---------------------------------------------------------------------------
# 2. Names, paths and durations
#
# Everything that becomes a file name or a folder on some machine passes
# through here first, so nothing can climb out of the folder it belongs to.
# ---------------------------------------------------------------------------

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
CAPABILITY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")


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
    if any(ord(c) < 32 for c in alias) or len(alias.encode()) > 255:
        return f"{alias!r} is not a usable file name"
    return None


def inside(root: Path, *parts: str) -> Path:
    """root/parts, refusing anything that would land outside root."""
    path = root.joinpath(*parts)
    resolved_root = os.path.abspath(root)
    resolved = os.path.abspath(path)
    if resolved != resolved_root and not resolved.startswith(resolved_root + os.sep):
        raise UserError(f"path {'/'.join(parts)!r} escapes {root}")
    return path


_DURATION_RE = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?\Z")


def parse_duration(text: str, maximum: Optional[float] = None) -> int:
    """'1h30m10s', '90m', '4h', '60s' -> seconds.  Zero, garbage or too long: UserError."""
    match = _DURATION_RE.match(text.strip().lower()) if text else None
    if not match or not any(match.groups()):
        raise UserError(f"duration {text!r} is not like 4h, 90m, 1h30m or 60s")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
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

FLAVOURS = ("python", "apptainer", "shell")
SLURM_KEYS = ("job_name", "output", "nodes", "ntasks", "cpus_per_task", "mem_per_cpu", "hint",
              "time", "partition", "account", "mail_user", "mail_type")


@dataclass
class FileSpec:
    """A file on the submitting machine and the name it gets on the node."""
    path: str
    alias: str


@dataclass
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


@dataclass
class Meta:
    batch_name: str
    namespace: str
    capabilities: List[str] = field(default_factory=list)
    matrix: Optional[str] = None


@dataclass
class Job:
    name: str
    required_files: List[FileSpec] = field(default_factory=list)
    file: Optional[FileSpec] = None          # python flavour: becomes job.py
    command: Optional[str] = None            # shell flavour
    retries: int = 0
    slurm: Optional[SlurmOptions] = None
    params: Optional[Dict[str, Any]] = None  # sweep parameters, kept in job.json


@dataclass
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

    def shared_files(self) -> List[FileSpec]:
        """Files every job of the batch needs: sent to a node once."""
        return ([self.build] if self.build else []) + list(self.initial_files)

    def all_files(self) -> List[FileSpec]:
        files = self.shared_files()
        for job in self.jobs:
            files += ([job.file] if job.file else []) + job.required_files
        return files


@dataclass
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

    @property
    def is_local(self) -> bool:
        return self.host == "local"


class _Y:
    """A YAML node with the file and key path that lead to it, so errors can say where."""

    def __init__(self, node: Any, file: str, path: str):
        self.node, self.file, self.path = node, file, path

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def fail(self, message: str) -> UserError:
        return UserError(f"{self.file}:{self.line}: {self.path}: {message}")

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
        if not self.node.tag.endswith(":int"):
            raise self.fail(f"expected a whole number, found {self.kind}")
        value = int(self.node.value.replace("_", ""), 0)
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
        return yaml.constructor.SafeConstructor().construct_document(self.node)


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
        raise UserError(f"{where}: YAML syntax error: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML error: {exc}") from None
    if node is None:
        raise UserError(f"{path}: the file is empty")
    return _Y(node, path, "")


def _file_spec(y: _Y, base: Path, default_alias: Optional[str] = None) -> FileSpec:
    """`path` or `{path, alias}` -> FileSpec with an absolute path that exists."""
    import yaml
    if isinstance(y.node, yaml.MappingNode):
        keys = y.mapping(("path", "alias"), required=("path",))
        rel = keys["path"].text()
        alias_y = keys.get("alias")
        alias = alias_y.optional_text() if alias_y else None
    else:
        rel, alias_y, alias = y.text(), None, None
    full = (base / rel) if not os.path.isabs(rel) else Path(rel)
    if not full.exists():
        raise y.fail(f"file {rel!r} does not exist (looked at {full})")
    if not full.is_file():
        raise y.fail(f"{rel!r} is not a regular file")
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


def _meta(y: _Y) -> Meta:
    keys = y.mapping(("batch_name", "namespace", "capabilities", "matrix"),
                     required=("batch_name", "namespace"))
    matrix = keys["matrix"].optional_text() if "matrix" in keys else None
    if matrix is not None and not re.match(r"@[^:\s]+:[^\s]+\Z", matrix):
        raise keys["matrix"].fail(f"{matrix!r} is not a Matrix user id like @alice:example.org")
    return Meta(batch_name=keys["batch_name"].name(), namespace=keys["namespace"].name(),
                capabilities=_capabilities(keys.get("capabilities")), matrix=matrix)


_INIT_KEYS = {"python": ("build_file", "required_files"),
              "apptainer": ("sif", "required_files", "required_mounts"),
              "shell": ("build", "required_files")}
_JOB_KEYS = {"python": ("name", "file", "required_files", "retries", "slurm", "params"),
             "apptainer": ("name", "required_files", "retries", "slurm", "params"),
             "shell": ("name", "command", "required_files", "retries", "slurm", "params")}


def _job(y: _Y, flavour: str, base: Path) -> Job:
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
    if "params" in keys and not keys["params"].is_null():
        keys["params"].mapping(tuple(str(k.value) for k, _ in keys["params"].node.value))
        job.params = keys["params"].plain()
    return job


def _mount(y: _Y) -> str:
    mount = y.text()
    if not mount.startswith("/") or ":" in mount or "," in mount or ".." in mount.split("/"):
        raise y.fail(f"{mount!r} must be an absolute container path without ':', ',' or '..'")
    return mount


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
    elif "build" in init:
        batch.build_command = init["build"].optional_text()
    batch.initial_files = _file_list(init.get("required_files"), base)
    job_nodes = section["jobs"].sequence()
    if not job_nodes:
        raise section["jobs"].fail("the job list is empty")
    seen: Dict[str, int] = {}
    for item in job_nodes:
        job = _job(item, flavour, base)
        if job.name in seen:
            raise item.fail(f"job name {job.name!r} is used twice (first at line {seen[job.name]})")
        seen[job.name] = item.line
        initial = {f.alias: f.path for f in batch.initial_files}
        for spec in job.required_files:
            if spec.alias in initial and initial[spec.alias] != spec.path:
                raise item.fail(f"{spec.alias!r} is both an initialize file and a file of this job; "
                                "give one an alias")
        batch.jobs.append(job)
    return batch


def load_nodes_file(path: str) -> List[NodeSpec]:
    """Read and check a distribute-nodes.yaml."""
    root = read_yaml(path)
    items = root.mapping(("nodes",), required=("nodes",))["nodes"].sequence()
    if not items:
        raise root.fail("the node list is empty")
    nodes: List[NodeSpec] = []
    for item in items:
        keys = item.mapping(("name", "host", "user", "port", "capabilities", "slots", "workdir", "python"),
                            required=("name", "host"))
        node = NodeSpec(name=keys["name"].name(), host=keys["host"].text(),
                        capabilities=_capabilities(keys.get("capabilities")))
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
        if "workdir" in keys:
            node.workdir = keys["workdir"].text()
            if not node.workdir.startswith("/"):
                raise keys["workdir"].fail("must be an absolute path")
        if "python" in keys:
            node.python = keys["python"].text()
        if any(n.name == node.name for n in nodes):
            raise keys["name"].fail(f"node name {node.name!r} is used twice")
        nodes.append(node)
    return nodes


def describe_batch(batch: JobFile) -> Tuple[int, int]:
    """(number of distinct files, bytes to upload) for a batch."""
    paths = {spec.path for spec in batch.all_files()}
    return len(paths), sum(os.path.getsize(p) for p in paths)


#@@PYTHON API: begin@@
#@@PYTHON API: end@@


# ---------------------------------------------------------------------------
# 4. Local runs and the archive
#
# What a job sees on a node (SPEC §3) and how its results land in the archive
# (SPEC §6).  `run`, the node supervisor and the head all use these, so a batch
# behaves the same on a laptop as on the lab's machines.
# ---------------------------------------------------------------------------

@dataclass
class BatchPlan:
    """What a machine needs to know to build a batch: no paths of the submitter's laptop."""
    namespace: str
    batch: str
    flavour: str
    build_alias: Optional[str] = None       # build.py, or the .sif's name
    build_command: Optional[str] = None
    initial: List[str] = field(default_factory=list)
    mounts: List[str] = field(default_factory=list)

    @classmethod
    def of(cls, batch: JobFile) -> "BatchPlan":
        return cls(batch.meta.namespace, batch.meta.batch_name, batch.flavour,
                   batch.build.alias if batch.build else None, batch.build_command,
                   [f.alias for f in batch.initial_files], list(batch.mounts))


@dataclass
class JobPlan:
    """What a machine needs to know to run one job of a built batch."""
    name: str
    files: List[str] = field(default_factory=list)
    command: Optional[str] = None
    has_script: bool = False
    params: Optional[Dict[str, Any]] = None

    @classmethod
    def of(cls, job: Job) -> "JobPlan":
        return cls(job.name, [f.alias for f in job.required_files], job.command, job.file is not None,
                   job.params)


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
        twin = Workspace(self.root.with_name(f"{self.root.name}.slot{slot}"))
        twin.create()
        for entry in self.root.iterdir():
            link = twin.root / entry.name
            if entry.name in self.PRIVATE or os.path.lexists(link):
                continue
            os.symlink(entry, link)
        return twin

    def place_initial(self, sources: Dict[str, str]) -> None:
        """Copy the batch's shared files (alias -> source path) into place."""
        for alias, source in sources.items():
            shutil.copyfile(source, inside(self.initial, alias))

    def place_build_file(self, plan: BatchPlan, source: str) -> None:
        if plan.build_alias:
            shutil.copyfile(source, inside(self.root, plan.build_alias))

    def prepare_job(self, plan: BatchPlan, sources: Dict[str, str], script: Optional[str]) -> None:
        """Refresh input/ (initial files + this job's), empty distribute_save/ and mounts."""
        for folder in (self.input, self.save, self.root / "mounts"):
            if folder.exists():
                shutil.rmtree(folder)
        self.input.mkdir()
        self.save.mkdir()
        for alias in plan.initial:
            shutil.copyfile(inside(self.initial, alias) if not self.initial.is_symlink()
                            else self.initial / alias, inside(self.input, alias))
        for alias, source in sources.items():
            shutil.copyfile(source, inside(self.input, alias))
        for index, _ in enumerate(plan.mounts):
            (self.root / "mounts" / str(index)).mkdir(parents=True)
        if script is not None:
            shutil.copyfile(script, self.root / "job.py")

    def progress_file(self, job: str) -> Path:
        return self.private / f"progress-{job}"

    def build_argv(self, plan: BatchPlan, python: str) -> Optional[List[str]]:
        if plan.flavour == "python":
            return [python, plan.build_alias or "build.py"]
        if plan.flavour == "shell" and plan.build_command:
            return ["/bin/sh", "-c", plan.build_command]
        return None     # apptainer: the image is the build

    def job_argv(self, plan: BatchPlan, job: JobPlan, python: str, cpus: int) -> List[str]:
        if plan.flavour == "python":
            return [python, "job.py"]
        if plan.flavour == "shell":
            return ["/bin/sh", "-c", job.command or ""]
        return apptainer_argv(self, plan, cpus)

    def job_env(self, plan: BatchPlan, job: JobPlan, cpus: int, extra: Optional[Dict[str, str]] = None
                ) -> Dict[str, str]:
        env = dict(os.environ)
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
# filled under a hidden name and renamed into place.

def batch_archive(archive: Path, namespace: str, batch: str) -> Path:
    return inside(Path(archive), namespace, batch)


def land_job(archive: Path, namespace: str, batch: str, job: str, fill, record: Dict[str, Any]) -> Path:
    """Create the job's archive folder atomically; `fill(folder)` puts the files in."""
    parent = batch_archive(archive, namespace, batch)
    parent.mkdir(parents=True, exist_ok=True)
    final = inside(parent, job)
    incoming = Path(tempfile.mkdtemp(prefix=f".incoming-{job}-", dir=parent))
    try:
        fill(incoming)
        write_json(incoming / "job.json", record)
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".replaced-{job}-", dir=parent))
            os.rename(final, old / "old")
            os.rename(incoming, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(incoming, final)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    return final


def land_build_log(archive: Path, namespace: str, batch: str, node: str, source: Path) -> Path:
    folder = batch_archive(archive, namespace, batch) / "build"
    folder.mkdir(parents=True, exist_ok=True)
    final = inside(folder, f"{node}.txt")
    write_atomically(final, lambda tmp: shutil.copyfile(source, tmp))
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


@dataclass
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


#@@SLURM: begin@@
#@@SLURM: end@@


#@@PAUSE: begin@@
#@@PAUSE: end@@


#@@CLUSTER: begin@@
#@@CLUSTER: end@@


# Starting points written by `distribute template`: each is accepted by
# `distribute check` as written, together with the small scripts it names.

TEMPLATES: Dict[str, Dict[str, str]] = {
    "python": {
        JOBS_FILE: """\
# A python batch: build.py runs once per machine, then job files run one by one.
meta:
  batch_name: my_first_batch      # unique within your namespace
  namespace: my_name              # usually your user name or project
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


def write_template(flavour: str, output: str) -> List[Path]:
    """Write a template job file and the scripts it names; never overwrite a file."""
    files = TEMPLATES[flavour]
    target = Path(output)
    if target.is_dir():
        target = target / JOBS_FILE
    folder = target.parent
    planned = {target: files[JOBS_FILE]}
    planned.update({folder / name: text for name, text in files.items() if name != JOBS_FILE})
    clashes = [str(p) for p in planned if p.exists()]
    if clashes:
        raise UserError(f"{clashes[0]} already exists; choose another place with -o")
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in planned.items():
        path.write_text(text)
    return list(planned)


# ---------------------------------------------------------------------------
# 10. The command line
#
# Thin: each command parses its options, calls the sections above, and prints.
# ---------------------------------------------------------------------------

def find_job_file(path: Optional[str]) -> str:
    if path:
        return path
    if os.path.exists(JOBS_FILE):
        return JOBS_FILE
    raise UserError(f"no job file given and no {JOBS_FILE} in {os.getcwd()}")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="distribute")
@click.option("--head", envvar="DISTRIBUTE_HEAD", default=None, metavar="[USER@]HOST[:PORT]|local",
              help="The head to talk to (default: $DISTRIBUTE_HEAD, else the head on this machine).")
@click.option("--socket", "socket_path", envvar="DISTRIBUTE_SOCKET", default=None, metavar="PATH",
              help="The head's API socket on the head machine.")
@click.pass_context
def cli(ctx: click.Context, head: Optional[str], socket_path: Optional[str]) -> None:
    """Run batches of simulations on your lab's workstations, over SSH."""
    ctx.obj = {"head": head, "socket": socket_path}


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


#@@CLI SLURM: begin@@
#@@CLI SLURM: end@@


#@@CLI PAUSE: begin@@
#@@CLI PAUSE: end@@


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


def main(argv: Optional[List[str]] = None) -> None:
    """Entry point: one-line errors, exit 2 for bad input and 1 for failures."""
    try:
        code = cli.main(args=argv, prog_name="distribute", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("interrupted", err=True)
        code = 130
    except UserError as exc:
        click.echo(f"distribute: error: {exc}", err=True)
        code = EXIT_USAGE
    except Failed as exc:
        click.echo(f"distribute: {exc}", err=True)
        code = EXIT_FAILED
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()

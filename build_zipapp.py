#!/usr/bin/env python3
"""Build distribute.pyz: distribute.py with everything it needs, in one file.

    python3 build_zipapp.py [-o distribute.pyz]

The archive runs with a bare `python3 distribute.pyz ...` on Linux x86_64 and
aarch64 machines where nothing was installed.  It holds

  * at its root, importable straight from the zip: distribute.py and the
    pure-Python packages (click, asyncssh, typing_extensions), one copy each;
  * under `_distribute_deps/`: the files of the native wheels (psutil, pyyaml,
    cryptography, cffi) for both architectures and every CPython they publish
    wheels for.  A file that several wheels share (yaml/*.py, cryptography's
    Python code, licences) is stored once; in the extension modules the debug
    sections and symbol tables, which the dynamic loader never reads, are
    blanked (PyYAML's _yaml compresses to 160 KB instead of 760 KB, 14 times).
    Every byte is compressed exactly once: no wheel is stored inside the
    archive, so nothing is compressed twice;
  * `_distribute_boot.py`, generated here with the build id and the wheel table
    baked in, and `__main__.py`, which calls it.

At start `_distribute_boot.setup()` picks the wheels that fit the running
interpreter, unpacks them with the pure-Python code once into
`~/.cache/distribute/<build id>/<interpreter>/` (atomically: a temporary folder
renamed into place; a temporary folder when HOME is not writable), compiles
them, and puts that folder first on sys.path.

Wheels are fetched with `pip download` into a persistent cache
(~/.cache/distribute-build/wheels), so a second build needs no network.  The
versions are pinned below, on purpose:

  psutil 7.2.2        newest; one cp36-abi3 wheel per arch, manylinux2010 (glibc 2.12)
  pyyaml 6.0.3        newest; cp38 ... cp314, manylinux2014 (glibc 2.17)
  cryptography 50.0.2 newest; still ships manylinux2014 wheels (pip would pick
                      the manylinux_2_34 ones unless told the platform); one
                      cp39-abi3 wheel per arch serves every CPython >= 3.10
  cffi 2.1.1          newest; cryptography needs only its `_cffi_backend`
                      extension at run time (not cffi's Python part nor pycparser)
  click 8.1.8         the last release that supports 3.8 (8.2 needs 3.10):
                      one copy serves node (>= 3.8) and head (>= 3.10)
  asyncssh 2.24.1     newest (head and client only, CPython >= 3.10)
  typing_extensions 4.16.0  needed by asyncssh (and cryptography on 3.10)
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------
# What goes in
# ---------------------------------------------------------------------------

ARCHES = ("x86_64", "aarch64")
# Every CPython minor release the archive tries to cover.  Where a pinned
# release publishes no wheel for one of them the build says so and goes on.
PYTHONS = tuple((3, minor) for minor in range(8, 16))
NODE_MIN = (3, 8)   # node-side commands (node, pause, resume, check, run, template)
HEAD_MIN = (3, 10)  # head and client (asyncssh)
# Platforms asked for, oldest glibc first: the first that has a wheel wins.
PLATFORMS = ("manylinux2014", "manylinux_2_28")


@dataclass(frozen=True)
class Native:
    project: str
    version: str
    first: Tuple[int, int]       # oldest CPython wanted; its wheels must exist
    keep: Tuple[str, ...] = ()   # if set: only files whose path starts with one of these
    pure_fallback: bool = False  # its Python part works alone if no wheel fits


NATIVE = (
    Native("psutil", "7.2.2", NODE_MIN),
    Native("pyyaml", "6.0.3", NODE_MIN, pure_fallback=True),
    Native("cryptography", "50.0.2", HEAD_MIN),
    Native("cffi", "2.1.1", HEAD_MIN, keep=("_cffi_backend", "cffi-")),
)
PURE = (
    ("click", "8.1.8", NODE_MIN),
    ("asyncssh", "2.24.1", HEAD_MIN),
    ("typing_extensions", "4.16.0", HEAD_MIN),
)
# Imported by node-side commands: the bootstrap refuses to start without them.
NODE_MODULES = (("psutil", "psutil"), ("pyyaml", "yaml"), ("click", "click"))

DEPS = "_distribute_deps/"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed: the same inputs give the same archive


class BuildError(Exception):
    """One line for the user; the build exits 1."""


# ---------------------------------------------------------------------------
# Wheel file names and tags
# ---------------------------------------------------------------------------

def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


@dataclass(frozen=True)
class WheelName:
    filename: str
    project: str                   # normalized
    version: str
    pytags: Tuple[str, ...]
    abis: Tuple[str, ...]
    platforms: Tuple[str, ...]

    @classmethod
    def parse(cls, filename: str) -> Optional["WheelName"]:
        if not filename.endswith(".whl"):
            return None
        parts = filename[:-4].split("-")
        if len(parts) not in (5, 6):
            return None
        return cls(filename, normalize(parts[0]), parts[1], tuple(parts[-3].split(".")),
                   tuple(parts[-2].split(".")), tuple(parts[-1].split(".")))

    def glibc(self, arch: str) -> Optional[Tuple[int, int]]:
        """The oldest glibc one of its platform tags for `arch` needs; None if none fits."""
        found = [platform_glibc(p, arch) for p in self.platforms]
        found = [g for g in found if g is not None]
        return min(found) if found else None

    @property
    def is_pure(self) -> bool:
        return self.platforms == ("any",)


_LEGACY = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def platform_glibc(platform: str, arch: str) -> Optional[Tuple[int, int]]:
    if not platform.endswith("_" + arch):
        return None
    head = platform[: -len(arch) - 1]
    if head in _LEGACY:
        return _LEGACY[head]
    m = re.fullmatch(r"manylinux_(\d+)_(\d+)", head)
    return (int(m.group(1)), int(m.group(2))) if m else None


def wheel_fits(wheel: WheelName, python: Tuple[int, int], arch: str,
               max_glibc: Tuple[int, int]) -> bool:
    """Would this wheel install on CPython `python` (GIL build) on manylinux `arch`?"""
    tag = "cp%d%d" % python
    glibc = wheel.glibc(arch)
    if glibc is None or glibc > max_glibc:
        return False
    for py in wheel.pytags:
        for abi in wheel.abis:
            if py == tag and abi == tag:
                return True
            if abi == "abi3" and py.startswith("cp3") and (3, int(py[3:])) <= python:
                return True
    return False


def pick_tags(wheel: WheelName, arch: str) -> Tuple[str, str]:
    """(python tag, abi tag) for the boot table: the oldest python tag it carries."""
    pys = sorted(wheel.pytags, key=lambda t: int(t[3:]) if t[3:].isdigit() else 0)
    return pys[0], wheel.abis[0]


# ---------------------------------------------------------------------------
# Downloading (pip download into a persistent cache)
# ---------------------------------------------------------------------------

class WheelCache:
    """`pip download` into a folder that persists across builds, so that a second
    build is fast and works offline.  Combinations known to have no wheel are
    remembered too (missing.json)."""

    def __init__(self, folder: Path, offline: bool, refresh: bool):
        self.folder = folder
        self.offline = offline
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.abort = threading.Event()  # set on the first error: other threads stop asking pip
        self.missing_file = folder / "missing.json"
        self.missing: Dict[str, str] = {}
        if self.missing_file.exists() and not refresh:
            try:
                self.missing = json.loads(self.missing_file.read_text())
            except ValueError:
                self.missing = {}

    def local(self, project: str, version: str) -> List[WheelName]:
        found = []
        for path in self.folder.iterdir():
            wheel = WheelName.parse(path.name)
            if wheel and wheel.project == normalize(project) and wheel.version == version:
                found.append(wheel)
        return found

    def path(self, wheel: WheelName) -> Path:
        return self.folder / wheel.filename

    def _remember_missing(self, key: str) -> None:
        with self.lock:
            self.missing[key] = time.strftime("%Y-%m-%d")
            tmp = self.missing_file.with_suffix(".tmp.%d" % threading.get_ident())
            tmp.write_text(json.dumps(self.missing, indent=1, sort_keys=True))
            os.replace(tmp, self.missing_file)

    def _pip(self, requirement: str, python: Tuple[int, int], extra: Sequence[str]) -> bool:
        """Run pip download into a scratch folder and move the wheel into the
        cache.  False if the index answered and has no fitting wheel; any other
        failure (no network, an index that did not answer) is a BuildError."""
        if self.abort.is_set():
            raise BuildError("stopped")
        with tempfile.TemporaryDirectory(prefix="pip-", dir=str(self.folder)) as scratch:
            # A late patch release: pip checks Requires-Python against this full
            # version (plain "3.9" would mean 3.9.0, which cryptography excludes).
            # -vv: to tell "no such wheel" (pages fetched) from "no answer".
            cmd = [sys.executable, "-m", "pip", "download", "-vv", "--disable-pip-version-check",
                   "--no-deps", "--only-binary=:all:", "--dest", scratch,
                   "--python-version", "%d.%d.99" % python, *extra, requirement]
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  universal_newlines=True)
            if proc.returncode == 0:
                for name in os.listdir(scratch):
                    if name.endswith(".whl"):
                        os.replace(os.path.join(scratch, name), str(self.folder / name))
                return True
        lines = proc.stdout.splitlines()
        unreachable = [line for line in lines if line.startswith("Could not fetch URL")]
        fetched = [line for line in lines if line.startswith("Fetched page ")]
        if fetched and not unreachable and any("No matching distribution" in line for line in lines):
            return False
        errors = unreachable or [line for line in lines if line.startswith("ERROR:")] or lines[-1:]
        reason = errors[0] if errors else "exit code %d" % proc.returncode
        raise BuildError("pip could not download %s: %s" % (requirement, reason[:300]))

    def native(self, pin: Native, python: Tuple[int, int], arch: str) -> Optional[WheelName]:
        """The wheel of `pin` for CPython `python` on `arch`, oldest glibc first;
        None if the release publishes none."""
        found = self._local_native(pin, python, arch)
        if found:
            return found
        key = "%s==%s cp%d%d %s" % (pin.project, pin.version, python[0], python[1], arch)
        if key in self.missing:
            return None
        if self.offline:
            raise BuildError("no %s wheel in %s and --offline was given" % (key, self.folder))
        tag = "cp%d%d" % python
        for platform in PLATFORMS:
            extra = ["--platform", "%s_%s" % (platform, arch), "--implementation", "cp",
                     "--abi", tag, "--abi", "abi3", "--abi", "none"]
            if self._pip("%s==%s" % (pin.project, pin.version), python, extra):
                found = self._local_native(pin, python, arch)
                if found is None:
                    raise BuildError("pip downloaded a %s wheel that does not fit" % key)
                return found
        self._remember_missing(key)
        return None

    def _local_native(self, pin: Native, python: Tuple[int, int], arch: str) -> Optional[WheelName]:
        for platform in PLATFORMS:
            limit = platform_glibc(platform + "_" + arch, arch)
            assert limit is not None
            fits = [w for w in self.local(pin.project, pin.version) if wheel_fits(w, python, arch, limit)]
            if fits:
                # An exact cpXY wheel first, else the oldest abi3 one (shared by most versions).
                return max(fits, key=lambda w: ("cp%d%d" % python in w.pytags,
                                                -int(pick_tags(w, arch)[0][2:] or 0), w.filename))
        return None

    def pure(self, project: str, version: str, python: Tuple[int, int]) -> WheelName:
        found = [w for w in self.local(project, version) if w.is_pure]
        if found:
            return found[0]
        if self.offline:
            raise BuildError("no %s==%s wheel in %s and --offline was given" % (project, version, self.folder))
        ok = self._pip("%s==%s" % (project, version), python, [])
        found = [w for w in self.local(project, version) if w.is_pure]
        if not ok or not found:
            raise BuildError("%s==%s has no pure-Python wheel" % (project, version))
        return found[0]


# ---------------------------------------------------------------------------
# Shrinking extension modules
# ---------------------------------------------------------------------------

SHF_ALLOC = 0x2
SHT_NOBITS = 8


def strip_elf(data: bytes) -> bytes:
    """Blank the sections of a 64-bit little-endian ELF shared object that only
    debuggers read (.debug_*, .symtab, .strtab): their bytes become zeros (which
    compress to nothing) and their sizes 0.  Nothing moves, so every offset and
    address the dynamic loader uses stays as it was.  Anything unexpected: the
    data is returned unchanged."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return data
    try:
        shoff, = struct.unpack_from("<Q", data, 0x28)
        shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
        if shoff == 0 or shnum == 0 or shentsize != 64 or shoff + shnum * 64 > len(data):
            return data
        headers = [list(struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64)) for i in range(shnum)]
        names_off, names_size = headers[shstrndx][4], headers[shstrndx][5]
        names = data[names_off: names_off + names_size]

        def name(h: List[int]) -> str:
            end = names.index(b"\0", h[0])
            return names[h[0]:end].decode("ascii", "replace")

        linked_from_alloc = {h[6] for h in headers if h[2] & SHF_ALLOC}
        out = bytearray(data)
        for i, h in enumerate(headers):
            n = name(h)
            debug = n.startswith((".debug", ".zdebug", ".rela.debug", ".rel.debug")) or n in (".symtab", ".strtab")
            if (not debug or i == shstrndx or i in linked_from_alloc or h[2] & SHF_ALLOC
                    or h[1] == SHT_NOBITS or h[4] + h[5] > len(data)):
                continue
            out[h[4]: h[4] + h[5]] = bytes(h[5])
            h[5] = 0
            struct.pack_into("<IIQQQQIIQQ", out, shoff + i * 64, *h)
        return bytes(out)
    except (struct.error, ValueError, IndexError):
        return data


# ---------------------------------------------------------------------------
# Assembling the archive
# ---------------------------------------------------------------------------

@dataclass
class Archive:
    members: Dict[str, bytes] = field(default_factory=dict)
    by_content: Dict[Tuple[str, str], str] = field(default_factory=dict)

    def add(self, name: str, data: bytes) -> None:
        if name in self.members and self.members[name] != data:
            raise BuildError("two different files for %s" % name)
        self.members[name] = data

    def add_shared(self, dest: str, data: bytes, variant: str) -> str:
        """Store a wheel's file once per distinct content; returns the member name."""
        digest = hashlib.sha256(data).hexdigest()
        member = self.by_content.get((dest, digest))
        if member is None:
            member = DEPS + dest if DEPS + dest not in self.members else DEPS + variant + "/" + dest
            self.add(member, data)
            self.by_content[(dest, digest)] = member
        return member


def wheel_files(path: Path, keep: Tuple[str, ...] = ()) -> List[Tuple[str, bytes]]:
    files = []
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            name = info.filename
            if name.endswith("/") or name.endswith(".dist-info/RECORD") or name.split("/")[0].endswith(".data"):
                continue
            if keep and not name.startswith(keep):
                continue
            files.append((name, zf.read(info)))
    return files


def requires_python(path: Path) -> Optional[Tuple[int, int]]:
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            if name.endswith(".dist-info/METADATA"):
                text = zf.read(name).decode("utf-8", "replace")
                m = re.search(r"^Requires-Python:\s*>=\s*(\d+)\.(\d+)", text, re.M)
                return (int(m.group(1)), int(m.group(2))) if m else None
    return None


def is_extension(dest: str) -> bool:
    return dest.endswith(".so") or ".so." in dest.rsplit("/", 1)[-1]


def short_python_list(pythons: Sequence[Tuple[int, int]]) -> str:
    return " ".join("%d.%d" % p for p in pythons) if pythons else "-"


def build(output: Path, cache: WheelCache, keep_debug: bool, log) -> dict:
    archive = Archive()
    source = (ROOT / "distribute.py").read_bytes()
    m = re.search(rb'^__version__\s*=\s*"([^"]+)"', source, re.M)
    version = m.group(1).decode() if m else "?"

    # 1. Native wheels: which one for each (project, python, arch)?
    jobs = [(pin, arch) for pin in NATIVE for arch in ARCHES]
    plan: Dict[Tuple[str, str], Dict[Tuple[int, int], WheelName]] = {}

    def guarded(function, *args):
        try:
            return function(*args)
        except BuildError:
            cache.abort.set()  # the other threads stop asking pip
            raise

    def resolve_all(pin: Native, arch: str) -> Dict[Tuple[int, int], WheelName]:
        chosen = {}
        for python in PYTHONS:
            if python < pin.first:
                continue
            wheel = cache.native(pin, python, arch)
            if wheel is None and python == pin.first:
                raise BuildError("%s==%s publishes no wheel for CPython %d.%d on %s (%s)" % (
                    pin.project, pin.version, python[0], python[1], arch, " or ".join(PLATFORMS)))
            if wheel is not None:
                chosen[python] = wheel
        return chosen

    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        futures = {(pin.project, arch): pool.submit(guarded, resolve_all, pin, arch) for pin, arch in jobs}
        pures = {project: pool.submit(guarded, cache.pure, project, version, first)
                 for project, version, first in PURE}
        errors = [f.exception() for f in list(futures.values()) + list(pures.values())]
        real = [e for e in errors if e is not None and str(e) != "stopped"]
        if real or any(errors):
            raise real[0] if real else errors[0]
        for key, future in futures.items():
            plan[key] = future.result()
        pure_wheels = {project: future.result() for project, future in pures.items()}

    # 2. Pure-Python packages and distribute.py at the root of the zip.
    pure_groups = [{"project": "distribute", "python": list(NODE_MIN), "files": [["distribute.py", "distribute.py"]]}]
    archive.add("distribute.py", source)
    log("packing (pure Python, one copy each, at the root):")
    for project, pure_version, first in PURE:
        wheel = pure_wheels[project]
        path = cache.path(wheel)
        needs = max(requires_python(path) or first, first)
        files = wheel_files(path)
        for dest, data in files:
            archive.add(dest, data)
        pure_groups.append({"project": project, "python": list(needs), "files": [[d, d] for d, _ in files]})
        log("  %-18s %-8s CPython >= %d.%d" % (project, pure_version, needs[0], needs[1]))

    # 3. Native wheels: their files, stored once per distinct content.
    log("packing (native wheels, files shared between wheels stored once):")
    table = []      # for the boot module: (project, python tag, abi, arch, glibc, oldest python)
    wheels_manifest = []
    fallback: Dict[str, List[List[str]]] = {}
    notes = []
    index_of: Dict[Tuple[str, str], int] = {}
    for pin in NATIVE:
        for arch in ARCHES:
            chosen = plan[(pin.project, arch)]
            for python in sorted(chosen):
                wheel = chosen[python]
                if (wheel.filename, arch) in index_of:
                    continue
                files = []
                variant = "%s-%s-%s" % (pin.project, "-".join(pick_tags(wheel, arch)), arch)
                for dest, data in wheel_files(cache.path(wheel), pin.keep):
                    if is_extension(dest) and not keep_debug:
                        data = strip_elf(data)
                    files.append([dest, archive.add_shared(dest, data, variant)])
                index_of[(wheel.filename, arch)] = len(table)
                py, abi = pick_tags(wheel, arch)
                glibc = wheel.glibc(arch)
                table.append((normalize(pin.project), py, abi, arch, glibc, pin.first))
                wheels_manifest.append({"wheel": wheel.filename, "files": files})
                if pin.pure_fallback and normalize(pin.project) not in fallback:
                    fallback[normalize(pin.project)] = [f for f in files if not is_extension(f[0])]
            wanted = [p for p in PYTHONS if p >= pin.first]
            lacking = [p for p in wanted if p not in chosen]
            distinct = sorted({w.filename for w in chosen.values()})
            glibcs = sorted({WheelName.parse(f).glibc(arch) for f in distinct})
            log("  %-13s %-7s %-7s %2d wheel%s for CPython %s  (glibc >= %s)" % (
                pin.project, pin.version, arch, len(distinct), "" if len(distinct) == 1 else "s",
                short_python_list(sorted(chosen)), ", ".join("%d.%d" % g for g in glibcs)))
            if lacking:
                notes.append("note: %s %s publishes no %s wheel for CPython %s: skipped%s" % (
                    pin.project, pin.version, arch, short_python_list(lacking),
                    " (its pure-Python part is used there)" if pin.pure_fallback else ""))

    manifest = {"pure": pure_groups, "wheels": wheels_manifest, "fallback": fallback}
    archive.add(DEPS + "MANIFEST.json", json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode())

    # 4. The build id: a hash of everything the archive holds.
    digest = hashlib.sha256((MAIN_SOURCE + BOOT_SOURCE + UNPACK_SOURCE).encode())
    for name in sorted(archive.members):
        digest.update(name.encode() + b"\0" + hashlib.sha256(archive.members[name]).digest())
    build_id = digest.hexdigest()[:16]
    boot = (BOOT_SOURCE.replace("@BUILD_ID@", build_id)
            .replace("@VERSION@", version)
            .replace("@WHEELS@", "(\n" + "".join("    %r,\n" % (row,) for row in table) + ")")
            .replace("@FALLBACK@", repr(tuple(sorted(fallback))))
            .replace("@NODE_MODULES@", repr(NODE_MODULES))
            .replace("@PYTHONS@", "%d.%d" % PYTHONS[0]))
    archive.add("_distribute_boot.py", boot.encode())
    # Compiled too, for the interpreter that builds: zipimport cannot cache the bootstrap's
    # bytecode, and compiling it is a tenth of a warm start (another Python's zipimport finds
    # the magic number wrong and compiles the source, as before).
    archive.add("_distribute_boot.pyc", compiled(boot))
    archive.add("_distribute_unpack.py", UNPACK_SOURCE.encode())
    archive.add("__main__.py", MAIN_SOURCE.encode())

    # 5. Write it: text compressed hard, extension modules normally; the
    # shebang makes it executable.
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp%d" % os.getpid())
    first = ["__main__.py", "_distribute_boot.pyc", "_distribute_boot.py", "distribute.py"]
    order = first + sorted(n for n in archive.members if n not in first)
    sizes: Dict[str, int] = {}
    try:
        with open(tmp, "wb") as f:
            f.write(b"#!/usr/bin/env python3\n")
            with zipfile.ZipFile(f, "w") as zf:
                for name in order:
                    info = zipfile.ZipInfo(name, ZIP_DATE)
                    info.external_attr = 0o644 << 16
                    info.compress_type = zipfile.ZIP_DEFLATED
                    zf.writestr(info, archive.members[name], compresslevel=6 if is_extension(name) else 9)
                for info in zf.infolist():
                    sizes[info.filename] = info.compress_size + len(info.filename) * 2 + 76
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            tmp.unlink()

    # 6. What one platform costs: the members a given arch uses, plus the shared ones.
    per_arch = {}
    used_by: Dict[str, set] = {}
    for row, entry in zip(table, wheels_manifest):
        for _, member in entry["files"]:
            used_by.setdefault(member, set()).add(row[3])
    for arch in ARCHES:
        per_arch[arch] = sum(size for name, size in sizes.items() if arch in used_by.get(name, {arch}))
    total = output.stat().st_size
    for note in notes:
        log(note)
    return {"size": total, "build_id": build_id, "per_arch": per_arch, "version": version,
            "members": len(archive.members), "wheels": len(table)}


def compiled(source: str) -> bytes:
    """The bootstrap's source as an unchecked hash-based .pyc (PEP 552): nothing to compare
    against the zip entry's time stamp, so it is used as long as the interpreter's magic number
    matches; named by its place in the archive, so that builds stay byte for byte the same."""
    import py_compile
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.py")
        with open(path, "w", encoding="utf-8") as out:
            out.write(source)
        py_compile.compile(path, cfile=path + "c", dfile="_distribute_boot.py", doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        with open(path + "c", "rb") as data:
            return data.read()


def mib(n: int) -> str:
    return "%.1f MiB" % (n / 1048576)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Pack distribute.py and its dependencies into distribute.pyz.")
    parser.add_argument("-o", "--output", default="distribute.pyz", help="where to write (default: %(default)s)")
    default_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distribute-build" / "wheels"
    parser.add_argument("--wheels", default=str(default_cache),
                        help="download cache for wheels (default: %(default)s)")
    parser.add_argument("--offline", action="store_true", help="use only wheels already in the download cache")
    parser.add_argument("--refresh", action="store_true",
                        help="ask pip again for combinations remembered as having no wheel")
    parser.add_argument("--keep-debug", action="store_true",
                        help="keep debug sections and symbol tables of extension modules")
    parser.add_argument("-q", "--quiet", action="store_true", help="print only the final line")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    started = time.monotonic()
    try:
        cache = WheelCache(Path(args.wheels), args.offline, args.refresh)
        result = build(Path(args.output), cache, args.keep_debug, log)
    except BuildError as exc:
        print("build_zipapp: error: %s" % exc, file=sys.stderr)
        return 1
    except OSError as exc:
        print("build_zipapp: error: %s" % exc, file=sys.stderr)
        return 1
    per_arch = ", ".join("%s %s" % (arch, mib(size)) for arch, size in result["per_arch"].items())
    print("%s: %s (%d bytes; %s each incl. shared files), distribute %s, build %s, %d wheels, %.1f s" % (
        args.output, mib(result["size"]), result["size"], per_arch, result["version"],
        result["build_id"], result["wheels"], time.monotonic() - started))
    return 0


# ---------------------------------------------------------------------------
# The generated modules.  They must parse on any Python 3 (so that an old one
# is told "needs 3.8" instead of failing): no f-strings, no walrus.
#   __main__.py          the entry point
#   _distribute_boot.py  the warm path (one stat), with the build id and the
#                        wheel table baked in; compiled at every start, so small
#   _distribute_unpack.py  the cold path: unpacking, compiling, pruning
# ---------------------------------------------------------------------------

MAIN_SOURCE = """\
# distribute.pyz entry point, generated by build_zipapp.py.
import _distribute_boot

_distribute_boot.main()
"""

BOOT_SOURCE = r'''"""Bootstrap of distribute.pyz, generated by build_zipapp.py: do not edit.

setup() picks the native wheels in this archive that fit the running
interpreter, has them unpacked with the pure-Python packages and distribute.py
once into ~/.cache/distribute/<build id>/<interpreter>/ (see
_distribute_unpack), and puts that folder first on sys.path.  Warm, it costs
one stat.
"""

import os
import sys

BUILD_ID = "@BUILD_ID@"
VERSION = "@VERSION@"
# (project, python tag, abi tag, arch, oldest glibc, oldest CPython wanted) of
# each native wheel, in the order of _distribute_deps/MANIFEST.json.
WHEELS = @WHEELS@
FALLBACK = @FALLBACK@  # projects whose Python part works without their wheel
NODE_MODULES = @NODE_MODULES@
OLDEST_PYTHON = "@PYTHONS@"

ARCHIVE = None  # path of this archive (set by setup())
SITE = None     # the folder it was unpacked into
MISSING = ()    # native projects with no wheel for this interpreter
PROBLEM = None  # why nothing could be unpacked, if so
COMPLETE = ".distribute-complete"  # written last: the folder is whole
COMPILED = ".distribute-compiled"  # every module has its .pyc
_done = False


def interpreter():
    """(tag, abiflags, arch, glibc) of the running interpreter, e.g.
    ("cp311", "", "x86_64", (2, 36)); arch is "" where no wheel can fit."""
    tag = "cp%d%d" % sys.version_info[:2]
    if sys.implementation.name != "cpython":
        tag = sys.implementation.name
    abiflags = getattr(sys, "abiflags", "")
    arch = ""
    if sys.platform.startswith("linux") and sys.maxsize > 2 ** 32:
        arch = os.uname().machine
    glibc = None
    try:
        name, _, number = (os.confstr("CS_GNU_LIBC_VERSION") or "").partition(" ")
        if name == "glibc":
            glibc = tuple(int(part) for part in number.split(".")[:2])
    except (AttributeError, ValueError, OSError):
        glibc = None
    return tag, abiflags, arch, glibc


def select():
    """(indexes into WHEELS of the best wheel of each project, projects with none)."""
    tag, abiflags, arch, glibc = interpreter()
    best = {}
    projects = []
    for index, (project, py, abi, wheel_arch, needs, oldest) in enumerate(WHEELS):
        if sys.version_info[:2] < oldest:
            continue  # e.g. cryptography below 3.10: asyncssh cannot use it there
        if project not in projects:
            projects.append(project)
        if wheel_arch != arch or glibc is None or needs > glibc or not tag.startswith("cp"):
            continue
        if py == tag and abi == tag + abiflags:
            rank = (2, 0, needs)
        elif abi == "abi3" and "t" not in abiflags and py.startswith("cp3") and int(py[3:]) <= sys.version_info[1]:
            rank = (1, int(py[3:]), needs)
        else:
            continue
        if project not in best or rank > best[project][0]:
            best[project] = (rank, index)
    chosen = tuple(sorted(index for _, index in best.values()))
    return chosen, tuple(p for p in projects if p not in best)


def folder_name(chosen):
    """e.g. "cp311-x86_64-1a2b3c4d": interpreter, arch and which wheels."""
    tag, abiflags, arch, _ = interpreter()
    name = "%s%s-%s" % (tag, abiflags, arch or sys.platform)
    if chosen:
        import zlib
        name += "-%08x" % (zlib.crc32(repr(chosen).encode()) & 0xFFFFFFFF)
    return name


def cache_root():
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distribute")


def setup():
    """Make the native wheels that fit this interpreter importable.  Returns the
    folder put first on sys.path (None when not running from an archive, or
    when nothing could be unpacked: see PROBLEM).  Idempotent."""
    global ARCHIVE, SITE, MISSING, PROBLEM, _done
    if _done:
        return SITE
    _done = True
    archive = getattr(globals().get("__loader__"), "archive", None)
    if not archive:
        return None
    ARCHIVE = os.path.abspath(archive)
    chosen, MISSING = select()
    name = folder_name(chosen)
    target = os.path.join(cache_root(), BUILD_ID, name)
    if not ready(target):
        import _distribute_unpack
        target = _distribute_unpack.unpack(name, chosen)
        if target is None:
            MISSING = tuple(sorted(set(row[0] for row in WHEELS)))
            return None
    elif sys.dont_write_bytecode and not os.path.exists(os.path.join(target, COMPILED)):
        # Unpacked by a start that let imports write .pyc files as they went;
        # this one may not write them, so compile everything now, once.
        import _distribute_unpack
        _distribute_unpack.compile_all(target, target)
    SITE = target
    sys.path.insert(0, target)
    return SITE


def ready(target):
    """True if `target` is complete (one stat).  Refreshes its mtime once a day
    so that pruning and temp-folder cleaners leave it alone."""
    sentinel = os.path.join(target, COMPLETE)
    try:
        st = os.stat(sentinel)
    except OSError:
        return False
    import time
    if time.time() - st.st_mtime > 86400:
        for path in (sentinel, target, os.path.dirname(target)):
            try:
                os.utime(path)
            except OSError:
                pass
    return True


def describe():
    tag, abiflags, arch, glibc = interpreter()
    return "%s %s%s on %s%s" % (sys.implementation.name, sys.version.split()[0],
                               abiflags and " (%s)" % abiflags, arch or sys.platform,
                               glibc and " (glibc %d.%d)" % glibc or "")


def main():
    """The archive's entry point: set up, then run distribute's command line."""
    if sys.version_info < (3, 8):
        sys.stderr.write("distribute needs Python 3.8 or newer; this is %s\n" % sys.version.split()[0])
        sys.exit(1)
    setup()
    for project, module in NODE_MODULES:
        if project in MISSING and project not in FALLBACK:
            import importlib.util
            if importlib.util.find_spec(module) is None:
                sys.stderr.write(
                    "distribute.pyz: no %s for %s (%s): the archive carries it for CPython >= %s "
                    "on Linux x86_64 and aarch64 with glibc, and none is installed here\n"
                    % (project, describe(), PROBLEM or "no wheel fits", OLDEST_PYTHON))
                sys.exit(1)
    import distribute
    sys.exit(distribute.main())
'''

UNPACK_SOURCE = r'''"""Cold start of distribute.pyz, generated by build_zipapp.py: do not edit.

Unpacks distribute.py, the pure-Python packages and the native wheels chosen
by _distribute_boot into ~/.cache/distribute/<build id>/<interpreter>/
($XDG_CACHE_HOME honoured), or, when that is not writable, into a private
folder under the temp dir.  The files go to a temporary folder next to the
target that is then renamed into place: two first starts at the same moment
both work, the loser uses the winner's folder.
"""

import errno
import os
import shutil
import sys
import tempfile
import time

import _distribute_boot as boot

MANIFEST = "_distribute_deps/MANIFEST.json"
PRUNE_AFTER = 30 * 86400  # other builds' folders unused this long are removed
STALE_TMP = 3600          # half-made folders of crashed starts


def unpack(name, chosen):
    """Unpack into the cache (or the temp fallback); returns the folder, or
    None (with boot.PROBLEM set) when no place would take it."""
    problems = []
    for root in (boot.cache_root(), None):
        try:
            if root is None:
                root = fallback_root()
            target = os.path.join(root, boot.BUILD_ID, name)
            if not boot.ready(target):
                unpack_to(root, target, chosen)
            return target
        except OSError as exc:
            problems.append("%s: %s" % (root or tempfile.gettempdir(), exc.strerror or exc))
    boot.PROBLEM = "cannot unpack %s (%s)" % (boot.ARCHIVE, "; ".join(problems))
    return None


def fallback_root():
    """A private folder under the temp dir: ours, not a symlink, not writable by
    others; else a fresh one for this process alone."""
    import stat
    path = os.path.join(tempfile.gettempdir(), "distribute-%d" % os.getuid())
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022:
        return path
    import atexit
    path = tempfile.mkdtemp(prefix="distribute-")
    atexit.register(shutil.rmtree, path, True)
    return path


def unpack_to(root, target, chosen):
    import json
    import zipfile

    build_dir = os.path.dirname(target)
    os.makedirs(build_dir, exist_ok=True)
    prune(root, build_dir)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=build_dir)
    try:
        with zipfile.ZipFile(boot.ARCHIVE) as zf:
            manifest = json.loads(zf.read(MANIFEST).decode("utf-8"))
            files = []
            for group in manifest["pure"]:
                if sys.version_info[:2] >= tuple(group["python"]):
                    files.extend(group["files"])
            for index in chosen:
                files.extend(manifest["wheels"][index]["files"])
            for project in boot.MISSING:
                files.extend(manifest["fallback"].get(project, ()))
            made = set()
            for dest, member in files:
                path = os.path.join(tmp, *dest.split("/"))
                folder = os.path.dirname(path)
                if folder not in made:
                    os.makedirs(folder, exist_ok=True)
                    made.add(folder)
                with zf.open(member) as src, open(path, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        if sys.dont_write_bytecode:
            # This start may not write .pyc files as it imports (-B or
            # PYTHONDONTWRITEBYTECODE): compile everything now, or every start
            # would compile asyncssh again.  Otherwise imports write them as
            # they go, for the modules actually used: a quicker first start.
            compile_all(tmp, target)
        with open(os.path.join(tmp, boot.COMPLETE), "w") as out:
            out.write(boot.BUILD_ID + "\n")
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if boot.ready(target):
                shutil.rmtree(tmp, ignore_errors=True)  # another start won the race
            else:
                # A broken leftover (a temp cleaner ate part of it): move it
                # aside (pruned later) and put ours in its place.
                aside = tempfile.mkdtemp(prefix=os.path.basename(target) + ".tmp-", dir=build_dir)
                try:
                    os.rename(target, aside)
                except OSError:
                    pass
                os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def compile_all(folder, final):
    """Write the .pyc of every module under `folder` (which will be `final`)."""
    import compileall
    import py_compile
    compileall.compile_dir(folder, maxlevels=50, ddir=final, quiet=2,
                           invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    try:
        with open(os.path.join(folder, boot.COMPILED), "w") as out:
            out.write(boot.BUILD_ID + "\n")
    except OSError:
        pass


def prune(root, build_dir):
    """Remove half-made folders of crashed starts, and other builds' folders
    unused for a month."""
    now = time.time()
    for parent, limit, keep in ((build_dir, STALE_TMP, None), (root, PRUNE_AFTER, boot.BUILD_ID)):
        try:
            entries = os.listdir(parent)
        except OSError:
            continue
        for entry in entries:
            if entry == keep or (keep is None and ".tmp-" not in entry):
                continue
            path = os.path.join(parent, entry)
            try:
                if now - os.lstat(path).st_mtime > limit:
                    shutil.rmtree(path, ignore_errors=True)
            except OSError:
                pass
'''

if __name__ == "__main__":
    sys.exit(main())

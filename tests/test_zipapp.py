"""distribute.pyz: what build_zipapp.py packs, and that it runs on a bare python3.

The archive is built once per session (the `pyz` fixture in conftest.py) and
run with `python3 -I` (no user site, no PYTHON* variables) with an empty HOME,
as on a lab machine where nothing was installed.
"""

import ast
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "distribute.py"
EXAMPLE = ROOT / "examples" / "python"
PYTHON = sys.executable
TIMEOUT = 300

sys.path.insert(0, str(ROOT))
import build_zipapp  # noqa: E402

# ---------------------------------------------------------------------------
# distribute.py stays loadable by CPython 3.8 (node-side commands)
# ---------------------------------------------------------------------------


def test_distribute_parses_as_python_3_8():
    ast.parse(SOURCE.read_text(), str(SOURCE), feature_version=(3, 8))


def test_vermin_finds_nothing_newer_than_3_8():
    """A line only the head or a client runs (CPython >= 3.10) may say so with a
    `# novermin` comment; everything else must run on 3.8."""
    vermin = shutil.which("vermin") or shutil.which("vermin", path=os.path.dirname(PYTHON))
    assert vermin, "vermin is not installed (pip install vermin)"
    proc = subprocess.run([vermin, "--target=3.8-", "--no-tips", "--violations",
                           str(SOURCE)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout


# What vermin cannot see: run-time uses of 3.9/3.10 typing syntax (with
# `from __future__ import annotations` annotations are fine, expressions are not)
# and str methods it cannot tell from others by name.
TYPE_NAMES = {"int", "str", "float", "bool", "bytes", "list", "dict", "tuple", "set", "frozenset",
              "type", "object", "Path", "Any"}
GENERIC_BUILTINS = {"list", "dict", "tuple", "set", "frozenset", "type"}


def _annotation_nodes(tree):
    skip = set()
    for node in ast.walk(tree):
        annotations = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            every = args.posonlyargs + args.args + args.kwonlyargs + [args.vararg, args.kwarg]
            annotations += [a.annotation for a in every if a is not None and a.annotation is not None]
            if node.returns is not None:
                annotations.append(node.returns)
        for annotation in annotations:
            skip.update(id(n) for n in ast.walk(annotation))
    return skip


def run_time_3_9_constructs(source):
    tree = ast.parse(source)
    skip = _annotation_nodes(tree)
    problems = []

    def typeish(node):
        return ((isinstance(node, ast.Constant) and node.value is None)
                or (isinstance(node, ast.Name) and node.id in TYPE_NAMES))

    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and (
                typeish(node.left) or typeish(node.right)):
            problems.append("line %d: X | Y type union at run time (3.10)" % node.lineno)
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name)
              and node.value.id in GENERIC_BUILTINS):
            problems.append("line %d: %s[...] at run time (3.9)" % (node.lineno, node.value.id))
        elif isinstance(node, ast.Attribute) and node.attr in ("removeprefix", "removesuffix"):
            problems.append("line %d: str.%s (3.9)" % (node.lineno, node.attr))
    return problems


def test_the_run_time_check_catches_what_vermin_misses():
    source = ("from __future__ import annotations\n"
              "def f(x: int | None) -> list[str]:\n"
              "    y: dict[str, int] = {}\n"
              "    return isinstance(x, int | str), list[int], x.removeprefix('a'), 3 | 4\n")
    assert [p.split(":")[0] for p in run_time_3_9_constructs(source)] == ["line 4"] * 3


def test_distribute_uses_no_run_time_3_9_constructs():
    assert run_time_3_9_constructs(SOURCE.read_text()) == []


# ---------------------------------------------------------------------------
# build_zipapp.py's pieces
# ---------------------------------------------------------------------------


def test_wheel_names_and_tags():
    name = "PyYAML-6.0.3-cp38-cp38-manylinux2014_x86_64.manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
    wheel = build_zipapp.WheelName.parse(name)
    assert (wheel.project, wheel.version, wheel.pytags, wheel.abis) == ("pyyaml", "6.0.3", ("cp38",), ("cp38",))
    assert wheel.glibc("x86_64") == (2, 17) and wheel.glibc("aarch64") is None
    assert build_zipapp.wheel_fits(wheel, (3, 8), "x86_64", (2, 17))
    assert not build_zipapp.wheel_fits(wheel, (3, 9), "x86_64", (2, 17))
    abi3 = build_zipapp.WheelName.parse("cryptography-50.0.2-cp39-abi3-manylinux_2_34_aarch64.whl")
    assert abi3.glibc("aarch64") == (2, 34)
    assert not build_zipapp.wheel_fits(abi3, (3, 12), "aarch64", (2, 17))  # too new a glibc
    assert build_zipapp.wheel_fits(abi3, (3, 12), "aarch64", (2, 34))
    assert not build_zipapp.wheel_fits(abi3, (3, 8), "aarch64", (2, 34))   # abi3 from 3.9 on
    assert build_zipapp.platform_glibc("manylinux2010_x86_64", "x86_64") == (2, 12)
    assert build_zipapp.WheelName.parse("click-8.1.8-py3-none-any.whl").is_pure


def test_strip_elf_blanks_debug_sections_only(tmp_path):
    so = next(iter(glob.glob(os.path.join(os.path.dirname(os.__file__), "lib-dynload", "*.so"))), None)
    if so is None:
        pytest.skip("no extension module of this interpreter to look at")
    data = Path(so).read_bytes()
    stripped = build_zipapp.strip_elf(data)
    assert len(stripped) == len(data)
    assert build_zipapp.strip_elf(b"not an ELF file") == b"not an ELF file"
    # Everything the loader maps is unchanged: compare every allocated section.
    import struct
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shnum, = struct.unpack_from("<H", data, 0x3C)
    for i in range(shnum):
        h = struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64)
        if h[2] & build_zipapp.SHF_ALLOC and h[1] != build_zipapp.SHT_NOBITS:
            assert stripped[h[4]:h[4] + h[5]] == data[h[4]:h[4] + h[5]]


# ---------------------------------------------------------------------------
# The archive
# ---------------------------------------------------------------------------


def boot_table(pyz):
    """The generated _distribute_boot module's globals (not imported: exec'd)."""
    with zipfile.ZipFile(pyz) as zf:
        source = zf.read("_distribute_boot.py").decode()
    namespace = {"__name__": "_distribute_boot_copy"}
    exec(compile(source, "_distribute_boot.py", "exec"), namespace)
    return namespace


def test_build_prints_its_size_and_stays_small(pyz):
    log = (pyz.parent / "build.log").read_text()
    m = re.search(r"distribute\.pyz: ([\d.]+) MiB \((\d+) bytes; x86_64 ([\d.]+) MiB, aarch64 ([\d.]+) MiB", log)
    assert m, log
    assert int(m.group(2)) == pyz.stat().st_size
    # Measured: 11.7 MiB in all, 6.4 MiB (x86_64) and 6.2 MiB (aarch64) for
    # one platform with the shared files.  The bounds leave room for growth,
    # not for a second copy of anything or unstripped extension modules.
    assert pyz.stat().st_size < 16 * 2 ** 20
    assert float(m.group(3)) < 9 and float(m.group(4)) < 9
    assert os.access(str(pyz), os.X_OK) and pyz.read_bytes().startswith(b"#!/usr/bin/env python3\n")


def test_archive_holds_each_file_once_and_no_wheels(pyz):
    with zipfile.ZipFile(pyz) as zf:
        names = zf.namelist()
        assert len(names) == len(set(names))
        assert not [n for n in names if n.endswith(".whl")]
        for module in ("click/core.py", "asyncssh/connection.py", "typing_extensions.py", "yaml/__init__.py",
                       "cryptography/__init__.py", "psutil/__init__.py", "distribute.py"):
            assert len([n for n in names if n.endswith("/" + module) or n == module]) == 1, module
        assert not [n for n in names if "pycparser" in n or n.startswith("cffi/")]
        # The pure-Python packages sit at the root: importable from the zip.
        assert {"distribute.py", "click/__init__.py", "asyncssh/__init__.py", "__main__.py"} <= set(names)
        manifest = json.loads(zf.read("_distribute_deps/MANIFEST.json"))
        for entry in manifest["wheels"]:
            for dest, member in entry["files"]:
                assert member in names and dest.rsplit("/", 1)[-1] == member.rsplit("/", 1)[-1]


def test_archive_covers_every_python_and_both_arches(pyz):
    table = boot_table(pyz)["WHEELS"]
    for arch in ("x86_64", "aarch64"):
        rows = [row for row in table if row[3] == arch]
        assert all(row[4] <= (2, 17) for row in rows), rows  # manylinux2014 or older
        for minor in range(8, 15):
            tag = "cp3%d" % minor
            projects = ("psutil", "pyyaml") + (("cryptography", "cffi") if minor >= 10 else ())
            for project in projects:
                fits = [r for r in rows if r[0] == project and (
                    (r[1] == tag and r[2] == tag) or (r[2] == "abi3" and int(r[1][3:]) <= int(tag[3:])))]
                assert fits, (project, tag, arch)
        # One cryptography wheel per arch (cp39-abi3), one psutil wheel (abi3).
        assert [r[1:3] for r in rows if r[0] == "cryptography"] == [("cp39", "abi3")]
        assert len([r for r in rows if r[0] == "psutil"]) == 1


# ---------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------


def bare_env(home, tmp=None, **extra):
    env = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    env.update(extra)
    return env


def run_pyz(pyz, args, home, python=PYTHON, flags=("-I",), cwd=None, tmp=None, **extra):
    return subprocess.run([python, *flags, str(pyz), *args], env=bare_env(home, tmp, **extra),
                          cwd=None if cwd is None else str(cwd), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)


def run_code(code, home):
    """`python3 -I -c CODE` with a bare environment (HOME=home)."""
    return subprocess.run([PYTHON, "-I", "-c", code], env=bare_env(home), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)


def unpacked(root):
    """The folders unpacked under a cache root (<root>/<build id>/<interpreter>)."""
    return sorted(glob.glob(os.path.join(str(root), "*", "*")))


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return home


def test_help_with_empty_home(pyz, home):
    proc = run_pyz(pyz, ["--help"], home)
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    for command in ("check", "run", "node", "pause", "resume", "serve", "add", "status"):
        assert re.search(r"^\s+%s\s" % command, proc.stdout, re.M), command
    folders = unpacked(home / ".cache" / "distribute")
    assert len(folders) == 1 and os.path.isfile(os.path.join(folders[0], ".distribute-complete"))
    assert os.path.isfile(os.path.join(folders[0], "distribute.py"))


def test_version_is_distributes(pyz, home):
    version = re.search(r'^__version__ = "([^"]+)"', SOURCE.read_text(), re.M).group(1)
    proc = run_pyz(pyz, ["--version"], home)
    assert proc.returncode == 0 and version in proc.stdout, proc.stdout + proc.stderr
    assert boot_table(pyz)["VERSION"] == version


def test_check_and_run_the_python_example(pyz, home, tmp_path):
    import yaml
    work = tmp_path / "example"
    shutil.copytree(str(EXAMPLE), str(work))
    spec = yaml.safe_load((work / "distribute-jobs.yaml").read_text())
    namespace, batch = spec["meta"]["namespace"], spec["meta"]["batch_name"]
    jobs = [job["name"] for job in spec["python"]["jobs"]]

    check = run_pyz(pyz, ["check", "distribute-jobs.yaml"], home, flags=("-I", "-X", "importtime"), cwd=work)
    assert check.returncode == 0, check.stdout + check.stderr
    for job in jobs:
        assert job in check.stdout
    assert "asyncssh" not in check.stderr  # -X importtime lists every import there

    save = tmp_path / "results"
    run = run_pyz(pyz, ["run", "distribute-jobs.yaml", "--save-dir", str(save)], home,
                  flags=("-I", "-X", "importtime"), cwd=work)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "asyncssh" not in run.stderr
    for job in jobs:
        folder = save / namespace / batch / job
        assert (folder / "stdout.txt").is_file(), sorted(str(p) for p in save.rglob("*"))
        record = json.loads((folder / "job.json").read_text())
        assert record  # written complete
    assert unpacked(home / ".cache" / "distribute")


def test_node_side_commands_never_import_asyncssh(pyz, home):
    listing = run_pyz(pyz, ["node", "--help"], home)
    assert listing.returncode == 0, listing.stderr
    commands = re.findall(r"^  ([a-z][a-z-]*)\s", listing.stdout.split("Commands:", 1)[-1], re.M)
    assert commands, listing.stdout
    for args in [["pause", "--help"], ["resume", "--help"], ["node", "--help"]] + [
            ["node", command, "--help"] for command in commands]:
        proc = run_pyz(pyz, args, home, flags=("-I", "-X", "importtime"))
        assert proc.returncode == 0, (args, proc.stderr[-2000:])
        imported = proc.stderr
        assert "asyncssh" not in imported and "cryptography" not in imported, args


def test_two_cold_starts_at_the_same_moment(pyz, home):
    procs = [subprocess.Popen([PYTHON, "-I", str(pyz), "--version"], env=bare_env(home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
             for _ in range(2)]
    results = [p.communicate(timeout=TIMEOUT) + (p.returncode,) for p in procs]
    for out, err, code in results:
        assert code == 0 and "version" in out, err
    assert results[0][0] == results[1][0]
    builds = glob.glob(str(home / ".cache" / "distribute" / "*"))
    assert len(builds) == 1
    # One folder, complete, and no half-made leftovers beside it.
    assert len(os.listdir(builds[0])) == 1, os.listdir(builds[0])
    assert os.path.isfile(os.path.join(unpacked(home / ".cache" / "distribute")[0], ".distribute-complete"))


def test_race_loser_leftovers_and_pruning(pyz, home):
    """The unpacking's rare paths, step by step: a start that loses the race, a
    folder a temp cleaner ate part of, half-made and old folders, and the daily
    mtime refresh that keeps a folder in use from being pruned."""
    code = r"""
import os, sys, time
sys.path.insert(0, %r)
import _distribute_boot as boot, _distribute_unpack as unpack
site = boot.setup()
build_dir = os.path.dirname(site)
root = boot.cache_root()
chosen, _ = boot.select()
name = os.path.basename(site)

unpack.unpack_to(root, site, chosen)          # lost the race: the winner's folder stays
assert os.listdir(build_dir) == [name], os.listdir(build_dir)

os.remove(os.path.join(site, boot.COMPLETE))  # a temp cleaner ate part of it
open(os.path.join(site, "junk"), "w").close()
assert not boot.ready(site)
unpack.unpack_to(root, site, chosen)
assert boot.ready(site) and not os.path.exists(os.path.join(site, "junk"))
aside = [e for e in os.listdir(build_dir) if e != name]
assert len(aside) == 1 and ".tmp-" in aside[0], aside

old, recent = os.path.join(root, "0123456789abcdef"), os.path.join(root, "fedcba9876543210")
for folder, age in ((old, 40 * 86400), (recent, 86400), (os.path.join(build_dir, aside[0]), 7200)):
    os.makedirs(folder, exist_ok=True)
    os.utime(folder, (time.time() - age, time.time() - age))
unpack.prune(root, build_dir)
assert os.listdir(build_dir) == [name], os.listdir(build_dir)
assert sorted(os.listdir(root)) == sorted([boot.BUILD_ID, os.path.basename(recent)])

sentinel = os.path.join(site, boot.COMPLETE)
os.utime(sentinel, (time.time() - 2 * 86400,) * 2)
assert boot.ready(site) and time.time() - os.stat(sentinel).st_mtime < 3600
print("ok")
""" % str(pyz)
    proc = run_code(code, home)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_cold_starts_that_may_not_write_bytecode_compile_everything(pyz, home):
    """-B (like PYTHONDONTWRITEBYTECODE without -I): the unpacking compiles every
    module, so later starts do not compile asyncssh again."""
    procs = [subprocess.Popen([PYTHON, "-I", "-B", str(pyz), "--version"], env=bare_env(home),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
             for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=TIMEOUT)
        assert p.returncode == 0, err
    folders = unpacked(home / ".cache" / "distribute")
    assert len(folders) == 1
    site = Path(folders[0])
    assert (site / ".distribute-compiled").is_file()
    assert list((site / "click" / "__pycache__").glob("core.*.pyc"))
    if sys.version_info >= (3, 10):
        assert list((site / "asyncssh" / "__pycache__").glob("connection.*.pyc"))


def test_unwritable_home_falls_back_to_a_private_temp_folder(pyz, tmp_path):
    home = tmp_path / "home-is-a-file"
    home.write_text("not a folder: nothing can be made under it\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    for _ in range(2):  # cold, then warm
        proc = run_pyz(pyz, ["--help"], home, tmp=tmp)
        assert proc.returncode == 0, proc.stderr
        assert "Usage:" in proc.stdout
    private = tmp / ("distribute-%d" % os.getuid())
    assert private.is_dir() and private.stat().st_mode & 0o077 == 0
    assert len(unpacked(private)) == 1


def test_read_only_home_falls_back_to_a_private_temp_folder(pyz, tmp_path, ssh_keys):
    """Run as an ordinary account (root writes into read-only folders anyway), with the
    system's python3 (the account cannot reach root's interpreters)."""
    import pwd
    import tempfile
    user = "dnode"
    pwd.getpwnam(user)          # created by the sshd fixture's helper; fail loudly if missing
    base = Path(tempfile.mkdtemp(prefix="dro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        shutil.copy(str(pyz), str(base / "distribute.pyz"))
        home, tmp = base / "home", base / "tmp"
        home.mkdir(mode=0o555)
        tmp.mkdir()
        tmp.chmod(0o1777)
        env = dict(bare_env(home, tmp))
        proc = subprocess.run(["/usr/bin/python3", "-I", str(base / "distribute.pyz"), "--version"], env=env,
                              user=user, group=user, extra_groups=[], cwd=str(base), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr
        assert os.listdir(str(home)) == []
        private = tmp / ("distribute-%d" % pwd.getpwnam(user).pw_uid)
        assert len(unpacked(private)) == 1
    finally:
        shutil.rmtree(str(base), ignore_errors=True)


def test_a_shared_temp_folder_that_others_may_write_is_not_used(pyz, tmp_path):
    """If <tmp>/distribute-<uid> is writable by others (someone could plant
    modules there), the archive unpacks into a fresh folder of its own and
    removes it at exit."""
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    planted = tmp / ("distribute-%d" % os.getuid())
    planted.mkdir()
    planted.chmod(0o777)
    proc = run_pyz(pyz, ["--version"], home, tmp=tmp)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(str(planted)) == []
    assert sorted(os.listdir(str(tmp))) == [planted.name]  # its own folder is gone


def test_import_distribute_with_the_pyz_on_sys_path(pyz, home):
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import distribute, yaml, psutil\n"
            "print(distribute.__version__, yaml.__with_libyaml__)\n"
            "print(distribute.__file__); print(yaml.__file__); print(psutil.__file__)\n"
            "yaml.load('a: [1, 2]', Loader=yaml.CSafeLoader)\n" % str(pyz))
    proc = run_code(code, home)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith(" True"), proc.stdout
    assert lines[1].startswith(str(pyz))                    # distribute.py from the archive,
    cache = str(home / ".cache" / "distribute")
    assert lines[2].startswith(cache) and lines[3].startswith(cache)  # the native parts unpacked


def test_a_platform_without_wheels_gets_one_line(pyz, home):
    """On a machine no bundled wheel fits (riscv64 here, pretended), with no
    psutil installed, the archive says so in one line and exits 1."""
    code = ("import sys; sys.path.insert(0, %r); sys.argv = ['distribute.pyz', 'pause', '--help']\n"
            "sys.path = [p for p in sys.path if not p.endswith(('site-packages', 'dist-packages'))]\n"
            "import _distribute_boot as boot\n"
            "boot.interpreter = lambda: ('cp311', '', 'riscv64', (2, 36))\n"
            "boot.main()\n" % str(pyz))
    proc = run_code(code, home)
    assert proc.returncode == 1
    assert proc.stderr.startswith("distribute.pyz: no psutil for ") and "riscv64" in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_head_side_modules_load_from_the_archive(pyz, home):
    if sys.version_info < (3, 10):
        pytest.skip("asyncssh needs CPython 3.10")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import _distribute_boot as boot; boot.setup()\n"
            "import asyncssh, cryptography, _cffi_backend\n"
            "key = asyncssh.generate_private_key('ssh-ed25519')\n"
            "print(cryptography.__file__); print(boot.ARCHIVE); print(boot.BUILD_ID)\n" % str(pyz))
    proc = run_code(code, home)
    assert proc.returncode == 0, proc.stderr
    site, archive, build_id = proc.stdout.splitlines()
    assert site.startswith(str(home / ".cache" / "distribute" / build_id)), proc.stdout
    assert archive == str(pyz)  # what the head copies to nodes


# ---------------------------------------------------------------------------
# Other interpreters, where this machine has them (/usr/bin/python3 is
# Debian's; pyenv's are a developer's extra)
# ---------------------------------------------------------------------------

def _other_pythons():
    found = {}
    candidates = ["/usr/bin/python3"] + sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.*/bin/python3")))
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            found.setdefault(os.path.realpath(path), path)
    return sorted(found.values())


@pytest.mark.parametrize("python", _other_pythons() or [None])
def test_runs_on_other_interpreters(pyz, home, tmp_path, python):
    if python is None:
        pytest.skip("no other python3 on this machine")
    version = subprocess.run([python, "-I", "-c", "import sys; print('%d %d' % sys.version_info[:2])"],
                             stdout=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
    major, minor = map(int, version.stdout.split())
    proc = run_pyz(pyz, ["--version"], home, python=python)
    if (major, minor) < (3, 8):
        assert proc.returncode == 1 and "needs Python 3.8 or newer" in proc.stderr, proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    work = tmp_path / "example"
    shutil.copytree(str(EXAMPLE), str(work))
    check = run_pyz(pyz, ["check", "distribute-jobs.yaml"], home, python=python, cwd=work,
                    flags=("-I", "-X", "importtime"))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "asyncssh" not in check.stderr
    pause = run_pyz(pyz, ["pause", "--help"], home, python=python)
    assert pause.returncode == 0, pause.stderr
    code = ("import sys; sys.path.insert(0, %r)\n"
            "import _distribute_boot; _distribute_boot.setup()\n"
            "import yaml, psutil; assert yaml.__with_libyaml__; psutil.Process().memory_info()\n"
            "if sys.version_info >= (3, 10):\n"
            "    import asyncssh; asyncssh.generate_private_key('ssh-ed25519')\n"
            "print(_distribute_boot.MISSING)\n" % str(pyz))
    proc = subprocess.run([python, "-I", "-c", code], env=bare_env(home), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "()"  # head-side wheels are not even looked for below 3.10


# ---------------------------------------------------------------------------
# A second build: from the download cache alone, and the same bytes
# ---------------------------------------------------------------------------


def test_second_build_is_offline_and_reproducible(pyz, tmp_path):
    before = SOURCE.read_bytes()
    out = tmp_path / "again.pyz"
    proc = subprocess.run([PYTHON, str(ROOT / "build_zipapp.py"), "--offline", "-q", "-o", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.count("\n") == 1 and "MiB" in proc.stdout
    if SOURCE.read_bytes() != before or boot_table(pyz)["VERSION"] != boot_table(out)["VERSION"]:
        pytest.skip("distribute.py changed while the tests ran")
    with zipfile.ZipFile(pyz) as a:
        source_then = a.read("distribute.py")
    if source_then != before:
        pytest.skip("distribute.py changed since the session's build")
    assert out.read_bytes() == pyz.read_bytes()


def test_failed_download_is_one_clear_line(tmp_path):
    proc = subprocess.run([PYTHON, str(ROOT / "build_zipapp.py"), "--offline", "--wheels", str(tmp_path / "empty"),
                           "-o", str(tmp_path / "x.pyz")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=TIMEOUT)
    assert proc.returncode == 1
    assert proc.stderr.startswith("build_zipapp: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "x.pyz").exists()


def test_unreachable_index_is_one_clear_line(tmp_path):
    """pip cannot reach the index (a closed port on loopback): exit 1, one line."""
    env = dict(os.environ, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_EXTRA_INDEX_URL="",
               PIP_FIND_LINKS="", PIP_RETRIES="0", PIP_TIMEOUT="5")
    proc = subprocess.run([PYTHON, str(ROOT / "build_zipapp.py"), "--wheels", str(tmp_path / "empty"),
                           "-o", str(tmp_path / "x.pyz")], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, timeout=TIMEOUT)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("build_zipapp: error: pip could not download "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "x.pyz").exists()


def test_the_bootstrap_ships_compiled_for_the_building_python(pyz, home):
    """zipimport cannot cache bytecode, so the bootstrap (run at every start) comes compiled
    for the interpreter that built the archive; another interpreter compiles its source."""
    code = (f"import sys; sys.path.insert(0, {str(pyz)!r}); import _distribute_boot as b; "
            "print(b.__file__.rsplit('/', 1)[1], b.BUILD_ID)")
    result = run_code(code, home)
    name, build_id = result.stdout.split()
    assert name == "_distribute_boot.pyc" and len(build_id) == 16, result.stderr
    with zipfile.ZipFile(str(pyz)) as zf:
        data = zf.read("_distribute_boot.pyc")
    assert data[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(data[4:8], "little") == 0b01  # unchecked hash

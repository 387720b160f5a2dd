"""`pull` (SPEC §5, §6 Archive; issue 5) end to end: a laptop (the test process, as root,
with dalice's SSH home) reaches a real sshd "head" as dalice, whose `distribute serve`
(a local-node head, started as root, socket group `distribute`) streams the archive."""

import hashlib
import io
import json
import os
import pty
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

import sshd as sshd_lib
from cluster import DISTRIBUTE, HeadProcess, wait_until

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import distribute  # noqa: E402


class LocalHead(HeadProcess):
    """`distribute serve` with this machine as its one node; clients come in through sshd as dalice."""

    def __init__(self, client_env):
        super().__init__(None, None, None, extra=["--group", "distribute", "--kill-grace", "1"])
        self.client_env = client_env
        self.start()

    def local(self, *args, check=True):
        """A client command on the head machine itself (as root)."""
        return self.cli(*args, check=check)

    def remote(self, *args, check=True):
        """A client command from the laptop: SSH to the head as dalice."""
        return self.cli(*args, env=self.client_env, head="head", check=check)

    def remote_argv(self, *args):
        return DISTRIBUTE + ["--head", "head", "--socket", str(self.socket)] + [str(a) for a in args]

    def pull_json(self, batch, save_dir, *options):
        return json.loads(self.remote("pull", "--batch", batch, "--save-dir", save_dir, "--json", *options).stdout)

    def stop(self):
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def lab(ssh_keys):
    """One head for this module's tests (each test uses batches of its own)."""
    with sshd_lib.Sshd("head", host_key=ssh_keys.get("host-head")) as head_sshd, \
            sshd_lib.SshClientHome("alice", key=ssh_keys.get("client-alice")) as alice:
        alice.add_host("head", head_sshd, "dalice")
        head = LocalHead(alice.env())
        head.sshd = head_sshd
        try:
            yield head
        finally:
            head.stop()


_counter = iter(range(10 ** 6))


def known_batch(lab, tmp_path, jobs=1):
    """A finished batch of trivial jobs, added by dalice who pulls it: the head knows it, so it serves
    whatever is in its archive folder."""
    name = f"crafted{next(_counter)}"
    folder = tmp_path / name
    folder.mkdir()
    (folder / "distribute-jobs.yaml").write_text(
        f"meta: {{batch_name: {name}, namespace: lab}}\nshell:\n  jobs:\n"
        + "".join(f"    - {{name: seed_{i}, command: 'true'}}\n" for i in range(jobs)))
    lab.remote("add", folder / "distribute-jobs.yaml")
    lab.wait_batch(f"lab/{name}")
    return f"lab/{name}", lab.archive / "lab" / name


def write_file(path, data, mode=0o644, mtime=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def tree(folder):
    """{relative path: (sha256, mode, mtime)} of every regular file under folder."""
    found = {}
    for top, _, names in os.walk(folder):
        for name in names:
            path = Path(top, name)
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                found[str(path.relative_to(folder))] = (hashlib.sha256(path.read_bytes()).hexdigest(),
                                                       stat.S_IMODE(info.st_mode), int(info.st_mtime))
    return found


def partial_files(folder):
    return [str(p) for p in Path(folder).rglob(f"*{distribute.PART_SUFFIX}")]


# --- a real batch: nested trees, filters, excludes, --where -----------------------------

SAVER = textwrap.dedent("""\
    import json, os
    x = {x}
    os.makedirs("distribute_save/fields/deep", exist_ok=True)
    open("distribute_save/summary.csv", "w").write("x,y\\n%d,%d\\n" % (x, x * x))
    open("distribute_save/fields/probe.csv", "w").write("t,p\\n0,%d\\n" % x)
    open("distribute_save/fields/deep/flow.vtk", "wb").write(os.urandom(3000 + x))
    os.chmod("distribute_save/fields/deep/flow.vtk", 0o600)
    print("saved", x)
    """)


@pytest.fixture(scope="module")
def sweep(lab, tmp_path_factory):
    """A real batch through the head: 4 python jobs (params x=0..3) saving nested csv and vtk trees."""
    folder = tmp_path_factory.mktemp("sweep")
    (folder / "build.py").write_text("print('nothing to build')\n")
    lines = ["meta: {batch_name: sweep, namespace: lab}", "python:", "  initialize:", "    build_file: build.py",
             "  jobs:"]
    for x in range(4):
        (folder / f"job_{x}.py").write_text(SAVER.format(x=x))
        lines += [f"    - name: job_{x}", f"      file: job_{x}.py", f"      params: {{x: {x}}}"]
    (folder / "distribute-jobs.yaml").write_text("\n".join(lines) + "\n")
    lab.remote("add", folder / "distribute-jobs.yaml")
    batch = lab.wait_batch("lab/sweep")
    assert batch["jobs"]["done"] == 4, batch
    return lab.archive / "lab" / "sweep"


def pulled_paths(save_dir):
    return sorted(tree(Path(save_dir) / "lab" / "sweep"))


def test_pull_everything_keeps_modes_and_mtimes(lab, sweep, tmp_path):
    summary = lab.pull_json("lab/sweep", tmp_path / "all")
    archived = tree(sweep)
    assert set(p.split("/")[0] for p in archived) == {"build", "job_0", "job_1", "job_2", "job_3"}
    assert tree(tmp_path / "all" / "lab" / "sweep") == archived      # contents, modes, mtimes
    assert archived["job_2/fields/deep/flow.vtk"][1] == 0o600
    assert summary["files"] == len(archived) and summary["unfinished_jobs"] == 0
    assert summary["destination"] == str(tmp_path / "all" / "lab" / "sweep")
    assert summary["transferred"] >= sum(p.stat().st_size for p in sweep.rglob("*") if p.is_file())
    assert partial_files(tmp_path / "all") == []
    # on the head machine itself, through the socket (`--head local`), the same
    lab.local("pull", "--batch", "lab/sweep", "--save-dir", tmp_path / "here")
    assert tree(tmp_path / "here" / "lab" / "sweep") == archived


def test_filters_are_ored_then_excludes_drop(lab, sweep, tmp_path):
    lab.remote("pull", "--batch", "lab/sweep", "--save-dir", tmp_path / "csv", "--filter", r"\.csv$")
    assert pulled_paths(tmp_path / "csv") == sorted(f"job_{x}/{f}" for x in range(4)
                                                    for f in ("summary.csv", "fields/probe.csv"))

    lab.remote("pull", "--batch", "lab/sweep", "--save-dir", tmp_path / "novtk", "--exclude", "vtk")
    got = pulled_paths(tmp_path / "novtk")
    assert not [p for p in got if "vtk" in p]
    assert "job_3/stdout.txt" in got and "job_3/job.json" in got and "job_3/fields/probe.csv" in got

    lab.remote("pull", "--batch", "lab/sweep", "--save-dir", tmp_path / "nojob1", "--exclude", "^job_1/")
    got = pulled_paths(tmp_path / "nojob1")
    assert not [p for p in got if p.startswith("job_1/")]
    assert {p.split("/")[0] for p in got} == {"build", "job_0", "job_2", "job_3"}

    lab.remote("pull", "--batch", "lab/sweep", "--save-dir", tmp_path / "mixed",
               "--filter", r"probe\.csv$", "--filter", r"\.vtk$", "--exclude", "^job_0/", "--exclude", "job_3")
    assert pulled_paths(tmp_path / "mixed") == sorted(f"job_{x}/fields/{f}" for x in (1, 2)
                                                      for f in ("probe.csv", "deep/flow.vtk"))


def test_where_selects_jobs_by_their_params(lab, sweep, tmp_path):
    summary = lab.pull_json("lab/sweep", tmp_path / "w", "--where", "x>=2", "--filter", "csv")
    assert pulled_paths(tmp_path / "w") == sorted(f"job_{x}/{f}" for x in (2, 3)
                                                  for f in ("summary.csv", "fields/probe.csv"))
    assert summary["files"] == 4
    assert tree(tmp_path / "w" / "lab" / "sweep")["job_3/summary.csv"][0] == \
        hashlib.sha256(b"x,y\n3,9\n").hexdigest()


@pytest.mark.parametrize("option, value", [("--filter", "fields/(deep"), ("--exclude", "*.vtk"),
                                           ("--where", "x >= ")])
def test_bad_selection_is_one_line_exit_2(lab, sweep, tmp_path, option, value):
    result = lab.remote("pull", "--batch", "lab/sweep", "--save-dir", tmp_path / "bad", option, value, check=False)
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr and option in result.stderr
    assert not (tmp_path / "bad").exists()


def test_unknown_batch_is_a_clear_error(lab, tmp_path):
    result = lab.remote("pull", "--batch", "lab/nosuchbatch", "--save-dir", tmp_path / "x", check=False)
    assert result.returncode in (1, 2) and len(result.stderr.strip().splitlines()) == 1, result
    assert "nosuchbatch" in result.stderr and not (tmp_path / "x").exists()


def test_dry_lists_sizes_and_total_and_writes_nothing(lab, sweep, tmp_path):
    save = tmp_path / "never"
    result = lab.remote("pull", "--batch", "lab/sweep", "--save-dir", save, "--dry", "--filter", "vtk")
    assert not save.exists()
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 5, result.stdout
    for x, line in enumerate(lines[:4]):
        assert line.split()[-1] == f"job_{x}/fields/deep/flow.vtk"
        assert "KiB" in line
    assert lines[-1].startswith("4 files, ") and "would come" in lines[-1]
    summary = lab.pull_json("lab/sweep", save, "--dry", "--filter", "vtk")
    assert not save.exists()
    assert summary["bytes"] == sum(3000 + x for x in range(4))
    assert [e["size"] for e in summary["would_transfer"]] == [3000 + x for x in range(4)]


# --- incremental pulls on a crafted archive ---------------------------------------------

def test_second_pull_sends_nothing_and_changes_are_found(lab, tmp_path):
    key, root = known_batch(lab, tmp_path)
    old = time.time() - 86400
    write_file(root / "a" / "same_size.bin", b"A" * 5000, 0o640, old)
    write_file(root / "a" / "touched.bin", b"T" * 7000, 0o644, old)
    write_file(root / "b" / "deep" / "x.dat", os.urandom(100_000), 0o755, old)
    write_file(root / "b" / ("long_name_" * 12 + ".txt"), b"long", 0o600, old)     # > 100 bytes: a PAX header
    write_file(root / "b" / "ünïcödé.txt", b"utf-8", 0o644, old)
    save = tmp_path / "save"
    first = lab.pull_json(key, save)
    dest = save / key
    assert tree(dest) == tree(root)
    assert first["transferred"] > 112_000 and first["files"] == 8

    second = lab.pull_json(key, save)
    assert second["transferred"] == 0 and second["bytes"] == 0
    assert second["up_to_date"] == second["files"] == first["files"]

    # same size, other content, other mtime: re-sent
    write_file(root / "a" / "same_size.bin", b"B" * 5000, 0o640, old + 10)
    # same content, touched: only its mtime is fixed, no bytes come
    os.utime(root / "a" / "touched.bin", (old + 20, old + 20))
    third = lab.pull_json(key, save)
    assert tree(dest) == tree(root)
    assert (dest / "a" / "same_size.bin").read_bytes() == b"B" * 5000
    assert int((dest / "a" / "touched.bin").stat().st_mtime) == int(old + 20)
    assert 5000 < third["transferred"] < 7000 + 5000, third
    assert third["up_to_date"] == third["files"] - 1

    # a local file that is gone or of another size comes again
    (dest / "b" / "deep" / "x.dat").unlink()
    (dest / "a" / "touched.bin").write_bytes(b"short")
    fourth = lab.pull_json(key, save)
    assert tree(dest) == tree(root)
    assert fourth["transferred"] > 107_000 and fourth["up_to_date"] == fourth["files"] - 2


def test_killed_pull_resumes_to_identical_files(lab, tmp_path):
    key, root = known_batch(lab, tmp_path)
    for i in range(20):
        write_file(root / "a_small" / f"f{i}.txt", os.urandom(1000 + i))
    big = root / "b_big" / "flow.bin"
    big.parent.mkdir()
    with open(big, "wb") as out:
        for _ in range(200):
            out.write(os.urandom(1 << 20))
    save = tmp_path / "save"
    part = save / key / "b_big" / f".flow.bin{distribute.PART_SUFFIX}"
    client = subprocess.Popen(lab.remote_argv("pull", "--batch", key, "--save-dir", save),
                              env=lab.client_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: client.poll() is not None or (part.exists() and part.stat().st_size > (8 << 20)),
                   60, "the big file to be halfway")
        client.send_signal(signal.SIGKILL)
    finally:
        client.wait()
    assert client.returncode == -signal.SIGKILL, client.stderr.read()
    assert not (save / key / "b_big" / "flow.bin").exists()        # never a partial file under its name
    assert part.exists() and part.stat().st_size < big.stat().st_size
    assert len(tree(save / key / "a_small")) == 20                   # those had arrived whole

    resumed = lab.pull_json(key, save)
    assert resumed["up_to_date"] >= 20                              # not sent again
    assert big.stat().st_size <= resumed["transferred"] < big.stat().st_size + (1 << 20)
    assert tree(save / key) == tree(root)
    assert partial_files(save) == []
    assert lab.batch(key)["state"] != "active"                      # the head lived through it


def test_pull_while_the_batch_runs_says_how_many_are_unfinished(lab, tmp_path):
    folder = tmp_path / "running"
    folder.mkdir()
    (folder / "distribute-jobs.yaml").write_text(textwrap.dedent("""\
        meta: {batch_name: running, namespace: lab}
        shell:
          jobs:
            - {name: quick, command: 'echo done > distribute_save/out.txt'}
            - {name: slow_1, command: 'sleep 120'}
            - {name: slow_2, command: 'sleep 120'}
        """))
    lab.remote("add", folder / "distribute-jobs.yaml")
    try:
        out = lab.archive / "lab" / "running" / "quick" / "out.txt"
        wait_until(lambda: out.exists(), 60, "the quick job's result")
        summary = lab.pull_json("lab/running", tmp_path / "s")
        assert summary["unfinished_jobs"] == 2
        assert (tmp_path / "s" / "lab" / "running" / "quick" / "out.txt").read_text() == "done\n"
        text = lab.remote("pull", "--batch", "lab/running", "--save-dir", tmp_path / "t").stdout
        assert "2 jobs are not finished yet" in text
    finally:
        lab.local("kill", "lab/running")
        lab.wait_batch("lab/running")


# --- nothing outside the archive, nothing outside the save dir ---------------------------

def test_symlinks_in_the_archive_are_never_followed(lab, tmp_path):
    key, root = known_batch(lab, tmp_path)
    outside = tmp_path / "secret"
    write_file(outside / "x", b"SECRET-OUTSIDE")
    write_file(root / "job_a" / "ok.txt", b"fine")
    os.symlink("/etc/passwd", root / "job_a" / "passwd")
    os.symlink("../../x", root / "job_a" / "up")
    os.symlink(str(outside), root / "job_a" / "linked_dir")
    os.symlink(str(outside), root / "job_link")
    summary = lab.pull_json(key, tmp_path / "save")
    assert sorted(tree(tmp_path / "save" / key)) == ["build/local.txt", "job_a/ok.txt", "seed_0/job.json",
                                                            "seed_0/stdout.txt"]
    assert summary["files"] == 4
    got = [str(p.relative_to(tmp_path / "save")) for p in (tmp_path / "save").rglob("*")]
    assert not [p for p in got if "passwd" in p or "up" in p.split("/") or "linked" in p or "job_link" in p]

    # a client asking by name for what the manifest never listed gets none of it
    probe = textwrap.dedent(f"""\
        import asyncio, io, json, sys
        sys.path.insert(0, {str(ROOT)!r})
        import distribute
        async def ask(path):
            client = distribute.HeadClient("head", {str(lab.socket)!r})
            channel = await client.open()
            reply, _ = await channel.request({{"op": "pull_files", "batch": {key!r}, "paths": [path], "hashes": {{}}}})
            data = b""
            if reply.get("ok"):
                while True:
                    chunk = await channel.reader.read(1 << 16)
                    if not chunk:
                        break
                    data += chunk
            channel.close()
            await client.close()
            return reply, data
        out = {{}}
        for path in sys.argv[1:]:
            reply, data = asyncio.run(ask(path))
            out[path] = [reply.get("ok"), data.decode("latin-1")]
        print(json.dumps(out))
        """)
    asked = ["job_a/passwd", "job_a/up", "job_a/linked_dir/x", "job_link/x", "../../../etc/passwd", "/etc/passwd"]
    result = subprocess.run([sys.executable, "-c", probe] + asked, env=lab.client_env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    answers = json.loads(result.stdout)
    for path in asked:
        ok, data = answers[path]
        assert "SECRET-OUTSIDE" not in data and "root:x:0:0" not in data, path
        if ok and data:
            with tarfile.open(fileobj=io.BytesIO(data.encode("latin-1")), mode="r|") as tar:
                assert [m.name for m in tar] == [], path
    assert lab.proc.poll() is None


def tar_with(*members):
    """An in-memory tar of (TarInfo, data-or-None) pairs."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.addfile(info)
    return buffer.getvalue()


def entry(name, kind=tarfile.REGTYPE, linkname="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, linkname, mode, 1_600_000_000
    return info


UNSAFE = {
    "dotdot": [(entry("../escaped.txt"), b"x")],
    "dotdot_inside": [(entry("job/../../escaped.txt"), b"x")],
    "absolute": [(entry("/tmp/escaped-by-tar.txt"), b"x")],
    "symlink_absolute": [(entry("job/link", tarfile.SYMTYPE, "/etc/passwd"), None)],
    "symlink_up": [(entry("job/link", tarfile.SYMTYPE, "../../x"), None)],
    "symlink_then_write_through": [(entry("job", tarfile.SYMTYPE, ".."), None),
                                   (entry("job/escaped.txt"), b"x")],
    "hardlink": [(entry("job/hard", tarfile.LNKTYPE, "/etc/passwd"), None)],
    "char_device": [(entry("job/null", tarfile.CHRTYPE), None)],
    "block_device": [(entry("job/sda", tarfile.BLKTYPE), None)],
    "fifo": [(entry("job/pipe", tarfile.FIFOTYPE), None)],
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_extract_refuses_entries_that_escape(case, tmp_path):
    dest = tmp_path / "save" / "ns" / "batch"
    data = tar_with(*UNSAFE[case])
    with pytest.raises(distribute.UnsafeArchive):
        distribute.extract_tar(io.BytesIO(data), dest)
    assert not (tmp_path / "save" / "ns" / "escaped.txt").exists()
    assert not (tmp_path / "save" / "escaped.txt").exists()
    assert not Path("/tmp/escaped-by-tar.txt").exists()
    landed = [p for p in dest.rglob("*")] if dest.exists() else []
    assert not [p for p in landed if p.is_symlink() or not (p.is_dir() or p.is_file())], landed


def test_extract_refuses_writing_through_a_local_symlink_pointing_out(tmp_path):
    dest = tmp_path / "save"
    (dest).mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(str(tmp_path / "elsewhere"), dest / "job")
    with pytest.raises(distribute.UnsafeArchive):
        distribute.extract_tar(io.BytesIO(tar_with((entry("job/x.txt"), b"x"))), dest)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_extract_lands_files_with_mode_and_mtime(tmp_path):
    data = tar_with((entry("job/a/b.txt", mode=0o600), b"hello"), (entry("job/c.txt", mode=0o755), b""))
    assert distribute.extract_tar(io.BytesIO(data), tmp_path / "d") == 5
    info = (tmp_path / "d" / "job" / "a" / "b.txt").stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and int(info.st_mtime) == 1_600_000_000
    assert stat.S_IMODE((tmp_path / "d" / "job" / "c.txt").stat().st_mode) == 0o755
    assert partial_files(tmp_path) == []


def test_truncated_stream_leaves_no_file_under_its_name(tmp_path):
    data = tar_with((entry("job/whole.txt"), b"w" * 100), (entry("job/cut.bin"), os.urandom(100_000)))
    with pytest.raises(distribute.ProtocolError):       # what node transfers retry on
        distribute.extract_tar(io.BytesIO(data[:60_000]), tmp_path / "d")
    assert (tmp_path / "d" / "job" / "whole.txt").read_bytes() == b"w" * 100
    assert not (tmp_path / "d" / "job" / "cut.bin").exists()
    assert partial_files(tmp_path) == []


# --- progress bar -----------------------------------------------------------------------

def run_in_pty(argv, env):
    """Run argv with stdout and stderr on a pseudo-terminal; return (exit code, what it printed)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:         # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=60), output.decode(errors="replace")


def test_progress_bar_on_a_terminal_only(lab, tmp_path):
    key, root = known_batch(lab, tmp_path)
    write_file(root / "job" / "data.bin", os.urandom(40 << 20))
    code, shown = run_in_pty(lab.remote_argv("pull", "--batch", key, "--save-dir", tmp_path / "tty"), lab.client_env)
    assert code == 0, shown
    assert "/s" in shown and "ETA" in shown and "MiB" in shown and "\r" in shown, shown
    assert tree(tmp_path / "tty" / key) == tree(root)

    quiet = lab.remote("pull", "--batch", key, "--save-dir", tmp_path / "pipe")
    assert "ETA" not in quiet.stderr and "/s" not in quiet.stderr and "\r" not in quiet.stderr
    assert quiet.stderr == ""
    assert tree(tmp_path / "pipe" / key) == tree(root)


def test_receiving_stops_at_a_refused_entry_instead_of_hanging(tmp_path):
    """The extractor refuses the first entry while megabytes are still coming: the
    receiver must stop with that error, not block forever on a full pipe."""
    import asyncio
    import types
    data = tar_with((entry("../escaped.bin"), os.urandom(8 << 20)), (entry("job/ok.txt"), b"fine"))

    async def receive():
        reader = asyncio.StreamReader(limit=1 << 26)
        reader.feed_data(data)
        reader.feed_eof()
        channel = types.SimpleNamespace(reader=reader)
        await asyncio.wait_for(distribute.receive_tar_stream(channel, tmp_path / "d", distribute.Progress(len(data), False)),
                               30)
    with pytest.raises(distribute.UnsafeArchive):
        asyncio.run(receive())
    assert not (tmp_path / "escaped.bin").exists() and partial_files(tmp_path) == []


@pytest.mark.parametrize("name, size, mtime, mode", [("a/b.txt", 0, 0, 0o644), ("x" * 100, 8 ** 11 - 1, 8 ** 11 - 1, 0o777),
                                                     ("small/d01/f00001.dat", 4096, 1_795_382_390, 0o600)])
def test_fast_tar_header_is_the_one_tarfile_writes(name, size, mtime, mode):
    member = tarfile.TarInfo(name)
    member.size, member.mtime, member.mode = size, mtime, mode
    assert distribute.ustar_header(name, size, mtime, mode) == member.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    assert distribute.ustar_header("y" * 101, 1, 1, 0o644) is None and distribute.ustar_header("é", 1, 1, 0o644) is None


# --- the tar reader of our own (issue 16): exactly the tree, and every hostile entry refused ---

def test_many_files_in_nested_folders_arrive_exactly(lab, tmp_path):
    """A pull of many files (sizes around the 512-byte blocks and the 1 MiB reads, modes, long and
    non-ASCII names, a file sent by sendfile, long runs of zeros) yields the archive's tree exactly:
    the same paths, bytes, modes and mtimes, over SSH and on the head's machine."""
    key, root = known_batch(lab, tmp_path)
    sizes = [0, 1, 511, 512, 513, 4095, 4096, 4097, 65_536, 300_000]
    modes = [0o644, 0o600, 0o755, 0o640, 0o444, 0o666, 0o664]
    count = 0
    for depth in range(1, 5):
        folder = root.joinpath(*[f"level{d}" for d in range(depth)])
        for i in range(60):
            size = sizes[i % len(sizes)]
            write_file(folder / f"f{i:03d}.dat", os.urandom(size), modes[i % len(modes)], 1_700_000_000 + i)
            count += 1
    write_file(root / "names" / ("n" * 150 + ".txt"), b"a long name", 0o600, 1_600_000_000)     # a PAX header
    write_file(root / "names" / "δεδομένα ünïcödé.csv", b"x,y\n", 0o644, 1_600_000_001)
    zeros = bytearray(3 << 20)
    zeros[:5] = b"start"
    zeros[-3:] = b"end"
    write_file(root / "sparse" / "mostly_zero.bin", bytes(zeros), 0o640, 1_600_000_002)   # holes on arrival
    expected = tree(root)
    assert len(expected) == count + 3 + 3          # the seed job's stdout/job.json and build log too

    summary = lab.pull_json(key, tmp_path / "ssh")
    assert summary["files"] == len(expected)
    assert tree(tmp_path / "ssh" / key) == expected
    assert partial_files(tmp_path / "ssh") == []
    assert (tmp_path / "ssh" / key / "sparse" / "mostly_zero.bin").stat().st_blocks * 512 < 1 << 20
    lab.local("pull", "--batch", key, "--save-dir", tmp_path / "here")
    assert tree(tmp_path / "here" / key) == expected

    # the same tree through the asyncssh carrier (no `ssh`): the stream goes through a pipe there
    env = dict(lab.client_env, DISTRIBUTE_SSH="asyncssh")
    lab.cli("pull", "--batch", key, "--save-dir", tmp_path / "asyncssh", env=env, head="head")
    assert tree(tmp_path / "asyncssh" / key) == expected


def raw_header(name=b"job/x.txt", size=0, kind=b"0", link=b"", mode=0o644, prefix=b"", size_field=None):
    """A ustar header block made by hand (tarfile refuses to write some of what a hostile peer may)."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"%07o\0" % mode
    block[108:124] = b"0000000\x000000000\0"
    block[124:136] = size_field or b"%011o\0" % size
    block[136:148] = b"%011o\0" % 1_600_000_000
    block[156:157] = kind
    block[157:157 + len(link)] = link
    block[257:265] = b"ustar\x0000"
    block[345:345 + len(prefix)] = prefix
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_header(records):
    body = b""
    for key, value in records.items():
        line = b" %s=%s\n" % (key, value)
        length = len(line)
        while len(b"%d" % length) + len(line) != length:
            length = len(b"%d" % length) + len(line)
        body += b"%d%s" % (length, line)
    return raw_header(b"PaxHeader", len(body), b"x") + body + bytes(-len(body) % 512)


def with_data(header, data=b""):
    return header + data + bytes(-len(data) % 512)


END = bytes(1024)
HOSTILE = {
    "pax_path_escapes": (pax_header({b"path": b"../../escaped.txt"}) + with_data(raw_header(size=1), b"x") + END,
                         distribute.UnsafeArchive, "escapes its folder"),
    "pax_path_absolute": (pax_header({b"path": b"/tmp/escaped-by-tar.txt"}) + with_data(raw_header(size=1), b"x") + END,
                          distribute.UnsafeArchive, "escapes its folder"),
    "gnu_long_name_escapes": (with_data(raw_header(b"././@LongLink", 15, b"L"), b"../escaped.txt\0")
                              + with_data(raw_header(size=1), b"x") + END, distribute.UnsafeArchive, "escapes"),
    "prefix_escapes": (with_data(raw_header(b"escaped.txt", 1, prefix=b".."), b"x") + END,
                       distribute.UnsafeArchive, "escapes its folder"),
    "pax_linkpath_out": (pax_header({b"linkpath": b"/etc/passwd"}) + raw_header(b"job/link", 0, b"2", b"ok") + END,
                         distribute.UnsafeArchive, "points outside"),
    "nul_in_name": (pax_header({b"path": b"job/a\0b"}) + with_data(raw_header(size=1), b"x") + END,
                    distribute.UnsafeArchive, "escapes its folder"),
    "hardlink": (raw_header(b"job/hard", 0, b"1", b"job/x.txt") + END, distribute.UnsafeArchive, "not a regular file"),
    "fifo": (raw_header(b"job/pipe", 0, b"6") + END, distribute.UnsafeArchive, "not a regular file"),
    "unknown_type": (raw_header(b"job/v", 0, b"V") + END, distribute.UnsafeArchive, "not a regular file"),
    "global_header": (raw_header(b"pax_global_header", 0, b"g") + END, distribute.UnsafeArchive, "global"),
    "sparse_pax": (pax_header({b"GNU.sparse.size": b"1000000"}) + with_data(raw_header(size=1), b"x") + END,
                   distribute.UnsafeArchive, "sparse"),
    "huge_pax_header": (raw_header(b"PaxHeader", 64 << 20, b"x") + END, distribute.ProtocolError, "header of"),
    "bad_checksum": (raw_header()[:148] + b"0000000\0" + raw_header()[156:] + END, distribute.ProtocolError, "checksum"),
    "bad_size": (raw_header(size_field=b"zzzzzzzzzzz\0") + END, distribute.ProtocolError, "bad size"),
    "negative_size": (raw_header(size_field=b"-0000000001\0") + END, distribute.ProtocolError, "bad size"),
    "malformed_pax": (raw_header(b"PaxHeader", 11, b"x") + with_data(b"", b"99 path=x\n\n") + END,
                      distribute.ProtocolError, "pax header"),
    "cut_in_data": (raw_header(size=100_000) + os.urandom(1000), distribute.ProtocolError, "ended early"),
    "cut_in_header": (raw_header()[:300], distribute.ProtocolError, "ended early"),
    "no_end_marker": (with_data(raw_header(size=1), b"x"), distribute.ProtocolError, "ended early"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_tar_reader_refuses_hostile_entries_with_one_clear_line(case, tmp_path):
    data, error, words = HOSTILE[case]
    dest = tmp_path / "save" / "ns" / "batch"
    for source in (data, io.BytesIO(data)):        # in memory (node results) and as a stream (pull)
        with pytest.raises(error) as raised:
            distribute.extract_tar(source, dest)
        message = str(raised.value)
        assert words in message and "\n" not in message and len(message) < 300, message
    assert not (tmp_path / "save" / "escaped.txt").exists() and not (tmp_path / "save" / "ns" / "escaped.txt").exists()
    assert not Path("/tmp/escaped-by-tar.txt").exists()
    landed = list(dest.rglob("*"))
    assert not [p for p in landed if p.is_symlink() or not (p.is_dir() or p.is_file())], landed
    assert partial_files(tmp_path) == []


def test_tar_reader_reads_what_tarfile_writes(tmp_path):
    """Members as tarfile writes them (pax for long, non-ASCII and big-number fields, GNU long
    names, an old-style folder), across reads of every size: the same files, modes and mtimes."""
    members = [(entry("job/" + "x" * 120 + ".txt"), b"long"), (entry("job/ünï.txt", mode=0o600), b"utf"),
               (entry("job/empty"), b""), (entry("job/sub", tarfile.DIRTYPE, mode=0o755), None),
               (entry("job/sub/link", tarfile.SYMTYPE, "../empty"), None),
               (entry("job/sub/data.bin", mode=0o640), os.urandom(70_000))]
    data = tar_with(*members)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = entry("gnu/" + "y" * 150)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"gnu"))
    gnu = buffer.getvalue()

    class Trickle:
        """Hands out a few bytes per read: headers and data split at every odd place."""
        def __init__(self, data, step):
            self.data, self.step, self.pos = data, step, 0

        def read(self, size):
            piece = self.data[self.pos:self.pos + min(size, self.step)]
            self.pos += len(piece)
            return piece
    for step in (1, 100, 511, 513, 1 << 20):
        dest = tmp_path / f"d{step}"
        assert distribute.extract_tar(Trickle(data, step), dest) == 4 + 3 + 70_000
        assert (dest / "job" / ("x" * 120 + ".txt")).read_bytes() == b"long"
        info = (dest / "job" / "ünï.txt").stat()
        assert (dest / "job" / "ünï.txt").read_bytes() == b"utf" and stat.S_IMODE(info.st_mode) == 0o600
        assert int(info.st_mtime) == 1_600_000_000
        assert os.readlink(dest / "job" / "sub" / "link") == "../empty"
        assert (dest / "job" / "sub" / "data.bin").read_bytes() == members[-1][1]
        assert stat.S_IMODE((dest / "job" / "sub" / "data.bin").stat().st_mode) == 0o640
        assert distribute.extract_tar(Trickle(gnu, step), dest) == 3
        assert (dest / "gnu" / ("y" * 150)).read_bytes() == b"gnu"
    assert partial_files(tmp_path) == []


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_landed_modes_are_the_archived_ones_whatever_the_umask(umask, tmp_path):
    modes = [0o644, 0o600, 0o755, 0o666, 0o664, 0o444, 0o700, 0o640]
    data = tar_with(*[(entry(f"job/m{mode:o}.txt", mode=mode), b"x") for mode in modes])
    old = os.umask(umask)
    try:
        distribute.extract_tar(data, tmp_path / "d")
    finally:
        os.umask(old)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "d" / "job").iterdir()} == \
        {f"m{mode:o}.txt": mode for mode in modes}


def test_a_head_without_pull_all_still_serves_a_first_pull(tmp_path):
    """A new client asks a head from before pull_all: the head says it does not know the request,
    and the client pulls the usual way (manifest, then the files it names)."""
    import asyncio
    archive = tmp_path / "archive"
    write_file(archive / "job" / "out.txt", b"result\n", 0o640, 1_650_000_000)
    asked = []

    async def serve(reader, writer):
        channel = distribute.Channel(reader, writer)
        header, _ = await channel.receive()
        asked.append(header["op"])
        if header["op"] == "pull":
            await channel.send({"ok": True, "batch": "lab/old", "unfinished": 0,
                                "files": distribute.archive_manifest(archive, distribute.PullSelection.of(header))})
        elif header["op"] == "pull_files":
            await channel.send({"ok": True, "same": [], "stream": True})
            await distribute.send_archive_tar(writer, archive, header["paths"])
            writer.write_eof()
        else:
            await channel.send({"ok": False, "error": f"unknown request {header['op']!r}", "code": 2})
        await writer.drain()
        writer.close()

    async def main():
        path = str(tmp_path / "old-head.sock")
        server = await asyncio.start_unix_server(serve, path)
        async with server:
            client = distribute.HeadClient("local", path)
            return await distribute.pull_batch(client, "lab/old", distribute.PullSelection([], [], None),
                                               tmp_path / "save", False, False)
    summary = asyncio.run(main())
    assert asked == ["pull_all", "pull", "pull_files"]
    assert tree(tmp_path / "save" / "lab" / "old") == tree(archive)
    assert summary["files"] == 1 and summary["transferred"] > 0


# --- the client's SSH: OpenSSH's `ssh` kept for a while, asyncssh without it (issue 16) ---

def forward_dir(home_path):
    return Path(home_path) / ".cache" / "distribute-ssh"


def master_pid(env):
    """The pid of the OpenSSH master this client home keeps, from `ssh -O check`."""
    controls = list(forward_dir(env["HOME"]).glob("*.ctl"))
    assert len(controls) == 1, controls
    check = subprocess.run(["ssh", "-o", f"ControlPath={controls[0]}", "-O", "check", "head"],
                           env=env, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    return int(check.stderr.split("pid=")[1].split(")")[0])


def test_client_commands_share_one_private_openssh_connection(lab, tmp_path):
    key, root = known_batch(lab, tmp_path)
    write_file(root / "job" / "data.bin", os.urandom(3 << 20))
    assert lab.pull_json(key, tmp_path / "save")["transferred"] > 3 << 20
    assert tree(tmp_path / "save" / key) == tree(root)
    first = master_pid(lab.client_env)
    assert json.loads(lab.remote("status", "--all", "--json").stdout)["batches"]
    assert master_pid(lab.client_env) == first                  # no second login: the same master
    folder = forward_dir(lab.client_env["HOME"])
    assert stat.S_IMODE(folder.lstat().st_mode) == 0o700
    sockets = [p for p in folder.iterdir() if stat.S_ISSOCK(p.lstat().st_mode)]
    assert len(sockets) == 2                                   # the control socket, the forwarded one
    for path in sockets:
        assert stat.S_IMODE(path.lstat().st_mode) & 0o077 == 0, path

    # the master gone (idle timeout, reboot): the next command starts a new one
    os.kill(first, signal.SIGTERM)
    wait_until(lambda: not psutil_alive(first), 30, "the old master to exit")
    assert json.loads(lab.remote("status", "--all", "--json").stdout)["batches"]
    assert master_pid(lab.client_env) != first


def psutil_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as handle:
        return handle.read().split(") ")[1][0] != "Z"


def no_ssh_path(tmp_path):
    """A PATH without `ssh` (the client needs nothing else from PATH)."""
    folder = tmp_path / "bin-without-ssh"
    folder.mkdir(exist_ok=True)
    return str(folder)


@pytest.mark.parametrize("configured, expected", [
    (None, ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"]),          # ssh's default set, reordered
    ("aes256-ctr,aes128-gcm@openssh.com", ["aes128-gcm@openssh.com", "aes256-ctr"]),
    ("chacha20-poly1305@openssh.com,aes256-ctr", None),                      # no AES-GCM allowed: left alone
])
def test_the_kept_connection_offers_aes_gcm_first_within_the_users_ciphers(configured, expected, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    monkeypatch.setattr(distribute, "cpu_has_aes", lambda: True)
    forward = distribute.OpenSshForward(shutil.which("ssh"), "head.example", "dalice", 2222, "/run/head.sock")
    config = tmp_path / "config"
    config.write_text(f"Host *\n  Ciphers {configured}\n" if configured else "")
    forward.config = str(config)
    ciphers = forward.ciphers()
    if expected is None:
        assert ciphers is None
    else:
        assert ciphers[:len(expected)] == expected
        offered = subprocess.run(["ssh", "-F", str(config), "-G", "head.example"], capture_output=True,
                                 text=True).stdout.split("ciphers ")[1].split()[0].split(",")
        assert sorted(ciphers) == sorted(offered)                           # the same set, another order
        assert "Ciphers=" + ",".join(ciphers) in " ".join(forward.master_argv(ciphers))
    monkeypatch.setattr(distribute, "cpu_has_aes", lambda: False)
    assert forward.ciphers() is None


@pytest.mark.parametrize("carrier", ["openssh", "asyncssh"])
def test_unknown_host_key_is_refused_with_one_line(lab, tmp_path, carrier):
    with sshd_lib.SshClientHome("stranger") as stranger:
        stranger.add_host("head", lab.sshd, "dalice")
        stranger.known_hosts.write_text("")                   # never saw the head's key
        env = stranger.env(**({"PATH": no_ssh_path(tmp_path)} if carrier == "asyncssh" else {}))
        result = subprocess.run(lab.remote_argv("status"), env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr.startswith("distribute: the head head's SSH host key is unknown to this machine")
        assert f"{stranger.path}/.ssh/known_hosts" in result.stderr and "ssh-keyscan" in result.stderr
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
        assert not list(forward_dir(stranger.path).glob("*.ctl"))     # no connection kept


def test_without_ssh_on_path_asyncssh_carries_pull_and_status(lab, tmp_path):
    key, root = known_batch(lab, tmp_path)
    write_file(root / "job" / "data.bin", os.urandom(2 << 20))
    with sshd_lib.SshClientHome("laptop") as laptop:
        laptop.add_host("head", lab.sshd, "dalice")
        env = laptop.env(PATH=no_ssh_path(tmp_path))
        pulled = subprocess.run(lab.remote_argv("pull", "--batch", key, "--save-dir", tmp_path / "save", "--json"),
                                env=env, capture_output=True, text=True, timeout=120)
        assert pulled.returncode == 0, pulled.stderr
        assert tree(tmp_path / "save" / key) == tree(root)
        status = subprocess.run(lab.remote_argv("status", "--all", "--json"), env=env, capture_output=True, text=True, timeout=60)
        assert key in status.stdout
        assert not forward_dir(laptop.path).exists()            # ssh never ran


def test_unreachable_head_socket_over_openssh_is_one_clear_line(lab):
    result = subprocess.run(DISTRIBUTE + ["--head", "head", "--socket", "/nonexistent/head.sock", "status"],
                            env=lab.client_env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith("distribute: no head is running at /nonexistent/head.sock on head: "
                                    "is `distribute serve` running?")
    assert len(result.stderr.splitlines()) == 1


def test_commands_started_together_share_one_new_master(lab):
    with sshd_lib.SshClientHome("eager") as eager:
        eager.add_host("head", lab.sshd, "dalice")
        env = eager.env()
        clients = [subprocess.Popen(lab.remote_argv("status", "--all", "--json"), env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for _ in range(4)]
        outputs = [client.communicate(timeout=120) for client in clients]
        assert [client.returncode for client in clients] == [0] * 4, outputs
        assert all("batches" in json.loads(out) for out, _ in outputs)
        pid = master_pid(env)                                   # exactly one control socket, one master
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not psutil_alive(pid), 30, "the master to exit")


def test_a_sparse_file_lands_sparse_however_the_stream_was_split(tmp_path):
    """Found in a full run: runs of zeros became holes only when a read happened to hand over a
    whole run, so the same 256 MiB sparse result took 9 MiB of disk one time and less another.
    Now every aligned block of zeros is a hole, whatever the sizes of the reads."""
    size = 32 << 20
    source = tmp_path / "sparse.bin"
    with open(source, "wb") as out:
        out.write(b"head")
        out.seek(size - 4)
        out.write(b"tail")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(str(source), arcname="sparse.bin")
    data = buffer.getvalue()

    class Split:
        def __init__(self, step):
            self.step, self.pos = step, 0

        def read(self, wanted):
            piece = data[self.pos:self.pos + min(wanted, self.step)]
            self.pos += len(piece)
            return piece
    for step in (65_537, 99_999, (1 << 20) + 7):
        dest = tmp_path / f"d{step}"
        distribute.extract_tar(Split(step), dest)
        landed = dest / "sparse.bin"
        info = landed.stat()
        assert info.st_size == size and info.st_blocks * 512 < 1 << 20, (step, info.st_blocks)
        with open(landed, "rb") as handle:
            assert handle.read(4) == b"head" and handle.read(size - 8) == bytes(size - 8)
            assert handle.read() == b"tail"


@pytest.mark.parametrize("how", ["o_direct", "flag_refused", "write_refused"])
def test_a_big_file_lands_byte_for_byte_and_sparse_around_the_page_cache(tmp_path, monkeypatch, how):
    """A received file of DIRECT_MIN or more is written with O_DIRECT (no copy into new
    page-cache pages: the head's CPU per GiB received); where the file system refuses the flag
    or a write with it, the usual way.  Either way every byte lands, the aligned blocks of zeros
    become holes, the odd-sized tail is kept, and a small file beside it is written as it comes.
    A client's pull (no `direct`) never asks for it."""
    import fcntl
    asked = []
    real, pwrite = distribute.direct_writes, os.pwrite

    def spy(fd, on):
        asked.append(on)
        return real(fd, on) if how != "flag_refused" else False

    def refusing_pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return pwrite(fd, data, offset)
    monkeypatch.setattr(distribute, "direct_writes", spy)
    monkeypatch.setattr(distribute, "file_system_type", lambda fd: "ext4")     # whatever /tmp is here
    if how == "write_refused":
        monkeypatch.setattr(os, "pwrite", refusing_pwrite)
    hole, rng = distribute.HOLE_MIN, os.urandom
    big = (bytes(3 * hole) + rng(5 * hole + 512) + bytes(2 * hole + 100) + rng(distribute.DIRECT_MIN)
           + bytes(16 * hole) + rng(1234) + bytes(4 * hole))        # zeros at both ends, odd offsets between
    small = rng(hole + 77)
    source = tmp_path / "src"
    source.mkdir()
    (source / "big.bin").write_bytes(big)
    (source / "small.bin").write_bytes(small)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("small.bin", "big.bin"):
            tar.add(str(source / name), arcname=name)
    dest = tmp_path / "dest"
    distribute.extract_tar(io.BufferedReader(io.BytesIO(buffer.getvalue()), 99_999), dest, direct=True)
    assert (dest / "big.bin").read_bytes() == big and (dest / "small.bin").read_bytes() == small
    assert (dest / "big.bin").stat().st_blocks * 512 <= len(big) - 20 * hole
    assert asked[:1] == [True] and len(asked) <= 2      # only the big file asked for it
    asked.clear()
    distribute.extract_tar(buffer.getvalue(), tmp_path / "pulled")         # a client's pull: page cache kept
    assert (tmp_path / "pulled" / "big.bin").read_bytes() == big and asked == []


def test_uploads_of_regular_files_and_results_with_links_both_land(tmp_path):
    """What a batch uploads (regular files under aliases) goes through TarWriter, big files by
    sendfile straight into the socket; a result with a link and a folder through tarfile.
    Either way every byte, mode and name arrives."""
    import asyncio
    import socket
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom((3 << 20) + 5))
    (src / "small.txt").write_text("hello\n")
    os.chmod(src / "small.txt", 0o751)
    (src / "link").symlink_to("small.txt")
    (src / "folder").mkdir()
    uploads = [("jobs/j0/input/data.bin", str(src / "big.bin")), ("shared/initial_files/s.txt", str(src / "small.txt"))]
    results = [("big.bin", str(src / "big.bin")), ("link", str(src / "link")), ("folder", str(src / "folder"))]

    async def send(entries, dest):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=a)
        receiver = asyncio.get_event_loop().run_in_executor(None, distribute.extract_then_close, b.makefile("rb"), dest)
        await distribute.send_tar_stream(writer, entries)
        writer.close()
        await receiver
        b.close()
    asyncio.run(send(uploads, tmp_path / "up"))
    assert (tmp_path / "up/jobs/j0/input/data.bin").read_bytes() == (src / "big.bin").read_bytes()
    assert (tmp_path / "up/shared/initial_files/s.txt").read_text() == "hello\n"
    assert stat.S_IMODE((tmp_path / "up/shared/initial_files/s.txt").stat().st_mode) == 0o751
    asyncio.run(send(results, tmp_path / "res"))
    assert os.readlink(tmp_path / "res/link") == "small.txt" and (tmp_path / "res/folder").is_dir()
    assert (tmp_path / "res/big.bin").read_bytes() == (src / "big.bin").read_bytes()    # more than a socket holds


def test_a_sender_cancelled_while_its_receiver_stalls_ends_its_thread(tmp_path):
    """The thread writing a tar straight into a socket would wait for ever on a receiver that
    stopped reading; cancelling the send shuts the socket down, so the thread ends."""
    import asyncio
    import socket
    import threading
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(8 << 20))

    async def go():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        reader, writer = await asyncio.open_unix_connection(sock=a)
        before = threading.active_count()
        task = asyncio.ensure_future(distribute.send_tar_stream(writer, [("big.bin", str(big))]))
        deadline = time.monotonic() + 30
        while not select.select([b], [], [], 0)[0] or threading.active_count() == before:
            assert time.monotonic() < deadline, "the sender never started"
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        while threading.active_count() > before:
            assert time.monotonic() < deadline, "the sending thread still waits on the stalled receiver"
            await asyncio.sleep(0.01)
        writer.close()
        b.close()
    asyncio.run(go())


def test_o_direct_is_asked_for_on_local_disks_only(tmp_path, monkeypatch):
    """On NFS (or FUSE, overlay, tmpfs) a big received file goes through the page cache: a direct
    write there is a round trip of its own to the server.  The type is read from the kernel."""
    with open("/proc/self/status", "rb") as proc:
        assert distribute.file_system_type(proc.fileno()) == "proc"
    asked = []
    monkeypatch.setattr(distribute, "direct_writes", lambda fd, on: asked.append(on) or False)
    monkeypatch.setattr(distribute, "file_system_type", lambda fd: "nfs4")
    big = os.urandom(distribute.DIRECT_MIN + 4096)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = len(big)
        tar.addfile(info, io.BytesIO(big))
    distribute.extract_tar(buffer.getvalue(), tmp_path / "archive", direct=True)
    assert (tmp_path / "archive" / "big.bin").read_bytes() == big and asked == []

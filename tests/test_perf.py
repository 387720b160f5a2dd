"""The short cuts the head and supervisor take for speed (issue 8) give the same answers
as the long way round."""

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import distribute  # noqa: E402


def test_status_rows_match_per_batch_counts_and_skip_replaced(tmp_path):
    store = distribute.Store(tmp_path / "state.sqlite")
    plan = distribute.BatchPlan("ns", "a", "shell")
    jobs = [(distribute.JobPlan(f"j{i}", command="true"), 0) for i in range(6)]
    first = store.add_batch("ns", "a", "alice", plan, [], None, jobs)
    empty = store.add_batch("ns", "b", "bob", plan, [], None, [])
    gone = store.add_batch("ns", "c", "bob", plan, [], None, jobs[:2])
    store.db.execute("UPDATE batches SET state='replaced' WHERE id=?", (gone,))
    ids = [j.id for j in store.jobs(first)]
    store.mark_ended(ids[0], "done", 0)
    store.mark_ended(ids[1], "failed", 3)
    store.mark_started(ids[2], f"{ids[2]}.1", "node1", 0)

    rows = store.status_rows()

    assert [(r[0], r[1], r[2], r[3], r[4]) for r in rows] == [(first, "ns", "a", "alice", "active"),
                                                             (empty, "ns", "b", "bob", "active")]
    assert rows[0][7] == store.batch_counts(first) == {"done": 1, "failed": 1, "running": 1, "queued": 3}
    assert rows[1][7] == {}
    assert [r[0] for r in store.status_rows(limit=1)] == [empty]


def test_job_plans_stored_flat_read_back_equal(tmp_path):
    store = distribute.Store(tmp_path / "state.sqlite")
    job = distribute.JobPlan("j", files=["a.txt"], command="echo", has_script=True, params={"re": 100})
    batch = store.add_batch("ns", "a", "alice", distribute.BatchPlan("ns", "a", "shell"), [], None, [(job, 2)])
    assert store.jobs(batch)[0].plan == job
    assert store.jobs(batch)[0].run_id is None


def test_empty_tar_is_a_valid_tar_and_a_cut_stream_still_refused(tmp_path):
    assert distribute.tar_of([]) == distribute.EMPTY_TAR
    assert distribute.extract_tar(distribute.EMPTY_TAR, tmp_path / "out") == 0
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(distribute.Failed):
        distribute.extract_tar(b"", tmp_path / "cut")
    source = tmp_path / "f.txt"
    source.write_text("hello")
    assert distribute.extract_tar(distribute.tar_of([("f.txt", str(source))]), tmp_path / "one") == 5


def test_small_results_tar_matches_tarfile_and_falls_back_for_anything_else(tmp_path):
    """tar_of's direct ustar headers (a job's stdout.txt and small files) extract to the same
    files, modes and whole-second times as tarfile's; a folder, a link or a long name still
    goes through tarfile."""
    import tarfile
    import io
    out = tmp_path / "stdout.txt"
    out.write_bytes(b"line\n" * 300)
    os.chmod(out, 0o640)
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    data = distribute.tar_of([("stdout.txt", str(out)), ("sub/empty.bin", str(empty))])
    assert data == distribute.plain_files_tar([("stdout.txt", str(out)), ("sub/empty.bin", str(empty))])
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    assert [(m.name, m.size, m.mode, m.mtime) for m in members] == [
        ("stdout.txt", 1500, 0o640, int(out.stat().st_mtime)), ("sub/empty.bin", 0, 0o644, int(empty.stat().st_mtime))]
    assert distribute.extract_tar(data, tmp_path / "x") == 1500
    assert (tmp_path / "x" / "stdout.txt").read_bytes() == out.read_bytes()
    assert (tmp_path / "x" / "stdout.txt").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "x" / "sub" / "empty.bin").read_bytes() == b""

    folder = tmp_path / "folder"
    folder.mkdir()
    link = tmp_path / "link"
    os.symlink(str(out), link)
    for entries in ([("folder", str(folder))], [("link", str(link))], [("n" * 101, str(out))]):
        assert distribute.plain_files_tar(entries) is None
        names = [m.name for m in tarfile.open(fileobj=io.BytesIO(distribute.tar_of(entries))).getmembers()]
        assert names == [entries[0][0]]


def test_nested_transaction_undoes_only_its_own_part(tmp_path):
    """Store transactions nest (a landed job's span and end in one commit): an inner one that
    raises is undone alone, the outer one commits the rest."""
    store = distribute.Store(tmp_path / "state.sqlite")
    plan = distribute.BatchPlan("ns", "a", "shell")
    batch = store.add_batch("ns", "a", "alice", plan, [], None, [(distribute.JobPlan("j0", command="true"), 0),
                                                                 (distribute.JobPlan("j1", command="true"), 0)])
    first, second = [j.id for j in store.jobs(batch)]
    with store.transaction():
        store.mark_ended(first, "done", 0)
        with pytest.raises(RuntimeError):
            with store.transaction():
                store.mark_ended(second, "failed", 1)
                raise RuntimeError("a transition failed half way")
    assert not store.db.in_transaction
    assert store.batch_counts(batch) == {"done": 1, "queued": 1}
    with pytest.raises(RuntimeError):
        with store.transaction():
            with store.transaction():
                store.mark_ended(second, "failed", 1)
            raise RuntimeError("the outer one fails")
    assert store.batch_counts(batch) == {"done": 1, "queued": 1}


def test_reset_for_job_empties_input_and_save_whatever_the_last_job_left(tmp_path):
    """The usual empty folders are reset with one rmdir each; a full one, a file or a link in
    their place (a job may leave anything) is removed without touching what a link points at."""
    ws = distribute.Workspace(tmp_path / "ws")
    ws.create()
    (ws.initial / "a.txt").write_text("initial")
    plan = distribute.BatchPlan("ns", "b", "shell", initial=["a.txt"], mounts=["/data"])
    ws.reset_for_job(plan)
    assert sorted(os.listdir(ws.input)) == ["a.txt"] and os.listdir(ws.save) == []
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (ws.save / "deep").mkdir()
    (ws.save / "deep" / "r.bin").write_bytes(b"r")
    (ws.root / "mounts" / "0" / "m.txt").write_text("m")
    (ws.input / "b.txt").write_text("job's own")
    ws.reset_for_job(plan)
    assert sorted(os.listdir(ws.input)) == ["a.txt"] and os.listdir(ws.save) == []
    assert os.listdir(ws.root / "mounts" / "0") == []
    import shutil
    shutil.rmtree(ws.save)
    os.symlink(str(outside), ws.save)
    ws.input.rmdir() if not os.listdir(ws.input) else shutil.rmtree(ws.input)
    ws.input.write_text("a file where input/ was")
    ws.reset_for_job(plan)
    assert ws.save.is_dir() and not ws.save.is_symlink() and os.listdir(ws.save) == []
    assert ws.input.is_dir() and sorted(os.listdir(ws.input)) == ["a.txt"]
    assert (outside / "keep.txt").read_text() == "keep"


def test_remove_run_folder_usual_and_unusual_contents(tmp_path):
    usual = tmp_path / "1.1"
    (usual / "save").mkdir(parents=True)
    (usual / "record.json").write_text("{}")
    (usual / "stdout.txt").write_text("")
    distribute.remove_run_folder(usual)
    assert not usual.exists()

    full = tmp_path / "2.1"
    (full / "save" / "deep").mkdir(parents=True)
    (full / "save" / "deep" / "x.bin").write_bytes(b"x")
    (full / "record.json").write_text("{}")
    os.symlink("/etc", full / "save" / "link")
    distribute.remove_run_folder(full)
    assert not full.exists()
    assert os.path.isdir("/etc")

    distribute.remove_run_folder(tmp_path / "never-was")


def test_json_output_is_the_same_document_one_record_per_line():
    """`status --json` and `nodes --json` write one record per line with json's C encoder
    (indent= took the pure-Python one): the same document, still readable and greppable."""
    import json
    document = {"batches": [{"batch": "lab/b", "jobs": {"done": 1}, "name": "tab\there \"q\" \u00e9"}] * 3,
                "running": [], "stopped": [{"job": "j1", "reason": "time limit 2h"}], "paused_nodes": None}
    text = distribute.readable_json(document)
    assert json.loads(text) == document
    lines = text.splitlines()
    assert sum(line.lstrip().startswith('{"batch": "lab/b"') for line in lines) == 3
    assert '  "running": [],' in lines and lines[0] == "{" and lines[-1] == "}"


def test_status_waits_a_moment_for_a_slow_nodes_progress_then_shows_its_last_answer():
    """A node busy sending results answers `progress` late: `status` does not wait for it
    (PROGRESS_WAIT), shows what it said last, and its late answer counts next time; a node
    is asked one question at a time however often `status` is asked."""
    import asyncio

    class Link:
        def __init__(self, name, answers):
            self.name, self.up, self.slots, self.answers, self.asked = name, True, [object()], answers, 0

        async def request(self, header):
            self.asked += 1
            progress, release = self.answers.pop(0)
            if release is not None:
                await release.wait()
            return {"ok": True, "progress": progress}, b""

    class Head:
        running_progress = distribute.Head.running_progress
        ask_progress = distribute.Head.ask_progress

        def __init__(self, links):
            self.links = {link.name: link for link in links}
            self.tasks = distribute.TaskOwner("test")
            self.progress_heard, self.progress_asking = {}, {}

    async def scenario():
        release = asyncio.Event()
        quick = Link("quick", [({"1.1": 10.0}, None), ({"1.1": 20.0}, None), ({"1.1": 30.0}, None)])
        slow = Link("slow", [({"2.1": 50.0}, release)])
        head = Head([quick, slow])
        assert await head.running_progress() == {"1.1": 10.0}          # answered without the slow node
        assert not head.progress_asking["slow"].done()
        assert await head.running_progress() == {"1.1": 20.0}          # its question is still out:
        assert slow.asked == 1                                           # not asked again
        release.set()
        await head.progress_asking["slow"]
        assert await head.running_progress() == {"1.1": 30.0, "2.1": 50.0}
        await head.tasks.close()

    asyncio.run(scenario())

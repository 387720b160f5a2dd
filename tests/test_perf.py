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

"""Day two: the head restarted, started twice, or upgraded over a previous release's state folder."""

import json
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from cluster import DISTRIBUTE, HeadProcess, wait_until

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def local_head():
    """A head whose one node is this machine (no nodes file), stopped afterwards."""
    process = HeadProcess(None, None, dict(os.environ))
    yield process
    process.stop()
    shutil.rmtree(process.dir, ignore_errors=True)


def serve_again(process, *extra):
    """A second `serve` on the same state folder; it must return by itself."""
    argv = DISTRIBUTE + ["serve", "--state", str(process.state), "--archive", str(process.archive)] + list(extra)
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_a_second_serve_on_the_same_state_refuses_and_names_the_running_head(local_head):
    local_head.start()
    second = serve_again(local_head)
    assert second.returncode == 1
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1, second.stderr
    assert f"pid {local_head.proc.pid}" in lines[0] and str(local_head.socket) in lines[0]
    assert "Traceback" not in second.stderr
    # the first head was not disturbed: it still answers on its socket
    assert local_head.status()["batches"] == []
    assert local_head.proc.poll() is None


def test_a_lock_left_by_a_killed_head_never_blocks_a_start(local_head):
    local_head.start()
    first_pid = local_head.proc.pid
    local_head.kill9()
    lock = local_head.state / "head.lock"
    assert lock.read_text().split()[0] == str(first_pid)     # the file stays; the kernel's lock does not
    local_head.start()
    assert local_head.status()["batches"] == []
    assert lock.read_text().split()[0] == str(local_head.proc.pid)


def copy_release_state(process, release):
    source = FIXTURES / f"state-{release}"
    shutil.copytree(source / "state", process.state)
    shutil.copytree(source / "archive", process.archive)


def test_a_state_folder_of_release_0_1_0_opens_with_nothing_lost(local_head):
    copy_release_state(local_head, "0.1.0")
    before = sorted(str(p.relative_to(local_head.archive)) for p in local_head.archive.rglob("*") if p.is_file())
    local_head.start()
    status = {b["batch"]: b for b in local_head.status()["batches"]}
    finished = status["alice/finished_sweep"]
    assert finished["state"] == "done"
    assert finished["jobs"]["done"] == 1 and finished["jobs"]["failed"] == 1
    # the queued batch of the old release runs under the new head, from the files it uploaded then
    done = local_head.wait_batch("bob/queued_sweep", timeout=120)
    assert done["jobs"]["done"] == 2, done
    for case, re_value in (("case_1", 1), ("case_2", 2)):
        size, case_json = (local_head.archive / "bob" / "queued_sweep" / case / "size.txt").read_text().splitlines()
        assert int(size) == len("mesh0123456789\n") and json.loads(case_json) == {"re": re_value}
    # the old archive is untouched
    after = {str(p.relative_to(local_head.archive)) for p in local_head.archive.rglob("*") if p.is_file()}
    assert set(before) <= after
    ok = json.loads((local_head.archive / "alice" / "finished_sweep" / "job_ok" / "job.json").read_text())
    assert ok["exit_code"] == 0
    db = sqlite3.connect(str(local_head.state / "distribute.sqlite"))
    try:
        from distribute import SCHEMA_VERSION
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_a_store_from_a_newer_release_is_refused_in_one_line(local_head):
    local_head.state.mkdir(parents=True)
    db = sqlite3.connect(str(local_head.state / "distribute.sqlite"))
    db.execute("PRAGMA user_version=999")
    db.commit()
    db.close()
    result = serve_again(local_head)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "newer release" in lines[0] and "999" in lines[0], result.stderr


def test_report_after_a_restart_draws_every_attempt_and_build(local_head, tmp_path):
    folder = tmp_path / "flaky"
    folder.mkdir()
    marker = tmp_path / "second-try"
    (folder / "distribute-jobs.yaml").write_text(f"""\
meta: {{batch_name: flaky, namespace: lab}}
shell:
  initialize:
    build: "echo built"
  jobs:
    - {{name: steady, command: "true"}}
    - {{name: flaky, retries: 2, command: "if [ -e {marker} ]; then exit 0; fi; touch {marker}; exit 5"}}
""")
    local_head.start()
    local_head.cli("add", folder / "distribute-jobs.yaml")
    assert local_head.wait_batch("lab/flaky")["jobs"]["done"] == 2
    before = local_head.cli("report", "lab/flaky", "-o", tmp_path / "before.svg").stdout
    assert before.startswith(f"wrote {tmp_path / 'before.svg'}: 3 job attempts, 1 builds")
    local_head.stop()
    local_head.start()
    after = local_head.cli("report", "lab/flaky", "-o", tmp_path / "after.svg").stdout
    assert after.startswith(f"wrote {tmp_path / 'after.svg'}: 3 job attempts, 1 builds"), after


def python_batch(folder, name, capabilities):
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o755)
    (folder / "distribute-jobs.yaml").write_text(f"""\
meta: {{batch_name: {name}, namespace: lab, capabilities: [{', '.join(capabilities)}]}}
shell:
  jobs:
    - {{name: one, command: "python3 -c 'print(6*7)' > distribute_save/answer.txt"}}
""")
    return folder / "distribute-jobs.yaml"


def test_add_right_after_a_restart_decides_on_what_nodes_offered_when_last_up(head, ssh_nodes, tmp_path):
    """The nodes are still (re)connecting when the first `add` comes: it is accepted on their
    last-known capabilities, says who is not connected yet, and refuses only what nobody offers."""
    head.wait_nodes_up(3)
    head.stop()
    for node in ssh_nodes:
        node.cut()
    head.start()
    added = head.cli("add", python_batch(tmp_path / "py", "early", ["python3"]))
    assert "can run on node1, node2, node3" in added.stdout, added.stdout
    assert "not connected yet: node1, node2, node3" in added.stdout
    refused = head.cli("add", python_batch(tmp_path / "fluent", "never", ["fluent_v9"]), check=False)
    assert refused.returncode == 2 and "no node offers fluent_v9" in refused.stderr
    for node in ssh_nodes:
        node.heal()
    done = head.wait_batch("lab/early", timeout=180)
    assert done["jobs"]["done"] == 1, done
    assert (head.archive / "lab" / "early" / "one" / "answer.txt").read_text() == "42\n"

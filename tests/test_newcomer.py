"""A newcomer follows the README literally: its Quick start, then "A lab in ten minutes" on real
sshd workstations (one with two slots), two lab members (dalice, dbob) working side by side, and a
workstation user pausing the jobs with nothing but what the node has (its distribute.pyz)."""

import grp
import json
import os
import pwd
import shutil
import subprocess
import sys
import textwrap

import pytest

from cluster import DISTRIBUTE, wait_until


def person(user, program, home):
    """Run `python3 distribute.pyz ARGS` as `user` (with that user's groups) in `home`."""
    entry = pwd.getpwnam(user)
    home.mkdir(parents=True, exist_ok=True)
    shutil.chown(home, user, entry.pw_gid)

    def run(*args, env=None, cwd=None):
        environ = {"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8"}
        environ.update(env or {})
        return subprocess.run(["/usr/bin/python3", str(program)] + [str(a) for a in args], cwd=str(cwd or home),
                              env=environ, capture_output=True, text=True, timeout=180, user=entry.pw_uid,
                              group=entry.pw_gid, extra_groups=os.getgrouplist(user, entry.pw_gid))
    return run


def ok(result):
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_quick_start_demo_runs_a_real_batch_and_says_where_the_results_are(pyz, public_tmp):
    result = subprocess.run([sys.executable, str(pyz), "demo", "--dir", str(public_tmp / "distribute-demo")],
                            cwd=str(public_tmp), capture_output=True, text=True, timeout=300)
    out = ok(result)
    login = pwd.getpwuid(os.geteuid()).pw_name
    archive = public_tmp / "distribute-demo" / "archive" / login / "my_first_batch"
    assert f"added {login}/my_first_batch (2 jobs) to a head with 2 local nodes" in out
    assert f"results: {archive}" in out
    for job in ("job_1", "job_2"):
        assert (archive / job / "result.txt").read_text().startswith(f"{job}: ")
        assert json.loads((archive / job / "job.json").read_text())["state"] == "ok"


@pytest.mark.nodes(slots={"node1": 2}, extra=["--group", "distribute", "--kill-grace", "2"])
def test_a_lab_in_ten_minutes(head, pyz, public_tmp):
    # 3. describe and check the nodes, as the head's account, with no head needed
    checked = subprocess.run(DISTRIBUTE + ["nodes", "--check", "--nodes", str(head.nodes_file)], env=head.env,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert [line.split(":")[0] for line in checked.stdout.splitlines()] == ["node1", "node2", "node3"]
    assert all(": ok (python" in line for line in checked.stdout.splitlines())
    # 4. the head serves with --group: members of the group use it
    head.wait_nodes_up(3)
    program = public_tmp / "distribute.pyz"
    shutil.copy(pyz, program)
    program.chmod(0o644)
    os.chmod(public_tmp, 0o755)
    target = ["--head", "local", "--socket", str(head.socket)]
    alice = person("dalice", program, public_tmp / "alice")
    bob = person("dbob", program, public_tmp / "bob")
    assert "dalice" in grp.getgrnam("distribute").gr_mem or pwd.getpwnam("dalice").pw_gid == grp.getgrnam(
        "distribute").gr_gid

    # 5. from dalice's account: template, check, add, status, pull, report
    assert "distribute-jobs.yaml" in ok(alice("template", "python", "-o", "mybatch/"))
    job_file = public_tmp / "alice" / "mybatch" / "distribute-jobs.yaml"
    assert "namespace: dalice" in job_file.read_text()            # your namespace is your login
    assert "dalice/my_first_batch" in ok(alice("check", job_file))
    added = ok(alice(*target, "add", job_file))
    assert added.startswith("added dalice/my_first_batch: 2 jobs queued; can run on ")
    first = ok(alice(*target, "status")).splitlines()[0]     # hers while active; it may be over already
    assert first.startswith("dalice/my_first_batch") or first.startswith("no active batches of yours"), first
    done = head.wait_batch("dalice/my_first_batch")
    assert done["owner"] == "dalice" and done["jobs"]["done"] == 2
    assert "2 done" in ok(alice(*target, "status", "--all")).splitlines()[0]
    ok(alice(*target, "pull", job_file, "--filter", r"\.txt$"))
    pulled = public_tmp / "alice" / "dalice" / "my_first_batch"
    assert (pulled / "job_1" / "result.txt").read_text().startswith("job_1: ")
    ok(alice(*target, "report", "my_first_batch", "-o", "sweep.svg"))
    assert "<svg" in (public_tmp / "alice" / "sweep.svg").read_text()[:400]
    # an ended batch is not "yours and active": status says where to look
    assert "status --all" in ok(alice(*target, "status"))

    # dbob, side by side: his own namespace; dalice's is hers
    bob_dir = public_tmp / "bob" / "work"
    bob_dir.mkdir(parents=True)
    gate = public_tmp / "gate"
    (bob_dir / "distribute-jobs.yaml").write_text(textwrap.dedent(f"""\
        meta: {{batch_name: long, namespace: dbob}}
        shell:
          jobs:
            - {{name: waits, command: 'echo 10 > $DISTRIBUTE_PROGRESS; while [ ! -e {gate} ]; do sleep 0.1; done; echo done > distribute_save/r.txt'}}
        """))
    shutil.chown(bob_dir / "distribute-jobs.yaml", "dbob")
    shutil.chown(bob_dir, "dbob")
    ok(bob(*target, "add", bob_dir / "distribute-jobs.yaml"))
    intruder = bob_dir / "intrude.yaml"
    intruder.write_text("meta: {batch_name: mine_now, namespace: dalice}\nshell:\n  jobs:\n    - {name: a, command: 'true'}\n")
    refused = bob(*target, "add", intruder)
    assert refused.returncode == 2 and refused.stderr.strip().splitlines()[-1].startswith(
        "distribute: error: namespace dalice belongs to dalice"), refused.stderr
    killed = bob(*target, "kill", "dalice/my_first_batch")
    assert killed.returncode == 2 and "it belongs to dalice" in killed.stderr
    mine = ok(bob(*target, "status"))
    assert mine.splitlines()[0].startswith("dbob/long") and "dalice/" not in mine
    everyone = ok(bob(*target, "status", "--all"))
    assert "dalice/my_first_batch" in everyone and "dbob/long" in everyone

    # a workstation user pauses the machine running dbob's job, with only the node's distribute.pyz
    running = wait_until(lambda: [r for r in head.status()["running"] if r["job"] == "waits"], 60, "dbob's job")
    node = running[0]["node"]
    node_pyz = head.workdirs[node] / "bin" / "distribute.pyz"
    at_the_desk = person("dalice", node_pyz, public_tmp / "desk")
    pause_env = {"DISTRIBUTE_PAUSE_DIR": str(head.pause_dirs[node])}
    ok(at_the_desk("pause", "--detach", "--duration", "5m", env=pause_env))
    wait_until(lambda: next(n for n in head.nodes() if n["name"] == node)["paused"], 30, "the head to see the pause")
    assert "waits on %s 10%% (paused)" % node in ok(bob(*target, "status"))
    ok(at_the_desk("resume", env=pause_env))
    wait_until(lambda: not next(n for n in head.nodes() if n["name"] == node)["paused"], 30, "the resume")
    gate.touch()
    assert head.wait_batch("dbob/long")["jobs"]["done"] == 1

"""The real head (`distribute serve`) with two local nodes (one with two slots), driven by a
hypothesis state machine: random adds, kills, retries before and after the end, replaces, head
restarts (kill -9) and pauses; after every step the head's answers must agree with each other and
with what the jobs themselves recorded.  Bounded so it stays a few minutes."""

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cluster import DISTRIBUTE, HeadProcess, wait_until

SLOTS = {"local1": 2, "local2": 1}


class HeadModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="dmodel-", dir="/tmp"))
        os.chmod(self.dir, 0o755)
        self.pause_dirs = {}
        lines = ["nodes:"]
        for name, slots in SLOTS.items():
            folder = self.dir / f"{name}-pause"
            folder.mkdir()
            os.chmod(folder, 0o1777)
            self.pause_dirs[name] = folder
            lines.append(f"  - {{name: {name}, host: local, slots: {slots}, workdir: {self.dir / name}, "
                         f"pause_dir: {folder}}}")
        self.runs = self.dir / "runs"          # each job run appends a line here
        self.runs.mkdir()
        os.chmod(self.runs, 0o777)
        self.head = HeadProcess(None, "\n".join(lines) + "\n", dict(os.environ),
                                extra=["--supervisor-idle", "5", "--kill-grace", "1"])
        self.head.start()
        wait_until(lambda: sum(n["reachable"] for n in self.head.nodes()) == 2, 60, "both local nodes up")
        self.batches = {}        # key -> number of jobs
        self.count = 0
        self.paused = set()
        self.retried_ended = {}  # key -> runs recorded when it was retried
        self.steps = 0

    def teardown(self):
        try:
            for name in list(self.paused):
                self.resume(name)
            for key in self.batches:            # everything ends
                wait_until(lambda: self.head.batch(key) and self.head.batch(key)["state"] != "active", 120,
                           f"{key} to end\n{self.head.log.read_text()[-3000:]}")
            for key, before in self.retried_ended.items():
                assert self.ran(key) > before, f"{key} was retried after its end but nothing ran again"
            self.check_archive()
            wait_until(lambda: all(not n["running"] for n in self.head.nodes()), 30, "every slot free")
            assert "Traceback" not in self.head.log.read_text()
            STEPS.append(self.steps)
        finally:
            self.head.stop()
            shutil.rmtree(self.dir, ignore_errors=True)
            shutil.rmtree(self.head.dir, ignore_errors=True)

    # helpers
    def cli(self, *args):
        return self.head.cli(*args, check=False)

    def ran(self, key):
        path = self.runs / key.replace("/", "_")
        return len(path.read_text().splitlines()) if path.exists() else 0

    def resume(self, name):
        env = dict(os.environ, DISTRIBUTE_PAUSE_DIR=str(self.pause_dirs[name]))
        subprocess.run(DISTRIBUTE + ["resume"], env=env, capture_output=True, timeout=60)
        self.paused.discard(name)

    def check_archive(self):
        for key in self.batches:
            batch = self.head.batch(key)
            if batch is None:
                continue
            folder = self.head.archive / key
            done = [p.name for p in folder.iterdir() if (p / "job.json").exists() and
                    json.loads((p / "job.json").read_text())["state"] == "ok"] if folder.exists() else []
            assert len(done) == batch["jobs"]["done"], (key, done, batch)

    # rules
    @rule(jobs=st.integers(1, 4), fails=st.booleans())
    def add(self, jobs, fails):
        self.count += 1
        key = f"model/b{self.count}"
        folder = self.dir / f"b{self.count}"
        folder.mkdir()
        mark = self.runs / key.replace("/", "_")
        lines = [f"meta: {{batch_name: b{self.count}, namespace: model}}", "shell:", "  jobs:"]
        for i in range(jobs):
            code = 3 if fails and i == 0 else 0
            lines.append(f"    - {{name: j{i}, command: 'echo $DISTRIBUTE_JOB >> {mark}; sleep 0.{i + 2}; "
                         f"echo {i} > distribute_save/out.txt; exit {code}'}}")
        (folder / "distribute-jobs.yaml").write_text("\n".join(lines) + "\n")
        assert self.cli("add", folder / "distribute-jobs.yaml").returncode == 0
        self.batches[key] = jobs

    @rule(data=st.data())
    def kill(self, data):
        if self.batches:
            key = data.draw(st.sampled_from(sorted(self.batches)))
            assert self.cli("kill", key).returncode == 0
            self.retried_ended.pop(key, None)        # killed before its retried jobs could run

    @rule(data=st.data(), everything=st.booleans())
    def retry(self, data, everything):
        if not self.batches:
            return
        key = data.draw(st.sampled_from(sorted(self.batches)))
        before, runs_before = self.head.batch(key), self.ran(key)   # counted first: a retried job may
        result = self.cli("retry", key, *(["--all"] if everything else []))   # run before retry returns
        assert result.returncode == 0, result.stderr
        if before["state"] != "active" and not result.stdout.strip().endswith(": 0 jobs queued again"):
            self.retried_ended[key] = runs_before

    @rule(data=st.data())
    def replace(self, data):
        if not self.batches:
            return
        key = data.draw(st.sampled_from(sorted(self.batches)))
        name = key.split("/")[1]
        result = self.cli("add", "--replace", self.dir / name / "distribute-jobs.yaml")
        assert result.returncode == 0, result.stderr
        self.retried_ended.pop(key, None)

    @rule()
    def head_restarts(self):
        self.head.kill9()
        self.head.start()
        wait_until(lambda: sum(n["reachable"] for n in self.head.nodes()) == 2, 60, "both local nodes back")

    @rule(node=st.sampled_from(sorted(SLOTS)))
    def pause_toggle(self, node):
        if node in self.paused:
            self.resume(node)
            return
        env = dict(os.environ, DISTRIBUTE_PAUSE_DIR=str(self.pause_dirs[node]))
        result = subprocess.run(DISTRIBUTE + ["pause", "--detach", "--duration", "10m"], env=env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        self.paused.add(node)

    @rule()
    def a_moment(self):
        time.sleep(0.5)

    # invariants
    @invariant()
    def head_agrees_with_itself(self):
        self.steps += 1
        wait_until(self.consistent, 20, f"status and nodes to agree\n{self.head.log.read_text()[-3000:]}")

    def consistent(self):
        nodes = {n["name"]: n for n in self.head.nodes()}
        status = self.head.status()
        for name, node in nodes.items():
            assert len(node["running"]) <= SLOTS[name], node                 # never more than its slots
            assert len({r["slot"] for r in node["running"]}) == len(node["running"])
        for batch in status["batches"]:
            jobs = batch["jobs"]
            if batch["batch"] in self.batches:
                assert sum(jobs.values()) == self.batches[batch["batch"]]
            if batch["state"] == "done":
                assert jobs["queued"] == 0 and jobs["running"] == 0
        running_jobs = sorted((r["batch"], r["job"]) for r in status["running"])
        on_nodes = sorted((r["batch"], r["job"]) for n in nodes.values() for r in n["running"] if r.get("job"))
        return running_jobs == on_nodes          # asked one after the other: a job may end in between

STEPS = []
HeadModel.TestCase.settings = settings(max_examples=2, stateful_step_count=8, deadline=None,
                                       suppress_health_check=list(HealthCheck))
TestHeadModel = HeadModel.TestCase

"""The job lifecycle state machine (section 7 of distribute.py) in-process: no sockets, no sshd.

Scenario tests of single transitions, then a hypothesis state machine that drives the lifecycle
with simulated nodes through random adds, kills, retries, replaces, node losses and returns,
head restarts, pauses and failures, checking the invariants after every step."""

import itertools
import os

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import distribute
from distribute import (BatchPlan, JobPlan, Lifecycle, NodeState, Store, NODE_FAILURES, LANDING_TRIES,
                        adopt_verdict, RunRecord, backoff)


def make_store(tmp_path, name="s.sqlite"):
    return Store(tmp_path / name)


def add(store, name="b", jobs=2, retries=0, owner="alice", namespace="lab", caps=()):
    plan = BatchPlan(namespace, name, "shell")
    return store.add_batch(namespace, name, owner, plan, list(caps), None,
                           [(JobPlan(f"j{i}", command="true"), retries) for i in range(jobs)])


def life_with(store, **slots):
    life = Lifecycle(store)
    life.nodes = {name: NodeState(name, count, [], 0, True, False) for name, count in slots.items()}
    return life


def ops(actions, op):
    return [a for a in actions if a.op == op]


def build_everywhere(life, now=0.0):
    """Schedule, and report every requested build as successful."""
    for action in ops(life.schedule(now), "start_build"):
        batch = life.store.batch(action.batch_id)
        life.built(action.node, batch.namespace, batch.name, 0, None, b"")


def run_of(action):
    return {"run_id": action.run_id, "state": "finished", "exit_code": 0, "killed": False}


def land(life, node, run):
    """The node reports the run finished and the head archives it: the actions of landing."""
    (landing,) = ops(life.finished(node, run), "land")
    return life.landed(node, landing.job_id, run, None)


def first_start_on_one_node(tmp_path, jobs):
    """A batch of `jobs` on one node with one slot, built: (store, life, batch id, first start)."""
    store = make_store(tmp_path)
    life = life_with(store, n1=1)
    batch_id = add(store, jobs=jobs)
    build_everywhere(life)
    (start,) = ops(life.schedule(0), "start_job")
    return store, life, batch_id, start


# --- single transitions ----------------------------------------------------------------------------

def test_first_batch_on_a_two_slot_node_builds_once_then_fills_both_slots(tmp_path):
    store = make_store(tmp_path)
    life = life_with(store, n1=2)
    batch_id = add(store, jobs=3)
    first = life.schedule(0)
    assert [a.op for a in first] == ["start_build"]          # one build, the other slot waits for it
    assert store.busy_slots("n1") == {0: f"build:{batch_id}"}
    life.built("n1", "lab", "b", 0, None, b"log")
    assert store.busy_slots("n1") == {}
    starts = ops(life.schedule(0), "start_job")
    assert sorted(a.slot for a in starts) == [0, 1] and len(store.busy_slots("n1")) == 2


def test_a_finished_job_lands_once_frees_its_slot_and_ends_the_batch(tmp_path):
    store, life, batch_id, start = first_start_on_one_node(tmp_path, jobs=1)
    (landing,) = ops(life.finished("n1", run_of(start)), "land")
    assert store.busy_slots("n1") == {start.slot: start.run_id}      # held until the results are archived
    actions = life.landed("n1", landing.job_id, run_of(start), 100.0)
    assert store.busy_slots("n1") == {}
    assert store.batch(batch_id).state == "done"
    assert [a.op for a in actions].count("notify") == 1
    assert any(a.op == "tell" and a.info["op"] == "ack" for a in actions)
    # the same run reported again (a reconnection) is stale: acknowledged, never landed twice
    assert not ops(life.finished("n1", run_of(start)), "land")


def test_failed_job_with_retries_is_queued_again_then_fails_with_its_reason(tmp_path):
    store = make_store(tmp_path)
    life = life_with(store, n1=1)
    add(store, jobs=1, retries=1)
    build_everywhere(life)
    for attempt in (1, 2):
        (start,) = ops(life.schedule(0), "start_job")
        run = dict(run_of(start), exit_code=3)
        land(life, "n1", run)
    job = store.jobs(1)[0]
    assert job.state == "failed" and job.attempts == 2
    assert job.reason == "exit code 3 on n1, attempt 2 of 2"


def test_retry_after_the_end_queues_failed_and_killed_jobs_and_builds_again(tmp_path):
    store, life, batch_id, start = first_start_on_one_node(tmp_path, jobs=2)
    land(life, "n1", dict(run_of(start), exit_code=1))
    life.kill(batch_id)
    assert store.batch_counts(batch_id) == {"failed": 1, "killed": 1}
    assert store.batch(batch_id).state == "killed"
    assert life.retry(batch_id, ("failed",))[0] == 1
    assert store.batch(batch_id).state == "active" and store.builds(batch_id) == []
    assert life.retry(batch_id, ("failed", "killed"))[0] == 1
    assert store.batch_counts(batch_id) == {"queued": 2}
    assert ops(life.schedule(0), "start_build")                   # built afresh: the node cleaned up


def test_a_job_retried_after_the_end_runs_under_a_new_run_id(tmp_path):
    """Found by the state machine: `retry` counts attempts afresh, and the run id was made of the
    attempt, so the second run was "<id>.1" again and a stale report of the first could pass for it."""
    store, life, batch_id, first = first_start_on_one_node(tmp_path, jobs=1)
    run = dict(run_of(first), exit_code=1)
    land(life, "n1", run)
    assert life.retry(batch_id, ("failed",))[0] == 1
    build_everywhere(life)
    (second,) = ops(life.schedule(0), "start_job")
    assert second.job_id == first.job_id and second.run_id != first.run_id
    assert not ops(life.finished("n1", run), "land")           # the old run's report is stale now
    assert store.job(first.job_id).state == "running"


def test_kill_tells_the_node_and_the_run_ends_killed(tmp_path):
    store, life, batch_id, start = first_start_on_one_node(tmp_path, jobs=2)
    dropped, stopped, actions = life.kill(batch_id)
    assert (dropped, stopped) == (1, 1)
    assert [a.info for a in actions] == [{"op": "kill", "run_ids": [start.run_id]}]
    run = dict(run_of(start), killed=True, exit_code=-15)
    land(life, "n1", run)
    assert store.batch_counts(batch_id) == {"killed": 2} and store.busy_slots("n1") == {}


def test_replaced_batch_results_never_land_and_the_new_batch_waits_for_the_folder(tmp_path):
    store = make_store(tmp_path)
    life = life_with(store, n1=2)
    old = add(store, jobs=1)
    build_everywhere(life)
    (start,) = ops(life.schedule(0), "start_job")
    actions = life.replace(old)
    assert any(a.info.get("op") == "kill" for a in actions) and ops(actions, "drop_files")
    new = add(store, jobs=1)
    assert life.schedule(0) == []                # n1 still runs the old batch's job in that folder
    run = dict(run_of(start), killed=True)
    assert not ops(life.finished("n1", run), "land")
    assert store.batch_counts(old) == {"killed": 1} and store.batch(old).state == "replaced"
    assert ops(life.schedule(0), "start_build")[0].batch_id == new


def test_build_that_cannot_start_backs_off_then_fails_the_batch_with_the_reason(tmp_path):
    store = make_store(tmp_path)
    life = life_with(store, n1=1)
    batch_id = add(store, jobs=2)
    now = 0.0
    for tries in range(1, NODE_FAILURES + 1):
        (build,) = ops(life.schedule(now), "start_build")
        actions = life.build_not_started(batch_id, "n1", "No space left on device", now)
        assert store.busy_slots("n1") == {}
        if tries < NODE_FAILURES:
            (wake,) = ops(actions, "wake_at")
            assert wake.info["at"] == now + backoff(tries)
            assert [a.op for a in life.schedule(now + backoff(tries) / 2)] == ["wake_at"]   # no build yet
            now = wake.info["at"]
    assert store.batch(batch_id).state == "done"
    job = store.jobs(batch_id)[0]
    assert job.state == "failed" and "could not start the build on n1: No space left on device" in job.reason
    assert store.builds(batch_id) == []          # the batch ended: nothing of it stays on the node


def test_jobs_that_cannot_start_are_requeued_without_using_a_retry_until_the_node_gives_up(tmp_path):
    store = make_store(tmp_path)
    life = life_with(store, n1=1)
    batch_id = add(store, jobs=1)
    build_everywhere(life)
    now = 0.0
    for _ in range(NODE_FAILURES):
        starts = ops(life.schedule(now), "start_job")
        assert len(starts) == 1
        life.job_not_started(starts[0].job_id, starts[0].run_id, "n1", "disk full", now)
        assert store.jobs(batch_id)[0].attempts == 0 and store.busy_slots("n1") == {}
        now += 1000
    job = store.jobs(batch_id)[0]
    assert job.state == "failed" and "could not start jobs on n1: disk full" in job.reason


def test_landing_that_keeps_failing_backs_off_exponentially_and_fails_visibly(tmp_path):
    store, life, batch_id, start = first_start_on_one_node(tmp_path, jobs=1)
    run = run_of(start)
    delays = []
    for tries in itertools.count(1):
        actions = life.landing_failed("n1", start.job_id, run, "Read-only file system", tries)
        later = ops(actions, "land_later")
        if not later:
            break
        delays.append(later[0].info["delay"])
    assert tries == LANDING_TRIES and delays == sorted(delays) and delays[1] == 2 * delays[0]
    job = store.jobs(batch_id)[0]
    assert job.state == "failed" and "could not be archived" in job.reason and store.busy_slots("n1") == {}


def test_node_lost_requeues_its_jobs_without_using_a_retry_and_forgets_its_builds(tmp_path):
    store = make_store(tmp_path)
    life = life_with(store, n1=1, n2=1)
    batch_id = add(store, jobs=2)
    build_everywhere(life)
    starts = ops(life.schedule(0), "start_job")
    assert len(starts) == 2
    life.node_lost("n1")
    assert store.busy_slots("n1") == {} and store.build(batch_id, "n1") is None
    assert {j.state: j.attempts for j in store.jobs(batch_id) if j.state == "queued"} == {"queued": 0}
    # when n1 comes back and still has that run, it is stopped (it is not current any more)
    stale = next(a for a in starts if a.node == "n1")
    actions = life.reconcile("n1", [{"run_id": stale.run_id, "state": "running"}])
    assert [a.info for a in actions] == [{"op": "kill", "run_ids": [stale.run_id], "grace": 0}]


def test_a_job_of_a_killed_batch_on_a_lost_node_ends_killed_and_the_batch_ends(tmp_path):
    """Found by the state machine: the kill never reached the away node, then the node timed out,
    and its job went back to the queue of a batch that was killed (and never ran again)."""
    store, life, batch_id, _ = first_start_on_one_node(tmp_path, jobs=1)
    life.kill(batch_id)                                       # the node is away: the tell is lost
    assert store.batch_counts(batch_id) == {"running": 1}
    actions = life.node_lost("n1")
    assert store.batch_counts(batch_id) == {"killed": 1} and store.busy_slots("n1") == {}
    assert store.batch(batch_id).state == "killed" and ops(actions, "notify")


def test_every_node_that_built_the_batch_is_told_to_clean_up_when_it_ends(tmp_path):
    """Found in test_cluster: a node that ran its last job while others were still queued kept
    the batch's folder for good (only the node that ran the very last job was told)."""
    store = make_store(tmp_path)
    life = life_with(store, n1=1, n2=1)
    add(store, jobs=3)
    build_everywhere(life)
    first = {a.node: a for a in ops(life.schedule(0), "start_job")}
    land(life, "n1", run_of(first["n1"]))
    life.nodes["n1"].paused = True                       # the third job goes to n2
    land(life, "n2", run_of(first["n2"]))
    (third,) = ops(life.schedule(0), "start_job")
    assert third.node == "n2"
    actions = land(life, "n2", run_of(third))
    told = sorted(a.node for a in actions if a.op == "tell" and a.info["op"] == "cleanup")
    assert told == ["n1", "n2"] and store.builds() == []


def test_a_lost_run_is_requeued_without_using_a_retry(tmp_path):
    store, life, batch_id, start = first_start_on_one_node(tmp_path, jobs=1)
    actions = life.finished("n1", dict(run_of(start), exit_code=None, lost="the node restarted"))
    assert not ops(actions, "land")
    job = store.jobs(batch_id)[0]
    assert job.state == "queued" and job.attempts == 0


def add_sized(store, name, jobs, cpus, gpus=0, memory=0, after=()):
    plan = BatchPlan("lab", name, "shell")
    plan.uses_resources, plan.after = True, list(after)
    return store.add_batch("lab", name, "alice", plan, [], None,
                           [(JobPlan(f"j{i}", command="true", cpus=cpus, gpus=gpus, memory=memory), 0)
                            for i in range(jobs)])


def sized_node(name="n1", cpus=8, gpus=4):
    return NodeState(name, 1, [], gpus, True, False, resources=distribute.Amount(cpus, 16 << 30, gpus), cpus=cpus)


def test_jobs_with_resources_pack_by_capacity_get_their_own_gpus_and_keep_them_in_the_store(tmp_path):
    store = make_store(tmp_path)
    life = Lifecycle(store)
    life.nodes = {"n1": sized_node()}
    add_sized(store, "g", jobs=3, cpus=2, gpus=2, memory=1 << 30)
    build_everywhere(life)
    starts = ops(life.schedule(0), "start_job")
    # two jobs of 2 GPUs fill the 4 GPUs (cpus would allow four jobs, one slot would allow one)
    assert [a.info["gpus"] for a in starts] == [[0, 1], [2, 3]]
    assert [a.info["env"]["CUDA_VISIBLE_DEVICES"] for a in starts] == ["0,1", "2,3"]
    assert all(a.info["cpus"] == 2 for a in starts)
    assert [store.job(a.job_id).gpus for a in starts] == [[0, 1], [2, 3]]
    assert not ops(life.schedule(0), "start_job")                 # no GPU is ever shared
    land(life, "n1", run_of(starts[0]))
    (third,) = ops(life.schedule(0), "start_job")
    assert third.info["gpus"] == [0, 1]                            # the freed ones
    # a head that lost the indices (an older store row) takes them back from the node's record
    store.set_gpus(third.job_id, None)
    records = [{"run_id": a.run_id, "state": "running", "gpus": a.info["gpus"]} for a in (starts[1], third)]
    life.reconcile("n1", records)
    assert store.job(third.job_id).gpus == [0, 1]
    assert not ops(life.schedule(0), "start_job")


def test_a_batch_after_another_starts_when_that_one_is_done_and_why_says_so(tmp_path):
    store = make_store(tmp_path)
    life = Lifecycle(store)
    life.nodes = {"n1": sized_node(gpus=0)}
    add_sized(store, "first", jobs=1, cpus=8)
    second = add_sized(store, "then", jobs=1, cpus=1, after=["lab/first"])
    build_everywhere(life)                          # only `first` is built: `then` waits
    assert all(b.batch_id != second for b in store.builds())
    (start,) = ops(life.schedule(0), "start_job")
    assert store.batch(start.batch_id).name == "first"
    assert life.dependency_reason(store.batch(second)) == "waits for lab/first (0 of 1 jobs done)"
    land(life, "n1", run_of(start))
    build_everywhere(life)
    (then,) = ops(life.schedule(0), "start_job")
    assert then.batch_id == second and life.dependency_reason(store.batch(second)) is None


def test_adoption_verdicts():
    record = RunRecord("1.1", "lab", "b", "j", pid=42, boot_id="boot-a", pid_start=1000.0)
    assert adopt_verdict(record, "boot-a", 1000.2) is None
    assert adopt_verdict(record, "boot-b", 1000.2) == "the node restarted"
    assert "pid is another process's" in adopt_verdict(record, "boot-a", 5000.0)
    assert "ended while no supervisor" in adopt_verdict(record, "boot-a", None)


def test_nodes_shows_which_batches_a_node_gave_up_on_and_why():
    lines = distribute.format_nodes([{"name": "n1", "state": "up", "paused": [], "running": [], "slots": 1,
                                      "capabilities": [], "gave_up": [{"batch": "lab/b", "reason":
                                                                       "could not start the build on n1: no space"}]}])
    assert lines[-1].strip() == "gave up on lab/b: could not start the build on n1: no space"


def test_status_marks_a_paused_job():
    lines = distribute.format_status({"batches": [{"batch": "lab/b", "owner": "alice", "state": "active",
                                                   "jobs": {"done": 0, "running": 1, "queued": 0, "failed": 0,
                                                            "killed": 0}}],
                                      "running": [{"batch": "lab/b", "job": "j0", "node": "n1", "progress": 40.0,
                                                   "paused": True}]})
    assert lines[1] == "    j0 on n1 40% (paused)"


# --- the lifecycle as a state machine, with simulated nodes ----------------------------------------

class SimNode:
    def __init__(self, name, slots):
        self.name, self.slots = name, slots
        self.up, self.paused = True, False
        self.runs = {}          # run_id -> {"state": running|finished, "killed": bool, "exit_code": int}
        self.building = {}      # (namespace, batch) -> batch id


class LifecycleMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        import tempfile
        from pathlib import Path
        self.dir = Path(tempfile.mkdtemp(prefix="lifesm-"))
        self.store = Store(self.dir / "s.sqlite")
        self.nodes = {"n1": SimNode("n1", 2), "n2": SimNode("n2", 1)}
        self.life = self.new_life()
        self.names = itertools.count()
        self.landed = {}            # (job id, run id) -> times landed
        self.retried_ended = set()  # batches retried after they ended
        self.now = 0.0
        self.steps = 0

    def teardown(self):
        import shutil
        self.store.db.close()
        shutil.rmtree(self.dir, ignore_errors=True)
        STEPS.append(self.steps)
        if os.environ.get("LIFECYCLE_STEPS"):
            print(f"lifecycle state machine: {len(STEPS)} runs, {sum(STEPS)} steps checked so far")

    def new_life(self):
        life = Lifecycle(self.store)
        life.nodes = {n.name: NodeState(n.name, n.slots, [], 0, n.up, n.paused) for n in self.nodes.values()}
        return life

    def refresh(self):
        for node in self.nodes.values():
            self.life.nodes[node.name] = NodeState(node.name, node.slots, [], 0, node.up, node.paused)

    def perform(self, actions):
        """What the head does with the actions (against the simulated nodes)."""
        for action in actions:
            node = self.nodes.get(action.node or "")
            if action.op == "start_build" and node is not None and node.up:
                batch = self.store.batch(action.batch_id)
                node.building[(batch.namespace, batch.name)] = batch.id
            elif action.op == "start_build":
                self.perform(self.life.build_not_started(action.batch_id, action.node, "node away", self.now))
            elif action.op == "start_job" and node is not None and node.up:
                node.runs[action.run_id] = {"run_id": action.run_id, "state": "running", "killed": False,
                                            "exit_code": None}
            elif action.op == "start_job":
                self.perform(self.life.job_not_started(action.job_id, action.run_id, action.node, "away", self.now))
            elif action.op == "tell" and node is not None and node.up:
                message = action.info
                for run_id in message.get("run_ids", []):
                    run = node.runs.get(run_id)
                    if message["op"] == "ack":
                        node.runs.pop(run_id, None)
                    elif message["op"] == "kill" and run is not None and run["state"] == "running":
                        run.update(state="finished", killed=True, exit_code=-15)
                        self.report(node, run)
            elif action.op == "land":
                key = (action.job_id, action.run_id)
                self.landed[key] = self.landed.get(key, 0) + 1
                self.perform(self.life.landed(action.node, action.job_id, action.info["run"], None))

    def report(self, node, run):
        if node.up:
            self.perform(self.life.finished(node.name, dict(run)))

    def schedule(self):
        self.refresh()
        self.perform(self.life.schedule(self.now))

    # rules
    @rule(jobs=st.integers(1, 4), retries=st.integers(0, 1))
    def add_batch(self, jobs, retries):
        add(self.store, f"b{next(self.names)}", jobs=jobs, retries=retries, owner=f"u{jobs % 2}")
        self.schedule()

    @rule(data=st.data())
    def build_ends(self, data):
        busy = [(n, key) for n in self.nodes.values() if n.up for key in n.building]
        if not busy:
            return
        node, key = data.draw(st.sampled_from(busy))
        del node.building[key]
        ok = data.draw(st.booleans(), "build ok") or data.draw(st.booleans())
        self.perform(self.life.built(node.name, key[0], key[1], 0 if ok else 2, None, b""))
        self.schedule()

    @rule(data=st.data())
    def job_ends(self, data):
        running = [(n, r) for n in self.nodes.values() if n.up for r in n.runs.values() if r["state"] == "running"]
        if not running:
            return
        node, run = data.draw(st.sampled_from(running))
        run.update(state="finished", exit_code=data.draw(st.sampled_from([0, 0, 1])))
        self.report(node, run)
        self.schedule()

    @rule(data=st.data())
    def kill_batch(self, data):
        batches = [b for b in self.store.active_batches()]
        if batches:
            self.perform(self.life.kill(data.draw(st.sampled_from(batches)).id)[2])
            self.schedule()

    @rule(data=st.data(), everything=st.booleans())
    def retry_batch(self, data, everything):
        rows = [r for r in self.store.status_rows()]
        if not rows:
            return
        batch_id = data.draw(st.sampled_from(rows))[0]
        ended = self.store.batch(batch_id).state != "active"
        count, actions = self.life.retry(batch_id, ("failed", "killed") if everything else ("failed",))
        if ended and count:
            self.retried_ended.add(batch_id)
            assert self.store.batch(batch_id).state == "active"
        self.perform(actions)
        self.schedule()

    @rule(data=st.data())
    def replace_batch(self, data):
        rows = [r for r in self.store.status_rows()]
        if not rows:
            return
        row = data.draw(st.sampled_from(rows))
        self.perform(self.life.replace(row[0]))
        add(self.store, row[2], jobs=2)
        self.schedule()

    @rule(data=st.data())
    def node_goes_away(self, data):
        node = data.draw(st.sampled_from(sorted(self.nodes)))
        self.nodes[node].up = False
        self.schedule()

    @rule(data=st.data())
    def node_timeout(self, data):
        down = [n for n in self.nodes.values() if not n.up]
        if down:
            self.perform(self.life.node_lost(data.draw(st.sampled_from(down)).name))
            self.schedule()

    @rule(data=st.data(), restarted=st.booleans())
    def node_returns(self, data, restarted):
        down = [n for n in self.nodes.values() if not n.up]
        if not down:
            return
        node = data.draw(st.sampled_from(down))
        node.up = True
        if restarted:                          # its supervisor restarted: builds in flight are gone
            node.building.clear()
        self.refresh()
        self.perform(self.life.reconcile(node.name, [dict(r) for r in node.runs.values()]))
        self.schedule()

    @rule()
    def head_restarts(self):
        for build in self.store.builds():
            if build.state == "running":
                self.store.drop_builds(build.batch_id, build.node)
        self.life = self.new_life()
        for node in self.nodes.values():
            if node.up:
                node.building.clear()            # the head asks again; the node says "already"
                self.perform(self.life.reconcile(node.name, [dict(r) for r in node.runs.values()]))
        self.schedule()

    @rule(data=st.data())
    def pause_toggles(self, data):
        node = self.nodes[data.draw(st.sampled_from(sorted(self.nodes)))]
        node.paused = not node.paused
        self.schedule()

    @rule()
    def time_passes(self):
        self.now += 400.0
        self.schedule()

    # invariants
    @invariant()
    def slots_never_exceed_and_never_leak(self):
        self.steps += 1
        for node in self.nodes.values():
            busy = self.store.busy_slots(node.name)
            assert all(0 <= slot < node.slots for slot in busy)
            running = self.store.running_jobs(node.name)
            builds = [b for b in self.store.builds(node=node.name) if b.state == "running"]
            assert len(running) + len(builds) == len(busy) <= node.slots
            if node.up:     # every slot the store holds is something the node really does
                for job in running:
                    assert job.run_id in node.runs, (job, node.runs)
                building = set(node.building.values())
                for build in builds:
                    assert build.batch_id in building

    @invariant()
    def archived_at_most_once(self):
        assert all(count == 1 for count in self.landed.values())
        for row in self.store.status_rows():
            for job in self.store.jobs(row[0]):
                if job.state in ("done",):
                    assert self.landed.get((job.id, job.run_id)) == 1

    @invariant()
    def status_and_store_agree(self):
        for row in self.store.status_rows():
            batch_id, state, counts = row[0], row[4], row[7]
            assert counts == self.store.batch_counts(batch_id)
            if state == "done":
                assert not counts.get("queued") and not counts.get("running")
            if counts.get("queued"):
                assert state == "active"

    def drain(self):
        """Everything comes back and runs to the end: every batch ends, retried ones ran again."""
        for node in self.nodes.values():
            node.paused = False
            if not node.up:
                node.up = True
                self.perform(self.life.reconcile(node.name, [dict(r) for r in node.runs.values()]))
        for _ in range(200):
            self.now += 400.0
            self.schedule()
            progressed = False
            for node in self.nodes.values():
                for key in list(node.building):
                    del node.building[key]
                    self.perform(self.life.built(node.name, key[0], key[1], 0, None, b""))
                    progressed = True
                for run in list(node.runs.values()):
                    if run["state"] == "running":
                        run.update(state="finished", exit_code=0)
                        self.report(node, run)
                        progressed = True
            if not progressed and not any(self.store.has_jobs_in(r[0], "queued") for r in self.store.status_rows()):
                break
        for row in self.store.status_rows():
            assert row[4] != "active", row
        for batch_id in self.retried_ended:
            assert self.store.batch(batch_id).state in ("done", "killed", "replaced")

    @precondition(lambda self: self.steps > 0)
    @rule()
    def everything_finishes(self):
        self.drain()


STEPS = []
# 60 runs of up to 30 steps by default (about 20 s); LIFECYCLE_EXAMPLES=1000 for a longer search
LifecycleMachine.TestCase.settings = settings(max_examples=int(os.environ.get("LIFECYCLE_EXAMPLES", 60)),
                                              stateful_step_count=30, deadline=None,
                                              suppress_health_check=list(HealthCheck))
TestLifecycleMachine = LifecycleMachine.TestCase



def test_a_failing_task_is_logged_by_its_owner_and_a_long_lived_one_restarts(capsys):
    import asyncio
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) < 2:
            raise OSError("disk went away")

    async def broken():
        raise ValueError("bad event")

    async def main():
        owner = distribute.TaskOwner()
        task = owner.spawn(broken(), "archiving run 3.1")
        await asyncio.gather(task, return_exceptions=True)
        await distribute.keep_running(flaky, "the link to node n1")
        await owner.close()
        return owner.tasks
    assert asyncio.run(main()) == set()
    err = capsys.readouterr().err
    assert "head: archiving run 3.1 failed: ValueError: bad event" in err
    assert "head: the link to node n1 stopped (OSError: disk went away); restarting it" in err
    assert len(calls) == 2 and "never retrieved" not in err

"""The scheduler's pure functions (SPEC §6 "Scheduling"), without any I/O."""

import distribute as d


def node(name="n1", caps=("python3",), gpus=0, free=1, paused=False, reachable=True):
    return d.NodeView(name, list(caps), gpus, free, paused, reachable)


def batch(id, owner="alice", created=None, caps=("python3",), queued=5, built=(), failed=()):
    return d.BatchView(id, owner, float(id if created is None else created), list(caps), queued,
                       list(built), list(failed))


def test_gpu_batches_go_first_on_a_gpu_node():
    cpu_job, gpu_job = batch(1, caps=["python3"]), batch(2, caps=["python3", "gpu"], created=99)
    assert d.pick_batch(node(caps=["python3", "gpu"], gpus=1), [cpu_job, gpu_job], None) is gpu_job
    # on a node without a GPU the GPU batch is not even eligible
    assert d.pick_batch(node(caps=["python3"]), [cpu_job, gpu_job], None) is cpu_job


def test_a_gpu_node_still_takes_cpu_work_when_no_gpu_batch_waits():
    cpu_job = batch(1)
    assert d.pick_batch(node(caps=["python3", "gpu"], gpus=2), [cpu_job], None) is cpu_job


def test_batch_already_built_here_is_preferred_within_an_owner():
    older, built_here = batch(1), batch(2, built=["n1"])
    assert d.pick_batch(node(), [older, built_here], None) is built_here
    assert d.pick_batch(node("n2"), [older, built_here], None) is older


def test_round_robin_across_owners_and_oldest_first_within_an_owner():
    alice_old, alice_new, bob = batch(1, "alice"), batch(2, "alice"), batch(3, "bob", created=50)
    carol = batch(4, "carol", created=60)
    order, last = [], None
    for _ in range(6):
        pick = d.pick_batch(node(), [alice_old, alice_new, bob, carol], last)
        order.append((pick.owner, pick.id))
        last = pick.owner
    assert order == [("alice", 1), ("bob", 3), ("carol", 4)] * 2


def test_a_long_sweep_does_not_starve_a_small_batch_even_when_built_here():
    sweep = batch(1, "alice", queued=500, built=["n1"])
    small = batch(2, "bob", queued=3)
    assert d.pick_batch(node(), [sweep, small], "alice") is small
    assert d.pick_batch(node(), [sweep, small], "bob") is sweep


def test_capabilities_build_failures_pause_and_slots_exclude_a_node():
    foam = batch(1, caps=["openfoam"])
    assert d.pick_batch(node(caps=["python3"]), [foam], None) is None
    assert d.why_not(node(caps=["python3"]), foam) == "lacks openfoam"
    failed_here = batch(2, failed=["n1"])
    assert d.pick_batch(node(), [failed_here], None) is None
    assert d.why_not(node(), failed_here) == "the batch's build failed there"
    assert d.pick_batch(node("n2"), [failed_here], None) is failed_here
    assert d.why_not(node(paused=True), batch(3)) == "paused"
    assert d.why_not(node(free=0), batch(3)) == "busy"
    assert d.why_not(node(reachable=False), batch(3)) == "unreachable"
    assert d.pick_batch(node(free=0), [batch(3)], None) is None


def test_batches_with_nothing_queued_are_skipped():
    assert d.pick_batch(node(), [batch(1, queued=0)], None) is None


def test_missing_capabilities_names_each_one():
    assert d.missing_capabilities(["gpu", "python3", "openfoam"], ["python3"]) == ["gpu", "openfoam"]


def test_each_slot_gets_its_own_gpus():
    assert d.gpu_for_slot(0, 1, 0) is None
    assert d.gpu_for_slot(0, 1, 2) == "0,1"
    assert [d.gpu_for_slot(s, 2, 2) for s in range(2)] == ["0", "1"]
    assert [d.gpu_for_slot(s, 2, 4) for s in range(2)] == ["0,1", "2,3"]
    assert [d.gpu_for_slot(s, 4, 2) for s in range(4)] == ["0", "1", "0", "1"]


def test_store_round_trip_and_counts(tmp_path):
    store = d.Store(tmp_path / "db.sqlite")
    plan = d.BatchPlan("ns", "b", "shell")
    jobs = [(d.JobPlan(f"j{i}", command="true"), 1) for i in range(3)]
    batch_id = store.add_batch("ns", "b", "alice", plan, ["python3"], None, jobs)
    assert store.batch_counts(batch_id) == {"queued": 3}
    first = store.next_queued(batch_id)
    assert first.name == "j0" and first.retries == 1
    store.mark_started(first.id, f"{first.id}.1", "n1", 0)
    assert store.next_queued(batch_id).name == "j1"
    store.requeue(first.id, count_attempt=False)
    assert store.job(first.id).attempts == 0 and store.job(first.id).state == "queued"
    store.mark_started(first.id, f"{first.id}.1", "n1", 0)
    store.mark_ended(first.id, "done", 0)
    assert store.batch_counts(batch_id) == {"queued": 2, "done": 1}
    # a fresh connection sees the same (the head survives its restart from SQLite)
    again = d.Store(tmp_path / "db.sqlite")
    assert again.job(first.id).state == "done" and again.find_batch("ns", "b").owner == "alice"


def test_nodes_for_capabilities_uses_last_known_offers_and_trusts_probes_only_for_unseen_nodes():
    from distribute import nodes_for_capabilities
    offers = {"seen_py": (["python3"], True), "seen_bare": ([], True),
              "unseen": ([], False), "unseen_decl": (["fluent"], False)}
    probeable = ("python3", "gpu")
    assert nodes_for_capabilities(["python3"], offers, probeable) == (["seen_py"], ["unseen", "unseen_decl"])
    # a capability no probe finds counts only where it is declared
    assert nodes_for_capabilities(["fluent"], offers, probeable) == (["unseen_decl"], [])
    assert nodes_for_capabilities(["fluent", "gpu"], offers, probeable) == ([], ["unseen_decl"])
    assert nodes_for_capabilities(["matlab9"], offers, probeable) == ([], [])
    assert nodes_for_capabilities([], offers, probeable) == (list(offers), [])

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


# Resources (SPEC §6 "Resources"): capacity, packing, GPUs, anti-starvation, dependencies.

G = 1 << 30


def rnode(name="n1", cpus=32, memory=64 * G, gpus=0, running=(), slots=1, slots_cap=None, caps=("python3",)):
    """A node with a capacity and running allocations [(cpus, memory, gpus, ends)]."""
    allocs = [d.Allocation(d.Amount(c, m, g), [], e) for c, m, g, e in running]
    used = d.Amount()
    for a in allocs:
        used = used.plus(a.request)
    return d.NodeView(name, list(caps), gpus, slots - len(allocs), capacity=d.Amount(cpus, memory, gpus),
                      used=used, jobs=len(allocs), slots=slots, slots_cap=slots_cap, running=allocs)


def rbatch(id, cpus=1, memory=0, gpus=0, time=0, owner="alice", queued=5, waiting=None, caps=("python3",)):
    view = batch(id, owner, caps=caps, queued=queued)
    view.request, view.time, view.waiting = d.Amount(cpus, memory, gpus), time, waiting
    return view


def test_capacity_is_probed_or_declared_minus_the_owners_reserve():
    spec = d.NodeSpec("lab1", "h")
    assert d.node_capacity({"cpus": 16, "memory": 32 * G, "gpus": 2}, spec) == d.Amount(16, 32 * G, 2)
    spec.cpus, spec.memory, spec.reserve = 12, 20 * G, d.Resources(cpus=2, memory=4 * G, gpus=1)
    assert d.node_capacity({"cpus": 16, "memory": 32 * G, "gpus": 2}, spec) == d.Amount(10, 16 * G, 1)


def test_a_job_starts_only_where_its_request_fits_what_is_free():
    big = rbatch(1, cpus=24)
    assert d.why_not(rnode(running=[(16, 0, 0, None)]), big) == "16 of 32 cpus in use (needs 24)"
    assert d.pick_batch(rnode(running=[(16, 0, 0, None)]), [big], None) is None
    assert d.pick_batch(rnode(running=[(8, 0, 0, None)]), [big], None) is big
    assert d.why_not(rnode(cpus=16), big) == "needs 24 cpus, has 16"
    hungry = rbatch(2, cpus=1, memory=48 * G)
    assert d.why_not(rnode(running=[(1, 32 * G, 0, None)]), hungry) == "32G of 64G memory in use (needs 48G)"
    assert d.why_not(rnode(memory=16 * G), hungry) == "needs 48G memory, has 16G"


def test_packing_never_exceeds_capacity():
    """Greedy packing of mixed requests: at every step the sum of running requests fits."""
    import random
    rnd = random.Random(7)
    node = rnode(cpus=16, memory=32 * G, gpus=4)
    batches = [rbatch(i, cpus=rnd.choice([1, 2, 4, 8, 16]), memory=rnd.choice([0, G, 8 * G]),
                      gpus=rnd.choice([0, 0, 1, 2]), queued=1000, owner=f"u{i % 3}") for i in range(1, 7)]
    last = None
    for _ in range(200):
        choice = d.pick_batch(node, batches, last)
        if choice is None:           # full: end the oldest job
            gone = node.running.pop(0)
            node.used, node.jobs = node.used.minus(gone.request), node.jobs - 1
            continue
        last = choice.owner
        node.running.append(d.Allocation(choice.request))
        node.used, node.jobs = node.used.plus(choice.request), node.jobs + 1
        assert d.fits(node.used, node.capacity)


def test_gpu_indices_are_never_shared():
    assert d.assign_gpus(2, [], 4) == [0, 1]
    assert d.assign_gpus(2, [0, 1], 4) == [2, 3]
    assert d.assign_gpus(1, [0, 2], 4) == [1]
    assert d.assign_gpus(3, [0, 2], 4) is None
    assert d.assign_gpus(0, [0, 1, 2, 3], 4) == []


def test_slots_cap_jobs_with_resources_only_when_written():
    small = rbatch(1, cpus=1)
    assert d.why_not(rnode(running=[(1, 0, 0, None)] * 3), small) is None      # no cap: cpus decide
    assert d.why_not(rnode(running=[(1, 0, 0, None)] * 3, slots=3, slots_cap=3), small) == \
        "busy: 3 of 3 slots in use"


def test_a_job_without_resources_takes_its_slot_share_beside_jobs_with_resources():
    legacy = batch(1)
    node = rnode(cpus=32, slots=2, running=[(24, 0, 0, None)])
    assert d.why_not(node, legacy) == "24 of 32 cpus in use (needs 16)"
    assert d.why_not(rnode(cpus=32, slots=2, running=[(8, 0, 0, None)]), legacy) is None
    assert d.slot_share(d.Amount(32, 0, 4), 2) == d.Amount(16, 0, 2)


def test_add_refusal_names_the_shortfall_on_each_node():
    nodes = {"lab1": d.Amount(16, 32 * G, 0), "lab2": d.Amount(8, 64 * G, 2)}
    assert d.fit_problem([("a", d.Amount(8, G, 0))], nodes) is None
    assert d.fit_problem([("a", d.Amount(8, G, 0)), ("big", d.Amount(32, 48 * G, 1))], nodes) == (
        "job big fits no node: lab1 needs 32 cpus, has 16; needs 48G memory, has 32G; needs 1 gpus, has 0; "
        "lab2 needs 32 cpus, has 8")
    assert d.fit_problem([("big", d.Amount(32, 0, 0))], dict(nodes, lab3=None)) is None   # lab3 not probed yet


def test_a_large_job_holds_a_node_against_a_stream_of_small_ones():
    """Round-robin gives the big job's owner the turn; the node then takes no small job that
    would delay it, until the running jobs end and the big job fits."""
    big, small = rbatch(1, cpus=32, owner="alice"), rbatch(2, cpus=4, owner="bob", queued=1000)
    node = rnode(running=[(4, 0, 0, None)] * 4)
    choice, held = d.pick_for_node(node, [big, small], last_owner="bob", now=0)
    assert (choice, held) == (None, 1)
    # bob's turn next: still held, small jobs do not start
    choice, held = d.pick_for_node(node, [big, small], last_owner="alice", held=held, now=0)
    assert (choice, held) == (None, 1)
    # the running jobs end: the big job starts
    choice, held = d.pick_for_node(rnode(), [big, small], last_owner="alice", held=held, now=0)
    assert (choice, held) == (big, None)
    # a batch holds one node: elsewhere small jobs go on
    choice, held = d.pick_for_node(node, [big, small], last_owner="bob", held_elsewhere=[1], now=0)
    assert (choice, held) == (small, None)


def test_backfill_only_for_jobs_that_end_before_the_hold_is_due():
    big = rbatch(1, cpus=32, owner="alice")
    short, long_ = rbatch(2, cpus=4, time=600, owner="bob"), rbatch(3, cpus=4, time=7200, owner="carol")
    node = rnode(running=[(16, 0, 0, 1000.0), (8, 0, 0, 3600.0)])
    assert d.room_at(node, big.request, 0) == 3600.0
    choice, held = d.pick_for_node(node, [big, short, long_], last_owner="carol", now=0)
    assert (choice, held) == (short, 1)
    # a running job without a time limit: its end is unknown, no backfill
    choice, held = d.pick_for_node(rnode(running=[(16, 0, 0, None)]), [big, short], "bob", held=1, now=0)
    assert (choice, held) == (None, 1)


def test_fairness_between_owners_holds_with_resources():
    a, b = rbatch(1, cpus=2, owner="alice", queued=100), rbatch(2, cpus=2, owner="bob", queued=3)
    node, last, order = rnode(cpus=8), None, []
    for _ in range(4):
        choice, _ = d.pick_for_node(node, [a, b], last, now=0)
        order.append(choice.owner)
        last = choice.owner
        node.used, node.jobs = node.used.plus(choice.request), node.jobs + 1
    assert order == ["alice", "bob", "alice", "bob"]


def test_dependencies_wait_for_done_and_a_failed_dependency_blocks_with_a_reason():
    ended = {"ns/sweep": ("active", {"done": 3, "running": 2})}
    assert d.dependency_wait(["ns/sweep"], ended) == "waits for ns/sweep (3 of 5 jobs done)"
    assert d.dependency_wait(["ns/sweep"], {"ns/sweep": ("done", {"done": 5})}) is None
    failed = {"ns/sweep": ("done", {"done": 4, "failed": 1})}
    assert d.dependency_wait(["ns/sweep"], failed) == (
        "waits for ns/sweep, which ended with 1 failed or killed job(s): "
        "`distribute retry ns/sweep` until they succeed, or kill this batch")
    assert d.dependency_wait(["ns/sweep"], failed, after_failed="start") is None
    assert d.dependency_wait(["ns/gone"], {}) is None       # forgotten: it had ended
    waiting = rbatch(1, waiting="waits for ns/sweep (3 of 5 jobs done)")
    assert d.why_not(rnode(), waiting) == "waits for ns/sweep (3 of 5 jobs done)"
    assert d.pick_batch(rnode(), [waiting], None) is None


def test_jobs_asking_for_gpus_go_first_on_a_gpu_node():
    cpu_only, gpu_job = rbatch(1, cpus=1), rbatch(2, cpus=1, gpus=1)
    gpu_job.created = 99.0
    assert d.pick_batch(rnode(gpus=2), [cpu_only, gpu_job], None) is gpu_job


def test_without_resources_slots_decide_exactly_as_before():
    """Only jobs without resources on a node: its `slots` alone say how many run, whatever the cores."""
    for cpus, slots in ((32, 4), (2, 4), (1, 1), (8, 3)):
        node, legacy, started = rnode(cpus=cpus, slots=slots), batch(1, queued=100), 0
        while d.why_not(node, legacy) is None:
            share = d.slot_share(node.capacity, slots)
            node.running.append(d.Allocation(share))
            node.used, node.jobs, node.free_slots = node.used.plus(share), node.jobs + 1, node.free_slots - 1
            started += 1
        assert started == slots and d.why_not(node, legacy) == "busy"

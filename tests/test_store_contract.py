"""What every store does, whatever keeps the runs: these tests take the ``store`` (or
``open_store``) fixture and run once per kind of store (``stores.py``)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
import trio

from trioworker.models import (
    TIMED_OUT,
    ScheduleCreate,
    SetStateRequest,
    SetStateStatus,
    StateDetails,
    StateType,
    TaskRun,
    TaskRunCreate,
    make_state,
)
from trioworker.schedules import checked, idempotency_key
from trioworker.server.store import ConnectedWorker, LiveServer, RunIdTaken, Store, StoreError
from trioworker.server.store.base import LEASED_ELSEWHERE
from trioworker.server.store.commit import GroupCommitStore

from .stores import OpenStore


async def test_runs_survive_reopening(open_store: OpenStore) -> None:
    async with open_store() as store:
        [(run, queued)] = await store.create_runs([TaskRunCreate(task_key="k", parameters={"x": 1})])
        assert queued is not None
    async with open_store() as store:
        again = await store.read_run(run.id)
    assert again == run


async def test_idempotency_keys_are_scoped_to_task_keys(store: Store) -> None:
    results = await store.create_runs(
        [
            TaskRunCreate(task_key="a", idempotency_key="k"),
            TaskRunCreate(task_key="b", idempotency_key="k"),
            TaskRunCreate(task_key="a", idempotency_key="k"),
            TaskRunCreate(task_key="a"),
            TaskRunCreate(task_key="a"),
        ]
    )
    [a, b, a_again, plain_1, plain_2] = [run for run, _ in results]
    assert [queued is None for _, queued in results] == [False, False, True, False, False]
    assert a.id != b.id and a_again.id == a.id and plain_1.id != plain_2.id


async def test_runs_are_found_by_task_key_and_idempotency_key(store: Store) -> None:
    results = await store.create_runs(
        [
            TaskRunCreate(task_key="a", idempotency_key="k"),
            TaskRunCreate(task_key="b", idempotency_key="k"),
            TaskRunCreate(task_key="a", idempotency_key="other"),
            TaskRunCreate(task_key="a"),
        ]
    )
    a_k, b_k, a_other, _ = (run.id for run, _ in results)
    await store.delete_run(a_other)
    asked = [("a", "k"), ("b", "k"), ("a", "other"), ("b", "other"), ("c", "k"), ("a", "k")]
    assert await store.runs_by_idempotency_key(asked) == {("a", "k"): a_k, ("b", "k"): b_k}
    assert await store.runs_by_idempotency_key([]) == {}
    assert await store.runs_by_idempotency_key([("a", "a\x00k")]) == {}  # no key holds NUL


async def test_claim_skips_runs_that_are_no_longer_scheduled(store: Store) -> None:
    created = await store.create_runs([TaskRunCreate(task_key="k") for _ in range(3)])
    ids = [run.id for run, _ in created]
    await store.set_states([(ids[1], SetStateRequest(make_state(StateType.CANCELLED)))], now=time.time())
    claimed = await store.claim_runs([*ids, uuid.uuid4()], "c")
    assert [r.id for r in claimed] == [ids[0], ids[2]]
    assert {r.state.type for r in claimed} == {StateType.PENDING}
    assert await store.claim_runs(ids, "c") == []


async def test_recover_requeues_held_runs(open_store: OpenStore) -> None:
    async with open_store() as store:
        created = await store.create_runs([TaskRunCreate(task_key="k") for _ in range(3)])
        ids = [run.id for run, _ in created]
        await store.claim_runs(ids[:2], "c")
        await store.set_states([(ids[0], SetStateRequest(make_state(StateType.RUNNING)))], now=time.time())
    async with open_store() as store:
        queued = await store.recover(max_deliveries=5)
        assert [q.id for q in queued] == ids
        runs = await store.read_runs(ids[:2])
        assert {(r.state.type, r.state.name) for r in runs} == {(StateType.SCHEDULED, "Redelivered")}


async def test_read_ended_gives_the_ended_runs_and_the_ids_that_exist(store: Store) -> None:
    created = await store.create_runs([TaskRunCreate(task_key="k") for _ in range(3)])
    done, waiting, gone = (run for run, _ in created)
    cancel = SetStateRequest(make_state(StateType.CANCELLED))
    await store.set_states([(done.id, cancel)], now=0.0)
    await store.delete_run(gone.id)
    ended, found = await store.read_ended([done.id, waiting.id, gone.id])
    assert [run.id for run in ended] == [done.id]
    assert ended[0].state.type is StateType.CANCELLED
    assert found == {done.id, waiting.id}


async def test_operations_queued_at_close_run_and_later_ones_are_refused(open_store: OpenStore) -> None:
    async with open_store() as store:
        [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        at_close = store.claim_runs_soon([run], "c-1", run.created)  # queued, not awaited
    [claimed] = await at_close.result()  # it ran before the store closed
    assert claimed.state.type is StateType.PENDING
    with pytest.raises(StoreError, match="the store is closed"):
        await store.read_run(run.id)
    with pytest.raises(StoreError, match="the store is closed"):
        store.claim_runs_soon([run], "c-2", run.created)
    async with open_store() as store:
        again = await store.read_run(run.id)
    assert again is not None and again.state.type is StateType.PENDING  # the claim was saved


def state(state_type: StateType, message: str | None = None) -> SetStateRequest:
    return SetStateRequest(make_state(state_type, message=message))


async def test_history_keeps_every_state_exactly(store: Store) -> None:
    [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
    [claimed] = await store.claim_runs([run.id], "c")
    message = "nul\x00, escape \x1b[31m and \u00e9"
    [running, failed] = await store.set_states(
        [(run.id, state(StateType.RUNNING)), (run.id, state(StateType.FAILED, message))], now=time.time()
    )
    assert running.run is not None and failed.run is not None
    history = await store.history(run.id)
    assert history is not None
    assert [(h.type, h.name, h.timestamp, h.message) for h in history] == [
        (s.type, s.name, s.timestamp, s.message)
        for s in (run.state, claimed.state, running.run.state, failed.run.state)
    ]
    assert history[-1].message == message
    assert await store.read_run(run.id) == failed.run
    assert await store.delete_run(run.id) == failed.run
    assert await store.history(run.id) is None
    assert await store.read_run(run.id) is None


async def test_a_batch_refused_for_a_taken_id_writes_nothing(store: Store) -> None:
    [(taken, _)] = await store.create_runs([TaskRunCreate(task_key="a")])
    with pytest.raises(RunIdTaken, match=f"task run id {taken.id} is taken by a run of task 'a', not 'b'"):
        await store.create_runs([TaskRunCreate(task_key="a"), TaskRunCreate(task_key="b", id=taken.id)])
    with pytest.raises(RunIdTaken, match="with idempotency key None, not 'k'"):
        await store.create_runs([TaskRunCreate(task_key="a", id=taken.id, idempotency_key="k")])
    assert await store.list_runs() == [taken]
    [(again, queued)] = await store.create_runs([TaskRunCreate(task_key="a", id=taken.id)])
    assert (again, queued) == (taken, None)


async def test_repeats_in_one_batch_get_the_first_run(store: Store) -> None:
    given = uuid.uuid4()
    results = await store.create_runs(
        [
            TaskRunCreate(task_key="a", id=given),
            TaskRunCreate(task_key="a", id=given),
            TaskRunCreate(task_key="a", idempotency_key="k"),
            TaskRunCreate(task_key="a", idempotency_key="k", id=uuid.uuid4()),
        ]
    )
    [(first, q1), (repeat, q2), (keyed, q3), (keyed_again, q4)] = results
    assert first.id == given and repeat == first
    assert keyed_again == keyed
    assert [q is None for q in (q1, q2, q3, q4)] == [False, True, False, True]
    assert q1 is not None and q3 is not None and q1.seq < q3.seq
    assert len(await store.list_runs()) == 2


async def test_list_runs_filters_in_creation_order(store: Store) -> None:
    created = [run for run, _ in await store.create_runs([TaskRunCreate(task_key=k) for k in "abab"])]
    await store.set_states([(created[2].id, state(StateType.CANCELLED))], now=time.time())
    assert [r.id for r in await store.list_runs(task_key="a")] == [created[0].id, created[2].id]
    assert [r.id for r in await store.list_runs(state=StateType.SCHEDULED)] == [
        created[0].id,
        created[1].id,
        created[3].id,
    ]
    assert [r.id for r in await store.list_runs(task_key="a", state=StateType.CANCELLED)] == [created[2].id]
    assert [r.id for r in await store.list_runs(limit=2, offset=1)] == [created[1].id, created[2].id]
    assert await store.list_runs(task_key="nobody") == []


async def test_a_reconnected_client_keeps_what_nobody_else_took(store: Store) -> None:
    created = await store.create_runs([TaskRunCreate(task_key="k") for _ in range(3)])
    held, requeued, taken = (run.id for run, _ in created)
    await store.claim_runs([held, requeued, taken], "c")
    await store.requeue([requeued, taken], reason="redelivery", max_deliveries=5)
    await store.claim_runs([taken], "other")
    kept, lost = await store.reclaim([held, requeued, taken, uuid.uuid4()], "c")
    assert kept == [held, requeued] and len(lost) == 2 and lost[0] == taken
    runs = {run.id: run for run in await store.read_runs([held, requeued, taken])}
    assert runs[held].state.type is StateType.PENDING
    assert (runs[requeued].state.type, runs[requeued].state.state_details.client_id) == (
        StateType.RUNNING,
        "c",
    )
    assert runs[taken].state.state_details.client_id == "other"


async def test_a_run_delivered_too_often_crashes_and_a_release_is_not_a_delivery(store: Store) -> None:
    [(run, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
    for _ in range(2):
        await store.claim_runs([run.id], "c")
        [released] = await store.requeue([run.id], reason="release", max_deliveries=1)
        assert released.state_type is StateType.SCHEDULED and released.queued is not None
    await store.claim_runs([run.id], "c")
    [crashed] = await store.requeue([run.id], reason="redelivery", max_deliveries=1)
    assert (crashed.state_type, crashed.queued) == (StateType.CRASHED, None)
    [again] = await store.requeue([run.id], reason="redelivery", max_deliveries=1)  # not held: reported
    assert (again.state_type, again.queued) == (StateType.CRASHED, None)


async def test_recover_gives_due_times_and_dependencies(open_store: OpenStore) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    async with open_store() as store:
        [(upstream, _)] = await store.create_runs([TaskRunCreate(task_key="k")])
        [(delayed, _), (gated, _)] = await store.create_runs(
            [
                TaskRunCreate(task_key="k", scheduled_time=later),
                TaskRunCreate(task_key="j", wait_for=[upstream.id]),
            ]
        )
    async with open_store() as store:
        queued = await store.recover(max_deliveries=5)
    assert [(q.id, q.task_key, q.scheduled_at, q.wait_for) for q in queued] == [
        (upstream.id, "k", None, ()),
        (delayed.id, "k", later.timestamp(), ()),
        (gated.id, "j", None, (upstream.id,)),
    ]
    assert [q.seq for q in queued] == sorted(q.seq for q in queued)


async def test_concurrent_writes_share_commits(store: Store) -> None:
    assert isinstance(store, GroupCommitStore)
    before = store.statistics()
    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(store.create_runs, [TaskRunCreate(task_key="k", parameters={"i": i})])
    after = store.statistics()
    assert after.operations - before.operations == 200
    assert after.commits - before.commits < 20
    assert len(await store.list_runs(limit=1000)) == 200


async def test_a_failing_operation_does_not_spoil_its_group(store: Store) -> None:
    assert isinstance(store, GroupCommitStore)
    [(taken, _)] = await store.create_runs([TaskRunCreate(task_key="a")])
    before = store.statistics()
    now = time.time()
    # All queued before any await, so they share one group commit.
    good = [store._queue(lambda ops: ops.create_runs([TaskRunCreate(task_key="c")], now)) for _ in range(2)]
    bad = store._queue(lambda ops: 1 / 0)
    refused = store._queue(
        lambda ops: ops.create_runs(
            [TaskRunCreate(task_key="b"), TaskRunCreate(task_key="b", id=taken.id)], now
        )
    )
    for pending in good:
        await pending.result()
    with pytest.raises(ZeroDivisionError):
        await bad.result()
    with pytest.raises(RunIdTaken):
        await refused.result()
    assert store.statistics().commits - before.commits == 1  # one group: the failures undid only themselves
    assert sorted(run.task_key for run in await store.list_runs()) == ["a", "c", "c"]


# -- what the operator's view reads


async def test_list_runs_newest_first_and_by_parent(store: Store) -> None:
    [(parent, _)] = await store.create_runs([TaskRunCreate(task_key="p")])
    created = await store.create_runs(
        [
            TaskRunCreate(task_key="k", parent_task_run_id=parent.id),
            TaskRunCreate(task_key="k"),
            TaskRunCreate(task_key="other", parent_task_run_id=parent.id),
            TaskRunCreate(task_key="k", parent_task_run_id=parent.id),
        ]
    )
    ids = [run.id for run, _ in created]
    everything = await store.list_runs(newest_first=True)
    assert [r.id for r in everything] == [*reversed(ids), parent.id]
    assert [r.id for r in await store.list_runs(newest_first=True, limit=2, offset=1)] == [ids[2], ids[1]]
    children = await store.list_runs(parent_task_run_id=parent.id)
    assert [r.id for r in children] == [ids[0], ids[2], ids[3]]
    keyed = await store.list_runs(task_key="k", parent_task_run_id=parent.id, newest_first=True)
    assert [r.id for r in keyed] == [ids[3], ids[0]]
    assert await store.list_runs(parent_task_run_id=ids[0]) == []


async def test_find_runs_by_the_start_of_their_ids(store: Store) -> None:
    texts = [
        "0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a12",
        "0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a10",
        "0b7c7c36-9000-4a4e-9f6e-2f1d2c9b6a10",
        "0b7c7c37-0000-4000-8000-000000000000",
        "9fffffff-ffff-4fff-bfff-ffffffffffff",
        "a0000000-0000-4000-8000-000000000000",
        "ffffffff-ffff-4fff-bfff-ffffffffffff",
    ]
    await store.create_runs([TaskRunCreate(task_key="k", id=uuid.UUID(text)) for text in texts])

    async def found(prefix: str, limit: int = 10) -> list[str]:
        return [str(run.id) for run in await store.find_runs(prefix, limit=limit)]

    assert await found("0b7c7c36") == sorted(texts[:3])  # in id order, not creation order
    assert await found("0b7c7c36", limit=2) == sorted(texts[:2])
    assert await found("0b7c7c36-8d3a") == sorted(texts[:2])
    assert await found("0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a10") == [texts[1]]
    assert await found("0b7c7c3") == sorted(texts[:4])
    assert await found("9") == [texts[4]]  # the range after "9" is ":", before "a"
    assert await found("f") == [texts[6]]  # the range after "f" is "g"
    assert await found("0b7c7c38") == []
    assert len(await found("", limit=100)) == len(texts)


async def test_count_runs_by_task_key_and_state(store: Store) -> None:
    created = await store.create_runs([TaskRunCreate(task_key=k) for k in ("a", "a", "a", "b")])
    a1, a2, _, b1 = (run.id for run, _ in created)
    await store.set_states([(a1, SetStateRequest(make_state(StateType.CANCELLED)))], now=time.time())
    await store.claim_runs([a2, b1], "c")
    counts = {(c.task_key, c.state_type): c.count for c in await store.count_runs()}
    assert counts == {
        ("a", StateType.CANCELLED): 1,
        ("a", StateType.PENDING): 1,
        ("a", StateType.SCHEDULED): 1,
        ("b", StateType.PENDING): 1,
    }
    await store.delete_run(b1)
    assert {(c.task_key, c.state_type) for c in await store.count_runs()} == set(counts) - {
        ("b", StateType.PENDING)
    }


async def test_count_ended_by_minute_key_and_state(store: Store) -> None:
    before = datetime.now(UTC) - timedelta(seconds=1)
    created = await store.create_runs([TaskRunCreate(task_key=k) for k in ("a", "a", "b", "b", "b")])
    a1, a2, b1, b2, b3 = (run.id for run, _ in created)
    ended = [
        (a1, StateType.COMPLETED),
        (a2, StateType.FAILED),
        (b1, StateType.COMPLETED),
        (b2, StateType.COMPLETED),
        (b3, StateType.CANCELLED),
    ]
    for run_id, state in ended:
        if state is not StateType.CANCELLED:
            await store.claim_runs([run_id], "c")
            await store.set_states([(run_id, SetStateRequest(make_state(StateType.RUNNING)))], now=0.0)
        await store.set_states([(run_id, SetStateRequest(make_state(state)))], now=0.0)
    after = datetime.now(UTC)
    await store.delete_run(a2)  # a deleted run's end is not counted
    counts = await store.count_ended(before)
    totals: Counter[tuple[str, StateType]] = Counter()
    for count in counts:  # two minutes, when the test crossed a minute's end
        totals[count.task_key, count.state_type] += count.count
    assert totals == {
        ("a", StateType.COMPLETED): 1,
        ("b", StateType.CANCELLED): 1,
        ("b", StateType.COMPLETED): 2,
    }
    for count in counts:
        assert count.minute.tzinfo is not None and count.minute.second == count.minute.microsecond == 0
        assert before.replace(second=0, microsecond=0) <= count.minute <= after
    assert [c.minute for c in counts] == sorted(c.minute for c in counts)
    assert await store.count_ended(after + timedelta(seconds=1)) == []
    assert await store.count_ended(before, after + timedelta(seconds=1)) == counts  # until: not included
    assert await store.count_ended(before, before) == []


async def test_a_store_no_other_server_uses_lists_only_the_server_that_asks(store: Store) -> None:
    worker = ConnectedWorker("w", ["k"], 1, 0, 0, datetime.now(UTC), uuid.uuid4())
    here = LiveServer(worker.server, "1.0", datetime.now(UTC), "http://here", None, [worker])
    assert await store.live_servers(here) == [here]


async def test_oldest_waiting_is_the_due_run_created_first_per_key(store: Store) -> None:
    now = datetime.now(UTC)
    created = await store.create_runs(
        [
            TaskRunCreate(task_key="b", scheduled_time=now + timedelta(hours=1)),  # not due
            TaskRunCreate(task_key="b"),
            TaskRunCreate(task_key="a"),
            TaskRunCreate(task_key="a"),
            TaskRunCreate(task_key="c"),
            TaskRunCreate(task_key="d", scheduled_time=now - timedelta(minutes=5)),  # due
        ]
    )
    _, b_due, a_first, a_second, c_only, d_due = (run.id for run, _ in created)
    await store.claim_runs([c_only], "c")  # no longer waiting
    oldest = await store.oldest_waiting(now)
    assert [(r.task_key, r.id) for r in oldest] == [("a", a_first), ("b", b_due), ("d", d_due)]
    await store.claim_runs([a_first], "c")
    assert [r.id for r in await store.oldest_waiting(now)] == [a_second, b_due, d_due]


async def _end(store: Store, run_id: uuid.UUID, state: StateType) -> datetime:
    """End the run in ``state`` (through RUNNING unless cancelled); the time it ended."""
    if state is not StateType.CANCELLED:
        await store.claim_runs([run_id], "c")
        await store.set_states([(run_id, SetStateRequest(make_state(StateType.RUNNING)))], now=0.0)
    [change] = await store.set_states([(run_id, SetStateRequest(make_state(state)))], now=0.0)
    assert change.run is not None and change.run.state.type is state
    return change.run.state.timestamp


async def test_purge_ended_deletes_runs_that_ended_before_a_time_first_ended_first(store: Store) -> None:
    assert await store.oldest_end() is None
    created = await store.create_runs([TaskRunCreate(task_key=k) for k in ("a", "a", "b", "a", "a", "a")])
    first, cancelled, other_key, waiting, revived, late = (run.id for run, _ in created)
    first_end = await _end(store, first, StateType.COMPLETED)
    await _end(store, cancelled, StateType.CANCELLED)
    await _end(store, other_key, StateType.FAILED)
    await _end(store, revived, StateType.FAILED)  # then set back to SCHEDULED: not ended any more
    back = SetStateRequest(make_state(StateType.SCHEDULED), force=True)
    await store.set_states([(revived, back)], now=0.0)
    late_end = await _end(store, late, StateType.COMPLETED)
    assert await store.oldest_end() == first_end

    assert await store.purge_ended(first_end) == []  # ended before: strictly earlier
    assert await store.purge_ended(late_end, task_key="a", state=StateType.FAILED) == []
    assert await store.purge_ended(late_end, limit=1) == [first]
    assert await store.history(first) is None and await store.read_run(first) is None
    assert await store.purge_ended(late_end, task_key="b") == [other_key]
    assert await store.purge_ended(late_end + timedelta(seconds=1), state=StateType.CANCELLED) == [cancelled]
    assert await store.oldest_end() == late_end
    assert await store.purge_ended(late_end + timedelta(seconds=1)) == [late]
    assert await store.oldest_end() is None
    left = {run.id: run.state.type for run in await store.list_runs()}
    assert left == {waiting: StateType.SCHEDULED, revived: StateType.SCHEDULED}
    history = await store.history(revived)
    assert history is not None and [c.type for c in history][-2:] == [StateType.FAILED, StateType.SCHEDULED]
    counts = {(c.task_key, c.state_type): c.count for c in await store.count_runs()}
    assert counts == {("a", StateType.SCHEDULED): 2}


async def test_purge_ended_goes_in_batches_of_the_limit(store: Store) -> None:
    created = await store.create_runs([TaskRunCreate(task_key="k") for _ in range(7)])
    ids = [run.id for run, _ in created]
    for run_id in ids:
        await _end(store, run_id, StateType.CANCELLED)
    before = datetime.now(UTC) + timedelta(seconds=1)
    batches = [await store.purge_ended(before, limit=3) for _ in range(4)]
    assert batches == [ids[:3], ids[3:6], ids[6:], []]


# --------------------------------------------------------------------------- tags


async def test_list_runs_by_tags_finds_the_runs_with_every_tag(store: Store) -> None:
    created = await store.create_runs(
        [
            TaskRunCreate(task_key="a", tags=["x", "y"]),
            TaskRunCreate(task_key="a", tags=["y"]),
            TaskRunCreate(task_key="b", tags=["x", "x"]),
            TaskRunCreate(task_key="a"),
        ]
    )
    xy, y, x, _ = (run for run, _ in created)
    assert x.tags == ["x"]  # a tag given twice is kept once
    assert [r.id for r in await store.list_runs(tags=["x"])] == [xy.id, x.id]
    assert [r.id for r in await store.list_runs(tags=["y"], newest_first=True)] == [y.id, xy.id]
    assert [r.id for r in await store.list_runs(tags=["x", "y"])] == [xy.id]
    assert [r.id for r in await store.list_runs(tags=["x"], task_key="b")] == [x.id]
    assert [r.id for r in await store.list_runs(tags=["y"], limit=1, offset=1)] == [y.id]
    assert await store.list_runs(tags=["nobody"]) == []
    assert await store.list_runs(tags=["x\x00"]) == []
    await store.delete_run(xy.id)
    assert [r.id for r in await store.list_runs(tags=["x"])] == [x.id]
    [(again, _)] = await store.create_runs([TaskRunCreate(task_key="a", tags=["x"])])
    assert [r.id for r in await store.list_runs(tags=["x"])] == [x.id, again.id]


# --------------------------------------------------------------------------- the cache


def cached(key: str = "c", **fields: object) -> TaskRunCreate:
    fields.setdefault("parameters", {"n": 1})
    return TaskRunCreate(task_key="k", cache_key=key, **fields)  # type: ignore[arg-type]


async def _complete(store: Store, run_id: uuid.UUID, data: object, now: float) -> None:
    await store.claim_runs([run_id], "c")
    [_, completed] = await store.set_states(
        [
            (run_id, state(StateType.RUNNING)),
            (run_id, SetStateRequest(make_state(StateType.COMPLETED, data=data))),
        ],
        now=now,
    )
    assert completed.result.status.value == "ACCEPT", completed.result


async def test_runs_of_one_cache_key_wait_for_the_first_then_reuse_its_result(store: Store) -> None:
    now = time.time()
    [(first, q1), (second, q2)] = await store.create_runs([cached(), cached()], now=now)
    assert q1 is not None and q2 is not None
    assert (first.state.type, first.state.state_details.cache_owner, q1.wait_for) == (
        StateType.SCHEDULED,
        None,
        (),
    )
    assert second.state.state_details.cache_owner == first.id
    assert (q2.wait_for, q2.cache_owner) == ((first.id,), first.id)
    assert second.wait_for == []  # the run's own wait_for is the submitter's
    await _complete(store, first.id, {"answer": 42}, now)
    [done] = await store.read_runs([first.id])
    assert (done.state.state_details.cache_key, done.state.state_details.cache_expiration) == ("c", None)
    [settled] = await store.settle_cached([second.id], now=now)
    assert settled.run is not None and settled.queued is None
    assert (settled.run.state.type, settled.run.state.name) == (StateType.COMPLETED, "Cached")
    assert settled.run.state.data == {"answer": 42}
    assert await store.read_run(second.id) == settled.run
    [(third, q3)] = await store.create_runs([cached()], now=now)
    assert (third.state.type, third.state.name, third.state.data) == (
        StateType.COMPLETED,
        "Cached",
        {"answer": 42},
    )
    assert q3 is not None  # new, though not queued
    history = await store.history(third.id)
    assert history is not None and [(h.type, h.name) for h in history] == [
        (StateType.SCHEDULED, "Scheduled"),
        (StateType.COMPLETED, "Cached"),
    ]
    [(other_key, _)] = await store.create_runs([cached("d")], now=now)
    assert other_key.state.type is StateType.SCHEDULED  # another key: computed
    [(other_task, _)] = await store.create_runs([TaskRunCreate(task_key="j", cache_key="c")], now=now)
    assert other_task.state.state_details.cache_owner is None  # keys are per task key


async def test_a_run_born_cancelled_neither_reuses_nor_takes_its_cache_key(store: Store) -> None:
    now = time.time()
    [(first, _)] = await store.create_runs([cached()], now=now)
    await _complete(store, first.id, {"answer": 42}, now)
    group = uuid.uuid4()
    await store.cancel_group(group, now=now)
    [(doomed, entry)] = await store.create_runs([cached(group_id=group)], now=now)
    assert entry is not None  # new, its entry made, never queued
    assert doomed.state.type is StateType.CANCELLED and doomed.state.data is None
    [(fresh, _)] = await store.create_runs([cached("other", group_id=group)], now=now)
    assert fresh.state.type is StateType.CANCELLED
    [(computing, _)] = await store.create_runs([cached("other")], now=now)
    assert computing.state.type is StateType.SCHEDULED
    assert computing.state.state_details.cache_owner is None  # the cancelled run took no key
    [(reused, _)] = await store.create_runs([cached()], now=now)
    assert reused.state.type is StateType.COMPLETED and reused.state.name == "Cached"


async def test_a_cached_result_expires(store: Store) -> None:
    now = time.time()
    [(first, _)] = await store.create_runs([cached(cache_expiration=60.0)], now=now)
    await _complete(store, first.id, 1, now)
    [done] = await store.read_runs([first.id])
    expires = done.state.state_details.cache_expiration
    assert expires is not None and abs(expires.timestamp() - (now + 60)) < 1e-3
    [(reused, _)] = await store.create_runs([cached()], now=now + 59)
    assert reused.state.name == "Cached"
    assert reused.state.state_details.cache_expiration == expires
    [(expired, q)] = await store.create_runs([cached()], now=now + 61)
    assert (expired.state.type, expired.state.state_details.cache_owner) == (StateType.SCHEDULED, None)
    assert q is not None and q.wait_for == ()
    [(waiting, _)] = await store.create_runs([cached()], now=now + 62)
    assert waiting.state.state_details.cache_owner == expired.id  # the key is its now


async def test_when_the_run_computing_a_key_fails_the_first_waiting_run_computes_it(store: Store) -> None:
    now = time.time()
    [(owner, _), (first, _), (second, _)] = await store.create_runs([cached(), cached(), cached()], now=now)
    await store.claim_runs([owner.id], "c")
    await store.set_states(
        [(owner.id, state(StateType.RUNNING)), (owner.id, state(StateType.FAILED))], now=now
    )
    changes = await store.settle_cached([second.id, first.id], now=now)
    by_id = {c.run.id: c for c in changes if c.run is not None}
    computes, waits = by_id[first.id], by_id[second.id]
    assert computes.run is not None and computes.queued is not None
    assert computes.run.state.type is StateType.SCHEDULED
    assert (computes.run.state.state_details.cache_owner, computes.queued.wait_for) == (None, ())
    assert waits.run is not None and waits.queued is not None
    assert waits.run.state.state_details.cache_owner == first.id
    assert (waits.queued.wait_for, waits.queued.cache_owner) == ((first.id,), first.id)
    # Settling again changes nothing.
    again = await store.settle_cached([first.id, second.id], now=now)
    assert [c.result.details for c in again] == ["unchanged", "unchanged"]
    assert [c.queued for c in again] == [computes.queued, waits.queued]


async def test_refresh_cache_computes_again_and_its_result_replaces_the_old(store: Store) -> None:
    now = time.time()
    [(first, _)] = await store.create_runs([cached()], now=now)
    await _complete(store, first.id, "old", now)
    [(fresh, _)] = await store.create_runs([cached(refresh_cache=True)], now=now)
    assert fresh.state.type is StateType.SCHEDULED and fresh.refresh_cache
    [(waiting, _)] = await store.create_runs([cached()], now=now)
    assert waiting.state.state_details.cache_owner == fresh.id
    await _complete(store, fresh.id, "new", now)
    [(after, _)] = await store.create_runs([cached()], now=now)
    assert (after.state.name, after.state.data) == ("Cached", "new")


async def test_a_result_is_reused_only_with_the_same_serializer(store: Store) -> None:
    now = time.time()
    [(first, _)] = await store.create_runs([cached()], now=now)
    await _complete(store, first.id, 1, now)
    [(pickled, _)] = await store.create_runs([cached(serializer="pickle", parameters="cGlja2xl")], now=now)
    assert (pickled.state.type, pickled.state.state_details.cache_owner) == (StateType.SCHEDULED, None)


async def test_a_deleted_or_purged_run_takes_its_cached_result_along(store: Store) -> None:
    now = time.time()
    [(first, _)] = await store.create_runs([cached()], now=now)
    await _complete(store, first.id, 1, now)
    await store.delete_run(first.id)
    [(second, _)] = await store.create_runs([cached()], now=now)
    assert (second.state.type, second.state.state_details.cache_owner) == (StateType.SCHEDULED, None)
    await _complete(store, second.id, 2, now)
    assert (await store.create_runs([cached()], now=now))[0][0].state.data == 2
    await store.purge_ended(datetime.now(UTC) + timedelta(seconds=1), task_key="k")
    [(third, _)] = await store.create_runs([cached()], now=now)
    assert (third.state.type, third.state.state_details.cache_owner) == (StateType.SCHEDULED, None)


async def test_recover_names_the_run_a_waiting_run_waits_for(open_store: OpenStore) -> None:
    async with open_store() as store:
        [(owner, _), (waiting, _)] = await store.create_runs([cached(), cached()])
    async with open_store() as store:
        queued = {q.id: q for q in await store.recover(max_deliveries=5)}
        assert (queued[owner.id].wait_for, queued[owner.id].cache_owner) == ((), None)
        assert (queued[waiting.id].wait_for, queued[waiting.id].cache_owner) == ((owner.id,), owner.id)


async def test_a_waiting_run_set_scheduled_by_force_is_freed_when_settled(open_store: OpenStore) -> None:
    async with open_store() as store:
        [(owner, _), (waiting, _)] = await store.create_runs([cached(), cached()])
        forced = SetStateRequest(make_state(StateType.SCHEDULED), force=True)
        [change] = await store.set_states([(waiting.id, forced)], now=time.time())
        assert change.queued is not None and change.queued.wait_for == ()
        [settled] = await store.settle_cached([waiting.id], now=time.time())
        assert settled.result.details == "unchanged" and settled.queued is not None
        assert settled.queued.wait_for == ()
    async with open_store() as store:
        queued = {q.id: q for q in await store.recover(max_deliveries=5)}
        assert queued[waiting.id].wait_for == () and queued[owner.id].wait_for == ()


# -- schedules (periodic runs)

#: A moment before every tick the schedule tests use.
T0 = datetime(2030, 1, 1, 9, 30, tzinfo=UTC)


def at(hour: int, minute: int = 0, second: int = 0) -> datetime:
    return T0.replace(hour=hour, minute=minute, second=second)


def hourly(name: str = "s", **changes: Any) -> ScheduleCreate:
    create = ScheduleCreate(name=name, task_key="k", interval=3600, parameters={"x": 1})
    return checked(attrs.evolve(create, **changes))


async def test_a_schedule_is_created_kept_when_sent_again_changed_and_deleted(store: Store) -> None:
    created, new = await store.upsert_schedule(hourly(), T0)
    assert new and created.next_fire_time == at(10) and created.created == created.updated == T0
    assert created.last_fire_time is None and created.definition() == hourly()
    same, new = await store.upsert_schedule(hourly(), T0 + timedelta(minutes=10))
    assert not new and same == created  # nothing differs: nothing written
    changed, new = await store.upsert_schedule(hourly(interval=60), T0 + timedelta(minutes=10))
    assert not new and changed.interval == 60 and changed.created == T0
    assert changed.next_fire_time == at(9, 41) and changed.updated == at(9, 40)
    assert await store.read_schedules() == [changed]
    assert await store.read_schedules("s") == [changed] and await store.read_schedules("t") == []
    other, _ = await store.upsert_schedule(hourly("a"), T0)
    assert [s.name for s in await store.read_schedules()] == ["a", "s"]  # by name
    assert await store.delete_schedule("s") == changed
    assert await store.delete_schedule("s") is None
    assert await store.read_schedules() == [other]


async def test_firing_creates_one_run_per_tick_and_moves_the_next_fire_time(store: Store) -> None:
    schedule, _ = await store.upsert_schedule(hourly(), T0)
    early = await store.fire_schedules(at(9, 59).timestamp())
    assert (early.runs, early.schedules, early.next_due) == ([], [], at(10).timestamp())
    fired = await store.fire_schedules(at(10, 0, 2).timestamp())
    [(run, queued)] = fired.runs
    assert (run.task_key, run.parameters, run.state.type) == ("k", {"x": 1}, StateType.SCHEDULED)
    assert run.idempotency_key == idempotency_key(schedule, at(10)) == "schedule/s/2030-01-01T10:00:00+00:00"
    assert run.state.state_details.scheduled_time == at(10) and queued.scheduled_at == at(10).timestamp()
    [after] = fired.schedules
    assert (after.next_fire_time, after.last_fire_time, after.last_run_id) == (at(11), at(10), run.id)
    assert fired.next_due == at(11).timestamp()
    again = await store.fire_schedules(at(10, 0, 3).timestamp())
    assert (again.runs, again.schedules) == ([], [])
    assert await store.read_schedules() == [after]
    assert await store.read_runs([run.id]) == [run]


async def test_a_tick_whose_run_exists_makes_no_second_one(store: Store) -> None:
    schedule, _ = await store.upsert_schedule(hourly(), T0)
    [(made, _)] = await store.create_runs(
        [TaskRunCreate(task_key="k", idempotency_key=idempotency_key(schedule, at(10)))]
    )
    fired = await store.fire_schedules(at(10).timestamp())
    assert fired.runs == []  # the tick's run was there (fired by another server, say)
    [after] = fired.schedules
    assert (after.last_run_id, after.next_fire_time) == (made.id, at(11))


async def test_missed_ticks_are_skipped_or_fire_once(store: Store) -> None:
    await store.upsert_schedule(hourly("skip"), T0)
    await store.upsert_schedule(hourly("once", catchup="once"), T0)
    # No server fired 10:00, 11:00, 12:00 or 13:00: the latest is 20 minutes late.
    fired = await store.fire_schedules(at(13, 20).timestamp())
    [(run, _)] = fired.runs
    assert run.idempotency_key == "schedule/once/2030-01-01T13:00:00+00:00"
    after = {s.name: s for s in fired.schedules}
    assert after["once"].last_fire_time == at(13) and after["skip"].last_fire_time is None
    assert after["once"].next_fire_time == after["skip"].next_fire_time == at(14)
    # A tick less than a minute late (a restart) fires under both policies.
    fired = await store.fire_schedules(at(14, 0, 40).timestamp())
    assert sorted(run.idempotency_key or "" for run, _ in fired.runs) == [
        "schedule/once/2030-01-01T14:00:00+00:00",
        "schedule/skip/2030-01-01T14:00:00+00:00",
    ]


async def test_schedules_survive_reopening(open_store: OpenStore) -> None:
    async with open_store() as store:
        made, _ = await store.upsert_schedule(
            hourly(cron="0 9 * * 1-5", interval=None, timezone="Europe/Paris"), T0
        )
    async with open_store() as store:
        assert await store.read_schedules() == [made]
    assert made.next_fire_time == datetime(2030, 1, 2, 8, 0, tzinfo=UTC)  # 9:00 in Paris, a Wednesday


# --------------------------------------------------------------------------- cancellation reaching children


async def _tree(store: Store, *creates: TaskRunCreate) -> list[TaskRun]:
    return [run for run, _ in await store.create_runs(list(creates))]


async def test_a_cancel_cancels_every_descendant_not_ended_but_detached_ones(store: Store) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    [parent, upstream] = await _tree(store, TaskRunCreate(task_key="p"), TaskRunCreate(task_key="u"))
    [running, ended, detached, waiting] = await _tree(
        store,
        TaskRunCreate(task_key="c", parent_task_run_id=parent.id),
        TaskRunCreate(task_key="c", parent_task_run_id=parent.id),
        TaskRunCreate(task_key="c", parent_task_run_id=parent.id, detached=True),
        TaskRunCreate(task_key="c", parent_task_run_id=parent.id, wait_for=[upstream.id]),
    )
    [delayed, under_detached] = await _tree(
        store,
        TaskRunCreate(task_key="g", parent_task_run_id=ended.id, scheduled_time=later),  # a grandchild
        TaskRunCreate(task_key="g", parent_task_run_id=detached.id),
    )
    await store.claim_runs([running.id, ended.id], "w")
    await store.set_states(
        [(running.id, state(StateType.RUNNING)), (ended.id, state(StateType.RUNNING))], now=time.time()
    )
    await store.set_states([(ended.id, state(StateType.COMPLETED))], now=time.time())

    [change] = await store.set_states([(parent.id, state(StateType.CANCELLED))], now=time.time())
    assert change.run is not None and change.run.state.type is StateType.CANCELLED
    cancelled = {d.run.id: d for d in change.descendants if d.run is not None}
    assert set(cancelled) == {running.id, waiting.id, delayed.id}
    for descendant in cancelled.values():
        assert descendant.result.status is SetStateStatus.ACCEPT
        assert descendant.result.state.message == f"cancelled with run {parent.id}, which was cancelled"
    runs = {run.id: run.state.type for run in await store.read_runs([*cancelled, ended.id, detached.id])}
    assert runs == {
        running.id: StateType.CANCELLED,
        waiting.id: StateType.CANCELLED,
        delayed.id: StateType.CANCELLED,
        ended.id: StateType.COMPLETED,  # ended: left as it ended (its own child was cancelled)
        detached.id: StateType.SCHEDULED,
    }
    assert (await store.read_run(under_detached.id)) == under_detached  # a detached run's subtree is left
    history = await store.history(delayed.id)
    assert history is not None and [h.type for h in history] == [StateType.SCHEDULED, StateType.CANCELLED]
    # The cancel is once: cancelling again (a repeat) cancels nothing more.
    [again] = await store.set_states([(parent.id, state(StateType.CANCELLED))], now=time.time())
    assert again.descendants == ()


async def test_only_a_cancel_or_a_timeout_reaches_the_children(store: Store) -> None:
    parents = await _tree(store, *(TaskRunCreate(task_key="p") for _ in range(4)))
    children = await _tree(store, *(TaskRunCreate(task_key="c", parent_task_run_id=p.id) for p in parents))
    await store.claim_runs([p.id for p in parents], "w")
    await store.set_states([(p.id, state(StateType.RUNNING)) for p in parents], now=time.time())
    timed_out = StateDetails(reason=TIMED_OUT)
    failed, completed, timeout, retried = await store.set_states(
        [
            (parents[0].id, state(StateType.FAILED)),
            (parents[1].id, state(StateType.COMPLETED)),
            (parents[2].id, SetStateRequest(make_state(StateType.FAILED, details=timed_out))),
            (
                parents[3].id,
                SetStateRequest(make_state(StateType.SCHEDULED, "AwaitingRetry", details=timed_out)),
            ),
        ],
        now=time.time(),
    )
    assert failed.descendants == completed.descendants == ()
    for change, child in ((timeout, children[2]), (retried, children[3])):
        [cancelled] = change.descendants
        assert cancelled.run is not None and cancelled.run.id == child.id
        assert cancelled.result.state.message == f"cancelled with run {change.run.id}, which ran out of time"  # type: ignore[union-attr]
    states = [run.state.type for run in await store.read_runs([c.id for c in children])]
    assert states == [StateType.SCHEDULED, StateType.SCHEDULED, StateType.CANCELLED, StateType.CANCELLED]


async def test_a_child_of_a_cancelled_parent_is_created_cancelled_unless_detached(store: Store) -> None:
    [parent] = await _tree(store, TaskRunCreate(task_key="p"))
    await store.set_states([(parent.id, state(StateType.CANCELLED))], now=time.time())
    [(late, late_entry), (detached, _)] = await store.create_runs(
        [
            TaskRunCreate(task_key="c", parent_task_run_id=parent.id),
            TaskRunCreate(task_key="c", parent_task_run_id=parent.id, detached=True),
        ]
    )
    assert late_entry is not None  # new, but not to be queued: it is CANCELLED
    assert late.state.type is StateType.CANCELLED
    assert late.state.message == f"cancelled with run {parent.id}, which was cancelled"
    assert (await store.read_run(late.id)) == late
    assert detached.state.type is StateType.SCHEDULED and detached.detached
    assert await store.claim_runs([late.id, detached.id], "w") == [await store.read_run(detached.id)]


async def test_a_group_cancel_takes_its_runs_theirs_and_the_later_ones(store: Store) -> None:
    group, other = uuid.uuid4(), uuid.uuid4()
    [first, done, elsewhere] = await _tree(
        store,
        TaskRunCreate(task_key="g", group_id=group),
        TaskRunCreate(task_key="g", group_id=group),
        TaskRunCreate(task_key="g", group_id=other),
    )
    [child] = await _tree(store, TaskRunCreate(task_key="c", parent_task_run_id=first.id))
    await store.set_states([(done.id, state(StateType.FAILED))], now=time.time())
    changes = await store.cancel_group(group, now=time.time())
    assert [c.run.id for c in changes if c.run] == [first.id]
    [descendant] = changes[0].descendants
    assert descendant.run is not None and descendant.run.id == child.id
    assert changes[0].result.state.message == f"cancelled with its run group {group}"
    assert descendant.result.state.message == f"cancelled with run {first.id}, which was cancelled"
    [(late, _)] = await store.create_runs([TaskRunCreate(task_key="g", group_id=group)])
    assert late.state.type is StateType.CANCELLED and late.group_id == group
    assert late.state.message == f"cancelled with its run group {group}"
    assert [r.id for r in await store.list_runs(group_id=group)] == [first.id, done.id, late.id]
    assert (await store.read_run(elsewhere.id)) == elsewhere
    assert await store.cancel_group(group, now=time.time()) == []  # again: nothing more
    assert await store.cancel_group(uuid.uuid4(), now=time.time()) == []  # no run yet: cancelled all the same


async def test_descendants_are_found_level_by_level_to_a_limit(store: Store) -> None:
    [root] = await _tree(store, TaskRunCreate(task_key="r"))
    [a, b] = await _tree(store, *(TaskRunCreate(task_key="c", parent_task_run_id=root.id) for _ in "ab"))
    [a1, detached] = await _tree(
        store,
        TaskRunCreate(task_key="g", parent_task_run_id=a.id),
        TaskRunCreate(task_key="g", parent_task_run_id=b.id, detached=True),
    )
    [a11] = await _tree(store, TaskRunCreate(task_key="gg", parent_task_run_id=a1.id))
    found = await store.descendants(root.id, limit=100)
    assert [r.id for r in found] == [a.id, b.id, a1.id, detached.id, a11.id]
    assert {r.id for r in await store.descendants(root.id, limit=2)} == {a.id, b.id}  # the nearest first
    assert await store.descendants(a11.id, limit=10) == []
    # Parent ids that loop (a client may name any parent) end the walk and the cascade.
    loop = uuid.uuid4()
    [(looped, _)] = await store.create_runs([TaskRunCreate(task_key="l", id=loop, parent_task_run_id=loop)])
    assert [r.id for r in await store.descendants(loop, limit=10)] == [loop]
    [change] = await store.set_states([(loop, state(StateType.CANCELLED))], now=time.time())
    assert change.descendants == () and change.run is not None
    assert change.run.state.type is StateType.CANCELLED and looped.parent_task_run_id == loop


async def test_deleting_a_run_not_ended_cancels_its_descendants(store: Store) -> None:
    [running, ended] = await _tree(store, TaskRunCreate(task_key="p"), TaskRunCreate(task_key="p"))
    [child, other] = await _tree(
        store,
        TaskRunCreate(task_key="c", parent_task_run_id=running.id),
        TaskRunCreate(task_key="c", parent_task_run_id=ended.id),
    )
    await store.set_states([(ended.id, state(StateType.FAILED))], now=time.time())
    deleted, changes = await store.delete_run_cascading(running.id, now=time.time())
    assert deleted == running
    assert [c.run.id for c in changes if c.run] == [child.id]
    assert changes[0].result.state.message == f"cancelled with run {running.id}, which was deleted"
    deleted, changes = await store.delete_run_cascading(ended.id, now=time.time())
    assert deleted is not None and changes == []
    assert (await store.read_run(other.id)) == other  # an ended run's children stay
    assert await store.delete_run_cascading(running.id, now=time.time()) == (None, [])


async def test_a_purge_forgets_the_groups_left_without_runs(store: Store) -> None:
    group, kept = uuid.uuid4(), uuid.uuid4()
    [_, (revived, _)] = await store.create_runs(
        [TaskRunCreate(task_key="g", group_id=group), TaskRunCreate(task_key="g", group_id=kept)]
    )
    await store.cancel_group(group, now=time.time())
    await store.cancel_group(kept, now=time.time())
    again = SetStateRequest(make_state(StateType.SCHEDULED), force=True)
    await store.set_states([(revived.id, again)], now=time.time())  # not ended: its group stays
    later = datetime.now(UTC) + timedelta(seconds=5)
    await store.purge_ended(later, task_key="g", limit=10)  # a narrowed purge keeps every group
    [(late, _)] = await store.create_runs([TaskRunCreate(task_key="g", group_id=group)])
    assert late.state.type is StateType.CANCELLED
    await store.purge_ended(later, limit=10)  # the runs that ended, and the groups left with none
    [(fresh, _)] = await store.create_runs([TaskRunCreate(task_key="g", group_id=group)])
    assert fresh.state.type is StateType.SCHEDULED  # the group was forgotten
    [(still, _)] = await store.create_runs([TaskRunCreate(task_key="g", group_id=kept)])
    assert still.state.type is StateType.CANCELLED


# --------------------------------------------------------------------------- leases at create


async def test_a_run_leased_at_create_is_held_as_a_claim_leaves_it(store: Store) -> None:
    now = time.time()
    [(leased, entry), (plain, _)] = await store.create_runs(
        [TaskRunCreate(task_key="k", parameters={"i": 1}), TaskRunCreate(task_key="k")],
        now=now,
        leases={0: "w-1"},
    )
    assert entry is not None  # a new run (not queued: it is not SCHEDULED)
    assert (leased.state.type, leased.state.state_details.client_id, leased.delivery_count) == (
        StateType.PENDING,
        "w-1",
        1,
    )
    assert plain.state.type is StateType.SCHEDULED
    assert await store.read_run(leased.id) == leased  # given back as the store holds it
    history = await store.history(leased.id)
    assert history is not None and [h.type for h in history] == [StateType.SCHEDULED, StateType.PENDING]
    assert await store.claim_runs([leased.id], "w-2") == []  # held: nobody else claims it
    [elsewhere] = await store.set_states([(leased.id, state(StateType.RUNNING))], now=now, holder="w-2")
    assert elsewhere.result.details == LEASED_ELSEWHERE
    [running] = await store.set_states([(leased.id, state(StateType.RUNNING))], now=now, holder="w-1")
    assert running.result.status is SetStateStatus.ACCEPT
    [back] = await store.requeue([leased.id], reason="release", max_deliveries=1, holder="w-1")
    assert back.state_type is StateType.SCHEDULED and back.queued is not None
    again = await store.read_run(leased.id)
    assert again is not None and (again.state.name, again.delivery_count) == ("Redelivered", 0)


async def test_a_run_leased_at_create_is_handed_back_at_the_next_start(open_store: OpenStore) -> None:
    async with open_store() as store:
        [(leased, _)] = await store.create_runs([TaskRunCreate(task_key="k")], leases={0: "w-1"})
        assert leased.state.type is StateType.PENDING
    async with open_store() as store:
        assert [q.id for q in await store.recover(max_deliveries=5)] == [leased.id]
        again = await store.read_run(leased.id)
        assert again is not None and (again.state.type, again.state.name) == (
            StateType.SCHEDULED,
            "Redelivered",
        )


async def test_only_new_runs_due_now_that_wait_for_nothing_are_leased_at_create(store: Store) -> None:
    now = time.time()
    past, later = datetime.now(UTC) - timedelta(seconds=5), datetime.now(UTC) + timedelta(hours=1)
    given = uuid.uuid4()
    creates = [
        cached(),  # computes its cache key: leased
        cached(),  # waits for the one computing the key
        TaskRunCreate(task_key="k", idempotency_key="i"),
        TaskRunCreate(task_key="k", idempotency_key="i"),  # a repeat: not leased again
        TaskRunCreate(task_key="k", id=given),
        TaskRunCreate(task_key="k", id=given),  # a repeat too
        TaskRunCreate(task_key="k", wait_for=[given]),
        TaskRunCreate(task_key="k", scheduled_time=later),
        TaskRunCreate(task_key="k", scheduled_time=past),  # due: leased
    ]
    results = await store.create_runs(creates, now=now, leases=dict.fromkeys(range(len(creates)), "w"))
    runs = [run for run, _ in results]
    assert [run.state.type for run in runs] == [
        StateType.PENDING,
        StateType.SCHEDULED,
        StateType.PENDING,
        StateType.PENDING,
        StateType.PENDING,
        StateType.PENDING,
        StateType.SCHEDULED,
        StateType.SCHEDULED,
        StateType.PENDING,
    ]
    assert [entry is None for _, entry in results] == [
        False,
        False,
        False,
        True,
        False,
        True,
        False,
        False,
        False,
    ]
    assert runs[3] == runs[2] and runs[5] == runs[4] and runs[4].id == given
    assert {run.delivery_count for run in runs if run.state.type is StateType.PENDING} == {1}
    assert runs[1].state.state_details.cache_owner == runs[0].id
    [(repeat, entry)] = await store.create_runs([creates[2]], now=now, leases={0: "other"})
    assert entry is None and repeat == runs[2]  # still leased to "w", once
    # A result in the cache, a cancelled group: created COMPLETED or CANCELLED, not leased.
    await store.set_states(
        [
            (runs[0].id, state(StateType.RUNNING)),
            (runs[0].id, SetStateRequest(make_state(StateType.COMPLETED))),
        ],
        now=now,
        holder="w",
    )
    group = uuid.uuid4()
    await store.cancel_group(group, now=now)
    [(hit, _), (doomed, _)] = await store.create_runs(
        [cached(), TaskRunCreate(task_key="k", group_id=group)], now=now, leases={0: "w", 1: "w"}
    )
    assert (hit.state.type, hit.state.name) == (StateType.COMPLETED, "Cached")
    assert doomed.state.type is StateType.CANCELLED
    # Repeats in one batch without cache keys (one statement in some stores) see the lease too.
    [(one, _), (same, entry)] = await store.create_runs(
        [TaskRunCreate(task_key="k", idempotency_key="j")] * 2, now=now, leases={0: "w", 1: "w"}
    )
    assert entry is None and one.state.type is StateType.PENDING and same == one

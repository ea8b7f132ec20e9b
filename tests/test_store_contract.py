"""What every store does, whatever keeps the runs: these tests take the ``store`` (or
``open_store``) fixture and run once per kind of store (``stores.py``)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from trioworker.models import SetStateRequest, StateType, TaskRunCreate, make_state
from trioworker.server.store import Store, StoreError

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

"""What every store does, whatever keeps the runs: these tests take the ``store`` (or
``open_store``) fixture and run once per kind of store (``stores.py``)."""

from __future__ import annotations

import time
import uuid

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

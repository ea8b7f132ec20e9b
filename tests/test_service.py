"""The service over a real store (each kind, ``stores.py``): fresh runs delivered before their
claim commits."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from trioworker.models import SetStateRequest, StateType, TaskRunCreate, make_state
from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.service import FRESH_MAX_RUN_BYTES, FreshRuns, TaskRunService
from trioworker.server.store import QueuedRun, Store


def subscription(service: TaskRunService, credit: int = 10) -> Subscription:
    sub = Subscription(client_id="w-1", keys=("k",), credit=credit)
    service.dispatcher.subscribe(sub)
    return sub


async def test_fresh_runs_are_delivered_as_the_claim_leaves_them(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    [(created, _)] = await service.create_runs([TaskRunCreate(task_key="k", parameters={"i": 1})])
    assert len(service.fresh) == 1
    sub = subscription(service)
    delivery = await service.next_runs(sub)
    [sent] = delivery.runs
    await delivery.confirm()
    assert len(service.fresh) == 0
    stored = await store.read_run(created.id)
    assert stored == sent  # what was sent is what the store holds, to the microsecond
    assert sent.state.type is StateType.PENDING
    assert sent.state.state_details.client_id == "w-1"
    assert sent.delivery_count == 1
    assert sub.cancels == []


async def test_a_fresh_run_changed_behind_the_cache_is_cancelled_at_its_holder(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    [(created, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    # A change the cache does not hear of (as if it raced with the take below).
    cancelled = SetStateRequest(make_state(StateType.CANCELLED))
    await store.set_states([(created.id, cancelled)], now=0.0)
    sub = subscription(service)
    delivery = await service.next_runs(sub)
    assert [run.id for run in delivery.runs] == [created.id]  # sent before the claim ran
    await delivery.confirm()
    assert sub.cancels == [created.id]  # so the worker stops it
    assert service.dispatcher.holder(created.id) is None
    stored = await store.read_run(created.id)
    assert stored is not None and stored.state.type is StateType.CANCELLED


async def test_a_change_through_the_service_drops_the_fresh_copy(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    [(first, _), (second, _)] = await service.create_runs(
        [TaskRunCreate(task_key="k"), TaskRunCreate(task_key="k")]
    )
    await service.cancel(first.id)
    await service.delete(second.id)
    assert len(service.fresh) == 0
    sub = subscription(service)
    assert (await service.next_runs(sub)).runs == []  # the stale index entries claim nothing


async def test_the_fresh_cache_takes_only_small_runs_due_now(store: Store) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    results = await store.create_runs(
        [TaskRunCreate(task_key="k"), TaskRunCreate(task_key="k", scheduled_time=later)]
    )
    fresh = FreshRuns()
    (now_run, now_queued), (later_run, later_queued) = results
    assert now_queued is not None and later_queued is not None
    fresh.add(later_run, later_queued)
    assert len(fresh) == 0
    fresh.add(now_run, QueuedRun(1, now_run.id, "k", None, (), FRESH_MAX_RUN_BYTES + 1))
    assert len(fresh) == 0
    fresh.add(now_run, now_queued)
    assert len(fresh) == 1
    assert fresh.pop(now_run.id) == now_run
    assert fresh.pop(now_run.id) is None

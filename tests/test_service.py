"""The service over a real store (each kind, ``stores.py``): fresh runs delivered before their
claim commits."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import attrs
import pytest
import trio
import trio.testing

from trioworker.models import SetStateRequest, StateType, TaskRun, TaskRunCreate, make_state
from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.service import FRESH_MAX_RUN_BYTES, FreshRuns, TaskRunService
from trioworker.server.store import QueuedRun, Store
from trioworker.server.store.commit import GroupCommitStore


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


# -- runs leased in the create's own transaction


def counts(store: Store) -> tuple[int, int]:
    """``(operations, commits)`` the store ran so far."""
    assert isinstance(store, GroupCommitStore)
    stats = store.statistics()
    return stats.operations, stats.commits


async def test_a_run_created_while_a_subscription_has_room_is_leased_by_the_create(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    sub = subscription(service, credit=1)
    ops, commits = counts(store)
    [(created, new)] = await service.create_runs([TaskRunCreate(task_key="k", parameters={"i": 1})])
    assert new
    assert (created.state.type, created.state.state_details.client_id, created.delivery_count) == (
        StateType.PENDING,
        "w-1",
        1,
    )
    assert service.dispatcher.holder(created.id) is sub and sub.free_slots == 0
    delivery = await service.next_runs(sub)
    assert delivery.runs == [created]
    await delivery.confirm()
    assert counts(store) == (ops + 1, commits + 1)  # the create alone: no claim
    assert await store.read_run(created.id) == created  # sent as the store holds it
    assert service.dispatcher.ready_count() == 0 and len(service.fresh) == 0
    assert (await service.next_runs(sub)).runs == []  # sent once


async def test_an_older_ready_run_of_the_key_goes_first(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    sub = subscription(service, credit=0)
    [(older, _)] = await service.create_runs([TaskRunCreate(task_key="k")])  # no room: queued
    service.dispatcher.set_credit(sub, 3)
    [(newer, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    assert newer.state.type is StateType.SCHEDULED  # not leased past the older one
    delivery = await service.next_runs(sub)
    assert [run.id for run in delivery.runs] == [older.id, newer.id]
    await delivery.confirm()
    # Nor past a run of the key being created to be queued: a slot frees while it is.
    [(last, _)] = await service.create_runs([TaskRunCreate(task_key="k")])  # the last free slot
    assert last.state.type is StateType.PENDING
    created: dict[str, TaskRun] = {}

    async def create(name: str) -> None:
        [(created[name], _)] = await service.create_runs([TaskRunCreate(task_key="k")])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(create, "queued")
        await trio.testing.wait_all_tasks_blocked()  # it found no free slot, and waits for the store
        service.dispatcher.release(older.id)
        nursery.start_soon(create, "later")
    assert created["queued"].state.type is StateType.SCHEDULED
    assert created["later"].state.type is StateType.SCHEDULED  # (the two are queued in either order)


async def test_a_run_of_another_key_ready_for_the_subscription_goes_first(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    sub = Subscription(client_id="w-1", keys=("k", "j"), credit=0)
    service.dispatcher.subscribe(sub)
    [(older, _)] = await service.create_runs([TaskRunCreate(task_key="j")])
    service.dispatcher.set_credit(sub, 1)
    [(newer, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    assert newer.state.type is StateType.SCHEDULED
    assert [run.id for run in (await service.next_runs(sub)).runs] == [older.id]


async def test_a_subscription_gone_before_its_run_was_sent_hands_it_back_unopened(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    sub = subscription(service, credit=1)
    [(run, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    assert run.id in sub.unsent
    await service.disconnect(sub)  # the connection ended before its delivery loop sent it
    stored = await store.read_run(run.id)
    assert stored is not None
    assert (stored.state.type, stored.state.name, stored.delivery_count) == (
        StateType.SCHEDULED,
        "Redelivered",
        0,  # never sent: not a failed delivery
    )
    heir = Subscription(client_id="w-2", keys=("k",), credit=1)
    service.dispatcher.subscribe(heir)
    delivery = await service.next_runs(heir)
    assert [r.id for r in delivery.runs] == [run.id]
    await delivery.confirm()
    assert (await store.read_run(run.id)) == delivery.runs[0]


async def test_a_subscription_that_quit_gets_no_run_at_create_and_hands_back_what_it_got(
    store: Store,
) -> None:
    service = TaskRunService(store, Dispatcher())
    sub = subscription(service, credit=2)
    [(leased, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    service.dispatcher.stop_taking(sub)  # it quit
    [(queued, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    assert queued.state.type is StateType.SCHEDULED and sub.reserved == 0
    await service.hand_back_unsent(sub)
    assert not sub.held and not sub.unsent
    stored = await store.read_run(leased.id)
    assert stored is not None and (stored.state.type, stored.delivery_count) == (StateType.SCHEDULED, 0)
    assert service.dispatcher.ready_count("k") == 2


@attrs.define
class Meanwhile:
    """A store whose creates, once done, let ``then`` run before the caller hears of them
    (as another operation of the same group commit whose caller happens to wake first)."""

    store: Store
    then: Callable[[list[tuple[TaskRun, QueuedRun | None]]], Awaitable[None]]

    async def create_runs(self, *args: Any, **kwargs: Any) -> list[tuple[TaskRun, QueuedRun | None]]:
        results = await self.store.create_runs(*args, **kwargs)
        await self.then(results)
        return results

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


@pytest.mark.parametrize("what", ["cancel", "delete", "quit"])
async def test_what_happens_to_a_run_between_its_create_and_the_service_hearing_of_it(
    store: Store, what: str
) -> None:
    service: TaskRunService

    async def then(results: list[tuple[TaskRun, QueuedRun | None]]) -> None:
        [(run, _)] = results
        assert run.state.type is StateType.PENDING  # leased in the store
        if what == "cancel":
            await service.cancel(run.id)
        elif what == "delete":
            await service.delete(run.id)
        else:
            service.dispatcher.stop_taking(sub)

    service = TaskRunService(cast(Store, Meanwhile(store, then)), Dispatcher())
    sub = subscription(service, credit=1)
    [(run, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    assert not sub.held and not sub.unsent and sub.cancels == []  # nothing to send, nothing to stop
    assert sub.free_slots == 1
    stored = await store.read_run(run.id)
    if what == "quit":  # handed back at once
        assert stored is not None and (stored.state.type, stored.delivery_count) == (StateType.SCHEDULED, 0)
        assert service.dispatcher.ready_count("k") == 1
    else:
        assert stored is None or stored.state.type is StateType.CANCELLED
        assert (await service.next_runs(sub)).runs == []


@pytest.mark.parametrize("what", ["cancel", "delete"])
async def test_a_run_cancelled_or_deleted_before_it_was_sent_is_not_sent(store: Store, what: str) -> None:
    service = TaskRunService(store, Dispatcher())
    sub = subscription(service, credit=2)
    [(run, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    assert run.id in sub.unsent
    if what == "cancel":
        await service.cancel(run.id)
    else:
        await service.delete(run.id)
    assert not sub.held and not sub.unsent and sub.cancels == []  # the worker never heard of it
    assert sub.free_slots == 2
    assert (await service.next_runs(sub)).runs == []


async def test_repeats_runs_from_the_cache_and_runs_born_cancelled_take_no_slot(store: Store) -> None:
    service = TaskRunService(store, Dispatcher())
    sub = subscription(service, credit=10)
    group = uuid.uuid4()
    await service.cancel_group(group)
    results = await service.create_runs(
        [
            TaskRunCreate(task_key="k", idempotency_key="i"),
            TaskRunCreate(task_key="k", idempotency_key="i"),
            TaskRunCreate(task_key="k", group_id=group),
            TaskRunCreate(task_key="k", scheduled_time=datetime.now(UTC) + timedelta(hours=1)),
        ]
    )
    [(first, new), (repeat, again), (doomed, _), (later, _)] = results
    assert (new, again, repeat) == (True, False, first)
    assert first.state.type is StateType.PENDING
    assert (doomed.state.type, later.state.type) == (StateType.CANCELLED, StateType.SCHEDULED)
    [(repeat, again)] = await service.create_runs([TaskRunCreate(task_key="k", idempotency_key="i")])
    assert (again, repeat) == (False, first)
    assert sub.held == {first.id} and sub.reserved == 0 and sub.free_slots == 9
    assert [run.id for run in (await service.next_runs(sub)).runs] == [first.id]


async def test_creates_under_way_at_once_each_hear_of_the_changes_meanwhile(store: Store) -> None:
    service: TaskRunService
    nested: list[TaskRun] = []
    calls = 0

    async def then(results: list[tuple[TaskRun, QueuedRun | None]]) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            return
        [(run, _)] = results
        # Another create starts and ends while this one is under way, then this one's run
        # is cancelled before it hears of its lease.
        [(other, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
        nested.append(other)
        await service.cancel(run.id)

    service = TaskRunService(cast(Store, Meanwhile(store, then)), Dispatcher())
    sub = subscription(service, credit=2)
    [(run, _)] = await service.create_runs([TaskRunCreate(task_key="k")])
    [other] = nested
    assert run.id not in sub.held  # cancelled before it was sent: never sent
    assert list(sub.unsent) == [other.id] and sub.held == {other.id}
    assert sub.free_slots == 1

"""The dispatcher's bookkeeping of credit and leases, without a server around it."""

from __future__ import annotations

import uuid

from trioworker.server.queue import Dispatcher, Subscription
from trioworker.server.store import QueuedRun


def queued(n: int, key: str = "k") -> list[QueuedRun]:
    return [QueuedRun(seq, uuid.uuid4(), key, None) for seq in range(n)]


def subscribed(dispatcher: Dispatcher, credit: int, prefetch: int = 0) -> Subscription:
    sub = Subscription(client_id="w", keys=("k",), credit=credit, prefetch=prefetch)
    dispatcher.subscribe(sub)
    return sub


def test_take_leases_at_most_the_room_in_fifo_order() -> None:
    dispatcher = Dispatcher()
    runs = queued(5)
    dispatcher.enqueue(runs)
    sub = subscribed(dispatcher, credit=3)
    assert dispatcher.take(sub) == [r.id for r in runs[:3]]
    assert dispatcher.take(sub) == []
    assert dispatcher.ready_count() == 2


def test_a_final_report_frees_room_but_keeps_the_lease() -> None:
    dispatcher = Dispatcher()
    runs = queued(3)
    dispatcher.enqueue(runs)
    sub = subscribed(dispatcher, credit=2)
    first, second = dispatcher.take(sub)
    sub.finished([first])
    assert sub.room == 1
    assert dispatcher.holder(first) is sub  # still leased until the report is applied
    assert dispatcher.take(sub) == [runs[2].id]
    assert sub.room == 0
    dispatcher.release(first)  # the report was applied
    assert sub.finishing == set()
    assert sub.room == 0
    assert second in sub.held


def test_finished_ignores_runs_the_subscription_does_not_hold() -> None:
    dispatcher = Dispatcher()
    dispatcher.enqueue(queued(1))
    sub = subscribed(dispatcher, credit=1)
    dispatcher.take(sub)
    sub.finished([uuid.uuid4()])
    assert sub.room == 0


def test_a_lost_connection_hands_back_runs_whose_reports_were_not_applied() -> None:
    dispatcher = Dispatcher()
    dispatcher.enqueue(queued(2))
    sub = subscribed(dispatcher, credit=2)
    taken = dispatcher.take(sub)
    sub.finished(taken[:1])
    assert dispatcher.unsubscribe(sub) == set(taken)
    assert sub.finishing == set()
    assert dispatcher.holder(taken[0]) is None


def test_a_run_leased_elsewhere_stops_counting_as_finishing() -> None:
    dispatcher = Dispatcher()
    dispatcher.enqueue(queued(1))
    old = subscribed(dispatcher, credit=1)
    [run_id] = dispatcher.take(old)
    old.finished([run_id])
    new = subscribed(dispatcher, credit=1)
    dispatcher.lease(new, run_id)
    assert old.finishing == set()
    assert old.held == set()
    assert old.room == 1


def test_prefetch_takes_beyond_the_credit_and_marks_those_runs() -> None:
    dispatcher = Dispatcher()
    runs = queued(5)
    dispatcher.enqueue(runs)
    sub = subscribed(dispatcher, credit=2, prefetch=2)
    assert dispatcher.take(sub) == [r.id for r in runs[:4]]
    assert set(sub.prefetched) == {runs[2].id, runs[3].id}
    sub.started([runs[2].id])  # its RUNNING report came: it left the buffer
    assert set(sub.prefetched) == {runs[3].id}


def test_no_prefetch_while_another_subscription_has_a_free_slot() -> None:
    dispatcher = Dispatcher()
    dispatcher.enqueue(queued(4))
    buffered = subscribed(dispatcher, credit=1, prefetch=3)
    idle = subscribed(dispatcher, credit=1)
    assert len(dispatcher.take(buffered)) == 1
    assert buffered.prefetched == {}
    assert len(dispatcher.take(idle)) == 1
    # Now nobody else has a free slot: the buffer fills.
    assert len(dispatcher.take(buffered)) == 2
    assert len(buffered.prefetched) == 2


def test_a_free_slot_revokes_buffered_runs_once() -> None:
    dispatcher = Dispatcher()
    runs = queued(3)
    dispatcher.enqueue(runs)
    buffered = subscribed(dispatcher, credit=1, prefetch=2)
    dispatcher.take(buffered)
    idle = subscribed(dispatcher, credit=1)
    dispatcher.revoke_for(idle)
    assert len(buffered.revokes) == 1
    assert buffered.revokes[0] in {runs[1].id, runs[2].id}
    dispatcher.revoke_for(idle)  # asked already: not again
    assert len(buffered.revokes) == 1
    dispatcher.release(buffered.revokes[0])  # handed back
    assert buffered.revoking == set()


def test_no_revoke_without_a_free_slot() -> None:
    dispatcher = Dispatcher()
    dispatcher.enqueue(queued(4))
    buffered = subscribed(dispatcher, credit=1, prefetch=2)
    dispatcher.take(buffered)
    busy = subscribed(dispatcher, credit=1)
    dispatcher.take(busy)
    dispatcher.revoke_for(busy)
    assert buffered.revokes == []

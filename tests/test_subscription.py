"""The subscription websocket, through real websockets against the in-process server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing
from trio_websocket import ConnectionClosed

from trioworker.server import RunningServer
from trioworker.server.queue import trio_anchored_clock
from trioworker.server.store.commit import GroupCommitStore
from trioworker.testing import ServerControl

from .raw import Raw, connect, subscribe

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store


async def create_many(api: httpx.AsyncClient, key: str, n: int, **fields: Any) -> list[str]:
    response = await api.post(
        "/task_runs/batch", json=[{"task_key": key, "parameters": {"i": i}, **fields} for i in range(n)]
    )
    assert response.status_code == 201
    return [r["id"] for r in response.json()]


async def state_of(api: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    state = (await api.get(f"/task_runs/{run_id}")).json()["state"]
    assert isinstance(state, dict)
    return state


async def test_runs_arrive_in_fifo_order_per_key(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    ids = await create_many(api, "k", 30)
    await create_many(api, "other", 5)
    async with subscribe(trioworker_server, ["k"], credit=100) as sub:
        got: list[str] = []
        while len(got) < 30:
            got += [r["id"] for r in await sub.runs()]
        assert got == ids


async def test_delivered_runs_are_pending_and_leased(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    [run_id] = await create_many(api, "k", 1)
    async with subscribe(trioworker_server, ["k"], client_id="host-42") as sub:
        [run] = await sub.runs()
        assert run["state"]["type"] == "PENDING"
        assert run["state"]["state_details"]["client_id"] == "host-42"
        assert run["delivery_count"] == 1
        assert run["parameters"] == {"i": 0}
        assert (await state_of(api, run_id))["type"] == "PENDING"


async def test_credit_is_never_exceeded(api: httpx.AsyncClient, trioworker_server: RunningServer) -> None:
    await create_many(api, "k", 10)
    async with subscribe(trioworker_server, ["k"], credit=3) as sub:
        first = await sub.runs()
        held = [r["id"] for r in first]
        while len(held) < 3:
            held += [r["id"] for r in await sub.runs()]
        assert len(held) == 3
        # Finishing one run frees exactly one slot.
        await sub.finish(held[:1])
        more = await sub.runs()
        assert len(more) == 1
        # A credit message raises the limit.
        await sub.send({"type": "credit", "n": 2})
        extra = await sub.runs()
        extra += [] if len(extra) == 2 else await sub.runs()
        assert len(extra) == 2
        health = (await api.get("/health")).json()
        assert health["ready"] == 10 - 3 - 1 - 2


async def test_a_run_is_never_sent_to_two_subscribers(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    ids = await create_many(api, "k", 200)
    seen: dict[str, list[str]] = {"a": [], "b": []}
    all_seen = trio.Event()

    async def consume(name: str, sub: Raw) -> None:
        while True:
            runs = [r["id"] for r in await sub.runs()]
            seen[name] += runs
            await sub.finish(runs)
            if len(seen["a"]) + len(seen["b"]) == len(ids):
                all_seen.set()

    async with (
        subscribe(trioworker_server, ["k"], credit=7, client_id="a") as a,
        subscribe(trioworker_server, ["k"], credit=7, client_id="b") as b,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(consume, "a", a)
        nursery.start_soon(consume, "b", b)
        with trio.fail_after(20):
            await all_seen.wait()
        nursery.cancel_scope.cancel()
    assert not set(seen["a"]) & set(seen["b"])
    assert sorted(seen["a"] + seen["b"]) == sorted(ids)
    assert seen["a"] and seen["b"], "both subscribers got work"


async def test_runs_held_by_a_closed_connection_go_to_another_subscriber(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    ids = await create_many(api, "k", 3)
    async with subscribe(trioworker_server, ["k"], credit=2, client_id="doomed") as doomed:
        held = [r["id"] for r in await doomed.runs()]
        while len(held) < 2:
            held += [r["id"] for r in await doomed.runs()]
        await doomed.report(held[:1], "RUNNING")
    # The connection is gone: both held runs are SCHEDULED again, first in line.
    for run_id in held:
        state = await state_of(api, run_id)
        assert (state["type"], state["name"]) == ("SCHEDULED", "Redelivered")
    async with subscribe(trioworker_server, ["k"], credit=10, client_id="heir") as heir:
        got: list[dict[str, Any]] = []
        while len(got) < 3:
            got += await heir.runs()
        assert [r["id"] for r in got] == ids
        assert [r["delivery_count"] for r in got] == [2, 2, 1]
        await heir.finish([r["id"] for r in got])
    assert (await state_of(api, ids[0]))["type"] == "COMPLETED"


async def test_a_run_delivered_too_often_crashes(trioworker_server_control: ServerControl) -> None:
    server = await trioworker_server_control.start(max_deliveries=2)
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        [run_id] = await create_many(api, "poison", 1)
        for _ in range(2):
            async with subscribe(server, ["poison"]) as sub:
                [run] = await sub.runs()
                await sub.report([run["id"]], "RUNNING")
        state = await state_of(api, run_id)
        assert state["type"] == "CRASHED"
        assert "delivered 2 times" in state["message"]


async def test_delayed_runs_wait_for_their_time(
    mock_clock: trio.testing.MockClock, trioworker_server_control: ServerControl
) -> None:
    clock = trio_anchored_clock()
    server = await trioworker_server_control.start(clock=clock)
    due = datetime.fromtimestamp(clock() + 60, UTC).isoformat()
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        [delayed] = await create_many(api, "k", 1, scheduled_time=due)
        [now] = await create_many(api, "k", 1)
        async with subscribe(server, ["k"], credit=10) as sub:
            # The delayed run is older, so FIFO would send it first if it were due.
            assert [r["id"] for r in await sub.runs()] == [now]
            assert (await api.get("/health")).json()["delayed"] == 1
            mock_clock.jump(59)
            await trio.testing.wait_all_tasks_blocked()
            assert (await api.get("/health")).json()["delayed"] == 1
            mock_clock.jump(2)
            assert [r["id"] for r in await sub.runs()] == [delayed]


async def test_cancelling_a_held_run_tells_its_holder(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    [run_id] = await create_many(api, "k", 1)
    async with subscribe(trioworker_server, ["k"], credit=1) as sub:
        await sub.runs()
        await sub.report([run_id], "RUNNING")
        response = await api.post(f"/task_runs/{run_id}/cancel")
        assert response.json()["state"]["type"] == "CANCELLED"
        assert await sub.receive() == {"type": "cancel", "ids": [run_id]}
        [late] = await sub.report([run_id], "COMPLETED")
        assert late["status"] == "ABORT"
        # The answer freed the credit: a new run comes.
        [next_id] = await create_many(api, "k", 1)
        assert [r["id"] for r in await sub.runs()] == [next_id]


async def test_released_runs_go_back_without_counting_a_delivery(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    [run_id] = await create_many(api, "k", 1)
    async with subscribe(trioworker_server, ["k"], credit=1) as first:
        await first.runs()
        # Lower the credit first, or the released run comes straight back to us.
        await first.send({"type": "credit", "n": -1})
        await first.send({"type": "release", "ids": [run_id]})
        async with subscribe(trioworker_server, ["k"], credit=1, client_id="second") as second:
            [run] = await second.runs()
            assert run["id"] == run_id
            assert run["delivery_count"] == 1


async def test_quit_closes_cleanly_once_nothing_is_held(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    [run_id] = await create_many(api, "k", 1)
    async with subscribe(trioworker_server, ["k"], credit=1) as sub:
        await sub.runs()
        await sub.send({"type": "quit"})
        await sub.finish([run_id])  # reports still work after quit
        with pytest.raises(ConnectionClosed) as closed:
            await sub.receive()
        assert closed.value.reason is not None
        assert closed.value.reason.code == 1000
    assert (await state_of(api, run_id))["type"] == "COMPLETED"


async def test_prefetch_sends_runs_beyond_the_credit(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    ids = await create_many(api, "k", 6)
    async with subscribe(trioworker_server, ["k"], credit=1, prefetch=2) as sub:
        got = [r["id"] for r in await sub.runs()]
        while len(got) < 3:
            got += [r["id"] for r in await sub.runs()]
        assert got == ids[:3]
        assert (await api.get("/health")).json()["ready"] == 3
        # One run finished frees one place: one more run comes.
        await sub.finish(got[:1])
        assert [r["id"] for r in await sub.runs()] == ids[3:4]


async def test_a_free_slot_elsewhere_revokes_runs_waiting_in_a_buffer(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    ids = await create_many(api, "k", 4)
    async with subscribe(trioworker_server, ["k"], credit=1, prefetch=3, client_id="a") as a:
        held = [r["id"] for r in await a.runs()]
        while len(held) < 4:
            held += [r["id"] for r in await a.runs()]
        # a starts the second run: started runs are never revoked.
        [answer] = await a.report(held[1:2], "RUNNING")
        assert answer["status"] == "ACCEPT"
        async with subscribe(trioworker_server, ["k"], credit=2, client_id="b") as b:
            revoke = await a.receive()
            assert revoke["type"] == "revoke"
            assert set(revoke["ids"]) <= set(held[2:] + held[:1])
            assert len(revoke["ids"]) == 2
            assert held[1] not in revoke["ids"]
            await a.send({"type": "release", "ids": revoke["ids"]})
            moved = [r["id"] for r in await b.runs()]
            while len(moved) < 2:
                moved += [r["id"] for r in await b.runs()]
            assert sorted(moved) == sorted(revoke["ids"])
            for run_id in moved:
                assert (await state_of(api, run_id))["state_details"]["client_id"] == "b"
    assert sorted(ids) == sorted(held)


async def expect_close(
    server: RunningServer, messages: list[Any], code: int, prefix: str, reason: str = ""
) -> None:
    async with connect(server) as ws:
        with pytest.raises(ConnectionClosed) as closed, trio.fail_after(30):
            for message in messages:
                await ws.send_message(message if isinstance(message, str) else orjson.dumps(message).decode())
            while True:
                await ws.get_message()
    assert closed.value.reason is not None
    assert closed.value.reason.code == code
    text = closed.value.reason.reason or ""
    assert text.startswith(prefix)
    assert reason in text


AUTH = {"type": "auth", "token": None}
SUB = {"type": "subscribe", "keys": ["k"], "client_id": "c", "credit": 1}


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([AUTH, "{not json"], "malformed JSON"),
        ([AUTH, [1, 2]], "JSON object"),
        ([AUTH, {"token": None}], "JSON object"),
        ([AUTH, AUTH], "second message must be"),
        ([AUTH, {**SUB, "keys": []}], '"keys"'),
        ([AUTH, {**SUB, "keys": "k"}], '"keys"'),
        ([AUTH, {**SUB, "client_id": 5}], '"client_id"'),
        ([AUTH, {**SUB, "credit": -1}], '"credit"'),
        ([AUTH, {**SUB, "credit": "10"}], '"credit"'),
        ([AUTH, {k: v for k, v in SUB.items() if k != "credit"}], '"credit"'),
        ([AUTH, {**SUB, "prefetch": -1}], '"prefetch"'),
        ([AUTH, {**SUB, "prefetch": 1001}], '"prefetch"'),
        ([AUTH, {**SUB, "prefetch": True}], '"prefetch"'),
        ([AUTH, SUB, {"type": "dance"}], "unknown message type"),
        ([AUTH, SUB, SUB], "already subscribed"),
        ([AUTH, SUB, {"type": "credit", "n": "x"}], '"n"'),
        ([AUTH, SUB, {"type": "states", "states": {}}], '"states"'),
        (
            [
                AUTH,
                SUB,
                {"type": "states", "states": [{"id": "x", "state": {"type": "RUNNING", "name": "R"}}]},
            ],
            "bad state report",
        ),
        ([AUTH, SUB, {"type": "release", "ids": ["nope"]}], '"ids"'),
        (
            [
                AUTH,
                SUB,
                {
                    "type": "states",
                    "states": [{"id": "00000000-0000-0000-0000-000000000001", "state": {"type": "BOGUS"}}],
                },
            ],
            "bad state report: state.type is 'BOGUS'; it must be one of SCHEDULED, PENDING,",
        ),
        (
            [
                AUTH,
                SUB,
                {"type": "states", "states": [{"id": "00000000-0000-0000-0000-000000000001", "state": {}}]},
            ],
            "bad state report: state.type is missing; it must be one of",
        ),
    ],
)
async def test_protocol_violations_close_with_4001(
    trioworker_server: RunningServer, api: httpx.AsyncClient, messages: list[Any], reason: str
) -> None:
    await expect_close(trioworker_server, messages, 4001, "Protocol violation: ", reason)
    assert (await api.get("/health")).json()["subscriptions"] == 0


async def test_protocol_violation_does_not_lose_held_runs(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    [run_id] = await create_many(api, "k", 1)
    async with subscribe(trioworker_server, ["k"]) as sub:
        await sub.runs()
        await sub.send({"type": "dance"})
        with pytest.raises(ConnectionClosed):
            await sub.receive()
    assert (await state_of(api, run_id))["name"] == "Redelivered"


async def test_a_wrong_token_is_refused_with_1008(trioworker_server_control: ServerControl) -> None:
    server = await trioworker_server_control.start(api_key="right")
    await expect_close(server, [{"type": "auth", "token": "wrong"}], 1008, "Unauthorized")
    await expect_close(server, [{"type": "auth", "token": None}], 1008, "Unauthorized")
    async with subscribe(server, ["k"], token="right") as sub:
        await sub.send({"type": "ack"})


async def test_the_handshake_has_a_deadline(
    trioworker_autojump_clock: trio.testing.MockClock, trioworker_server: RunningServer
) -> None:
    await expect_close(trioworker_server, [], 4001, "Protocol violation: ", "no auth and subscribe within")


@pytest.mark.parametrize("change", ["cancel", "delete"])
@pytest.mark.parametrize("heads", [1, 3])
async def test_runs_changed_at_the_head_of_the_queue_do_not_hold_back_the_next(
    api: httpx.AsyncClient, trioworker_server: RunningServer, change: str, heads: int
) -> None:
    *changed, waiting = await create_many(api, "k", heads + 1)
    for run_id in changed:
        if change == "cancel":
            assert (await api.post(f"/task_runs/{run_id}/cancel")).status_code == 200
        else:
            assert (await api.delete(f"/task_runs/{run_id}")).status_code == 204
    async with subscribe(trioworker_server, ["k"], credit=1) as sub:
        with trio.fail_after(10):
            assert [r["id"] for r in await sub.runs()] == [waiting]


async def test_a_run_created_while_a_worker_has_room_is_sent_with_no_claim_of_its_own(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    service = trioworker_server.service
    store = service.store
    assert isinstance(store, GroupCommitStore)
    service.workers_changed = subscribed = trio.Event()
    async with subscribe(trioworker_server, ["k"], credit=1, client_id="host-42") as sub:
        await subscribed.wait()
        before = store.statistics()
        [run_id] = await create_many(api, "k", 1)
        [run] = await sub.runs()
        after = store.statistics()
        assert run["id"] == run_id
        assert (run["state"]["type"], run["state"]["state_details"]["client_id"]) == ("PENDING", "host-42")
        assert run["delivery_count"] == 1
        assert (await state_of(api, run_id))["type"] == "PENDING"
        if not service.dispatcher.shared:  # one server alone on its store: leased by the create
            # The create, and at most one operation of the server's own timers meanwhile.
            assert after.operations - before.operations <= 2
            assert run["state"]["timestamp"] == run["created"]  # leased in the create's transaction
        await sub.finish([run_id])
    assert (await state_of(api, run_id))["type"] == "COMPLETED"

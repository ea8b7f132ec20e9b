"""The worker's subscription client on its own: backoff, URLs, and reconnecting without loss."""

from __future__ import annotations

import logging
import random
import re
import uuid

import orjson
import pytest
import trio

from trioworker._websocket import BACKOFF_MAX, next_backoff
from trioworker.models import StateType, TaskRun, TaskRunCreate, make_state
from trioworker.server import RunningServer
from trioworker.testing import ServerControl
from trioworker.worker.subscription import (
    MESSAGE_BUDGET,
    SubscriptionClient,
    _by_size,
    _Report,
    websocket_url,
)

from .fakes import freezing_proxy

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store


def test_backoff_grows_with_jitter_up_to_a_ceiling() -> None:
    rng = random.Random(7)
    waits = [next_backoff(attempt, rng) for attempt in range(12)]
    assert 0.1 <= waits[0] <= 0.2
    assert waits[3] > waits[0]
    assert all(w <= BACKOFF_MAX for w in waits)
    assert max(waits[-3:]) >= BACKOFF_MAX / 2
    assert len({round(w, 6) for w in waits[-3:]}) == 3  # jittered, not in lockstep


def test_websocket_urls() -> None:
    assert websocket_url("http://h:1/api") == "ws://h:1/api/task_runs/subscriptions/scheduled"
    assert websocket_url("https://h/api") == "wss://h/api/task_runs/subscriptions/scheduled"
    with pytest.raises(ValueError, match="http:// or https://"):
        websocket_url("h:1/api")


async def test_reports_sent_during_an_outage_arrive_after_the_reconnect(
    trioworker_server_control: ServerControl, trioworker_server: RunningServer
) -> None:
    [(run, _)] = await trioworker_server.service.create_runs([TaskRunCreate(task_key="k")])
    held: set[uuid.UUID] = set()
    client = SubscriptionClient(
        api_url=trioworker_server.api_url,
        api_key=None,
        keys=("k",),
        client_id="c-1",
        credit=1,
        held=lambda: set(held),
        on_cancel=lambda ids: None,
        rng=random.Random(1),
    )
    send, receive = trio.open_memory_channel[TaskRun](10)
    async with trio.open_nursery() as nursery:
        await nursery.start(client.run, send)
        delivered = await receive.receive()
        held.add(delivered.id)
        assert (await client.report(delivered.id, make_state(StateType.RUNNING))).status.value == "ACCEPT"
        server = await trioworker_server_control.restart()  # the connection is lost
        result = await client.report(delivered.id, make_state(StateType.COMPLETED, data=1))
        assert result.status.value == "ACCEPT"
        assert client.reconnects >= 1
        nursery.cancel_scope.cancel()
    final = await server.service.read_run(run.id)
    assert final is not None and final.state.type is StateType.COMPLETED
    assert final.run_count == 1  # resumed by the same client, not run again


def test_reports_are_cut_into_messages_of_bounded_size() -> None:
    big = "x" * (MESSAGE_BUDGET // 2)
    reports = [
        _Report(ref, uuid.uuid4(), make_state(StateType.COMPLETED, data=data))
        for ref, data in enumerate([big, 1, big, big, 2])
    ]
    chunks = _by_size(reports)
    assert [len(chunk) for chunk in chunks] == [2, 1, 2]  # no message carries two big results
    assert all(len(chunk) == 1 or sum(map(len, chunk)) <= MESSAGE_BUDGET for chunk in chunks)
    entries = [orjson.loads(entry) for chunk in chunks for entry in chunk]
    assert [entry["ref"] for entry in entries] == [0, 1, 2, 3, 4]  # in order, each once
    assert entries[1]["state"]["data"] == 1


async def test_a_server_that_stops_answering_is_noticed_by_the_keepalive_and_left(
    trioworker_server: RunningServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with freezing_proxy(int(trioworker_server.url.rsplit(":", 1)[1])) as proxy:
        client = SubscriptionClient(
            api_url=proxy.api_url,
            api_key=None,
            keys=("k",),
            client_id="c-1",
            credit=1,
            held=set,
            on_cancel=lambda ids: None,
            rng=random.Random(1),
            keepalive_idle=0.2,
            keepalive_timeout=0.5,
        )
        lost = trio.Event()
        send, receive = trio.open_memory_channel[TaskRun](10)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.run, send)
            handler = WhenLogged("subscription lost .*answered no ping within 0.5 s", lost)
            logging.getLogger("trioworker").addHandler(handler)
            try:
                proxy.freeze()
                with trio.fail_after(10):
                    await lost.wait()
                assert not is_connected(client)  # so the worker's /health says 503
                proxy.thaw()
                [(run, _)] = await trioworker_server.service.create_runs([TaskRunCreate(task_key="k")])
                with trio.fail_after(20):
                    delivered = await receive.receive()  # over a new connection
            finally:
                logging.getLogger("trioworker").removeHandler(handler)
            assert delivered.id == run.id
            assert is_connected(client) and client.reconnects >= 1
            nursery.cancel_scope.cancel()


def is_connected(client: SubscriptionClient) -> bool:
    return client.connected


class WhenLogged(logging.Handler):
    """Sets ``event`` when a record whose message matches ``pattern`` is logged."""

    def __init__(self, pattern: str, event: trio.Event) -> None:
        super().__init__(logging.DEBUG)
        self.pattern = re.compile(pattern)
        self.event = event

    def emit(self, record: logging.LogRecord) -> None:
        if self.pattern.search(record.getMessage()):
            self.event.set()

"""Random input never makes the server fail: hypothesis throws JSON at the API and the socket."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import httpx
import orjson
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from trioworker.server import RunningServer, ServerConfig, serve_server

from .raw import connect

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
#: Objects shaped like our messages, with random field values.
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["ack", "credit", "states", "release", "quit", "subscribe", "dance"])},
    optional={"n": json_values, "ids": json_values, "states": json_values, "keys": json_values},
)
create_like = st.fixed_dictionaries(
    {},
    optional={
        "task_key": json_values,
        "parameters": json_values,
        "serializer": json_values,
        "scheduled_time": json_values,
        "wait_for": json_values,
        "tags": json_values,
    },
)
FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@asynccontextmanager
async def a_server() -> AsyncIterator[tuple[RunningServer, httpx.AsyncClient]]:
    """A fresh in-memory server per example (hypothesis reruns the test body, not fixtures)."""
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(partial(serve_server, ServerConfig(port=0)))
        async with httpx.AsyncClient(base_url=server.api_url) as api:
            yield server, api
        nursery.cancel_scope.cancel()


@FUZZ
@given(body=create_like | json_values)
async def test_random_create_bodies_get_a_4xx_or_a_run(body: Any) -> None:
    async with a_server() as (_, api):
        response = await api.post(
            "/task_runs", content=orjson.dumps(body), headers={"Content-Type": "application/json"}
        )
        assert response.status_code in (200, 201, 400, 422), response.text
        assert "detail" in response.json() or response.status_code in (200, 201)
        assert (await api.get("/health")).status_code == 200


@FUZZ
@given(message=message_like | json_values)
async def test_random_socket_messages_never_break_the_server(message: Any) -> None:
    async with a_server() as (server, api):
        await _send_after_subscribing(server, message)
        assert (await api.get("/health")).status_code == 200


async def _send_after_subscribing(server: RunningServer, message: Any) -> None:
    async with connect(server) as ws:
        await ws.send_message(orjson.dumps({"type": "auth", "token": None}).decode())
        await ws.get_message()
        subscribe = {"type": "subscribe", "keys": ["fuzz"], "client_id": "fuzz", "credit": 1}
        await ws.send_message(orjson.dumps(subscribe).decode())
        await ws.send_message(orjson.dumps(message).decode())
        with trio.move_on_after(0.05):
            try:
                while True:
                    reply = orjson.loads(await ws.get_message())
                    assert reply["type"] in ("state_results", "task_runs", "cancel")
            except ConnectionClosed as closed:
                assert closed.reason is not None and closed.reason.code in (1000, 4001)

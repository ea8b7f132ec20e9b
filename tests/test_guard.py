"""What keeps other web pages away from a server without an API key (trioworker.server.guard):
real requests with the headers a browser would send."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
import trio
import trio_websocket

from trioworker import protocol
from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.guard import Exposure, exposure, is_loopback_name

FOREIGN = "http://evil.example"


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    async with trio.open_nursery() as nursery:
        config = ServerConfig(port=0, allowed_origins=("http://dash.example:8080",))
        yield await nursery.start(serve_server, config)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def api(server: RunningServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.api_url) as client:
        yield client


async def count_runs(api: httpx.AsyncClient) -> int:
    return len((await api.get("/task_runs")).json())


async def test_a_body_that_is_not_json_by_its_content_type_is_refused(api: httpx.AsyncClient) -> None:
    body = b'{"task_key": "k"}'
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
        headers = {} if content_type is None else {"Content-Type": content_type}
        for path in ("/task_runs", "/task_runs/purge"):
            response = await api.post(path, content=body, headers=headers)
            assert response.status_code == 415, (path, content_type, response.text)
            assert "Content-Type: application/json" in response.json()["detail"]
    assert await count_runs(api) == 0
    ok = await api.post(
        "/task_runs", content=body, headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 201, ok.text


async def test_a_page_of_another_origin_changes_nothing(
    api: httpx.AsyncClient, server: RunningServer
) -> None:
    run = (await api.post("/task_runs", json={"task_key": "k"})).json()
    own = server.url.rstrip("/")
    for origin in (FOREIGN, "null", "http://127.0.0.1:1", "http://localhost", own + ".evil.example"):
        headers = {"Origin": origin}
        assert (await api.post("/task_runs", json={"task_key": "k"}, headers=headers)).status_code == 403
        assert (await api.post(f"/task_runs/{run['id']}/cancel", headers=headers)).status_code == 403
        assert (await api.delete(f"/task_runs/{run['id']}", headers=headers)).status_code == 403
        refused = await api.post("/task_runs/purge", json={"older_than": 0}, headers=headers)
        assert refused.status_code == 403
        assert "--allowed-origins" in refused.json()["detail"]
    assert (await api.get(f"/task_runs/{run['id']}")).json()["state"]["type"] == "SCHEDULED"
    assert await count_runs(api) == 1
    # The server's own pages, and the allowed origin, may.
    for origin in (own, "http://DASH.example:8080/"):
        response = await api.post("/task_runs", json={"task_key": "k"}, headers={"Origin": origin})
        assert response.status_code == 201, (origin, response.text)
    # Reading with a foreign Origin is answered (the browser keeps the answer from the page).
    assert (await api.get("/health", headers={"Origin": FOREIGN})).status_code == 200


async def test_a_loopback_server_answers_only_loopback_host_names(
    api: httpx.AsyncClient, server: RunningServer
) -> None:
    port = server.url.rstrip("/").rpartition(":")[2]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "10.0.0.1"):
        response = await api.get("/health", headers={"Host": host})
        assert response.status_code == 403, host
        assert "loopback" in response.json()["detail"]
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}", "LOCALHOST.", "app.localhost:1"):
        assert (await api.get("/health", headers={"Host": host})).status_code == 200, host


async def handshake(server: RunningServer, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    """The status of a websocket handshake to ``path`` with ``headers`` (101: accepted)."""
    host, _, port = server.url.removeprefix("http://").rstrip("/").rpartition(":")
    status = 101
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        try:
            async with trio.open_nursery() as nursery:
                ws = await trio_websocket.wrap_client_stream(
                    nursery, stream, f"{host}:{port}", "/api" + path, extra_headers=headers
                )
                await ws.aclose()
        except* trio_websocket.ConnectionRejected as group:
            [rejected] = group.exceptions
            assert isinstance(rejected, trio_websocket.ConnectionRejected)
            status = rejected.status_code
    return status


@pytest.mark.parametrize("path", [protocol.SUBSCRIPTION_PATH, protocol.CHANNEL_PATH, protocol.EVENTS_PATH])
async def test_a_websocket_from_a_page_of_another_origin_is_refused(server: RunningServer, path: str) -> None:
    for origin in (FOREIGN, "null"):
        assert await handshake(server, path, [(b"Origin", origin.encode())]) == 403
    own = server.url.rstrip("/").encode()
    for headers in ([], [(b"Origin", own)], [(b"Origin", b"http://dash.example:8080")]):
        assert await handshake(server, path, headers) == 101, headers


@pytest.mark.parametrize(
    ("host", "reach"),
    [
        ("127.0.0.1", Exposure.LOOPBACK),
        ("localhost", Exposure.LOOPBACK),
        ("[::1]", Exposure.LOOPBACK),
        ("127.0.0.2", Exposure.LOOPBACK),
        ("0.0.0.0", Exposure.EVERY_INTERFACE),
        ("0", Exposure.EVERY_INTERFACE),
        ("0.0", Exposure.EVERY_INTERFACE),
        ("::", Exposure.EVERY_INTERFACE),
        ("::0", Exposure.EVERY_INTERFACE),
        ("0:0:0:0:0:0:0:0", Exposure.EVERY_INTERFACE),
        ("[::]", Exposure.EVERY_INTERFACE),
        ("", Exposure.EVERY_INTERFACE),
        ("10.1.2.3", Exposure.NETWORK),
        ("192.168.0.1", Exposure.NETWORK),
        ("name.invalid", Exposure.NETWORK),
    ],
)
async def test_exposure_reads_the_address_not_its_spelling(host: str, reach: Exposure) -> None:
    assert await exposure(host) is reach


def test_loopback_names() -> None:
    loopback = ["localhost", "localhost:80", "127.9.9.9:1", "[::1]", "::1", "a.localhost"]
    assert all(map(is_loopback_name, loopback))
    assert not any(
        map(is_loopback_name, ["localhost.evil", "evil", "[::2]:80", "0.0.0.0", "", "127.0.0.1.x"])
    )

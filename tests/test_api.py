"""The REST API through real HTTP against the in-process server."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import trio

from trioworker.server import RunningServer, ServerConfig
from trioworker.testing import ServerControl

from .raw import subscribe


async def create(api: httpx.AsyncClient, key: str = "say", **fields: object) -> dict[str, Any]:
    response = await api.post("/task_runs", json={"task_key": key, **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


async def test_health(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_create_and_read(api: httpx.AsyncClient) -> None:
    run = await create(api, parameters={"text": "hi"}, name="greeting", tags=["t"])
    assert run["state"]["type"] == "SCHEDULED"
    assert run["name"] == "greeting"
    read = (await api.get(f"/task_runs/{run['id']}")).json()
    assert read == run


async def test_batch_create_keeps_order(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/task_runs/batch", json=[{"task_key": "k", "parameters": {"i": i}} for i in range(50)]
    )
    assert response.status_code == 201
    assert [r["parameters"]["i"] for r in response.json()] == list(range(50))


async def test_list_filters_by_key_and_state(api: httpx.AsyncClient) -> None:
    a = await create(api, "a")
    await create(api, "b")
    c = await create(api, "a")
    await api.post(f"/task_runs/{c['id']}/cancel")
    by_key = (await api.get("/task_runs", params={"task_key": "a"})).json()
    assert [r["id"] for r in by_key] == [a["id"], c["id"]]
    cancelled = (await api.get("/task_runs", params={"state": "CANCELLED"})).json()
    assert [r["id"] for r in cancelled] == [c["id"]]
    limited = (await api.get("/task_runs", params={"limit": 1})).json()
    assert [r["id"] for r in limited] == [a["id"]]


async def test_cancel_a_scheduled_run_is_never_delivered(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    doomed = await create(api, "k")
    kept = await create(api, "k")
    response = await api.post(f"/task_runs/{doomed['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["state"]["type"] == "CANCELLED"
    again = await api.post(f"/task_runs/{doomed['id']}/cancel")
    assert again.status_code == 200  # idempotent
    async with subscribe(trioworker_server, ["k"]) as sub:
        assert [r["id"] for r in await sub.runs()] == [kept["id"]]


async def test_cancel_a_finished_run_conflicts(api: httpx.AsyncClient) -> None:
    run = await create(api)
    for state in ("RUNNING", "COMPLETED"):
        await api.post(f"/task_runs/{run['id']}/set_state", json={"state": {"type": state, "name": state}})
    response = await api.post(f"/task_runs/{run['id']}/cancel")
    assert response.status_code == 409
    assert "COMPLETED" in response.json()["detail"]


async def test_delete(api: httpx.AsyncClient) -> None:
    run = await create(api)
    assert (await api.delete(f"/task_runs/{run['id']}")).status_code == 204
    assert (await api.get(f"/task_runs/{run['id']}")).status_code == 404
    assert (await api.delete(f"/task_runs/{run['id']}")).status_code == 404


async def test_set_state_rules_and_idempotent_repeats(api: httpx.AsyncClient) -> None:
    run = await create(api)
    url = f"/task_runs/{run['id']}/set_state"
    running = {"state": {"type": "RUNNING", "name": "Running"}}
    done = {"state": {"type": "COMPLETED", "name": "Completed", "data": {"answer": 42}}}
    assert (await api.post(url, json=running)).json()["status"] == "ACCEPT"
    assert (await api.post(url, json=done)).json()["status"] == "ACCEPT"
    repeat = (await api.post(url, json=done)).json()
    assert repeat["status"] == "ACCEPT"
    back = (await api.post(url, json=running)).json()
    assert back["status"] == "REJECT"
    assert back["state"]["type"] == "COMPLETED"
    forced = (await api.post(url, json={**running, "force": True})).json()
    assert forced["status"] == "ACCEPT"
    read = (await api.get(f"/task_runs/{run['id']}")).json()
    assert read["state"]["type"] == "RUNNING"
    assert read["run_count"] == 2


async def test_history_lists_every_state_in_order(api: httpx.AsyncClient) -> None:
    run = await create(api)
    for state in ("RUNNING", "FAILED"):
        await api.post(
            f"/task_runs/{run['id']}/set_state", json={"state": {"type": state, "name": state.title()}}
        )
    history = (await api.get(f"/task_runs/{run['id']}/history")).json()
    assert [h["type"] for h in history] == ["SCHEDULED", "RUNNING", "FAILED"]


async def test_idempotency_key_gives_the_same_run(api: httpx.AsyncClient) -> None:
    first = await api.post("/task_runs", json={"task_key": "k", "idempotency_key": "once"})
    second = await api.post("/task_runs", json={"task_key": "k", "idempotency_key": "once"})
    assert first.status_code == 201
    assert second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


async def test_an_idempotency_key_is_scoped_to_its_task_key(api: httpx.AsyncClient) -> None:
    a = await api.post("/task_runs", json={"task_key": "a", "idempotency_key": "once"})
    b = await api.post("/task_runs", json={"task_key": "b", "idempotency_key": "once"})
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["id"] != b.json()["id"]
    assert (a.json()["task_key"], b.json()["task_key"]) == ("a", "b")
    again = await api.post("/task_runs", json={"task_key": "b", "idempotency_key": "once"})
    assert (again.status_code, again.json()["id"]) == (200, b.json()["id"])
    batch = await api.post(
        "/task_runs/batch",
        json=[
            {"task_key": "c", "idempotency_key": "once"},
            {"task_key": "a", "idempotency_key": "once"},
            {"task_key": "c", "idempotency_key": "once"},
        ],
    )
    assert batch.status_code == 201
    [c, a_again, c_again] = batch.json()
    assert c["task_key"] == "c" and c["id"] not in (a.json()["id"], b.json()["id"])
    assert a_again["id"] == a.json()["id"] and c_again["id"] == c["id"]
    scheduled = (await api.get("/task_runs", params={"state": "SCHEDULED"})).json()
    assert sorted(run["task_key"] for run in scheduled) == ["a", "b", "c"]


async def test_wait_returns_when_the_run_ends(api: httpx.AsyncClient) -> None:
    run = await create(api)
    url = f"/task_runs/{run['id']}/set_state"
    async with trio.open_nursery() as nursery:
        result: dict[str, object] = {}

        async def waiter() -> None:
            response = await api.get(f"/task_runs/{run['id']}/wait", params={"timeout": 30})
            result.update(response.json())

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        await api.post(url, json={"state": {"type": "RUNNING", "name": "Running"}})
        await api.post(url, json={"state": {"type": "COMPLETED", "name": "Completed", "data": 7}})
    assert result["state"]["type"] == "COMPLETED"  # type: ignore[index]
    assert result["state"]["data"] == 7  # type: ignore[index]


async def test_wait_many_returns_ended_missing_and_pending(api: httpx.AsyncClient) -> None:
    ended = await create(api)
    pending = await create(api)
    await api.post(f"/task_runs/{ended['id']}/cancel")
    ghost = str(uuid.uuid4())
    response = await api.post(
        "/task_runs/wait", json={"ids": [ended["id"], pending["id"], ghost], "timeout": 0}
    )
    body = response.json()
    assert [r["id"] for r in body["ended"]] == [ended["id"]]
    assert body["missing"] == [ghost]
    assert body["pending"] == [pending["id"]]


async def test_wait_times_out_with_the_current_state(api: httpx.AsyncClient) -> None:
    run = await create(api)
    response = await api.get(f"/task_runs/{run['id']}/wait", params={"timeout": 0})
    assert response.json()["state"]["type"] == "SCHEDULED"


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "detail"),
    [
        ("POST", "/task_runs", b"{not json", 400, "malformed JSON"),
        ("POST", "/task_runs", b"[1, 2]", 422, "JSON object"),
        ("POST", "/task_runs", b'{"name": "x"}', 422, "task_key"),
        ("POST", "/task_runs", b'{"task_key": ""}', 422, "task_key"),
        ("POST", "/task_runs", b'{"task_key": "k", "serializer": "yaml"}', 422, "serializer"),
        ("POST", "/task_runs", b'{"task_key": "k", "parameters": [1]}', 422, "parameters"),
        ("POST", "/task_runs", b'{"task_key": "k", "scheduled_time": "soon"}', 422, "scheduled_time"),
        ("POST", "/task_runs/batch", b'{"task_key": "k"}', 422, "array"),
        ("POST", "/task_runs/batch", b'[{"task_key": "k"}, {"task_key": 5}]', 422, "#1"),
        ("GET", "/task_runs/not-a-uuid", None, 404, "not a UUID"),
        ("GET", f"/task_runs/{uuid.UUID(int=1)}", None, 404, "no task run"),
        ("GET", "/task_runs?state=EXPLODED", None, 422, "unknown state"),
        ("GET", "/task_runs?limit=0", None, 422, "limit"),
        ("GET", "/task_runs?limit=ten", None, 422, "limit"),
        (
            "POST",
            f"/task_runs/{uuid.UUID(int=1)}/set_state",
            b'{"state": {"type": "RUNNING", "name": "R"}}',
            404,
            "no task run",
        ),
        ("POST", f"/task_runs/{uuid.UUID(int=1)}/cancel", None, 404, "no task run"),
        ("POST", "/task_runs/wait", b'{"ids": ["x"]}', 422, "UUID"),
        ("POST", "/task_runs/wait", b'{"ids": [], "timeout": -1}', 422, "timeout"),
        ("GET", "/nowhere", None, 404, ""),
        ("PUT", "/task_runs", b"{}", 405, ""),
    ],
)
async def test_bad_input_gets_a_json_4xx(
    api: httpx.AsyncClient, method: str, path: str, body: bytes | None, status: int, detail: str
) -> None:
    response = await api.request(method, path, content=body)
    assert response.status_code == status
    assert detail in response.json()["detail"]
    assert (await api.get("/health")).status_code == 200


async def test_bad_state_in_set_state_is_422(api: httpx.AsyncClient) -> None:
    run = await create(api)
    response = await api.post(
        f"/task_runs/{run['id']}/set_state", json={"state": {"type": "EXPLODED", "name": "x"}}
    )
    assert response.status_code == 422
    assert "state" in response.json()["detail"]


async def test_oversized_bodies_get_413_and_the_server_keeps_serving(
    trioworker_server_control: ServerControl,
) -> None:
    server = await trioworker_server_control.start(max_body_bytes=10_000)
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        response = await api.post("/task_runs", json={"task_key": "k", "parameters": {"blob": "x" * 20_000}})
        assert response.status_code == 413
        assert "too large" in response.json()["detail"]
        assert (await api.post("/task_runs", json={"task_key": "k"})).status_code == 201


async def test_api_key_is_required_when_set(trioworker_server_control: ServerControl) -> None:
    server = await trioworker_server_control.start(api_key="s3cret")
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        assert (await api.get("/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = await api.post("/task_runs", json={"task_key": "k"}, headers=headers)
            assert response.status_code == 401
            assert "API key" in response.json()["detail"]
        ok = await api.post("/task_runs", json={"task_key": "k"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201


def test_server_config_defaults() -> None:
    config = ServerConfig()
    assert (config.host, config.port, config.max_deliveries) == ("127.0.0.1", 4300, 5)

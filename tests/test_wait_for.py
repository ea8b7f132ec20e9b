"""Runs with ``wait_for`` are held by the server until those runs complete."""

from __future__ import annotations

import uuid

import httpx
import pytest

from trioworker.server import RunningServer
from trioworker.testing import ServerControl

from .helpers import wait_all
from .raw import subscribe

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store


async def create(api: httpx.AsyncClient, key: str, **fields: object) -> str:
    response = await api.post("/task_runs", json={"task_key": key, **fields})
    assert response.status_code == 201, response.text
    run_id = response.json()["id"]
    assert isinstance(run_id, str)
    return run_id


async def test_a_run_waits_until_its_upstreams_complete(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    first = await create(api, "up")
    second = await create(api, "up")
    after = await create(api, "down", wait_for=[first, second])
    assert (await api.get("/health")).json()["blocked"] == 1
    async with subscribe(trioworker_server, ["up", "down"], credit=10) as sub:
        got = [r["id"] for r in await sub.runs()]
        while len(got) < 2:
            got += [r["id"] for r in await sub.runs()]
        assert got == [first, second]  # not `after`, though it is queued too
        await sub.finish([first])
        assert (await api.get("/health")).json()["blocked"] == 1
        await sub.finish([second])
        [run] = await sub.runs()
        assert run["id"] == after
        assert run["wait_for"] == [first, second]


async def test_a_failed_upstream_fails_its_dependents_in_a_chain(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    up = await create(api, "up")
    middle = await create(api, "down", wait_for=[up])
    last = await create(api, "down", wait_for=[middle])
    async with subscribe(trioworker_server, ["up"], credit=1) as sub:
        await sub.runs()
        await sub.report([up], "RUNNING")
        await sub.report([up], "FAILED")
    runs = await wait_all(api, [middle, last])
    assert [r["state"]["type"] for r in runs] == ["FAILED", "FAILED"]
    assert runs[0]["state"]["message"] == f"not started: a run it waits for ({up}) ended FAILED"
    assert runs[1]["state"]["message"] == f"not started: a run it waits for ({middle}) ended FAILED"
    assert (await api.get("/health")).json()["blocked"] == 0


async def test_waiting_for_an_unknown_or_deleted_run_fails(api: httpx.AsyncClient) -> None:
    ghost = str(uuid.uuid4())
    orphan = await create(api, "down", wait_for=[ghost])
    up = await create(api, "up")
    dependent = await create(api, "down", wait_for=[up])
    await api.delete(f"/task_runs/{up}")
    runs = await wait_all(api, [orphan, dependent])
    assert [r["state"]["type"] for r in runs] == ["FAILED", "FAILED"]
    assert runs[0]["state"]["message"].endswith(f"({ghost}) does not exist")
    assert runs[1]["state"]["message"].endswith(f"({up}) does not exist")


async def test_already_completed_upstreams_do_not_block(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    up = await create(api, "up")
    for state in ("RUNNING", "COMPLETED"):
        await api.post(f"/task_runs/{up}/set_state", json={"state": {"type": state, "name": state.title()}})
    down = await create(api, "down", wait_for=[up])
    async with subscribe(trioworker_server, ["down"]) as sub:
        assert [r["id"] for r in await sub.runs()] == [down]


async def test_holds_survive_a_restart(trioworker_server_control: ServerControl) -> None:
    server = await trioworker_server_control.start()
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        up = await create(api, "up")
        down = await create(api, "down", wait_for=[up])
    server = await trioworker_server_control.restart()
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        assert (await api.get("/health")).json()["blocked"] == 1
        async with subscribe(server, ["up", "down"], credit=5) as sub:
            assert [r["id"] for r in await sub.runs()] == [up]
            await sub.finish([up])
            assert [r["id"] for r in await sub.runs()] == [down]

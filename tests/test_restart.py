"""A server stopped (as by a crash) and started again on the same database loses nothing."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
import trio
import trio.testing

from trioworker.server.queue import trio_anchored_clock
from trioworker.testing import ServerControl

from .raw import subscribe

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store


async def test_queued_delayed_and_held_runs_survive_a_restart(
    mock_clock: trio.testing.MockClock, trioworker_server_control: ServerControl
) -> None:
    clock = trio_anchored_clock()
    server = await trioworker_server_control.start(clock=clock)
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        due = datetime.fromtimestamp(clock() + 3600, UTC).isoformat()
        held = (await api.post("/task_runs", json={"task_key": "k"})).json()["id"]
        queued = [r["id"] for r in (await api.post("/task_runs/batch", json=[{"task_key": "k"}] * 3)).json()]
        delayed = (await api.post("/task_runs", json={"task_key": "k", "scheduled_time": due})).json()["id"]
        async with subscribe(server, ["k"], credit=1) as sub:
            [run] = await sub.runs()
            assert run["id"] == held
            await sub.report([held], "RUNNING")
            await trioworker_server_control.stop()

    server = await trioworker_server_control.start(clock=clock)
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        health = (await api.get("/health")).json()
        assert (health["ready"], health["delayed"]) == (4, 1)
        state = (await api.get(f"/task_runs/{held}")).json()["state"]
        assert (state["type"], state["name"]) == ("SCHEDULED", "Redelivered")
        async with subscribe(server, ["k"], credit=10) as sub:
            got: list[str] = []
            while len(got) < 4:
                got += [r["id"] for r in await sub.runs()]
            assert got == [held, *queued]
            mock_clock.jump(3601)
            assert [r["id"] for r in await sub.runs()] == [delayed]


async def test_restart_on_the_same_port(trioworker_server_control: ServerControl) -> None:
    first = await trioworker_server_control.start()
    async with httpx.AsyncClient(base_url=first.api_url) as api:
        run_id = (await api.post("/task_runs", json={"task_key": "k"})).json()["id"]
    second = await trioworker_server_control.restart()
    assert second.url == first.url
    async with httpx.AsyncClient(base_url=second.api_url) as api:
        assert (await api.get(f"/task_runs/{run_id}")).status_code == 200

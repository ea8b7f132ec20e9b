"""Retention: ended runs are deleted after the server's retention period (a deadline, on a
mock clock here), or on request (``POST /api/task_runs/purge``); durations as people write them."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from trioworker._util import parse_duration
from trioworker.models import SetStateRequest, StateType, TaskRunCreate, make_state
from trioworker.server import ServerConfig
from trioworker.server.live import RunNote
from trioworker.server.service import PURGE_BATCH, TaskRunService
from trioworker.testing import ServerControl

from .helpers import submit, wait_all

pytestmark = pytest.mark.every_store

HOUR = 3600.0


async def deleted_notes(service: TaskRunService, expected: int) -> list[RunNote]:
    """Wait for ``expected`` runs to be deleted (the live feed tells); their notes."""
    notes: list[RunNote] = []
    with service.feed.listen() as listener:
        while len(notes) < expected:
            await listener.runs_changed.wait()
            taken, overflowed = listener.take()
            assert not overflowed
            notes += [note for note in taken if note.deleted]
    return notes


async def test_the_server_deletes_ended_runs_once_the_retention_period_passed(
    trioworker_autojump_clock: trio.testing.MockClock, trioworker_server_control: ServerControl
) -> None:
    service = (await trioworker_server_control.start(retention=HOUR)).service
    created = await service.create_runs([TaskRunCreate(task_key="r.k") for _ in range(3)])
    ended, cancelled, waiting = (run.id for run, _ in created)
    await service.cancel(cancelled)
    await service.set_states([(ended, SetStateRequest(make_state(StateType.FAILED), force=True))])
    started = trio.current_time()
    await trio.sleep(HOUR - 120)
    assert len(await service.store.read_runs([ended, cancelled, waiting])) == 3  # not yet
    with trio.fail_after(HOUR):
        notes = await deleted_notes(service, 2)
    assert {note.id for note in notes} == {ended, cancelled}
    assert HOUR - 1 <= trio.current_time() - started <= HOUR + 61  # granularity: a minute at most
    assert [run.id for run in await service.store.read_runs([ended, cancelled, waiting])] == [waiting]
    assert await service.store.history(ended) is None


async def test_retention_zero_keeps_every_run(
    trioworker_autojump_clock: trio.testing.MockClock, trioworker_server_control: ServerControl
) -> None:
    service = (await trioworker_server_control.start(retention=0)).service
    [(run, _)] = await service.create_runs([TaskRunCreate(task_key="r.k")])
    await service.cancel(run.id)
    await trio.sleep(30 * 24 * HOUR)
    assert await service.read_run(run.id) is not None
    assert await service.purge_ended(make_state(StateType.CANCELLED).timestamp) == 1  # on request only
    with pytest.raises(ValueError, match=">= 0"):
        ServerConfig(retention=-1)


async def test_purge_deletes_ended_runs_older_than_asked(trioworker_server_control: ServerControl) -> None:
    running = await trioworker_server_control.start(retention=0)
    async with httpx.AsyncClient(base_url=running.api_url) as api:
        old = await submit(api, "r.a", {}, {}, {})
        other = await submit(api, "r.b", {})
        for run_id in [*old[:2], *other]:
            assert (await api.post(f"/task_runs/{run_id}/cancel")).status_code == 200
        failed = await api.post(
            f"/task_runs/{old[2]}/set_state", json={"state": {"type": "FAILED"}, "force": True}
        )
        assert failed.status_code == 200
        kept = await submit(api, "r.a", {})

        async def purge(**body: Any) -> httpx.Response:
            return await api.post("/task_runs/purge", json=body)

        assert (await purge(older_than=HOUR)).json() == {"deleted": 0}  # none is that old
        assert (await purge(older_than=0, task_key="r.a", state="FAILED")).json() == {"deleted": 1}
        assert (await purge(older_than=0, task_key="r.a")).json() == {"deleted": 2}
        assert (await purge(older_than=0)).json() == {"deleted": 1}
        assert (await api.get(f"/task_runs/{old[0]}")).status_code == 404
        assert (await api.get(f"/task_runs/{old[0]}/history")).status_code == 404
        assert [run["id"] for run in (await api.get("/task_runs")).json()] == kept
        refusals: list[tuple[dict[str, Any], str]] = [
            ({"older_than": -1}, "older_than must be seconds between 0"),
            ({"older_than": 1e300}, "older_than must be seconds between 0"),
            ({"older_than": 0, "state": "RUNNING"}, "state must be a state runs end in"),
            ({"older_than": 0, "state": "SOON"}, "invalid purge request"),
            ({"older_than": "1d"}, "invalid purge request"),
            ({}, "invalid purge request"),
        ]
        for body, detail in refusals:
            refused = await purge(**body)
            assert refused.status_code == 422 and detail in refused.json()["detail"], (body, refused.text)


async def test_a_big_purge_goes_in_batches(trioworker_server_control: ServerControl) -> None:
    service = (await trioworker_server_control.start(retention=0)).service
    created = await service.create_runs(
        [TaskRunCreate(task_key="r.many") for _ in range(PURGE_BATCH * 2 + 5)]
    )
    cancel = SetStateRequest(make_state(StateType.CANCELLED))
    await service.set_states([(run.id, cancel) for run, _ in created])
    calls: list[int] = []
    purge = service.store.purge_ended

    async def counted(*args: Any, **kwargs: Any) -> list[uuid.UUID]:
        ids = await purge(*args, **kwargs)
        calls.append(len(ids))
        return ids

    service.store.purge_ended = counted  # type: ignore[method-assign]
    assert await service.purge_ended(make_state(StateType.CANCELLED).timestamp) == PURGE_BATCH * 2 + 5
    assert calls == [PURGE_BATCH, PURGE_BATCH, 5]
    assert await service.list_runs(task_key="r.many", state=None, limit=10, offset=0) == []


async def test_purged_runs_are_missing_to_a_wait(trioworker_server_control: ServerControl) -> None:
    running = await trioworker_server_control.start(retention=0)
    async with httpx.AsyncClient(base_url=running.api_url) as api:
        ids = await submit(api, "r.w", {})
        await api.post(f"/task_runs/{ids[0]}/cancel")
        [ended] = await wait_all(api, ids)
        assert ended["state"]["type"] == "CANCELLED"
        assert (await api.post("/task_runs/purge", json={"older_than": 0})).json() == {"deleted": 1}
        body = (await api.post("/task_runs/wait", json={"ids": ids, "timeout": 1})).json()
        assert body["missing"] == ids


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90", 90), ("90s", 90), ("15m", 900), ("1.5h", 5400), ("7d", 604800), ("2w", 1209600), ("0", 0)],
)
def test_durations_as_people_write_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "nan", "inf", "seven days"])
def test_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)

"""The submitter's side of the client channel with a real server: creates watched from the
start, so that an awaited result costs no watch message (issue 18)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import trioworker
from trioworker import TaskRunFailed, TaskRunFuture, TaskWorker, task
from trioworker.client.channel import ClientChannel
from trioworker.models import JSON, TaskRunCreate
from trioworker.server import RunningServer
from trioworker.server.channel import ChannelSession
from trioworker.server.service import TaskRunService
from trioworker.testing import ServerControl

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store

Make = Callable[..., TaskWorker]


@task(key="cw.add")
async def add(a: int, b: int = 10) -> int:
    return a + b


class Wire:
    """What every client channel of the test sends, and an event per ``ended`` applied."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[dict[str, JSON]] = []
        #: The type of every message applied, in order.
        self.applied: list[str] = []
        self.ended = trio.Event()
        send, apply = ClientChannel._send, ClientChannel._apply

        async def recording(channel: ClientChannel, message: dict[str, JSON]) -> None:
            self.sent.append(message)
            await send(channel, message)

        def applying(channel: ClientChannel, message: dict[str, JSON]) -> None:
            apply(channel, message)
            self.applied.append(str(message["type"]))
            if message["type"] == "ended":
                self.ended.set()

        monkeypatch.setattr(ClientChannel, "_send", recording)
        monkeypatch.setattr(ClientChannel, "_apply", applying)

    def types(self) -> list[str]:
        return [str(m["type"]) for m in self.sent]

    async def until_ended(self, channel: ClientChannel, futures: list[TaskRunFuture[Any]]) -> None:
        """Until the channel has every future's end (each ``ended`` wakes a check)."""
        with trio.fail_after(10):
            while not all(channel.ended(f.task_run_id) for f in futures):
                self.ended = trio.Event()
                await self.ended.wait()


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> Wire:
    return Wire(monkeypatch)


def count_requests(client: trioworker.TaskRunClient) -> list[str]:
    seen: list[str] = []

    async def hook(request: httpx.Request) -> None:
        seen.append(request.url.path)

    client._http.event_hooks["request"].append(hook)
    return seen


async def awaited_once(server: RunningServer) -> None:
    """Await one run (cancelled, no worker needed): creates are watched from then on."""
    future = await add.delay(0)
    await server.service.cancel(future.task_run_id)
    assert isinstance(await future.result(timeout=10, raise_on_failure=False), TaskRunFailed)


async def test_awaited_results_need_no_watch_message(trioworker_worker: Make, wire: Wire) -> None:
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        watching = [channel.watch_creates]
        requests = count_requests(client)
        async with trioworker_worker(add):
            assert await (await add.delay(1)).result(timeout=10) == 11
            watching.append(channel.watch_creates)
            for i in range(5):
                assert await (await add.delay(i)).result(timeout=10) == i + 10
        assert watching == [False, True]  # from the first result awaited here on
        assert wire.types() == ["create", "watch"] + ["create"] * 5
        assert "watch" not in wire.sent[0] and all(m["watch"] is True for m in wire.sent[2:])
        assert requests == []
        gc.collect()
        assert channel._created == {}  # nothing kept once the futures are gone


async def test_a_future_awaited_after_its_end_came(trioworker_server: RunningServer, wire: Wire) -> None:
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        await awaited_once(trioworker_server)
        futures = [await add.delay(i) for i in range(3)]
        for future in futures:
            await trioworker_server.service.cancel(future.task_run_id)
        await wire.until_ended(channel, futures)
        wire.sent.clear()
        requests = count_requests(client)
        with pytest.raises(TaskRunFailed, match="CANCELLED"):
            await futures[0].result()
        await trioworker.wait_all(futures[1:2])
        assert [f.task_run_id async for f in trioworker.as_completed(futures[2:])] == [futures[2].task_run_id]
        assert all(f.done for f in futures)
        assert (wire.sent, requests) == ([], [])  # no watch message, no long-poll


async def test_ends_nobody_awaits_are_kept_only_while_their_futures_live(
    trioworker_server: RunningServer, wire: Wire
) -> None:
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        await awaited_once(trioworker_server)
        futures = [await add.delay(i) for i in range(3)]
        ids = [f.task_run_id for f in futures]
        assert set(channel._created) == set(ids)
        for run_id in ids[:2]:
            await trioworker_server.service.cancel(run_id)
        await wire.until_ended(channel, futures[:2])
        del futures
        gc.collect()
        assert channel._created == {}  # the ended ones and the one still queued
        # An end pushed for a run whose future is gone is dropped.
        wire.ended = trio.Event()
        await trioworker_server.service.cancel(ids[2])
        with trio.fail_after(10):
            await wire.ended.wait()
        assert channel._created == {}


async def test_a_timed_out_wait_leaves_the_run_watched(trioworker_server: RunningServer, wire: Wire) -> None:
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        await awaited_once(trioworker_server)
        future = await add.delay(1)
        with pytest.raises(TimeoutError):
            await future.result(timeout=0.05)
        await trioworker_server.service.cancel(future.task_run_id)
        with pytest.raises(TaskRunFailed, match="CANCELLED"):
            await future.result(timeout=10)
        assert wire.types()[-1] == "create"  # neither an unwatch nor a watch after it


async def test_a_server_that_ignores_watch_is_watched_as_before(
    trioworker_server: RunningServer, wire: Wire, monkeypatch: pytest.MonkeyPatch
) -> None:
    create = ChannelSession.create

    async def older(
        session: ChannelSession,
        items: list[JSON],
        ref: JSON,
        slot: object,
        partial: bool = False,
        watch: bool = False,
    ) -> None:
        await create(session, items, ref, slot, partial)

    monkeypatch.setattr(ChannelSession, "create", older)
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        await awaited_once(trioworker_server)
        future = await add.delay(1)
        assert wire.sent[-1]["watch"] is True and channel._created == {}
        await trioworker_server.service.cancel(future.task_run_id)
        with pytest.raises(TaskRunFailed, match="CANCELLED"):
            await future.result(timeout=10)
        assert wire.types()[-2:] == ["create", "watch"]


async def test_a_watched_run_survives_the_loss_of_the_channel(
    trioworker_server_control: ServerControl, trioworker_server: RunningServer
) -> None:
    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        await awaited_once(trioworker_server)
        future = await add.delay(1)
        assert future.task_run_id in channel._created
        lost = channel._lost
        server = await trioworker_server_control.restart()
        with trio.fail_after(10):
            await lost.wait()  # the client has seen the socket close (it may take a moment)
        assert future.task_run_id not in channel._created
        await server.service.cancel(future.task_run_id)
        with pytest.raises(TaskRunFailed, match="CANCELLED"):
            await future.result(timeout=10)


async def test_an_end_that_comes_before_the_answer_makes_the_future_done(
    trioworker_server: RunningServer, wire: Wire, monkeypatch: pytest.MonkeyPatch, store_kind: str
) -> None:
    """A run that ends before its create is answered: the future is done at once."""
    create_runs = TaskRunService.create_runs

    async def ending(self: TaskRunService, creates: list[TaskRunCreate], *, partial: bool = False) -> Any:
        made = await create_runs(self, creates, partial=partial)
        await self.cancel(made[0][0].id)
        await trio.testing.wait_all_tasks_blocked()  # its end went out (where it is pushed)
        return made

    async with trioworker.connect() as client:
        channel = client.channel
        assert channel is not None
        await awaited_once(trioworker_server)
        monkeypatch.setattr(TaskRunService, "create_runs", ending)
        del wire.applied[:]
        future = await add.delay(1)
        # Pushed before the answer where its id is watched before the create (a local
        # store); on a shared store it is watched once made, and the answer says it ended.
        assert wire.applied == (["ended", "created"] if store_kind == "sqlite" else ["created"])
        assert future.done and future.task_run is not None
        assert future.task_run.state.type.value == "CANCELLED"
        with pytest.raises(TaskRunFailed, match="CANCELLED"):
            await future.result()
        assert wire.types()[-1] == "create"
        assert channel._created == {}

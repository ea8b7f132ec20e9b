"""The client channel: a submitter's persistent websocket, ``/api/task_runs/channel``.

One HTTP request costs this stack about 1.4 ms; one websocket message about 0.1 ms. A
process that submits runs one by one and awaits their results (``async with
trioworker.connect():``) does both over this socket instead:

1. client ``{"type": "auth", "token": ...}`` → ``{"type": "auth_success"}`` (or close 1008);
2. client ``{"type": "create", "ref": r, "task_runs": [TaskRunCreate, ...], "partial":
   false}`` → server ``{"type": "created", "ref": r, "task_runs": [TaskRun, ...]}``, or
   ``{"type": "error", "ref": r, "status": 422, "detail": "..."}`` (409 for a create whose
   ``id`` another run has, 429 for a full queue: see :mod:`~trioworker.server.limits`; the
   socket stays open). With ``"partial": true`` a 429 carries the runs of the creates that
   fit (``created``) and, with ``"room_announced": true``, promises a ``{"type": "room",
   "task_key": k, "room": n, "refs": [r, ...]}`` once the key's queue has room for the
   refused creates again (``room``: how many runs fit then), so the client need not ask;
3. client ``{"type": "watch", "ids": [...]}`` → server ``{"type": "ended", "task_runs":
   [...], "missing": [...]}`` as those runs end (already ended ones at once), several per
   message; ``{"type": "unwatch", "ids": [...]}`` stops that.

Creates from one connection run concurrently, so they share group commits.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from typing import Final

import trio

from trioworker import protocol
from trioworker.models import JSON, TaskRun, converter
from trioworker.server.limits import QueueFullRefusal
from trioworker.server.service import TaskRunService, Waiter
from trioworker.server.sockets import (
    AsgiWebsocket,
    JsonSocket,
    ProtocolViolation,
    Refusal,
    creates_from,
)

log = logging.getLogger("trioworker.server")

#: Creates one connection may have in flight at once (more wait for a slot).
MAX_CONCURRENT_CREATES: Final = 64
#: Task keys one connection may wait for room of at once (beyond, refusals promise none).
MAX_ROOM_WATCHES: Final = 64


def _ids(message: dict[str, JSON]) -> list[uuid.UUID]:
    raw = message.get("ids")
    try:
        if isinstance(raw, list):
            return [uuid.UUID(str(i)) for i in raw]
    except ValueError:
        pass
    raise ProtocolViolation('"ids" must be a list of task run ids')


class ChannelSession(JsonSocket):
    """The server's side of one client channel (the submitter's side is
    :class:`trioworker.client.channel.ClientChannel`)."""

    def __init__(
        self,
        socket: AsgiWebsocket,
        service: TaskRunService,
        token_ok: Callable[[object], bool],
        closing: trio.Event,
    ) -> None:
        super().__init__(socket, token_ok, closing, service.fence)
        self.service = service
        self.waiter = Waiter()
        self.watched: set[uuid.UUID] = set()
        self.creates = trio.CapacityLimiter(MAX_CONCURRENT_CREATES)
        #: Per task key: the refs of refused creates to name once there is room for them.
        self.room_refs: dict[str, list[JSON]] = {}
        self._nursery: trio.Nursery | None = None

    async def run(self) -> None:
        try:
            await self.serve_authenticated(self.session)
        finally:
            self.service.unwatch(self.waiter, self.watched)

    async def session(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        nursery.start_soon(self.push_ended)
        await self.receive_forever(nursery)

    async def receive_forever(self, nursery: trio.Nursery) -> None:
        while True:
            message = await self.receive()
            kind = message["type"]
            if kind == protocol.CREATE:
                items, ref = message.get("task_runs"), message.get("ref")
                if not isinstance(items, list):
                    raise ProtocolViolation('"task_runs" of a create message must be a list')
                partial = message.get("partial", False)
                if not isinstance(partial, bool):
                    raise ProtocolViolation('"partial" of a create message must be true or false')
                slot = object()
                await self.creates.acquire_on_behalf_of(slot)
                nursery.start_soon(self.create, items, ref, slot, partial)
            elif kind == protocol.WATCH:
                ids = _ids(message)
                self.watched.update(ids)
                ended, missing = await self.service.watch(self.waiter, ids)
                self.watched.difference_update(missing)
                if ended or missing:
                    await self.send_ended(ended, missing)
            elif kind == protocol.UNWATCH:
                ids = _ids(message)
                self.service.unwatch(self.waiter, ids)
                self.watched.difference_update(ids)
            else:
                raise ProtocolViolation(f"unknown message type {kind!r}")

    async def create(self, items: list[JSON], ref: JSON, slot: object, partial: bool = False) -> None:
        try:
            runs = [run for run, _ in await self.service.create_runs(creates_from(items), partial=partial)]
            # Let the deliveries the new runs woke go out first: the reply can wait a pass.
            await trio.lowlevel.cancel_shielded_checkpoint()
        except QueueFullRefusal as full:
            full.room_announced = partial and self._can_announce(full.task_key)
            await self.send({"type": protocol.ERROR, "ref": ref, "status": full.status, **full.body()})
            if full.room_announced:
                # Only once the refusal was sent: its ``room`` message can only come after it.
                self._announce_room(full.task_key, full.wanted, ref)
        except Refusal as exc:
            await self.send({"type": protocol.ERROR, "ref": ref, "status": exc.status, **exc.body()})
        else:
            await self.send({"type": protocol.CREATED, "ref": ref, "task_runs": converter.unstructure(runs)})
        finally:
            self.creates.release_on_behalf_of(slot)

    def _can_announce(self, task_key: str) -> bool:
        """Whether a refusal for ``task_key`` can promise a ``room`` message: the queue is
        this server's own (not several servers'), and the connection waits for few keys."""
        if self.service.dispatcher.shared:
            return False
        return task_key in self.room_refs or len(self.room_refs) < MAX_ROOM_WATCHES

    def _announce_room(self, task_key: str, wanted: int, ref: JSON) -> None:
        """Name ``ref`` in the next ``room`` message of ``task_key`` (one task per key waits)."""
        refs = self.room_refs.get(task_key)
        if refs is not None:
            refs.append(ref)
            return
        self.room_refs[task_key] = [ref]
        assert self._nursery is not None
        self._nursery.start_soon(self._send_room, task_key, wanted)

    async def _send_room(self, task_key: str, wanted: int) -> None:
        """Once ``wanted`` more runs of ``task_key`` fit: tell the refused creates waiting."""
        room = await self.service.wait_room(task_key, wanted, seconds=math.inf)
        # Taken in the same step as the wait ends: a refusal after this one gets a new task.
        refs = self.room_refs.pop(task_key)
        await self.send({"type": protocol.ROOM, "task_key": task_key, "room": room or 0, "refs": refs})

    async def push_ended(self) -> None:
        """Send runs as they end: everything that ended since the last message, in one."""
        while True:
            await self.waiter.changed.wait()
            self.waiter.changed = trio.Event()
            ended, self.waiter.ended = self.waiter.ended, []
            missing, self.waiter.deleted = self.waiter.deleted, []
            self.service.unwatch(self.waiter, [r.id for r in ended] + missing)
            self.watched.difference_update([r.id for r in ended] + missing)
            if ended or missing:
                await self.send_ended(ended, missing)

    async def send_ended(self, ended: list[TaskRun], missing: list[uuid.UUID]) -> None:
        await self.send(
            {
                "type": protocol.ENDED,
                "task_runs": converter.unstructure(ended),
                "missing": [str(i) for i in missing],
            }
        )

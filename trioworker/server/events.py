"""The live feed's websocket, ``/api/events``: what a dashboard tab hears without asking.

1. client ``{"type": "auth", "token": ...}`` → ``{"type": "auth_success"}`` (or close 1008);
2. then the server sends, and the client only listens:

   - ``{"type": "overview", "overview": Overview, "server_time": ...}`` at once, then
     whenever something it shows changed (:class:`~trioworker.server.overview.Overview`; read at most as often
     as :meth:`~trioworker.server.live.LiveFeed.overview_interval` allows, once for all tabs);
   - ``{"type": "runs", "runs": [RunNote, ...]}``: the runs that changed since the last
     such message, each once, as it is now (:class:`~trioworker.server.live.RunNote`), at
     most one message per :data:`~trioworker.server.live.COALESCE_SECONDS`;
   - ``{"type": "resync"}``: more changed than the tab's buffer holds; read your view again.
   - ``{"type": "schedules"}``: schedules were created, changed, deleted or fired; read
     them again (``GET /api/schedules``), at most one such message per
     :data:`~trioworker.server.live.COALESCE_SECONDS`.

A message the client sends after auth breaks the protocol (4001). A message the tab does
not take within :data:`SEND_TIMEOUT` seconds ends the session (the socket is dropped and
the tab reconnects); a stopping server closes with 1012.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from trioworker import protocol
from trioworker.models import converter, utcnow
from trioworker.server.live import COALESCE_SECONDS, FeedListener
from trioworker.server.service import TaskRunService
from trioworker.server.sockets import AsgiWebsocket, ConnectionGone, JsonSocket, ProtocolViolation

#: Seconds a tab may take to accept one message before its session ends.
SEND_TIMEOUT: Final = 30.0


class EventsSession(JsonSocket):
    """The server's side of one tab's live feed."""

    def __init__(
        self,
        socket: AsgiWebsocket,
        service: TaskRunService,
        token_ok: Callable[[object], bool],
        closing: trio.Event,
    ) -> None:
        super().__init__(socket, token_ok, closing, service.fence)
        self.service = service

    async def run(self) -> None:
        await self.serve_authenticated(self.session)

    async def session(self, nursery: trio.Nursery) -> None:
        with self.service.feed.listen() as listener:
            nursery.start_soon(self.push_overview, listener)
            nursery.start_soon(self.push_runs, listener)
            nursery.start_soon(self.push_schedules, listener)
            await self.receive()
            raise ProtocolViolation("the live feed takes no message after auth")

    async def push(self, message: dict[str, object]) -> None:
        """Send ``message``; a tab that does not take it within SEND_TIMEOUT is gone."""
        with trio.move_on_after(SEND_TIMEOUT):
            await self.send(message)
            return
        raise ConnectionGone(f"the tab took no message for {SEND_TIMEOUT:g} s")

    async def push_overview(self, listener: FeedListener) -> None:
        """The overview now, then again whenever something it shows changed."""
        while True:
            listener.overview_changed = trio.Event()  # before the read: no change is missed
            overview = await self.service.overview(throttled=True)
            await self.push(
                {
                    "type": protocol.OVERVIEW_MESSAGE,
                    "overview": converter.unstructure(overview),
                    # The overview may be shared and older: the tab sets its clock by this.
                    "server_time": utcnow().isoformat(),
                }
            )
            await listener.overview_changed.wait()

    async def push_runs(self, listener: FeedListener) -> None:
        """The runs that changed, coalesced: at most one message per COALESCE_SECONDS."""
        while True:
            await listener.runs_changed.wait()
            notes, overflowed = listener.take()
            if overflowed:
                await self.push({"type": protocol.RESYNC})
            else:
                await self.push({"type": protocol.RUNS_CHANGED, "runs": [note.to_json() for note in notes]})
            await trio.sleep(COALESCE_SECONDS)

    async def push_schedules(self, listener: FeedListener) -> None:
        """Say that schedules changed (the tab reads them), at most once per COALESCE_SECONDS."""
        while True:
            await listener.schedules_changed.wait()
            listener.schedules_changed = trio.Event()
            await self.push({"type": protocol.SCHEDULES_CHANGED})
            await trio.sleep(COALESCE_SECONDS)

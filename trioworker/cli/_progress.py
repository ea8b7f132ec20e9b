"""What ``submit --wait`` shows while it waits: the run's state as it changes, and whether a
worker takes runs of its task key.

The changes come from the server's live feed (``/api/events``, the dashboard's websocket):
pushed, not polled. At a terminal the state is one line, redrawn in place; elsewhere each
change is a line on stderr. Without the feed (an older server, a lost socket) the wait goes
on, showing no more changes.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import TYPE_CHECKING, Final

import attrs
import orjson
import trio

from trioworker import protocol
from trioworker._websocket import Disconnected, connect, parse_message
from trioworker.cli._api import short_id
from trioworker.cli._common import visible
from trioworker.models import JSON

if TYPE_CHECKING:
    from rich.console import Console
    from rich.live import Live

    from trioworker.client.futures import TaskRunFuture
    from trioworker.client.rest import TaskRunClient
    from trioworker.models import TaskRun

log = logging.getLogger("trioworker.cli")

#: Seconds the feed may take to answer its auth message.
FEED_AUTH_TIMEOUT: Final = 10.0


@attrs.define(eq=False)
class WaitDisplay:
    """The state of one run and the workers of its key, on stderr, shown as they change."""

    run_id: uuid.UUID
    task_key: str
    console: Console
    state: str | None = None
    workers: int | None = None
    _live: Live | None = None

    @classmethod
    def on_stderr(cls, run_id: uuid.UUID, task_key: str) -> WaitDisplay:
        from rich.console import Console

        return cls(run_id, task_key, Console(stderr=True, highlight=False))

    def _no_worker(self) -> str:
        return f"no worker is subscribed to {self.task_key}: the run waits until one is"

    def _line(self) -> str:
        line = visible(f"run {short_id(self.run_id)} of {self.task_key}: {self.state or '...'}")
        if self.workers == 0 and (self.state or "SCHEDULED").startswith("SCHEDULED"):
            line += f" ({self._no_worker()})"
        return line

    def show(self, *, state: str | None = None, workers: int | None = None) -> None:
        """Show what changed (``state``: ``RUNNING``, or ``SCHEDULED (AwaitingRetry)``)."""
        changed_state = state is not None and state != self.state
        first_none = workers == 0 and self.workers != 0
        came = bool(workers) and self.workers == 0
        if changed_state:
            self.state = state
        if workers is not None:
            self.workers = workers
        if not (changed_state or first_none or came):
            return
        if self.console.is_interactive:
            from rich.live import Live
            from rich.text import Text

            if self._live is None:
                self._live = Live(console=self.console, auto_refresh=False, transient=True)
                self._live.start()
            self._live.update(Text(self._line()), refresh=True)
            return
        if changed_state:
            self.console.print(visible(f"run {short_id(self.run_id)}: {state}"), markup=False, soft_wrap=True)
        if first_none:
            self.console.print(self._no_worker(), markup=False, soft_wrap=True)
        elif came:
            self.console.print(f"a worker subscribed to {self.task_key}", markup=False, soft_wrap=True)

    def close(self) -> None:
        """Take the live line away (at a terminal)."""
        if self._live is not None:
            self._live.stop()
            self._live = None


def _state_of(state_type: object, name: object) -> str | None:
    """``RUNNING``, or ``SCHEDULED (AwaitingRetry)`` when the name says more than the type."""
    if not isinstance(state_type, str):
        return None
    if isinstance(name, str) and name.replace(" ", "").upper() != state_type:
        return f"{state_type} ({name})"
    return state_type


def _shown(run: TaskRun) -> str | None:
    return _state_of(run.state.type.value, run.state.name)


def _workers_of(overview: JSON, task_key: str) -> int | None:
    """How many workers the overview lists as subscribed to ``task_key``."""
    workers = overview.get("workers") if isinstance(overview, dict) else None
    if not isinstance(workers, list):
        return None
    return sum(
        1
        for w in workers
        if isinstance(w, dict) and isinstance(w.get("task_keys"), list) and task_key in w["task_keys"]
    )


async def follow_run(client: TaskRunClient, run_id: uuid.UUID, display: WaitDisplay) -> None:
    """Show ``run_id``'s state and the workers of its key on ``display`` as the server's
    live feed tells of them, until cancelled. Returns quietly when the feed cannot be had
    (the caller's wait goes on)."""
    from trio_websocket import ConnectionClosed, HandshakeError

    from trioworker.errors import ApiError, ServerUnavailable

    try:
        display.show(workers=len(await client.task_workers(display.task_key)))
        url = protocol.socket_url(client.servers.current, protocol.EVENTS_PATH)
        async with connect(url, connection=client.connection, api_key=client.api_key) as ws:
            await ws.send_message(orjson.dumps({"type": protocol.AUTH, "token": client.api_key}).decode())
            with trio.fail_after(FEED_AUTH_TIMEOUT):
                reply = parse_message(await ws.get_message())
            if reply["type"] != protocol.AUTH_SUCCESS:
                return
            # Read once the feed is on, so that no change falls between the two.
            display.show(state=_shown(await client.read_task_run(run_id)))
            while True:
                message = parse_message(await ws.get_message())
                await _apply(message, client, run_id, display)
    except (
        ApiError,
        ServerUnavailable,
        OSError,
        HandshakeError,
        ConnectionClosed,
        Disconnected,
        TimeoutError,
    ) as exc:
        log.debug("no more changes of run %s to show: %r", run_id, exc)


async def _apply(
    message: dict[str, JSON], client: TaskRunClient, run_id: uuid.UUID, display: WaitDisplay
) -> None:
    kind = message["type"]
    if kind == protocol.RUNS_CHANGED:
        notes = message.get("runs")
        for note in notes if isinstance(notes, list) else []:
            if isinstance(note, dict) and note.get("id") == str(run_id):
                display.show(
                    state="DELETED"
                    if note.get("deleted")
                    else _state_of(note.get("state_type"), note.get("state_name"))
                )
    elif kind == protocol.OVERVIEW_MESSAGE:
        display.show(workers=_workers_of(message.get("overview"), display.task_key))
    elif kind == protocol.RESYNC:
        display.show(state=_shown(await client.read_task_run(run_id)))


async def wait_showing_states(
    client: TaskRunClient, future: TaskRunFuture[object], task_key: str, seconds: float | None
) -> TaskRun | None:
    """``future.wait(seconds)``, showing on stderr the run's state while it waits, and that
    no worker is subscribed to ``task_key`` when none is."""
    display = WaitDisplay.on_stderr(future.task_run_id, task_key)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(follow_run, client, future.task_run_id, display)
            run = await future.wait(seconds)
            nursery.cancel_scope.cancel()
    finally:
        display.close()
    if run is not None and not display.console.is_interactive:
        display.show(state=_shown(run))
    sys.stderr.flush()
    return run

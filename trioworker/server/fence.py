"""The fence of a server that shares its database with others: raised, the server closes
every websocket (1012, so that workers and submitters move to another server) and refuses
new requests (503) until it is lowered.

A server raises it when it cannot say it lives (no heartbeat for its replica timeout), or
when it learns that another server found it dead and handed back its runs: then the others
may be running what its workers still hold, and only a worker that reconnects (anywhere)
can keep its runs. See :mod:`trioworker.server.replicas`.
"""

from __future__ import annotations

import attrs
import trio


@attrs.define(eq=False)
class Fence:
    """Raised or not; sockets wait for it to be raised (:meth:`wait_raised`)."""

    #: Why it is raised (None: it is not).
    reason: str | None = None
    _raised: trio.Event = attrs.field(factory=trio.Event)
    _lowered: trio.Event = attrs.field(factory=trio.Event)

    @property
    def raised(self) -> bool:
        return self.reason is not None

    def raise_(self, reason: str) -> None:
        """Close every socket, refuse new ones (a second call keeps the first reason)."""
        if self.reason is None:
            self.reason = reason
            self._raised.set()
            self._lowered = trio.Event()

    def lower(self) -> None:
        """Serve again."""
        if self.reason is not None:
            self.reason = None
            self._raised = trio.Event()
            self._lowered.set()

    async def wait_raised(self) -> str:
        """Wait until it is raised (at once if it is); the reason."""
        raised = self._raised
        await raised.wait()
        return self.reason or "the server lost its database"

    async def wait_lowered(self) -> None:
        """Wait until it is not raised (at once if it is not)."""
        if self.reason is not None:
            await self._lowered.wait()

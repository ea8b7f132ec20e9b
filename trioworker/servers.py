"""The servers a client, a worker or a command talks to: one URL, or several replicas of one
deployment, used in order.

Wherever trioworker takes a server URL (``api_url=``, ``--api-url``, ``TRIOWORKER_API_URL``)
it takes several: a comma-separated string (``"http://a:4300,http://b:4300"``), a sequence
of URLs, or a :class:`Servers` (shared as it is, see below). :func:`api_roots` turns what
was given into API roots, each by the one URL rule (:func:`trioworker.protocol.api_root`).

**The failover rule**, the same for REST calls, the client channel and the worker's
subscription: use :attr:`Servers.current` until a connection-level failure (a refused,
reset or timed-out connection, a lost socket, a websocket closed with 1012 "server
restart", a 502/503/504 answer of a proxy or a replica whose database failed), then the
next URL in order, wrapping (:meth:`Servers.failed`). A whole round of failures (every
server once) in a row is paced with jittered backoff (:class:`Rounds`, for those that
reconnect) or ends the call (a REST call; a create whose outcome is unknown goes on with
backoff). An answer of the
application (4xx, a websocket closed with 1008 for a refused API key) is never a reason
to move: every replica would give the same.

This module is light (no trio, no httpx): the command line parses ``--api-url`` with it.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Final, TypeAlias, overload

import attrs

from trioworker.protocol import api_root

__all__ = [
    "FAILOVER_STATUSES",
    "ApiUrls",
    "Rounds",
    "Servers",
    "UsesServers",
    "api_roots",
    "as_servers",
    "next_backoff",
]

#: HTTP answers that say "not this server, now" rather than anything about the request:
#: a proxy with no live server behind it (502, 504), or a server that cannot serve (503,
#: e.g. its database failed). A REST call that is safe to send again goes to the next server.
FAILOVER_STATUSES: Final = frozenset({502, 503, 504})

#: One server URL, several comma-separated in one string, a sequence of them, or a
#: :class:`Servers` (which is a sequence of API roots, and is used as it is: shared).
ApiUrls: TypeAlias = str | Sequence[str]

#: Reconnect backoff: first wait, growth factor and ceiling, in seconds.
BACKOFF_FIRST: Final = 0.2
BACKOFF_FACTOR: Final = 2.0
BACKOFF_MAX: Final = 15.0


def next_backoff(attempt: int, rng: random.Random) -> float:
    """Full-jitter exponential backoff: uniform in [cap/2, cap], cap growing to BACKOFF_MAX."""
    cap = min(BACKOFF_MAX, BACKOFF_FIRST * BACKOFF_FACTOR**attempt)
    return rng.uniform(cap / 2, cap)


def api_roots(urls: str | Sequence[str]) -> tuple[str, ...]:
    """The API roots of ``urls``, in order: each entry (a string may hold several,
    comma-separated; so may each item of a sequence) by :func:`~trioworker.protocol.api_root`.

    ``"http://a:4300, http://b:4300/api"`` gives ``("http://a:4300/api", "http://b:4300/api")``;
    one URL gives a tuple of one.

    Raises:
        ValueError: one line naming the fault: an unusable entry (its position in the
            list and what is wrong with it, see :func:`~trioworker.protocol.api_root`),
            an empty entry, one server named twice (the same API root), or no URL at all.
    """
    if isinstance(urls, str):
        urls = [urls]
    entries = [entry.strip() for item in urls for entry in item.split(",")]
    if not entries:
        raise ValueError("the API URL list is empty")
    listed = ", ".join(entries)
    roots: list[str] = []
    for number, entry in enumerate(entries, 1):
        if not entry:
            raise ValueError(f"the API URL list {listed!r} has an empty entry (entry {number})")
        try:
            root = api_root(entry)
        except ValueError as exc:
            if len(entries) == 1:
                raise
            raise ValueError(f"{exc} (entry {number} of the API URL list {listed!r})") from None
        if root in roots:
            first = roots.index(root) + 1
            raise ValueError(f"the API URL list {listed!r} names {root} twice (entries {first} and {number})")
        roots.append(root)
    return tuple(roots)


@attrs.define(eq=False, repr=False)
class Servers(Sequence[str]):
    """The API roots to use, in order, and the one in use now (:attr:`current`).

    Make one with :func:`as_servers`. It is a sequence of its roots (``len``, indexing, iteration).
    Everything that talks over one client shares its :class:`Servers` (a client and its
    channel; a worker's subscription and its REST client): when one of them finds the
    current server gone, the others use the next one from their next call on.

    Threads sharing one (a blocking client used from several) may race on a failure: at
    worst a server is skipped once; :attr:`current` is always one of the roots.
    """

    roots: tuple[str, ...]
    _index: int = 0

    @property
    def current(self) -> str:
        """The API root to use now (the first, until one failed)."""
        return self.roots[self._index]

    def failed(self, root: str) -> None:
        """``root`` failed at the connection level: if it is still :attr:`current`, the
        next root (wrapping) becomes current. A failure of a root already left behind
        (another task saw the same outage first) moves nothing."""
        if root == self.current:
            self._index = (self._index + 1) % len(self.roots)

    def describe(self) -> str:
        """``"the trioworker server at URL"``, or ``"the trioworker servers at URL, URL"``."""
        if len(self.roots) == 1:
            return f"the trioworker server at {self.roots[0]}"
        return f"the trioworker servers at {', '.join(self.roots)}"

    def __len__(self) -> int:
        return len(self.roots)

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self.roots[index]

    def __iter__(self) -> Iterator[str]:
        return iter(self.roots)

    def __repr__(self) -> str:
        return f"<Servers {', '.join(self.roots)} (current {self.current})>"


class UsesServers:
    """What a client, a channel, a subscription and a worker say of their servers: the
    one in use (:attr:`api_url`) and all of them (:attr:`api_urls`)."""

    __slots__ = ()
    servers: Servers

    @property
    def api_url(self) -> str:
        """The API root in use now (the first, until one failed)."""
        return self.servers.current

    @property
    def api_urls(self) -> tuple[str, ...]:
        """Every server's API root, in the order they are tried."""
        return self.servers.roots


def as_servers(urls: ApiUrls) -> Servers:
    """``urls`` as :class:`Servers`: a :class:`Servers` is returned as it is (shared);
    anything else is read by :func:`api_roots` (``ValueError`` as it says)."""
    if isinstance(urls, Servers):
        return urls
    return Servers(api_roots(urls))


@attrs.define(eq=False)
class Rounds:
    """How one connection that is made again (or one REST call) goes through its
    :class:`Servers` after failures: the failover rule's pace.

    Each connection-level failure moves the servers on (:meth:`failed`) and the next one
    is tried at once, until a whole round failed: as many failures as there are servers
    since the last pause. Then the caller pauses (:meth:`pause`: jittered backoff, longer
    for each round failed since the last success) or gives up. A failure that is the
    application's answer (``fail_over=False``) moves nothing and ends the round at once:
    with one server, every failure ends a round, as it always did.

    A success (:meth:`succeeded`) restarts the backoff, not the round: servers that accept
    connections and drop them at once still get a pause once per round.
    """

    servers: Servers
    rng: random.Random = attrs.field(factory=random.Random)
    #: Failures since the last pause.
    _failures: int = 0
    #: Rounds failed (pauses) since the last success: the backoff's exponent.
    _rounds: int = 0

    def failed(self, root: str, *, fail_over: bool = True) -> bool:
        """Count a failure of ``root`` (moving :attr:`Servers.current` on when
        ``fail_over``); True when a whole round has failed (the caller pauses or gives up),
        False when the next server is to be tried now."""
        if fail_over:
            self.servers.failed(root)
            self._failures += 1
        else:
            self._failures = len(self.servers)
        return self._failures >= len(self.servers)

    def pause(self, extra: int = 0) -> float:
        """Seconds to wait before the next round (``extra`` lengthens it as more failed
        rounds would); starts a new round."""
        self._failures = 0
        delay = next_backoff(self._rounds + extra, self.rng)
        self._rounds += 1
        return delay

    def succeeded(self) -> None:
        """A connection was made: the next pause is the shortest again."""
        self._rounds = 0

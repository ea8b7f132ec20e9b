"""The wire protocol, defined once: what the server and its clients (submitters and workers)
both have to agree on.

- **URL rule**: :func:`api_root` turns any server URL a user gives into the API root
  (``http(s)://host[:port][/prefix]/api``); :func:`socket_url` gives the ``ws(s)://`` URL of a
  websocket path under it.
- **HTTP paths**, relative to the API root (``RUN`` and the other ``RUN_*`` hold a
  ``{run_id}`` field); the server mounts them under :data:`API_PREFIX` with :func:`route`.
- **Websocket paths**: :data:`SUBSCRIPTION_PATH` (workers) and :data:`CHANNEL_PATH`
  (submitters), relative to the API root.
- **Close codes** of both websockets, and the ``"type"`` of every JSON message.

This module imports nothing of trioworker, so both sides can import it.
"""

from __future__ import annotations

import re
import urllib.parse
from typing import Final

# --- URL rule ----------------------------------------------------------------------------


def api_root(url: str) -> str:
    """The API root of a server URL: ``http(s)://host[:port][/prefix]/api``, no trailing slash.

    ``http://host:4300``, ``http://host:4300/``, ``http://host:4300/api`` and
    ``http://host:4300/api/`` all give ``http://host:4300/api``: a path that does not end
    in ``/api`` gets it added (so a server behind a proxy at ``/queue`` is ``.../queue``).

    Raises:
        ValueError: one sentence naming the fault: not ``http://`` or ``https://``, no
            host, a port that is not a number from 0 to 65535, or a query or fragment.
    """
    text = url.strip()
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not text[len(scheme) : len(scheme) + 3] == "://":
        raise ValueError(f"the API URL must start with http:// or https://, got {url!r}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number in range)
    except ValueError:
        raise ValueError(f"the API URL has a port that is not a number from 0 to 65535: {url!r}") from None
    if not parts.hostname:
        raise ValueError(f"the API URL has no host: {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"the API URL takes no query or fragment: {url!r}")
    path = re.sub(r"/{2,}", "/", parts.path).rstrip("/")
    if not path.endswith(API_PREFIX):
        path += API_PREFIX
    return urllib.parse.urlunsplit((scheme, parts.netloc, path, "", ""))


def socket_url(api_url: str, path: str) -> str:
    """The ``ws(s)://`` URL of ``path`` (e.g. :data:`CHANNEL_PATH`) under :func:`api_root`.

    Raises:
        ValueError: ``api_url`` is unusable (see :func:`api_root`).
    """
    scheme, rest = api_root(api_url).split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}{path}"


#: The serializer of parameters and results typed by the task's annotations (the default).
SERIALIZER_JSON: Final = "json"
#: The serializer of any Python object (opt-in on both sides).
SERIALIZER_PICKLE: Final = "pickle"
#: The serializers a task (and so a run) may use, for its parameters and its result.
SERIALIZERS: Final = (SERIALIZER_JSON, SERIALIZER_PICKLE)

# --- paths -------------------------------------------------------------------------------

#: Where the server mounts the API; :func:`api_root` ends every API URL with it.
API_PREFIX: Final = "/api"
#: ``GET``: the server's health (unauthenticated).
HEALTH: Final = "/health"
#: ``POST`` one create, ``GET`` a filtered list.
RUNS: Final = "/task_runs"
#: ``POST`` a list of creates.
RUNS_BATCH: Final = "/task_runs/batch"
#: ``POST`` a long-poll for the first of many runs to end.
RUNS_WAIT: Final = "/task_runs/wait"
#: ``GET`` the runs whose id starts with ``?id_prefix=`` (see :func:`id_prefix`).
RUNS_FIND: Final = "/task_runs/find"
#: ``POST`` delete the runs that ended before a time.
RUNS_PURGE: Final = "/task_runs/purge"
#: ``GET`` a long-poll for room in the queue of ``?task_key=`` (``--max-queued``).
RUNS_ROOM: Final = "/task_runs/room"
#: ``GET`` or ``DELETE`` one run.
RUN: Final = "/task_runs/{run_id}"
RUN_HISTORY: Final = "/task_runs/{run_id}/history"
RUN_WAIT: Final = "/task_runs/{run_id}/wait"
RUN_SET_STATE: Final = "/task_runs/{run_id}/set_state"
RUN_CANCEL: Final = "/task_runs/{run_id}/cancel"
RUN_RETRY: Final = "/task_runs/{run_id}/retry"
#: ``GET`` the runs submitted from inside a run, from inside those, and so on.
RUN_DESCENDANTS: Final = "/task_runs/{run_id}/descendants"
#: ``POST`` cancel a run group (its runs, theirs, and the runs created in it later).
GROUP_CANCEL: Final = "/task_run_groups/{group_id}/cancel"
#: ``GET`` the operator's overview (counts by key and state, ends per minute, workers).
OVERVIEW: Final = "/overview"
#: ``GET`` the workers connected to this server (``?task_key=`` filters).
TASK_WORKERS: Final = "/task_workers"
#: ``GET`` every schedule (periodic runs); ``POST`` one to create or change it (by name).
SCHEDULES: Final = "/schedules"
#: ``GET`` or ``DELETE`` one schedule by its name.
SCHEDULE: Final = "/schedules/{name}"
#: The workers' websocket.
SUBSCRIPTION_PATH: Final = "/task_runs/subscriptions/scheduled"
#: The live feed's websocket (the dashboard's tabs).
EVENTS_PATH: Final = "/events"
#: The submitters' websocket.
CHANNEL_PATH: Final = "/task_runs/channel"


#: Where the dashes of a run id's text stand (``str(uuid)``: 8-4-4-4-12 hex digits).
_ID_DASHES: Final = (8, 12, 16, 20)


def id_prefix(text: str) -> str:
    """The start of a run id's canonical text (``str(uuid)``: lower case, with dashes) that
    ``text`` gives: ``"0B7C7C368d"`` and ``"0b7c7c36-8d"`` both give ``"0b7c7c36-8d"``.

    Raises:
        ValueError: ``text`` holds something other than hex digits and dashes, no hex
            digit, or more than a run id's 32.
    """
    digits = text.strip().replace("-", "").lower()
    if not digits or len(digits) > 32 or not all(c in "0123456789abcdef" for c in digits):
        raise ValueError(f"a run id or the start of one is 1 to 32 hex digits (dashes allowed), got {text!r}")
    parts = [digits[start:end] for start, end in zip((0, *_ID_DASHES), (*_ID_DASHES, 32), strict=True)]
    return "-".join(part for part in parts if part)


def route(path: str) -> str:
    """The server's route for an API path: ``/task_runs/{run_id}`` -> ``/api/task_runs/<run_id>``."""
    return API_PREFIX + re.sub(r"\{(\w+)\}", r"<\1>", path)


# --- close codes -------------------------------------------------------------------------

CLOSE_NORMAL: Final = 1000
#: A client saw a frame it cannot parse (sent by clients; the server sends CLOSE_PROTOCOL).
CLOSE_PROTOCOL_ERROR: Final = 1002
#: Auth refused, or the first message was not an auth message.
CLOSE_POLICY: Final = 1008
#: The server is stopping; reconnect later.
CLOSE_RESTART: Final = 1012
#: The client broke the protocol (sent by the server).
CLOSE_PROTOCOL: Final = 4001

# --- message types -----------------------------------------------------------------------
# Both sockets start with AUTH (client) -> AUTH_SUCCESS (server).

AUTH: Final = "auth"
AUTH_SUCCESS: Final = "auth_success"

# Subscription, worker -> server.
SUBSCRIBE: Final = "subscribe"
ACK: Final = "ack"
CREDIT: Final = "credit"
RELEASE: Final = "release"
STATES: Final = "states"
QUIT: Final = "quit"
# Subscription, server -> worker.
TASK_RUNS: Final = "task_runs"
STATE_RESULTS: Final = "state_results"
CANCEL: Final = "cancel"
REVOKE: Final = "revoke"

# Channel, submitter -> server.
CREATE: Final = "create"
WATCH: Final = "watch"
UNWATCH: Final = "unwatch"
# Channel, server -> submitter.
CREATED: Final = "created"
ERROR: Final = "error"
ENDED: Final = "ended"
#: A task key's queue has room again for the refused creates named (a partial create's 429).
ROOM: Final = "room"

# Live feed, server -> tab (the tab sends only its auth message).
OVERVIEW_MESSAGE: Final = "overview"
RUNS_CHANGED: Final = "runs"
RESYNC: Final = "resync"
SCHEDULES_CHANGED: Final = "schedules"

#: The longest cache key a create may carry (characters; see ``TaskRunCreate.cache_key``).
MAX_CACHE_KEY_LENGTH: Final = 1000

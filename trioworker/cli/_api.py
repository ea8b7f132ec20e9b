"""What the commands that talk to a server share: the client's errors as one line, and the
run an id names (a whole id, or the start of one as the tables show it).

The client is imported only when one of these runs.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from trioworker.cli._common import CommandError
from trioworker.protocol import id_prefix

if TYPE_CHECKING:
    from trioworker.client.rest import TaskRunClient
    from trioworker.models import TaskRun

#: Hex digits of a run id the tables show (any unique start of an id is accepted).
SHORT_ID_DIGITS: Final = 8
#: The help of a command's ID argument.
ID_HELP: Final = (
    "the run's id as `submit` prints it, or its start as `runs` shows it (any start that no other run's "
    "id shares)"
)
#: Runs an ambiguous id prefix names in its error, at most.
MATCHES_SHOWN: Final = 5


def short_id(run_id: uuid.UUID) -> str:
    """The start of a run id that the tables show: ``0b7c7c36``."""
    return str(run_id)[:SHORT_ID_DIGITS]


@contextmanager
def api_errors(api_urls: Sequence[str]) -> Iterator[None]:
    """The client's errors as one line each (a :class:`CommandError`)."""
    from trioworker.connection import tls_failure
    from trioworker.errors import ApiError, NotFound, ServerUnavailable
    from trioworker.servers import as_servers

    try:
        yield
    except ServerUnavailable as exc:
        servers = as_servers(api_urls).describe()
        tls = tls_failure(exc)
        if tls is not None:
            raise CommandError(f"cannot reach {servers}: {tls}") from None
        cause = exc.__cause__
        reason = f": {cause}" if cause is not None and str(cause) else ""
        raise CommandError(
            f"cannot reach {servers}{reason} (is it running? set --api-url or TRIOWORKER_API_URL)"
        ) from None
    except NotFound as exc:
        raise CommandError(exc.detail) from None
    except ApiError as exc:
        hint = " (check --api-key or TRIOWORKER_API_KEY)" if exc.status_code == 401 else ""
        raise CommandError(f"the server refused the request: {exc.status_code} {exc.detail}{hint}") from None


async def find_run(client: TaskRunClient, text: str) -> TaskRun:
    """The run ``text`` names: its whole id, or the start of its id when no other run's id
    starts the same (``0b7c7c36``, as ``trioworker runs`` shows it; any case, dashes
    optional). The server finds it by its index of ids: no run is listed here.

    Raises:
        CommandError: one line: ``text`` is not (the start of) an id, no run has such an
            id, or several have (naming them, to pick one).
        ServerUnavailable, ApiError: as the client raises them (see :func:`api_errors`).
    """
    try:
        prefix = id_prefix(text)
    except ValueError:
        raise CommandError(
            f"no task run {text!r}: a run id is hex digits (and dashes), as `trioworker runs` shows it"
        ) from None
    if len(prefix) == len(str(uuid.UUID(int=0))):
        return await client.read_task_run(uuid.UUID(prefix))
    runs = await client.find_task_runs(prefix, limit=MATCHES_SHOWN + 1)
    if not runs:
        raise CommandError(f"no task run has an id that starts with {text!r}")
    if len(runs) > 1:
        count = f"more than {MATCHES_SHOWN}" if len(runs) > MATCHES_SHOWN else str(len(runs))
        shown = ", ".join(f"{run.id} ({run.task_key})" for run in runs[:MATCHES_SHOWN])
        raise CommandError(
            f"the id prefix {text!r} is ambiguous: {count} runs' ids start with it: {shown}; "
            "give more of the id"
        )
    return runs[0]

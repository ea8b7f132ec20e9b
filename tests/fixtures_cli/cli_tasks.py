"""Tasks for the ``trioworker worker`` subprocess tests (loaded by path or as a module).

The slow tasks print a line on stderr once they run, so a test knows when to signal.
"""

from __future__ import annotations

import sys
import time

import trio

from trioworker.tasks import task

#: How long a slow task runs if nothing stops it (far longer than any test waits).
SLOW_SECONDS = 60.0


@task(key="cli.echo")
def echo(message: str, times: int = 1) -> str:
    """A sync task: its result tells the test the parameters arrived."""
    return message * times


@task(key="cli.slow_sync")
def slow_sync() -> str:
    """A sync task that only a cancellation ends early (it checks for one between short sleeps)."""
    print("cli.slow_sync started", file=sys.stderr, flush=True)
    deadline = time.monotonic() + SLOW_SECONDS
    while time.monotonic() < deadline:
        time.sleep(0.01)
        trio.from_thread.check_cancelled()
    return "finished"


@task(key="cli.slow_async")
async def slow_async() -> str:
    """An async task that only a cancellation ends."""
    print("cli.slow_async started", file=sys.stderr, flush=True)
    await trio.sleep(3600)
    return "finished"


def not_a_task() -> None:
    """A plain function: the worker must refuse it."""

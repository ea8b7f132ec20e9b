"""The example tasks that ``trioworker demo`` runs (and that you can submit to it).

While ``trioworker demo --keep-running`` runs, another shell can submit more runs of them::

    export TRIOWORKER_API_URL=http://127.0.0.1:PORT/api     # the URL the demo printed
    trioworker submit trioworker.cli.demo_tasks:add 2 3 --wait
    trioworker submit trioworker.cli.demo_tasks:greet name=ann --wait

Every task has a short, explicit key (``demo.add``, ...), so the keys stay the same
whichever way the module is imported.
"""

from __future__ import annotations

import trio

from trioworker.context import current_run
from trioworker.tasks import task


@task(key="demo.add")
def add(a: int, b: int) -> int:
    """A sync task: it runs in a worker thread."""
    return a + b


@task(key="demo.square")
def square(x: int) -> int:
    """A sync task, mapped over hundreds of numbers by the demo."""
    return x * x


@task(key="demo.greet")
async def greet(name: str) -> str:
    """An async task: it runs in the worker's Trio loop (and may await anything)."""
    await trio.sleep(0.05)
    return f"hello {name}"


@task(key="demo.fetch", retries=2, retry_delay_seconds=0.2)
async def fetch(url: str) -> str:
    """Fails its first attempt, as a flaky network call would; the retry succeeds."""
    run = current_run()
    attempt = run.attempt if run is not None else 1
    if attempt == 1:
        raise ConnectionError(f"connection to {url} reset")
    return f"200 OK on attempt {attempt}"


@task(key="demo.divide")
def divide(a: float, b: float) -> float:
    """Fails for good when ``b`` is 0: a ZeroDivisionError, no retries."""
    return a / b


#: Every task the demo's worker serves.
DEMO_TASKS = (add, square, greet, fetch, divide)

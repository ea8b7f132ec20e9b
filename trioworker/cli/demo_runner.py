"""The demo that ``trioworker demo`` runs: a server, a worker and a mix of runs, in one Trio
process.

The nursery tree::

    run_demo()
      nursery
        signal watcher: SIGINT / SIGTERM cancel the body (once; a second Ctrl-C is a hard stop)
        serve_server(): REST API + queue on a fresh demo.db     stops when `shutdown` is set
        TaskWorker (async with): subscription, runs, status server    stops when the block ends
          body: submit the runs, show progress (as_completed), print the table;
                with --keep-running, sleep until a signal

Stopping goes inside out: the body ends (or is cancelled by a signal), the worker stops
(its runs finish within the grace period), then the server shuts down and closes the
database. When :func:`run_demo` returns, nothing it started is left.

Only the ``demo`` command (:mod:`trioworker.cli.demo`) imports this module, when it runs: it
imports the server and rich.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import aclosing
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import trio
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Task as ProgressTask
from rich.table import Table
from rich.text import Text

from trioworker._util import only_exception
from trioworker.cli.demo_tasks import DEMO_TASKS, add, divide, fetch, greet, square
from trioworker.client.futures import TaskRunFuture, as_completed
from trioworker.client.rest import connect
from trioworker.models import StateType, TaskRun, utcnow
from trioworker.protocol import api_root
from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.settings import DEFAULT_HOST
from trioworker.worker.task_worker import TaskWorker

#: The demo's database, in ``TRIOWORKER_HOME`` (deleted when a demo starts).
DEMO_DB_NAME: Final = "demo.db"
#: Seconds the delayed run waits.
DELAY_SECONDS: Final = 1.0
#: Seconds the worker's runs get to finish when the demo stops.
GRACE_SECONDS: Final = 2.0
#: How often the progress line is redrawn.
REFRESH_SECONDS: Final = 0.1


class DemoError(Exception):
    """Something the user can fix (a port in use, runs that never finished): one line."""


@attrs.frozen
class DemoConfig:
    """What ``trioworker demo`` was asked for."""

    home: Path
    #: Runs of the map (the other kinds are one run each).
    runs: int
    #: The worker's limit: at most this many runs at once.
    limit: int
    #: Seconds the runs may take, all together.
    timeout: float
    #: None: a free port.
    port: int | None = None
    keep_running: bool = False
    #: Required by the server, sent by the worker and the submitter (None: no key).
    api_key: str | None = None

    @property
    def db_path(self) -> Path:
        return self.home / DEMO_DB_NAME


@attrs.define
class Kind:
    """One kind of run the demo submits: a row of the results table."""

    label: str
    #: How run ``i`` of this kind was called, e.g. ``add(2, 3)``.
    call: Callable[[int], str]
    futures: list[TaskRunFuture[Any]]
    #: Something more to say about a finished run (e.g. how late it started).
    note: Callable[[TaskRun], str] | None = None


@attrs.frozen
class DemoResult:
    """What the demo did: the kinds of runs (all ended), where it ran, how long it took."""

    kinds: list[Kind]
    server_url: str
    status_url: str | None
    seconds: float

    @property
    def runs(self) -> list[TaskRun]:
        return [f.task_run for kind in self.kinds for f in kind.futures if f.task_run is not None]


def remove_database(path: Path) -> None:
    """Delete the demo database and SQLite's side files, so every demo starts clean; make
    its folder (``$TRIOWORKER_HOME``, trioworker's own) if it is missing."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("", "-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


class RateColumn(ProgressColumn):
    """Finished runs per second since the progress started."""

    def render(self, task: ProgressTask) -> Text:
        elapsed = task.elapsed or 0.0
        rate = task.completed / elapsed if elapsed > 0 else 0.0
        return Text(f"{rate:,.0f} runs/s", style="progress.data.speed")


def _outcome(run: TaskRun) -> str:
    if run.state.type is StateType.COMPLETED:
        return repr(run.state.data)
    return run.state.message or run.state.type.value


def _started_late(run: TaskRun) -> str:
    late = (run.state.timestamp - run.created).total_seconds()
    return f"(done {late:.1f} s after submission)"


async def submit_runs(runs: int) -> list[Kind]:
    """Submit the demo's mix of runs (through the ambient client) and return them by kind."""
    added = await add.delay(2, 3)
    kinds = [
        Kind("sync task", lambda i: "add(2, 3)", [added]),
        Kind("async task", lambda i: "greet('trio')", [await greet.delay("trio")]),
        Kind(
            "fails once, retried",
            lambda i: "fetch('https://example.com')",
            [await fetch.delay("https://example.com")],
        ),
        Kind("fails for good", lambda i: "divide(1, 0)", [await divide.delay(1, 0)]),
        Kind(
            f"delayed {DELAY_SECONDS:g} s",
            lambda i: "greet('later')",
            [await greet.apply_async(["later"], scheduled_time=utcnow() + timedelta(seconds=DELAY_SECONDS))],
            note=_started_late,
        ),
        # A future as an argument: the server holds this run until `added` completed.
        Kind("waits for another", lambda i: "square(add(2, 3))", [await square.apply_async([added])]),
    ]
    if runs:
        mapped = await square.map(range(runs))
        kinds.append(Kind(f"map of {runs}", lambda i: f"square({i})", mapped))
    return kinds


async def _refresh(progress: Progress) -> None:
    while True:
        progress.refresh()
        await trio.sleep(REFRESH_SECONDS)


async def follow_runs(futures: Sequence[TaskRunFuture[Any]], console: Console, timeout: float) -> None:  # noqa: ASYNC109 - a deadline for the whole wait
    """Show a progress line until every run ended: one shared long-poll, no poll per run."""
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("•"),
        TimeElapsedColumn(),
        TextColumn("•"),
        RateColumn(),
    )
    with Progress(*columns, console=console, auto_refresh=False) as progress:
        task_id = progress.add_task("Runs", total=len(futures))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_refresh, progress)
            try:
                async with aclosing(as_completed(futures, timeout=timeout)) as ended:
                    async for _ in ended:
                        progress.advance(task_id)
            except TimeoutError:
                left = len(futures) - int(progress.tasks[0].completed)
                raise DemoError(
                    f"{left} of {len(futures)} runs did not finish within {timeout:g} s "
                    "(use --timeout to wait longer)"
                ) from None
            finally:
                nursery.cancel_scope.cancel()
        progress.refresh()


def results_table(kinds: Sequence[Kind]) -> Table:
    table = Table(title="Runs by kind", box=box.SIMPLE_HEAVY, title_justify="left")
    table.add_column("kind", no_wrap=True)
    table.add_column("runs", justify="right")
    table.add_column("state")
    table.add_column("example: call → result or error")
    style = {StateType.COMPLETED: "green", StateType.FAILED: "red"}
    for kind in kinds:
        runs = [f.task_run for f in kind.futures if f.task_run is not None]
        states = Counter(run.state.type for run in runs)
        state_text = Text()
        for n, (state, count) in enumerate(sorted(states.items())):
            if n:
                state_text.append(", ")
            label = state.value if len(states) == 1 else f"{state.value} {count}"
            state_text.append(label, style=style.get(state, "yellow"))
        # The example: the last run, or the first one that did not complete.
        index = next(
            (i for i, run in enumerate(runs) if run.state.type is not StateType.COMPLETED), len(runs) - 1
        )
        example = ""
        if runs:
            run = runs[index]
            example = f"{kind.call(index)} → {_outcome(run)}"
            if kind.note is not None:
                example += f" {kind.note(run)}"
        table.add_row(kind.label, str(len(kind.futures)), state_text, example)
    return table


def summary_line(result: DemoResult) -> str:
    states = Counter(run.state.type.value for run in result.runs)
    counts = ", ".join(f"{count} {state}" for state, count in sorted(states.items()))
    return f"{len(result.runs)} runs in {result.seconds:.1f} s: {counts}"


def print_result(result: DemoResult, config: DemoConfig, console: Console) -> None:
    console.print()
    console.print(results_table(result.kinds))
    console.print(summary_line(result))
    console.print()
    console.print(f"Server:    {result.server_url}  (API: {api_root(result.server_url)})")
    console.print(f"Database:  {config.db_path}")
    if result.status_url is not None:
        console.print(f"Worker:    {result.status_url}/status")
    if not config.keep_running:
        console.print()
        console.print(
            "Next: `trioworker demo --keep-running` keeps both up, to submit runs from another shell.",
            markup=False,
        )


def print_keep_running(result: DemoResult, config: DemoConfig, console: Console) -> None:
    api_url = api_root(result.server_url)
    console.print()
    console.print("The server and the worker keep running; Ctrl-C (or SIGTERM) stops them.")
    console.print("Submit more runs from another shell:")
    console.print()
    lines = [f"export TRIOWORKER_API_URL={api_url}"]
    if config.api_key:
        lines.append("export TRIOWORKER_API_KEY=...   # the same key as this shell's")
    lines += [
        "trioworker submit trioworker.cli.demo_tasks:add 2 3 --wait",
        "trioworker submit trioworker.cli.demo_tasks:greet name=ann --wait",
        "trioworker runs --state FAILED",
        "trioworker run RUN_ID",
    ]
    if result.status_url is not None:
        lines.append(f"trioworker status {result.status_url}")
    for line in lines:
        console.print(f"  {line}", markup=False, highlight=False)


async def _demo_body(
    config: DemoConfig, server: RunningServer, worker: TaskWorker, console: Console
) -> DemoResult:
    started = trio.current_time()
    async with connect(server.api_url, config.api_key):
        kinds = await submit_runs(config.runs)
        futures = [f for kind in kinds for f in kind.futures]
        keys = {f.task_run.task_key for f in futures if f.task_run is not None}
        console.print(
            f"Submitted {len(futures)} runs of {len(keys)} tasks "
            f"(the worker runs up to {config.limit} at once)"
        )
        await follow_runs(futures, console, config.timeout)
    return DemoResult(
        kinds=kinds,
        server_url=server.url,
        status_url=worker.status_url,
        seconds=trio.current_time() - started,
    )


async def _start_server(nursery: trio.Nursery, config: DemoConfig, shutdown: trio.Event) -> RunningServer:
    server_config = ServerConfig(
        db_path=config.db_path,
        host=DEFAULT_HOST,
        port=0 if config.port is None else config.port,
        api_key=config.api_key,
    )
    try:
        server: RunningServer = await nursery.start(partial(serve_server, server_config, shutdown=shutdown))
    except Exception as exc:
        error = only_exception(exc)
        if not isinstance(error, OSError):
            raise
        raise DemoError(
            f"cannot serve on {DEFAULT_HOST}:{server_config.port}: {error.strerror or error} "
            "(leave out --port to use a free one)"
        ) from None
    return server


async def _run_demo(config: DemoConfig, console: Console, body_scope: trio.CancelScope) -> None:
    await trio.to_thread.run_sync(remove_database, config.db_path)
    shutdown = trio.Event()
    async with trio.open_nursery() as nursery:
        server = await _start_server(nursery, config, shutdown)
        try:
            worker = TaskWorker(
                *DEMO_TASKS,
                limit=config.limit,
                api_url=server.api_url,
                api_key=config.api_key,
                shutdown_grace_seconds=GRACE_SECONDS,
                status_server_port=0,
            )
            async with worker:
                console.print("trioworker demo: a server and a worker, in this process")
                with body_scope:
                    result = await _demo_body(config, server, worker, console)
                    print_result(result, config, console)
                    if config.keep_running:
                        print_keep_running(result, config, console)
                        await trio.sleep_forever()
        finally:
            shutdown.set()


async def run_demo(config: DemoConfig, console: Console | None = None) -> None:
    """Run the demo; with ``keep_running``, until SIGINT or SIGTERM.

    SIGINT and SIGTERM stop it cleanly at any point (the worker, then the server).

    Raises:
        DemoError: a port in use, or runs that did not finish within ``config.timeout``.
    """
    console = console or Console()
    body_scope = trio.CancelScope()
    got_signal = False

    async def watch_signals(*, task_status: trio.TaskStatus[None]) -> None:
        nonlocal got_signal
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for _ in signals:
                got_signal = True
                body_scope.cancel()
                return  # a second signal gets the default handling: a hard stop

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        await _run_demo(config, console, body_scope)
        nursery.cancel_scope.cancel()
    if got_signal:
        console.print("Stopped: the worker and the server shut down cleanly.")

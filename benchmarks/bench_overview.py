"""How long ``GET /api/overview`` takes while a big ``map`` is being created.

Run it as a plain script (no pytest)::

    python benchmarks/bench_overview.py [--stored 37000] [--map 10000] [--tabs 1] [--repeat 3]

It starts a server in its own process (``python -m trioworker server``) on a fresh SQLite
file, stores ``--stored`` ended runs in it (created in batches, then drained by a raw
subscription that reports RUNNING and COMPLETED, four history rows each, as a server that
has been used for a while holds them), then, per repetition:

a) reads the overview ``--idle`` times one after the other (nothing else going on);
b) creates ``--map`` runs with ``Task.map`` inside ``trioworker.connect()`` (over the client
   channel, 500 per message) while one client reads the overview again and again (``--pause``
   seconds apart) and ``--tabs`` dashboard tabs listen to the live feed (``/api/events``),
   and times each read (and ``GET /api/health``, which reads no store, as the control).

It prints the latencies (median, p95, max) of each read and how long the map took; the
JSON results go to ``benchmarks/results/bench_overview.json``. Its runs stay SCHEDULED (no
worker), so each repetition adds ``--map`` runs to the store.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import trio
from trio_websocket import open_websocket_url

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
for _path in (str(HERE), str(PROJECT)):  # bench_server, worker_tasks and trioworker, run from anywhere
    if _path not in sys.path:
        sys.path.insert(0, _path)

from bench_server import (  # noqa: E402
    BenchError,
    ServerProcess,
    aligned_table,
    create_batches,
    fmt_number,
    log,
    new_client,
    percentile,
    print_sections,
    run_drain,
    running_server,
    save_results,
)
from worker_tasks import noop  # noqa: E402

import trioworker  # noqa: E402

EVENTS_PATH = "/api/events"


@dataclass
class Latencies:
    """Seconds each request took."""

    seconds: list[float] = field(default_factory=list)

    def row(self, label: str) -> list[str]:
        values = self.seconds
        ms = [v * 1000 for v in values]
        return [
            label,
            str(len(values)),
            fmt_number(statistics.median(ms), 1) if ms else "-",
            fmt_number(percentile(ms, 95), 1) if ms else "-",
            fmt_number(max(ms), 1) if ms else "-",
        ]


@dataclass
class Repetition:
    idle: Latencies = field(default_factory=Latencies)
    during_map: Latencies = field(default_factory=Latencies)
    health_during_map: Latencies = field(default_factory=Latencies)
    map_seconds: float = 0.0
    overview_messages: int = 0


def store_ended_runs(server: ServerProcess, n: int) -> float:
    """Create ``n`` runs and drain them (RUNNING + COMPLETED each); returns the seconds."""
    began = time.perf_counter()
    with new_client(server) as client:
        create_batches(client, n, 500)
    result = run_drain(server, n, 500, "fill", timeout=max(120.0, n / 200))
    if result.completed < n:
        raise BenchError(f"only {result.completed} of {n} runs were completed")
    return time.perf_counter() - began


async def timed_get(client: httpx.AsyncClient, path: str, into: Latencies) -> None:
    began = time.perf_counter()
    response = await client.get(path)
    into.seconds.append(time.perf_counter() - began)
    if response.status_code != 200:
        raise BenchError(f"GET {path}: HTTP {response.status_code}: {response.text[:300]}")


async def listen_to_feed(server: ServerProcess, rep: Repetition, *, task_status: Any) -> None:
    """A dashboard tab: the live feed, read as fast as it comes."""
    url = f"ws://127.0.0.1:{server.port}{EVENTS_PATH}"
    async with open_websocket_url(url, max_message_size=64 * 1024 * 1024) as ws:
        await ws.send_message(orjson.dumps({"type": "auth", "token": None}).decode())
        await ws.get_message()  # auth_success
        task_status.started()
        while True:
            message = orjson.loads(await ws.get_message())
            if message.get("type") == "overview":
                rep.overview_messages += 1


async def one_repetition(server: ServerProcess, args: argparse.Namespace) -> Repetition:
    rep = Repetition()
    async with httpx.AsyncClient(base_url=server.api, timeout=120.0) as client:
        await client.get("/overview")  # warm
        for _ in range(args.idle):
            await timed_get(client, "/overview", rep.idle)
        async with AsyncExitStack() as stack:
            nursery = await stack.enter_async_context(trio.open_nursery())
            for _ in range(args.tabs):
                await nursery.start(listen_to_feed, server, rep)
            mapped = trio.Event()

            async def read_while_mapping() -> None:
                while not mapped.is_set():
                    await timed_get(client, "/overview", rep.during_map)
                    await timed_get(client, "/health", rep.health_during_map)
                    with trio.move_on_after(args.pause):
                        await mapped.wait()

            async def create_map() -> None:
                began = time.perf_counter()
                async with trioworker.connect(server.api):
                    futures = await noop.map(list(range(args.map)))
                rep.map_seconds = time.perf_counter() - began
                mapped.set()
                if len(futures) != args.map:
                    raise BenchError(f"map made {len(futures)} runs, not {args.map}")

            async with trio.open_nursery() as inner:
                inner.start_soon(read_while_mapping)
                inner.start_soon(create_map)
            nursery.cancel_scope.cancel()
    return rep


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--stored", type=int, default=37_000, help="ended runs stored first (default 37000)")
    parser.add_argument("--map", type=int, default=10_000, help="runs in the map (default 10000)")
    parser.add_argument("--tabs", type=int, default=1, help="dashboard tabs listening (default 1)")
    parser.add_argument("--idle", type=int, default=10, help="overview reads with nothing going on")
    parser.add_argument(
        "--pause", type=float, default=0.25, help="seconds between two reads during the map (0: back to back)"
    )
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "bench_overview.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    issues: list[str] = []
    began = time.perf_counter()
    reps: list[Repetition] = []
    error: str | None = None
    with tempfile.TemporaryDirectory(prefix="trioworker-bench-overview-") as tmp:
        try:
            with running_server(Path(tmp), "overview", issues) as server:
                log(f"storing {args.stored:,} ended runs ...")
                fill = store_ended_runs(server, args.stored) if args.stored else 0.0
                log(f"stored in {fill:.1f} s")
                for n in range(args.repeat):
                    log(f"repetition {n + 1}: map of {args.map:,} with {args.tabs} tab(s) listening")
                    reps.append(trio.run(one_repetition, server, args))
                    log(f"  map took {reps[-1].map_seconds:.2f} s")
        except BenchError as exc:
            error = str(exc)
    header = ["read", "n", "median ms", "p95 ms", "max ms"]
    rows: list[list[str]] = []
    for n, rep in enumerate(reps, 1):
        rows.append(rep.idle.row(f"#{n} overview, idle"))
        rows.append(rep.during_map.row(f"#{n} overview, during the map"))
        rows.append(rep.health_during_map.row(f"#{n} health, during the map"))
    maps = [f"#{n}: {rep.map_seconds:.2f} s" for n, rep in enumerate(reps, 1)]
    print_sections(
        [
            (
                f"GET /api/overview with {args.stored:,} runs stored, while a map of {args.map:,} is "
                f"created ({args.tabs} tab(s) listening, {args.pause:g} s between reads)",
                aligned_table(header, rows, {1, 2, 3, 4}),
            ),
            ("map durations", maps),
            ("issues", issues or ["none"]),
        ],
        error,
    )
    save_results(
        "bench_overview",
        args,
        time.perf_counter() - began,
        {"repetitions": [asdict(rep) for rep in reps], "issues": issues, "error": error},
    )
    return 1 if error or issues else 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark of what cancellation reaching children and run groups cost in the stores.

Run it as a plain script (no pytest)::

    python benchmarks/bench_cascade.py [--runs N] [--repeat K] [--stores sqlite,postgres]
        [--postgres-url URL]

Each phase opens a fresh store in this process (a SQLite file in a temporary folder; a
fresh database on ``--postgres-url`` for PostgreSQL, dropped afterwards) and times store
operations only (no HTTP, no worker):

a) create N runs in batches of 500, with no parent and no group (the baseline);
b) create N children of one running parent in batches of 500 (each batch reads the
   parent's state, ``FOR SHARE`` on PostgreSQL, to create a child of a cancelled parent
   CANCELLED);
c) create N runs of one run group in batches of 500 (each batch records the group and
   reads whether it was cancelled);
d) cancel a parent with N descendants not ended (sqrt(N) children with sqrt(N) children
   each): one operation, one transaction, one recursive query;
e) cancel a run group of N runs not ended: the same.

The table shows the median of ``--repeat`` repetitions: runs per second for a) to c), the
seconds of the one operation for d) and e).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
import trio

from trioworker.models import SetStateRequest, StateType, TaskRunCreate, make_state
from trioworker.server.store import Store, open_store

BATCH = 500


@asynccontextmanager
async def fresh_store(kind: str, postgres_url: str) -> AsyncIterator[Store]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            async with open_store(Path(folder) / "bench.db") as store:
                yield store
        return
    name = f"bench_cascade_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = postgres_url.rsplit("/", 1)[0] + "/" + name
        async with open_store(url) as store:
            yield store
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


async def create_all(store: Store, creates: list[TaskRunCreate]) -> float:
    """Seconds to create ``creates`` in batches."""
    started = time.perf_counter()
    for start in range(0, len(creates), BATCH):
        await store.create_runs(creates[start : start + BATCH])
    return time.perf_counter() - started


async def running_parent(store: Store) -> uuid.UUID:
    [(parent, _)] = await store.create_runs([TaskRunCreate(task_key="parent")])
    await store.claim_runs([parent.id], "bench")
    await store.set_states([(parent.id, SetStateRequest(make_state(StateType.RUNNING)))], now=time.time())
    return parent.id


async def phase_plain(store: Store, runs: int) -> float:
    return runs / await create_all(store, [TaskRunCreate(task_key="k") for _ in range(runs)])


async def phase_children(store: Store, runs: int) -> float:
    parent = await running_parent(store)
    creates = [TaskRunCreate(task_key="k", parent_task_run_id=parent) for _ in range(runs)]
    return runs / await create_all(store, creates)


async def phase_group(store: Store, runs: int) -> float:
    group = uuid.uuid4()
    return runs / await create_all(store, [TaskRunCreate(task_key="k", group_id=group) for _ in range(runs)])


async def phase_cancel_tree(store: Store, runs: int) -> float:
    parent = await running_parent(store)
    width = max(1, math.isqrt(runs))
    children = [
        run
        for run, _ in await store.create_runs(
            [TaskRunCreate(task_key="c", parent_task_run_id=parent) for _ in range(width)]
        )
    ]
    creates = [
        TaskRunCreate(task_key="g", parent_task_run_id=c.id) for c in children for _ in range(width - 1)
    ]
    await create_all(store, creates)
    started = time.perf_counter()
    [change] = await store.set_states(
        [(parent, SetStateRequest(make_state(StateType.CANCELLED)))], now=time.time()
    )
    seconds = time.perf_counter() - started
    expected = width + len(creates)
    if len(change.descendants) != expected:
        raise SystemExit(f"the cancel reached {len(change.descendants)} descendants, not {expected}")
    return seconds


async def phase_cancel_group(store: Store, runs: int) -> float:
    group = uuid.uuid4()
    await create_all(store, [TaskRunCreate(task_key="k", group_id=group) for _ in range(runs)])
    started = time.perf_counter()
    changes = await store.cancel_group(group, now=time.time())
    seconds = time.perf_counter() - started
    if len(changes) != runs:
        raise SystemExit(f"the group's cancel reached {len(changes)} runs, not {runs}")
    return seconds


PHASES: dict[str, tuple[str, Callable[[Store, int], Awaitable[float]]]] = {
    "a) create, no parent (runs/s)": ("rate", phase_plain),
    "b) create children of one parent (runs/s)": ("rate", phase_children),
    "c) create runs of one group (runs/s)": ("rate", phase_group),
    "d) cancel a parent of N descendants (s)": ("seconds", phase_cancel_tree),
    "e) cancel a group of N runs (s)": ("seconds", phase_cancel_group),
}


async def main(args: argparse.Namespace) -> int:
    kinds = [kind.strip() for kind in args.stores.split(",") if kind.strip()]
    results: dict[str, dict[str, float]] = {}
    for name, (_, phase) in PHASES.items():
        for kind in kinds:
            values = []
            for _ in range(args.repeat):
                async with fresh_store(kind, args.postgres_url) as store:
                    values.append(await phase(store, args.runs))
            results.setdefault(name, {})[kind] = statistics.median(values)
    print(f"N = {args.runs}, median of {args.repeat}")
    print(f"{'phase':<45}" + "".join(f"{kind:>12}" for kind in kinds))
    for name, (unit, _) in PHASES.items():
        cells = "".join(
            f"{results[name][kind]:>12,.0f}" if unit == "rate" else f"{results[name][kind]:>12.3f}"
            for kind in kinds
        )
        print(f"{name:<45}{cells}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--stores", default="sqlite")
    parser.add_argument("--postgres-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    sys.exit(trio.run(main, parser.parse_args()))

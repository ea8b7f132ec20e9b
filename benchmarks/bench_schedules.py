"""What periodic runs cost: computing a tick, and firing many schedules due at once.

Run it as a plain script (no server: it opens the stores itself)::

    python benchmarks/bench_schedules.py [--schedules N] [--postgres-url URL]

It prints, in microseconds per call (median of 5 repetitions of 2,000 calls), the cost of
:func:`trioworker.schedules.next_fire_time` for a cron expression in UTC, one in a time zone
and an interval; then, per store (a fresh SQLite file, and a fresh schema of the PostgreSQL
database given), how long registering N schedules took and how long firing them all (every
one due at the same moment, as after a restart: batches of 100 per store operation, each
creating its run in the same transaction) took, in schedules (runs) per second.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import timeit
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import psycopg
import trio

from trioworker.models import ScheduleCreate
from trioworker.schedules import checked, next_fire_time
from trioworker.server.store import Store, open_store


def tick_costs() -> list[tuple[str, float]]:
    after = datetime(2030, 3, 1, 12, 0, 7, tzinfo=UTC)
    shapes = {
        "cron */5 * * * * (UTC)": ScheduleCreate(name="a", task_key="k", cron="*/5 * * * *"),
        "cron 0 9 * * 1-5 (Europe/Paris)": ScheduleCreate(
            name="b", task_key="k", cron="0 9 * * 1-5", timezone="Europe/Paris"
        ),
        "interval 300 s": ScheduleCreate(name="c", task_key="k", interval=300),
    }
    out = []
    for label, create in shapes.items():
        times = timeit.repeat(partial(next_fire_time, checked(create), after), number=2000, repeat=5)
        out.append((label, statistics.median(times) / 2000 * 1e6))
    return out


@asynccontextmanager
async def postgres_schema(url: str) -> AsyncIterator[str]:
    """A fresh schema of ``url``'s database, first on the search path; dropped after."""
    schema = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        sep = "&" if "?" in url else "?"
        yield f"{url}{sep}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def fire_many(store: Store, n: int) -> tuple[float, float]:
    """``(schedules registered per second, schedules fired per second)``."""
    start = datetime(2030, 1, 1, tzinfo=UTC)
    began = time.perf_counter()
    async with trio.open_nursery() as nursery:  # as many clients would, at once
        for i in range(n):
            create = checked(ScheduleCreate(name=f"s{i:06d}", task_key="bench.tick", interval=60))
            nursery.start_soon(store.upsert_schedule, create, start)
    registered = n / (time.perf_counter() - began)
    now = (start + timedelta(minutes=1, seconds=5)).timestamp()  # every one due
    began = time.perf_counter()
    fired = 0
    while fired < n:
        fired += len((await store.fire_schedules(now)).runs)
    return registered, n / (time.perf_counter() - began)


async def main(args: argparse.Namespace) -> None:
    print("next_fire_time, microseconds per call:")
    for label, micros in tick_costs():
        print(f"  {label:34} {micros:8.1f}")
    print(f"\n{args.schedules} schedules, all due at once:")
    print(f"  {'store':12} {'registered/s':>14} {'fired/s':>10}")
    with tempfile.TemporaryDirectory() as folder:
        async with open_store(Path(folder) / "bench.db") as store:
            registered, fired = await fire_many(store, args.schedules)
        print(f"  {'sqlite':12} {registered:14,.0f} {fired:10,.0f}")
    if args.postgres_url:
        async with postgres_schema(args.postgres_url) as url, open_store(url) as store:
            registered, fired = await fire_many(store, args.schedules)
        print(f"  {'postgresql':12} {registered:14,.0f} {fired:10,.0f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--schedules", type=int, default=2000, help="schedules to register and fire")
    parser.add_argument("--postgres-url", default=None, help="also on this PostgreSQL database")
    trio.run(main, parser.parse_args())

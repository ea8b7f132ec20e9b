"""The tasks ``benchmarks/bench_worker.py`` runs, and the worker process that serves them.

Run as a script, it is one worker process::

    python benchmarks/worker_tasks.py API_URL LIMIT

It serves ``bench.noop`` (async, returns its argument) and ``bench.sleep50`` (sync, sleeps
50 ms in a worker thread, returns its argument) with ``trioworker.worker.serve`` until
SIGTERM or SIGINT, then exits 0.
"""

from __future__ import annotations

import functools
import logging
import sys
import time

import trio

from trioworker.tasks import task
from trioworker.worker.task_worker import serve

NOOP_KEY = "bench.noop"
SLEEP50_KEY = "bench.sleep50"
SLEEP_SECONDS = 0.05


@task(key=NOOP_KEY)
async def noop(i: int) -> int:
    return i


@task(key=SLEEP50_KEY)
def sleep50(i: int) -> int:
    time.sleep(SLEEP_SECONDS)
    return i


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: worker_tasks.py API_URL LIMIT [PREFETCH]", file=sys.stderr)
        return 2
    api_url, limit = argv[0], int(argv[1])
    prefetch = int(argv[2]) if len(argv) == 3 else 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    trio.run(functools.partial(serve, noop, sleep50, limit=limit, api_url=api_url, prefetch=prefetch))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The Prefect tasks of ``run_prefect.py``, and its task worker process.

Run as a script, it is one Prefect task worker (``prefect.task_worker.serve``)::

    python benchmarks/peers/prefect_tasks.py LIMIT

The environment (``PREFECT_API_URL``, ``PREFECT_HOME``, ...) comes from ``run_prefect.py``.
Prefect derives a task's key from its name and where its code is, so the submitting script
imports this same file.
"""

from __future__ import annotations

import sys
import time

from prefect import task  # type: ignore[import-not-found,unused-ignore]

SLEEP_SECONDS = 0.05


@task  # type: ignore[untyped-decorator,unused-ignore]
async def noop(i: int) -> int:
    return i


@task  # type: ignore[untyped-decorator,unused-ignore]
def sleep50(i: int) -> int:
    time.sleep(SLEEP_SECONDS)
    return i


def main(argv: list[str]) -> int:
    from prefect.task_worker import serve  # type: ignore[import-not-found,unused-ignore]

    if len(argv) != 1:
        print("usage: prefect_tasks.py LIMIT", file=sys.stderr)
        return 2
    serve(noop, sleep50, limit=int(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

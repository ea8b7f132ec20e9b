"""The task of the chaos runs (``tests/chaos.py``): each execution leaves a line in a file
before it does anything else, so that a worker killed a moment later has left its trace.

A worker serves it as ``trioworker worker tests/chaos_tasks.py:record`` with
:data:`RECORD_VARIABLE` naming the file. Each line is ``RUN_ID PID TOKEN TIME``: the run,
the worker process, a token of this execution's own (which the run returns, so that the
run's result names the execution that completed it) and when it started (``time.time()``).
One ``write`` on a file opened with ``O_APPEND``: lines of several processes never mix,
and a line written is kept when its process is killed.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from typing import Final

import trio

from trioworker.context import current_run
from trioworker.tasks import task

#: The file the executions are appended to (set for the worker processes).
RECORD_VARIABLE: Final = "TRIOWORKER_CHAOS_RECORD"
#: At most this many seconds each execution then sleeps (uniformly drawn), so that some
#: runs are in flight when a worker is killed (default 0).
SLEEP_VARIABLE: Final = "TRIOWORKER_CHAOS_SLEEP"


@task(key="chaos.record")
async def record(n: int) -> str:
    """Append this execution's line, sleep a little; the execution's token."""
    run = current_run()
    assert run is not None
    token = uuid.uuid4().hex
    line = f"{run.task_run_id} {os.getpid()} {token} {time.time():.6f}\n".encode()
    fd = os.open(os.environ[RECORD_VARIABLE], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # to the page cache: a SIGKILL of this process loses nothing
    finally:
        os.close(fd)
    await trio.sleep(random.uniform(0, float(os.environ.get(SLEEP_VARIABLE, "0"))))
    return token

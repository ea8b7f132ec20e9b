"""State hooks: the task's ``on_completion``, ``on_failure`` and ``on_cancellation``
functions, called on the worker once a run's end is accepted by the server.

Each hook gets ``(task, task_run, state)``, Prefect's shape (``StateHookCallable``): the
task, the run with that state, and the state the server accepted (a COMPLETED state's
``data`` is the result as it travels: ``task.load_result(state.data)`` reads it). Hooks
run in order, inside the run's context (``trioworker.current_run()`` is that run, and
what a hook submits records it as its parent): an async hook in the worker's event loop,
a plain one in a worker thread.
"""

from __future__ import annotations

import inspect
import logging
from functools import partial
from typing import Any

import attrs
import trio

from trioworker._util import raise_passing
from trioworker.context import running
from trioworker.models import State, StateType, TaskRun
from trioworker.tasks import StateHook, Task, is_async_callable
from trioworker.worker import _threads, failures

log = logging.getLogger("trioworker.worker.hooks")


def hooks_for(task: Task[..., Any], state_type: StateType) -> tuple[StateHook, ...]:
    """The hooks of ``task`` for a run that ended in ``state_type`` (none for others)."""
    if state_type is StateType.COMPLETED:
        return task.on_completion
    if state_type is StateType.FAILED:
        return task.on_failure
    if state_type is StateType.CANCELLED:
        return task.on_cancellation
    return ()


def _name(hook: StateHook) -> str:
    fn = hook.func if isinstance(hook, partial) else hook
    return str(getattr(fn, "__qualname__", None) or type(fn).__qualname__)


async def call_hooks(
    task: Task[..., Any], run: TaskRun, state: State, thread_limiter: trio.CapacityLimiter
) -> None:
    """Call the hooks of ``task`` for ``run``, which ended in ``state``, one after the other.

    **Error handling:** whatever a hook raises (BaseExceptions included) or returns is
    logged at ERROR with the run's id and the hook's name, and the next hook runs: a hook
    changes neither the run's state (already set) nor the worker. Only the worker's own
    cancellation and a real Ctrl-C propagate (see :func:`trioworker._util.passing_part`).

    **Cancellation handling:** a worker that stops cancels a hook under way like any of
    its run's code (past its grace period); a plain hook's thread is waited for, as a sync
    task's is.
    """
    hooks = hooks_for(task, state.type)
    if not hooks:
        return
    ended = attrs.evolve(run, state=state)
    with running(ended):
        for hook in hooks:
            await _call_one(task, ended, state, hook, thread_limiter)


def _call_sync(hook: StateHook, task: Task[..., Any], run: TaskRun, state: State) -> None:
    """In the hook's thread: call it; a coroutine it returns is an error of its own."""
    returned = hook(task, run, state)
    if inspect.iscoroutine(returned):
        returned.close()  # never awaited: say so once, instead of Python's warning
        raise TypeError("it returned a coroutine: make the hook `async def`")


async def _call_one(
    task: Task[..., Any], run: TaskRun, state: State, hook: StateHook, thread_limiter: trio.CapacityLimiter
) -> None:
    name = _name(hook)
    log.debug("run %s of %s: calling hook %s (%s)", run.id, task.key, name, state.type.value)
    try:
        if is_async_callable(hook):
            await hook(task, run, state)  # type: ignore[misc]
        else:
            await _threads.run_sync(partial(_call_sync, hook, task, run, state), thread_limiter)
    except BaseException as exc:  # the hook's failure is logged; what must pass is raised again
        raise_passing(exc)
        log.error(
            "run %s of %s: hook %s for %s failed: %s",
            run.id,
            task.key,
            name,
            state.type.value,
            failures.exception_line(exc, 1024),
            exc_info=exc,
            extra={"task_key": task.key, "run_id": str(run.id), "hook": name},
        )

"""Runs one task run: PENDING -> RUNNING -> COMPLETED | FAILED | CANCELLED, or back to the queue.

The engine owns the attempt, not the run's fate: every state it reaches is proposed to
the server through a :class:`Reporter`, and the server's answer decides (a run cancelled
meanwhile gets ABORT, and the engine does not start it).
"""

from __future__ import annotations

import enum
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Final, Protocol

import attrs
import orjson
import trio

from trioworker import serializers
from trioworker._util import raise_passing
from trioworker.context import running
from trioworker.errors import ParameterError, StopTaskWorker, TrioworkerError
from trioworker.models import (
    JSON,
    TIMED_OUT,
    SetStateResult,
    SetStateStatus,
    State,
    StateDetails,
    StateType,
    TaskRun,
    make_state,
)
from trioworker.protocol import SERIALIZER_JSON, SERIALIZER_PICKLE
from trioworker.tasks import Task
from trioworker.worker import _threads, failures, hooks

log = logging.getLogger("trioworker.worker.engine")


class Reporter(Protocol):
    """Where the engine proposes states: the subscription socket, or REST."""

    async def report(self, run_id: uuid.UUID, state: State) -> SetStateResult: ...


#: Queues a report and returns at once; the answer goes to the callback when it comes
#: (the subscription's ``send_report``).
QueueReport = Callable[[uuid.UUID, State, Callable[[SetStateResult], None]], object]

#: Reads runs by id (the upstream runs whose results a run takes as arguments).
FetchRuns = Callable[[list[uuid.UUID]], Awaitable[list[TaskRun]]]


def _swap_in(value: Any, results: dict[uuid.UUID, Any]) -> Any:
    run_id = serializers.future_ref_id(value)
    if run_id is None:
        return value
    if run_id not in results:
        raise ParameterError(
            f"a parameter stands for the result of run {run_id}, which this run does not wait for"
        )
    return results[run_id]


async def _upstream_results(run: TaskRun, fetch: FetchRuns) -> dict[uuid.UUID, Any]:
    upstream = {r.id: r for r in await fetch(list(run.wait_for))}
    results: dict[uuid.UUID, Any] = {}
    for run_id in run.wait_for:
        up = upstream.get(run_id)
        if up is None or up.state.type is not StateType.COMPLETED:
            state = "gone" if up is None else up.state.type.value
            raise ParameterError(f"the run {run_id} whose result is an argument is {state}")
        results[run_id] = (
            serializers.pickle_loads(up.state.data) if up.serializer == SERIALIZER_PICKLE else up.state.data
        )
    return results


def _swap_in_json(parameters: Any, results: dict[uuid.UUID, Any]) -> Any:
    """The same for json parameters, before they are structured (so results get typed too)."""
    if not isinstance(parameters, dict):
        return parameters
    out: dict[str, Any] = {}
    for name, value in parameters.items():
        if isinstance(value, list):
            out[name] = [_swap_in(v, results) for v in value]
        elif isinstance(value, dict) and serializers.future_ref_id(value) is None:
            out[name] = {k: _swap_in(v, results) for k, v in value.items()}
        else:
            out[name] = _swap_in(value, results)
    return out


class Outcome(enum.Enum):
    """How one execution ended, from the worker's point of view."""

    COMPLETED = "completed"
    FAILED = "failed"
    RETRYING = "retrying"
    CANCELLED = "cancelled"
    #: The server would not let it start (cancelled or taken elsewhere meanwhile).
    REFUSED = "refused"
    #: The task raised StopTaskWorker: the run went back to the queue, the worker stops.
    STOP = "stop"


async def read_parameters(
    task: Task[..., Any], run: TaskRun, *, allow_pickle: bool, fetch: FetchRuns | None = None
) -> tuple[list[Any], dict[str, Any]]:
    """The call's ``(args, kwargs)``; raises ParameterError with a sentence for the run's state.

    Futures passed as arguments come as placeholders: they are replaced by the results of
    their runs (read with ``fetch``) before the json parameters are structured, so a
    result gets the parameter's type like any other argument.
    """
    results: dict[uuid.UUID, Any] = {}
    if run.wait_for and fetch is not None:
        results = await _upstream_results(run, fetch)
    try:
        return _load(task, run, results, allow_pickle=allow_pickle)
    except ParameterError:
        raise
    except Exception as exc:  # whatever else reading values raised: this run fails, alone
        raise ParameterError(f"{type(exc).__name__}: {exc}") from None


def _load(
    task: Task[..., Any], run: TaskRun, results: dict[uuid.UUID, Any], *, allow_pickle: bool
) -> tuple[list[Any], dict[str, Any]]:
    if run.serializer == SERIALIZER_JSON:
        return serializers.load_parameters(task.fn, _swap_in_json(run.parameters, results))
    if run.serializer == SERIALIZER_PICKLE:
        if not allow_pickle:
            raise ParameterError(
                "this run's parameters are pickled and this worker does not accept pickle "
                "(start it with allow_pickle=True / --allow-pickle if you trust the submitters)"
            )
        loaded = serializers.pickle_loads(run.parameters)
        if not (isinstance(loaded, tuple) and len(loaded) == 2):
            raise ParameterError("pickled parameters must be an (args, kwargs) pair")
        args, kwargs = loaded
        return [_swap_in(a, results) for a in args], {
            k: _swap_in(v, results) for k, v in dict(kwargs).items()
        }
    raise ParameterError(f"unknown serializer {run.serializer!r}")


#: Largest result a run may report: it travels in one websocket message, which the server
#: refuses above its body limit (16 MiB by default).
MAX_RESULT_BYTES: Final = 8 * 1024 * 1024


def _result_data(task: Task[..., Any], run: TaskRun, value: object) -> JSON:
    """The result as reported; raises TypeError or ValueError for what cannot travel.

    A json result must reach ``result()`` as it is: dumped by the return annotation and
    read back the same (:func:`~trioworker.serializers.dump_result`); a pickle must pickle.
    """
    try:
        data = (
            serializers.pickle_dumps(value)
            if run.serializer == SERIALIZER_PICKLE
            else serializers.dump_result(task.fn, value)
        )
    except TypeError:
        raise
    except Exception as exc:  # a __reduce__ that raises, a RecursionError
        raise TypeError(f"{type(exc).__name__}: {exc}") from None
    size = len(orjson.dumps(data))  # a TypeError here, not in the socket writer later
    if size > MAX_RESULT_BYTES:
        raise ValueError(f"it is {size} bytes; results are limited to {MAX_RESULT_BYTES} bytes")
    return data


async def _call(
    task: Task[..., Any], args: list[Any], kwargs: dict[str, Any], thread_limiter: trio.CapacityLimiter
) -> Any:
    if task.is_async:
        return await task.fn(*args, **kwargs)
    # The thread gets a copy of our contextvars (trio does that), and cancellation waits
    # for it to return, unless the worker gave up on it after its grace period (_threads).
    return await _threads.run_sync(partial(_call_sync, task, args, kwargs), thread_limiter)


def _call_sync(task: Task[..., Any], args: list[Any], kwargs: dict[str, Any]) -> Any:
    """In the run's thread: the sync task's value; a coroutine it returns fails the attempt."""
    value = task.fn(*args, **kwargs)
    if inspect.iscoroutine(value):
        value.close()  # never awaited: say so once, instead of Python's warning
        raise TypeError(f"{task.name} returned a coroutine: make the task function `async def`")
    return value


async def _attempt(
    task: Task[..., Any], args: list[Any], kwargs: dict[str, Any], thread_limiter: trio.CapacityLimiter
) -> tuple[bool, Any, bool]:
    """``(True, value, False)``, or ``(False, exception, timed_out)`` for whatever the task's
    code raised (``timed_out``: the attempt ran out of time, the exception is the
    TimeoutError that says so):
    BaseExceptions too (``sys.exit()``, a KeyboardInterrupt it raised itself, an exception
    group holding them), so that nothing a run does stops the worker.

    What must propagate does (see :func:`~trioworker._util.passing_part`): the
    cancellation of this run or of the worker, and a real Ctrl-C.

    A timeout cancels an async attempt at its next checkpoint. Code that reaches none in
    time (a sync attempt's thread, which cannot be interrupted; async code that blocks the
    event loop) runs to its end, and the attempt fails with TimeoutError if it ran longer
    than the timeout.
    """
    timeout = task.timeout_seconds
    started = trio.current_time()
    try:
        if timeout is None:  # no cancel scope to enter: a run without a timeout needs none
            return True, await _call(task, args, kwargs, thread_limiter), False
        with trio.move_on_after(timeout) as deadline:
            value = await _call(task, args, kwargs, thread_limiter)
    except BaseException as exc:  # the task's failure; what must pass is raised again
        raise_passing(exc)
        return False, exc, False
    if deadline.cancel_called or trio.current_time() - started > timeout:
        return False, TimeoutError(f"{task.name} timed out after {timeout:g} s"), True
    return True, value, False


def _failed(message: str, exc: BaseException) -> State:
    """A FAILED state for ``exc``; its message and data are cut to fit a report."""
    return make_state(
        StateType.FAILED,
        message=failures.clip_text(message),
        data=failures.describe_exception(exc),
    )


def _timed_out(state: State) -> State:
    """``state`` (FAILED, or SCHEDULED for a retry) saying that the attempt ran out of time
    (:data:`~trioworker.models.TIMED_OUT`): the server then cancels the runs submitted from
    it, as a cancel would."""
    return attrs.evolve(state, state_details=attrs.evolve(state.state_details, reason=TIMED_OUT))


def _retry_state(task: Task[..., Any], run: TaskRun, exc: BaseException, attempt: int) -> State | None:
    if attempt > task.retries:
        return None
    if task.retry_condition_fn is not None:
        try:
            verdict: object = task.retry_condition_fn(task, run, exc)
            if inspect.iscoroutine(verdict):
                verdict.close()
                raise TypeError("it returned a coroutine, not a bool")
            if not verdict:
                return None
        except BaseException as error:  # its failure fails the run, not the worker
            raise_passing(error)
            log.warning(
                "retry_condition_fn of %s failed (%s); not retrying",
                task.key,
                failures.exception_line(error, 1024),
            )
            return None
    delay = task.retry_delay(attempt)
    return make_state(
        StateType.SCHEDULED,
        "AwaitingRetry",
        message=failures.clip_text(
            f"retry {attempt} of {task.retries} in {delay:g} s after {failures.exception_line(exc, None)}"
        ),
        details=StateDetails(delay_seconds=delay, reason="retry"),
    )


async def execute(
    task: Task[..., Any],
    run: TaskRun,
    reporter: Reporter,
    *,
    scope: trio.CancelScope,
    thread_limiter: trio.CapacityLimiter,
    allow_pickle: bool = False,
    on_running: Callable[[], None] | None = None,
    on_attempt_end: Callable[[], None] | None = None,
    fetch: FetchRuns | None = None,
    queue_report: QueueReport | None = None,
) -> Outcome:
    """Run one attempt of ``run``, report where it ended, and log one line at INFO saying
    so: ``run ID of KEY: COMPLETED in 0.012 s (attempt 1)``, with ``: why`` for a run that
    failed, is retried, was refused or stopped. The record carries the same as fields
    (``task_key``, ``run_id``, ``outcome``, ``duration_seconds``, ``attempt``, and ``error``
    when there is one), for structured logs. An attempt that ends by propagating (the
    worker stops, or fails itself) logs nothing here. Then the task's state hooks for the
    end the server accepted run (:func:`trioworker.worker.hooks.call_hooks`): a hook's
    failure is logged there and changes nothing.

    **Error handling:** nothing the run's code raises or returns leaves this function (it
    fails the run, or retries it), BaseExceptions included; every report fits the server
    (texts cut, see :func:`~trioworker.worker.failures.clip_text`). Only the cancellations
    below and a real Ctrl-C propagate, and the server's or the connection's errors.

    Args:
        scope: cancelling it (the server asked to stop the run) ends the attempt with
            :attr:`Outcome.CANCELLED`, unreported; any other cancellation (the worker
            stopping) propagates, unreported, and the worker hands the run back.
        on_running: called once the server accepted RUNNING.
        on_attempt_end: called as soon as the task's code has returned or raised, before
            the outcome is reported: the worker frees the run's slot there, so the next
            run starts while the server is still answering this one's final report.
        fetch: reads the runs whose results are arguments of this one.
        queue_report: queues a report without waiting for its answer. Given, the attempt
            starts while RUNNING is being proposed instead of after the answer (a round
            trip and a commit less per run); an answer other than ACCEPT then cancels the
            attempt, as a cancel arriving a moment later would.
    """
    ended = partial(_ended, task, run, trio.current_time())
    try:
        args, kwargs = await read_parameters(task, run, allow_pickle=allow_pickle, fetch=fetch)
    except BaseException as exc:
        # The server's and the connection's errors are the worker's (they propagate);
        # anything else, BaseExceptions raised by a parameter type's code included, is
        # this run's.
        if isinstance(exc, TrioworkerError | OSError) and not isinstance(exc, ParameterError):
            raise
        raise_passing(exc)
        text = failures.safe_str(exc) if isinstance(exc, ParameterError) else failures.exception_line(exc)
        message = f"could not read the parameters: {text}"
        answer = await reporter.report(run.id, _failed(message, exc))
        outcome = ended(Outcome.FAILED, _short(message))
        await _ended_hooks(task, run, answer, StateType.FAILED, thread_limiter)
        return outcome

    refused: list[SetStateResult] = []
    attempt_over = False

    def check(answer: SetStateResult) -> None:
        if answer.status is not SetStateStatus.ACCEPT and not refused and not attempt_over:
            refused.append(answer)
            scope.cancel()

    async def refusal() -> Outcome:
        answer = refused[0]
        outcome = ended(Outcome.REFUSED, f"not started: {answer.status.value} ({answer.details})")
        await _ended_hooks(task, run, answer, StateType.CANCELLED, thread_limiter)
        return outcome

    ok, value, timed_out = False, None, False
    if queue_report is None:
        check(await reporter.report(run.id, make_state(StateType.RUNNING)))
        if refused:
            return await refusal()
    else:
        # Optimistic start: the attempt runs while RUNNING is on its way; a refusal cancels
        # it. An answer after the attempt ended changes nothing: the final report goes right
        # behind RUNNING, often in the same message.
        queue_report(run.id, make_state(StateType.RUNNING), check)
    if on_running is not None:
        on_running()
    with scope, running(run):
        ok, value, timed_out = await _attempt(task, args, kwargs, thread_limiter)
    attempt_over = True
    if on_attempt_end is not None:
        on_attempt_end()
    if refused:
        return await refusal()
    if scope.cancelled_caught:
        # The server already marked the run (CANCELLED, or deleted, or given to another
        # worker after we lost touch): no report; the worker hands the lease back.
        outcome = ended(Outcome.CANCELLED)
        await _cancelled_hooks(task, run, fetch, thread_limiter)
        return outcome

    if ok:
        try:
            data = _result_data(task, run, value)
        except BaseException as unserializable:  # the result's own code may raise anything
            raise_passing(unserializable)
            value = TypeError(
                f"the result of {task.name} cannot be reported: {failures.safe_str(unserializable)}"
            )
            value.__cause__ = unserializable
        else:
            answer = await reporter.report(run.id, make_state(StateType.COMPLETED, data=data))
            outcome = ended(Outcome.COMPLETED)
            await _ended_hooks(task, run, answer, StateType.COMPLETED, thread_limiter)
            return outcome

    error = value
    assert isinstance(error, BaseException)
    if isinstance(error, StopTaskWorker):
        back = make_state(
            StateType.SCHEDULED,
            "Redelivered",
            message="the worker stopped (StopTaskWorker)",
            details=StateDetails(reason="release"),
        )
        await reporter.report(run.id, back)
        return ended(Outcome.STOP, "the task raised StopTaskWorker: the run goes back to the queue")
    line = failures.exception_line(error)
    retry = _retry_state(task, run, error, attempt=run.run_count + 1)
    if retry is not None:
        await reporter.report(run.id, _timed_out(retry) if timed_out else retry)
        return ended(Outcome.RETRYING, _short(retry.message))
    failed = _failed(line, error)
    answer = await reporter.report(run.id, _timed_out(failed) if timed_out else failed)
    outcome = ended(Outcome.FAILED, _short(line))
    await _ended_hooks(task, run, answer, StateType.FAILED, thread_limiter)
    return outcome


async def _ended_hooks(
    task: Task[..., Any],
    run: TaskRun,
    answer: SetStateResult,
    proposed: StateType,
    thread_limiter: trio.CapacityLimiter,
) -> None:
    """The state hooks for the server's ``answer`` to the end this worker ``proposed``:
    of that end once accepted, of the cancellation when the run was cancelled meanwhile,
    none otherwise (the run ended elsewhere, or is another worker's now)."""
    state = answer.state
    if (
        answer.status is SetStateStatus.ACCEPT and state.type is proposed
    ) or state.type is StateType.CANCELLED:
        await hooks.call_hooks(task, run, state, thread_limiter)


async def _cancelled_hooks(
    task: Task[..., Any], run: TaskRun, fetch: FetchRuns | None, thread_limiter: trio.CapacityLimiter
) -> None:
    """The ``on_cancellation`` hooks of a run the server stopped while it ran: the server
    stops a run that was cancelled, deleted or given to another worker, so its state is
    read first (only when the task has such hooks), and they run only for CANCELLED."""
    if not task.on_cancellation or fetch is None:
        return
    try:
        found = await fetch([run.id])
    except Exception as exc:  # the hooks are skipped, the worker goes on
        log.warning(
            "run %s of %s: its state could not be read for its on_cancellation hooks: %r",
            run.id,
            task.key,
            exc,
        )
        return
    if found and found[0].state.type is StateType.CANCELLED:
        await hooks.call_hooks(task, run, found[0].state, thread_limiter)


def _ended(
    task: Task[..., Any], run: TaskRun, started: float, outcome: Outcome, why: str | None = None
) -> Outcome:
    """Log the run's line (see :func:`execute`); ``outcome``."""
    if not log.isEnabledFor(logging.INFO):
        return outcome
    duration = trio.current_time() - started
    attempt = run.run_count + 1
    fields: dict[str, object] = {
        "task_key": task.key,
        "run_id": str(run.id),
        "outcome": outcome.name,
        "duration_seconds": round(duration, 6),
        "attempt": attempt,
    }
    if why is not None:
        fields["error"] = why
    log.info(
        "run %s of %s: %s in %.3f s (attempt %d)%s",
        run.id,
        task.key,
        outcome.name,
        duration,
        attempt,
        "" if why is None else f": {why}",
        extra=fields,
    )
    return outcome


def _short(text: str | None) -> str:
    """A message for the log: a line of the report's text at most."""
    return failures.clip_text(text or "", 1024)

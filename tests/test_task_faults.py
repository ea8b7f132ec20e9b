"""Nothing a task's code does stops its worker: every fault ends its run FAILED, readably.

End to end through a real server and a real worker: BaseExceptions raised by task code,
exceptions that cannot be rendered or encoded, huge messages, faults on the retry path,
async code that blocks the event loop past its timeout. After each batch, the same worker
completes a normal run. Unit tests pin the text bounding down.
"""

from __future__ import annotations

import functools
import re
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.lowlevel

from trioworker._util import passing_part
from trioworker.models import TaskRun
from trioworker.tasks import Task, task
from trioworker.worker import failures
from trioworker.worker.engine import MAX_RESULT_BYTES
from trioworker.worker.failures import (
    CUT_MARKER,
    MAX_TEXT_BYTES,
    MAX_TRACEBACK_BYTES,
    clip_text,
    describe_exception,
)
from trioworker.worker.task_worker import TaskWorker, serve

from .helpers import submit, wait_all

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store

Make = Callable[..., TaskWorker]

#: A failure report is at most this large: its bounded fields plus room for the envelope.
MAX_FAILURE_REPORT_BYTES = 4 * MAX_TEXT_BYTES + MAX_TRACEBACK_BYTES + 4096
HUGE = 6_000_000


# --------------------------------------------------------------------------- faults


class Halt(BaseException):
    """A BaseException of the task's own."""


class StrRaises(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


class StrExits(Exception):
    def __str__(self) -> str:
        raise SystemExit("from __str__")

    def __repr__(self) -> str:
        raise SystemExit("from __repr__")


class NotesThatExit(list[str]):
    def __iter__(self) -> Any:
        raise SystemExit("from __notes__")


def raise_fault(kind: str) -> None:
    """Raise the fault ``kind`` (the same in sync and async tasks)."""
    if kind == "exit":
        sys.exit("bye")
    if kind == "interrupt":
        raise KeyboardInterrupt("by the task itself")
    if kind == "generator_exit":
        raise GeneratorExit("closing")
    if kind == "custom_base":
        raise Halt("halt")
    if kind == "group":
        raise BaseExceptionGroup("grouped", [SystemExit("in a group"), Halt("too")])
    if kind == "str_raises":
        raise StrRaises()
    if kind == "str_exits":
        raise StrExits()
    if kind == "notes":
        error = ValueError("noted")
        error.__notes__ = NotesThatExit(["a note"])
        raise error
    if kind == "cause_raises":
        raise ValueError("outer") from StrExits()
    if kind == "surrogate":
        raise ValueError("caf\udce9")  # what an undecodable file name gives
    if kind == "nul":
        raise ValueError("nul\x00 and \x1b[31mescape")
    if kind == "huge":
        raise ValueError("x" * HUGE)
    raise AssertionError(kind)


#: kind -> (the FAILED message, the exception type reported)
EXPECTED = {
    "exit": ("SystemExit: bye", "builtins.SystemExit"),
    "interrupt": ("KeyboardInterrupt: by the task itself", "builtins.KeyboardInterrupt"),
    "generator_exit": ("GeneratorExit: closing", "builtins.GeneratorExit"),
    "custom_base": ("Halt: halt", f"{__name__}.Halt"),
    "group": ("BaseExceptionGroup: grouped (2 sub-exceptions)", "builtins.BaseExceptionGroup"),
    "str_raises": ("StrRaises: <str() failed: builtins.RuntimeError>", f"{__name__}.StrRaises"),
    "str_exits": ("StrExits: <str() failed: builtins.SystemExit>", f"{__name__}.StrExits"),
    "notes": ("ValueError: noted", "builtins.ValueError"),
    "cause_raises": ("ValueError: outer", "builtins.ValueError"),
    "surrogate": ("ValueError: caf\\udce9", "builtins.ValueError"),
    "nul": ("ValueError: nul\x00 and \x1b[31mescape", "builtins.ValueError"),
}
KINDS = [*EXPECTED, "huge"]


@task(key="f.sync")
def sync_fault(kind: str) -> None:
    raise_fault(kind)


async def kept_cancelled() -> trio.Cancelled:
    """A Cancelled caught in a scope that is over: raising it later is a foreign one."""
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.sleep_forever()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("not cancelled")


async def exits() -> None:
    await trio.lowlevel.checkpoint()
    sys.exit("bye")


@task(key="f.async")
async def async_fault(kind: str) -> None:
    await trio.lowlevel.checkpoint()
    if kind == "cancelled":
        raise await kept_cancelled()
    if kind == "nursery":
        async with trio.open_nursery() as nursery:
            nursery.start_soon(exits)
            nursery.start_soon(trio.sleep_forever)
    raise_fault(kind)


@task(key="f.add")
async def add(a: int, b: int) -> int:
    return a + b


async def assert_worker_still_serves(api: httpx.AsyncClient) -> None:
    [run_id] = await submit(api, "f.add", {"a": 2, "b": 3})
    [run] = await wait_all(api, [run_id])
    assert (run["state"]["type"], run["state"]["data"]) == ("COMPLETED", 5)


def assert_cut(text: str, full_length: int) -> None:
    """``text`` is the start of a text of ``full_length`` characters, and says how much is cut."""
    kept, marker, cut = text.rpartition("... [cut ")
    assert marker and cut.endswith(" characters]"), text[-100:]
    assert len(kept) + int(cut.removesuffix(" characters]")) == full_length


def assert_bounded(state: dict[str, Any]) -> None:
    assert len(orjson.dumps(state)) <= MAX_FAILURE_REPORT_BYTES
    assert len(orjson.dumps(state["message"])) <= MAX_TEXT_BYTES + 2
    assert len(orjson.dumps(state["data"]["traceback"])) <= MAX_TRACEBACK_BYTES + 2


@pytest.mark.parametrize("fault_task", [sync_fault, async_fault], ids=["sync", "async"])
async def test_every_fault_fails_its_run_and_the_worker_goes_on(
    api: httpx.AsyncClient, trioworker_worker: Make, fault_task: Task[..., Any]
) -> None:
    kinds = KINDS + (["cancelled", "nursery"] if fault_task is async_fault else [])
    ids = await submit(api, fault_task.key, *({"kind": k} for k in kinds))
    async with trioworker_worker(fault_task, add) as worker:
        runs = dict(zip(kinds, await wait_all(api, ids), strict=True))
        await assert_worker_still_serves(api)
    assert worker.failed_task_runs[fault_task.key] == len(kinds)
    for kind, run in runs.items():
        state = run["state"]
        assert state["type"] == "FAILED", kind
        assert_bounded(state)
        assert "raise_fault" in state["data"]["traceback"] or kind in ("cancelled", "nursery"), kind
        if kind in EXPECTED:
            assert (state["message"], state["data"]["type"]) == EXPECTED[kind], kind
    huge = runs["huge"]["state"]
    assert huge["message"].startswith("ValueError: xxx")
    assert_cut(huge["message"], len("ValueError: ") + HUGE)
    assert huge["data"]["args"] is None  # too long to carry; the message stands in
    assert huge["data"]["traceback"].endswith(" characters]")
    notes_traceback = runs["notes"]["state"]["data"]["traceback"]
    assert "<rendering the traceback failed: builtins.SystemExit>" in notes_traceback
    assert "StrExits: <exception str() failed>" in runs["cause_raises"]["state"]["data"]["traceback"]
    assert runs["surrogate"]["state"]["data"]["message"] == "caf\\udce9"
    if fault_task is async_fault:
        cancelled = runs["cancelled"]["state"]
        assert cancelled["message"].startswith("Cancelled: cancelled due to explicit")
        assert cancelled["data"]["type"] == "trio.Cancelled"
        nursery = runs["nursery"]["state"]
        assert nursery["data"]["type"] == "builtins.BaseExceptionGroup"
        assert "SystemExit: bye" in nursery["data"]["traceback"]


async def test_faults_on_the_retry_path(api: httpx.AsyncClient, trioworker_worker: Make) -> None:
    attempts: list[str] = []

    @task(key="f.exit_once", retries=1)
    async def exit_once(size: int) -> str:
        attempts.append("exit_once")
        if attempts.count("exit_once") == 1:
            sys.exit("x" * size)
        return "second time"

    def condition_exits(t: object, run: TaskRun, exc: BaseException) -> bool:
        sys.exit("the condition gave up")

    def condition_interrupts(t: object, run: TaskRun, exc: BaseException) -> bool:
        raise KeyboardInterrupt

    @task(key="f.picky_exit", retries=3, retry_condition_fn=condition_exits)
    def picky_exit() -> None:
        raise StrExits()

    @task(key="f.picky_interrupt", retries=3, retry_condition_fn=condition_interrupts)
    async def picky_interrupt() -> None:
        raise ValueError("caf\udce9")

    ids = (
        await submit(api, "f.exit_once", {"size": HUGE})
        + await submit(api, "f.picky_exit", {})
        + await submit(api, "f.picky_interrupt", {})
    )
    async with trioworker_worker(exit_once, picky_exit, picky_interrupt, add):
        retried, exited, interrupted = await wait_all(api, ids)
        await assert_worker_still_serves(api)
    assert (retried["state"]["type"], retried["state"]["data"], retried["run_count"]) == (
        "COMPLETED",
        "second time",
        2,
    )
    history = (await api.get(f"/task_runs/{ids[0]}/history")).json()
    [awaiting] = [h["message"] for h in history if h["name"] == "AwaitingRetry"]
    assert awaiting.startswith("retry 1 of 1 in 0 s after SystemExit: xxx")
    assert len(orjson.dumps(awaiting)) <= MAX_TEXT_BYTES + 2
    assert_cut(awaiting, len("retry 1 of 1 in 0 s after SystemExit: ") + HUGE)
    for run in (exited, interrupted):
        assert (run["state"]["type"], run["run_count"]) == ("FAILED", 1)
    assert exited["state"]["message"] == "StrExits: <str() failed: builtins.SystemExit>"
    assert interrupted["state"]["message"] == "ValueError: caf\\udce9"


async def test_results_whose_conversion_raises_anything_fail_the_run(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    class ExitsWhenPickled:
        def __reduce__(self) -> Any:
            sys.exit("no pickling")

    @task(key="f.unpicklable", serializer="pickle")
    def unpicklable() -> object:
        return ExitsWhenPickled()

    @task(key="f.surrogate_result")
    def surrogate_result() -> str:
        return "caf\udce9"

    future = await unpicklable.delay()
    ids = [str(future.task_run_id), *await submit(api, "f.surrogate_result", {})]
    async with trioworker_worker(unpicklable, surrogate_result, add, allow_pickle=True):
        pickled, surrogate = await wait_all(api, ids)
        await assert_worker_still_serves(api)
    assert pickled["state"]["type"] == surrogate["state"]["type"] == "FAILED"
    assert pickled["state"]["message"] == (
        "TypeError: the result of unpicklable cannot be reported: no pickling"
    )
    assert "SystemExit: no pickling" in pickled["state"]["data"]["traceback"]
    assert "the result of surrogate_result cannot be reported" in surrogate["state"]["message"]


BLOCK_SECONDS = 1.0
TIMEOUT_SECONDS = 0.5


@task(key="f.blocks_loop", timeout_seconds=TIMEOUT_SECONDS)
async def blocks_loop() -> str:
    time.sleep(BLOCK_SECONDS)  # noqa: ASYNC251 - the fault under test: the loop is blocked
    return "too late"


@task(key="f.blocks_thread", timeout_seconds=TIMEOUT_SECONDS)
def blocks_thread() -> str:
    time.sleep(BLOCK_SECONDS)
    return "too late"


async def test_a_timeout_holds_for_async_code_that_blocks_the_loop(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    attempts: list[int] = []

    @task(key="f.blocks_once", timeout_seconds=TIMEOUT_SECONDS, retries=1)
    async def blocks_once() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            time.sleep(BLOCK_SECONDS)  # noqa: ASYNC251
        return "in time"

    ids = (
        await submit(api, "f.blocks_loop", {})
        + await submit(api, "f.blocks_thread", {})
        + await submit(api, "f.blocks_once", {})
    )
    async with trioworker_worker(blocks_loop, blocks_thread, blocks_once, add):
        loop, thread, once = await wait_all(api, ids)
        await assert_worker_still_serves(api)
    for run, name in ((loop, "blocks_loop"), (thread, "blocks_thread")):
        assert run["state"]["type"] == "FAILED"
        assert run["state"]["data"]["type"] == "builtins.TimeoutError"
        assert run["state"]["message"] == f"TimeoutError: {name} timed out after 0.5 s"
    assert (once["state"]["type"], once["state"]["data"], once["run_count"]) == ("COMPLETED", "in time", 2)
    history = (await api.get(f"/task_runs/{ids[2]}/history")).json()
    assert [h["message"] for h in history if h["name"] == "AwaitingRetry"] == [
        "retry 1 of 1 in 0 s after TimeoutError: blocks_once timed out after 0.5 s"
    ]


@task(key="f.ctrl_c")
async def ctrl_c() -> str:
    signal.raise_signal(signal.SIGINT)  # as if Ctrl-C came while this code runs
    await trio.lowlevel.checkpoint()
    return "went on"


async def test_a_real_ctrl_c_in_task_code_still_stops_a_worker(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    [run_id] = await submit(api, "f.ctrl_c", {})
    interrupted = False
    with trio.fail_after(20):
        try:
            async with trioworker_worker(ctrl_c):
                await trio.sleep_forever()  # until the interrupt ends the worker
        except* KeyboardInterrupt:
            interrupted = True
    assert interrupted
    run = (await api.get(f"/task_runs/{run_id}")).json()
    assert run["state"]["type"] != "FAILED"  # not the run's fault: it is handed back


async def test_under_serve_a_ctrl_c_stops_the_worker_cleanly(api: httpx.AsyncClient) -> None:
    [run_id] = await submit(api, "f.ctrl_c", {})
    with trio.fail_after(20):
        await serve(ctrl_c, shutdown_grace_seconds=5)
    [run] = await wait_all(api, [run_id])
    assert (run["state"]["type"], run["state"]["data"]) == ("COMPLETED", "went on")


# --------------------------------------------------------------------------- units


def json_size(text: str) -> int:
    return len(orjson.dumps(text)) - 2


@pytest.mark.parametrize(
    "text",
    [
        "x" * HUGE,
        "\x01" * 100_000,  # 6 bytes of JSON each
        "é" * 100_000,  # 2 bytes each
        "🐍" * 100_000,  # 4 bytes each
        '"\\' * 100_000,
        ("caf\udce9" + "\n") * 50_000,
    ],
    ids=["ascii", "control", "latin", "emoji", "escapes", "surrogates"],
)
@pytest.mark.parametrize("limit", [64, 1000, MAX_TEXT_BYTES])
def test_clip_text_bounds_the_json_size_and_says_what_it_cut(text: str, limit: int) -> None:
    clipped = clip_text(text, limit)
    assert json_size(clipped) <= limit
    rendered = text.encode("utf-8", "backslashreplace").decode()
    assert_cut(clipped, len(rendered))
    kept = clipped.rpartition("... [cut ")[0]
    assert rendered.startswith(kept)
    # Cut no earlier than needed: one more character would not have fit.
    assert json_size(rendered[: len(kept) + 1] + CUT_MARKER.format(len(rendered))) > limit


def test_clip_text_keeps_what_fits() -> None:
    assert clip_text("") == ""
    assert clip_text("caf\udce9") == "caf\\udce9"
    exact = "y" * 1000
    assert clip_text(exact, 1000) == exact
    # Room is kept for the longest marker the text could need.
    assert clip_text(exact + "y", 1000).endswith("... [cut 26 characters]")

    class Sneaky(str):
        def encode(self, *args: Any, **kwargs: Any) -> bytes:
            raise SystemExit("no")

    assert type(clip_text(Sneaky("fine"))) is str
    with pytest.raises(ValueError, match="at least 64"):
        clip_text("x", 63)


def caught(kind: str) -> BaseException:
    try:
        raise_fault(kind)
    except BaseException as exc:
        return exc
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", KINDS)
def test_describe_exception_never_raises_and_fits(kind: str) -> None:
    data = describe_exception(caught(kind))
    size = len(orjson.dumps(data))
    assert size <= 3 * MAX_TEXT_BYTES + MAX_TRACEBACK_BYTES + 100
    assert isinstance(data["traceback"], str) and "raise_fault" in data["traceback"]


def test_describe_exception_of_odd_classes() -> None:
    odd = type("Odd", (Exception,), {"__module__": 42})
    odd.__qualname__ = "caf\udce9"
    assert describe_exception(odd("x"))["type"] == "caf\\udce9"
    odd.__module__ = "mod\udce9"
    assert describe_exception(odd("x"))["type"] == "mod\\udce9.caf\\udce9"
    huge_name = type("N" * 100_000, (Exception,), {})
    assert json_size(str(describe_exception(huge_name())["type"])) <= MAX_TEXT_BYTES


async def test_passing_part_tells_trio_cancellation_from_a_tasks_fault() -> None:
    assert passing_part(caught("interrupt")) is None
    assert passing_part(caught("exit")) is None
    foreign = await kept_cancelled()
    assert passing_part(foreign) is None  # nothing cancels us now
    with trio.CancelScope() as scope:  # noqa: ASYNC100 - cancelled, never left through a checkpoint
        scope.cancel()
        assert passing_part(foreign) is foreign
        group = BaseExceptionGroup("g", [SystemExit(), BaseExceptionGroup("inner", [foreign])])
        part = passing_part(group)
        assert isinstance(part, BaseExceptionGroup)
        assert [type(e) for e in part.exceptions] == [BaseExceptionGroup]
        assert part.exceptions[0].exceptions == (foreign,)
        assert passing_part(SystemExit()) is None
    assert scope.cancelled_caught is False  # no checkpoint ran under it


async def test_passing_part_passes_a_real_ctrl_c() -> None:
    assert not trio.lowlevel.currently_ki_protected()
    try:
        signal.raise_signal(signal.SIGINT)  # Trio's handler raises here, in this frame
        await trio.lowlevel.checkpoint()
    except KeyboardInterrupt as exc:
        assert passing_part(exc) is exc
        assert passing_part(BaseExceptionGroup("g", [exc])) is not None
    else:
        raise AssertionError("no KeyboardInterrupt")


def test_a_ctrl_c_that_trio_delivers_passes() -> None:
    """Trio raises a Ctrl-C that came during protected code in its own code."""
    try:
        exec(compile("raise KeyboardInterrupt", "<trio>", "exec"), {"__name__": "trio._core._run"})
    except KeyboardInterrupt as exc:
        assert passing_part(exc) is exc
    else:
        raise AssertionError("no KeyboardInterrupt")


def test_safe_str_never_raises() -> None:
    assert failures.safe_str(StrRaises()) == "<str() failed: builtins.RuntimeError>"
    assert failures.safe_str(StrExits(), repr) == "<repr() failed: builtins.SystemExit>"
    assert failures.exception_line(SystemExit()) == "SystemExit"


def test_the_bounds_the_readme_gives() -> None:
    assert (MAX_TEXT_BYTES, MAX_TRACEBACK_BYTES) == (64 * 1024, 256 * 1024)
    assert MAX_FAILURE_REPORT_BYTES < 1024 * 1024  # "a failure report is under 1 MiB"
    assert MAX_RESULT_BYTES == 8 * 1024 * 1024


# ------------------------------------------------- exceptions too deep or wide to walk


def nested(shape: str, size: int) -> BaseException:
    """An exception ``size`` deep or wide: a group of groups, a ``__cause__`` or
    ``__context__`` chain, a flat group."""
    if shape == "wide":
        return ExceptionGroup("wide", [ValueError(str(i)) for i in range(size)])
    if shape == "group":
        group: Exception = ValueError("leaf")
        for _ in range(size):
            group = ExceptionGroup("g", [group])
        return group
    exc: BaseException = ValueError("leaf")
    for i in range(size):
        if shape == "base_group":
            exc = BaseExceptionGroup("g", [exc])
        else:
            outer = ValueError(f"link {i}")
            setattr(outer, shape, exc)
            exc = outer
    return exc


SHAPES = [
    ("group", 1200),
    ("group", 5000),
    ("base_group", 5000),
    ("__cause__", 5000),
    ("__context__", 5000),
    ("wide", 50_000),
]


@task(key="f.deep_sync")
def deep_sync(shape: str, size: int) -> None:
    raise nested(shape, size)


@task(key="f.deep_async")
async def deep_async(shape: str, size: int) -> None:
    await trio.lowlevel.checkpoint()
    raise nested(shape, size)


@pytest.mark.parametrize("deep_task", [deep_sync, deep_async], ids=["sync", "async"])
async def test_an_exception_too_deep_or_wide_to_walk_fails_its_run_once(
    api: httpx.AsyncClient, trioworker_worker: Make, deep_task: Task[..., Any]
) -> None:
    ids = await submit(api, deep_task.key, *({"shape": s, "size": n} for s, n in SHAPES))
    async with trioworker_worker(deep_task, add) as worker:
        runs = await wait_all(api, ids, seconds=60)
        await assert_worker_still_serves(api)
    assert worker.failed_task_runs[deep_task.key] == len(SHAPES)
    for (shape, size), run in zip(SHAPES, runs, strict=True):
        state = run["state"]
        assert (state["type"], run["run_count"]) == ("FAILED", 1), (shape, size)
        assert_bounded(state)
        assert state["data"]["traceback"], (shape, size)


@pytest.mark.parametrize(("shape", "size"), [*SHAPES, ("group", 100_000)])
def test_walking_a_huge_exception_never_recurses(shape: str, size: int) -> None:
    exc = nested(shape, size)
    assert passing_part(exc) is None
    data = describe_exception(exc)
    assert len(orjson.dumps(data)) <= 3 * MAX_TEXT_BYTES + MAX_TRACEBACK_BYTES + 100


async def test_a_cancelled_deep_in_a_group_still_passes() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as cancelled:
            exc: BaseException = cancelled
            for _ in range(5000):
                exc = BaseExceptionGroup("g", [exc, ValueError("x")] if _ == 0 else [exc])
            assert passing_part(exc) is cancelled
            shallow = BaseExceptionGroup("g", [cancelled, ValueError("x")])
            part = passing_part(shallow)
            assert isinstance(part, BaseExceptionGroup) and part.exceptions == (cancelled,)
            raise
    assert scope.cancelled_caught


# ------------------------------------------- callables that would return an unawaited coroutine


async def async_condition(t: object, run: TaskRun, exc: BaseException) -> bool:
    return False


class AsyncCall:
    async def __call__(self, t: object, run: TaskRun, exc: BaseException) -> bool:
        return False


def sync_task() -> None:
    pass


def gen_task() -> Any:
    yield 1


async def agen_task() -> Any:
    yield 1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"retry_condition_fn": async_condition}, "retry_condition_fn must be a plain function"),
        ({"retry_condition_fn": AsyncCall()}, "retry_condition_fn must be a plain function"),
        ({"retry_condition_fn": functools.partial(async_condition)}, "retry_condition_fn must be a plain"),
        ({"retry_condition_fn": True}, "retry_condition_fn must be callable, got bool"),
        ({"retry_delay_seconds": lambda n: n}, "retry_delay_seconds must be a number or a list"),
        ({"retry_delay_seconds": "5"}, "retry_delay_seconds must be a number or a list"),
        ({"retry_delay_seconds": [1, "2"]}, "retry_delay_seconds must be a number or a list"),
        ({"retry_delay_seconds": True}, "retry_delay_seconds must be a number or a list"),
    ],
)
def test_task_options_that_cannot_work_are_refused_at_definition(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=re.escape(message)):
        task(key="f.refused", retries=1, **options)(sync_task)


@pytest.mark.parametrize("fn", [gen_task, agen_task])
def test_generator_functions_are_refused_as_tasks(fn: Callable[..., Any]) -> None:
    with pytest.raises(TypeError, match="not a generator"):
        task(fn)


async def test_callables_that_return_a_coroutine_fail_the_run_clearly(
    api: httpx.AsyncClient, trioworker_worker: Make, recwarn: pytest.WarningsRecorder
) -> None:
    def condition_coroutine(t: object, run: TaskRun, exc: BaseException) -> Any:
        return async_condition(t, run, exc)  # a plain function handing back a coroutine

    @task(key="f.condition_coroutine", retries=3, retry_condition_fn=condition_coroutine)
    async def condition_is_coroutine() -> None:
        raise ValueError("not retried")

    async def coroutine() -> int:
        return 1

    @task(key="f.returns_coroutine")
    def returns_coroutine() -> Any:
        return coroutine()

    class Adder:
        async def __call__(self, a: int, b: int) -> int:
            await trio.lowlevel.checkpoint()
            return a + b

    callable_task = task(key="f.callable_object")(Adder())
    assert callable_task.is_async
    ids = [
        *await submit(api, "f.condition_coroutine", {}),
        *await submit(api, "f.returns_coroutine", {}),
        *await submit(api, "f.callable_object", {"a": 1, "b": 2}),
    ]
    async with trioworker_worker(condition_is_coroutine, returns_coroutine, callable_task):
        condition, returned, called = await wait_all(api, ids)
    assert (condition["state"]["type"], condition["run_count"]) == ("FAILED", 1)
    assert condition["state"]["message"] == "ValueError: not retried"
    assert returned["state"]["type"] == "FAILED"
    assert returned["state"]["message"] == (
        "TypeError: returns_coroutine returned a coroutine: make the task function `async def`"
    )
    assert called["state"]["data"] == 3
    assert not [w for w in recwarn if "never awaited" in str(w.message)]

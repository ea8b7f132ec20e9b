"""The engine on its own: what it proposes, and what it does with the answers."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import trio

from trioworker.models import SetStateResult, SetStateStatus, State, StateType, TaskRun, make_state
from trioworker.tasks import task
from trioworker.worker import engine
from trioworker.worker.engine import Outcome


class Answers:
    """A reporter that answers every proposal with a fixed status, and records them.

    Queued reports are answered when the test calls :meth:`answer_queued`.
    """

    def __init__(self, status: SetStateStatus) -> None:
        self.status = status
        self.proposed: list[StateType] = []
        self.waiting: list[Callable[[SetStateResult], None]] = []

    def answer(self) -> SetStateResult:
        return SetStateResult(self.status, make_state(StateType.CANCELLED), "cancelled meanwhile")

    async def report(self, run_id: uuid.UUID, state: State) -> SetStateResult:
        self.proposed.append(state.type)
        await trio.lowlevel.checkpoint()
        return self.answer()

    def queue(self, run_id: uuid.UUID, state: State, on_answer: Callable[[SetStateResult], None]) -> None:
        self.proposed.append(state.type)
        self.waiting.append(on_answer)

    def answer_queued(self) -> None:
        waiting, self.waiting = self.waiting, []
        for on_answer in waiting:
            on_answer(self.answer())


def a_run(key: str) -> TaskRun:
    return TaskRun(
        id=uuid.uuid4(), task_key=key, name=key, state=make_state(StateType.PENDING), parameters={}
    )


async def test_a_refused_optimistic_start_cancels_the_attempt() -> None:
    started, cancelled = trio.Event(), trio.Event()

    @task(key="e.wait")
    async def wait() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    reporter = Answers(SetStateStatus.ABORT)
    outcomes: list[Outcome] = []

    async def execute() -> None:
        outcomes.append(
            await engine.execute(
                wait,
                a_run("e.wait"),
                reporter,
                scope=trio.CancelScope(),
                thread_limiter=trio.CapacityLimiter(1),
                queue_report=reporter.queue,
            )
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(execute)
        await started.wait()  # the attempt runs before the answer comes
        reporter.answer_queued()
    [outcome] = outcomes
    assert outcome is Outcome.REFUSED
    assert started.is_set() and cancelled.is_set()
    assert reporter.proposed == [StateType.RUNNING]  # and nothing after the refusal


async def test_a_refused_careful_start_never_calls_the_task() -> None:
    calls: list[int] = []

    @task(key="e.count")
    def count() -> None:
        calls.append(1)

    reporter = Answers(SetStateStatus.REJECT)
    outcome = await engine.execute(
        count, a_run("e.count"), reporter, scope=trio.CancelScope(), thread_limiter=trio.CapacityLimiter(1)
    )
    assert outcome is Outcome.REFUSED
    assert calls == []


async def test_a_refusal_after_the_attempt_ended_changes_nothing() -> None:
    @task(key="e.quick")
    async def quick() -> int:
        return 7

    reporter = Answers(SetStateStatus.ABORT)
    outcome = await engine.execute(
        quick,
        a_run("e.quick"),
        reporter,
        scope=trio.CancelScope(),
        thread_limiter=trio.CapacityLimiter(1),
        queue_report=reporter.queue,
    )
    assert outcome is Outcome.COMPLETED
    assert reporter.proposed == [StateType.RUNNING, StateType.COMPLETED]
    reporter.answer_queued()  # the late answer to RUNNING: ignored

"""Caching end to end (Prefect's ``cache_policy``, ``cache_key_fn``, ``cache_expiration``,
``refresh_cache``): a real server on each kind of store, real workers. A run answered from
the cache ends COMPLETED with the name ``Cached`` and the stored result, and its function
is not called; runs of one key submitted at once run the function once."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import trioworker
from trioworker.cache_policies import INPUTS, TASK_SOURCE, CacheContext
from trioworker.models import StateType
from trioworker.server import RunningServer
from trioworker.testing import ServerControl
from trioworker.worker.task_worker import TaskWorker

from .helpers import history

pytestmark = pytest.mark.every_store

Make = Callable[..., TaskWorker]


def counting(key: str, **options: Any) -> tuple[trioworker.Task[[int], int], list[int]]:
    """A task that squares its argument and records each call, with these options."""
    calls: list[int] = []

    @trioworker.task(key=key, **options)
    def square(n: int) -> int:
        calls.append(n)
        return n * n

    return square, calls


async def test_the_same_inputs_run_once_and_later_runs_get_the_cached_result(
    trioworker_worker: Make, api: httpx.AsyncClient
) -> None:
    square, calls = counting("c.square", cache_policy=INPUTS)
    async with trioworker_worker(square):
        first = await square.delay(3)
        assert await first.result(timeout=10) == 9
    # No worker now: the server answers from the cache at once.
    again = await square.delay(3)
    assert await again.result(timeout=10) == 9
    state = await again.get_state()
    assert (state.type, state.name) == (StateType.COMPLETED, "Cached")
    assert state.state_details.cache_key is not None
    assert await history(api, str(again.task_run_id)) == [("SCHEDULED", "Scheduled"), ("COMPLETED", "Cached")]
    other = await square.delay(4)
    assert (await other.get_state()).type is StateType.SCHEDULED  # other inputs: it waits for a worker
    async with trioworker_worker(square):
        assert await other.result(timeout=10) == 16
    assert calls == [3, 4]


async def test_runs_of_one_key_submitted_at_once_run_the_function_once(trioworker_worker: Make) -> None:
    entered = trio.Event()
    release = trio.Event()
    calls: list[str] = []

    @trioworker.task(key="c.slow", cache_policy=INPUTS)
    async def slow(text: str) -> str:
        calls.append(text)
        entered.set()
        await release.wait()
        return text.upper()

    async with trioworker_worker(slow, limit=10):
        futures = await slow.map(["a"] * 5)
        with trio.fail_after(10):
            await entered.wait()
        late = await slow.delay("a")  # while the first runs: it waits for it too
        waiting = await late.get_state()
        assert waiting.type is StateType.SCHEDULED
        assert waiting.state_details.cache_owner == futures[0].task_run_id
        release.set()
        results = [await f.result(timeout=10) for f in [*futures, late]]
    assert results == ["A"] * 6 and calls == ["a"]
    names = [(await f.get_state()).name for f in [*futures, late]]
    assert names == ["Completed"] + ["Cached"] * 5


async def test_when_the_run_computing_a_key_fails_another_computes_it(trioworker_worker: Make) -> None:
    release = trio.Event()
    calls: list[int] = []

    @trioworker.task(key="c.flaky", cache_policy=INPUTS)
    async def flaky(n: int) -> int:
        calls.append(n)
        if len(calls) == 1:
            await release.wait()
            raise ConnectionError("the first call fails")
        return n + 1

    futures = await flaky.map([1, 1, 1])
    async with trioworker_worker(flaky):
        release.set()
        with pytest.raises(ConnectionError):
            await futures[0].result(timeout=10)
        assert [await f.result(timeout=10) for f in futures[1:]] == [2, 2]
    assert calls == [1, 1]  # the failure cached nothing; the next run computed it, once
    assert [(await f.get_state()).name for f in futures] == ["Failed", "Completed", "Cached"]


async def test_a_cached_result_expires(
    trioworker_autojump_clock: trio.testing.MockClock, trioworker_worker: Make
) -> None:
    square, calls = counting("c.expiring", cache_policy=INPUTS, cache_expiration=timedelta(hours=1))
    async with trioworker_worker(square):
        assert await (await square.delay(2)).result(timeout=10) == 4
    await trio.sleep(3000)  # the server's clock moves with Trio's
    reused = await square.delay(2)
    assert (await reused.get_state()).name == "Cached"
    await trio.sleep(700)  # an hour and a bit after the first completed
    expired = await square.delay(2)
    assert (await expired.get_state()).type is StateType.SCHEDULED
    async with trioworker_worker(square):
        assert await expired.result(timeout=10) == 4
    assert calls == [2, 2]


async def test_refresh_cache_runs_again_and_replaces_the_cached_result(trioworker_worker: Make) -> None:
    results = iter(["old", "new"])
    calls: list[str] = []

    @trioworker.task(key="c.fetch", cache_policy=INPUTS + TASK_SOURCE)
    def fetch(url: str) -> str:
        calls.append(url)
        return next(results)

    async with trioworker_worker(fetch):
        assert await (await fetch.delay("u")).result(timeout=10) == "old"
        assert await (await fetch.with_options(refresh_cache=True).delay("u")).result(timeout=10) == "new"
        assert await (await fetch.delay("u")).result(timeout=10) == "new"
    assert calls == ["u", "u"]


async def test_a_cache_key_fn_keys_runs_as_it_says(trioworker_worker: Make) -> None:
    seen: list[CacheContext] = []

    def by_customer(context: CacheContext, parameters: dict[str, Any]) -> str | None:
        seen.append(context)
        return None if parameters["customer"] == "nobody" else f"customer-{parameters['customer']}"

    calls: list[tuple[str, int]] = []

    @trioworker.task(key="c.report", cache_key_fn=by_customer)
    def report(customer: str, attempt: int = 0) -> str:
        calls.append((customer, attempt))
        return f"report of {customer}"

    async with trioworker_worker(report):
        assert await (await report.delay("ann", 1)).result(timeout=10) == "report of ann"
        assert (
            await (await report.delay("ann", 2)).result(timeout=10) == "report of ann"
        )  # the key ignores it
        assert await (await report.delay("nobody")).result(timeout=10) == "report of nobody"
        assert await (await report.delay("nobody")).result(timeout=10) == "report of nobody"  # no key
    assert calls == [("ann", 1), ("nobody", 0), ("nobody", 0)]
    assert seen[0].task is report


async def test_a_run_waiting_for_a_key_survives_a_server_restart(
    trioworker_worker: Make, trioworker_server_control: ServerControl
) -> None:
    square, calls = counting("c.restart", cache_policy=INPUTS)
    first, second = await square.map([5, 5])
    assert (await second.get_state()).state_details.cache_owner == first.task_run_id
    await trioworker_server_control.restart()
    async with trioworker_worker(square):
        assert [await f.result(timeout=10) for f in (first, second)] == [25, 25]
    assert calls == [5]
    assert (await second.get_state()).name == "Cached"


async def test_a_bad_cache_key_is_refused_at_submit(trioworker_server: RunningServer) -> None:
    @trioworker.task(key="c.bad", cache_key_fn=lambda context, parameters: parameters["key"])
    def keyed(key: Any) -> None:
        return None

    with pytest.raises(ValueError, match=r"task c\.bad: a cache key must be a non-empty string"):
        await keyed.delay("")
    with pytest.raises(TypeError, match=r"cache_key_fn of c\.bad returned int, not a str or None"):
        await keyed.delay(5)
    async with httpx.AsyncClient(base_url=trioworker_server.api_url) as client:
        refused = await client.post("/task_runs", json={"task_key": "c.bad", "cache_key": "x\x00"})
        assert refused.status_code == 422 and "cache_key" in refused.json()["detail"]
        refused = await client.post(
            "/task_runs", json={"task_key": "c.bad", "cache_key": "x", "cache_expiration": -1}
        )
        assert refused.status_code == 422 and "cache_expiration" in refused.json()["detail"]
        assert (await client.get("/task_runs")).json() == []

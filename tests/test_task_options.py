"""Task options from Prefect, end to end: ``task_run_name`` (a template over the
parameters, or a function), ``tags`` (merged with the ``tags()`` context; runs listed by
tag through the API and ``trioworker runs --tag``), and ``retry_jitter_factor``."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import trio
import trio.testing

import trioworker
from trioworker.models import StateType
from trioworker.server import RunningServer
from trioworker.tasks import jittered
from trioworker.worker.task_worker import TaskWorker

from .test_cli_tools import Cli, make_cli

Make = Callable[..., TaskWorker]


@pytest.fixture
def cli(trioworker_server: RunningServer) -> Cli:
    return make_cli(trioworker_server.api_url)


# --------------------------------------------------------------------------- run names


@trioworker.task(key="o.invoice", task_run_name="{customer}-{day}")
def invoice(customer: str, day: int = 1, *, cents: int = 0) -> int:
    return cents


async def test_runs_are_named_by_the_template_over_their_arguments(
    trioworker_worker: Make, api: httpx.AsyncClient, cli: Cli
) -> None:
    named = await invoice.delay("ann", cents=5)  # the default fills {day}
    assert named.task_run is not None and named.task_run.name == "ann-1"
    given = await invoice.apply_async(["bob", 2], name="by hand")  # a name given wins
    assert given.task_run is not None and given.task_run.name == "by hand"
    async with trioworker_worker(invoice):
        run = await named.wait(timeout=10)
    assert run is not None and run.name == "ann-1"
    assert (await api.get(f"/task_runs/{named.task_run_id}")).json()["name"] == "ann-1"
    listed = await cli("runs")
    assert (
        listed.returncode == 0 and "ann-1" in listed.stdout.decode() and "by hand" in listed.stdout.decode()
    )
    shown = await cli("run", str(named.task_run_id))
    assert shown.returncode == 0 and "ann-1" in shown.stdout.decode()


async def test_a_run_name_function_with_or_without_parameters(trioworker_server: RunningServer) -> None:
    @trioworker.task(key="o.fixed", task_run_name=lambda: "nightly")
    def fixed(n: int) -> int:
        return n

    def from_parameters(parameters: dict[str, Any]) -> str:
        return f"size-{parameters['n'] * 2}"

    @trioworker.task(key="o.sized", task_run_name=from_parameters)
    def sized(n: int) -> int:
        return n

    assert (await fixed.delay(1)).task_run.name == "nightly"  # type: ignore[union-attr]
    assert (await sized.delay(4)).task_run.name == "size-8"  # type: ignore[union-attr]
    blocking = await trio.to_thread.run_sync(sized.sync.delay, 5)  # from plain code: the same name
    assert blocking.task_run is not None and blocking.task_run.name == "size-10"


async def test_a_bad_run_name_is_refused_at_decoration_or_at_submit(api: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError, match=r"\{customr\} is not a parameter \(the parameters are customer\)"):
        trioworker.task(task_run_name="{customr}")(lambda customer: customer)
    with pytest.raises(ValueError, match=r"name the parameter in each field, as \{customer\}"):
        trioworker.task(task_run_name="run {}")(lambda customer: customer)
    with pytest.raises(ValueError, match=r"task_run_name '\{a' is not a template str\.format reads"):
        trioworker.task(task_run_name="{a")(lambda a: a)
    with pytest.raises(TypeError, match="task_run_name must be a str or a function, got int"):
        trioworker.task(task_run_name=5)(lambda a: a)  # type: ignore[call-overload]

    @trioworker.task(key="o.count", task_run_name="{n:d} items")
    def count(n: Any) -> None:
        return None

    with pytest.raises(
        ValueError,
        match=r"task o\.count: task_run_name '\{n:d\} items' cannot be formatted with the arguments",
    ):
        await count.delay("three")

    @trioworker.task(key="o.nameless", task_run_name=lambda: 5)  # type: ignore[arg-type]
    def nameless() -> None:
        return None

    with pytest.raises(TypeError, match=r"task o\.nameless: task_run_name returned 5, not a non-empty str"):
        await nameless.delay()
    assert (await count.delay(3)).task_run.name == "3 items"  # type: ignore[union-attr]
    assert [run["name"] for run in (await api.get("/task_runs")).json()] == ["3 items"]  # nothing else


# --------------------------------------------------------------------------- tags


@trioworker.task(key="o.tagged", tags=["billing", "eu"])
async def tagged(n: int) -> tuple[str, ...]:
    run = trioworker.current_run()
    assert run is not None
    return run.tags


async def test_task_tags_follow_the_tags_of_the_context(trioworker_worker: Make) -> None:
    with trioworker.tags("nightly", "eu"):
        future = await tagged.delay(1)
    assert future.task_run is not None and future.task_run.tags == ["nightly", "eu", "billing"]
    plain = await tagged.delay(2)
    assert plain.task_run is not None and plain.task_run.tags == ["billing", "eu"]
    async with trioworker_worker(tagged):
        assert await future.result(timeout=10) == ("nightly", "eu", "billing")  # the run sees them
    with pytest.raises(TypeError, match="tags are non-empty strings without NUL"):
        trioworker.task(tags=[""])(lambda: None)
    with pytest.raises(TypeError, match="tags must be a list of strings, got str"):
        trioworker.task(tags="billing")(lambda: None)


async def test_runs_are_listed_by_tag_in_the_api_and_the_command_line(
    api: httpx.AsyncClient, cli: Cli
) -> None:
    with trioworker.tags("nightly"):
        nightly = await tagged.delay(1)
    other = await tagged.delay(2)

    async def listed(*tags: str) -> list[str]:
        response = await api.get("/task_runs", params={"tag": list(tags)})
        assert response.status_code == 200, response.text
        return [run["id"] for run in response.json()]

    ids = [str(nightly.task_run_id), str(other.task_run_id)]
    assert await listed("billing") == ids
    assert await listed("billing", "nightly") == ids[:1]
    assert await listed("nightly", "nobody") == []
    refused = await api.get("/task_runs", params={"tag": ["a", ""]})
    assert refused.status_code == 422 and "tag must be a non-empty tag" in refused.json()["detail"]
    refused = await api.get("/task_runs", params={"tag": [str(n) for n in range(21)]})
    assert refused.status_code == 422

    result = await cli("runs", "--tag", "nightly", "--tag", "billing", "--json")
    assert result.returncode == 0, result.stderr
    assert [run["id"] for run in json.loads(result.stdout)] == ids[:1]
    table = await cli("runs", "--tag", "nobody")
    assert table.returncode == 0 and table.stdout.decode().startswith("No runs match.")


# --------------------------------------------------------------------------- retry jitter


def test_jitter_spreads_a_delay_as_prefect_does() -> None:
    rng = random.Random(7)
    draws = [jittered(10.0, 0.5, rng) for _ in range(20_000)]
    low = 10.0 * math.log2(2**1.5 / (2**1.5 - 1))  # Prefect's lower clamp for a factor of 0.5
    assert low <= min(draws) < low + 0.1 and 15.0 - 0.1 < max(draws) <= 15.0
    assert abs(sum(draws) / len(draws) - 10.0) < 0.2  # about the delay on average
    assert jittered(10.0, None) == jittered(10.0, 0) == 10.0
    assert jittered(0.0, 0.5) == 0.0
    assert 0 <= jittered(1.0, 100.0, rng) <= 101.0  # a large factor: no lower bound
    with pytest.raises(ValueError, match="retry_jitter_factor must be a number >= 0, got -1"):
        trioworker.task(retry_jitter_factor=-1)(lambda: None)


async def test_retries_wait_a_jittered_delay(
    trioworker_autojump_clock: trio.testing.MockClock, trioworker_worker: Make, api: httpx.AsyncClient
) -> None:
    attempts: list[float] = []

    @trioworker.task(key="o.jitter", retries=3, retry_delay_seconds=100, retry_jitter_factor=1.0)
    def flaky() -> None:
        attempts.append(trio.from_thread.run_sync(trio.current_time))
        raise ConnectionError("down")

    async with trioworker_worker(flaky):
        future = await flaky.delay()
        assert await future.result(timeout=3600, raise_on_failure=False) is not None
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    low = 100 * math.log2(4 / 3)  # Prefect's lower clamp for a factor of 1
    assert len(gaps) == 3 and all(low - 1 <= gap <= 200 + 1 for gap in gaps), gaps
    assert len({round(gap) for gap in gaps}) > 1  # spread, not one fixed delay
    history = (await api.get(f"/task_runs/{future.task_run_id}/history")).json()
    assert [h["name"] for h in history].count("AwaitingRetry") == 3
    assert (await future.get_state()).type is StateType.FAILED


# --------------------------------------------------------------------------- cache policies


def test_cache_policies_combine_and_leave_parameters_out_as_prefects_do() -> None:
    from trioworker.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CacheContext

    @trioworker.task(key="o.keyed")
    def keyed(a: int, b: dict[str, int]) -> None:
        return None

    def key(policy: Any, a: int, b: dict[str, int]) -> str | None:
        sent = {"a": a, "b": b}
        result: str | None = policy.compute_key(CacheContext(keyed, sent), sent)
        return result

    assert key(INPUTS, 1, {"x": 1, "y": 2}) == key(INPUTS, 1, {"y": 2, "x": 1})  # key order does not count
    assert key(INPUTS, 1, {"x": 1}) != key(INPUTS, 2, {"x": 1})
    assert key(INPUTS - "a", 1, {"x": 1}) == key(INPUTS - "a", 2, {"x": 1})
    assert key(INPUTS - "a" - "b", 1, {}) is None  # no inputs left: no key, as in Prefect
    assert key(NO_CACHE, 1, {}) is None and NO_CACHE + INPUTS == INPUTS
    both = INPUTS + TASK_SOURCE
    assert key(both, 1, {}) not in (None, key(INPUTS, 1, {}), key(TASK_SOURCE, 1, {}))
    assert key(both - "a", 1, {}) == key(both - "a", 2, {})
    with pytest.raises(TypeError, match="only a parameter's name can be left out"):
        INPUTS - 3  # type: ignore[operator]

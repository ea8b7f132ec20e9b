"""The pytest plugin (``trioworker.testing``) as a user's test suite meets it.

Each test writes a small test module into a fresh directory and runs pytest on it in a
subprocess, configured as a user's project would be: pytest-trio's ``trio_mode = true``,
and the plugin found through its ``pytest11`` entry point (nothing names it).
"""

from __future__ import annotations

import textwrap

import pytest

pytest_plugins = ["pytester"]

#: Real seconds an inner pytest run may take before it counts as hung.
INNER_TIMEOUT = 60

INI = """\
[pytest]
trio_mode = true
addopts = -p no:cacheprovider
filterwarnings = error
"""

TASKS = """
import time

import trio

import trioworker


@trioworker.task(key="plugin.say")
async def say(text: str) -> str:
    return f"said {text}"


#: Set by a test; the ``hang`` task sets it once it runs (same process, same Trio run).
running: dict[str, trio.Event] = {}


@trioworker.task(key="plugin.hang")
async def hang() -> None:
    running["hang"].set()
    await trio.sleep_forever()


@trioworker.task(key="plugin.flaky", retries=1, retry_delay_seconds=60)
def flaky() -> int:
    run = trioworker.current_run()
    assert run is not None
    if run.attempt == 1:
        raise ConnectionError("the first attempt fails")
    return run.attempt
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A user's project: pytest-trio in trio mode, and a module of tasks."""
    pytester.makeini(INI)
    pytester.makepyfile(plugin_tasks=TASKS)
    return pytester


def run_inner(project: pytest.Pytester, source: str) -> pytest.RunResult:
    project.makepyfile(test_inner=textwrap.dedent(source))
    return project.runpytest_subprocess("-v", timeout=INNER_TIMEOUT)


def test_server_fixture_points_the_environment_at_it_and_restores_it(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOWORKER_API_URL", "http://outer.invalid:9/api")
    monkeypatch.setenv("TRIOWORKER_API_KEY", "outer-key")
    monkeypatch.setenv("TRIOWORKER_HOME", "/outer/home")
    result = run_inner(
        project,
        """
        import os
        from pathlib import Path

        import httpx

        import trioworker
        from trioworker.server import RunningServer


        async def test_a_server_runs_for_the_test(trioworker_server: RunningServer, tmp_path: Path) -> None:
            assert os.environ["TRIOWORKER_API_URL"] == trioworker_server.api_url
            assert trioworker_server.api_url == trioworker_server.url + "/api"
            assert trioworker_server.url.startswith("http://127.0.0.1:")
            assert "TRIOWORKER_API_KEY" not in os.environ
            assert os.environ["TRIOWORKER_HOME"] == str(tmp_path)
            assert (tmp_path / "trioworker.db").exists()
            async with httpx.AsyncClient() as http:
                health = (await http.get(trioworker_server.api_url + "/health")).json()
            assert health["status"] == "ok"
            async with trioworker.TaskRunClient() as client:  # reads TRIOWORKER_API_URL
                assert (await client.health())["status"] == "ok"


        def test_the_environment_is_restored_after_it() -> None:
            assert os.environ["TRIOWORKER_API_URL"] == "http://outer.invalid:9/api"
            assert os.environ["TRIOWORKER_API_KEY"] == "outer-key"
            assert os.environ["TRIOWORKER_HOME"] == "/outer/home"
        """,
    )
    result.assert_outcomes(passed=2)


def test_worker_fixture_runs_a_real_worker_and_stops_it(project: pytest.Pytester) -> None:
    result = run_inner(
        project,
        """
        import trio

        import trioworker
        from plugin_tasks import hang, running, say


        async def test_a_worker_completes_a_run(trioworker_worker) -> None:
            future = await say.delay("hi")
            async with trioworker_worker(say, limit=5) as worker:
                assert isinstance(worker, trioworker.TaskWorker)
                assert worker.limit == 5 and worker.started and not worker.stopping
                assert await future.result(timeout=10) == "said hi"
            assert worker.stopping
            assert worker.finished_task_runs == {"plugin.say": 1}


        async def test_leaving_the_block_with_a_run_in_flight_does_not_hang(
            trioworker_worker, trioworker_autojump_clock
        ) -> None:
            running["hang"] = trio.Event()
            future = await hang.delay()
            async with trioworker_worker(hang) as worker:
                with trio.fail_after(10):
                    await running["hang"].wait()
                assert worker.current_tasks == 1
                stopping = trio.current_time()
            # The run was cancelled after the fixture's grace period of 5 s of the mock clock
            # (the inner run's timeout bounds the real time) and went back to the queue.
            assert trio.current_time() - stopping >= 5
            assert worker.current_tasks == 0
            state = await future.get_state()
            assert (state.type.value, state.name) == ("SCHEDULED", "Redelivered")
        """,
    )
    result.assert_outcomes(passed=2)


def test_server_control_restarts_the_server_on_the_same_file_and_port(project: pytest.Pytester) -> None:
    result = run_inner(
        project,
        """
        from plugin_tasks import say


        async def test_restart(trioworker_server, trioworker_server_control, trioworker_worker) -> None:
            queued = await say.delay("queued before the restart")
            restarted = await trioworker_server_control.restart()
            assert restarted.url == trioworker_server.url
            assert trioworker_server_control.running is restarted
            async with trioworker_worker(say):
                assert await queued.result(timeout=10) == "said queued before the restart"
                # The worker reconnects across a second restart.
                await trioworker_server_control.restart()
                after = await say.delay("after")
                assert await after.result(timeout=10) == "said after"


        async def test_stop_then_start(trioworker_server, trioworker_server_control) -> None:
            queued = await say.delay("kept")
            await trioworker_server_control.stop()
            assert trioworker_server_control.running is None
            await trioworker_server_control.start(port=int(trioworker_server.url.rsplit(":", 1)[1]))
            state = await queued.get_state()
            assert state.type.value == "SCHEDULED"
        """,
    )
    result.assert_outcomes(passed=2)


def test_autojump_clock_moves_retry_delays_along(project: pytest.Pytester) -> None:
    result = run_inner(
        project,
        """
        import trio

        from plugin_tasks import flaky


        async def test_a_60_second_retry_delay_takes_no_real_minute(
            trioworker_autojump_clock, trioworker_worker
        ) -> None:
            assert trio.lowlevel.current_clock() is trioworker_autojump_clock
            start = trio.current_time()
            future = await flaky.delay()
            async with trioworker_worker(flaky):
                assert await future.result(timeout=600) == 2  # mock seconds
            # The retry waited its minute on the mock clock; the inner run's timeout bounds
            # the real time.
            assert trio.current_time() - start >= 59.9  # the server keeps microseconds
        """,
    )
    result.assert_outcomes(passed=1)

"""The examples in ``examples/``, end to end against the real in-process server and worker."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from quart.typing import TestClientProtocol as QuartClient

import trioworker
from examples.tasks import Size, make_thumbnails, resize_image
from examples.webapp import app
from trioworker import TaskWorker
from trioworker.server import RunningServer

Make = Callable[..., TaskWorker]

ROOT = Path(__file__).resolve().parents[1]
#: Real seconds any single step may take before the test fails instead of hanging.
STEP_SECONDS = 20


@pytest.fixture
def client() -> QuartClient:
    return app.test_client()


async def wait_for_run(run_id: str) -> None:
    """Until the run ended (one long-poll; no sleeping)."""
    run = await trioworker.TaskRunFuture(uuid.UUID(run_id)).wait(timeout=STEP_SECONDS)
    assert run is not None and run.state.is_terminal, run


async def post_job(client: QuartClient, body: Any) -> tuple[int, dict[str, Any]]:
    response = await client.post("/jobs", json=body)
    return response.status_code, await response.get_json()


async def get_job(client: QuartClient, run_id: str) -> tuple[int, dict[str, Any]]:
    response = await client.get(f"/jobs/{run_id}")
    return response.status_code, await response.get_json()


# --------------------------------------------------------------------------- the tasks


async def test_the_example_tasks_run_on_a_worker(trioworker_worker: Make) -> None:
    async with trioworker_worker(resize_image, make_thumbnails):
        future = await resize_image.delay(4000, 3000)
        assert await future.result(timeout=STEP_SECONDS) == Size(256, 192)
        thumbs = await make_thumbnails.delay([Size(100, 50), Size(10, 1000)], max_side=20)
        assert await thumbs.result(timeout=STEP_SECONDS) == [Size(20, 10), Size(1, 20)]


async def test_bad_input_fails_without_retries(trioworker_worker: Make) -> None:
    async with trioworker_worker(resize_image):
        future = await resize_image.delay(0, 10)
        with pytest.raises(ValueError, match=r"not an image size: 0x10"):
            await future.result(timeout=STEP_SECONDS)
    assert future.task_run is not None and future.task_run.state.type.value == "FAILED"


# --------------------------------------------------------------------------- the web app


async def test_webapp_starts_a_job_and_reports_its_result(
    client: QuartClient, trioworker_worker: Make
) -> None:
    status, body = await post_job(client, {"task": "resize_image", "args": {"width": 4000, "height": 3000}})
    assert status == 202
    assert body == {"id": body["id"], "state": "SCHEDULED"}
    run_id = body["id"]

    # No worker yet: the job waits in the queue, without a result.
    assert await get_job(client, run_id) == (200, {"id": run_id, "state": "SCHEDULED"})

    async with trioworker_worker(resize_image, make_thumbnails):
        await wait_for_run(run_id)
    assert await get_job(client, run_id) == (
        200,
        {"id": run_id, "state": "COMPLETED", "result": {"width": 256, "height": 192}},
    )


async def test_webapp_runs_the_async_task_that_fans_out(client: QuartClient, trioworker_worker: Make) -> None:
    sizes = [{"width": 800, "height": 600}, {"width": 600, "height": 800}]
    async with trioworker_worker(resize_image, make_thumbnails):
        status, body = await post_job(
            client, {"task": "make_thumbnails", "args": {"sizes": sizes, "max_side": 64}}
        )
        assert status == 202
        await wait_for_run(body["id"])
    status, job = await get_job(client, body["id"])
    assert status == 200
    assert job["state"] == "COMPLETED"
    assert job["result"] == [{"width": 64, "height": 48}, {"width": 48, "height": 64}]


async def test_webapp_reports_a_failed_job(client: QuartClient, trioworker_worker: Make) -> None:
    async with trioworker_worker(resize_image):
        status, body = await post_job(client, {"task": "resize_image", "args": {"width": 0, "height": 10}})
        assert status == 202
        await wait_for_run(body["id"])
    status, job = await get_job(client, body["id"])
    assert (status, job["state"]) == (200, "FAILED")
    assert job["error"] == "ValueError: not an image size: 0x10"
    assert "result" not in job


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"task": "rm -rf"}, "expected {'task': one of ['make_thumbnails', 'resize_image']"),
        (["resize_image"], "expected {'task'"),
        ({"task": "resize_image", "args": {"width": 1}}, "missing a required argument: 'height'"),
        ({"task": "resize_image", "args": {"w": 1, "h": 2}}, "missing a required argument: 'width'"),
    ],
)
async def test_webapp_refuses_bad_jobs_and_submits_nothing(
    client: QuartClient, trioworker_server: RunningServer, body: Any, detail: str
) -> None:
    status, answer = await post_job(client, body)
    assert status == 400
    assert detail in answer["detail"]
    async with trioworker.TaskRunClient(trioworker_server.api_url) as api:
        assert await api.read_task_runs() == []


async def test_webapp_unknown_job_is_404(client: QuartClient, trioworker_server: RunningServer) -> None:
    run_id = uuid.uuid4()
    assert await get_job(client, str(run_id)) == (404, {"detail": f"no job {run_id}"})
    response = await client.get("/jobs/not-a-uuid")
    assert response.status_code == 404


async def test_webapp_answers_503_while_the_server_is_unreachable(
    client: QuartClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        monkeypatch.setenv("TRIOWORKER_API_URL", f"http://127.0.0.1:{sock.getsockname()[1]}/api")
        status, answer = await post_job(client, {"task": "resize_image", "args": {"width": 1, "height": 1}})
        assert status == 503
        assert "cannot reach the trioworker server" in answer["detail"]
        assert (await get_job(client, str(uuid.uuid4())))[0] == 503


async def read_until(stream: trio.abc.ReceiveStream, pattern: str) -> tuple[re.Match[str], str]:
    """Read ``stream`` until ``pattern`` matches what was read; returns the match and the text."""
    text = ""
    with trio.fail_after(STEP_SECONDS):
        while (match := re.search(pattern, text)) is None:
            chunk = await stream.receive_some()
            if not chunk:
                raise AssertionError(f"stream ended before {pattern!r} showed; it said:\n{text}")
            text += chunk.decode(errors="replace")
    return match, text


@asynccontextmanager
async def running(command: list[str], **options: Any) -> AsyncIterator[trio.Process]:
    """A subprocess for the block; SIGTERM (then SIGKILL) at its end."""
    async with trio.open_nursery() as nursery:
        process: trio.Process = await nursery.start(
            partial(trio.run_process, command, check=False, deliver_cancel=_terminate, **options)
        )
        try:
            yield process
        finally:
            nursery.cancel_scope.cancel()


async def _terminate(process: trio.Process) -> None:
    process.send_signal(signal.SIGTERM)
    with trio.move_on_after(STEP_SECONDS):
        await process.wait()
        return
    process.kill()


async def test_webapp_served_by_hypercorn_as_its_docstring_says(
    trioworker_server: RunningServer, trioworker_worker: Make
) -> None:
    """``hypercorn examples.webapp:app --worker-class trio``, over real HTTP."""
    command = [sys.executable, "-m", "hypercorn", "examples.webapp:app", "--worker-class", "trio"]
    command += ["--bind", "127.0.0.1:0"]
    async with (
        trioworker_worker(resize_image),
        running(command, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL) as hypercorn,
    ):
        assert hypercorn.stderr is not None
        match, _ = await read_until(hypercorn.stderr, r"Running on (http://127\.0\.0\.1:\d+)")
        async with httpx.AsyncClient(base_url=match[1], timeout=STEP_SECONDS) as http:
            response = await http.post(
                "/jobs", json={"task": "resize_image", "args": {"width": 5, "height": 5}}
            )
            assert response.status_code == 202, response.text
            run_id = response.json()["id"]
            await wait_for_run(run_id)
            response = await http.get(f"/jobs/{run_id}")
            assert response.json() == {
                "id": run_id,
                "state": "COMPLETED",
                "result": {"width": 5, "height": 5},
            }


# --------------------------------------------------------------------------- the sync script


async def test_sync_script_prints_the_results(
    trioworker_server: RunningServer, trioworker_worker: Make
) -> None:
    env = {**os.environ, "TRIOWORKER_API_URL": trioworker_server.api_url}
    env.pop("PYTHONPATH", None)  # the script makes ``examples`` importable itself
    async with trioworker_worker(resize_image, make_thumbnails):
        with trio.fail_after(STEP_SECONDS * 2):
            result = await trio.run_process(
                [sys.executable, "examples/sync_script.py"],
                cwd=ROOT,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.decode().splitlines() == [
        "resize_image(4000, 3000) -> Size(width=256, height=192)",
        "resize_image -> Size(width=128, height=96)",
        "resize_image -> Size(width=128, height=72)",
        "resize_image -> Size(width=128, height=128)",
        "make_thumbnails -> [Size(width=64, height=48), Size(width=48, height=64)]",
        "resize_image(0, 10) failed: not an image size: 0x10",
    ]


async def test_sync_script_without_a_server_fails_with_a_traceback(tmp_path: Path) -> None:
    """Sanity check of the harness: the script really talks to TRIOWORKER_API_URL."""
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        env = {**os.environ, "TRIOWORKER_API_URL": f"http://127.0.0.1:{port}/api"}
        with trio.fail_after(STEP_SECONDS):
            result = await trio.run_process(
                [sys.executable, "examples/sync_script.py"],
                cwd=ROOT,
                env=env,
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    assert result.returncode == 1
    assert b"ServerUnavailable" in result.stderr

"""A quart-trio web app that hands its slow work to trioworker.

``POST /jobs`` starts a run and answers 202 at once with its id; ``GET /jobs/<id>``
tells how it is going, with the result (or the error) once it ended::

    $ curl -s localhost:5000/jobs -d '{"task": "resize_image", "args": {"width": 4000, "height": 3000}}'
    {"id":"4049ead9-...","state":"SCHEDULED"}
    $ curl -s localhost:5000/jobs/4049ead9-...
    {"id":"4049ead9-...","result":{"height":192,"width":256},"state":"COMPLETED"}

Run it from the repository root, in three shells::

    trioworker server
    trioworker worker examples.tasks:resize_image examples.tasks:make_thumbnails
    hypercorn examples.webapp:app --worker-class trio --bind 127.0.0.1:5000   # or: python -m examples.webapp

The app talks to the server at ``TRIOWORKER_API_URL`` (default ``http://127.0.0.1:4300/api``).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from quart import request
from quart_trio import QuartTrio

import trioworker
from examples.tasks import make_thumbnails, resize_image

app = QuartTrio(__name__)

#: What a client may start, by name.
TASKS: dict[str, trioworker.Task[..., Any]] = {
    "resize_image": resize_image,
    "make_thumbnails": make_thumbnails,
}

Answer = tuple[dict[str, Any], int]


@app.post("/jobs")
async def start_job() -> Answer:
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict) or body.get("task") not in TASKS:
        return {"detail": f"expected {{'task': one of {sorted(TASKS)}, 'args': {{...}}}}"}, 400
    try:
        future = await TASKS[body["task"]].delay(**body.get("args", {}))
    except TypeError as exc:  # arguments that do not fit the task: nothing was submitted
        return {"detail": str(exc)}, 400
    assert future.state is not None
    return {"id": str(future.task_run_id), "state": future.state.type.value}, 202


@app.get("/jobs/<uuid:run_id>")
async def job(run_id: uuid.UUID) -> Answer:
    future: trioworker.TaskRunFuture[Any] = trioworker.TaskRunFuture(run_id)
    try:
        state = await future.get_state()
    except trioworker.NotFound:
        return {"detail": f"no job {run_id}"}, 404
    answer: dict[str, Any] = {"id": str(run_id), "state": state.type.value}
    if future.done:  # the run ended: its result, or why not (no waiting: it has ended)
        outcome = await future.result(timeout=0, raise_on_failure=False)
        if isinstance(outcome, BaseException):
            answer["error"] = f"{type(outcome).__name__}: {outcome}"
        else:
            answer["result"] = outcome  # the task's JSON result, as the server keeps it
    return answer, 200


@app.errorhandler(trioworker.ServerUnavailable)
async def queue_unavailable(exc: trioworker.ServerUnavailable) -> Answer:
    return {"detail": str(exc)}, 503


if __name__ == "__main__":
    app.run(port=int(os.environ.get("PORT", "5000")))

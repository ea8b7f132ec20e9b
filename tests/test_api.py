"""The REST API through real HTTP against the in-process server."""

from __future__ import annotations

import gc
import threading
import uuid
from typing import Any

import httpx
import orjson
import pytest
import trio
import trio.testing

from trioworker.server import RunningServer, ServerConfig
from trioworker.server.store.commit import GroupCommitStore
from trioworker.testing import ServerControl

from .raw import subscribe

#: Every test here runs its server on each kind of store (tests/stores.py).
pytestmark = pytest.mark.every_store


async def create(api: httpx.AsyncClient, key: str = "say", **fields: object) -> dict[str, Any]:
    response = await api.post("/task_runs", json={"task_key": key, **fields})
    assert response.status_code == 201, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


async def test_health(api: httpx.AsyncClient) -> None:
    response = await api.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


async def test_create_and_read(api: httpx.AsyncClient) -> None:
    run = await create(api, parameters={"text": "hi"}, name="greeting", tags=["t"])
    assert run["state"]["type"] == "SCHEDULED"
    assert run["name"] == "greeting"
    read = (await api.get(f"/task_runs/{run['id']}")).json()
    assert read == run


async def test_batch_create_keeps_order(api: httpx.AsyncClient) -> None:
    response = await api.post(
        "/task_runs/batch", json=[{"task_key": "k", "parameters": {"i": i}} for i in range(50)]
    )
    assert response.status_code == 201
    assert [r["parameters"]["i"] for r in response.json()] == list(range(50))


async def test_list_filters_by_key_and_state(api: httpx.AsyncClient) -> None:
    a = await create(api, "a")
    await create(api, "b")
    c = await create(api, "a")
    await api.post(f"/task_runs/{c['id']}/cancel")
    by_key = (await api.get("/task_runs", params={"task_key": "a"})).json()
    assert [r["id"] for r in by_key] == [a["id"], c["id"]]
    cancelled = (await api.get("/task_runs", params={"state": "CANCELLED"})).json()
    assert [r["id"] for r in cancelled] == [c["id"]]
    limited = (await api.get("/task_runs", params={"limit": 1})).json()
    assert [r["id"] for r in limited] == [a["id"]]


async def test_find_runs_by_an_id_prefix(api: httpx.AsyncClient) -> None:
    ids = [uuid.UUID(f"0b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a1{i}") for i in range(3)]
    for run_id in reversed(ids):
        await create(api, "k", id=str(run_id))
    other = await create(api, "k", id="1b7c7c36-8d3a-4a4e-9f6e-2f1d2c9b6a10")

    async def find(**params: str | int) -> list[str]:
        response = await api.get("/task_runs/find", params=params)
        assert response.status_code == 200, response.text
        return [run["id"] for run in response.json()]

    assert await find(id_prefix="0b7c7c36") == [str(i) for i in ids]
    assert await find(id_prefix="0B7C7C368D3A", limit=2) == [str(i) for i in ids[:2]]  # any case, no dashes
    assert await find(id_prefix=str(ids[1])) == [str(ids[1])]
    assert await find(id_prefix="1") == [other["id"]]
    assert await find(id_prefix="2") == []
    cases: list[tuple[dict[str, str | int], str]] = [
        ({}, "id_prefix is required"),
        ({"id_prefix": "xyz"}, "id_prefix: a run id or the start of one is 1 to 32 hex digits"),
        ({"id_prefix": "-"}, "id_prefix: a run id or the start of one"),
        ({"id_prefix": "0" * 33}, "id_prefix: a run id or the start of one"),
        ({"id_prefix": "0", "limit": 0}, "limit must be an integer between 1 and 1000"),
    ]
    for params, detail in cases:
        response = await api.get("/task_runs/find", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["detail"].startswith(detail), response.text


async def test_cancel_a_scheduled_run_is_never_delivered(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    doomed = await create(api, "k")
    kept = await create(api, "k")
    response = await api.post(f"/task_runs/{doomed['id']}/cancel")
    assert response.status_code == 200
    assert response.json()["state"]["type"] == "CANCELLED"
    again = await api.post(f"/task_runs/{doomed['id']}/cancel")
    assert again.status_code == 200  # idempotent
    async with subscribe(trioworker_server, ["k"]) as sub:
        assert [r["id"] for r in await sub.runs()] == [kept["id"]]


async def test_cancel_a_finished_run_conflicts(api: httpx.AsyncClient) -> None:
    run = await create(api)
    for state in ("RUNNING", "COMPLETED"):
        await api.post(f"/task_runs/{run['id']}/set_state", json={"state": {"type": state, "name": state}})
    response = await api.post(f"/task_runs/{run['id']}/cancel")
    assert response.status_code == 409
    assert "COMPLETED" in response.json()["detail"]


async def test_delete(api: httpx.AsyncClient) -> None:
    run = await create(api)
    assert (await api.delete(f"/task_runs/{run['id']}")).status_code == 204
    assert (await api.get(f"/task_runs/{run['id']}")).status_code == 404
    assert (await api.delete(f"/task_runs/{run['id']}")).status_code == 404


async def test_set_state_rules_and_idempotent_repeats(api: httpx.AsyncClient) -> None:
    run = await create(api)
    url = f"/task_runs/{run['id']}/set_state"
    running = {"state": {"type": "RUNNING", "name": "Running"}}
    done = {"state": {"type": "COMPLETED", "name": "Completed", "data": {"answer": 42}}}
    assert (await api.post(url, json=running)).json()["status"] == "ACCEPT"
    assert (await api.post(url, json=done)).json()["status"] == "ACCEPT"
    repeat = (await api.post(url, json=done)).json()
    assert repeat["status"] == "ACCEPT"
    back = (await api.post(url, json=running)).json()
    assert back["status"] == "REJECT"
    assert back["state"]["type"] == "COMPLETED"
    forced = (await api.post(url, json={**running, "force": True})).json()
    assert forced["status"] == "ACCEPT"
    read = (await api.get(f"/task_runs/{run['id']}")).json()
    assert read["state"]["type"] == "RUNNING"
    assert read["run_count"] == 2


async def test_history_lists_every_state_in_order(api: httpx.AsyncClient) -> None:
    run = await create(api)
    for state in ("RUNNING", "FAILED"):
        await api.post(
            f"/task_runs/{run['id']}/set_state", json={"state": {"type": state, "name": state.title()}}
        )
    history = (await api.get(f"/task_runs/{run['id']}/history")).json()
    assert [h["type"] for h in history] == ["SCHEDULED", "RUNNING", "FAILED"]


async def test_idempotency_key_gives_the_same_run(api: httpx.AsyncClient) -> None:
    first = await api.post("/task_runs", json={"task_key": "k", "idempotency_key": "once"})
    second = await api.post("/task_runs", json={"task_key": "k", "idempotency_key": "once"})
    assert first.status_code == 201
    assert second.status_code == 200
    assert first.json()["id"] == second.json()["id"]


async def test_an_idempotency_key_is_scoped_to_its_task_key(api: httpx.AsyncClient) -> None:
    a = await api.post("/task_runs", json={"task_key": "a", "idempotency_key": "once"})
    b = await api.post("/task_runs", json={"task_key": "b", "idempotency_key": "once"})
    assert (a.status_code, b.status_code) == (201, 201)
    assert a.json()["id"] != b.json()["id"]
    assert (a.json()["task_key"], b.json()["task_key"]) == ("a", "b")
    again = await api.post("/task_runs", json={"task_key": "b", "idempotency_key": "once"})
    assert (again.status_code, again.json()["id"]) == (200, b.json()["id"])
    batch = await api.post(
        "/task_runs/batch",
        json=[
            {"task_key": "c", "idempotency_key": "once"},
            {"task_key": "a", "idempotency_key": "once"},
            {"task_key": "c", "idempotency_key": "once"},
        ],
    )
    assert batch.status_code == 201
    [c, a_again, c_again] = batch.json()
    assert c["task_key"] == "c" and c["id"] not in (a.json()["id"], b.json()["id"])
    assert a_again["id"] == a.json()["id"] and c_again["id"] == c["id"]
    scheduled = (await api.get("/task_runs", params={"state": "SCHEDULED"})).json()
    assert sorted(run["task_key"] for run in scheduled) == ["a", "b", "c"]


async def test_a_create_with_an_id_makes_the_run_with_that_id(api: httpx.AsyncClient) -> None:
    one, many = uuid.uuid4(), [uuid.uuid4() for _ in range(3)]
    response = await api.post("/task_runs", json={"task_key": "k", "id": str(one)})
    assert (response.status_code, response.json()["id"]) == (201, str(one))
    assert response.json()["name"] == f"k-{one.hex[:8]}"
    batch = await api.post("/task_runs/batch", json=[{"task_key": "k", "id": str(i)} for i in many])
    assert batch.status_code == 201
    assert [run["id"] for run in batch.json()] == [str(i) for i in many]
    for run_id in [one, *many]:
        assert (await api.get(f"/task_runs/{run_id}")).json()["id"] == str(run_id)
    unnamed = await api.post("/task_runs", json={"task_key": "k", "id": None})  # the server picks one
    assert unnamed.status_code == 201 and unnamed.json()["id"] not in {str(i) for i in [one, *many]}


async def test_the_same_create_sent_again_gives_the_same_run(api: httpx.AsyncClient) -> None:
    one = {"task_key": "k", "id": str(uuid.uuid4()), "parameters": {"n": 1}}
    first = await api.post("/task_runs", json=one)
    again = await api.post("/task_runs", json=one)
    assert (first.status_code, again.status_code) == (201, 200)  # as a known idempotency key
    assert again.json() == first.json()
    # A batch sent again, and an id twice in one batch: one run per id.
    ids = [str(uuid.uuid4()) for _ in range(3)]
    batch = [{"task_key": "k", "id": i, "parameters": {"n": n}} for n, i in enumerate(ids)]
    answers = [await api.post("/task_runs/batch", json=[*batch, batch[1], one]) for _ in range(2)]
    assert [a.status_code for a in answers] == [201, 201]
    assert answers[0].json() == answers[1].json()
    assert [run["id"] for run in answers[0].json()] == [*ids, ids[1], one["id"]]
    runs = (await api.get("/task_runs")).json()
    assert [run["id"] for run in runs] == [one["id"], *ids]
    # A repeat gives the run as it is now, not as it was created.
    await api.post(f"/task_runs/{one['id']}/cancel")
    assert (await api.post("/task_runs", json=one)).json()["state"]["type"] == "CANCELLED"


async def test_concurrent_creates_with_one_id_make_one_run(
    api: httpx.AsyncClient, trioworker_server: RunningServer
) -> None:
    store = trioworker_server.service.store
    assert isinstance(store, GroupCommitStore)
    run_id = str(uuid.uuid4())
    singles: list[httpx.Response] = []
    batches: list[httpx.Response] = []

    async def post(n: int) -> None:
        one = {"task_key": "k", "id": run_id, "parameters": {"n": n}}
        if n % 2:
            batches.append(await api.post("/task_runs/batch", json=[one]))
        else:
            singles.append(await api.post("/task_runs", json=one))

    gate = threading.Event()
    held = store._queue(lambda ops: gate.wait(10))  # the store is busy: the creates queue up
    async with trio.open_nursery() as nursery:
        for n in range(6):
            nursery.start_soon(post, n)
        await trio.testing.wait_all_tasks_blocked()
        assert store._send.statistics().current_buffer_used == 6  # all six wait, for one group
        gate.set()
    await held.result()
    answers = [a.json() for a in singles] + [a.json()[0] for a in batches]
    assert {run["id"] for run in answers} == {run_id}
    assert len({orjson.dumps(run) for run in answers}) == 1  # each got the one run, whole
    assert [a.status_code for a in batches] == [201] * 3
    assert sorted(a.status_code for a in singles) in ([200, 200, 200], [200, 200, 201])
    assert [run["id"] for run in (await api.get("/task_runs")).json()] == [run_id]


async def test_an_id_of_another_run_is_a_409_and_creates_nothing(api: httpx.AsyncClient) -> None:
    taken = await create(api, "a", idempotency_key="once")
    other_key = await create(api, "a")
    fresh = str(uuid.uuid4())
    for path, body in [
        ("/task_runs", {"task_key": "b", "id": taken["id"]}),
        ("/task_runs/batch", [{"task_key": "b", "id": fresh}, {"task_key": "b", "id": taken["id"]}]),
        ("/task_runs", {"task_key": "a", "id": taken["id"]}),  # no key: not a repeat of it
        ("/task_runs", {"task_key": "a", "id": taken["id"], "idempotency_key": "twice"}),
        ("/task_runs", {"task_key": "a", "id": other_key["id"], "idempotency_key": "twice"}),
    ]:
        response = await api.post(path, json=body)
        assert response.status_code == 409, response.text
        detail = response.json()["detail"]
        assert "is taken by a run of task 'a'" in detail and "id" in detail
    assert [run["id"] for run in (await api.get("/task_runs")).json()] == [taken["id"], other_key["id"]]
    assert (await api.get(f"/task_runs/{fresh}")).status_code == 404  # the batch made nothing


async def test_an_idempotency_key_rules_over_an_id(api: httpx.AsyncClient) -> None:
    first_id, second_id = str(uuid.uuid4()), str(uuid.uuid4())
    first = await api.post("/task_runs", json={"task_key": "k", "idempotency_key": "once", "id": first_id})
    assert (first.status_code, first.json()["id"]) == (201, first_id)
    # A known key gives its run, whatever the id (which is only used for a new run).
    again = await api.post("/task_runs", json={"task_key": "k", "idempotency_key": "once", "id": second_id})
    assert (again.status_code, again.json()["id"]) == (200, first_id)
    assert (await api.get(f"/task_runs/{second_id}")).status_code == 404
    # The same key and id again (a create sent twice) is the same run too.
    repeat = await api.post("/task_runs", json={"task_key": "k", "idempotency_key": "once", "id": first_id})
    assert (repeat.status_code, repeat.json()["id"]) == (200, first_id)


async def test_wait_returns_when_the_run_ends(api: httpx.AsyncClient) -> None:
    run = await create(api)
    url = f"/task_runs/{run['id']}/set_state"
    async with trio.open_nursery() as nursery:
        result: dict[str, object] = {}

        async def waiter() -> None:
            response = await api.get(f"/task_runs/{run['id']}/wait", params={"timeout": 30})
            result.update(response.json())

        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        await api.post(url, json={"state": {"type": "RUNNING", "name": "Running"}})
        await api.post(url, json={"state": {"type": "COMPLETED", "name": "Completed", "data": 7}})
    assert result["state"]["type"] == "COMPLETED"  # type: ignore[index]
    assert result["state"]["data"] == 7  # type: ignore[index]


async def test_wait_many_returns_ended_missing_and_pending(api: httpx.AsyncClient) -> None:
    ended = await create(api)
    pending = await create(api)
    await api.post(f"/task_runs/{ended['id']}/cancel")
    ghost = str(uuid.uuid4())
    response = await api.post(
        "/task_runs/wait", json={"ids": [ended["id"], pending["id"], ghost], "timeout": 0}
    )
    body = response.json()
    assert [r["id"] for r in body["ended"]] == [ended["id"]]
    assert body["missing"] == [ghost]
    assert body["pending"] == [pending["id"]]


async def test_wait_times_out_with_the_current_state(api: httpx.AsyncClient) -> None:
    run = await create(api)
    response = await api.get(f"/task_runs/{run['id']}/wait", params={"timeout": 0})
    assert response.json()["state"]["type"] == "SCHEDULED"


async def test_names_tags_and_keys_have_a_length_limit(api: httpx.AsyncClient) -> None:
    long = "x" * 201
    cases: list[tuple[dict[str, Any], str]] = [
        ({"task_key": long}, "task_key must be a non-empty string of at most 200 characters"),
        ({"name": long}, "name must be at most 200 characters, got 201"),
        ({"idempotency_key": long}, "idempotency_key must be at most 200 characters, got 201"),
        ({"tags": ["ok", long]}, "tags[1] must be at most 200 characters, got 201"),
        ({"tags": [f"t{n}" for n in range(101)]}, "tags: a run may have at most 100 tags, got 101"),
    ]
    for fields, detail in cases:
        for path, body in (
            ("/task_runs", {"task_key": "k", **fields}),
            ("/task_runs/batch", [{"task_key": "k", **fields}]),
        ):
            refused = await api.post(path, json=body)
            assert (refused.status_code, refused.json()) == (422, {"detail": detail}), path
    # At the limits: made (an idempotency key that long is held by PostgreSQL's index too).
    most = {"name": "n" * 200, "idempotency_key": "i" * 200, "tags": ["t" * 200] * 100}
    made = await api.post("/task_runs", json={"task_key": "k" * 200, **most})
    assert made.status_code == 201, made.text
    again = await api.post("/task_runs", json={"task_key": "k" * 200, **most})
    assert (again.status_code, again.json()["id"]) == (200, made.json()["id"])
    assert (await api.get("/task_runs", params={"task_key": "k"})).json() == []  # nothing else made


async def test_a_task_key_with_nul_lists_no_runs(api: httpx.AsyncClient) -> None:
    await create(api)
    response = await api.get("/task_runs", params={"task_key": "k\x00"})
    assert (response.status_code, response.json()) == (200, [])


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "detail"),
    [
        ("POST", "/task_runs", b"{not json", 400, "malformed JSON"),
        ("POST", "/task_runs", b"[1, 2]", 422, "JSON object"),
        ("POST", "/task_runs", b'{"name": "x"}', 422, "task_key"),
        ("POST", "/task_runs", b'{"task_key": ""}', 422, "task_key"),
        ("POST", "/task_runs", b'{"task_key": "k", "serializer": "yaml"}', 422, "serializer"),
        ("POST", "/task_runs", b'{"task_key": "k", "parameters": [1]}', 422, "parameters"),
        ("POST", "/task_runs", b'{"task_key": "k", "scheduled_time": "soon"}', 422, "scheduled_time"),
        ("POST", "/task_runs/batch", b'{"task_key": "k"}', 422, "array"),
        ("POST", "/task_runs/batch", b'[{"task_key": "k"}, {"task_key": 5}]', 422, "#1"),
        ("POST", "/task_runs", b'{"task_key": "k", "id": "not-a-uuid"}', 422, "$.id"),
        ("POST", "/task_runs", b'{"task_key": "k", "id": ""}', 422, "$.id"),
        ("POST", "/task_runs", b'{"task_key": "k", "id": 5}', 422, "$.id"),
        ("POST", "/task_runs", b'{"task_key": "k", "id": ["x"]}', 422, "$.id"),
        ("POST", "/task_runs", b'{"task_key": "k", "id": "0123456789abcdef0123456789abcdeg"}', 422, "$.id"),
        ("POST", "/task_runs/batch", b'[{"task_key": "k"}, {"task_key": "k", "id": "x"}]', 422, "#1"),
        ("POST", "/task_runs", b'{"task_key": "a\\u0000b"}', 422, "task_key must not contain NUL"),
        (
            "POST",
            "/task_runs",
            b'{"task_key": "k", "idempotency_key": "\\u0000"}',
            422,
            "idempotency_key must",
        ),
        ("GET", "/task_runs/not-a-uuid", None, 404, "not a UUID"),
        ("GET", f"/task_runs/{uuid.UUID(int=1)}", None, 404, "no task run"),
        ("GET", "/task_runs?state=EXPLODED", None, 422, "unknown state"),
        ("GET", "/task_runs?limit=0", None, 422, "limit"),
        ("GET", "/task_runs?limit=ten", None, 422, "limit"),
        (
            "POST",
            f"/task_runs/{uuid.UUID(int=1)}/set_state",
            b'{"state": {"type": "RUNNING", "name": "R"}}',
            404,
            "no task run",
        ),
        ("POST", f"/task_runs/{uuid.UUID(int=1)}/cancel", None, 404, "no task run"),
        ("POST", "/task_runs/wait", b'{"ids": ["x"]}', 422, "UUID"),
        ("POST", "/task_runs/wait", b'{"ids": [], "timeout": -1}', 422, "timeout"),
        ("GET", "/nowhere", None, 404, ""),
        ("PUT", "/task_runs", b"{}", 405, ""),
    ],
)
async def test_bad_input_gets_a_json_4xx(
    api: httpx.AsyncClient, method: str, path: str, body: bytes | None, status: int, detail: str
) -> None:
    response = await api.request(method, path, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert detail in response.json()["detail"]
    assert (await api.get("/health")).status_code == 200


TYPES = "SCHEDULED, PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, CRASHED"


@pytest.mark.parametrize(
    ("state", "detail"),
    [
        ({"type": "EXPLODED", "name": "x"}, f"state.type is 'EXPLODED'; it must be one of {TYPES}"),
        ({"type": "EXPLODED"}, f"state.type is 'EXPLODED'; it must be one of {TYPES}"),
        ({"type": "completed"}, f"state.type is 'completed'; it must be one of {TYPES}"),
        ({"type": 5, "name": ""}, f"state.type is 5; it must be one of {TYPES}"),
        ({"type": None}, f"state.type is None; it must be one of {TYPES}"),
        ({}, f"state.type is missing; it must be one of {TYPES}"),
        ({"name": "Running"}, f"state.type is missing; it must be one of {TYPES}"),
        ("RUNNING", 'state must be an object with a "type", got str'),
        ({"type": "RUNNING", "timestamp": "soon"}, "expected datetime @ $.state.timestamp"),
        ({"type": "RUNNING", "name": 5}, "expected str @ $.state.name"),
    ],
)
async def test_bad_state_in_set_state_is_a_422_naming_the_real_fault(
    api: httpx.AsyncClient, state: object, detail: str
) -> None:
    """The name follows from the type: a bad or missing type is what the answer names."""
    run = await create(api)
    response = await api.post(f"/task_runs/{run['id']}/set_state", json={"state": state})
    assert response.status_code == 422
    answer = response.json()["detail"]
    assert answer.startswith("invalid state request: ") and answer.endswith(detail)
    assert len(answer.splitlines()) == 1
    if "state.type" in detail:
        assert answer == f"invalid state request: {detail}"  # and no word of the name


async def test_oversized_bodies_get_413_and_the_server_keeps_serving(
    trioworker_server_control: ServerControl,
) -> None:
    server = await trioworker_server_control.start(max_body_bytes=10_000)
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        response = await api.post("/task_runs", json={"task_key": "k", "parameters": {"blob": "x" * 20_000}})
        assert response.status_code == 413
        assert "too large" in response.json()["detail"]
        assert (await api.post("/task_runs", json={"task_key": "k"})).status_code == 201


async def test_api_key_is_required_when_set(trioworker_server_control: ServerControl) -> None:
    server = await trioworker_server_control.start(api_key="s3cret")
    async with httpx.AsyncClient(base_url=server.api_url) as api:
        assert (await api.get("/health")).status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = await api.post("/task_runs", json={"task_key": "k"}, headers=headers)
            assert response.status_code == 401
            assert "API key" in response.json()["detail"]
        ok = await api.post("/task_runs", json={"task_key": "k"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 201


def test_server_config_defaults() -> None:
    config = ServerConfig()
    assert (config.host, config.port, config.max_deliveries) == ("127.0.0.1", 4300, 5)


# The half-sent body's generator is httpx's; its finalizer may complain that it was not
# run to its end, which is the point of this test, not a fault.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/nope", 404), ("PUT", "/task_runs", 405), ("POST", "/task_runs/not-an-id/cancel", 404)],
)
async def test_an_error_answered_before_the_body_was_read_leaves_the_connection_usable(
    api: httpx.AsyncClient, method: str, path: str, status: int
) -> None:
    # The server answers without reading the 2 MB body; the rest of it must not be read as
    # the next request on the same kept-alive connection (that one stalled until its timeout).
    answer = await api.request(
        method, path, content=b"x" * 2_000_000, headers={"Content-Type": "application/json"}
    )
    assert answer.status_code == status
    assert answer.headers["connection"] == "close"
    with trio.fail_after(5):
        assert (await api.get("/health")).status_code == 200
    # httpx sent the body from an async generator that the closed connection left
    # half-run; it is finalized here, not at some garbage collection in a later test.
    gc.collect()

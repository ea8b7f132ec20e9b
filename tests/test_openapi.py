"""The API document (``/api/openapi.json``): every route the app registers is in it and
nothing else; it is valid OpenAPI 3.1; its example requests validate against its schemas,
and a real server gives the documented answers, valid against the documented schemas, to
every REST operation it lists. The page that shows it (``/api/docs``) loads without a key."""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import jsonschema
import pytest
import trio
from openapi_spec_validator import OpenAPIV31SpecValidator

from trioworker._version import __version__
from trioworker.server import RunningServer, ServerConfig, serve_server
from trioworker.server.app import create_app
from trioworker.server.openapi import document
from trioworker.server.queue import Dispatcher
from trioworker.server.service import TaskRunService
from trioworker.server.store import SQLiteStore

DOC = document(__version__)
METHODS = ("get", "post", "put", "patch", "delete")


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOC["paths"].items():
        for method in METHODS:
            if method in item:
                yield path, method, item[method]


def check(instance: object, schema: dict[str, Any]) -> None:
    """Validate ``instance`` against ``schema``, its ``$ref``s resolved in the document."""
    validator = jsonschema.Draft202012Validator(
        {**schema, "components": DOC["components"]},
        format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER,
    )
    validator.validate(instance)


async def test_every_route_of_the_app_is_in_the_document_and_nothing_else() -> None:
    async with SQLiteStore.open(":memory:") as store:
        app = create_app(TaskRunService(store, Dispatcher()))
    routes: set[tuple[str, str, bool]] = set()
    for rule in app.quart.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower(), bool(rule.websocket)))
    documented = {(path, method, op.get("x-websocket", False)) for path, method, op in operations()}
    assert routes == documented
    assert len(routes) >= 20  # the app's rules were read


def test_the_document_is_valid_openapi_3_1() -> None:
    OpenAPIV31SpecValidator(DOC).validate()
    ids = [op["operationId"] for _, _, op in operations()]
    assert len(ids) == len(set(ids))
    # The schemas come from the models: a field the model has, the document has.
    run = DOC["components"]["schemas"]["TaskRun"]
    assert {"id", "task_key", "state", "parameters", "parent_task_run_id", "wait_for"} <= set(
        run["properties"]
    )
    assert run["properties"]["run_count"]["description"] == "Attempts that reached RUNNING."
    create = DOC["components"]["schemas"]["TaskRunCreate"]
    assert create["required"] == ["task_key"] and create["properties"]["serializer"]["default"] == "json"
    assert {"cache_key", "cache_expiration", "refresh_cache"} <= set(create["properties"]) & set(
        run["properties"]
    )
    listed = {param["name"] for param in DOC["paths"]["/api/task_runs"]["get"]["parameters"]}
    assert "tag" in listed


def test_the_example_requests_validate() -> None:
    examples = 0
    for path, method, op in operations():
        body = op.get("requestBody")
        if body is not None:
            media = body["content"]["application/json"]
            assert "example" in media, f"{method.upper()} {path} has no example request"
            check(media["example"], media["schema"])
            examples += 1
        for param in op.get("parameters", ()):
            if "example" in param:
                check(param["example"], param["schema"])
    assert examples == 6  # create, batch, wait, purge, set_state, schedule
    with pytest.raises(jsonschema.ValidationError):
        check(
            {"task_key": 5},
            DOC["paths"]["/api/task_runs"]["post"]["requestBody"]["content"]["application/json"]["schema"],
        )


@pytest.fixture
async def keyed_server() -> AsyncIterator[RunningServer]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(serve_server, ServerConfig(port=0, api_key="sesame"))
        nursery.cancel_scope.cancel()


async def test_a_real_server_gives_the_documented_answers(keyed_server: RunningServer) -> None:
    called: set[tuple[str, str]] = set()
    headers = {"Authorization": "Bearer sesame"}

    async with httpx.AsyncClient(base_url=keyed_server.url, headers=headers, timeout=10) as client:

        async def call(method: str, path: str, expect: int, **params: Any) -> httpx.Response:
            """Call the documented operation with its example body and parameters (``params``
            fill or replace them); check the status is ``expect`` and documented, and the
            body valid against the documented schema."""
            op = DOC["paths"][path][method]
            called.add((path, method))
            url = path
            query = {}
            for param in op.get("parameters", ()):
                value = params.pop(param["name"], param.get("example"))
                if param["in"] == "path":
                    url = url.replace(f"{{{param['name']}}}", str(value))
                elif value is not None:
                    query[param["name"]] = value
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("example")
            body = params.pop("json", body)
            assert not params, f"not parameters of {method} {path}: {params}"
            response = await client.request(method.upper(), url, params=query, json=body)
            assert response.status_code == expect, (method, path, response.text)
            answer = op["responses"][str(expect)]
            media = answer.get("content", {})
            if "application/json" in media:
                assert response.headers["content-type"].startswith("application/json")
                check(response.json(), media["application/json"]["schema"])
            elif media:
                [content_type] = media
                assert content_type == "*/*" or response.headers["content-type"].startswith(content_type)
            else:
                assert response.content == b""
            return response

        await call("get", "/api/health", 200)
        first = (await call("post", "/api/task_runs", 201)).json()
        await call("post", "/api/task_runs", 200)  # the same id: the same run
        await call("post", "/api/task_runs", 422, json={"task_key": 5})
        await call("post", "/api/task_runs/batch", 201)
        await call("get", "/api/task_runs", 200)
        await call("get", "/api/task_runs", 422, state="SOON")
        await call("get", "/api/task_runs", 422, tag=[""])
        tagged = await call("get", "/api/task_runs", 200, tag=["nightly", "billing"])
        assert tagged.json() == []
        await call("get", "/api/task_runs", 422, group_id="nope")
        await call("get", "/api/task_runs/{run_id}/descendants", 200)
        await call("get", "/api/task_runs/{run_id}/descendants", 404, run_id=str(uuid.uuid4()))
        await call("get", "/api/task_runs/{run_id}/descendants", 422, limit=0)
        await call("post", "/api/task_run_groups/{group_id}/cancel", 200)
        await call("post", "/api/task_run_groups/{group_id}/cancel", 404, group_id="nope")
        found = await call("get", "/api/task_runs/find", 200)
        assert [run["id"] for run in found.json()] == [first["id"]]
        await call("get", "/api/task_runs/find", 422, id_prefix="xyz")
        await call("get", "/api/task_runs/{run_id}", 200)
        await call("get", "/api/task_runs/{run_id}/history", 200)
        await call("post", "/api/task_runs/{run_id}/set_state", 200)
        await call("get", "/api/task_runs/{run_id}/wait", 200)
        await call("post", "/api/task_runs/wait", 200)
        assert (await call("get", "/api/task_runs/room", 200)).json()["room"] is None  # no --max-queued
        await call("get", "/api/task_runs/room", 422, wanted=0)
        await call("post", "/api/task_runs/{run_id}/cancel", 200)
        await call("post", "/api/task_runs/{run_id}/retry", 201)
        await call("get", "/api/overview", 200)
        await call("get", "/api/task_workers", 200)
        await call("get", "/metrics", 200)
        served = await call("get", "/api/openapi.json", 200)
        assert served.json() == DOC
        await call("post", "/api/schedules", 201)
        await call("post", "/api/schedules", 200)  # the same: as it was
        await call("post", "/api/schedules", 422, json={"name": "x", "task_key": "k", "cron": "61 * * * *"})
        await call("get", "/api/schedules", 200)
        await call("get", "/api/schedules/{name}", 200)
        await call("delete", "/api/schedules/{name}", 204)
        await call("delete", "/api/schedules/{name}", 404)
        await call("get", "/api/schedules/{name}", 404)
        await call("post", "/api/task_runs/purge", 200)
        await call("delete", "/api/task_runs/{run_id}", 204)
        await call("get", "/api/task_runs/{run_id}", 404, run_id=first["id"])
        await call("post", "/api/task_runs/{run_id}/retry", 404)
        await call("get", "/", 200)
        await call("get", "/dashboard/{name}", 200)
        await call("get", "/dashboard/{name}", 404, name="nope.js")
        page = await call("get", "/api/docs", 200)
        assert b"/dashboard/docs.js" in page.content

    async with httpx.AsyncClient(base_url=keyed_server.url) as anonymous:
        assert (await anonymous.get("/api/openapi.json")).status_code == 401
        assert (await anonymous.get("/api/docs")).status_code == 200  # holds no data
        assert (await anonymous.get("/dashboard/docs.js")).status_code == 200

    rest = {(path, method) for path, method, op in operations() if not op.get("x-websocket")}
    assert rest - called == set(), "a documented REST operation the test does not call"

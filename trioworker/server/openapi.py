"""The API document: every route of the server in OpenAPI 3.1, served at
``GET /api/openapi.json`` and shown by the page at ``GET /api/docs``.

The bodies' schemas are made from the attrs models the routes read and write
(:mod:`trioworker.models`, the overview's records): their fields, types, defaults and
``#:`` comments are the one source, so a field added to a model is documented at once.
The few bodies that have no model (the health answer, the wait request, errors) are
written here. ``tests/test_openapi.py`` checks that every route the app registers is in the
document (and nothing else), that the document is valid OpenAPI 3.1, and that its example
requests validate and get the documented answers from a real server.

Websocket routes are listed as ``GET`` operations marked ``x-websocket: true``, answered
with 101; their messages are in the README's *Wire protocol* section.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
import uuid
from datetime import datetime
from typing import Any, Final

import attrs

from trioworker import protocol
from trioworker.models import (
    JSON,
    CancelResult,
    GroupCancelResult,
    PurgeRequest,
    PurgeResult,
    Schedule,
    ScheduleCreate,
    SetStateRequest,
    SetStateResult,
    StateChange,
    StateType,
    TaskRun,
    TaskRunCreate,
    WaitResult,
)
from trioworker.server.metrics import METRICS_ROUTE
from trioworker.server.overview import ConnectedWorker, Overview

#: ``GET``: this document.
OPENAPI_PATH: Final = "/openapi.json"
#: ``GET``: the page that shows it.
DOCS_PATH: Final = "/docs"
#: Where schemas are kept in the document.
_SCHEMAS: Final = "#/components/schemas/"

_RUN_ID: Final = "3f2b8c1e-6f0a-4c55-9d3e-0c8d2a7b9e41"
_GROUP_ID: Final = "7d1e5a90-2c4b-4f1e-8a3d-5b6c7d8e9f01"


# --------------------------------------------------------------------------- schemas


def _plain(text: str) -> str:
    """Docstring text as plain text: Sphinx roles and double backquotes dropped, one line."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    return " ".join(text.replace("``", "").split())


def _field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comments above the fields of ``cls`` and of the attrs classes it derives
    from, by field name (none without source)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is cls or attrs.has(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    """The ``#:`` comments above the fields ``cls`` itself declares."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines():
        text = line.strip()
        if text.startswith("#:"):
            pending.append(text[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", text)
        if match and pending:
            docs[match.group(1)] = _plain(" ".join(pending))
        pending = []
    return docs


def _doc(obj: object) -> str | None:
    """The first paragraph of ``obj``'s own docstring, on one line."""
    text = inspect.cleandoc(getattr(obj, "__doc__", None) or "")
    return _plain(text.split("\n\n", 1)[0]) or None


class SchemaBuilder:
    """Turns Python types into JSON Schema, keeping attrs classes and enums as components."""

    def __init__(self) -> None:
        self.components: dict[str, JSON] = {}

    def ref(self, name: str) -> dict[str, JSON]:
        return {"$ref": _SCHEMAS + name}

    def schema(self, tp: object) -> dict[str, JSON]:
        """The schema of values of type ``tp`` as the wire carries them.

        Raises:
            TypeError: ``tp`` has no JSON form here.
        """
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return {}
        if tp is type(None):
            return {"type": "null"}
        if origin in (typing.Union, types.UnionType):
            return {"anyOf": [self.schema(arg) for arg in args]}
        if origin in (list, tuple):
            return {"type": "array", "items": self.schema(args[0])}
        if origin is dict:
            key, value = args
            mapping: dict[str, JSON] = {"type": "object", "additionalProperties": self.schema(value)}
            if isinstance(key, type) and issubclass(key, enum.Enum):
                mapping["propertyNames"] = self.schema(key)
            return mapping
        if isinstance(tp, type):
            if issubclass(tp, enum.Enum):
                return self._component(tp)
            if attrs.has(tp):
                return self._component(tp)
            for python, schema in _SCALARS:
                if issubclass(tp, python):
                    return dict(schema)
        raise TypeError(f"no JSON schema for {tp!r}")

    def _component(self, cls: type) -> dict[str, JSON]:
        name = cls.__name__
        if name not in self.components:
            self.components[name] = {}  # taken: a class that refers to itself stops here
            self.components[name] = self._enum(cls) if issubclass(cls, enum.Enum) else self._object(cls)
        return self.ref(name)

    def _enum(self, cls: type[enum.Enum]) -> dict[str, JSON]:
        schema: dict[str, JSON] = {"type": "string", "enum": [member.value for member in cls]}
        if (doc := _doc(cls)) is not None:
            schema["description"] = doc
        return schema

    def _object(self, cls: type) -> dict[str, JSON]:
        hints = typing.get_type_hints(cls)
        docs = _field_docs(cls)
        properties: dict[str, JSON] = {}
        required: list[str] = []
        for field in attrs.fields(cls):
            prop = self.schema(hints[field.name])
            if field.name in docs:
                prop["description"] = docs[field.name]
            default = field.default
            if default is attrs.NOTHING:
                required.append(field.name)
            elif isinstance(default, enum.Enum):
                prop["default"] = default.value
            elif default is None or isinstance(default, str | int | float | bool):
                prop["default"] = default
            properties[field.name] = prop
        schema: dict[str, JSON] = {"type": "object", "properties": properties, "required": required}
        if (doc := _doc(cls)) is not None:
            schema["description"] = doc
        return schema


#: Python types and their JSON form (bool before int: a bool is an int to Python).
_SCALARS: Final[tuple[tuple[type, dict[str, JSON]], ...]] = (
    (bool, {"type": "boolean"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (str, {"type": "string"}),
    (datetime, {"type": "string", "format": "date-time"}),
    (uuid.UUID, {"type": "string", "format": "uuid"}),
)

_ERROR: Final = {
    "type": "object",
    "description": "Every error: what was wrong, in one sentence.",
    "properties": {"detail": {"type": "string"}},
    "required": ["detail"],
}
_QUEUE_FULL: Final = {
    "type": "object",
    "description": "A create refused because the queue of its task key is full (--max-queued).",
    "properties": {
        "detail": {"type": "string"},
        "task_key": {"type": "string", "description": "The task key whose queue is full."},
        "max_queued": {"type": "integer", "description": "The server's --max-queued."},
        "room": {
            "type": "integer",
            "description": "How many of the request's first creates fit (made, with partial=true).",
        },
        "retry_after": {
            "type": "number",
            "description": "Seconds to wait, to the millisecond, judged from how fast workers take runs "
            "of the key (the Retry-After header rounds it up to whole seconds).",
        },
        "created": {
            "type": "array",
            "items": {"$ref": "#/components/schemas/TaskRun"},
            "description": "With partial=true: the runs of the first room creates, made.",
        },
    },
    "required": ["detail", "task_key", "max_queued", "room", "retry_after"],
}
_QUEUE_ROOM: Final = {
    "type": "object",
    "properties": {
        "task_key": {"type": "string"},
        "room": {
            "type": ["integer", "null"],
            "minimum": 0,
            "description": "How many more runs of the key fit; null when the server has no --max-queued.",
        },
    },
    "required": ["task_key", "room"],
}
_HEALTH: Final = {
    "type": "object",
    "properties": {
        "status": {"const": "ok"},
        "version": {"type": "string"},
        "ready": {"type": "integer", "description": "Runs due and waiting for a worker."},
        "delayed": {"type": "integer", "description": "Runs waiting for their scheduled time."},
        "blocked": {"type": "integer", "description": "Runs held back until their wait_for runs complete."},
        "subscriptions": {"type": "integer", "description": "Worker connections subscribed."},
    },
    "required": ["status", "version", "ready", "delayed", "blocked", "subscriptions"],
}
_WAIT_REQUEST: Final = {
    "type": "object",
    "description": "A wait for many runs: answered as soon as one (or, with all, every) run ended.",
    "properties": {
        "ids": {"type": "array", "items": {"type": "string", "format": "uuid"}},
        "timeout": {"type": "number", "minimum": 0, "maximum": 300, "default": 30},
        "all": {"type": "boolean", "default": False},
        "linger": {
            "type": "number",
            "minimum": 0,
            "maximum": 5,
            "default": 0,
            "description": "Seconds to keep collecting ends after the first.",
        },
    },
    "required": ["ids"],
}


# --------------------------------------------------------------------------- operations

#: What each error status means, wherever it is listed.
_ERRORS: Final = {
    400: "Malformed JSON.",
    401: "The server has an API key, and the request did not send it (Authorization: Bearer KEY).",
    404: "No such run (or not a run id), or no such schedule.",
    409: "A conflict with the run's state, said in the detail.",
    413: "The request body is over the server's limit (--max-body-bytes).",
    422: "Well-formed but invalid: the detail names the field.",
    429: "The queue of a task key is full (the server's --max-queued): nothing was created; send it "
    "again after Retry-After seconds (room: how many of the first creates fit).",
    503: "The server's store failed; nothing of the request was saved.",
}


def _json_content(schema: JSON, example: JSON = None) -> dict[str, JSON]:
    media: dict[str, JSON] = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"application/json": media}


def _param(
    name: str, where: str, schema: JSON, description: str, *, required: bool = False, example: JSON = None
) -> dict[str, JSON]:
    param: dict[str, JSON] = {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "description": description,
        "schema": schema,
    }
    if example is not None:
        param["example"] = example
    return param


def _run_id(what: str = "The run's id.") -> dict[str, JSON]:
    return _param("run_id", "path", {"type": "string", "format": "uuid"}, what, example=_RUN_ID)


def _schedule_name() -> dict[str, JSON]:
    return _param("name", "path", {"type": "string"}, "The schedule's name.", example="weekday-report")


def _operation(
    operation_id: str,
    summary: str,
    *,
    tag: str,
    answers: dict[int, tuple[str, dict[str, JSON] | None]],
    errors: tuple[int, ...] = (),
    description: str | None = None,
    params: tuple[dict[str, JSON], ...] = (),
    body: JSON = None,
    example: JSON = None,
    secured: bool = True,
) -> dict[str, JSON]:
    """One operation: ``answers`` maps statuses to (description, content or None)."""
    operation: dict[str, JSON] = {"operationId": operation_id, "summary": summary, "tags": [tag]}
    if description is not None:
        operation["description"] = description
    if params:
        operation["parameters"] = list(params)
    if body is not None:
        operation["requestBody"] = {"required": True, "content": _json_content(body, example)}
        errors = (400, 413, *errors)
    responses: dict[str, JSON] = {}
    for status, (text, content) in answers.items():
        responses[str(status)] = (
            {"description": text} if content is None else {"description": text, "content": content}
        )
    codes = sorted({*errors, *((401,) if secured else ())})
    for status in codes:
        responses[str(status)] = {
            "description": _ERRORS[status],
            "content": _json_content({"$ref": _SCHEMAS + ("QueueFull" if status == 429 else "Error")}),
        }
        if status == 429:
            responses[str(status)]["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before sending the create again.",
                    "schema": {"type": "integer", "minimum": 0},
                }
            }
    operation["responses"] = responses
    if not secured:
        operation["security"] = []
    return operation


def _page(operation_id: str, summary: str, *, tag: str) -> dict[str, JSON]:
    """A page of the browser's: it holds no data, so it needs no key."""
    return _operation(
        operation_id,
        summary,
        tag=tag,
        description="It holds no data: it loads without the key, then asks for it when the server has one.",
        answers={200: ("The page.", {"text/html": {"schema": {"type": "string"}}})},
        secured=False,
    )


def _websocket(operation_id: str, summary: str, description: str) -> dict[str, JSON]:
    operation = _operation(
        operation_id,
        summary,
        tag="websockets",
        answers={
            101: (
                "Switching Protocols: the socket is open; its first message must be the auth message.",
                None,
            )
        },
        description=description + " Messages are in the README's Wire protocol section.",
        secured=False,
    )
    operation["x-websocket"] = True
    return operation


def document(version: str) -> dict[str, JSON]:
    """The OpenAPI 3.1 document of the server's routes (``version``: the server's)."""
    build = SchemaBuilder()
    run = build.schema(TaskRun)
    runs = build.schema(list[TaskRun])
    create = build.schema(TaskRunCreate)
    set_state = build.schema(SetStateRequest)
    set_state_result = build.schema(SetStateResult)
    build.components["Error"] = _ERROR
    build.components["QueueFull"] = _QUEUE_FULL
    build.components["QueueRoom"] = _QUEUE_ROOM
    build.components["Health"] = _HEALTH
    build.components["WaitRequest"] = _WAIT_REQUEST
    # A proposed state needs only its type: a missing name becomes the type's.
    build.components["StateProposal"] = {
        **build.components["State"],
        "required": ["type"],
        "description": "A proposed state: a type, and what else it carries (a missing name is the type's).",
    }
    build.components["SetStateRequest"]["properties"]["state"] = build.ref("StateProposal")
    api = protocol.API_PREFIX
    create_example = {
        "id": _RUN_ID,
        "task_key": "app.say",
        "parameters": {"text": "hi"},
        "tags": ["example"],
    }
    run_answer = ("The run.", _json_content(run))
    state_answer = ("How the proposal was judged.", _json_content(set_state_result))
    paths: dict[str, dict[str, JSON]] = {
        api + protocol.HEALTH: {
            "get": _operation(
                "health",
                "The server's health",
                tag="server",
                answers={200: ("The server is up.", _json_content(build.ref("Health")))},
                secured=False,
            )
        },
        api + protocol.RUNS: {
            "post": _operation(
                "createRun",
                "Create one run",
                tag="runs",
                description="A create whose id (or idempotency key, with the same task key) names a run "
                "already made gets that run back (200) instead of a second one.",
                body=create,
                example=create_example,
                answers={
                    201: (
                        "The new run: SCHEDULED; PENDING when it was leased at once to a worker "
                        "with room; COMPLETED when answered from the cache; CANCELLED when born so.",
                        _json_content(run),
                    ),
                    200: ("The run the id or idempotency key already named.", _json_content(run)),
                },
                errors=(409, 422, 429, 503),
            ),
            "get": _operation(
                "listRuns",
                "List runs",
                tag="runs",
                description="In the order they were created (oldest first unless sort says otherwise).",
                params=(
                    _param(
                        "task_key",
                        "query",
                        {"type": "string"},
                        "Only runs of this task key.",
                        example="app.say",
                    ),
                    _param(
                        "state",
                        "query",
                        build.schema(StateType),
                        "Only runs in this state type (any case).",
                        example="COMPLETED",
                    ),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "At most this many.",
                    ),
                    _param(
                        "offset",
                        "query",
                        {"type": "integer", "minimum": 0, "default": 0},
                        "Skip this many first.",
                    ),
                    _param(
                        "sort",
                        "query",
                        {"type": "string", "enum": ["CREATED_ASC", "CREATED_DESC"], "default": "CREATED_ASC"},
                        "CREATED_DESC: newest first (any case).",
                    ),
                    _param(
                        "parent_task_run_id",
                        "query",
                        {"type": "string", "format": "uuid"},
                        "Only the runs submitted from inside this run (its children).",
                    ),
                    _param(
                        "group_id",
                        "query",
                        {"type": "string", "format": "uuid"},
                        "Only the runs of this run group.",
                    ),
                    _param(
                        "tag",
                        "query",
                        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 20},
                        "Only runs with this tag; repeated (tag=a&tag=b), runs with every tag given.",
                        example=["nightly"],
                    ),
                    _param(
                        "fields",
                        "query",
                        {"type": "string", "enum": ["all", "summary"], "default": "all"},
                        "summary: each run without its parameters and without its state's data (the "
                        "result or error), for lists that show neither.",
                    ),
                ),
                answers={200: ("The runs.", _json_content(runs))},
                errors=(422, 503),
            ),
        },
        api + protocol.RUNS_BATCH: {
            "post": _operation(
                "createRuns",
                "Create many runs",
                tag="runs",
                description="In order, in one transaction: a 409 or 422 for one creates none, and so does "
                "a 429, unless partial=true: then the first creates that fit are made, and the 429 "
                "carries their runs.",
                params=(
                    _param(
                        "partial",
                        "query",
                        {"type": "string", "enum": ["true", "false"], "default": "false"},
                        "true: when a queue is full, make the creates that fit and refuse only the rest.",
                    ),
                ),
                body={"type": "array", "items": create},
                example=[{"task_key": "app.say", "parameters": {"text": t}} for t in ("a", "b")],
                answers={201: ("The runs, in the order asked.", _json_content(runs))},
                errors=(409, 422, 429, 503),
            )
        },
        api + protocol.RUNS_ROOM: {
            "get": _operation(
                "waitForRoom",
                "Wait for room in a task key's queue",
                tag="runs",
                description="A long-poll: answers as soon as at least wanted more runs of the key fit in "
                "its queue (--max-queued), or when the timeout passed, with the room then; at once on a "
                "server that shares its database with others.",
                params=(
                    _param(
                        "task_key",
                        "query",
                        {"type": "string"},
                        "The task key.",
                        required=True,
                        example="app.say",
                    ),
                    _param(
                        "wanted",
                        "query",
                        {"type": "integer", "minimum": 1, "default": 1},
                        "Answer once this many fit.",
                    ),
                    _param(
                        "timeout",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": 300, "default": 30},
                        "Seconds to wait at most.",
                    ),
                ),
                answers={200: ("The room in the queue.", _json_content(build.ref("QueueRoom")))},
                errors=(422, 503),
            )
        },
        api + protocol.RUNS_FIND: {
            "get": _operation(
                "findRuns",
                "Find runs by the start of their ids",
                tag="runs",
                description="The runs whose id starts with id_prefix, in the order of their ids: how the "
                "command line takes a short id (the first 8 hex digits, as its tables show them). Found "
                "through the index of ids, never by a scan.",
                params=(
                    _param(
                        "id_prefix",
                        "query",
                        {"type": "string", "pattern": "^[0-9a-fA-F-]+$", "minLength": 1},
                        "1 to 32 hex digits, any case, dashes optional.",
                        required=True,
                        example=_RUN_ID[:8],
                    ),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 10},
                        "At most this many.",
                    ),
                ),
                answers={200: ("The runs.", _json_content(runs))},
                errors=(422, 503),
            )
        },
        api + protocol.RUNS_WAIT: {
            "post": _operation(
                "waitForRuns",
                "Wait for runs to end",
                tag="runs",
                description="A long-poll: answers as soon as one run (or, with all, every run) ended, "
                "or when the timeout passed.",
                body=build.ref("WaitRequest"),
                example={"ids": [_RUN_ID], "timeout": 1, "all": True},
                answers={
                    200: (
                        "The runs that ended, those missing, those still pending.",
                        _json_content(build.schema(WaitResult)),
                    )
                },
                errors=(422, 503),
            )
        },
        api + protocol.RUNS_PURGE: {
            "post": _operation(
                "purgeRuns",
                "Delete runs that ended long ago",
                tag="runs",
                description="Deletes, with their history, the runs that ended more than older_than seconds "
                "ago (0: every ended run); runs that have not ended are never touched.",
                body=build.schema(PurgeRequest),
                example={"older_than": 7 * 86400, "task_key": "app.say", "state": "COMPLETED"},
                answers={200: ("How many were deleted.", _json_content(build.schema(PurgeResult)))},
                errors=(422, 503),
            )
        },
        api + protocol.RUN: {
            "get": _operation(
                "readRun",
                "One run",
                tag="runs",
                params=(_run_id(),),
                answers={200: run_answer},
                errors=(404, 503),
            ),
            "delete": _operation(
                "deleteRun",
                "Delete a run and its history",
                tag="runs",
                description="A worker that holds it is told to cancel it.",
                params=(_run_id(),),
                answers={204: ("Deleted.", None)},
                errors=(404, 503),
            ),
        },
        api + protocol.RUN_HISTORY: {
            "get": _operation(
                "runHistory",
                "Every state the run went through",
                tag="runs",
                params=(_run_id(),),
                answers={200: ("Its states, oldest first.", _json_content(build.schema(list[StateChange])))},
                errors=(404, 503),
            )
        },
        api + protocol.RUN_WAIT: {
            "get": _operation(
                "waitForRun",
                "Wait for one run to end",
                tag="runs",
                params=(
                    _run_id(),
                    _param(
                        "timeout",
                        "query",
                        {"type": "number", "minimum": 0, "maximum": 300, "default": 30},
                        "Seconds to wait at most.",
                        example=1,
                    ),
                ),
                answers={200: ("The run: ended, or as it is when the timeout passed.", _json_content(run))},
                errors=(404, 422, 503),
            )
        },
        api + protocol.RUN_SET_STATE: {
            "post": _operation(
                "setRunState",
                "Propose a state",
                tag="runs",
                description="Judged by the lifecycle's rules; force skips them.",
                params=(_run_id(),),
                body=set_state,
                example={"state": {"type": "CANCELLED", "message": "not needed any more"}},
                answers={200: state_answer},
                errors=(404, 422, 503),
            )
        },
        api + protocol.RUN_CANCEL: {
            "post": _operation(
                "cancelRun",
                "Cancel a run and its descendants",
                tag="runs",
                description="Set CANCELLED at once, with every run submitted from inside it (and from "
                "inside those) that has not ended, in one transaction; detached runs and theirs are left "
                "alone. The workers that hold them are told to stop them.",
                params=(_run_id(),),
                answers={
                    200: (
                        "How the cancel was judged, and the descendants cancelled with the run.",
                        _json_content(build.schema(CancelResult)),
                    )
                },
                errors=(404, 409, 503),
            )
        },
        api + protocol.RUN_DESCENDANTS: {
            "get": _operation(
                "runDescendants",
                "The runs submitted from inside a run, at every depth",
                tag="runs",
                description="Its children, theirs, and so on (detached ones too), in the order they were "
                "created; found level by level through the index of parent ids, at most limit of them "
                "(the nearest levels first).",
                params=(
                    _run_id(),
                    _param(
                        "limit",
                        "query",
                        {"type": "integer", "minimum": 1, "maximum": 10000, "default": 1000},
                        "At most this many.",
                    ),
                    _param(
                        "fields",
                        "query",
                        {"type": "string", "enum": ["all", "summary"], "default": "all"},
                        "summary: each run without its parameters and its state's data.",
                    ),
                ),
                answers={200: ("The runs.", _json_content(runs))},
                errors=(404, 422, 503),
            )
        },
        api + protocol.GROUP_CANCEL: {
            "post": _operation(
                "cancelRunGroup",
                "Cancel a run group",
                tag="runs",
                description="In one transaction: marks the group cancelled (a run created in it later is "
                "created CANCELLED), and cancels its runs that have not ended with their descendants. A "
                "group with no run yet is cancelled all the same.",
                params=(
                    _param(
                        "group_id",
                        "path",
                        {"type": "string", "format": "uuid"},
                        "The group's id (trioworker.open_run_group's group.id).",
                        example=_GROUP_ID,
                    ),
                ),
                answers={200: ("The runs cancelled.", _json_content(build.schema(GroupCancelResult)))},
                errors=(404, 503),
            )
        },
        api + protocol.RUN_RETRY: {
            "post": _operation(
                "retryRun",
                "Run an ended run again",
                tag="runs",
                description="A new run (as a create makes it) with the same task, parameters, tags, "
                "context, parent and wait_for, named as a new submission would be (a name given at "
                "submission is kept); 409 for a run that has not ended.",
                params=(_run_id("The ended run's id."),),
                answers={201: ("The new run.", _json_content(run))},
                errors=(404, 409, 429, 503),
            )
        },
        api + protocol.OVERVIEW: {
            "get": _operation(
                "overview",
                "The operator's overview",
                tag="operators",
                description="Runs by task key and state, the run first in line per key, the ends per minute "
                "over the last hour, the connected workers, the servers.",
                answers={200: ("The overview.", _json_content(build.schema(Overview)))},
                errors=(503,),
            )
        },
        api + protocol.TASK_WORKERS: {
            "get": _operation(
                "taskWorkers",
                "The workers connected to the servers",
                tag="operators",
                description="The workers connected to this server and, on PostgreSQL, to every other "
                "live server sharing its database (as of that server's last heartbeat).",
                params=(
                    _param("task_key", "query", {"type": "string"}, "Only workers that take this task key."),
                ),
                answers={
                    200: ("Longest connected first.", _json_content(build.schema(list[ConnectedWorker])))
                },
                errors=(503,),
            )
        },
        api + protocol.SCHEDULES: {
            "get": _operation(
                "listSchedules",
                "Every schedule (periodic runs)",
                tag="schedules",
                description="By name, each with its next fire time.",
                answers={200: ("The schedules.", _json_content(build.schema(list[Schedule])))},
                errors=(503,),
            ),
            "post": _operation(
                "upsertSchedule",
                "Create a schedule, or change the one of that name",
                tag="schedules",
                description="The server creates one run of task_key at each tick, whichever servers run. "
                "Sending the same schedule again changes nothing (201 when new, else 200).",
                body=build.schema(ScheduleCreate),
                example={
                    "name": "weekday-report",
                    "task_key": "app.report",
                    "cron": "0 9 * * 1-5",
                    "timezone": "Europe/Paris",
                    "parameters": {"region": "eu"},
                },
                answers={
                    201: ("The new schedule.", _json_content(build.schema(Schedule))),
                    200: ("The schedule, changed or as it was.", _json_content(build.schema(Schedule))),
                },
                errors=(422, 503),
            ),
        },
        api + protocol.SCHEDULE: {
            "get": _operation(
                "readSchedule",
                "One schedule",
                tag="schedules",
                params=(_schedule_name(),),
                answers={200: ("The schedule.", _json_content(build.schema(Schedule)))},
                errors=(404, 503),
            ),
            "delete": _operation(
                "deleteSchedule",
                "Delete a schedule",
                tag="schedules",
                description="No more runs from it; the runs it made are kept.",
                params=(_schedule_name(),),
                answers={204: ("Deleted.", None)},
                errors=(404, 503),
            ),
        },
        METRICS_ROUTE: {
            "get": _operation(
                "metrics",
                "Prometheus metrics",
                tag="operators",
                description="The server's metrics in the Prometheus text format 0.0.4.",
                answers={200: ("The metrics.", {"text/plain": {"schema": {"type": "string"}}})},
                errors=(503,),
            )
        },
        api + OPENAPI_PATH: {
            "get": _operation(
                "openapi",
                "This document",
                tag="server",
                answers={200: ("OpenAPI 3.1.", _json_content({"type": "object"}))},
            )
        },
        api + DOCS_PATH: {"get": _page("docs", "This document as a page", tag="server")},
        "/": {"get": _page("dashboard", "The dashboard", tag="dashboard")},
        "/dashboard/{name}": {
            "get": _operation(
                "dashboardAsset",
                "The dashboard's script, stylesheet and icon",
                tag="dashboard",
                params=(_param("name", "path", {"type": "string"}, "The file's name.", example="app.js"),),
                answers={200: ("The file.", {"*/*": {"schema": {"type": "string"}}})},
                errors=(404,),
                secured=False,
            )
        },
        api + protocol.SUBSCRIPTION_PATH: {
            "get": _websocket(
                "subscription",
                "Workers: runs delivered, states reported",
                "A worker subscribes to task keys with a credit; runs are pushed to it, several per message.",
            )
        },
        api + protocol.CHANNEL_PATH: {
            "get": _websocket(
                "channel",
                "Submitters: creates, and ended runs pushed",
                "What trioworker.connect() opens: batched creates, and the watched runs pushed as they end "
                '(a create with "watch": true is watched from the start: see the README, Wire protocol).',
            )
        },
        api + protocol.EVENTS_PATH: {
            "get": _websocket(
                "events",
                "The dashboard's live feed",
                "The overview when it changes, and the runs that changed, coalesced.",
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "trioworker",
            "version": version,
            "summary": "Background task runs for Trio: the server's REST API.",
            "description": "JSON over HTTP. Times are ISO 8601 in UTC, ids are UUIDs, state types are "
            "upper-case names; fields a newer peer adds are ignored. With an API key set on the server, "
            "every route but /api/health, /api/docs and the dashboard's page needs it "
            "(Authorization: Bearer KEY); websockets send it in their first message.",
            "license": {"name": "MIT", "identifier": "MIT"},
        },
        "servers": [{"url": "/"}],
        "security": [{"apiKey": []}],
        "tags": [
            {"name": "runs", "description": "Task runs: create, read, wait, change, delete."},
            {"name": "operators", "description": "What operators watch: the overview, workers, metrics."},
            {"name": "schedules", "description": "Periodic runs: a run of a task at each tick."},
            {"name": "server", "description": "The server itself."},
            {"name": "dashboard", "description": "The dashboard's page and files."},
            {"name": "websockets", "description": "The websockets (GET upgrades)."},
        ],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(build.components.items())),
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "The server's API key, when it has one (--api-key).",
                }
            },
        },
    }

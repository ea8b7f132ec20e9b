"""The server's ASGI app: a quart-trio app for the REST routes under ``/api`` and the
dashboard at ``/`` (:mod:`~trioworker.server.dashboard`), and in front of it
:class:`WebsocketRouter`, which serves the websockets' routes (the sessions are
:mod:`~trioworker.server.subscriptions`', :mod:`~trioworker.server.channel`'s and
:mod:`~trioworker.server.events`') on hypercorn's ASGI events, without quart: quart-trio
moved every message through a task and a queue of its own, and every send through its
wrappers.

Every bad input gets a JSON ``{"detail": ...}`` with its 4xx code; the protocol is in the
README's *Wire protocol* section. The app only translates: each route is one call into
:class:`~trioworker.server.service.TaskRunService`.
"""

from __future__ import annotations

import hmac
import math
import uuid
from collections.abc import Awaitable, Callable, Collection, Mapping
from datetime import UTC, datetime
from typing import Final
from urllib.parse import urlsplit

import orjson
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope, WebsocketScope
from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioworker import protocol
from trioworker._version import __version__
from trioworker.models import (
    JSON,
    PurgeRequest,
    PurgeResult,
    ScheduleCreate,
    SetStateRequest,
    StateType,
    TaskRun,
    converter,
)
from trioworker.protocol import route
from trioworker.server import dashboard, guard, openapi
from trioworker.server.channel import ChannelSession
from trioworker.server.events import EventsSession
from trioworker.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from trioworker.server.metrics import METRICS_ROUTE
from trioworker.server.service import TaskRunService
from trioworker.server.sockets import (
    AsgiWebsocket,
    Refusal,
    creates_from,
    structure,
    validate_state_request,
    with_state_name,
)
from trioworker.server.store.base import StoreError
from trioworker.server.subscriptions import SubscriptionSession

SUBSCRIPTION_ROUTE: Final = route(protocol.SUBSCRIPTION_PATH)
CHANNEL_ROUTE: Final = route(protocol.CHANNEL_PATH)
MAX_LIST_LIMIT: Final = 1000
#: The most runs one answer of ``GET /api/task_runs/{id}/descendants`` carries.
MAX_DESCENDANTS: Final = 10_000
MAX_WAIT_SECONDS: Final = 300.0
#: The most ``tag`` filters one list of runs takes (a run must carry every one).
MAX_TAG_FILTERS: Final = 20
#: The most a purge's ``older_than`` may be: 100 years, in seconds.
MAX_PURGE_AGE: Final = 100 * 365.25 * 86400


def _json_response(payload: JSON, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def _dump(obj: object, status: int = 200) -> Response:
    return _json_response(converter.unstructure(obj), status)


def _summary(run: dict[str, JSON]) -> JSON:
    """An unstructured run without its parameters and its state's data (``fields=summary``)."""
    run.pop("parameters", None)
    state = run.get("state")
    if isinstance(state, dict):
        state.pop("data", None)
    return run


def _fields() -> str:
    """The ``fields`` query parameter: ``all`` (the default) or ``summary``.

    Raises:
        Refusal: 422 for anything else.
    """
    fields = request.args.get("fields", "all").lower()
    if fields not in ("all", "summary"):
        raise Refusal(422, f"fields must be all or summary (no parameters, no result), got {fields!r}")
    return fields


def _dump_runs(runs: list[TaskRun], fields: str) -> Response:
    """``runs`` whole, or as summaries (:func:`_summary`) for ``fields=summary``."""
    if fields == "all":
        return _dump(runs)
    return _json_response([_summary(converter.unstructure(run)) for run in runs])


def _parse_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Refusal(404, f"no task run {value!r}: not a UUID") from None


async def _body() -> JSON:
    if request.mimetype != "application/json":
        # Also what keeps a page of another site from posting a form or text/plain body
        # (which browsers send without asking): see trioworker.server.guard.
        raise Refusal(
            415, f"send the body as Content-Type: application/json, not {request.mimetype or 'none'!r}"
        )
    raw = await request.get_data()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Refusal(400, f"malformed JSON: {exc}") from None


def _query_number(name: str, default: float, low: float, high: float) -> float:
    """The query parameter ``name`` as a number in [low, high] (``default`` when absent).

    Raises:
        Refusal: 422 naming ``name`` when it is not a number (NaN, inf) or out of bounds.
    """
    raw = request.args.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise Refusal(422, f"{name} must be a number, got {raw!r}") from None
    if not low <= value <= high:
        raise Refusal(422, f"{name} must be between {low:g} and {high:g}, got {raw!r}")
    return value


def _query_int(name: str, default: int, low: int, high: int) -> int:
    """The query parameter ``name`` as an integer in [low, high] (``default`` when absent).

    Raises:
        Refusal: 422 naming ``name`` when it is not a decimal integer or out of bounds.
    """
    raw = request.args.get(name)
    if raw is None:
        return default
    text = raw.strip()
    if not text.lstrip("+-").isdigit() or not text.isascii() or len(text) > 30:
        raise Refusal(422, f"{name} must be an integer, got {raw!r}")
    value = int(text)
    if not low <= value <= high:
        raise Refusal(422, f"{name} must be an integer between {low} and {high}, got {raw!r}")
    return value


def _body_seconds(body: dict[str, JSON], name: str, default: float, high: float) -> float:
    """The JSON number ``body[name]`` as seconds in [0, high] (``default`` when absent).

    Raises:
        Refusal: 422 naming ``name`` when it is not a number (a bool is not) or out of bounds.
    """
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= high:
        raise Refusal(422, f"{name} must be a number of seconds between 0 and {high:g}, got {value!r}")
    return float(value)


#: What serves one websocket handshake to a route of :class:`WebsocketRouter`.
WebsocketHandler = Callable[[AsgiWebsocket], Awaitable[None]]


def _routed_path(scope: WebsocketScope) -> str:
    """The path quart-trio would route a websocket by: an absolute-form target's path, and
    without the root path (as ``quart_trio.asgi`` cuts it)."""
    path = scope["path"]
    if not path.startswith("/"):
        path = urlsplit(path).path
    root = scope.get("root_path", "")
    if root:
        _, found, rest = path.partition(root)
        path = (rest or " ") if found else " "
    return path


class WebsocketRouter:
    """The ASGI app the server serves: a websocket handshake to one of ``routes`` (paths)
    goes to its handler, with ASGI's ``receive`` and ``send`` (as an
    :class:`~trioworker.server.sockets.AsgiWebsocket`); everything else (HTTP, other
    websocket paths, lifespan) goes to ``quart``, which keeps rules for those paths so that
    it answers other requests to them as it did (an HTTP ``GET``, a ``//`` redirect).
    """

    def __init__(self, quart: QuartTrio, routes: Mapping[str, WebsocketHandler]) -> None:
        self.quart = quart
        self.routes = dict(routes)

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "websocket":
            handler = self.routes.get(_routed_path(scope))
            if handler is not None:
                await handler(AsgiWebsocket(scope, receive, send))
                return
        await self.quart(scope, receive, send)


def create_app(
    service: TaskRunService,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 16 * 1024 * 1024,
    closing: trio.Event | None = None,
    allowed_origins: Collection[str] = (),
    loopback_only: bool = False,
) -> WebsocketRouter:
    """Build the app around ``service``: the quart app (``.quart``) and the websockets'
    routes in front of it.

    Args:
        api_key: when set, REST calls need ``Authorization: Bearer <key>`` and
            subscriptions must send it in their auth message.
        max_body_bytes: larger request bodies get 413.
        closing: set it to make every subscription close with 1012 (the server is stopping).
        allowed_origins: the origins (``http(s)://host[:port]``) of other pages that may
            change things and open websockets (see :mod:`~trioworker.server.guard`).
        loopback_only: answer only requests whose ``Host`` is a loopback name (set when the
            server listens on loopback only).

    Raises:
        ValueError: for an allowed origin that is not ``http(s)://host[:port]``.
    """
    origins = frozenset(guard.normalize_origin(o) for o in allowed_origins)
    app = QuartTrio("trioworker.server", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    closing = trio.Event() if closing is None else closing

    api_document = orjson.dumps(openapi.document(__version__))
    # Routes that hold no data: they answer without the key.
    open_routes = {route(protocol.HEALTH), route(openapi.DOCS_PATH)}

    def token_ok(token: object) -> bool:
        if api_key is None:
            return True
        return isinstance(token, str) and hmac.compare_digest(token.encode(), api_key.encode())

    @app.errorhandler(Refusal)
    async def api_error(exc: Refusal) -> Response:
        response = _json_response(exc.body(), exc.status)
        response.headers.update(exc.headers())
        return response

    @app.errorhandler(StoreError)
    async def store_error(exc: StoreError) -> Response:
        return _json_response({"detail": f"the server's store failed: {exc}"}, 503)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        detail = exc.description or exc.name
        if status == 413:
            detail = f"request body too large (limit {max_body_bytes} bytes)"
        return _json_response({"detail": detail}, status)

    @app.after_request
    async def close_after_early_errors(response: Response) -> Response:
        # An error answered before the request's body was read (401, 404, 405, 413) leaves
        # the rest of that body on the connection, where the next request would be read
        # from it and stall. Closing it after such an answer keeps clients' pools healthy.
        has_body = bool(request.content_length) or "Transfer-Encoding" in request.headers
        if response.status_code >= 400 and has_body:
            response.headers["Connection"] = "close"
        return response

    def origin_refusal(
        method: str, is_websocket: bool, scheme: str, header: Callable[[str], str | None]
    ) -> str | None:
        return guard.refusal(
            method=method,
            websocket=is_websocket,
            scheme=scheme,
            host_header=header("Host"),
            origin=header("Origin"),
            allowed_origins=origins,
            loopback_only=loopback_only,
        )

    def check_origin(method: str, is_websocket: bool) -> None:
        source = websocket if is_websocket else request
        why = origin_refusal(method, is_websocket, source.scheme, source.headers.get)
        if why is not None:
            raise Refusal(403, why)

    @app.before_request
    async def refuse_foreign_pages() -> None:
        check_origin(request.method, is_websocket=False)

    @app.before_websocket
    async def refuse_foreign_sockets() -> None:  # websockets to paths that are not routes
        check_origin("GET", is_websocket=True)

    @app.before_request
    async def authenticate() -> None:
        if service.fence.raised:  # load balancers and clients move to another server
            raise Refusal(503, f"{service.fence.reason}; use another server")
        # The dashboard's page and assets and the API document's page hold no data: they
        # load without the key, then ask for it (every other /api route and the live feed
        # need it, as does /metrics).
        if api_key is None or request.path in open_routes or dashboard.is_asset_path(request.path):
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token_ok(token):
            raise Refusal(401, "missing or wrong API key (send Authorization: Bearer <key>)")

    @app.get(route(protocol.HEALTH))
    async def health() -> Response:
        dispatcher = service.dispatcher
        ready, delayed = await service.queue_counts()
        return _json_response(
            {
                "status": "ok",
                "version": __version__,
                "ready": ready,
                "delayed": delayed,
                "blocked": service.blocked_count,
                "subscriptions": len(dispatcher.subscriptions),
            }
        )

    async def create_many(items: list[JSON], *, partial: bool = False) -> list[tuple[object, bool]]:
        return list(await service.create_runs(creates_from(items), partial=partial))

    @app.post(route(protocol.RUNS))
    async def create_run() -> Response:
        body = await _body()
        if not isinstance(body, dict):
            raise Refusal(422, "expected a JSON object describing one task run")
        [(run, created)] = await create_many([body])
        return _dump(run, 201 if created else 200)

    @app.post(route(protocol.RUNS_BATCH))
    async def create_runs() -> Response:
        body = await _body()
        if not isinstance(body, list):
            raise Refusal(422, "expected a JSON array of task runs")
        partial = request.args.get("partial", "false")
        if partial not in ("true", "false"):
            raise Refusal(422, f"partial must be true or false, got {partial!r}")
        results = await create_many(body, partial=partial == "true")
        return _dump([run for run, _ in results], 201)

    @app.get(route(protocol.RUNS))
    async def list_runs() -> Response:
        state_arg = request.args.get("state")
        state = None
        if state_arg is not None:
            try:
                state = StateType(state_arg.upper())
            except ValueError:
                raise Refusal(
                    422, f"unknown state {state_arg!r}; one of {[s.value for s in StateType]}"
                ) from None
        limit = _query_int("limit", 100, 1, MAX_LIST_LIMIT)
        offset = _query_int("offset", 0, 0, 2**62)
        sort = request.args.get("sort", "CREATED_ASC").upper()
        if sort not in ("CREATED_ASC", "CREATED_DESC"):
            raise Refusal(422, f"sort must be CREATED_ASC (oldest first) or CREATED_DESC, got {sort!r}")
        parent_arg = request.args.get("parent_task_run_id")
        try:
            parent = None if parent_arg is None else uuid.UUID(parent_arg)
        except ValueError:
            raise Refusal(422, f"parent_task_run_id must be a task run UUID, got {parent_arg!r}") from None
        group_arg = request.args.get("group_id")
        try:
            group = None if group_arg is None else uuid.UUID(group_arg)
        except ValueError:
            raise Refusal(422, f"group_id must be a run group's UUID, got {group_arg!r}") from None
        fields = _fields()
        tags = request.args.getlist("tag")
        if len(tags) > MAX_TAG_FILTERS or not all(tags):
            raise Refusal(422, f"tag must be a non-empty tag, given at most {MAX_TAG_FILTERS} times")
        runs = await service.list_runs(
            task_key=request.args.get("task_key"),
            state=state,
            limit=limit,
            offset=offset,
            parent_task_run_id=parent,
            newest_first=sort == "CREATED_DESC",
            tags=tags,
            group_id=group,
        )
        return _dump_runs(runs, fields)

    @app.get(route(protocol.RUN_DESCENDANTS))
    async def descendants(run_id: str) -> Response:
        rid = _parse_id(run_id)
        fields = _fields()
        limit = _query_int("limit", MAX_LIST_LIMIT, 1, MAX_DESCENDANTS)
        runs = await service.descendants(rid, limit=limit)
        if runs is None:
            raise Refusal(404, f"no task run {rid}")
        return _dump_runs(runs, fields)

    @app.post(route(protocol.GROUP_CANCEL))
    async def cancel_group(group_id: str) -> Response:
        try:
            gid = uuid.UUID(group_id)
        except ValueError:
            raise Refusal(404, f"no run group {group_id!r}: not a UUID") from None
        return _dump(await service.cancel_group(gid))

    @app.get(route(protocol.RUNS_FIND))
    async def find_runs() -> Response:
        raw = request.args.get("id_prefix")
        if raw is None:
            raise Refusal(422, "id_prefix is required: the start of a run id (hex digits, dashes allowed)")
        try:
            prefix = protocol.id_prefix(raw)
        except ValueError as exc:
            raise Refusal(422, f"id_prefix: {exc}") from None
        limit = _query_int("limit", 10, 1, MAX_LIST_LIMIT)
        return _dump(await service.find_runs(prefix, limit=limit))

    @app.get(route(protocol.RUNS_ROOM))
    async def queue_room() -> Response:
        task_key = request.args.get("task_key")
        if not task_key:
            raise Refusal(422, "task_key is required: the task key whose queue to wait for room in")
        wanted = _query_int("wanted", 1, 1, 2**31)
        timeout = _query_number("timeout", 30, 0, MAX_WAIT_SECONDS)
        room = await service.wait_room(task_key, wanted, seconds=timeout)
        return _json_response({"task_key": task_key, "room": room})

    @app.post(route(protocol.RUNS_WAIT))
    async def wait_many() -> Response:
        body = await _body()
        if not isinstance(body, dict) or not isinstance(body.get("ids"), list):
            raise Refusal(422, 'expected {"ids": [...], "timeout": seconds, "all": false, "linger": 0}')
        try:
            ids = [uuid.UUID(str(i)) for i in body["ids"]]
        except ValueError:
            raise Refusal(422, "ids must be task run UUIDs") from None
        timeout = _body_seconds(body, "timeout", 30, MAX_WAIT_SECONDS)
        linger = _body_seconds(body, "linger", 0, 5)
        wait_all = body.get("all", False)
        if not isinstance(wait_all, bool):
            raise Refusal(422, f"all must be true or false, got {wait_all!r}")
        result = await service.wait(ids, seconds=timeout, wait_all=wait_all, linger=linger)
        return _dump(result)

    @app.post(route(protocol.RUNS_PURGE))
    async def purge() -> Response:
        purge = structure(await _body(), PurgeRequest, "purge request")
        assert isinstance(purge, PurgeRequest)
        if not (math.isfinite(purge.older_than) and 0 <= purge.older_than <= MAX_PURGE_AGE):
            raise Refusal(
                422, f"older_than must be seconds between 0 and {MAX_PURGE_AGE:.0f}, got {purge.older_than!r}"
            )
        if purge.state is not None and not purge.state.is_terminal:
            raise Refusal(422, f"state must be a state runs end in, not {purge.state.value}")
        before = datetime.fromtimestamp(service.dispatcher.clock() - purge.older_than, UTC)
        deleted = await service.purge_ended(before, task_key=purge.task_key, state=purge.state)
        return _dump(PurgeResult(deleted))

    @app.get(route(protocol.RUN))
    async def read_run(run_id: str) -> Response:
        run = await service.read_run(_parse_id(run_id))
        if run is None:
            raise Refusal(404, f"no task run {run_id}")
        return _dump(run)

    @app.get(route(protocol.RUN_HISTORY))
    async def history(run_id: str) -> Response:
        changes = await service.history(_parse_id(run_id))
        if changes is None:
            raise Refusal(404, f"no task run {run_id}")
        return _dump(changes)

    @app.get(route(protocol.RUN_WAIT))
    async def wait_one(run_id: str) -> Response:
        rid = _parse_id(run_id)
        timeout = _query_number("timeout", 30, 0, MAX_WAIT_SECONDS)
        result = await service.wait([rid], seconds=timeout, wait_all=True)
        if result.missing:
            raise Refusal(404, f"no task run {run_id}")
        if result.ended:
            return _dump(result.ended[0])
        run = await service.read_run(rid)
        if run is None:
            raise Refusal(404, f"no task run {run_id}")
        return _dump(run)

    @app.post(route(protocol.RUN_SET_STATE))
    async def set_state(run_id: str) -> Response:
        rid = _parse_id(run_id)
        try:
            body = with_state_name(await _body())
        except ValueError as exc:
            raise Refusal(422, f"invalid state request: {exc}") from None
        proposal = structure(body, SetStateRequest, "state request")
        assert isinstance(proposal, SetStateRequest)
        try:
            validate_state_request(proposal)
        except ValueError as exc:
            raise Refusal(422, f"invalid state request: {exc}") from None
        if await service.read_run(rid) is None:
            raise Refusal(404, f"no task run {run_id}")
        [result] = await service.set_states([(rid, proposal)])
        return _dump(result)

    @app.post(route(protocol.RUN_CANCEL))
    async def cancel(run_id: str) -> Response:
        rid = _parse_id(run_id)
        if await service.read_run(rid) is None:
            raise Refusal(404, f"no task run {run_id}")
        result = await service.cancel(rid)
        if result.state.type is not StateType.CANCELLED:
            raise Refusal(409, f"cannot cancel: {result.details}")
        return _dump(result)

    @app.post(route(protocol.RUN_RETRY))
    async def retry(run_id: str) -> Response:
        return _dump(await service.retry(_parse_id(run_id)), 201)

    @app.delete(route(protocol.RUN))
    async def delete(run_id: str) -> Response:
        if await service.delete(_parse_id(run_id)) is None:
            raise Refusal(404, f"no task run {run_id}")
        return Response(b"", status=204)

    @app.get(route(protocol.OVERVIEW))
    async def overview() -> Response:
        return _dump(await service.overview())

    @app.get(route(protocol.TASK_WORKERS))
    async def task_workers() -> Response:
        return _dump(await service.task_workers(request.args.get("task_key")))

    @app.get(route(protocol.SCHEDULES))
    async def list_schedules() -> Response:
        return _dump(await service.schedules())

    @app.post(route(protocol.SCHEDULES))
    async def upsert_schedule() -> Response:
        create = structure(await _body(), ScheduleCreate, "schedule")
        assert isinstance(create, ScheduleCreate)
        schedule, new = await service.upsert_schedule(create)
        return _dump(schedule, 201 if new else 200)

    @app.get(route(protocol.SCHEDULE))
    async def read_schedule(name: str) -> Response:
        found = await service.schedules(name)
        if not found:
            raise Refusal(404, f"no schedule {name!r}")
        return _dump(found[0])

    @app.delete(route(protocol.SCHEDULE))
    async def delete_schedule(name: str) -> Response:
        if await service.delete_schedule(name) is None:
            raise Refusal(404, f"no schedule {name!r}")
        return Response(b"", status=204)

    @app.get(METRICS_ROUTE)
    async def metrics() -> Response:
        overview = await service.overview()
        return Response(
            service.metrics.exposition(overview, service.dispatcher), content_type=METRICS_CONTENT_TYPE
        )

    @app.get(route(openapi.OPENAPI_PATH))
    async def openapi_document() -> Response:
        return Response(api_document, content_type="application/json")

    assets = dashboard.read_assets()

    @app.get(route(openapi.DOCS_PATH))
    async def docs_page() -> Response:
        return dashboard.response(assets, dashboard.DOCS_PAGE)

    @app.get("/")
    async def dashboard_page() -> Response:
        return dashboard.response(assets, dashboard.PAGE)

    @app.get(f"{dashboard.ASSETS_PREFIX}/<name>")
    async def dashboard_asset(name: str) -> Response:
        if name not in assets:
            raise Refusal(404, f"no dashboard asset {name!r}")
        return dashboard.response(assets, name)

    async def subscription(socket: AsgiWebsocket) -> None:
        await SubscriptionSession(socket, service, token_ok, closing).run()

    async def channel(socket: AsgiWebsocket) -> None:
        await ChannelSession(socket, service, token_ok, closing).run()

    async def events(socket: AsgiWebsocket) -> None:
        await EventsSession(socket, service, token_ok, closing).run()

    async def serve_websocket(socket: AsgiWebsocket, session: WebsocketHandler) -> None:
        """One handshake to a websocket route, answered as quart answered it: from a foreign
        page (see :mod:`~trioworker.server.guard`), refused with 403 and a JSON detail;
        otherwise accepted, then closed with 1012 while the fence is raised, else
        ``session`` runs. An exception it raises is logged (but a :class:`Refusal` or a
        :class:`StoreError`, which quart's error handlers took quietly); a socket it leaves
        open is closed with 1000."""
        why = origin_refusal("GET", True, socket.scheme, socket.header)
        if why is not None:
            await socket.reject(403, orjson.dumps({"detail": why}))
            return
        await socket.accept()
        try:
            if service.fence.raised:  # load balancers and clients move to another server
                await socket.close(
                    protocol.CLOSE_RESTART, f"{service.fence.reason}; use another server"[:123]
                )
                return
            await session(socket)
        except (Refusal, StoreError, HTTPException):
            pass  # quart's error handlers answered these, unlogged: an accepted socket ignores the answer
        except Exception:
            app.logger.exception("Exception on websocket %s", socket.path)
        if not (socket.closed or socket.gone):
            await socket.close(protocol.CLOSE_NORMAL)

    def served(session: WebsocketHandler) -> WebsocketHandler:
        async def handler(socket: AsgiWebsocket) -> None:
            await serve_websocket(socket, session)

        return handler

    async def served_by_the_router() -> None:
        raise RuntimeError("WebsocketRouter serves this route before quart sees it")

    sessions = {SUBSCRIPTION_ROUTE: subscription, CHANNEL_ROUTE: channel, route(protocol.EVENTS_PATH): events}
    for path, session in sessions.items():
        app.websocket(path, endpoint=session.__name__)(served_by_the_router)
    return WebsocketRouter(app, {path: served(session) for path, session in sessions.items()})

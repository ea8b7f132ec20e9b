"""The server's quart-trio app: the REST routes under ``/api`` and the subscription websocket.

Every bad input gets a JSON ``{"detail": ...}`` with its 4xx code; the protocol is in the
README's *Wire protocol* section. The app only translates: each route is one call into
:class:`~trioworker.server.service.TaskRunService`.
"""

from __future__ import annotations

import hmac
import logging
import uuid
from collections.abc import Callable
from typing import Final, NoReturn

import attrs
import cattrs
import orjson
import trio
from quart import Response, request, websocket
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from trioworker import protocol
from trioworker._version import __version__
from trioworker.models import (
    ACTIVE_STATES,
    JSON,
    SetStateRequest,
    SetStateStatus,
    StateType,
    converter,
)
from trioworker.protocol import CLOSE_NORMAL, CLOSE_PROTOCOL, route
from trioworker.server.channel import ChannelSession
from trioworker.server.queue import Subscription
from trioworker.server.service import TaskRunService
from trioworker.server.sockets import (
    HANDSHAKE_TIMEOUT,
    ConnectionGone,
    JsonSocket,
    ProtocolViolation,
    Refusal,
    creates_from,
    describe,
    structure,
    validate_state_request,
    with_state_name,
)
from trioworker.server.store.base import StoreError
from trioworker.settings import MAX_PREFETCH

log = logging.getLogger("trioworker.server")

SUBSCRIPTION_PATH: Final = route(protocol.SUBSCRIPTION_PATH)
CHANNEL_PATH: Final = route(protocol.CHANNEL_PATH)
MAX_LIST_LIMIT: Final = 1000
MAX_WAIT_SECONDS: Final = 300.0
#: Report messages a connection may have queued before its reader waits for them.
MAX_QUEUED_OPS: Final = 1000


def _json_response(payload: JSON, status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status=status, content_type="application/json")


def _dump(obj: object, status: int = 200) -> Response:
    return _json_response(converter.unstructure(obj), status)


def _parse_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Refusal(404, f"no task run {value!r}: not a UUID") from None


async def _body() -> JSON:
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


def create_app(
    service: TaskRunService,
    *,
    api_key: str | None = None,
    max_body_bytes: int = 16 * 1024 * 1024,
    closing: trio.Event | None = None,
) -> QuartTrio:
    """Build the app around ``service``.

    Args:
        api_key: when set, REST calls need ``Authorization: Bearer <key>`` and
            subscriptions must send it in their auth message.
        max_body_bytes: larger request bodies get 413.
        closing: set it to make every subscription close with 1012 (the server is stopping).
    """
    app = QuartTrio("trioworker.server")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    closing = trio.Event() if closing is None else closing

    def token_ok(token: object) -> bool:
        if api_key is None:
            return True
        return isinstance(token, str) and hmac.compare_digest(token.encode(), api_key.encode())

    @app.errorhandler(Refusal)
    async def api_error(exc: Refusal) -> Response:
        return _json_response({"detail": exc.detail}, exc.status)

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

    @app.before_request
    async def authenticate() -> None:
        if request.path == route(protocol.HEALTH) or api_key is None:
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token_ok(token):
            raise Refusal(401, "missing or wrong API key (send Authorization: Bearer <key>)")

    @app.get(route(protocol.HEALTH))
    async def health() -> Response:
        dispatcher = service.dispatcher
        return _json_response(
            {
                "status": "ok",
                "version": __version__,
                "ready": dispatcher.ready_count(),
                "delayed": dispatcher.delayed_count,
                "blocked": service.blocked_count,
                "subscriptions": len(dispatcher.subscriptions),
            }
        )

    async def create_many(items: list[JSON]) -> list[tuple[object, bool]]:
        return list(await service.create_runs(creates_from(items)))

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
        results = await create_many(body)
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
        runs = await service.list_runs(
            task_key=request.args.get("task_key"), state=state, limit=limit, offset=offset
        )
        return _dump(runs)

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

    @app.delete(route(protocol.RUN))
    async def delete(run_id: str) -> Response:
        if await service.delete(_parse_id(run_id)) is None:
            raise Refusal(404, f"no task run {run_id}")
        return Response(b"", status=204)

    @app.websocket(SUBSCRIPTION_PATH)
    async def subscription() -> None:
        await websocket.accept()
        session = _SubscriptionSession(service, token_ok, closing)
        await session.run()

    @app.websocket(CHANNEL_PATH)
    async def channel() -> None:
        await websocket.accept()
        await ChannelSession(service, token_ok, closing).run()

    return app


@attrs.frozen
class _ReceivedReport:
    """One state report as the server read it from a worker's message."""

    run_id: uuid.UUID
    request: SetStateRequest
    ref: JSON


class _SubscriptionSession(JsonSocket):
    """One subscription socket: handshake, then deliveries out and reports in, concurrently."""

    def __init__(
        self, service: TaskRunService, token_ok: Callable[[object], bool], closing: trio.Event
    ) -> None:
        super().__init__(token_ok, closing)
        self.service = service
        self.quitting = False
        #: State reports being applied: a quitting session closes only after their answers.
        self.reports_in_flight = 0
        #: Reports and releases waiting for :meth:`apply_forever`, in arrival order.
        self.ops: list[tuple[str, object]] = []
        self.ops_ready = trio.Event()
        self.ops_applied = trio.Event()
        self.held_at_subscribe: list[uuid.UUID] = []
        self.acks = 0

    async def run(self) -> None:
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                sub = await self.handshake()
        except ConnectionGone:
            return
        except ProtocolViolation as exc:
            await self.close(CLOSE_PROTOCOL, f"Protocol violation: {exc}")
            return
        except trio.TooSlowError:
            await self.close(
                CLOSE_PROTOCOL, f"Protocol violation: no auth and subscribe within {HANDSHAKE_TIMEOUT:g} s"
            )
            return
        if sub is None:
            return
        self.service.dispatcher.subscribe(sub)
        log.info("subscription from %s to %s with credit %d", sub.client_id, ", ".join(sub.keys), sub.credit)
        violation: ProtocolViolation | None = None
        try:
            await self.service.reclaim(sub, self.held_at_subscribe)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.deliver_forever, sub, nursery.cancel_scope)
                nursery.start_soon(self.apply_ops, sub, nursery.cancel_scope)
                nursery.start_soon(self.close_on_shutdown, nursery.cancel_scope)
                try:
                    await self.receive_forever(sub)
                except ProtocolViolation as exc:
                    violation = exc
                except ConnectionGone:
                    pass
                nursery.cancel_scope.cancel()
            if violation is not None:
                await self.close(CLOSE_PROTOCOL, f"Protocol violation: {violation}")
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await self.service.disconnect(sub, clean=self.quitting)
                except StoreError as exc:
                    # The store closed (the server is stopping) or failed: the next start
                    # requeues what this connection held.
                    log.warning(
                        "%s's runs were not requeued (%s); the next start does it", sub.client_id, exc
                    )
            log.info("subscription from %s ended", sub.client_id)

    async def handshake(self) -> Subscription | None:
        if not await self.authenticate():
            return None
        message = await self.receive()
        if message["type"] != protocol.SUBSCRIBE:
            raise ProtocolViolation('the second message must be {"type": "subscribe", ...}')
        keys, client_id, credit = message.get("keys"), message.get("client_id"), message.get("credit")
        if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
            raise ProtocolViolation('"keys" must be a non-empty list of task keys')
        if not isinstance(client_id, str) or not client_id:
            raise ProtocolViolation('"client_id" must be a non-empty string')
        if not isinstance(credit, int) or isinstance(credit, bool) or credit < 0:
            raise ProtocolViolation('"credit" must be an integer >= 0')
        prefetch = message.get("prefetch", 0)
        if not isinstance(prefetch, int) or isinstance(prefetch, bool) or not 0 <= prefetch <= MAX_PREFETCH:
            raise ProtocolViolation(f'"prefetch" must be an integer from 0 to {MAX_PREFETCH}')
        held = message.get("held", [])
        try:
            held_ids = [uuid.UUID(str(i)) for i in held] if isinstance(held, list) else None
        except ValueError:
            held_ids = None
        if held_ids is None:
            raise ProtocolViolation('"held" must be a list of task run ids')
        sub = Subscription(
            client_id=client_id, keys=tuple(dict.fromkeys(keys)), credit=credit, prefetch=prefetch
        )
        self.held_at_subscribe = held_ids
        return sub

    async def apply_ops(self, sub: Subscription, scope: trio.CancelScope) -> None:
        try:
            await self.apply_forever(sub)
        except ConnectionGone:
            scope.cancel()

    async def deliver_forever(self, sub: Subscription, scope: trio.CancelScope) -> None:
        try:
            await self._deliver(sub, scope)
        except ConnectionGone:
            scope.cancel()

    async def _deliver(self, sub: Subscription, scope: trio.CancelScope) -> None:
        while True:
            if sub.cancels:
                ids, sub.cancels = sub.cancels, []
                await self.send({"type": protocol.CANCEL, "ids": [str(i) for i in ids]})
                continue
            if sub.revokes:
                ids, sub.revokes = sub.revokes, []
                await self.send({"type": protocol.REVOKE, "ids": [str(i) for i in ids]})
                continue
            if self.quitting:
                if not sub.held and not self.reports_in_flight:
                    scope.cancel()
                    with trio.CancelScope(shield=True), trio.move_on_after(1):
                        await self.close(CLOSE_NORMAL, "quit")
                    return
            else:
                delivery = await self.service.next_runs(sub)
                if delivery.runs:
                    await self.send(
                        {"type": protocol.TASK_RUNS, "task_runs": converter.unstructure(delivery.runs)}
                    )
                    await delivery.confirm()
                    continue
                self.service.dispatcher.revoke_for(sub)
            await sub.wait_for_work()

    async def receive_forever(self, sub: Subscription) -> NoReturn:
        while True:
            message = await self.receive()
            handler = self._handlers.get(message["type"])
            if handler is None:
                raise ProtocolViolation(f"unknown message type {message['type']!r}")
            await handler(self, sub, message)

    async def on_ack(self, sub: Subscription, message: dict[str, JSON]) -> None:
        self.acks += 1

    async def on_credit(self, sub: Subscription, message: dict[str, JSON]) -> None:
        n = message.get("n")
        if not isinstance(n, int) or isinstance(n, bool):
            raise ProtocolViolation('"n" of a credit message must be an integer')
        self.service.dispatcher.set_credit(sub, sub.credit + n)

    async def on_states(self, sub: Subscription, message: dict[str, JSON]) -> None:
        items = message.get("states")
        if not isinstance(items, list):
            raise ProtocolViolation('"states" must be a list of {"id", "state", "force"?}')
        reports: list[_ReceivedReport] = []
        for item in items:
            if not isinstance(item, dict):
                raise ProtocolViolation("each state report must be an object")
            try:
                run_id = uuid.UUID(str(item.get("id")))
                request_ = converter.structure(with_state_name(item), SetStateRequest)
                validate_state_request(request_)
            except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
                raise ProtocolViolation(f"bad state report: {describe(exc)}") from None
            reports.append(_ReceivedReport(run_id, request_, item.get("ref")))
        sub.started(r.run_id for r in reports)
        sub.finished(r.run_id for r in reports if r.request.state.type not in ACTIVE_STATES)
        await self._enqueue(("states", reports))

    async def _enqueue(self, op: tuple[str, object]) -> None:
        """Hand an op to :meth:`apply_forever`, in order; waits while too many are queued.

        Reports are not applied while the socket is read: the reader keeps reading, and
        all reports that arrive while one group commit runs share the next one.
        """
        while len(self.ops) >= MAX_QUEUED_OPS:
            self.ops_applied = self.ops_applied if not self.ops_applied.is_set() else trio.Event()
            await self.ops_applied.wait()
        self.ops.append(op)
        self.reports_in_flight += 1
        self.ops_ready.set()

    async def apply_forever(self, sub: Subscription) -> None:
        """Apply queued reports and releases in order; consecutive reports in one go."""
        while True:
            await self.ops_ready.wait()
            self.ops_ready = trio.Event()
            ops, self.ops = self.ops, []
            self.ops_applied.set()
            try:
                start = 0
                while start < len(ops):
                    kind, payload = ops[start]
                    if kind == "release":
                        assert isinstance(payload, list)
                        await self.service.release(sub, payload)
                        start += 1
                        continue
                    end = start
                    reports: list[_ReceivedReport] = []
                    while end < len(ops) and ops[end][0] == "states":
                        batch = ops[end][1]
                        assert isinstance(batch, list)
                        reports += batch
                        end += 1
                    await self._apply_reports(sub, reports)
                    start = end
            finally:
                self.reports_in_flight -= len(ops)
                sub.wake()

    async def _apply_reports(self, sub: Subscription, reports: list[_ReceivedReport]) -> None:
        results = await self.service.set_states([(r.run_id, r.request) for r in reports], reporter=sub)
        # Let the clients waiting for these runs hear first: the worker needs no hurry.
        await trio.lowlevel.cancel_shielded_checkpoint()
        await self.send(
            {
                "type": protocol.STATE_RESULTS,
                "results": [
                    {
                        "id": str(report.run_id),
                        "ref": report.ref,
                        "status": result.status.value,
                        "details": result.details,
                        "state": None
                        if result.status is SetStateStatus.ACCEPT
                        else converter.unstructure(result.state),
                    }
                    for report, result in zip(reports, results, strict=True)
                ],
            }
        )

    async def on_release(self, sub: Subscription, message: dict[str, JSON]) -> None:
        ids = message.get("ids")
        try:
            run_ids = [uuid.UUID(str(i)) for i in ids] if isinstance(ids, list) else None
        except ValueError:
            run_ids = None
        if run_ids is None:
            raise ProtocolViolation('"ids" of a release message must be a list of task run ids')
        await self._enqueue(("release", run_ids))

    async def on_quit(self, sub: Subscription, message: dict[str, JSON]) -> None:
        self.quitting = True
        sub.wake()

    async def on_subscribe(self, sub: Subscription, message: dict[str, JSON]) -> None:
        raise ProtocolViolation("already subscribed")

    _handlers: Final = {
        protocol.ACK: on_ack,
        protocol.CREDIT: on_credit,
        protocol.STATES: on_states,
        protocol.RELEASE: on_release,
        protocol.QUIT: on_quit,
        protocol.SUBSCRIBE: on_subscribe,
    }

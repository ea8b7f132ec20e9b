"""The subscription: a worker's websocket, ``/api/task_runs/subscriptions/scheduled``.

1. client ``{"type": "auth", "token": ...}`` → ``{"type": "auth_success"}`` (or close 1008);
2. client ``{"type": "subscribe", "keys": [...], "client_id": ..., "credit": n,
   "prefetch": p, "held": [...]}``; runs it still ``held`` from a lost connection are given
   back if nobody else took them;
3. then both ways at once: the server sends ``task_runs`` as the connection's credit allows,
   ``cancel`` and ``revoke``; the client sends ``ack``, ``credit``, ``states`` (answered by
   ``state_results``, reports that arrive together share one group commit), ``release``,
   and ``quit`` to end it cleanly.

When the connection ends, every run it held and did not finish goes to another worker. A
broken message closes the socket with 4001 ("Protocol violation: ..."); a stopping server
closes it with 1012.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final, NoReturn

import attrs
import cattrs
import trio

from trioworker import protocol
from trioworker.models import ACTIVE_STATES, JSON, SetStateRequest, SetStateStatus, converter
from trioworker.protocol import CLOSE_NORMAL, CLOSE_PROTOCOL
from trioworker.server.queue import Subscription
from trioworker.server.service import TaskRunService
from trioworker.server.sockets import (
    HANDSHAKE_TIMEOUT,
    AsgiWebsocket,
    ConnectionGone,
    JsonSocket,
    ProtocolViolation,
    describe,
    validate_state_request,
    with_state_name,
)
from trioworker.server.store.base import StoreError
from trioworker.settings import MAX_PREFETCH

log = logging.getLogger("trioworker.server")

#: Report messages a connection may have queued before its reader waits for them.
MAX_QUEUED_OPS: Final = 1000
#: Seconds before a store operation of a connection that failed is tried again (the
#: database is away), doubled after each failure up to STORE_RETRY_MAX.
STORE_RETRY_FIRST: Final = 0.1
STORE_RETRY_MAX: Final = 1.0


@attrs.frozen
class _ReceivedReport:
    """One state report as the server read it from a worker's message."""

    run_id: uuid.UUID
    request: SetStateRequest
    ref: JSON


class SubscriptionSession(JsonSocket):
    """One subscription socket: handshake, then deliveries out and reports in, concurrently."""

    def __init__(
        self,
        socket: AsgiWebsocket,
        service: TaskRunService,
        token_ok: Callable[[object], bool],
        closing: trio.Event,
    ) -> None:
        super().__init__(socket, token_ok, closing, service.fence)
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
        self.service.subscribe(sub)
        log.info("subscription from %s to %s with credit %d", sub.client_id, ", ".join(sub.keys), sub.credit)
        violation: ProtocolViolation | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.close_on_shutdown, nursery.cancel_scope)
                held = self.held_at_subscribe
                await self.until_stored(sub, "taking back its runs", lambda: self.service.reclaim(sub, held))
                nursery.start_soon(self.deliver_forever, sub, nursery.cancel_scope)
                nursery.start_soon(self.apply_ops, sub, nursery.cancel_scope)
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
                    await self.until_stored(sub, "its reports", partial(self._apply_reports, sub, reports))
                    start = end
            finally:
                self.reports_in_flight -= len(ops)
                sub.wake()

    async def until_stored(
        self, sub: Subscription, what: str, operation: Callable[[], Awaitable[None]]
    ) -> None:
        """Run ``operation`` (a store operation for ``sub``) until the store takes it.

        While the database cannot be reached (it restarts, the network fails) the socket
        stays open and the worker waits for its answer: the operation is tried again after
        :data:`STORE_RETRY_FIRST` seconds, twice as long each time up to
        :data:`STORE_RETRY_MAX`. A repeat is harmless (a report the store may have saved
        is a no-op the second time). If the database stays away, the fence of a server
        sharing it closes the socket (:mod:`~trioworker.server.fence`), which cancels this.
        """
        delay = STORE_RETRY_FIRST
        failing = False
        while True:
            try:
                await operation()
            except StoreError as exc:
                if not failing:
                    log.warning("%s of %s failed (%s); trying again", what, sub.client_id, exc)
                failing = True
                await trio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX)
                continue
            if failing:
                log.info("%s of %s stored", what, sub.client_id)
            return

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

"""The REST client: one long-lived ``httpx.AsyncClient`` per :class:`TaskRunClient`.

Errors are translated where they happen: a refused or broken connection becomes
:class:`~trioworker.errors.ServerUnavailable`, an error status an
:class:`~trioworker.errors.ApiError` (:class:`~trioworker.errors.NotFound` for 404).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self

import httpx
import orjson

from trioworker.errors import ApiError, NotFound, ServerUnavailable
from trioworker.models import (
    JSON,
    SetStateRequest,
    SetStateResult,
    State,
    StateChange,
    StateType,
    TaskRun,
    TaskRunCreate,
    converter,
)
from trioworker.settings import Settings

#: Seconds a request may take; long-polls add their own wait on top.
DEFAULT_TIMEOUT = 30.0


def _raise_for_status(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail = str(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        detail = response.text or response.reason_phrase
    cls = NotFound if response.status_code == 404 else ApiError
    raise cls(response.status_code, detail)


def headers_for(api_key: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


class TaskRunClient:
    """Async client for the task-run API. Use it as ``async with TaskRunClient() as client``.

    Args:
        api_url: the server's API root (default ``TRIOWORKER_API_URL``).
        api_key: sent as a bearer token (default ``TRIOWORKER_API_KEY``).
        transport: an httpx transport, for tests that do without a network.
    """

    def __init__(
        self,
        api_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        settings = Settings.from_env()
        self.api_url = (api_url or settings.api_url).rstrip("/")
        self.api_key = api_key if api_key is not None else settings.api_key
        self._http = httpx.AsyncClient(
            base_url=self.api_url,
            headers=headers_for(self.api_key),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> Self:
        await self._http.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._http.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, *, body: JSON = None, **kwargs: Any) -> JSON:
        content = None if body is None else orjson.dumps(body)
        try:
            response = await self._http.request(method, path, content=content, **kwargs)
        except httpx.TransportError as exc:
            raise ServerUnavailable(f"cannot reach the trioworker server at {self.api_url}: {exc!r}") from exc
        _raise_for_status(response)
        return orjson.loads(response.content) if response.content else None

    async def health(self) -> dict[str, JSON]:
        result = await self._request("GET", "/health")
        assert isinstance(result, dict)
        return result

    async def create_task_run(self, create: TaskRunCreate) -> TaskRun:
        data = await self._request("POST", "/task_runs", body=converter.unstructure(create))
        return converter.structure(data, TaskRun)

    async def create_task_runs(self, creates: Sequence[TaskRunCreate]) -> list[TaskRun]:
        data = await self._request("POST", "/task_runs/batch", body=converter.unstructure(list(creates)))
        return converter.structure(data, list[TaskRun])

    async def read_task_run(self, run_id: uuid.UUID) -> TaskRun:
        return converter.structure(await self._request("GET", f"/task_runs/{run_id}"), TaskRun)

    async def read_task_runs(
        self,
        *,
        task_key: str | None = None,
        state: StateType | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[TaskRun]:
        params: dict[str, str | int] = {"limit": limit, "offset": offset}
        if task_key is not None:
            params["task_key"] = task_key
        if state is not None:
            params["state"] = state.value
        return converter.structure(await self._request("GET", "/task_runs", params=params), list[TaskRun])

    async def history(self, run_id: uuid.UUID) -> list[StateChange]:
        return converter.structure(
            await self._request("GET", f"/task_runs/{run_id}/history"), list[StateChange]
        )

    async def set_state(self, run_id: uuid.UUID, state: State, *, force: bool = False) -> SetStateResult:
        body = converter.unstructure(SetStateRequest(state, force))
        data = await self._request("POST", f"/task_runs/{run_id}/set_state", body=body)
        return converter.structure(data, SetStateResult)

    async def cancel(self, run_id: uuid.UUID) -> SetStateResult:
        data = await self._request("POST", f"/task_runs/{run_id}/cancel")
        return converter.structure(data, SetStateResult)

    async def delete(self, run_id: uuid.UUID) -> None:
        await self._request("DELETE", f"/task_runs/{run_id}")

    async def wait(self, run_id: uuid.UUID, *, seconds: float = 30.0) -> TaskRun:
        """Long-poll: the run once it ended, or as it stands after ``seconds``."""
        data = await self._request(
            "GET",
            f"/task_runs/{run_id}/wait",
            params={"timeout": seconds},
            timeout=self._http.timeout.read + seconds if self._http.timeout.read else None,
        )
        return converter.structure(data, TaskRun)

"""Small helpers for end-to-end tests: REST calls (submitting comes in the product later;
raw here), and log records to wait for."""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx
import trio


async def submit(api: httpx.AsyncClient, key: str, *parameters: dict[str, Any], **fields: Any) -> list[str]:
    """Create one run per parameters dict; returns their ids in order."""
    body = [{"task_key": key, "parameters": p, **fields} for p in parameters]
    response = await api.post("/task_runs/batch", json=body)
    assert response.status_code == 201, response.text
    return [run["id"] for run in response.json()]


async def wait_all(api: httpx.AsyncClient, ids: list[str], seconds: float = 20) -> list[dict[str, Any]]:
    """Wait until every run ended; returns them in the order of ``ids``."""
    response = await api.post(
        "/task_runs/wait", json={"ids": ids, "timeout": seconds, "all": True}, timeout=seconds + 10
    )
    body = response.json()
    assert not body["pending"], f"runs still pending after {seconds} s: {body['pending']}"
    by_id = {run["id"]: run for run in body["ended"]}
    return [by_id[i] for i in ids]


async def history(api: httpx.AsyncClient, run_id: str) -> list[tuple[str, str]]:
    return [(h["type"], h["name"]) for h in (await api.get(f"/task_runs/{run_id}/history")).json()]


class LogEvents(logging.Handler):
    """Sets a Trio event when a record matching a pattern is logged (from the Trio thread)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.waiting: list[tuple[re.Pattern[str], trio.Event]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        for pattern, event in self.waiting:
            if pattern.search(record.getMessage()):
                event.set()

    async def wait_for(self, pattern: str) -> None:
        compiled = re.compile(pattern)
        if any(compiled.search(r.getMessage()) for r in self.records):
            return
        event = trio.Event()
        self.waiting.append((compiled, event))
        with trio.fail_after(10):
            await event.wait()

    def matching(self, pattern: str) -> list[logging.LogRecord]:
        return [r for r in self.records if re.search(pattern, r.getMessage())]

"""Small REST helpers for end-to-end tests (submitting comes in the product later; raw here)."""

from __future__ import annotations

from typing import Any

import httpx


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

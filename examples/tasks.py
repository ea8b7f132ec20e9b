"""Example tasks, shared by the web app and the sync script.

A worker serves them (from the repository root, with a server running)::

    trioworker worker examples.tasks:resize_image examples.tasks:make_thumbnails

Their keys are given explicitly (``key=...``), so they match however this file is
imported: as ``examples.tasks`` by the web app, or as ``tasks`` by
``trioworker worker examples/tasks.py:resize_image``.
"""

from __future__ import annotations

import attrs

import trioworker


@attrs.frozen
class Size:
    """An image size; parameters and results of this type travel as ``{"width", "height"}``."""

    width: int
    height: int


def _worth_retrying(task: object, run: object, exc: BaseException) -> bool:
    return not isinstance(exc, ValueError)  # bad input fails the same way every time


@trioworker.task(
    key="examples.resize_image", retries=2, retry_delay_seconds=1, retry_condition_fn=_worth_retrying
)
def resize_image(width: int, height: int, max_side: int = 256) -> Size:
    """A sync task (it runs in a worker thread): the size of the thumbnail of an image.

    Stands for CPU-bound work; a real one would read, scale and write the pixels.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"not an image size: {width}x{height}")
    scale = min(1.0, max_side / max(width, height))
    return Size(max(1, round(width * scale)), max(1, round(height * scale)))


@trioworker.task(key="examples.make_thumbnails")
async def make_thumbnails(sizes: list[Size], max_side: int = 256) -> list[Size]:
    """An async task that fans out: one ``resize_image`` run per size, awaited together.

    The runs it submits record it as their parent, and go through the worker's own client.
    Its children need free slots while it waits: serve it with a ``limit`` above 1.
    """
    futures = await resize_image.map([s.width for s in sizes], [s.height for s in sizes], max_side=max_side)
    await trioworker.wait_all(futures)
    return [await future.result() for future in futures]

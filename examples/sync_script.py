"""A plain synchronous script that submits runs and prints their results: no event loop.

Every call here is the blocking twin of an async one (``say.sync.delay`` for
``await say.delay``): the same code works in a thread, a Flask view or a Django command.

Run it from the repository root, with a server and a worker running::

    trioworker server
    trioworker worker examples.tasks:resize_image examples.tasks:make_thumbnails
    TRIOWORKER_API_URL=http://127.0.0.1:4300/api python examples/sync_script.py
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the ``examples`` package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trioworker
from examples.tasks import Size, make_thumbnails, resize_image

TIMEOUT = 30.0


def main() -> int:
    # One run: submit, then block until a worker has run it.
    future = resize_image.sync.delay(4000, 3000)
    print(f"resize_image(4000, 3000) -> {future.result(timeout=TIMEOUT)}")

    with trioworker.sync.connect():  # one kept-alive connection for everything inside
        # One run per item, submitted in one request; wait for all of them at once.
        futures = resize_image.sync.map([640, 1920, 300], [480, 1080, 300], max_side=128)
        trioworker.sync.wait_all(futures, timeout=TIMEOUT)
        for f in futures:
            print(f"resize_image -> {f.result(timeout=0)}")

        # An async task that fans out into runs of its own.
        thumbs = make_thumbnails.sync.delay([Size(800, 600), Size(600, 800)], max_side=64)
        print(f"make_thumbnails -> {thumbs.result(timeout=TIMEOUT)}")

        # A run that fails: result() raises the task's own exception type.
        bad = resize_image.sync.delay(0, 10)
        try:
            bad.result(timeout=TIMEOUT)
        except ValueError as exc:
            print(f"resize_image(0, 10) failed: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

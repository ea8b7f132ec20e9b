"""trioworker: background task runs for Trio, with a durable queue and structured concurrency."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

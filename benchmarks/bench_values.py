"""What typed parameters cost on each side: building a create (submit) and reading it (worker).

Run it as a plain script (no server, no worker: one process, pure CPU)::

    python benchmarks/bench_values.py [--number N] [--repeat K]

For each shape of arguments it times ``submission.build_create`` (bind the arguments, dump
each by its annotation and, since issue 10, check that it reads back as itself) and
``serializers.load_parameters`` (what a worker does before it calls the task), in
microseconds per call, the median of ``--repeat`` repetitions of ``--number`` calls.

To compare two versions of trioworker on one machine, run the script twice in a row, once
with ``PYTHONPATH`` pointing at the other checkout (the script only uses names both have).
"""

from __future__ import annotations

import argparse
import statistics
import timeit
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

import attrs

import trioworker
from trioworker import serializers
from trioworker.client import submission


@attrs.frozen
class Line:
    sku: str
    cents: int
    added: datetime


@trioworker.task(key="bench.values.ints")
def ints(a: int, b: int) -> int:
    return a + b


@trioworker.task(key="bench.values.text")
def text(name: str, greeting: str = "hi") -> str:
    return f"{greeting} {name}"


@trioworker.task(key="bench.values.when")
def when(at: datetime) -> str:
    return at.isoformat()


@trioworker.task(key="bench.values.lines")
def lines(items: list[Line]) -> int:
    return sum(item.cents for item in items)


@trioworker.task(key="bench.values.plain")
def plain(payload: dict[str, Any]) -> int:
    return len(payload)


NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
CASES: list[tuple[str, Any, tuple[Any, ...]]] = [
    ("two ints", ints, (1, 2)),
    ("two strs", text, ("world", "hello")),
    ("a datetime", when, (NOW,)),
    ("10 attrs objects", lines, ([Line(f"sku-{i}", i * 100, NOW) for i in range(10)],)),
    ("a dict of 20 JSON values", plain, ({f"k{i}": [i, str(i), None] for i in range(20)},)),
]


def _median_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    times = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(times) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=2000, help="calls per repetition (2,000)")
    parser.add_argument("--repeat", type=int, default=7, help="repetitions; the median is shown (7)")
    options = parser.parse_args()
    print(f"trioworker from {trioworker.__file__}")
    print(f"{'arguments':<26} {'build_create µs':>16} {'load_parameters µs':>19}")
    for label, task, args in CASES:
        parameters = submission.build_create(task, args, {}).parameters
        submit = _median_us(partial(submission.build_create, task, args, {}), options.number, options.repeat)
        read = _median_us(
            partial(serializers.load_parameters, task.fn, parameters), options.number, options.repeat
        )
        print(f"{label:<26} {submit:>16.1f} {read:>19.1f}")


if __name__ == "__main__":
    main()

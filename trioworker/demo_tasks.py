"""The demo's example tasks under the path earlier releases documented
(``trioworker worker trioworker.demo_tasks:add``); they live in
:mod:`trioworker.cli.demo_tasks`, beside the demo."""

from trioworker.cli.demo_tasks import DEMO_TASKS as DEMO_TASKS
from trioworker.cli.demo_tasks import add as add
from trioworker.cli.demo_tasks import divide as divide
from trioworker.cli.demo_tasks import fetch as fetch
from trioworker.cli.demo_tasks import greet as greet
from trioworker.cli.demo_tasks import square as square

__all__ = ["DEMO_TASKS", "add", "divide", "fetch", "greet", "square"]

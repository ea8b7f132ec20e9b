"""The client wing: what a process that submits runs and awaits their results uses.

Modules: ``rest`` (the REST client, :class:`TaskRunClient` and its blocking twin),
``channel`` (the websocket that batches creates and pushes results), ``futures``
(:class:`TaskRunFuture`, ``wait_all``, ``as_completed``) and ``submission`` (turning calls
into task run creates). It imports the shared core only: never :mod:`trioworker.worker`,
quart or hypercorn.
"""

from trioworker.client.rest import SyncTaskRunClient as SyncTaskRunClient
from trioworker.client.rest import TaskRunClient as TaskRunClient
from trioworker.client.rest import connect as connect
from trioworker.client.rest import connect_sync as connect_sync

__all__ = ["SyncTaskRunClient", "TaskRunClient", "connect", "connect_sync"]

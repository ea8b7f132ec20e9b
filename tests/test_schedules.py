"""Periodic runs: when ticks fall (cron in time zones, intervals), what firing does, and the
whole path on a real server with real workers: schedules registered by workers, by
``trioworker.schedule()``, over REST and by the command line; one run per tick; a server
that was down catching up by policy. Time passes on ``trioworker_autojump_clock``."""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

import trioworker
from trioworker.models import Schedule, ScheduleCreate
from trioworker.schedules import (
    MISSED_AFTER,
    Cron,
    Interval,
    check_cron,
    checked,
    fire,
    latest_tick,
    new_schedule,
    next_fire_time,
    time_zone,
)
from trioworker.server import RunningServer
from trioworker.tasks import task
from trioworker.testing import AUTOJUMP_THRESHOLD, ServerControl
from trioworker.worker.task_worker import TaskWorker

from .test_cli_tools import Cli, cli, one_error_line, run_all

__all__ = ["cli"]  # a fixture, used by name

Make = Callable[..., TaskWorker]


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC)


def ticks(create: ScheduleCreate, after: datetime, n: int) -> list[datetime]:
    out: list[datetime] = []
    for _ in range(n):
        after = next_fire_time(create, after)
        out.append(after)
    return out


def cron(expression: str, timezone: str = "UTC", **changes: Any) -> ScheduleCreate:
    create = ScheduleCreate(name="s", task_key="k", cron=expression, timezone=timezone)
    return checked(attrs.evolve(create, **changes))


def every(seconds: float, **changes: Any) -> ScheduleCreate:
    return checked(attrs.evolve(ScheduleCreate(name="s", task_key="k", interval=seconds), **changes))


# --------------------------------------------------------------------------- when ticks fall


def test_cron_ticks_in_a_time_zone_across_daylight_saving_time() -> None:
    # Paris, 2026-03-29: 02:00 CET becomes 03:00 CEST. The skipped 02:30 fires at the change.
    assert ticks(cron("30 2 * * *", "Europe/Paris"), utc(2026, 3, 28, 12), 3) == [
        utc(2026, 3, 29, 1, 0),  # 03:00 CEST
        utc(2026, 3, 30, 0, 30),  # 02:30 CEST
        utc(2026, 3, 31, 0, 30),
    ]
    # Paris, 2026-10-25: 03:00 CEST becomes 02:00 CET: the repeated hour fires in both passes.
    assert ticks(cron("*/30 * * * *", "Europe/Paris"), utc(2026, 10, 24, 23, 15), 6) == [
        utc(2026, 10, 24, 23, 30),
        utc(2026, 10, 25, 0, 0),  # 02:00 CEST
        utc(2026, 10, 25, 0, 30),  # 02:30 CEST
        utc(2026, 10, 25, 1, 0),  # 02:00 CET
        utc(2026, 10, 25, 1, 30),  # 02:30 CET
        utc(2026, 10, 25, 2, 0),  # 03:00 CET
    ]
    # 9:00 on weekdays in Paris is 8:00 UTC in winter, 7:00 in summer.
    weekdays = cron("0 9 * * 1-5", "Europe/Paris")
    assert next_fire_time(weekdays, utc(2026, 1, 2, 9)) == utc(2026, 1, 5, 8)  # Friday -> Monday
    assert next_fire_time(weekdays, utc(2026, 7, 1, 6)) == utc(2026, 7, 1, 7)
    assert next_fire_time(cron("@daily"), utc(2026, 1, 1, 0)) == utc(2026, 1, 2)


def test_interval_ticks_count_from_the_anchor() -> None:
    # Default anchor: 2020-01-01 00:00 in the time zone (here UTC): on the hour.
    assert ticks(every(3600), utc(2026, 5, 1, 10, 20), 2) == [utc(2026, 5, 1, 11), utc(2026, 5, 1, 12)]
    assert next_fire_time(every(3600), utc(2026, 5, 1, 11)) == utc(2026, 5, 1, 12)  # strictly after
    anchored = every(90, anchor_date=utc(2026, 5, 1, 10, 0, 30))
    assert ticks(anchored, utc(2026, 5, 1, 10, 2), 2) == [utc(2026, 5, 1, 10, 3, 30), utc(2026, 5, 1, 10, 5)]
    # A naive anchor is read in the time zone; elapsed seconds then, whatever the clocks do.
    paris = every(86400, timezone="Europe/Paris", anchor_date=datetime(2026, 3, 28, 9, 0))
    assert paris.anchor_date == utc(2026, 3, 28, 8)
    assert next_fire_time(paris, utc(2026, 3, 29, 0)) == utc(2026, 3, 29, 8)  # 10:00 CEST
    assert latest_tick(paris, utc(2026, 3, 29, 8)) == utc(2026, 3, 29, 8)


def test_firing_fires_the_latest_tick_due_once_by_policy() -> None:
    made = new_schedule(every(60), utc(2026, 1, 1, 10, 0, 30), None)
    assert made is not None and made.next_fire_time == utc(2026, 1, 1, 10, 1)
    assert fire(made, utc(2026, 1, 1, 10, 0, 59)) == (None, made)  # not due
    tick, after = fire(made, utc(2026, 1, 1, 10, 1, 5))
    assert tick == utc(2026, 1, 1, 10, 1) and after.next_fire_time == utc(2026, 1, 1, 10, 2)
    # Down from 10:01 to 10:10:30: nine ticks missed, the latest 30 s late: it fires.
    tick, after = fire(made, utc(2026, 1, 1, 10, 10, 30))
    assert tick == utc(2026, 1, 1, 10, 10) and after.next_fire_time == utc(2026, 1, 1, 10, 11)
    hourly = new_schedule(every(3600), utc(2026, 1, 1, 9, 30), None)
    once = new_schedule(every(3600, catchup="once"), utc(2026, 1, 1, 9, 30), None)
    assert hourly is not None and once is not None
    late = utc(2026, 1, 1, 13) + timedelta(seconds=MISSED_AFTER + 1)
    assert fire(hourly, late)[0] is None  # skip: missed
    assert fire(once, late)[0] == utc(2026, 1, 1, 13)  # once: the latest tick, for all of them
    assert fire(hourly, late)[1].next_fire_time == fire(once, late)[1].next_fire_time == utc(2026, 1, 1, 14)
    assert new_schedule(every(3600), late, hourly) is None  # the same schedule: nothing to write


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("61 * * * *", "cron expression '61 * * * *' is not valid: out of range"),
        ("* * *", "cron expression '* * *' has 3 field(s), not 5: minute hour day-of-month month"),
        ("* * * * * *", "has 6 field(s), not 5"),
        ("a b c d e", "cron expression 'a b c d e' is not valid: a field holds what cron does not take"),
        ("0 0 31 2 *", "cron expression '0 0 31 2 *' is not valid: it matches no date"),
        ("*/0 * * * *", "is not valid: step '0' in field 0 is not acceptable"),
    ],
)
def test_a_bad_cron_expression_is_one_line(expression: str, why: str) -> None:
    with pytest.raises(ValueError, match=r"^[^\n]+$") as raised:
        check_cron(expression)
    assert why in str(raised.value)


def test_cron_expressions_have_one_spelling_and_time_zones_are_iana_names() -> None:
    assert check_cron("  */5   *  * * *") == "*/5 * * * *"
    assert check_cron("@DAILY") == "@daily"
    assert time_zone("Europe/Paris").key == "Europe/Paris"
    for bad in ("Mars/Olympus", "", "../../etc/passwd", "/etc/localtime", " UTC"):
        with pytest.raises(ValueError, match=r"unknown time zone .*: give an IANA name such as"):
            time_zone(bad)
    for create, why in [
        (ScheduleCreate(name="s", task_key="k"), "either a cron expression or an interval"),
        (ScheduleCreate(name="s", task_key="k", cron="* * * * *", interval=60), "not both"),
        (ScheduleCreate(name="a/b", task_key="k", interval=60), "without '/'"),
        (ScheduleCreate(name="s", task_key="k", interval=0.5), "between 1 s and 100 years"),
        (
            ScheduleCreate(name="s", task_key="k", interval=60, catchup="all"),
            "catchup must be one of skip, once",
        ),
        (ScheduleCreate(name="s", task_key="", interval=60), "needs the task_key"),
        (ScheduleCreate(name="s", task_key="k", interval=60, serializer="xml"), "serializer must be one of"),
    ]:
        with pytest.raises(ValueError, match=why):
            checked(create)


def test_a_task_declares_its_schedules_and_bad_ones_fail_at_decoration() -> None:
    @task(
        key="t.report", schedule=[Cron("0 9 * * 1-5", timezone="Europe/Paris"), timedelta(hours=1), "@daily"]
    )
    def report(region: str = "eu") -> None: ...

    assert [type(spec) for spec in report.schedule] == [Cron, Interval, Cron]
    assert report.with_options(schedule=None).schedule == ()
    with pytest.raises(ValueError, match="cron expression '61 \\* \\* \\* \\*' is not valid"):
        task(schedule="61 * * * *")(lambda: None)
    with pytest.raises(ValueError, match="unknown time zone 'Nowhere'"):
        Cron("* * * * *", timezone="Nowhere")
    with pytest.raises(TypeError, match="a schedule's arguments do not fit: missing a required argument"):
        task(key="t.add", schedule=Interval(60))(lambda a: a)
    with pytest.raises(TypeError, match=r"schedule= takes trioworker\.Cron"):
        task(schedule=object())(lambda: None)  # type: ignore[call-overload]
    with pytest.raises(ValueError, match="the same name"):
        task(schedule=[Cron("* * * * *", name="x"), Interval(60, name="x")])(lambda: None)


# --------------------------------------------------------------------------- on a real server


@attrs.define(eq=False)
class Beats:
    """The runs of ``beat`` (ids, in the order they ran), and an event each time one ran."""

    runs: list[uuid.UUID] = attrs.field(factory=list)
    changed: trio.Event = attrs.field(factory=trio.Event)

    async def until(self, n: int) -> list[uuid.UUID]:
        """Wait (on Trio's clock) until ``n`` runs ran; the first ``n``."""
        with trio.fail_after(3 * 3600):
            while len(self.runs) < n:
                self.changed = trio.Event()
                await self.changed.wait()
        return self.runs[:n]


beats = Beats()


@pytest.fixture(autouse=True)
def _fresh_beats() -> None:
    beats.runs.clear()


@task(key="sched.beat")
async def beat() -> str:
    run = trioworker.current_run()
    assert run is not None
    beats.runs.append(run.task_run_id)
    beats.changed.set()
    return "beat"


@task(key="sched.every5", schedule=Cron("*/5 * * * *"))
async def every_five(label: str = "five") -> str:
    said: str = await beat()
    return said


async def scheduled_times(run_ids: list[uuid.UUID]) -> list[datetime]:
    """The tick each run was made for (its idempotency key names it: ``schedule/NAME/TICK``)."""
    async with trioworker.connect(channel=False) as client:
        runs = [await client.read_task_run(run_id) for run_id in run_ids]
    return [datetime.fromisoformat((run.idempotency_key or "").rsplit("/", 1)[-1]) for run in runs]


async def test_workers_register_a_tasks_schedule_and_each_tick_makes_one_run(
    trioworker_worker: Make, trioworker_autojump_clock: trio.testing.MockClock
) -> None:
    # Two workers serve the task: both register its schedule; the server fires each tick once.
    async with trioworker_worker(every_five), trioworker_worker(every_five):
        ran = await beats.until(3)
        trioworker_autojump_clock.autojump_threshold = math.inf  # no time passes from here
    async with trioworker.connect(channel=False) as client:
        [schedule] = await client.schedules()
        runs = await client.read_task_runs(task_key="sched.every5", limit=100)
    assert (schedule.name, schedule.cron, schedule.parameters) == (
        "sched.every5",
        "*/5 * * * *",
        {"label": "five"},
    )
    assert [run.id for run in runs] == ran  # one run per tick
    times = await scheduled_times(ran)
    assert [t.minute % 5 for t in times] == [0, 0, 0] and {t.second for t in times} == {0}
    assert [b - a for a, b in itertools.pairwise(times)] == [timedelta(minutes=5)] * 2
    assert schedule.last_run_id in ran and schedule.next_fire_time > times[-1]


async def test_trioworker_schedule_registers_with_the_server_and_can_be_changed(
    trioworker_worker: Make, trioworker_autojump_clock: trio.testing.MockClock
) -> None:
    @task(key="sched.add")
    async def add(a: int, b: int = 0) -> int:
        await beat()
        return a + b

    # No time passes while the schedule is made and changed (one call waits on a thread).
    trioworker_autojump_clock.autojump_threshold = math.inf
    made = await trioworker.schedule(add, interval=timedelta(minutes=10), args=[2], kwargs={"b": 3})
    assert isinstance(made, Schedule)
    assert (made.name, made.interval, made.catchup) == ("sched.add", 600, "skip")
    assert made.parameters == {"a": 2, "b": 3} and made.next_fire_time.minute % 10 == 0
    again = await trioworker.schedule(add, interval=600, args=[2], kwargs={"b": 3})
    assert again == made  # the same: nothing changed
    changed = await trio.to_thread.run_sync(
        lambda: trioworker.sync.schedule(add, cron="*/2 * * * *", kwargs={"a": 1}, catchup="once")
    )
    assert (changed.cron, changed.interval, changed.catchup, changed.created) == (
        "*/2 * * * *",
        None,
        "once",
        made.created,
    )
    assert changed.parameters == {"a": 1, "b": 0} and changed.next_fire_time.minute % 2 == 0
    trioworker_autojump_clock.autojump_threshold = AUTOJUMP_THRESHOLD
    async with trioworker_worker(add):
        [first] = await beats.until(1)
        trioworker_autojump_clock.autojump_threshold = math.inf
    async with trioworker.connect(channel=False) as client:
        assert (await client.read_task_run(first)).state.data == 1
        assert (await client.read_schedule("sched.add")).last_run_id == first
        await client.delete_schedule("sched.add")
        assert await client.schedules() == []
        with pytest.raises(trioworker.NotFound, match=r"no schedule 'sched\.add'"):
            await client.delete_schedule("sched.add")
    with pytest.raises(ValueError, match="cron expression"):
        await trioworker.schedule(add, cron="every minute", args=[1])
    with pytest.raises(ValueError, match="either cron= or interval="):
        await trioworker.schedule(add, args=[1])
    with pytest.raises(TypeError, match="'c'"):
        await trioworker.schedule(add, interval=60, kwargs={"a": 1, "c": 2})
    with pytest.raises(TypeError, match="parameter 'a'"):
        await trioworker.schedule(add, interval=60, args=["two"])


@pytest.mark.every_store
@pytest.mark.parametrize("catchup", ["skip", "once"])
async def test_a_server_that_was_down_catches_up_by_its_policy(
    catchup: str,
    trioworker_server: RunningServer,
    trioworker_server_control: ServerControl,
    trioworker_worker: Make,
    trioworker_autojump_clock: trio.testing.MockClock,
) -> None:
    # Time passes only while the test waits for runs (a slow store's answer is no timeout).
    clock = trioworker_autojump_clock
    clock.autojump_threshold = math.inf
    made = await trioworker.schedule(beat, interval=600, catchup=catchup)
    first_tick = made.next_fire_time
    clock.autojump_threshold = AUTOJUMP_THRESHOLD
    async with trioworker_worker(beat):
        await beats.until(1)
        clock.autojump_threshold = math.inf  # from here, time passes only as the test says
    await trioworker_server_control.stop()
    # Down for the ticks at +10, +20 and +30 minutes; back 100 s after the last one.
    clock.jump(first_tick.timestamp() + 1900 - trioworker_server.service.dispatcher.clock())
    restarted = await trioworker_server_control.start(port=int(trioworker_server.url.rsplit(":", 1)[1]))
    back = restarted.service.dispatcher.clock()
    clock.autojump_threshold = AUTOJUMP_THRESHOLD
    async with trioworker_worker(beat):
        ran = await beats.until(3 if catchup == "once" else 2)
        after_restart = restarted.service.dispatcher.clock()
        clock.autojump_threshold = math.inf  # no tick more
    times = await scheduled_times(ran)
    step = timedelta(minutes=10)
    if catchup == "once":
        # One run at once for the three missed ticks (the latest's), then the next tick.
        assert times == [first_tick, first_tick + 3 * step, first_tick + 4 * step]
    else:
        assert times == [first_tick, first_tick + 4 * step]  # the missed ticks: none
    assert after_restart >= (first_tick + 4 * step).timestamp() > back
    async with trioworker.connect(channel=False) as client:
        assert len(await client.read_task_runs(task_key="sched.beat", limit=100)) == len(ran)


async def test_the_rest_routes_refuse_bad_schedules_in_one_line(api: httpx.AsyncClient) -> None:
    for body, why in [
        ({"name": "s", "task_key": "k", "cron": "61 * * * *"}, "cron expression '61 * * * *' is not valid"),
        (
            {"name": "s", "task_key": "k", "cron": "* * * * *", "timezone": "Mars/Olympus"},
            "unknown time zone",
        ),
        ({"name": "s", "task_key": "k"}, "either a cron expression or an interval"),
        ({"name": "s", "task_key": "k", "interval": "5m"}, "interval"),
        ({"name": "s", "task_key": "k", "interval": 60, "catchup": "all"}, "catchup must be one of"),
        ({"task_key": "k", "interval": 60}, "name"),
    ]:
        response = await api.post("/schedules", json=body)
        assert response.status_code == 422, body
        detail = response.json()["detail"]
        assert why in detail and "\n" not in detail, detail
    assert (await api.get("/schedules")).json() == []
    assert (await api.get("/schedules/nope")).status_code == 404
    created = await api.post("/schedules", json={"name": "a b#c", "task_key": "k", "interval": 60})
    assert created.status_code == 201
    assert (await api.get("/schedules/a%20b%23c")).json()["name"] == "a b#c"


async def test_the_command_line_adds_lists_and_removes_schedules(
    cli: Cli, tmp_path: Path, trioworker_server: RunningServer
) -> None:
    folder = tmp_path
    (folder / "jobs.py").write_text(
        "import trioworker\n\n@trioworker.task(key='jobs.say')\ndef say(text: str, times: int = 1) -> str:\n"
        "    return text * times\n"
    )
    jobs = str(folder / "jobs.py") + ":say"
    added = await cli(
        "schedule", "add", jobs, "--cron", "0 9 * * 1-5", "--timezone", "Europe/Paris", "hi", "times=2"
    )
    assert added.returncode == 0, added.stderr
    assert added.stdout.decode().startswith(
        "schedule jobs.say of jobs.say (0 9 * * 1-5 (Europe/Paris)): next run at "
    )
    hourly = await cli(
        "schedule", "add", jobs, "yo", "--every", "1h", "--name", "hourly", "--catchup", "once"
    )
    assert hourly.returncode == 0, hourly.stderr
    listed = await cli("schedule", "list")
    assert listed.returncode == 0, listed.stderr
    table = listed.stdout.decode()
    assert "0 9 * * 1-5 (Europe/Paris)" in table and "every 3600 s" in table and "2 schedules" in table
    schedules = await trioworker_server.service.schedules()
    assert [(s.name, s.parameters, s.catchup) for s in schedules] == [
        ("hourly", {"text": "yo", "times": 1}, "once"),
        ("jobs.say", {"text": "hi", "times": 2}, "skip"),
    ]
    next_local = schedules[1].next_fire_time.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert next_local in table and next_local in added.stdout.decode()
    removed = await cli("schedule", "remove", "hourly")
    assert (removed.returncode, removed.stdout.decode()) == (0, "removed schedule hourly\n")
    refusals = [
        (("remove", "hourly"), "trioworker: no schedule 'hourly'"),
        (("add", jobs, "x", "--cron", "61 * * * *"), "expression '61 * * * *' is not valid: out of range"),
        (
            ("add", jobs, "x", "--cron", "@daily", "--timezone", "Mars/Olympus"),
            "unknown time zone 'Mars/Olympus'",
        ),
        (("add", jobs, "--every", "1h"), "cannot schedule say: missing a required argument: 'text'"),
        (("add", jobs, "x", "--every", "0.5"), "an interval must be between 1 s and 100 years"),
    ]
    failures = await run_all(cli, *(["schedule", *args] for args, _ in refusals))
    for (_, why), failed in zip(refusals, failures, strict=True):
        assert why in one_error_line(failed), failed.stderr
    assert [s.name for s in await trioworker_server.service.schedules()] == ["jobs.say"]

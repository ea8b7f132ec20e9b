"""Values travel as they are or are refused at submit; what a worker cannot read fails one run.

Properties (hypothesis) of the serializer, then end to end with the real server and worker.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import time as clock
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, time, timedelta, timezone
from decimal import Decimal
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any, Literal, NamedTuple, TypedDict
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import attrs
import httpx
import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from trioworker import ResultDecodeError, StateType, TaskRun, TaskRunFuture, TaskWorker, task
from trioworker.client.futures import result_of
from trioworker.client.submission import build_create
from trioworker.errors import ParameterError
from trioworker.models import make_state
from trioworker.serializers import (
    Unreadable,
    Unresolved,
    dump_value,
    hints,
    load_parameters,
    read_arguments,
    read_value,
)
from trioworker.server import RunningServer

from .helpers import submit, wait_all
from .values_future import Priced, Room, Slot, answer_as_decimal, book, cost, price

Make = Callable[..., TaskWorker]


class Color(enum.Enum):
    RED = 1
    GREEN = (0, 255, 0)


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Code(str):
    """A str subclass: arrives as itself, not as str."""


@attrs.frozen
class Meeting:
    title: str
    at: datetime
    length: timedelta
    budget: Decimal
    room: Room
    tags: frozenset[str]


@attrs.frozen
class Online(Meeting):
    url: str = ""


@attrs.define(eq=False)
class Counter:
    """No __eq__ of its own: compared field by field."""

    n: int


@dataclasses.dataclass
class Window:
    opens: time
    closes: time | None = None


class Point(NamedTuple):
    x: int
    y: float


class Movie(TypedDict):
    title: str
    released: date


ints = st.integers(-(2**63), 2**63 - 1)
floats = st.floats(allow_nan=False, allow_infinity=False)
offsets = st.integers(-1439, 1439).map(lambda m: timezone(timedelta(minutes=m)))
aware = st.datetimes(timezones=offsets)
json_values = st.recursive(
    st.none() | st.booleans() | ints | floats | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
meetings = st.builds(
    Meeting,
    st.text(max_size=10),
    st.datetimes() | aware,
    st.timedeltas(),
    st.decimals(),
    st.sampled_from(Room),
    st.frozensets(st.text(max_size=5), max_size=3),
)

#: (values, the annotation they are sent under): each must arrive as it was.
ROUND_TRIPS: list[tuple[st.SearchStrategy[Any], Any]] = [
    (st.datetimes(), datetime),  # naive: arrives naive
    (aware, datetime),  # aware: keeps its offset
    (st.dates(), date),
    (st.times(), time),
    (st.times(timezones=offsets), time),
    (st.timedeltas(), timedelta),
    (st.decimals(), Decimal),
    (st.uuids(), uuid.UUID),
    (st.binary(max_size=20), bytes),
    (st.text(max_size=20).map(PurePosixPath), PurePosixPath),
    (st.text(max_size=20).map(Path), Path),
    (st.sampled_from(Color), Color),
    (st.sampled_from(Room), Room),
    (st.sampled_from(Level), Level),
    (st.text(max_size=10).map(Code), Code),
    (st.sets(ints, max_size=4), set[int]),
    (st.frozensets(st.text(max_size=5), max_size=4), frozenset[str]),
    (st.tuples(st.text(max_size=5), st.dates()), tuple[str, date]),
    (st.lists(ints, max_size=4).map(tuple), tuple[int, ...]),
    (st.lists(st.datetimes() | aware, max_size=3), list[datetime]),
    (st.dictionaries(st.text(max_size=5), st.times(), max_size=3), dict[str, time]),
    (st.dictionaries(st.uuids(), ints, max_size=3), dict[uuid.UUID, int]),
    (st.dictionaries(st.dates(), ints, max_size=3), dict[date, int]),
    (st.dictionaries(st.sampled_from(Room), ints, max_size=2), dict[Room, int]),
    (ints | st.text(max_size=5), int | str),
    (st.none() | st.datetimes(), datetime | None),
    (st.sampled_from(["a", "b"]), Literal["a", "b"]),
    (st.builds(Slot, st.times(), st.timedeltas(), st.sampled_from(Room)), Slot),
    (st.builds(Point, ints, floats), Point),
    (st.builds(Movie, title=st.text(max_size=5), released=st.dates()), Movie),
    (st.builds(Window, st.times(), st.none() | st.times()), Window),
    (st.builds(Counter, ints), Counter),
    (meetings, Meeting),
    (json_values, Any),
    (ints, int),
    (floats, float),
    (ints, float),  # an int is a float by the numeric tower, and stays an int
]


def assert_same(sent: Any, got: Any) -> None:
    """Equal and of the same type, recursively (what "arrives as it was sent" means).

    List and tuple are both a JSON array, set and frozenset too: the annotation picks.
    """
    kinds = {type(sent), type(got)}
    assert len(kinds) == 1 or kinds <= {list, tuple} or kinds <= {set, frozenset}, (sent, got)
    if isinstance(sent, datetime | time):
        assert got == sent and got.utcoffset() == sent.utcoffset()
    elif isinstance(sent, Decimal):
        assert str(got) == str(sent)
    elif isinstance(sent, list | tuple):
        assert len(got) == len(sent)
        for a, b in zip(sent, got, strict=True):
            assert_same(a, b)
    elif isinstance(sent, dict):
        assert got.keys() == sent.keys()
        for key in sent:
            assert_same(sent[key], got[key])
    elif attrs.has(type(sent)):
        for field in attrs.fields(type(sent)):
            assert_same(getattr(sent, field.name), getattr(got, field.name))
    else:
        assert got == sent


def travel(value: Any, hint: Any) -> Any:
    """What a worker reads: dumped, through JSON bytes, read by the same annotation."""
    return read_value(orjson.loads(orjson.dumps(dump_value(value, hint))), hint)


@pytest.mark.parametrize(("values", "hint"), ROUND_TRIPS, ids=[repr(h) for _, h in ROUND_TRIPS])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_supported_values_arrive_as_they_were_sent(
    values: st.SearchStrategy[Any], hint: Any, data: st.DataObject
) -> None:
    value = data.draw(values)
    assert_same(value, travel(value, hint))


def test_naive_and_aware_datetimes_stay_as_they_were() -> None:
    naive = datetime(2030, 1, 2, 3, 4, 5, 6)
    assert dump_value(naive, datetime) == "2030-01-02T03:04:05.000006"
    assert travel(naive, datetime).tzinfo is None
    plus_two = datetime(2030, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=2)))
    assert travel(plus_two, datetime).utcoffset() == timedelta(hours=2)
    try:
        paris = datetime(2030, 7, 1, 12, tzinfo=ZoneInfo("Europe/Paris"))
    except ZoneInfoNotFoundError:
        return  # no zone database here
    arrived = travel(paris, datetime)
    assert arrived == paris and arrived.tzinfo == timezone(timedelta(hours=2))  # its fixed offset


@pytest.mark.parametrize("hint", [Any, dict[str, time], dict[str, Any]])
def test_times_are_written_by_python_not_orjson(hint: Any) -> None:
    """orjson 3.13 writes time(0, 0, 0, 10000) as "00:00:00.10000" (ten times too much)."""
    value = {"at": time(0, 0, 0, 10000)}
    if hint == dict[str, time]:
        assert dump_value(value, hint) == {"at": "00:00:00.010000"}
        assert travel(value, hint) == value
    else:
        with pytest.raises(TypeError, match=r"would arrive as \{'at': '00:00:00.010000'\}"):
            dump_value(value, hint)


#: (value, annotation, words of the refusal): JSON cannot carry them as they are.
REFUSED: list[tuple[Any, Any, str]] = [
    (1j, complex, "no JSON form"),
    (Fraction(1, 3), Fraction, "no JSON form"),
    (bytearray(b"x"), bytearray, "no JSON form"),
    (2**64, int, "no JSON form"),
    (math.nan, float, "cannot read None as float"),
    (math.inf, Any, "would arrive as None"),
    (True, int, "expected int, got bool"),
    ("x", int, "'x' does not fit the annotation int: cannot read 'x' as int"),
    ("c", Literal["a", "b"], "cannot read 'c'"),
    (Room.RED, str, "would arrive as 'red' (str)"),
    (Online("t", datetime(2030, 1, 1), timedelta(0), Decimal(1), Room.RED, frozenset()), Meeting, "Meeting"),
    (datetime(2030, 1, 1), Any, "would arrive as '2030-01-01T00:00:00' (str)"),
    (datetime(2030, 1, 1), date, "cannot read '2030-01-01T00:00:00' as date"),
    (datetime(2030, 1, 1), datetime | str, "would arrive as '2030-01-01T00:00:00' (str)"),
    ({1: "a"}, Any, "would arrive as {'1': 'a'}"),
    ({1: "a"}, dict[int, str], "expected int, got str"),
    ({1, 2}, Any, "would arrive as [1, 2] (list)"),
    (b"x", Any, "(str)"),
    (5, type(None), "5 does not fit the annotation None"),
    (Decimal(1), Unresolved("Decimal", "NameError: name 'Decimal' is not defined"), "cannot be resolved"),
    (object(), Any, "no JSON form"),
    ("caf\udce9", str, "no JSON form"),  # a lone surrogate, as an undecodable file name gives
    ("caf\udce9", Any, "no JSON form"),
    (["ok", "\ud800"], list[str], "no JSON form"),
]


@pytest.mark.parametrize(("value", "hint", "words"), REFUSED, ids=[repr(r[0])[:30] for r in REFUSED])
def test_values_json_cannot_carry_are_refused_with_a_reason(value: Any, hint: Any, words: str) -> None:
    with pytest.raises(TypeError) as info:
        dump_value(value, hint)
    assert words in str(info.value)


HINTS = [h for _, h in ROUND_TRIPS] + [complex, Fraction, type(None), Priced, list[Slot], dict[str, Meeting]]
anything = st.one_of(
    json_values,
    *(values for values, _ in ROUND_TRIPS),
    st.complex_numbers(),
    st.floats(),
    st.integers(),
    st.builds(Fraction, st.integers(), st.integers(1, 9)),
)


@settings(max_examples=300, deadline=None)
@given(value=anything, hint=st.sampled_from(HINTS))
def test_any_value_under_any_annotation_arrives_the_same_or_is_refused_with_a_type_error(
    value: Any, hint: Any
) -> None:
    try:
        data = dump_value(value, hint)
    except TypeError:
        return
    got = read_value(orjson.loads(orjson.dumps(data)), hint)
    # Plain JSON may be sent in the annotation's JSON form: it arrives as what it reads as.
    assert_same(read_value(value, hint) if data is value else value, got)


@settings(max_examples=300, deadline=None)
@given(data=json_values | st.lists(st.text(max_size=8)), hint=st.sampled_from(HINTS))
def test_reading_any_json_as_any_annotation_raises_unreadable_or_nothing(data: Any, hint: Any) -> None:
    try:
        read_value(data, hint)
    except Unreadable as exc:
        assert str(exc)  # a sentence, never an empty message


def test_an_annotation_that_cannot_be_resolved_affects_only_its_own_parameter() -> None:
    found = hints(cost.fn)
    assert found["count"] is int
    assert isinstance(found["amount"], Unresolved) and "Decimal" in str(found["amount"])
    with pytest.raises(ParameterError, match=r"parameter 'amount': its annotation 'Decimal' cannot be"):
        load_parameters(cost.fn, {"amount": "1", "count": 2})


def test_a_namedtuple_with_string_annotations_is_read_by_its_resolved_types() -> None:
    slot = Slot(time(9, 30), timedelta(minutes=45), Room.BLUE)
    args, _ = load_parameters(book.fn, {"slot": dump_value(slot, Slot), "rooms": ["blue"]})
    assert args == [slot, [Room.BLUE]]
    assert type(args[0].room) is Room
    with pytest.raises(ParameterError, match=r"parameter 'item': cannot read .* as Priced: .*Decimal"):
        load_parameters(price.fn, {"item": [["09:30:00", "P0DT60.000000S", "red"], "1.5"]})


def test_deep_nesting_is_refused_or_unreadable_not_a_recursion_error() -> None:
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(TypeError):
        dump_value(deep, Any)
    hint: Any = int
    for _ in range(300):
        hint = list[hint]
    with pytest.raises(Unreadable):
        read_value(deep, hint)


@pytest.fixture
def five_thirty_east() -> Iterator[None]:
    """Local time is UTC+05:30 for the test (a POSIX TZ rule: no zone database needed)."""
    before = os.environ.get("TZ")
    os.environ["TZ"] = "IST-5:30"
    clock.tzset()
    try:
        yield
    finally:
        if before is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = before
        clock.tzset()


@task(key="values.echo_time")
def echo_time(at: time) -> time:
    return at


def test_a_naive_scheduled_time_is_local_time(five_thirty_east: None) -> None:
    naive = datetime(2030, 6, 1, 12, 0)
    create = build_create(echo_time, [time(1)], {}, scheduled_time=naive)
    assert create.scheduled_time == datetime(2030, 6, 1, 6, 30, tzinfo=UTC)
    assert create.scheduled_time.timestamp() == naive.timestamp()
    aware = datetime(2030, 6, 1, 12, 0, tzinfo=timezone(timedelta(hours=-3)))
    assert build_create(echo_time, [time(1)], {}, scheduled_time=aware).scheduled_time == aware
    with pytest.raises(TypeError, match="scheduled_time must be a datetime"):
        build_create(echo_time, [time(1)], {}, scheduled_time="tomorrow")  # type: ignore[arg-type]


def test_command_line_arguments_are_read_by_the_annotations_as_a_worker_reads_them() -> None:
    args, kwargs = read_arguments(describe.fn, ["2030-01-02T09:00"], {"during": 90, "on": "2030-01-02"})
    assert args == [datetime(2030, 1, 2, 9, 0), timedelta(seconds=90), date(2030, 1, 2)] and not kwargs
    assert args[0].tzinfo is None
    with pytest.raises(ParameterError, match=r"parameter 'on': cannot read 'soon' as date"):
        read_arguments(describe.fn, ["2030-01-02T09:00", 0], {"on": "soon"})
    with pytest.raises(TypeError, match="missing a required argument: 'on'"):
        read_arguments(describe.fn, ["2030-01-02T09:00", 0], {})


@task(key="values.pickled", serializer="pickle")
def pickled(first: Any, then: Any) -> Any:
    return first


def test_a_value_pickle_cannot_carry_is_refused_at_submit_naming_its_parameter() -> None:
    assert build_create(pickled, [1j, Fraction(1, 3)], {}).serializer == "pickle"  # pickle carries these
    with pytest.raises(
        TypeError, match=r"task values.pickled, parameter 'then': <function .*> cannot be pickled"
    ):
        build_create(pickled, [1], {"then": lambda: None})


# --------------------------------------------------------------------------- end to end


@task(key="values.describe")
def describe(when: datetime, during: timedelta, on: date) -> str:
    return f"{when!r} {during!r} {on!r}"


@task(key="values.plan")
async def plan(meeting: Meeting, windows: list[Window], codes: set[Code]) -> Meeting:
    assert all(type(c) is Code for c in codes)
    return attrs.evolve(meeting, title=meeting.title + f" ({len(windows)})")


@task(key="values.untyped")
def untyped(value: Any) -> Any:
    return value


async def test_time_and_other_values_arrive_as_they_were_sent(trioworker_worker: Make) -> None:
    naive = datetime(2030, 1, 2, 3, 4, 5, 6)
    offset = datetime(2030, 1, 2, 3, 4, tzinfo=timezone(timedelta(hours=-7)))
    meeting = Meeting("plan", offset, timedelta(hours=1), Decimal("12.50"), Room.RED, frozenset({"a"}))
    at = time(23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    futures: list[TaskRunFuture[Any]] = [
        await echo_time.delay(at),
        await echo_time.delay(time(7, 15)),
        await describe.delay(naive, timedelta(days=-1, microseconds=3), date(2030, 1, 2)),
        await describe.delay(offset, timedelta(0), date(1, 1, 1)),
        await plan.delay(meeting, [Window(time(9)), Window(time(10), time(11))], {Code("x")}),
        await echo_time.delay("00:00:00.010000"),  # type: ignore[arg-type] # its JSON form
    ]
    async with trioworker_worker(echo_time, describe, plan):
        with trio.fail_after(20):
            results = [await f.result() for f in futures]
    assert results[0] == at and results[0].utcoffset() == timedelta(hours=5, minutes=30)
    assert results[1] == time(7, 15) and results[1].tzinfo is None
    assert results[2] == f"{naive!r} {timedelta(days=-1, microseconds=3)!r} {date(2030, 1, 2)!r}"
    assert results[3] == f"{offset!r} {timedelta(0)!r} {date(1, 1, 1)!r}"  # the offset, not UTC
    assert results[4] == attrs.evolve(meeting, title="plan (2)")
    assert results[4].at.utcoffset() == timedelta(hours=-7)
    assert results[5] == time(0, 0, 0, 10000)


async def test_a_namedtuple_under_string_annotations_travels(trioworker_worker: Make) -> None:
    slot = Slot(time(9, 30), timedelta(minutes=45), Room.BLUE)
    moved = await book.delay(slot, [Room.RED])
    kept = await trio.to_thread.run_sync(lambda: book.sync.delay(slot, [Room.BLUE, Room.RED]))
    async with trioworker_worker(book):
        with trio.fail_after(20):
            assert await moved.result() == slot._replace(room=Room.RED)
            assert await trio.to_thread.run_sync(kept.result) == slot


async def test_values_that_would_arrive_changed_are_refused_at_submit(api: httpx.AsyncClient) -> None:
    meeting = Online("x", datetime(2030, 1, 1), timedelta(0), Decimal(1), Room.RED, frozenset())
    attempts: list[tuple[Callable[[], Any], str]] = [
        (
            lambda: echo_time.delay("7 pm"),  # type: ignore[arg-type]
            "parameter 'at': '7 pm' does not fit the annotation time: cannot read '7 pm' as time",
        ),
        (lambda: echo_time.apply_async([1j]), "parameter 'at': 1j (complex) does not fit the annotation"),
        (lambda: plan.delay(meeting, [], set()), "parameter 'meeting': Online("),
        (lambda: untyped.delay(datetime(2030, 1, 1)), "parameter 'value'"),
        (lambda: untyped.delay(math.nan), "parameter 'value': nan would arrive as None"),
        (lambda: untyped.map([1, 2, {3}]), "parameter 'value': {3} would arrive as [3]"),
        (lambda: cost.delay(Decimal(1), 2), "parameter 'amount': its annotation 'Decimal' cannot be"),
        (lambda: untyped.delay("caf\udce9"), "parameter 'value': 'caf\\udce9' has no JSON form"),
    ]
    for attempt, words in attempts:
        with pytest.raises(TypeError) as info:
            await attempt()
        assert "task values." in str(info.value) and words in str(info.value)
    with pytest.raises(TypeError, match=r"task values.untyped, parameter 'value': 1j has no JSON form"):
        await trio.to_thread.run_sync(untyped.sync.delay, 1j)
    with pytest.raises(TypeError, match=r"parameter 'value': <Color.RED: 1> would arrive as 1 \(int\)"):
        await trio.to_thread.run_sync(lambda: untyped.sync.map([1, Color.RED]))
    assert (await api.get("/task_runs")).json() == []  # nothing was submitted


@attrs.frozen
class Odd:
    n: int = attrs.field()

    @n.validator
    def _check(self, _: Any, value: int) -> None:
        if value < 0:
            raise ArithmeticError("a validator that raises something unexpected")


@task(key="values.odd")
def odd(item: Odd, at: time) -> int:
    return item.n


async def test_values_a_worker_cannot_read_fail_their_run_alone(
    api: httpx.AsyncClient, trioworker_worker: Make
) -> None:
    """Runs written through the API (or by other code): each fails with a reason; the worker goes on."""
    bad = [
        *await submit(api, "values.odd", {"item": {"n": -1}, "at": "09:00"}),
        *await submit(api, "values.odd", {"item": {"n": 1}, "at": "9 am"}),
        *await submit(api, "values.cost", {"amount": "1.5", "count": 1}),
        *await submit(api, "values.price", {"item": [["09:00:00", "P0DT1.000000S", "red"], "1"]}),
        *await submit(api, "values.book", {"slot": ["09:00:00", "P0DT1.000000S", "green"], "rooms": []}),
        *await submit(api, "values.book", {"slot": "not an array", "rooms": ["red"]}),
    ]
    good = await submit(api, "values.odd", {"item": {"n": 7}, "at": "09:00"})
    async with trioworker_worker(odd, cost, price, book):
        runs = await wait_all(api, bad + good)
    assert [r["state"]["type"] for r in runs] == ["FAILED"] * len(bad) + ["COMPLETED"]
    assert runs[-1]["state"]["data"] == 7
    messages = [r["state"]["message"] for r in runs[:-1]]
    assert "parameter 'item'" in messages[0] and "a validator that raises something unexpected" in messages[0]
    assert "parameter 'at': cannot read '9 am' as time" in messages[1]
    assert "parameter 'amount': its annotation 'Decimal' cannot be resolved" in messages[2]
    assert "parameter 'item': cannot read" in messages[3] and "Decimal" in messages[3]
    assert "parameter 'slot'" in messages[4] and "'green' is not a valid Room" in messages[4]
    assert "parameter 'slot'" in messages[5] and "expected an array for Slot" in messages[5]


@task(key="values.answer")
def answer(kind: str) -> Any:
    return {"nan": math.nan, "time": time(1), "int": 42}[kind]


@task(key="values.answer")
def answer_as_time(kind: str) -> time:
    """The same key, another return annotation: what a client with other code sees."""
    raise NotImplementedError


async def test_results_that_would_arrive_changed_fail_the_run(trioworker_worker: Make) -> None:
    nan, a_time, fine = [await answer.delay(kind) for kind in ("nan", "time", "int")]
    async with trioworker_worker(answer):
        with trio.fail_after(20):
            for future, words in (
                (nan, "nan would arrive as None (NoneType)"),
                (a_time, "datetime.time(1, 0) would arrive as '01:00:00' (str)"),
            ):
                error = await future.result(raise_on_failure=False)
                assert isinstance(error, TypeError)
                assert str(error).startswith(f"the result of answer cannot be reported: {words}")
            assert await fine.result() == 42


async def test_result_raises_result_decode_error_when_it_cannot_read_a_result(
    trioworker_worker: Make,
) -> None:
    future = await answer.delay("int")
    async with trioworker_worker(answer):
        with trio.fail_after(20):
            assert await future.result() == 42
    assert future.task_run is not None and future.task_run.state.type is StateType.COMPLETED
    as_time = TaskRunFuture(future.task_run_id, answer_as_time, future.task_run)
    with pytest.raises(ResultDecodeError, match=r"annotation says: cannot read 42 as time") as info:
        await as_time.result()
    assert info.value.data == 42 and info.value.task_run is future.task_run  # nothing lost

    with pytest.raises(ResultDecodeError, match=r"its annotation 'Decimal' cannot be resolved"):
        await TaskRunFuture(future.task_run_id, answer_as_decimal, future.task_run).result()


def test_a_pickled_result_that_does_not_load_is_a_result_decode_error() -> None:
    run = TaskRun(uuid.uuid4(), "values.pickled", "pickled", make_state(StateType.COMPLETED, data="bm90"))
    run = attrs.evolve(run, serializer="pickle")
    with pytest.raises(ResultDecodeError, match=r"cannot be read: cannot unpickle") as info:
        result_of(run, pickled)
    assert info.value.data == "bm90" and info.value.task_run is run


async def test_a_naive_scheduled_time_reaches_the_server_as_local_time(
    five_thirty_east: None, trioworker_server: RunningServer
) -> None:
    naive = datetime.now() + timedelta(hours=1)  # a naive local time
    future = await echo_time.apply_async([time(1)], scheduled_time=naive)
    state = await future.get_state()
    assert state.type is StateType.SCHEDULED
    due = state.state_details.scheduled_time
    assert due is not None and due.timestamp() == pytest.approx(naive.timestamp(), abs=1e-3)
    assert await future.cancel()

"""Tasks and types in a module with string annotations (``from __future__ import annotations``)."""

from __future__ import annotations

import enum
from datetime import time, timedelta
from typing import TYPE_CHECKING, NamedTuple

from trioworker import task

if TYPE_CHECKING:
    from decimal import Decimal  # a name the annotations use but the module never defines


class Room(enum.StrEnum):
    RED = "red"
    BLUE = "blue"


class Slot(NamedTuple):
    start: time
    length: timedelta
    room: Room


class Priced(NamedTuple):
    slot: Slot
    price: Decimal  # resolvable only by a type checker


@task(key="values.book")
def book(slot: Slot, rooms: list[Room]) -> Slot:
    return slot if slot.room in rooms else slot._replace(room=rooms[0])


@task(key="values.price")
def price(item: Priced) -> str:
    return str(item.price)


@task(key="values.cost")
def cost(amount: Decimal, count: int) -> int:
    return count


@task(key="values.answer")
def answer_as_decimal(kind: str) -> Decimal:
    """The key of ``test_values.answer`` with a return annotation no one here can resolve."""
    raise NotImplementedError

"""The servers to use (one URL or a list) and the failover rule's pace, on their own."""

from __future__ import annotations

import random

import pytest
from trio_websocket import CloseReason, ConnectionClosed, ConnectionRejected, ConnectionTimeout

from trioworker._websocket import Disconnected, MalformedMessage, connection_failure
from trioworker.protocol import CLOSE_POLICY, CLOSE_PROTOCOL, CLOSE_RESTART
from trioworker.servers import Rounds, Servers, api_roots, as_servers, next_backoff


@pytest.mark.parametrize(
    ("given", "roots"),
    [
        ("http://a:1", ("http://a:1/api",)),
        ("http://a:1,http://b:2/api/", ("http://a:1/api", "http://b:2/api")),
        (" http://a:1 , https://b/queue ", ("http://a:1/api", "https://b/queue/api")),
        (["http://a:1", "http://b:2"], ("http://a:1/api", "http://b:2/api")),
        (("http://a:1,http://b:2", "http://c:3"), ("http://a:1/api", "http://b:2/api", "http://c:3/api")),
    ],
)
def test_api_roots_in_the_order_given(given: str | list[str], roots: tuple[str, ...]) -> None:
    assert api_roots(given) == roots
    assert as_servers(given).roots == roots


@pytest.mark.parametrize(
    ("given", "message"),
    [
        (
            "http://a:1,ftp://b",
            "the API URL must start with http:// or https://, got 'ftp://b' "
            "(entry 2 of the API URL list 'http://a:1, ftp://b')",
        ),
        (
            ["http://a:1", "http://b:2", "http://c:port"],
            "the API URL has a port that is not a number from 0 to 65535: 'http://c:port' "
            "(entry 3 of the API URL list 'http://a:1, http://b:2, http://c:port')",
        ),
        (
            "http://a:1,,http://b:2",
            "the API URL list 'http://a:1, , http://b:2' has an empty entry (entry 2)",
        ),
        ("http://a:1,", "the API URL list 'http://a:1, ' has an empty entry (entry 2)"),
        (
            "http://a:1,http://b:2,http://a:1/api/",
            "the API URL list 'http://a:1, http://b:2, http://a:1/api/' names http://a:1/api twice "
            "(entries 1 and 3)",
        ),
        ([], "the API URL list is empty"),
        # One URL: the error is the URL rule's own, word for word.
        ("http:///api", "the API URL has no host: 'http:///api'"),
    ],
)
def test_a_bad_list_is_one_line_naming_the_entry(given: str | list[str], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        api_roots(given)
    assert str(caught.value) == message
    assert "\n" not in message


def test_servers_move_to_the_next_on_failure_and_wrap() -> None:
    servers = as_servers("http://a:1,http://b:2,http://c:3")
    a, b, c = servers
    assert (len(servers), servers[0], list(servers)) == (3, a, [a, b, c])
    assert servers.current == a
    servers.failed(a)
    assert servers.current == b
    servers.failed(a)  # a failure seen late by another task: moves nothing
    assert servers.current == b
    servers.failed(b)
    servers.failed(c)
    assert servers.current == a  # wrapped
    assert servers.describe() == f"the trioworker servers at {a}, {b}, {c}"
    assert as_servers("http://a:1").describe() == "the trioworker server at http://a:1/api"
    assert as_servers(servers) is servers  # shared, not copied
    assert repr(servers) == f"<Servers {a}, {b}, {c} (current {a})>"


def test_rounds_try_each_server_once_then_pause_longer_each_round() -> None:
    servers = as_servers("http://a:1,http://b:2,http://c:3")
    a, b, c = servers
    rounds = Rounds(servers, random.Random(3))
    expected = random.Random(3)
    assert [rounds.failed(a), rounds.failed(b)] == [False, False]
    assert servers.current == c
    assert rounds.failed(c) is True  # a whole round failed
    assert rounds.pause() == next_backoff(0, expected)
    assert [rounds.failed(a), rounds.failed(b), rounds.failed(c)] == [False, False, True]
    assert rounds.pause() == next_backoff(1, expected)
    rounds.succeeded()  # the backoff starts again; the round goes on
    assert rounds.failed(a) is False
    # An answer of the application (a refused API key) moves nothing and ends the round.
    assert rounds.failed(b, fail_over=False) is True
    assert servers.current == b
    assert rounds.pause(extra=2) == next_backoff(2, expected)


def test_one_server_pauses_after_every_failure_as_before() -> None:
    servers = as_servers("http://a:1")
    rounds = Rounds(servers, random.Random(5))
    expected = random.Random(5)
    for attempt in range(6):
        assert rounds.failed(servers.current) is True
        assert rounds.pause() == next_backoff(attempt, expected)
    assert servers.current == "http://a:1/api"


@pytest.mark.parametrize(
    ("exc", "moves"),
    [
        (OSError("refused"), True),
        (ConnectionTimeout(), True),
        (Disconnected("lost"), True),
        (MalformedMessage("bad"), True),
        (ConnectionClosed(CloseReason(CLOSE_RESTART, "the server is stopping")), True),
        (ConnectionClosed(CloseReason(1006, None)), True),
        (ConnectionRejected(503, (), b""), True),
        (ConnectionRejected(502, (), b""), True),
        (ConnectionClosed(CloseReason(CLOSE_POLICY, "Unauthorized")), False),
        (ConnectionClosed(CloseReason(CLOSE_PROTOCOL, "bad message")), False),
        (ConnectionRejected(404, (), b""), False),
        (ConnectionRejected(401, (), b""), False),
    ],
)
def test_what_moves_a_websocket_to_the_next_server(exc: BaseException, moves: bool) -> None:
    assert connection_failure(exc) is moves


def test_servers_is_a_sequence_of_roots() -> None:
    servers = Servers(("http://a:1/api", "http://b:2/api"))
    assert servers[1:] == ("http://b:2/api",)
    assert "http://b:2/api" in servers

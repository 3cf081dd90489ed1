"""The open loop's client (:mod:`bench.http1`) and schedule (:mod:`bench.openloop`) against a
small HTTP server run in the test, which answers in each of the ways a server may."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from bench.http1 import Pool
from bench.openloop import open_loop, schedule

Handler = Callable[[bytes, bytes], tuple[bytes, bool]]
#: when the last server() read each request
arrivals: list[float] = []


@asynccontextmanager
async def server(answer: Handler, *, delay: float = 0.0) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An HTTP/1.1 server on 127.0.0.1: ``answer(head, body)`` gives the raw answer and whether to
    close the connection after it; yields its URL and the request heads it read."""
    heads: list[bytes] = []
    arrivals.clear()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body = await reader.readexactly(length)
                heads.append(head)
                arrivals.append(time.perf_counter())
                if delay:
                    await asyncio.sleep(delay)
                raw, close = answer(head, body)
                writer.write(raw)
                await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", heads
    finally:
        srv.close()


def echo(head: bytes, body: bytes) -> tuple[bytes, bool]:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), False


def test_the_client_reads_every_kind_of_answer_and_keeps_connections_it_may() -> None:
    answers = {
        b"/length": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", False),
        b"/chunked": (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nT: 1\r\n\r\n",
            False,
        ),
        b"/close": (b"HTTP/1.1 503 Busy\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy", True),
        b"/until-eof": (b"HTTP/1.0 200 OK\r\n\r\nto the end", True),
    }

    def answer(head: bytes, body: bytes) -> tuple[bytes, bool]:
        return answers[head.split(b" ")[1]]

    async def main() -> tuple[list[tuple[int, bytes]], int, list[bytes]]:
        async with server(answer) as (url, heads):
            pool = Pool(url, {"Authorization": "Bearer k"})
            got = []
            for path in ("/length", "/chunked", "/length", "/close", "/length", "/until-eof", "/length"):
                a = await pool.post(path, b'{"x": 1}')
                got.append((a.status, a.body))
            await pool.close()
            return got, pool.opened, heads

    got, opened, heads = asyncio.run(main())
    assert got == [
        (200, b"hello"), (200, b"abcde"), (200, b"hello"), (503, b"busy"),
        (200, b"hello"), (200, b"to the end"), (200, b"hello"),
    ]  # fmt: skip
    assert opened == 3  # one kept alive through three answers, then a new one after each close
    assert heads[0].startswith(b"POST /length HTTP/1.1\r\n") and b"\r\nAuthorization: Bearer k\r\n" in heads[0]
    assert b"\r\nContent-Length: 8\r\n" in heads[0]
    with pytest.raises(ValueError, match="line break"):
        Pool("http://127.0.0.1:1", {"Authorization": "Bearer k\r\nX-Evil: 1"})


def test_the_open_loop_keeps_its_schedule_and_counts_every_answer() -> None:
    async def main() -> tuple[float, dict[str, object]]:
        async with server(echo) as (url, heads):
            before = time.perf_counter()
            row = await open_loop(url, "/infer", [b"a", b"bb"], headers={}, rate=200, duration_s=0.5)
            assert len(heads) == 100
            return before, row

    before, row = asyncio.run(main())
    assert (row["scheduled"], row["requests"], row["ok"], row["errors"], row["dropped"]) == (100, 100, 100, {}, 0)
    # spread over the half second, not sent at once: none arrived before it was due (request k at k / 200 s);
    # a stalled client sends late, never early (measured from the first arrival, a stall at the start
    # bunched the first requests and failed this on a busy box)
    since = [t - before for t in sorted(arrivals)]
    assert all(t >= k / 200 - 1e-4 for k, t in enumerate(since)), since


def test_poisson_arrivals_have_exponential_gaps_of_the_rates_mean() -> None:
    even = list(schedule(50.0, 5))
    assert even == [0.0, 0.02, 0.04, 0.06, 0.08]
    drawn = list(schedule(50.0, 20_000, "poisson", seed=7))
    assert drawn[0] == 0.0 and drawn == sorted(drawn) and drawn == list(schedule(50.0, 20_000, "poisson", seed=7))
    # the window keeps its length: every request is due within count / rate, as evenly spaced ones are
    assert (
        len(drawn) == 20_000 and drawn[-1] < 400.0 and all(len(list(schedule(5.0, 17, "poisson"))) == 17 for _ in "ab")
    )
    assert max(max(schedule(4.0, 16, "poisson")) for _ in range(200)) < 4.0
    gaps = [b - a for a, b in itertools.pairwise(drawn)]
    mean = sum(gaps) / len(gaps)
    sd = (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5
    # an exponential distribution: the mean 1/rate, the standard deviation equal to the mean
    # (evenly spaced gaps have none), and about 1 - 1/e of the gaps shorter than the mean
    assert mean == pytest.approx(0.02, rel=0.03) and sd == pytest.approx(mean, rel=0.05)
    assert sum(g < mean for g in gaps) / len(gaps) == pytest.approx(0.632, abs=0.015)
    assert list(schedule(50.0, 3, "poisson")) != list(schedule(50.0, 3, "poisson"))  # a fresh draw unseeded
    with pytest.raises(ValueError, match="arrivals must be one of constant, poisson"):
        schedule(50.0, 3, "bursty")


def test_the_open_loop_sends_poisson_arrivals_and_says_so() -> None:
    async def main() -> dict[str, object]:
        async with server(echo) as (url, heads):
            row = await open_loop(
                url, "/infer", [b"a"], headers={}, rate=200, duration_s=0.5, arrivals="poisson", seed=3
            )
            assert len(heads) == 100
            return row

    row = asyncio.run(main())
    assert (row["arrivals"], row["scheduled"], row["ok"], row["errors"], row["dropped"]) == ("poisson", 100, 100, {}, 0)
    # the server read them at random times, not evenly spaced: the gaps between its reads spread as
    # wide as their mean (about 1 for exponential gaps, near 0 for even ones; a lagging client only
    # bunches them more)
    seen = sorted(arrivals)
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    mean = sum(gaps) / len(gaps)
    assert (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 > 0.5 * mean


def test_a_client_that_fell_behind_catches_up_instead_of_dropping() -> None:
    """The clock jumps 0.1 s after the first request (a stalled client): 100 requests are due at
    once.  The client reads the answers while it sends them, so none is dropped; one that never
    yielded would start 50 and drop the other 50 itself, blaming the server."""
    jumped: list[float] = []

    def clock() -> float:
        now = time.perf_counter()
        if not jumped:
            jumped.append(now)
        return now + (0.1 if now > jumped[0] + 0.001 else 0.0)

    async def main() -> dict[str, object]:
        async with server(echo) as (url, _heads):
            return await open_loop(
                url, "/x", [b"x"], headers={}, rate=1000, duration_s=0.2, max_outstanding=50, clock=clock
            )

    row = asyncio.run(main())
    assert (row["ok"], row["dropped"]) == (200, 0), row
    assert row["late_ms_p99"] >= 50.0, row  # and the row says the client was late


def test_the_open_loop_counts_latency_from_when_a_request_was_due_and_drops_past_its_limit() -> None:
    """A server that takes a second: five requests fill the limit, the fifteen due meanwhile are
    dropped, and the five answered count their full second from their due times."""

    async def main() -> dict[str, object]:
        async with server(echo, delay=1.0) as (url, _heads):
            return await open_loop(url, "/slow", [b"x"], headers={}, rate=100, duration_s=0.2, max_outstanding=5)

    row = asyncio.run(main())
    assert (row["scheduled"], row["requests"], row["ok"], row["dropped"]) == (20, 5, 5, 15)
    assert row["p50_ms"] >= 1000.0 and row["p99_ms"] >= row["p50_ms"]  # type: ignore[operator]


def test_the_client_reuses_only_connections_whose_answer_ended_where_the_server_said() -> None:
    """A connection the server closed while idle is sent the request again on a new one; bytes
    past the stated length, or an HTTP/1.0 answer without keep-alive, retire the connection;
    100 Continue is skipped and 204 has no body."""
    calls: list[bytes] = []

    def answer(head: bytes, body: bytes) -> tuple[bytes, bool]:
        path = head.split(b" ")[1]
        calls.append(path)
        return {
            b"/then-close": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),  # closed, unannounced
            b"/extra": (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA", False),
            b"/continue": (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
            b"/empty": (b"HTTP/1.1 204 No Content\r\n\r\n", False),
            b"/http10-keep": (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False),
            b"/two-lengths": (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!", True),
        }.get(path, (b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine", False))

    async def main() -> tuple[list[tuple[int, bytes]], list[int]]:
        async with server(answer) as (url, _heads):
            pool = Pool(url, {})
            got, opened = [], []
            for path in ("/then-close", "/next", "/extra", "/next", "/continue", "/empty", "/http10-keep", "/next"):
                await asyncio.sleep(0.05)  # the server's close reaches the idle connection (not an assertion)
                a = await pool.post(path, b"{}")
                got.append((a.status, a.body))
                opened.append(pool.opened)
            with pytest.raises(ValueError, match="conflicting Content-Length"):
                await pool.post("/two-lengths", b"{}")
            await pool.close()
            return got, opened

    got, opened = asyncio.run(main())
    assert got == [
        (200, b"ok"), (200, b"fine"), (200, b"hello"), (200, b"fine"),
        (200, b"ok"), (204, b""), (200, b"ok"), (200, b"fine"),
    ]  # fmt: skip
    # a new connection after the unannounced close and after the extra bytes; the rest kept one
    assert opened == [1, 2, 2, 3, 3, 3, 3, 3], opened


def test_a_request_sent_again_after_a_close_without_answer_is_counted() -> None:
    """A kept-alive connection the server closes on reading the next request, without an answer
    byte, looks like an idle close: the client sends it again once, and counts it (the server
    then saw it twice)."""
    seen: list[bytes] = []

    def answer(head: bytes, body: bytes) -> tuple[bytes, bool]:
        path = head.split(b" ")[1]
        seen.append(path)
        if path == b"/drop-once" and seen.count(path) == 1:
            return b"", True
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False

    async def main() -> tuple[list[int], int, int]:
        async with server(answer) as (url, _heads):
            pool = Pool(url, {})
            statuses = [(await pool.post(p, b"{}")).status for p in ("/first", "/drop-once", "/after")]
            await pool.close()
            return statuses, pool.resent, pool.opened

    statuses, resent, opened = asyncio.run(main())
    assert statuses == [200, 200, 200] and seen == [b"/first", b"/drop-once", b"/drop-once", b"/after"]
    assert (resent, opened) == (1, 2)


def test_the_open_loop_names_an_answer_that_never_came() -> None:
    async def main() -> dict[str, object]:
        async with server(echo) as (url, _heads):
            closed = url.rsplit(":", 1)[0] + ":1"  # nothing listens on port 1
            return await open_loop(closed, "/", [b"x"], headers={}, rate=50, duration_s=0.1)

    row = asyncio.run(main())
    assert row["ok"] == 0 and row["errors"] == {"ConnectionRefusedError": 5}, row
    assert "ConnectionRefusedError" in str(row["first_error"])

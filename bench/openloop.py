"""An open-loop load: requests start on a fixed schedule, whatever pace the answers come at.

A closed loop (wrk, :func:`bench.http.closed_loop`) asks how much C clients get
out of a server.  Capacity planning asks the other question: at R requests a
second, how long does an answer take?  Here request ``i`` is due at
``start + i / R`` and its latency counts from when it was due, not from when
the client got round to sending it, so neither a client that fell behind nor a
server that kept it waiting for a connection is hidden (coordinated omission).
``late_ms_p99`` says how far behind the schedule the client itself started
requests: when it is large, the client, not the server, set the pace.

Arrivals are ``constant`` (evenly spaced, as above) or ``poisson``: the same
number of requests in the same window, due at independent uniform times (a
Poisson process given its count: its gaps are exponential with mean ``1 / R``;
a fresh draw each run unless seeded), as many independent callers send them.
Bursts then meet a busy server, so the tail at a given rate is longer: the
more conservative figure to size a box by.

A request due while ``max_outstanding`` are still unanswered is not sent and
counts as ``dropped``: at that rate the server does not keep up.  The client is
:class:`bench.http1.Pool` (a fifth or less of httpx's CPU a request), since on
an appliance without a network the load runs on the box it measures.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import ssl
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from bench.common import percentile
from bench.http1 import TRANSPORT_ERRORS, Pool

__all__ = ["ARRIVALS", "COLUMNS", "MAX_OUTSTANDING", "open_loop", "schedule"]

logger = logging.getLogger(__name__)

#: requests in flight at most; one more due is dropped
MAX_OUTSTANDING = 512
#: how requests arrive: evenly spaced, or with exponential gaps (a Poisson process)
ARRIVALS = ("constant", "poisson")
#: the figures of an :func:`open_loop` row, in the order a table shows them
COLUMNS = ("rate", "rps", "p50_ms", "p90_ms", "p99_ms", "ok", "errors", "dropped", "late_ms_p99", "client_cpu_ms")


def schedule(rate: float, count: int, arrivals: str = "constant", seed: int | None = None) -> Iterator[float]:
    """When each of ``count`` requests is due, in seconds from the start, at ``rate`` a second:
    ``i / rate`` (``constant``), or (``poisson``) the first at 0 and the others at independent
    uniform times in ``[0, count / rate)``, in order: a Poisson process given its count, whose
    gaps are exponential with mean ``1 / rate`` while the window keeps its length (``seed``
    repeats a draw, None draws afresh).  Lazily, so a long run holds no list of times: the uniform
    order statistics are the partial sums of ``count`` exponential draws over their total, drawn
    twice from the same seed."""
    if arrivals not in ARRIVALS:
        raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, not {arrivals!r}")
    if arrivals == "constant":
        return (i / rate for i in range(count))
    if seed is None:
        seed = random.SystemRandom().getrandbits(64)
    first = random.Random(seed)
    scale = (count / rate) / math.fsum(first.expovariate(1.0) for _ in range(count))

    def due() -> Iterator[float]:
        rng = random.Random(seed)
        t = 0.0
        yield 0.0
        for _ in range(count - 1):
            t += rng.expovariate(1.0)
            yield t * scale

    return due()


async def open_loop(
    base_url: str,
    path: str,
    bodies: Sequence[bytes],
    *,
    headers: dict[str, str],
    rate: float,
    duration_s: float,
    ssl_context: ssl.SSLContext | None = None,
    max_outstanding: int = MAX_OUTSTANDING,
    clock: Callable[[], float] = time.perf_counter,
    arrivals: str = "constant",
    seed: int | None = None,
) -> dict[str, Any]:
    """``POST base_url + path`` at ``rate`` requests a second for ``duration_s`` seconds, one
    body after the other, the requests due as :func:`schedule` says (``arrivals``, ``seed``).

    Returns the offered ``rate``, the achieved ``rps`` (answers over the time until the last
    one), latency p50/p90/p99 (ms, from each request's due time), ``ok``, ``errors`` by status,
    ``dropped``, ``late_ms_p99``, the client's own CPU per request (``client_cpu_ms``), the
    ``connections`` it opened and the requests it ``resent`` (:attr:`bench.http1.Pool.resent`).
    """
    scheduled = math.ceil(rate * duration_s - 1e-9)  # the requests due in [0, duration_s) when evenly spaced
    if rate <= 0 or scheduled < 1:
        raise ValueError(f"{rate:g} requests/s in {duration_s:g} s is no request; raise the rate or the duration")
    offsets = schedule(rate, scheduled, arrivals, seed)
    pool = Pool(base_url, headers, ssl_context=ssl_context)
    # 8 bytes a request (a long run at a high rate keeps millions of them)
    latencies: array[float] = array("d")
    lateness: array[float] = array("d")
    errors: dict[str, int] = {}
    first_error: list[str] = []
    outstanding = 0
    dropped = 0
    sent = 0
    last_done = 0.0
    running: set[asyncio.Task[None]] = set()
    cpu0 = time.process_time()

    async def one(body: bytes, due: float) -> None:
        nonlocal outstanding, last_done
        lateness.append(clock() - due)
        try:
            answer = await pool.post(path, body)
            status = str(answer.status)
            if answer.status != 200 and not first_error:
                first_error.append(f"{answer.status}: {answer.body[:300].decode('utf-8', 'replace')}")
        except Exception as exc:  # a transport error, or any other: an error of this request, never a crash
            status = type(exc).__name__
            if not first_error:
                first_error.append(f"{status}: {exc}")
            if not isinstance(exc, TRANSPORT_ERRORS):
                logger.exception("open loop: request failed")
        finally:
            outstanding -= 1
        done = clock()
        last_done = max(last_done, done)
        if status == "200":
            latencies.append(done - due)
        else:
            errors[status] = errors.get(status, 0) + 1

    start = clock()
    try:
        for i, offset in enumerate(offsets):
            due = start + offset
            # Yield even when behind: answers that came meanwhile are read and their
            # requests leave ``outstanding``; never yielding, a client that fell behind
            # would start requests up to the limit and then drop the rest itself.
            await asyncio.sleep(max(0.0, due - clock()))
            if outstanding >= max_outstanding:
                dropped += 1
                continue
            outstanding += 1
            sent += 1
            task = asyncio.ensure_future(one(bodies[i % len(bodies)], due))
            running.add(task)
            task.add_done_callback(running.discard)
        while running:
            await asyncio.wait(set(running))
    finally:
        await pool.close()
    elapsed = max(duration_s, last_done - start)
    out: dict[str, Any] = {
        "rate": rate,
        "arrivals": arrivals,
        "scheduled": scheduled,
        "requests": sent,
        "ok": len(latencies),
        "errors": errors,
        "dropped": dropped,
        "seconds": elapsed,
        "rps": len(latencies) / elapsed,
        "late_ms_p99": percentile(lateness, 99) * 1000 if lateness else 0.0,
        "client_cpu_ms": 1000.0 * (time.process_time() - cpu0) / max(1, sent),
        "connections": pool.opened,
        "resent": pool.resent,
        "client": "open loop",
    }
    if latencies:
        for q in (50, 90, 99):
            out[f"p{q}_ms"] = percentile(latencies, q) * 1000
    if first_error:
        out["first_error"] = first_error[0]
    return out

"""sd_notify over an AF_UNIX datagram socket the test binds itself (path and abstract namespace)."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.systemd.notify import Watchdog, notify, notify_ready, socket_address, watchdog_interval


@pytest.fixture(params=["path", "abstract"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        sock.bind(path)
        env = {"NOTIFY_SOCKET": path}
    else:
        name = f"inferbox-test-{secrets.token_hex(6)}"
        sock.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name}
    sock.settimeout(5)
    yield sock, env
    sock.close()


def test_ready_and_watchdog_reach_the_socket(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    assert notify_ready(env)
    assert sock.recv(4096) == b"READY=1"
    assert notify("WATCHDOG=1", env)
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_no_socket_means_no_op() -> None:
    assert socket_address({}) is None
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False
    assert socket_address({"NOTIFY_SOCKET": "@abc"}) == "\0abc"


def test_a_missing_socket_is_reported_not_raised(tmp_path: Path) -> None:
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_watchdog_interval_from_the_environment() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}) == 30.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "abc"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_watchdog_pings_while_started_and_says_stopping(listener: tuple[socket.socket, dict[str, str]]) -> None:
    sock, env = listener
    # 20 ms interval -> a ping every 10 ms; the test waits for datagrams, not for time
    watchdog = Watchdog.from_environment({**env, "WATCHDOG_USEC": "20000"})
    assert watchdog.enabled and watchdog.interval_s == 0.02

    async def scenario() -> list[bytes]:
        watchdog.ready()
        await watchdog.start()
        loop = asyncio.get_running_loop()
        got = [await loop.run_in_executor(None, sock.recv, 4096) for _ in range(4)]
        await watchdog.stop()
        return got

    got = asyncio.run(scenario())
    assert got[0].startswith(b"READY=1")
    assert got[1:] == [b"WATCHDOG=1"] * 3
    # after stop: STOPPING=1, then nothing more (drain whatever pings raced the stop)
    rest = []
    sock.settimeout(0.2)
    try:
        while True:
            rest.append(sock.recv(4096))
    except TimeoutError:
        pass
    assert rest and rest[-1] == b"STOPPING=1"
    assert set(rest[:-1]) <= {b"WATCHDOG=1"}
    assert watchdog.pings >= 3


def test_watchdog_is_inert_outside_systemd() -> None:
    watchdog = Watchdog.from_environment({})

    async def scenario() -> None:
        await watchdog.start()
        await watchdog.stop()

    asyncio.run(scenario())
    assert not watchdog.enabled and watchdog.pings == 0 and watchdog.ready() is False

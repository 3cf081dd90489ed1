"""The main process relays its workers' READY / WATCHDOG to systemd (NotifyAccess=main)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.systemd.notify import notify
from appliance.systemd.relay import NotifyRelay


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A stand-in for systemd's notify socket, asking for a watchdog ping every 0.4 s."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "systemd.sock")
    sock.bind(path)
    sock.settimeout(5)
    yield sock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
    sock.close()


def _received(sock: socket.socket, timeout: float) -> list[bytes]:
    sock.settimeout(timeout)
    out: list[bytes] = []
    try:
        while True:
            out.append(sock.recv(4096))
    except TimeoutError:
        return out


def test_the_first_ready_is_relayed_once_and_pings_only_while_workers_ping(
    systemd: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = systemd
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    relay = NotifyRelay.for_workers()
    assert relay is not None
    relay.start()
    try:
        # what a worker spawned now inherits: the relay, systemd's interval, no WATCHDOG_PID
        assert os.environ["NOTIFY_SOCKET"] == relay.path and os.environ["WATCHDOG_USEC"] == "400000"
        assert "WATCHDOG_PID" not in os.environ
        worker = relay.worker_environment()
        assert _received(sock, 0.6) == []  # no worker has pinged: nothing for systemd's watchdog
        assert notify("WATCHDOG=1", worker) and notify("READY=1", worker)
        assert notify("READY=1", worker)  # a second worker (or one uvicorn restarted): not repeated
        assert notify("STOPPING=1", worker)  # one worker stopping is not the service stopping
        got = _received(sock, 0.5)
        assert got.count(b"READY=1") == 1 and b"STOPPING=1" not in got
        assert b"WATCHDOG=1" in got
        # the workers stop pinging (their loops hung): the pings to systemd stop within an interval
        _received(sock, 1.0)  # pings already due (the last worker ping was under 0.4 s ago)
        assert _received(sock, 0.8) == []
    finally:
        relay.stop()
    assert _received(sock, 0.5) == [b"STOPPING=1"]
    assert not os.path.exists(relay.path)


def test_no_relay_outside_systemd() -> None:
    assert NotifyRelay.for_workers({}) is None

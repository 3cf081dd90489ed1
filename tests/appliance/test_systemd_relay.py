"""The main process relays its workers' READY / WATCHDOG to systemd (NotifyAccess=main) and ends a
worker whose pings stop (a hung event loop) while it lives."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.systemd.relay import NotifyRelay


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[tuple[socket.socket, dict[str, str]]]:
    """A stand-in for systemd's notify socket, asking for a watchdog ping every 2 s."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "systemd.sock")
    sock.bind(path)
    yield sock, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}
    sock.close()


def _received(sock: socket.socket, timeout: float, *, first_within: float | None = None) -> list[bytes]:
    """What arrives until ``timeout`` s pass without a datagram; the first may take ``first_within``."""
    out: list[bytes] = []
    try:
        if first_within is not None:
            sock.settimeout(first_within)
            out.append(sock.recv(4096))
        sock.settimeout(timeout)
        while True:
            out.append(sock.recv(4096))
    except TimeoutError:
        return out


#: a worker: READY=1 (twice, as a restarted one would), WATCHDOG=1 every 0.1 s for ``ping_s``;
#: then, with ``stop``, STOPPING=1; then ``hang_s`` alive and silent
WORKER = """
import sys, time
from appliance.systemd.notify import notify
ping_s, hang_s, stop = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3] == "stop"
notify("READY=1"); notify("READY=1")
end = time.monotonic() + ping_s
while time.monotonic() < end:
    notify("WATCHDOG=1"); time.sleep(0.1)
if stop:
    notify("STOPPING=1")
time.sleep(hang_s)
"""


def _worker(relay: NotifyRelay, ping_s: float, hang_s: float, *, stop: bool = False) -> subprocess.Popen[bytes]:
    env = {**os.environ, **relay.worker_environment(), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    args = [sys.executable, "-c", WORKER, str(ping_s), str(hang_s), "stop" if stop else "run"]
    return subprocess.Popen(args, env=env)


def test_ready_once_pings_while_workers_ping_and_a_silent_worker_is_killed(
    systemd: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, env = systemd
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    relay = NotifyRelay.for_workers()
    assert relay is not None
    relay.start()
    worker = None
    try:
        # what a worker spawned now inherits: the relay, systemd's interval, no WATCHDOG_PID
        assert os.environ["NOTIFY_SOCKET"] == relay.path and os.environ["WATCHDOG_USEC"] == "2000000"
        assert "WATCHDOG_PID" not in os.environ
        assert _received(sock, 1.5) == []  # no worker has pinged: nothing for systemd's watchdog
        worker = _worker(relay, ping_s=4.0, hang_s=60)
        # while it pings (the relay forwards once a second); a Python start on a busy box can take seconds
        got = _received(sock, 3.0, first_within=60)
        assert got.count(b"READY=1") == 1 and b"WATCHDOG=1" in got
        assert worker.wait(timeout=20) == -9  # silent past the interval while alive: killed
        assert relay.killed == [worker.pid]
        _received(sock, 2.5)
        assert _received(sock, 2.0) == []  # no worker pings: systemd's watchdog would fire
    finally:
        if worker is not None and worker.poll() is None:
            worker.kill()
        relay.stop()
    assert _received(sock, 0.5) == [b"STOPPING=1"]
    assert not os.path.exists(relay.path)


def test_a_stopping_or_exited_worker_is_not_killed(
    systemd: tuple[socket.socket, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One that said STOPPING=1 (closing its audit log on its loop) is no longer watched; one that
    exited is forgotten; and a worker's STOPPING=1 is not the service's."""
    sock, env = systemd
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    relay = NotifyRelay.for_workers()
    assert relay is not None
    relay.start()
    try:
        stopping = _worker(relay, ping_s=0.5, hang_s=4.0, stop=True)
        exiting = _worker(relay, ping_s=0.5, hang_s=0)
        assert exiting.wait(timeout=20) == 0 and stopping.wait(timeout=20) == 0
        got = _received(sock, 2.5)
        assert relay.killed == [] and b"STOPPING=1" not in got
    finally:
        relay.stop()


def test_no_relay_outside_systemd() -> None:
    assert NotifyRelay.for_workers({}) is None


def test_a_late_relay_judges_nobody(systemd: tuple[socket.socket, dict[str, str]]) -> None:
    """After the relay's own thread stalled (the unit frozen), every worker looks silent; none is
    killed: their pings count from now. On time, a silent live child is killed."""
    _, env = systemd
    relay = NotifyRelay(env)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import time

        now = time.monotonic()
        relay._pings = {child.pid: now - 10.0}
        relay._tick(now, late=5.0)  # the relay was 5 s late, more than the 2 s interval
        assert relay.killed == [] and relay._pings == {child.pid: now}
        relay._pings = {child.pid: now - 10.0}
        relay._tick(now, late=0.0)
        assert relay.killed == [child.pid] and child.wait(timeout=10) == -9
    finally:
        if child.poll() is None:
            child.kill()
        relay.stop()

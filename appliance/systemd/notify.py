"""sd_notify without libsystemd: ``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ``STATUS=...``.

systemd passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service: a filesystem
path, or an abstract socket written with a leading ``@``.  A notification is
one datagram on an ``AF_UNIX`` ``SOCK_DGRAM`` socket.  Outside systemd (no
``$NOTIFY_SOCKET``) every call is a no-op that returns False.

``$WATCHDOG_USEC`` (with ``WatchdogSec=``) asks for a ``WATCHDOG=1`` at least
that often; :class:`Watchdog` pings at half the interval from an asyncio task
(the API calls it from its Litestar lifespan)::

    watchdog = Watchdog.from_environment()
    watchdog.ready()
    await watchdog.start()
    ...
    await watchdog.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Watchdog", "notify", "notify_ready", "notify_stopping", "socket_address", "watchdog_interval"]

log = logging.getLogger(__name__)


def socket_address(environ: Mapping[str, str] | None = None) -> str | None:
    """The address to send to: ``$NOTIFY_SOCKET`` with ``@`` turned into the abstract-namespace NUL."""
    env = os.environ if environ is None else environ
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return None
    if path.startswith("@"):
        return "\0" + path[1:]
    if not path.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract socket; ignoring it", path)
        return None
    return path


def notify(state: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``state`` (e.g. ``"READY=1"``, newline-separated assignments) to systemd; False if not under systemd."""
    address = socket_address(environ)
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(address)
            sock.sendall(state.encode("utf-8"))
        except OSError as exc:
            log.warning("sd_notify %r to %r failed: %s", state, address, exc)
            return False
    return True


def notify_ready(environ: Mapping[str, str] | None = None) -> bool:
    """``READY=1`` (the unit has ``NotifyAccess=main``: only the main process is heard)."""
    return notify("READY=1", environ)


def notify_stopping(environ: Mapping[str, str] | None = None) -> bool:
    return notify("STOPPING=1", environ)


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between required watchdog pings, or None when systemd asks for none (or for another pid)."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.isdigit() and int(pid) != os.getpid():
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("WATCHDOG_USEC=%r is not an integer; no watchdog pings", usec)
        return None
    return value / 1_000_000 if value > 0 else None


class Watchdog:
    """Pings ``WATCHDOG=1`` every ``interval_s / 2`` while started. Inert outside systemd."""

    def __init__(self, interval_s: float | None, environ: Mapping[str, str] | None = None) -> None:
        self.interval_s = interval_s
        self._environ = dict(os.environ if environ is None else environ)
        self._task: asyncio.Task[None] | None = None
        self.pings = 0

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Watchdog:
        return cls(watchdog_interval(environ), environ)

    @property
    def enabled(self) -> bool:
        return self.interval_s is not None and socket_address(self._environ) is not None

    def ready(self) -> bool:
        return notify_ready(self._environ)

    def ping(self) -> bool:
        sent = notify("WATCHDOG=1", self._environ)
        if sent:
            self.pings += 1
        return sent

    async def _loop(self, period: float) -> None:
        while True:
            self.ping()
            await asyncio.sleep(period)

    async def start(self) -> None:
        """Start pinging (no-op when systemd asked for no watchdog)."""
        if not self.enabled or self._task is not None:
            return
        assert self.interval_s is not None
        self._task = asyncio.create_task(self._loop(self.interval_s / 2), name="sd-watchdog")

    async def stop(self) -> None:
        """Stop pinging and tell systemd the service is stopping."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if socket_address(self._environ) is not None:
            notify_stopping(self._environ)

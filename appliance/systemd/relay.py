"""systemd notifications for ``serve --workers N``: the workers' ``READY=1`` and ``WATCHDOG=1`` go
through the main process, the only one a ``NotifyAccess=main`` unit hears.

With workers, the process systemd started is uvicorn's supervisor, which runs no app; the app
(and its event loop) lives in the worker processes.  :class:`NotifyRelay` binds a private
datagram socket and hands the workers its path as their ``$NOTIFY_SOCKET`` (with systemd's
``$WATCHDOG_USEC``), so their usual notifications (``appliance.systemd.notify``) reach it:

- the first worker's ``READY=1`` (its model loaded, its lifespan started) becomes the
  service's ``READY=1``; a worker uvicorn restarts later says it again, which is not repeated;
- ``WATCHDOG=1`` is sent to systemd every half interval only while some worker pinged within
  the last interval: with every worker's event loop hung, systemd's watchdog fires and
  restarts the service, as it does for one process;
- a worker (a child of this process, known by the pid the kernel attaches to its datagrams)
  whose pings stop for longer than the interval while it lives has a hung event loop: it is
  killed, and uvicorn's supervisor starts another (uvicorn's own health check runs in a thread
  of its own and answers while the loop is stuck);
- a worker's ``STOPPING=1`` is one worker stopping, not the service (it is no longer watched):
  the relay says ``STOPPING=1`` itself when the supervisor returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Mapping

from appliance.systemd.notify import notify, socket_address, watchdog_interval

__all__ = ["NotifyRelay"]

log = logging.getLogger(__name__)


class NotifyRelay:
    """The main process's relay of its workers' notifications to systemd (see the module)."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        #: where systemd listens, captured before the workers' environment points elsewhere
        self._systemd = {"NOTIFY_SOCKET": env.get("NOTIFY_SOCKET", "")}
        self.interval_s = watchdog_interval(env)
        self._folder = tempfile.mkdtemp(prefix="inferbox-notify-")
        self.path = os.path.join(self._folder, "notify.sock")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # each datagram's sender pid
        self._sock.bind(self.path)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-relay", daemon=True)
        self.ready_sent = False
        self.pings_sent = 0
        self.killed: list[int] = []
        #: the last ping of each worker pid
        self._pings: dict[int, float] = {}

    @classmethod
    def for_workers(cls, environ: Mapping[str, str] | None = None) -> NotifyRelay | None:
        """A relay when this process runs under systemd (``$NOTIFY_SOCKET``), else None."""
        return cls(environ) if socket_address(environ) is not None else None

    def worker_environment(self) -> dict[str, str]:
        """What the workers inherit: the relay as their notify socket, systemd's watchdog interval."""
        env = {"NOTIFY_SOCKET": self.path}
        if self.interval_s is not None:
            env["WATCHDOG_USEC"] = str(int(self.interval_s * 1_000_000))
        return env

    def start(self) -> None:
        """Point the workers (spawned after this) at the relay and start relaying."""
        os.environ.update(self.worker_environment())
        os.environ.pop("WATCHDOG_PID", None)  # systemd's names this process: the workers' pings are theirs
        self._thread.start()

    def stop(self) -> None:
        """Stop relaying and tell systemd the service is stopping."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        notify("STOPPING=1", self._systemd)
        with contextlib.suppress(OSError):
            self._sock.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _run(self) -> None:
        period = self.interval_s / 2 if self.interval_s is not None else 1.0
        due = time.monotonic() + period
        while not self._stop.is_set():
            try:
                self._receive(max(0.01, min(0.5, due - time.monotonic())))
                now = time.monotonic()
                if now >= due:
                    late = now - due
                    due = now + period
                    self._drain()  # the pings that queued meanwhile count before any judgement
                    self._tick(now, late)
            except Exception:  # a relay that stops would starve systemd's watchdog: log, go on
                if self._stop.is_set():
                    return
                log.exception("the notify relay failed; it goes on")
                self._stop.wait(0.5)

    def _receive(self, timeout: float) -> None:
        """Relay one datagram, waiting up to ``timeout``."""
        self._sock.settimeout(timeout)
        with contextlib.suppress(TimeoutError):
            self._relay_next()

    def _drain(self) -> None:
        """Relay every datagram already queued."""
        self._sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                self._relay_next()

    def _relay_next(self) -> None:
        data, ancdata, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
        self._relay(data, _sender(ancdata))

    def _tick(self, now: float, late: float) -> None:
        if self.interval_s is not None and late > self.interval_s:
            # this thread itself did not run (the unit frozen, the box paused): the workers' silence
            # is its own, not theirs; nobody is judged this time
            log.warning("the notify relay ran %.0f s late; the workers' pings count from now", late)
            self._pings = dict.fromkeys(self._pings, now)
        else:
            self._end_hung_workers(now)
        if self._workers_alive(now) and notify("WATCHDOG=1", self._systemd):
            self.pings_sent += 1

    def _workers_alive(self, now: float) -> bool:
        """Some worker pinged within the watchdog interval (systemd asked for one)."""
        interval = self.interval_s
        return interval is not None and any(now - last < interval for last in self._pings.values())

    def _end_hung_workers(self, now: float) -> None:
        if self.interval_s is None:
            return
        for pid, last in list(self._pings.items()):
            if now - last <= self.interval_s:
                continue  # fresh: kept whatever /proc says (a pid namespace may hide it there)
            del self._pings[pid]
            if _is_child(pid):  # silent while it lives: its event loop is stuck
                log.error(
                    "worker %d has not pinged for %.0f s (its event loop is stuck): killing it, uvicorn starts another",
                    pid,
                    now - last,
                )
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                self.killed.append(pid)

    def _relay(self, datagram: bytes, pid: int | None) -> None:
        for line in datagram.decode("utf-8", "replace").splitlines():
            if line == "READY=1" and not self.ready_sent:
                self.ready_sent = notify("READY=1", self._systemd)
            elif line == "WATCHDOG=1" and pid is not None:
                self._pings[pid] = time.monotonic()
            elif line == "STOPPING=1" and pid is not None:
                self._pings.pop(pid, None)  # it closes its audit log on its loop: not a hang


_CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def _sender(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
            pid: int = _CREDENTIALS.unpack(data[: _CREDENTIALS.size])[0]
            return pid
    return None


def _is_child(pid: int) -> bool:
    """``pid`` is alive and a child of this process (never another process that reused the number)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            stat = fh.read()
    except OSError:
        return False
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
    return len(fields) > 1 and fields[0] != "Z" and fields[1] == str(os.getpid())

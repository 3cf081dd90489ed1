"""``serve --workers N``: uvicorn's supervisor, with the exit status and signals a systemd unit needs.

``uvicorn.run`` with workers returns normally however its supervisor ended, so a service whose
replacement worker could not start (uvicorn then stops every worker) exited 0, which
``Restart=on-failure`` takes for a clean stop.  :func:`run_workers` runs the same supervisor
and exits 1 unless SIGTERM or SIGINT asked it to stop.  SIGHUP is logged, not uvicorn's
replace-every-worker: a worker loads its own model, longer than uvicorn waits for a replacement,
so each ``systemctl reload`` would load an extra model copy and then give it up.  The workers'
systemd notifications go through :class:`appliance.systemd.relay.NotifyRelay`.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from appliance.settings import METRICS_DIR_ENV

__all__ = ["run_workers", "worker_ssl_context"]

log = logging.getLogger(__name__)

#: a worker tries the TLS files this many times, a second apart, before stopping the service
_TLS_TRIES = 3


def worker_ssl_context(_config: Any, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """A worker's TLS context, built as uvicorn builds it; files it cannot load (a renewal half
    written when uvicorn restarts a worker) exit with uvicorn's start-up failure code, which stops
    the service (systemd restarts it, and serve's own check names the files), instead of dying with
    1, which uvicorn answers with another worker at once, forever."""
    for _ in range(_TLS_TRIES - 1):
        try:
            return default()
        except Exception:
            time.sleep(1.0)  # a renewal being written: a moment later the pair may agree again
    try:
        return default()
    except Exception:
        log.exception("this worker could not load the TLS certificate and key")
        raise SystemExit(3) from None


def _how_it_ended(exitcode: int | None) -> str:
    """A process's end in words: ``killed by SIGKILL``, ``exit code 1``."""
    if exitcode is None:
        return "end unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def run_workers(
    options: dict[str, Any],
    *,
    deadlines: dict[str, float] | None = None,
    on_listening: Callable[[], None] | None = None,
) -> None:
    """Serve ``appliance.server:app_factory`` in ``options["workers"]`` processes (uvicorn options;
    ``deadlines``: :func:`appliance.http_protocol.configure`'s; ``on_listening``: called once the socket
    is bound, before the workers start)."""
    from uvicorn import Config
    from uvicorn.supervisors.multiprocess import Multiprocess

    from appliance.http_protocol import configure
    from appliance.systemd.relay import NotifyRelay

    class Supervisor(Multiprocess):
        stopped_by_signal = False
        restarts = 0

        def keep_subprocess_alive(self) -> None:
            # uvicorn starts another worker in a dead one's place and says so at INFO ("Child process
            # died"): a worker killed again and again (out of memory) went unseen in the journal
            before = list(self.processes)
            super().keep_subprocess_alive()
            for old, new in zip(before, self.processes, strict=False):
                if new is not old:
                    self.restarts += 1
                    log.warning(
                        "worker process %s died (%s); started %s in its place (%d since the service started)",
                        old.pid,
                        _how_it_ended(old.exitcode),
                        new.pid,
                        self.restarts,
                    )

        def handle_int(self) -> None:
            self.stopped_by_signal = True
            super().handle_int()

        def handle_term(self) -> None:
            self.stopped_by_signal = True
            super().handle_term()

        def handle_hup(self) -> None:
            log.warning(
                "SIGHUP with %d workers: ignored (each worker loads its own model); "
                "to load a renewed certificate, systemctl restart inferbox-api",
                self.processes_num,
            )

    if options.get("ssl_certfile"):  # a worker that cannot read them stops the service (see worker_ssl_context)
        options = {**options, "ssl_context_factory": worker_ssl_context}
    config = Config("appliance.server:app_factory", factory=True, **options)
    if deadlines is not None:  # the workers get the config (pickled), these attributes with it
        configure(config, **deadlines)
    relay = NotifyRelay.for_workers()  # systemd hears this process only: the workers' READY / WATCHDOG via it
    if relay is not None:
        relay.start()
    # each worker writes its metrics here, and any of them answers a scrape with all of them added up
    metrics = tempfile.mkdtemp(prefix="inferbox-metrics-")
    os.environ[METRICS_DIR_ENV] = metrics
    try:
        sock = config.bind_socket()
        if on_listening is not None:
            on_listening()
        supervisor = Supervisor(config, sockets=[sock])
        supervisor.run()
    finally:
        if relay is not None:
            relay.stop()
        os.environ.pop(METRICS_DIR_ENV, None)
        shutil.rmtree(metrics, ignore_errors=True)
        if config.uds and os.path.exists(config.uds):
            os.remove(config.uds)
    if not supervisor.stopped_by_signal:
        log.error("the workers stopped without being asked to (see above); exiting 1 so systemd restarts the service")
        sys.exit(1)

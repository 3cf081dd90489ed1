"""``/metrics`` of ``serve --workers N``: every worker's series added up, whichever worker is scraped.

Each worker process holds its own counters, and the kernel hands a scrape to any of them, so
without this each scrape showed one worker's counts (the ``requests_total`` of two workers
read about half the requests, and went down and up between scrapes, which Prometheus takes
for restarts). So each worker writes its exposition text to ``<folder>/<pid>-<token>.prom`` every
:data:`WRITE_EVERY_S` (:class:`MetricsShare`), and a scrape answers its own series, as they are
now, merged with the others' (:func:`merge`):

- counters, histograms and summaries: summed over every worker, the ones that died too
  (uvicorn starts another in its place, from zero: the sum goes on, never down). A file whose
  process is gone is a dead worker's; its counters are folded into ``retired.prom`` and the
  file removed (judged by the process, not the file's age: a clock stepped forward, or a worker
  stalled for a while, made a live worker's file look old, and its counters were then counted
  twice for good). The token keeps a new worker that gets a dead one's pid from writing over
  the dead one's counters;
- gauges: summed over the live workers (``in_flight_requests``, ``queue_depth``, the audit
  log's pending records; ``queue_limit`` too: each worker has its own queues, so the sums'
  ratio is the share in use), except :data:`SAME_IN_EVERY_WORKER` (``model_info``,
  ``static_shapes``): the largest, and :data:`LEAST_OF_EVERY_WORKER` (``audit_up``,
  ``model_ready``): the least (one worker that cannot write its audit records answers 503s;
  a model one worker failed to load is not ready on every worker);
- ``inferbox_workers``: the live workers whose series are in the answer.

A scrape sees the other workers as they were at most ``WRITE_EVERY_S`` ago: scrape less
often than that (Prometheus' default is 15 s), or two scrapes in a row can see a counter
step back.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LEAST_OF_EVERY_WORKER", "SAME_IN_EVERY_WORKER", "WRITE_EVERY_S", "MetricsShare", "merge"]

logger = logging.getLogger(__name__)

#: how often each worker writes its series
WRITE_EVERY_S = 1.0
#: gauges every worker reports alike (one value per model, not a share of the work): the largest; and
#: the open files, which are held to each worker's own limit (process_max_fds): the worker nearest it
SAME_IN_EVERY_WORKER = frozenset(
    {
        "inferbox_model_info",
        "inferbox_static_shapes",
        "inferbox_tls_certificate_expiry_timestamp_seconds",
        "inferbox_build_info",
        "process_open_fds",
    }
)
#: gauges of a state each worker has on its own, where one worker's trouble is the service's: the least
#: (the file-descriptor limit nearest, the first start)
LEAST_OF_EVERY_WORKER = frozenset(
    {"inferbox_audit_up", "inferbox_model_ready", "process_max_fds", "process_start_time_seconds"}
)
RETIRED = "retired.prom"
_SUMMED = ("counter", "histogram", "summary")

#: (sample name, labels text) -> value
Samples = dict[tuple[str, str], float]


class _Families:
    """What the exposition texts declare: each family's HELP and TYPE lines, in order of first sight."""

    def __init__(self) -> None:
        self.types: dict[str, str] = {}
        self.headers: dict[str, list[str]] = {}
        #: sample keys by family, in order of first sight
        self.samples: dict[str, list[tuple[str, str]]] = {}

    def family_of(self, name: str) -> str:
        if name in self.types:
            return name
        base, _, suffix = name.rpartition("_")
        if suffix in ("bucket", "sum", "count") and self.types.get(base) in ("histogram", "summary"):
            return base
        return name

    def read(self, text: str) -> Samples:
        samples: Samples = {}
        for line in text.split("\n"):  # not splitlines(): a label value may hold U+2028
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    self.headers.setdefault(family, [])
                    if not any(h.split(" ", 3)[1] == parts[1] for h in self.headers[family]):
                        self.headers[family].append(line)
                    if parts[1] == "TYPE" and len(parts) == 4:
                        self.types[family] = parts[3]
                continue
            series, _, value = line.rpartition(" ")
            name, brace, labels = series.partition("{")
            key = (name, brace + labels)
            try:
                samples[key] = float(value)
            except ValueError:
                continue
            keys = self.samples.setdefault(self.family_of(name), [])
            if key not in keys:
                keys.append(key)
        return samples

    def kind(self, name: str) -> str:
        return self.types.get(self.family_of(name), "untyped")


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(value)


def merge(live: list[str], retired: list[str]) -> str:
    """One exposition text of the workers' texts: ``live`` (running workers) and ``retired``
    (dead workers' counters)."""
    families = _Families()
    live_samples = [families.read(t) for t in live]
    retired_samples = [families.read(t) for t in retired]
    out: list[str] = []
    for family, keys in families.samples.items():
        out += families.headers.get(family, [])
        kind = families.types.get(family, "untyped")
        for key in keys:
            name, labels = key
            values = [s[key] for s in live_samples if key in s]
            if kind in _SUMMED:
                values += [s[key] for s in retired_samples if key in s]
            if not values:
                continue
            if family in SAME_IN_EVERY_WORKER:
                value = max(values)
            elif family in LEAST_OF_EVERY_WORKER:
                value = min(values)
            else:
                value = sum(values)
            out.append(f"{name}{labels} {_number(value)}")
    out += [
        "# HELP inferbox_workers Worker processes whose series this answer adds up.",
        "# TYPE inferbox_workers gauge",
        f"inferbox_workers {len(live)}",
    ]
    return "\n".join(out) + "\n"


def _counters_only(text: str) -> str:
    """The summed series of ``text`` (what a dead worker leaves behind), with their headers."""
    families = _Families()
    samples = families.read(text)
    out: list[str] = []
    for family, keys in families.samples.items():
        if families.types.get(family) not in _SUMMED:
            continue
        out += families.headers.get(family, [])
        out += [f"{name}{labels} {_number(samples[(name, labels)])}" for name, labels in keys]
    return "\n".join(out) + "\n"


class MetricsShare:
    """This worker's part of the shared metrics folder (see the module)."""

    def __init__(self, folder: Path, pid: int | None = None) -> None:
        self.folder = folder
        self.pid = os.getpid() if pid is None else pid
        self.path = folder / f"{self.pid}-{secrets.token_hex(4)}.prom"
        self._failing = False

    def write(self, text: str) -> None:
        """Publish this worker's series (atomically: a reader sees the old text or the new one); the
        folder is made again if it went (a tmp cleaner)."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.folder / f".{self.path.stem}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with (self.folder / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def collect(self, own: str) -> str:
        """:meth:`gather`, or this worker's own series when the folder cannot be read or written
        (said once, until it works again): a scrape never fails for it."""
        try:
            text = self.gather(own)
        except OSError as exc:
            if not self._failing:
                logger.warning(
                    "metrics: cannot read the workers' folder %s (%s); /metrics answers this worker's series only "
                    "until it can",
                    self.folder,
                    exc,
                )
            self._failing = True
            return merge([own], [])
        if self._failing:
            logger.info("metrics: the workers' folder %s works again", self.folder)
        self._failing = False
        return text

    def gather(self, own: str) -> str:
        """``own`` (this worker's series, now) merged with the other workers'; a dead worker's file is
        folded into the retired counters on the way.  Its own file is left as the publisher wrote it:
        ``own`` counts this scrape as a request in flight, which the next scrape, answered by another
        worker, would count again."""
        live = [own]
        with self._locked():
            retired_path = self.folder / RETIRED
            retired = [retired_path.read_text(encoding="utf-8")] if retired_path.exists() else []
            for path in sorted(self.folder.glob("*.prom")):
                if path.name == RETIRED or path == self.path:
                    continue
                try:
                    text = path.read_text(encoding="utf-8")
                except FileNotFoundError:  # folded by another worker a moment ago
                    continue
                if _alive(path.stem.partition("-")[0]):
                    live.append(text)
                    continue
                retired.append(text)
                folded = _counters_only(merge([], retired))
                tmp = self.folder / ".retired.tmp"
                tmp.write_text(folded, encoding="utf-8")
                os.replace(tmp, retired_path)
                path.unlink(missing_ok=True)
                retired = [folded]
                logger.info("metrics: worker %s is gone; its counters are kept", path.stem.partition("-")[0])
        return merge(live, retired)


def _alive(pid_text: str) -> bool:
    """Whether process ``pid_text`` runs and is a worker of ours: a child of this worker's parent (the
    supervisor), so that an unrelated process given a dead worker's pid does not keep its file live.
    A file not named by a pid counts as live (never folded)."""
    if not pid_text.isdigit():
        return True
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process has that pid now: not one of our workers
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:  # no /proc (or it ended meanwhile): the signal check above decides
        return True
    fields = stat.rpartition(")")[2].split()  # after "pid (name)": state, ppid, ...
    return len(fields) < 2 or int(fields[1]) == os.getppid()

"""What the batch tests share: a fake clock, an in-memory audit appender, and a ``Box`` (a spool,
an outbox and a state database under one folder, worked by one ``BatchWorker``)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from api.protocols import AuditEvent, Digest
from appliance.batch import fake
from appliance.batch.jobs import JobStore
from appliance.batch.spool import submit
from appliance.batch.worker import BatchWorker, WorkerConfig
from appliance.batch.writers import read_results


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


class Audit:
    """An in-memory audit appender (what the worker needs of ``AuditLog``)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []

    def digest(self, data: bytes) -> Digest:
        return Digest(key_id="k", hexdigest=data.hex())

    def append(self, event: AuditEvent) -> int:
        self.events.append(event)
        return len(self.events)


class Box:
    """A spool, an outbox and a state database under ``root``, worked by one BatchWorker."""

    def __init__(
        self,
        root: Path,
        loader: Callable[[str, int | None], Any] = fake.loader,
        *,
        chunk_size: int = 100,
        batch_size: int = 4,
        audit: Audit | None = None,
        worker_id: str = "otherhost:1",
        max_attempts: int = 3,
        latest: Callable[[str], tuple[int, str]] | None = None,
    ) -> None:
        self.root = root
        self.clock = Clock()
        self.store = JobStore(root / "state.db", clock=self.clock)
        self.events: list[str] = []
        self.worker = BatchWorker(
            spool=root / "spool",
            outbox=root / "outbox",
            store=self.store,
            loader=loader,
            audit=audit,
            config=WorkerConfig(chunk_size=chunk_size, batch_size=batch_size, lease_s=60, max_attempts=max_attempts),
            worker_id=worker_id,
            clock=self.clock,
            sleep=self.clock.sleep,
            progress=self.events.append,
            **({"latest": latest} if latest is not None else {}),
        )

    def submit(self, source: Path | Sequence[str], model: str = "fake-embed", name: str = "in.jsonl", **kw: Any) -> str:
        """Submit the file ``source``, or these JSONL lines written to ``<root>/<name>`` first."""
        if not isinstance(source, Path):
            path = self.root / name
            path.write_text("".join(line + "\n" for line in source), encoding="utf-8")
            source = path
        return submit(self.root / "spool", source, model=model, **kw)

    def out(self, job_id: str) -> Path:
        return self.root / "outbox" / job_id

    def rows(self, job_id: str) -> list[dict[str, Any]]:
        return [r for p in sorted(self.out(job_id).glob("part-*")) for r in read_results(p)]

    def rejects(self, job_id: str) -> list[dict[str, Any]]:
        lines = (self.out(job_id) / "rejects.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]

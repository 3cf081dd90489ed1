"""kill -9 of the batch worker at random moments: every record exactly once, no partial file.

The child worker reports each durable step on stdout; the parent picks (with a
seeded RNG) the n-th report after which it sends SIGKILL, then restarts the
worker.  The fake model sleeps a little per call so kills land mid-chunk and
mid-write as well as between steps.
"""

from __future__ import annotations

import collections
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.audit import verify_db
from appliance.audit.store import iter_records
from appliance.batch.jobs import JobStore
from appliance.batch.spool import submit
from appliance.batch.writers import read_results
from runtime.signing import generate_private_key, write_private_key

CHILD = r"""
import functools, sys
from pathlib import Path
from appliance.audit import AuditLog
from appliance.batch import fake
from appliance.batch.jobs import JobStore
from appliance.batch.worker import BatchWorker, WorkerConfig
from runtime.signing import load_private_key

root = Path(sys.argv[1])
audit = AuditLog(root / "audit.db", signing_key=load_private_key(root / "signing.key"), digest_keys_dir=root / "digest")
worker = BatchWorker(
    spool=root / "spool",
    outbox=root / "outbox",
    store=JobStore(root / "state.db"),
    loader=functools.partial(fake.loader, delay_s=0.003),
    audit=audit,
    actor="inferbox-batch.service",
    # a chunk whose worker dies max_attempts times fails its job (a poison record); these kills are
    # not the chunk's fault and may hit one chunk many times
    config=WorkerConfig(chunk_size=6, batch_size=2, lease_s=3600, max_attempts=1000),
    progress=lambda event: print(event, flush=True),
)
worker.run_once()
audit.close()
print("clean-exit", flush=True)
"""


def _jsonl_input(path: Path, n: int) -> dict[object, int]:
    """n records, some bad; returns expected id -> count (1 each)."""
    lines, ids = [], []
    for i in range(n):
        if i % 11 == 5:
            lines.append("")  # empty line: rejected, id = index
            ids.append(i)
        elif i % 13 == 7:
            lines.append(json.dumps({"id": f"j{i}", "text": i}))  # wrong type
            ids.append(f"j{i}")
        else:
            lines.append(json.dumps({"id": f"j{i}", "text": f"record number {i}"}))
            ids.append(f"j{i}")
    path.write_text("\n".join(lines) + "\n")
    return collections.Counter(ids)


def _csv_input(path: Path, n: int) -> dict[object, int]:
    rows, ids = ["id,text"], []
    for i in range(n):
        if i % 9 == 4:
            rows.append(f"c{i},extra,field")  # wrong field count: unparsed, so its id is its index
            ids.append(i)
        else:
            rows.append(f'c{i},"text\nwith newline {i}"')
            ids.append(f"c{i}")
    path.write_text("\n".join(rows) + "\n")
    return collections.Counter(ids)


def _outputs(outbox: Path, job_id: str) -> collections.Counter[object]:
    seen: collections.Counter[object] = collections.Counter()
    for part in sorted((outbox / job_id).glob("part-*")):
        for row in read_results(part):
            seen[row["id"]] += 1
    for line in (outbox / job_id / "rejects.jsonl").read_text().splitlines():
        seen[json.loads(line)["id"]] += 1
    return seen


@pytest.mark.parametrize("seed", [7, 1234])
def test_kill_9_at_random_moments_keeps_exactly_once(tmp_path: Path, seed: int) -> None:
    key = generate_private_key()
    write_private_key(key, tmp_path / "signing.key")
    expected = {}
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    want_a, want_b = _jsonl_input(a, 60), _csv_input(b, 30)
    expected[submit(tmp_path / "spool", a, model="fake-embed")] = want_a
    expected[submit(tmp_path / "spool", b, model="fake-classify")] = want_b

    rng = random.Random(seed)
    kills, target, runs = 0, 12, 0
    while True:
        runs += 1
        assert runs < 200, "the worker makes no progress between kills"
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        kill_at = rng.randint(1, 9) if kills < target else None
        killed = False
        for seen, _line in enumerate(proc.stdout, start=1):
            if kill_at is not None and seen >= kill_at:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        proc.wait(timeout=60)
        stderr = proc.stderr.read() if proc.stderr else ""
        if killed:
            assert proc.returncode == -signal.SIGKILL
            kills += 1
            continue
        assert proc.returncode == 0, stderr
        break
    assert kills >= target

    store = JobStore(tmp_path / "state.db")
    try:
        assert store.integrity_check() == "ok"
        jobs = {job_id: store.require_job(job_id) for job_id in expected}
    finally:
        store.close()
    for job_id, want in expected.items():
        job = jobs[job_id]
        assert job.state == "done", job
        assert _outputs(tmp_path / "outbox", job_id) == want  # every record exactly once
        assert job.ok + job.rejected == job.records == sum(want.values())
    leftovers = [p.name for p in (tmp_path / "outbox").rglob("*") if p.name.startswith(".tmp-") or "rejects-" in p.name]
    assert leftovers == []
    report = verify_db(tmp_path / "audit.db", key.public_key())
    assert report.ok, report.summary()
    import sqlite3

    conn = sqlite3.connect(tmp_path / "audit.db")
    events = [r for r in iter_records(conn, report.log_id) if r.job_id]
    conn.close()
    for job_id in expected:
        ends = [e for e in events if e.job_id == job_id and e.event == "batch_end"]
        assert ends and all(e.outcome == "success" for e in ends)
        job = jobs[job_id]
        # batch_end is at-least-once (a kill between the append and the state update repeats it): all agree
        assert {(e.details["ok"], e.details["rejected"], e.details["merkle_root"]) for e in ends} == {
            (str(job.ok), str(job.rejected), job.merkle_root)
        }
        assert any(e.event == "batch_start" for e in events if e.job_id == job_id)

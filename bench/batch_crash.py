"""Batch crash endurance: ``kill -9`` the worker many times, then check exactly once.

The suite kills the worker 24 times (``tests/appliance/test_batch_crash.py``);
this runs the same loop longer: ``--kills`` SIGKILLs at moments chosen by a
seeded RNG from the worker's own progress reports, a restart after each, then
checks that every input record is in the outputs or the rejects exactly once,
that no temp file is left, that ``PRAGMA integrity_check`` is ok and that the
audit chain verifies.  Uses the deterministic fake model (the machinery is
under test, not the model).

``python -m bench.batch_crash [--kills 200] [--records 3000] [--seed 1] [--out DIR]``
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import write_json

__all__ = ["main", "run"]

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
BatchWorker(
    spool=root / "spool", outbox=root / "outbox", store=JobStore(root / "state.db"),
    loader=functools.partial(fake.loader, delay_s=0.002), audit=audit,
    # a chunk whose worker dies max_attempts times fails its job (a poison record); these random
    # kills are not the chunk's fault, so they must not use up its attempts
    config=WorkerConfig(chunk_size=8, batch_size=4, lease_s=3600, max_attempts=1_000_000),
    progress=lambda event: print(event, flush=True),
).run_once()
audit.close()
"""


def run(kills: int, records: int, seed: int, root: Path) -> dict[str, Any]:
    from appliance.audit import verify_db
    from appliance.batch.jobs import JobStore
    from appliance.batch.spool import submit
    from appliance.batch.writers import read_results
    from runtime.signing import generate_private_key, write_private_key

    key = generate_private_key()
    write_private_key(key, root / "signing.key")
    src = root / "in.jsonl"
    lines = [json.dumps({"id": i, "text": f"record {i}"}) if i % 17 else "" for i in range(records)]
    src.write_text("\n".join(lines) + "\n")
    job_id = submit(root / "spool", src, model="fake-embed")
    rng = random.Random(seed)
    done_kills, runs, t0 = 0, 0, time.perf_counter()
    while True:
        runs += 1
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        kill_at = rng.randint(1, 12) if done_kills < kills else None
        killed = False
        for seen, _line in enumerate(proc.stdout, start=1):
            if kill_at is not None and seen >= kill_at:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
        proc.wait()
        if killed:
            done_kills += 1
            continue
        if proc.returncode != 0:
            raise RuntimeError(f"worker exited {proc.returncode}")
        break
    seconds = time.perf_counter() - t0
    store = JobStore(root / "state.db")
    job = store.require_job(job_id)
    integrity = store.integrity_check()
    store.close()
    seen_ids: collections.Counter[object] = collections.Counter()
    out = root / "outbox" / job_id
    for part in sorted(out.glob("part-*")):
        seen_ids.update(r["id"] for r in read_results(part))
    seen_ids.update(json.loads(line)["id"] for line in (out / "rejects.jsonl").read_text().splitlines())
    exactly_once = seen_ids == collections.Counter(range(records))
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".tmp-") or p.name.startswith("rejects-")]
    audit_ok = verify_db(root / "audit.db", key.public_key()).ok
    return {
        "kills": done_kills,
        "runs": runs,
        "records": records,
        "seconds": round(seconds, 2),
        "state": job.state,
        "exactly_once": exactly_once,
        "leftover_files": leftovers,
        "integrity_check": integrity,
        "audit_verifies": audit_ok,
        "ok": job.state == "done" and exactly_once and not leftovers and integrity == "ok" and audit_ok,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=200)
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="inferbox-crash-") as tmp:
        result = run(args.kills, args.records, args.seed, Path(tmp))
    print(json.dumps(result, indent=2))
    write_json(args.out / "batch_crash.json", result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Every documented ``GET /v1/audit`` filter reaches the log's query under the log's own name
(a filter dropped on the way would answer the whole log)."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import TestClient

from .conftest import audit_api_app


def test_each_filter_is_passed_to_the_query(tmp_path: Path) -> None:
    app, reader = audit_api_app(tmp_path)
    params = {
        "event": "inference",
        "actor": "k1",
        "model": "minilm",
        "outcome": "failure",
        "request_id": "r1",
        "job_id": "j1",
        "key_id": "0123456789ab",
        "status": "429",
        "model_sha256": "ab" * 32,
        "model_version": "2",
        "input_digest": "CD" * 32,
    }
    with TestClient(app) as c:
        assert c.get("/v1/audit", params=params).status_code == 200
    call = reader.calls[-1]
    named = (
        "event",
        "actor",
        "model_name",
        "outcome",
        "request_id",
        "job_id",
        "key_id",
        "status",
        "model_sha256",
        "model_version",
        "input_digest",
    )
    assert {k: call[k] for k in named} == {
        "event": "inference",
        "actor": "k1",
        "model_name": "minilm",
        "outcome": "failure",
        "request_id": "r1",
        "job_id": "j1",
        "key_id": "0123456789ab",
        "status": 429,
        "model_sha256": "ab" * 32,
        "model_version": "2",
        "input_digest": "cd" * 32,  # stored in lower case
    }


def test_a_window_whose_until_is_not_after_its_since_is_a_400(tmp_path: Path) -> None:
    """It answered 200 with no records, read as "nothing happened then"; `audit export` refuses it."""
    app, _ = audit_api_app(tmp_path)
    with TestClient(app) as c:
        bad = c.get("/v1/audit", params={"since": "2026-12-07T18:12:00Z", "until": "2026-12-07T18:00:00Z"})
        assert bad.status_code == 400 and "until" in bad.text and "is not after since" in bad.text
        assert c.get("/v1/audit", params={"since": "2026-12-07", "until": "2026-12-08"}).status_code == 200


def test_status_out_of_range_is_a_400_and_a_hash_in_upper_case_is_matched(tmp_path: Path) -> None:
    """status=99999999999999999999 was a 500 (SQLite's integer overflow); an upper-case sha256
    matched nothing (the log stores lower case)."""
    app, reader = audit_api_app(tmp_path)
    with TestClient(app) as c:
        bad = c.get("/v1/audit", params={"status": "99999999999999999999"})
        assert bad.status_code == 400 and "status" in bad.text
        assert c.get("/v1/audit", params={"status": "0", "model_sha256": "AB" * 32}).status_code == 200
    assert reader.calls[-1]["model_sha256"] == "ab" * 32 and reader.calls[-1]["status"] == 0


def test_a_whole_key_given_as_a_filter_is_read_as_its_id_and_its_secret_never_recorded(tmp_path: Path) -> None:
    """``?key_id=ibx_<id>_<secret>`` put the secret in the audit_read record (append-only, shipped off the
    box, in every backup), and matched nothing; ``actor`` likewise."""
    from .conftest import MemoryAudit

    whole = "ibx_0123456789ab_" + "S3cr3t-" * 6 + "x"
    sink = MemoryAudit()
    app, reader = audit_api_app(tmp_path, sink)
    with TestClient(app) as c:
        assert c.get("/v1/audit", params={"key_id": f" {whole} ", "actor": whole}).status_code == 200
    assert reader.calls[-1]["key_id"] == "0123456789ab" and reader.calls[-1]["actor"] == "0123456789ab"
    read = sink.events[-1]
    assert read.event == "audit_read" and read.details["key_id"] == "0123456789ab"
    assert "S3cr3t" not in repr(read)


def test_a_long_path_or_model_name_from_a_client_is_clipped_in_its_record(tmp_path: Path) -> None:
    """An unknown 64 KB path, sent with no key, was a 64 KB record: ~40 MB/s of audit log from anyone
    who reaches the port.  A record keeps the first 512 characters and the length."""
    from .conftest import MemoryAudit

    sink = MemoryAudit()
    app, _ = audit_api_app(tmp_path, sink)
    with TestClient(app) as c:
        assert c.get("/v2/" + "A" * 65_000).status_code == 404
        assert c.get("/v2/models/" + "m" * 10_000 + "/ready").status_code in (400, 404)
    far, model = sink.events[-2:]
    assert far.action.startswith("GET /v2/AAAA") and far.action.endswith("...[65008 characters]")
    assert len(far.action) < 600
    assert all(len(getattr(model, f)) < 600 for f in ("action", "model_name")), model
    assert all(len(v) < 600 for e in (far, model) for v in e.details.values())

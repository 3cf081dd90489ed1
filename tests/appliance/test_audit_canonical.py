"""Canonical bytes are injective and round-trip; Merkle roots and proofs follow RFC 6962."""

from __future__ import annotations

import hashlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from api.protocols import AuditEvent
from appliance.audit.canonical import (
    EVENT_FIELDS,
    RECORD_FIELDS,
    AuditRecord,
    canonical_bytes,
    genesis_hash,
    leaf_hash,
    parse_canonical,
)
from appliance.audit.merkle import merkle_proof, merkle_root, verify_proof

# separators, length-like digits, quotes, NULs and non-ASCII: the characters that break naive encodings
_text = st.text(alphabet=st.sampled_from(["a", "|", ":", "=", ",", "\x00", "\n", '"', "0", "8", "é", "𝄞"]), max_size=6)

records = st.builds(
    AuditRecord,
    seq=st.integers(min_value=1, max_value=10**12),
    log_id=_text,
    prev_hash=_text,
    recorded_at=_text,
    event=_text,
    action=_text,
    actor=_text,
    credential_id=_text,
    origin=_text,
    outcome=_text,
    status=st.integers(min_value=-1, max_value=999),
    started_at=_text,
    ended_at=_text,
    request_id=_text,
    model_name=_text,
    model_version=_text,
    model_sha256=_text,
    backend=_text,
    variant=_text,
    job_id=_text,
    input_digest=_text,
    output_digest=_text,
    digest_key_id=_text,
    details=st.dictionaries(_text, _text, max_size=3),
)


def _content(r: AuditRecord) -> tuple[object, ...]:
    return (*tuple(getattr(r, f) for f in RECORD_FIELDS[:-1]), tuple(sorted(r.details.items())))


@settings(max_examples=300, deadline=None)
@given(records)
def test_canonical_bytes_round_trip(record: AuditRecord) -> None:
    back = parse_canonical(canonical_bytes(record))
    assert _content(back) == _content(record)
    assert back.leaf_hash == leaf_hash(record)


@settings(max_examples=500, deadline=None)
@given(records, records)
def test_distinct_records_never_share_canonical_bytes(a: AuditRecord, b: AuditRecord) -> None:
    if _content(a) != _content(b):
        assert canonical_bytes(a) != canonical_bytes(b)
        assert leaf_hash(a) != leaf_hash(b)
    else:
        assert canonical_bytes(a) == canonical_bytes(b)


@settings(max_examples=200, deadline=None)
@given(records, st.sampled_from([f for f in RECORD_FIELDS if f not in {"seq", "status", "details"}]), _text)
def test_moving_text_between_adjacent_fields_changes_the_bytes(record: AuditRecord, field: str, extra: str) -> None:
    changed = msgspec.structs.replace(record, **{field: getattr(record, field) + extra + "|"})
    assert canonical_bytes(changed) != canonical_bytes(record)


def test_every_event_field_and_details_order_is_covered() -> None:
    assert set(EVENT_FIELDS) | {"details"} == set(AuditEvent.__struct_fields__)
    base = AuditRecord(
        seq=1, log_id="L", prev_hash="p", recorded_at="t", event="e", action="a", actor="x", credential_id="",
        origin="o", outcome="success", status=200, started_at="s", ended_at="e", request_id="", model_name="",
        model_version="", model_sha256="", backend="", variant="", job_id="", input_digest="", output_digest="",
        digest_key_id="", details={"a": "1", "b": "2"},
    )  # fmt: skip
    assert canonical_bytes(base) == canonical_bytes(msgspec.structs.replace(base, details={"b": "2", "a": "1"}))
    for field in RECORD_FIELDS:
        value = getattr(base, field)
        other: object = (
            value + 1 if isinstance(value, int) else ({"a": "9"} if isinstance(value, dict) else value + "!")
        )
        assert leaf_hash(msgspec.structs.replace(base, **{field: other})) != leaf_hash(base), field
    assert leaf_hash(base) == hashlib.sha256(b"\x00" + canonical_bytes(base)).hexdigest()
    assert genesis_hash("L") == hashlib.sha256(b"L").hexdigest()


# -- Merkle ------------------------------------------------------------------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def test_merkle_root_matches_rfc6962_by_hand() -> None:
    assert merkle_root([]) == hashlib.sha256(b"").hexdigest()
    assert merkle_root([b"a"]) == _h(b"\x00a").hex()
    la, lb, lc = _h(b"\x00a"), _h(b"\x00b"), _h(b"\x00c")
    assert merkle_root([b"a", b"b"]) == _h(b"\x01" + la + lb).hex()
    # three leaves split 2 + 1
    assert merkle_root([b"a", b"b", b"c"]) == _h(b"\x01" + _h(b"\x01" + la + lb) + lc).hex()
    assert merkle_root(["a", "b"]) == merkle_root([b"a", b"b"])  # str leaves are their UTF-8 bytes


@pytest.mark.parametrize("size", [1, 2, 3, 4, 5, 7, 8, 9, 16, 17])
def test_every_merkle_proof_verifies_and_wrong_ones_fail(size: int) -> None:
    leaves = [f"digest-{i}" for i in range(size)]
    root = merkle_root(leaves)
    for i, leaf in enumerate(leaves):
        proof = merkle_proof(leaves, i)
        assert verify_proof(leaf, i, size, proof, root)
        assert not verify_proof("forged", i, size, proof, root)
        assert not verify_proof(leaf, i, size, proof, merkle_root([*leaves, "x"]))
        if size > 1:
            assert not verify_proof(leaf, (i + 1) % size, size, proof, root)
    with pytest.raises(IndexError):
        merkle_proof(leaves, size)


def test_the_leaf_hash_of_a_fixed_record_never_changes() -> None:
    """Logs written by earlier versions must keep verifying: the serialization is a format, not
    an implementation detail (the value was computed by the first implementation, 2026-12-04)."""
    record = AuditRecord(
        seq=7,
        log_id="L1",
        prev_hash="p" * 64,
        recorded_at="2026-12-04T18:00:00.000001Z",
        event="inference",
        action="POST /v1/embeddings",
        actor="k_1",
        credential_id="k_1",
        origin="127.0.0.1",
        outcome="success",
        status=200,
        started_at="2026-12-04T18:00:00.000000Z",
        ended_at="2026-12-04T18:00:00.000001Z",
        request_id="r1",
        model_name="minilm",
        model_version="1",
        model_sha256="s" * 64,
        backend="ov-cpu",
        variant="ov-fp32",
        job_id="",
        input_digest="i" * 64,
        output_digest="o" * 64,
        digest_key_id="20261204T180000Z",
        details={"texts": "1", "b": "é"},
    )
    data = canonical_bytes(record)
    assert data.startswith((23).to_bytes(8, "big") + b"inferbox-audit-record/1" + (1).to_bytes(8, "big") + b"7")
    assert data.endswith((1).to_bytes(8, "big") + b"1")  # the last pair, sorted: ("texts", "1")
    assert leaf_hash(record) == "54ee05b8d5e6a8c50453919155a30de9a53d65ff6d508699a9d5372ca12e721c"

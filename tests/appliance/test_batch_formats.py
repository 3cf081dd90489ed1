"""Batch jobs in JSONL, CSV and Parquet with bad records: outputs, rejects, counts, chunking."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.batch import fake
from appliance.batch.jobs import JobStore
from appliance.batch.readers import plan_chunks, read_chunk
from appliance.batch.spool import submit
from appliance.batch.worker import BatchWorker, WorkerConfig
from appliance.batch.writers import read_results


class Env:
    def __init__(self, root: Path, chunk_size: int = 3) -> None:
        self.root = root
        self.spool = root / "spool"
        self.outbox = root / "outbox"
        self.store = JobStore(root / "state.db")
        self.loads: list[tuple[str, int | None]] = []
        self.worker = BatchWorker(
            spool=self.spool,
            outbox=self.outbox,
            store=self.store,
            loader=self._load,
            config=WorkerConfig(chunk_size=chunk_size, batch_size=2),
        )

    def _load(self, name: str, version: int | None) -> fake.FakeModel:
        self.loads.append((name, version))
        return fake.loader(name, version)

    def run(self, path: Path, model: str, **kw: Any) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
        job_id = submit(self.spool, path, model=model, **kw)
        summary = self.worker.run_once()
        assert job_id in summary.finished
        out = self.outbox / job_id
        rows = [r for p in sorted(out.glob("part-*")) for r in read_results(p)]
        rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
        return job_id, rows, rejects


@pytest.fixture
def env(tmp_path: Path) -> Env:
    e = Env(tmp_path)
    yield e
    e.store.close()


def _embed(texts: list[str]) -> np.ndarray:
    return fake.loader("fake-embed").embed(texts)[0]


def test_jsonl_text_job_gives_embeddings_and_rejects_with_reasons(env: Env, tmp_path: Path) -> None:
    lines = [
        json.dumps({"id": "a", "text": "hello"}),
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "text": 5}),
        "",
        json.dumps({"id": "d", "text": "world"}),
        "{oops",
        "[1, 2]",
        json.dumps({"text": "no id here"}),
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    job_id, rows, rejects = env.run(src, "fake-embed")

    assert [r["id"] for r in rows] == ["a", "d", 7]
    got = np.array([r["embedding"] for r in rows], dtype=np.float32)
    np.testing.assert_array_equal(got, _embed(["hello", "world", "no id here"]))
    reasons = {r["index"]: r["reason"] for r in rejects}
    assert reasons[1] == "missing text field 'text'"
    assert reasons[2] == "text field 'text' must be a string, got int"
    assert reasons[3] == "empty line"
    assert reasons[5].startswith("not valid JSON")
    assert reasons[6] == "a record must be a JSON object, got list"
    assert [r["id"] for r in rejects] == ["b", "c", 3, 5, 6]
    assert rejects[0]["record"] == lines[1]

    job = env.store.require_job(job_id)
    assert (job.state, job.records, job.ok, job.rejected, job.chunks) == ("done", 8, 3, 5, 3)
    summary = json.loads((env.outbox / job_id / "job.json").read_text())
    assert summary["ok"] == 3 and summary["rejected"] == 5
    assert summary["submitted_file"] == str(src)  # which file this was: only the spool's copy said
    # Without an audit log there is nothing to prove a record against: no digests are kept at all
    # (a plain SHA-256 of a short record can be reversed by guessing).
    assert summary["merkle_root"] == ""
    assert all(c["digests"] == [] for c in env.store.chunk_results(job_id))
    # spool: accepted into cur/, nothing left in tmp/ or new/
    assert not list((env.spool / "new").iterdir()) and not list((env.spool / "tmp").iterdir())
    assert (env.spool / "cur" / job_id / "input.jsonl").read_bytes() == src.read_bytes()
    # finished outbox: parts, rejects.jsonl, job.json and nothing else
    names = sorted(p.name for p in (env.outbox / job_id).iterdir())
    assert names == ["job.json", "part-00000.jsonl", "part-00001.jsonl", "part-00002.jsonl", "rejects.jsonl"]
    assert env.loads == [("fake-embed", None)]  # one model load for all chunks


def test_csv_classification_job_with_quoted_newlines_and_bad_rows(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text(
        'id,text\nr1,good news\nr2,"a ""quoted""\nmultiline text"\nr3,too,many\n\nr5,bad news\n',
        encoding="utf-8",
    )
    job_id, rows, rejects = env.run(src, "fake-classify")
    assert [r["id"] for r in rows] == ["r1", "r2", "r5"]
    model = fake.loader("fake-classify")
    logits = model.embed(["good news", 'a "quoted"\nmultiline text', "bad news"])[0]
    for row, lg in zip(rows, logits, strict=True):
        e = np.exp(lg - lg.max())
        p = (e / e.sum()).astype(np.float32)
        assert row["label"] == ["negative", "positive"][int(np.argmax(p))]
        assert row["scores"] == pytest.approx({"negative": float(p[0]), "positive": float(p[1])}, rel=1e-6)
    assert [(r["index"], r["reason"]) for r in rejects] == [
        (2, "row has 3 fields, the header has 2"),
        (3, "empty line"),
    ]
    assert env.store.require_job(job_id).records == 5


def test_parquet_job_rejects_nulls_and_keeps_types(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    table = pa.table({"id": ["p0", "p1", "p2", "p3"], "text": ["alpha", None, "gamma", "delta"]})
    pq.write_table(table, src, row_group_size=2)
    job_id, rows, rejects = env.run(src, "fake-embed")
    assert [r["id"] for r in rows] == ["p0", "p2", "p3"]
    np.testing.assert_array_equal(
        np.array([r["embedding"] for r in rows], dtype=np.float32), _embed(["alpha", "gamma", "delta"])
    )
    assert [(r["id"], r["reason"]) for r in rejects] == [("p1", "text field 'text' is null")]
    part = pq.read_table(env.outbox / job_id / "part-00000.parquet")
    assert pa.types.is_list(part.schema.field("embedding").type)
    assert part.schema.field("embedding").type.value_type == pa.float32()


def test_jsonl_tensor_job_checks_shapes_and_matches_infer(env: Env, tmp_path: Path) -> None:
    recs = [
        {"id": 1, "x": [1, 2, 3, 4]},
        {"id": 2, "x": [1, 2, 3]},
        {"id": 3, "x": "abc"},
        {"id": 4},
        {"id": 5, "x": [[1, 2, 3, 4]]},
        {"id": 6, "x": [0.5, 0, 0, -1]},
    ]
    src = tmp_path / "t.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    _, rows, rejects = env.run(src, "fake-tensor")
    assert [r["id"] for r in rows] == [1, 6]
    want = fake.loader("fake-tensor").infer({"x": np.array([[1, 2, 3, 4], [0.5, 0, 0, -1]], np.float32)})["y"]
    np.testing.assert_array_equal(np.array([r["outputs"]["y"] for r in rows], np.float32), want)
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons[2] == "tensor field 'x' has shape [3], the model expects [4]"
    assert reasons[3].startswith("tensor field 'x' is not a float32 array")
    assert reasons[4] == "missing tensor field 'x'"
    assert reasons[5] == "tensor field 'x' has shape [1, 4], the model expects [4]"


def test_csv_for_a_tensor_model_fails_the_job_with_the_fix(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "t.csv"
    src.write_text("id,text\n1,a\n")
    job_id = submit(env.spool, src, model="fake-tensor")
    summary = env.worker.run_once()
    assert summary.failed == [job_id]
    job = env.store.require_job(job_id)
    assert job.state == "failed" and "submit JSONL or Parquet" in job.error


def test_unknown_model_fails_the_job(env: Env, tmp_path: Path) -> None:
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "x"}\n')
    job_id = submit(env.spool, src, model="nope")
    env.worker.run_once()
    job = env.store.require_job(job_id)
    assert job.state == "failed" and "no fake model 'nope'" in job.error


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_chunk_plan_is_deterministic_and_covers_every_record_once(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        src.write_bytes(b"".join(b'{"text": "r%d"}\n' % i for i in range(23)) + b"\n{tail}")
    else:
        src.write_bytes(b"text\n" + b"".join(b'"line\n%d"\n' % i for i in range(23)) + b"\nlast")
    plans = plan_chunks(src, fmt, 5)
    assert plans == plan_chunks(src, fmt, 5)
    assert [p.rec_count for p in plans] == [5, 5, 5, 5, 5]
    indexes = [r.index for p in plans for r in read_chunk(src, fmt, p)]
    assert indexes == list(range(25))
    records = [r for p in plans for r in read_chunk(src, fmt, p)]
    assert records[23].error == "empty line"
    if fmt == "csv":
        assert records[3].obj == {"text": "line\n3"}
        assert records[24].obj == {"text": "last"}
    else:
        assert records[3].obj == {"text": "r3"}
        assert records[24].error is not None and records[24].error.startswith("not valid JSON")


def test_tensor_job_on_a_real_onnxruntime_session_equals_loaded_model_infer(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from runtime.backends.base import OpenOptions
    from runtime.backends.ort import OrtBackend
    from runtime.serving import LoadedModel

    w = (np.arange(8, dtype=np.float32).reshape(4, 2) - 3.0) / 7.0
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 2], w.flatten().tolist())],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx_model.ir_version = 8
    onnx.save(onnx_model, tmp_path / "m.onnx")
    session = OrtBackend("ort-cpu").open(tmp_path / "m.onnx", OpenOptions(intra_op_threads=1))
    model = LoadedModel(
        name="mm",
        version=1,
        manifest=fake.loader("fake-tensor").manifest,
        package_sha256="a" * 64,
        backend="ort-cpu",
        variant="onnx-fp32",
        exec_precision="fp32",
        session=session,
    )
    src = tmp_path / "t.jsonl"
    xs = [[float(i), 1.0, -2.0, 0.5 * i] for i in range(9)]
    src.write_text("".join(json.dumps({"id": i, "x": x}) + "\n" for i, x in enumerate(xs)) + '{"id": 99, "x": [1]}\n')
    store = JobStore(tmp_path / "state.db")
    worker = BatchWorker(
        spool=tmp_path / "spool",
        outbox=tmp_path / "outbox",
        store=store,
        loader=lambda n, v: model,
        config=WorkerConfig(chunk_size=4, batch_size=3),
    )
    job_id = submit(tmp_path / "spool", src, model="mm")
    worker.run_once()
    rows = [r for p in sorted((tmp_path / "outbox" / job_id).glob("part-*")) for r in read_results(p)]
    want = model.infer({"x": np.array(xs, np.float32)})["y"]
    np.testing.assert_array_equal(np.array([r["outputs"]["y"] for r in rows], np.float32), want)
    assert store.require_job(job_id).rejected == 1
    store.close()


_cell = st.text(alphabet=st.sampled_from(list('ab ,"\n\r\té')), max_size=8)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.tuples(_cell, _cell), max_size=25), chunk=st.integers(1, 7))
def test_csv_chunking_round_trips_any_quoting(tmp_path: Path, rows: list[tuple[str, str]], chunk: int) -> None:
    import csv
    import io

    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\r\n")  # RFC 4180: cells with \r or \n are quoted
    writer.writerow(["id", "text"])
    writer.writerows(rows)
    src = tmp_path / "h.csv"
    src.write_bytes(buf.getvalue().encode("utf-8"))
    plans = plan_chunks(src, "csv", chunk)
    records = [r for p in plans for r in read_chunk(src, "csv", p)]
    expected = [{"id": row[0], "text": row[1]} for row in rows]
    got = [r.obj if r.error is None else r.error for r in records]
    assert [r.index for r in records] == list(range(len(rows)))
    assert got == expected
    assert all(p.rec_count <= chunk for p in plans)


def test_with_an_audit_log_only_keyed_digests_are_kept_and_the_root_proves_a_record(tmp_path: Path) -> None:
    import hashlib
    import hmac

    from appliance.audit.log import AuditLog
    from appliance.audit.merkle import merkle_proof, merkle_root, verify_proof
    from runtime.signing import generate_private_key

    audit = AuditLog(tmp_path / "audit.db", signing_key=generate_private_key(), digest_keys_dir=tmp_path / "digest")
    e = Env(tmp_path / "box")
    e.worker.audit = audit
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(["yes", "no", "?", "a longer record"])]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    _job, rows, _ = e.run(src, "fake-embed")
    assert len(rows) == 4
    state = (tmp_path / "box" / "state.db").read_bytes() + b"".join(
        p.read_bytes() for p in (tmp_path / "box").glob("state.db-wal")
    )
    plain = [hashlib.sha256(line.encode()).hexdigest() for line in lines]
    assert not any(p.encode() in state for p in plain), "a guessable plain SHA-256 reached the state database"
    end = next(r for r in audit.query(limit=100) if r.event == "batch_end")
    key = (tmp_path / "digest" / f"{end.digest_key_id}.key").read_bytes()
    leaves = [hmac.new(key, bytes.fromhex(p), hashlib.sha256).digest() for p in plain]
    assert end.details["merkle_root"] == merkle_root(leaves)
    # An auditor holding record 2 and the digest key proves it was processed in this job.
    assert verify_proof(leaves[2], 2, 4, merkle_proof(leaves, 2), end.details["merkle_root"])
    e.store.close()
    audit.close()


def test_a_one_logit_classifier_gets_its_sigmoid_not_a_softmax_of_one(tmp_path: Path) -> None:
    """softmax over a single logit is 1.0 for every record: a binary head or a cross-encoder run as
    a batch job answered {"LABEL_0": 1.0} whatever the text."""
    import io
    from types import SimpleNamespace

    from appliance.batch.unit import _text_rows
    from appliance.batch.writers import encode_results

    logits = np.array([[2.0], [-1.0], [0.0]], dtype=np.float32)
    with np.errstate(over="raise"):  # no overflow on extreme logits either
        extreme = _text_rows(
            SimpleNamespace(  # type: ignore[arg-type]
                manifest=SimpleNamespace(task="text-classification", labels=["x"]),
                embed_tokens=lambda tokens: np.array([[-1000.0], [1000.0]], dtype=np.float32),
            ),
            [object()] * 2,
        )
    assert [r["scores"]["x"] for r in extreme] == [0.0, 1.0]
    model = SimpleNamespace(
        manifest=SimpleNamespace(task="text-classification", labels=["relevant"]),
        embed_tokens=lambda tokens: logits,
    )
    rows = _text_rows(model, [object()] * 3)  # type: ignore[arg-type]
    assert [r["label"] for r in rows] == ["relevant", None, None]
    np.testing.assert_allclose([r["scores"]["relevant"] for r in rows], 1 / (1 + np.exp([-2.0, 1.0, 0.0])), atol=1e-6)
    buf = io.BytesIO()
    encode_results([{"id": i, **r} for i, r in enumerate(rows)], "parquet")(buf)
    table = pq.read_table(io.BytesIO(buf.getvalue()))
    assert table.column("label").to_pylist() == ["relevant", None, None]

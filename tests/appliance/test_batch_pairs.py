"""Batch jobs of (text, pair) records: a text classifier (a cross-encoder, NLI) scores each pair."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.batch import fake
from appliance.batch.jobs import JobStore
from appliance.batch.readers import RecordError, parse_record
from appliance.batch.spool import submit
from runtime.errors import BatchError
from runtime.scores import softmax
from tests.appliance.batch_box import Audit, Box


def test_a_pair_record_is_its_two_texts_and_each_is_checked() -> None:
    assert parse_record({"q": "a", "d": "b"}, text_field="q", inputs=[], pair_field="d") == ("a", "b")
    assert parse_record({"q": "a", "d": "b"}, text_field="q", inputs=[]) == "a"
    for obj, reason in (
        ({"q": "a"}, "missing pair field 'd'"),
        ({"q": "a", "d": None}, "pair field 'd' is null"),
        ({"q": "a", "d": 3}, "pair field 'd' must be a string, got int"),
        ({"q": "a", "d": "\ud800"}, "pair field 'd' is not valid Unicode text"),
        ({"d": "b"}, "missing text field 'q'"),
    ):
        with pytest.raises(RecordError, match=reason):
            parse_record(obj, text_field="q", inputs=[], pair_field="d")


def test_submit_names_a_pair_field_that_cannot_work(tmp_path: Path) -> None:
    src = tmp_path / "in.csv"
    src.write_text("query,doc\nq,d\n")
    with pytest.raises(BatchError, match="also the --text-field"):
        submit(tmp_path / "spool", src, model="m", text_field="query", pair_field="query")
    with pytest.raises(BatchError, match=r"no column 'document'.*--pair-field"):
        submit(tmp_path / "spool", src, model="m", text_field="query", pair_field="document")
    assert submit(tmp_path / "spool", src, model="m", text_field="query", pair_field="doc")


def test_a_pair_job_scores_each_pair_and_rejects_a_record_without_one(tmp_path: Path) -> None:
    seen: list[str] = []

    class Recording(fake.FakeModel):
        def tokenize_pairs(self, query: str, documents: Any, *, truncate: bool = True) -> Any:
            seen.append(query)
            return super().tokenize_pairs(query, documents, truncate=truncate)

    model = Recording(name="fake-classify", task="text-classification")
    audit = Audit()
    box = Box(tmp_path, loader=lambda n, v: model, audit=audit, batch_size=8)
    lines = [
        json.dumps({"id": "a", "query": "refund", "document": "the card refund"}),
        json.dumps({"id": "b", "query": "refund", "document": "good night"}),
        json.dumps({"id": "c", "query": "open", "document": "open an account"}),
        json.dumps({"id": "d", "query": "open"}),
    ]
    job_id = box.submit(lines, model="fake-classify", text_field="query", pair_field="document")
    box.worker.run_once()
    job = box.store.job(job_id)
    assert job is not None and job.state == "done" and job.pair_field == "document"
    rows = box.rows(job_id)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    # each row is the classifier's answer for the pair, not for the first text alone
    pair_model = fake.FakeModel(name="fake-classify", task="text-classification")
    for row, (query, doc) in zip(
        rows, [("refund", "the card refund"), ("refund", "good night"), ("open", "open an account")], strict=True
    ):
        alone = fake.FakeModel(name="fake-classify", task="text-classification")
        want = alone.embed_tokens(alone.tokenize_pairs(query, [doc]))[0]
        assert row["scores"] and set(row) == {"id", "label", "scores"}
        got = [row["scores"][label] for label in pair_model.manifest.labels or []]
        np.testing.assert_allclose(got, softmax(want[None, :])[0], rtol=1e-6)
    assert sorted(seen) == ["open", "refund"]  # a run of records with one query tokenizes it once
    assert [r["reason"] for r in box.rejects(job_id)] == ["missing pair field 'document'"]
    start = next(e for e in audit.events if e.event == "batch_start")
    assert start.details["pair_field"] == "document"


def test_a_pair_job_on_an_embedding_model_fails_naming_why(tmp_path: Path) -> None:
    box = Box(tmp_path)
    job_id = box.submit([json.dumps({"text": "a", "b": "c"})], model="fake-embed", pair_field="b")
    box.worker.run_once()
    job = box.store.job(job_id)
    assert job is not None and job.state == "failed"
    assert "needs a text classifier" in job.error and "without --pair-field" in job.error


def test_a_job_table_from_before_pairs_gets_the_column(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    JobStore(db).close()
    conn = sqlite3.connect(db)
    conn.execute("ALTER TABLE batch_jobs DROP COLUMN pair_field")
    conn.close()
    store = JobStore(db)
    columns = {row[1] for row in store._conn.execute("PRAGMA table_info(batch_jobs)")}
    assert "pair_field" in columns
    store.close()


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_cross_encoders_pair_job_answers_relevance_scores_in_every_format(tmp_path: Path, fmt: str) -> None:
    """One logit per pair (a cross-encoder): ``relevance_score``, the sigmoid, as /v1/rerank answers."""

    class CrossEncoder(fake.FakeModel):
        def embed_tokens(self, tokens: Any) -> Any:
            return np.array([[float(len(t)) - 4.0] for t in tokens], dtype=np.float32)

    model = CrossEncoder(name="fake-classify", task="text-classification")
    box = Box(tmp_path, loader=lambda n, v: model)
    pairs = [("refund", "the card refund now"), ("open", "no")]
    if fmt == "jsonl":
        src = tmp_path / "in.jsonl"
        src.write_text("".join(json.dumps({"q": q, "d": d}) + "\n" for q, d in pairs))
    elif fmt == "csv":
        src = tmp_path / "in.csv"
        src.write_text("q,d\n" + "".join(f"{q},{d}\n" for q, d in pairs))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "in.parquet"
        pq.write_table(pa.table({"q": [q for q, _ in pairs], "d": [d for _, d in pairs]}), src)
    job_id = submit(tmp_path / "spool", src, model="fake-classify", text_field="q", pair_field="d")
    box.worker.run_once()
    rows = box.rows(job_id)
    # the fake's tokens: the query, [SEP] and the document, one per word
    want = [1 / (1 + np.exp(-(len(f"{q} [SEP] {d}".split()) - 4.0))) for q, d in pairs]
    assert [r["id"] for r in rows] in ([0, 1], ["0", "1"])
    np.testing.assert_allclose([float(r["relevance_score"]) for r in rows], want, rtol=1e-6)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        part = next(box.out(job_id).glob("part-*"))
        assert str(pq.read_schema(part).field("relevance_score").type) == "double"


def test_a_bad_pair_in_a_run_of_one_query_is_rejected_alone_with_the_fields_named(tmp_path: Path) -> None:
    """One query's documents tokenize together; the one over the maximum (truncate off) is
    rejected alone, its reason in the job's terms; a pair the model scores NaN is rejected too."""
    from runtime.errors import InputError

    class Picky(fake.FakeModel):
        def tokenize_pairs(self, query: str, documents: Any, *, truncate: bool = True) -> Any:
            for i, d in enumerate(documents):
                if "LONG" in d:
                    raise InputError(
                        f"documents[{i}] with the query has 99 tokens, over the model's maximum 32; "
                        "shorten the query or the document, or enable truncation",
                        field=f"documents[{i}]",
                    )
            return super().tokenize_pairs(query, documents, truncate=truncate)

        def embed_tokens(self, tokens: Any) -> Any:
            return np.array([[np.nan if "NAN" in t.text else 1.0] for t in tokens], dtype=np.float32)

    model = Picky(name="fake-classify", task="text-classification")
    box = Box(tmp_path, loader=lambda n, v: model, batch_size=8)
    docs = ["a", "b LONG", "c", "d NAN", "e"]
    lines = [json.dumps({"id": i, "q": "refund", "d": d}) for i, d in enumerate(docs)]
    job_id = box.submit(lines, model="fake-classify", text_field="q", pair_field="d")
    box.worker.run_once()
    assert [r["id"] for r in box.rows(job_id)] == [0, 2, 4]
    reasons = {r["id"]: r["reason"] for r in box.rejects(job_id)}
    assert set(reasons) == {1, 3}
    assert "the pair of 'q' and 'd' has 99 tokens" in reasons[1] and "shorten 'q' and 'd'" in reasons[1]
    assert "set truncate = true" in reasons[1] and "documents[" not in reasons[1]
    assert "not a number" in reasons[3]
    summary = json.loads((box.out(job_id) / "job.json").read_text())
    assert (summary["text_field"], summary["pair_field"]) == ("q", "d")


def test_submit_checks_a_parquet_files_pair_columns(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"query": ["q"], "doc": ["d"]}), src)
    with pytest.raises(BatchError, match=r"no column 'document'.*--pair-field"):
        submit(tmp_path / "spool", src, model="m", text_field="query", pair_field="document")
    with pytest.raises(BatchError, match=r"no column 'text'.*--text-field"):
        submit(tmp_path / "spool", src, model="m", pair_field="doc")
    assert submit(tmp_path / "spool", src, model="m", text_field="query", pair_field="doc")

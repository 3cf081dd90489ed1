"""Regression tests for the second batch review (/tmp/review2): a model that breaks partway
through a chunk fails the chunk instead of rejecting the records after the break; a poison record
alone in a chunk is rejected when the model demonstrably still works; "latest" is read from the
repository without a model load per job; the CSV record scanner is linear; a NUL byte alone does
not make a UTF-8 file "UTF-16".

Real SQLite, real files, the fake model; time is a test clock (the retry backoff sleeps on it).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from appliance.batch import fake, readers
from appliance.batch.readers import plan_chunks, read_chunk
from appliance.batch.spool import check_encoding, submit
from appliance.batch.unit import ChunkTask, run_chunk
from runtime.errors import BatchError, ModelNotFoundError

from . import batch_box


class Box(batch_box.Box):
    """This file's boxes run batches of 8 records unless told otherwise."""

    def __init__(self, root: Path, loader: Callable[[str, int | None], Any], *, batch_size: int = 8, **kw: Any) -> None:
        super().__init__(root, loader, batch_size=batch_size, **kw)


POISON = "POISON, a text the model raises on (longer than the others: its batch is the last)"


def _texts(n: int, poison: Sequence[int] = ()) -> list[str]:
    return [json.dumps({"id": i, "text": POISON if i in poison else f"text number {i}"}) for i in range(n)]


class Breaks(fake.FakeModel):
    """Works for ``good_calls`` calls of the model, then raises on every call (a lost device, a
    corrupted arena), until loaded again.  ``POISON`` texts always raise."""

    def __init__(self, good_calls: int = 1, streams: int = 1) -> None:
        super().__init__()
        self.good_calls = good_calls
        self.streams = streams
        self.failed = 0

    def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
        if self.calls >= self.good_calls or any(t.text == POISON for t in tokens):
            self.calls += 1
            self.failed += 1
            raise RuntimeError("session broken")
        return super().embed_tokens(tokens)


class Poisoned(fake.FakeModel):
    """Raises on every batch holding a ``POISON`` text; works on every other."""

    def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
        if any(t.text == POISON for t in tokens):
            self.calls += 1
            raise RuntimeError("model cannot take this record")
        return super().embed_tokens(tokens)


# -- 1. a model that breaks partway fails the chunk; no valid record is rejected ------------------


@pytest.mark.parametrize("streams", [1, 2])
def test_a_model_that_breaks_after_its_first_batch_fails_the_chunk_and_rejects_nothing(
    tmp_path: Path, streams: int
) -> None:
    loads: list[Breaks] = []

    def load(name: str, version: int | None) -> Breaks:
        loads.append(Breaks(good_calls=1, streams=streams))
        return loads[-1]

    box = Box(tmp_path, load)
    job_id = box.submit(_texts(100))
    summary = box.worker.run_once()
    # old code: done, 8 ok, 92 rejected ("the model failed on this record")
    assert summary.failed == [job_id] and summary.finished == []
    job = box.store.require_job(job_id)
    assert (job.state, job.ok, job.rejected) == ("failed", 0, 0)
    assert "chunk 0 failed 3 times: RuntimeError: session broken" in job.error
    assert not list(box.out(job_id).glob("part-*")) and not list(box.out(job_id).glob("rejects*"))
    assert len(loads) == 3  # each attempt loads the model again: a broken session is not reused
    if streams == 1:  # the first batch, the second, then the model on a record it took before: no split
        assert [m.calls for m in loads] == [3, 3, 3]
    assert box.clock.slept == [5.0, 20.0]


def test_a_job_failed_by_a_broken_model_finishes_after_batch_retry_without_rejects(tmp_path: Path) -> None:
    broken = True

    def load(name: str, version: int | None) -> fake.FakeModel:
        return Breaks(good_calls=1) if broken else fake.FakeModel()

    box = Box(tmp_path, load)
    job_id = box.submit(_texts(100))
    assert box.worker.run_once().failed == [job_id]
    broken = False
    assert box.store.retry_job(job_id) == 1
    assert box.worker.run_once().finished == [job_id]
    job = box.store.require_job(job_id)
    assert (job.state, job.ok, job.rejected) == ("done", 100, 0)
    assert box.rejects(job_id) == []


def test_a_model_that_breaks_right_after_a_poison_record_rejects_nothing(tmp_path: Path) -> None:
    """The poison record fails twice alone, and then the model breaks: nothing shows the model
    works around that record, so it is not rejected and the chunk fails."""

    class BreaksAfterPoison(fake.FakeModel):
        broken = False

        def embed_tokens(self, tokens: Sequence[fake.FakeTokens]) -> Any:
            if self.broken or any(t.text == POISON for t in tokens):
                self.broken = self.broken or len(tokens) == 1  # failing on it alone breaks the model
                raise RuntimeError("session broken")
            return super().embed_tokens(tokens)

    box = Box(tmp_path, lambda n, v: BreaksAfterPoison())
    job_id = box.submit(_texts(20, poison=[3]))
    assert box.worker.run_once().failed == [job_id]
    job = box.store.require_job(job_id)
    assert (job.ok, job.rejected) == (0, 0) and "RuntimeError: session broken" in job.error


def test_a_poison_record_among_good_ones_is_rejected_after_two_probes(tmp_path: Path) -> None:
    model = Poisoned()
    box = Box(tmp_path, lambda n, v: model)
    job_id = box.submit(_texts(16, poison=[5]))
    assert box.worker.run_once().finished == [job_id]
    assert [r["id"] for r in box.rows(job_id)] == [i for i in range(16) if i != 5]
    assert [(r["id"], r["reason"]) for r in box.rejects(job_id)] == [
        (5, "the model failed on this record: RuntimeError: model cannot take this record")
    ]
    # batch 0 (ok), batch 1 fails (the poison sorts last); the model on a record of batch 0 (ok);
    # halves 4 (ok), 4, 2 (ok), 2, 1 (ok), the poison alone twice; the model on that record again
    assert model.calls == 2 + 1 + 7 + 1


def test_a_tokenizer_that_breaks_fails_the_chunk_instead_of_rejecting_its_texts(tmp_path: Path) -> None:
    class TokenizerBreaks(fake.FakeModel):
        tokenized = 0

        def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[fake.FakeTokens]:
            self.tokenized += 1
            if self.tokenized > 1:
                raise RuntimeError("tokenizer state corrupted")
            return super().tokenize(texts, truncate=truncate)

    model = TokenizerBreaks()
    box = Box(tmp_path, lambda n, v: model, chunk_size=10)
    job_id = box.submit(_texts(20))
    assert box.worker.run_once().failed == [job_id]
    job = box.store.require_job(job_id)
    assert job.rejected == 0 and "chunk 1 failed 3 times: RuntimeError: tokenizer state corrupted" in job.error
    assert not (box.out(job_id) / "rejects-00001.jsonl").exists()


# -- 3. a poison record alone in a chunk ----------------------------------------------------------


def test_a_poison_record_alone_in_the_last_chunk_is_rejected_and_the_job_is_done(tmp_path: Path) -> None:
    box = Box(tmp_path, lambda n, v: Poisoned())
    job_id = box.submit(_texts(101, poison=[100]))
    summary = box.worker.run_once()
    assert summary.finished == [job_id] and summary.failed == []  # old code: failed after 3 attempts
    job = box.store.require_job(job_id)
    assert (job.ok, job.rejected) == (100, 1)
    [reject] = box.rejects(job_id)
    assert (reject["index"], reject["reason"]) == (
        100,
        "the model failed on this record: RuntimeError: model cannot take this record",
    )
    assert box.clock.slept == []


def test_a_text_the_tokenizer_raises_on_alone_in_the_last_chunk_is_rejected(tmp_path: Path) -> None:
    class Picky(fake.FakeModel):
        def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[fake.FakeTokens]:
            if any("\x00" in t for t in texts):
                raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
            return super().tokenize(texts, truncate=truncate)

    box = Box(tmp_path, lambda n, v: Picky(), chunk_size=10)
    lines = [*_texts(10), json.dumps({"id": 10, "text": "nul \x00 here"})]
    job_id = box.submit(lines)
    assert box.worker.run_once().finished == [job_id]  # old code: failed after 3 attempts
    [reject] = box.rejects(job_id)
    assert reject["index"] == 10 and reject["reason"].startswith("the model failed on this record: TypeError:")


def test_a_poison_only_first_chunk_is_rejected_once_another_chunk_shows_the_model_works(tmp_path: Path) -> None:
    box = Box(tmp_path, lambda n, v: Poisoned(), chunk_size=2)
    job_id = box.submit(_texts(4, poison=[0, 1]))
    assert box.worker.run_once().finished == [job_id]
    job = box.store.require_job(job_id)
    assert (job.ok, job.rejected) == (2, 2)
    assert [r["index"] for r in box.rejects(job_id)] == [0, 1]
    assert box.clock.slept == [5.0]  # chunk 0 first had nothing to compare with: retried after chunk 1


def test_a_job_whose_every_record_fails_still_fails(tmp_path: Path) -> None:
    """Nothing shows the model works on any record: a broken model or bad records cannot be told apart."""
    box = Box(tmp_path, lambda n, v: Poisoned())
    job_id = box.submit(_texts(1, poison=[0]))
    assert box.worker.run_once().failed == [job_id]
    assert "chunk 0 failed 3 times: RuntimeError: model cannot take this record" in box.store.require_job(job_id).error


def test_a_model_broken_before_the_last_chunk_does_not_reject_it(tmp_path: Path) -> None:
    """The job's done chunk is no licence: the model is tried on one of its records again, now."""
    model = Breaks(good_calls=13)  # 100 records in batches of 8: chunk 0 takes 13 calls
    box = Box(tmp_path, lambda n, v: model)
    job_id = box.submit(_texts(101))
    assert box.worker.run_once().failed == [job_id]
    job = box.store.require_job(job_id)
    assert (job.chunks_done, job.rejected) == (1, 0) and "chunk 1 failed 3 times" in job.error
    assert not (box.out(job_id) / "rejects-00001.jsonl").exists()


def test_a_chunk_run_twice_on_a_deterministic_model_gives_identical_files(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text("".join(line + "\n" for line in _texts(30, poison=[4, 17])))
    task = ChunkTask(
        job_id="j",
        input_path=str(src),
        format="jsonl",
        text_field="text",
        model="fake-embed",
        version=1,
        out_dir=str(tmp_path / "out"),
        plan=plan_chunks(src, "jsonl", 100)[0],
        batch_size=4,
    )
    first = run_chunk(task, Poisoned())
    files = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    second = run_chunk(task, Poisoned())
    assert first == second and (first.ok, first.rejected) == (28, 2)
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == files


# -- 2. "latest" without a model load per job -----------------------------------------------------


class Repo:
    """A repository whose latest version and packages can change; counts loads."""

    def __init__(self) -> None:
        self.latest_version = 1
        self.sha: dict[int, str] = {}
        self.loads: list[tuple[str, int | None]] = []
        self.reads = 0

    def package(self, version: int) -> str:
        return self.sha.get(version, f"{version}" * 64)

    def load(self, name: str, version: int | None) -> fake.FakeModel:
        self.loads.append((name, version))
        if name not in fake.FAKE_MODELS:
            raise ModelNotFoundError(f"the loader: model {name!r} is not in the repository")
        v = self.latest_version if version is None else version
        model = fake.FakeModel(name=name, version=v, dim=2 + v)
        model.package_sha256 = self.package(v)
        return model

    def latest(self, name: str) -> tuple[int, str]:
        self.reads += 1
        if name not in fake.FAKE_MODELS:
            raise ModelNotFoundError(f"no model {name!r}")
        return self.latest_version, self.package(self.latest_version)


def test_five_jobs_in_one_worker_load_the_model_once(tmp_path: Path) -> None:
    repo = Repo()
    box = Box(tmp_path, repo.load, latest=repo.latest)
    jobs = []
    for n in range(5):
        jobs.append(box.submit(_texts(10), name=f"in{n}.jsonl"))
        box.worker.run_once(wait_for_retries=False)  # --watch: one job after the other
    assert [box.store.require_job(j).state for j in jobs] == ["done"] * 5
    assert repo.loads == [("fake-embed", 1)]  # old code: 5 loads of ("fake-embed", None)
    assert repo.reads == 5
    assert {(box.store.require_job(j).version, box.store.require_job(j).model_sha256) for j in jobs} == {(1, "1" * 64)}


def test_an_empty_job_before_a_full_one_loads_the_model_once(tmp_path: Path) -> None:
    """An empty file's job has no chunk to pin its version: its batch_end's model was loaded as
    (name, None), a second copy of the model beside the pinned one (650 MB RSS against 412)."""
    from tests.appliance.batch_box import Audit

    repo = Repo()
    box = Box(tmp_path, repo.load, latest=repo.latest, audit=Audit())
    empty = box.submit([], name="empty.jsonl")
    box.worker.run_once(wait_for_retries=False)
    full = box.submit(_texts(3), name="full.jsonl")
    box.worker.run_once(wait_for_retries=False)
    assert [box.store.require_job(j).state for j in (empty, full)] == ["done", "done"]
    assert repo.loads == [("fake-embed", 1)]


def test_a_new_version_or_a_reinstalled_package_is_loaded_once_then_reused(tmp_path: Path) -> None:
    repo = Repo()
    box = Box(tmp_path, repo.load, latest=repo.latest)

    def run() -> str:
        job_id = box.submit(_texts(5))
        assert box.worker.run_once(wait_for_retries=False).finished == [job_id]
        return job_id

    first = run()
    repo.latest_version = 2
    second, third = run(), run()
    repo.sha[2] = "e" * 64  # version 2 exported again under the same number
    fourth = run()
    assert repo.loads == [("fake-embed", 1), ("fake-embed", 2), ("fake-embed", 2)]
    pins = [(box.store.require_job(j).version, box.store.require_job(j).model_sha256) for j in (first, second, third)]
    assert pins == [(1, "1" * 64), (2, "2" * 64), (2, "2" * 64)]
    assert box.store.require_job(fourth).model_sha256 == "e" * 64
    assert {len(r["embedding"]) for r in box.rows(second)} == {4}


def test_a_model_the_repository_lacks_fails_its_job_with_the_loaders_error(tmp_path: Path) -> None:
    repo = Repo()
    box = Box(tmp_path, repo.load, latest=repo.latest)
    job_id = box.submit(_texts(5), model="no-such-model")
    assert box.worker.run_once().failed == [job_id]
    assert box.store.require_job(job_id).error == (
        f"the loader: model 'no-such-model' is not in the repository; then `inferbox batch retry {job_id}` runs the job"
    )
    assert repo.loads == [("no-such-model", None)]  # "latest" could not be read: the loader tells why
    # nothing of it is held: the chunk it leased is given back (purge refused a failed job for the
    # lease's 10 minutes, "a worker still holds 1 of its chunks", with no worker running)
    assert box.store.held(job_id) == 0


def test_repository_latest_reads_the_newest_version_folder_and_its_manifest_hash(tmp_path: Path) -> None:
    from appliance.batch.model import repository_latest

    for version, body in ((1, b'{"v": 1}'), (2, b'{"v": 2}'), (10, b'{"v": 10}')):
        (tmp_path / "m" / str(version)).mkdir(parents=True)
        (tmp_path / "m" / str(version) / "manifest.json").write_bytes(body)
    (tmp_path / "m" / "draft").mkdir()
    latest = repository_latest(tmp_path)
    assert latest("m") == (10, hashlib.sha256(b'{"v": 10}').hexdigest())
    with pytest.raises(ModelNotFoundError):
        latest("other")


# -- 4. the CSV record scanner is linear -----------------------------------------------------------


class Counting:
    """A buffer that counts the bytes its ``find`` calls look at."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.scanned = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, key: slice, /) -> bytes:
        return self.data[key]

    def find(self, sub: bytes, start: int = 0, end: int | None = None, /) -> int:
        stop = len(self.data) if end is None else min(end, len(self.data))
        found = self.data.find(sub, start, stop)
        self.scanned += max(0, (found + len(sub) if found >= 0 else stop) - start)
        return found


@pytest.mark.parametrize("unit", [b"a,", b'a",', b'"a",', b'"a""b",', b'"a\nb",'])
def test_scanning_a_long_csv_line_looks_at_each_byte_a_bounded_number_of_times(unit: bytes) -> None:
    for reps in (1_000, 10_000):
        data = Counting(b"id,text\n" + unit * reps + b'"x"\n' + b"1,next\n")
        records = list(readers._text_records(data, 8, csv_mode=True))
        assert len(records) == 2
        assert data.scanned <= 3 * len(data)  # old code: a,  x 10,000 scanned ~200 MB for a 20 kB line


def test_long_csv_lines_split_as_pythons_csv_reads_them(tmp_path: Path) -> None:
    fields = ["plain", '"quoted, with comma"', '"two\nlines"', 'a "quote" inside', '"dq ""x"" y"', ""]
    line = ",".join(fields[i % len(fields)] for i in range(30_000))
    body = f"{line}\n1,short\n{line}\n"
    src = tmp_path / "long.csv"
    src.write_bytes(b"h\n" + body.encode())
    records = [r for p in plan_chunks(src, "csv", 2) for r in read_chunk(src, "csv", p)]
    got = [next(csv.reader(io.StringIO(r.raw.decode())), []) for r in records]
    assert got == list(csv.reader(io.StringIO(body)))


# -- 5. a NUL byte alone does not make a UTF-8 file UTF-16 -------------------------------------------


def test_a_utf8_file_with_a_nul_byte_is_accepted_and_that_record_judged_alone(tmp_path: Path) -> None:
    box = Box(tmp_path, lambda n, v: fake.FakeModel())
    csv_src = tmp_path / "in.csv"
    csv_src.write_bytes(b"id,text\n1,hello\x00world\n2,fine\n")
    csv_job = submit(tmp_path / "spool", csv_src, model="fake-embed")  # old code: "holds NUL bytes"
    jsonl_job = box.submit(['{"id": 1, "text": "a\x00b"}', '{"id": 2, "text": "fine"}'])
    box.worker.run_once()
    assert [r["id"] for r in box.rows(csv_job)] == ["1", "2"]
    assert [r["id"] for r in box.rows(jsonl_job)] == [2]
    [reject] = box.rejects(jsonl_job)
    assert reject["index"] == 0 and reject["reason"].startswith("not valid JSON: Invalid control character")


@pytest.mark.parametrize(
    ("codec", "name"),
    [
        ("utf-16-le", "UTF-16LE"),
        ("utf-16-be", "UTF-16BE"),
        ("utf-32-le", "UTF-32LE"),
        ("utf-32-be", "UTF-32BE"),
    ],
)
@pytest.mark.parametrize(
    "text",
    ['{"id": 1, "text": "plain ascii"}\n', '{"id": 2, "text": "' + "中文文本、混合" * 40 + '"}\n'],
    ids=["latin", "mostly-cjk"],
)
def test_utf16_and_utf32_without_a_bom_are_told_by_their_zero_bytes(
    tmp_path: Path, codec: str, name: str, text: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes((text * 20).encode(codec))
    with pytest.raises(BatchError, match=f"in.jsonl is {name[:6]} text, not UTF-8; .*iconv -f {name} "):
        check_encoding(src)


def test_a_utf8_file_with_many_scattered_nuls_is_accepted(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(b'{"id": %d, "text": "x\x00y\x00\x00z"}\n' % i for i in range(200)))
    check_encoding(src)  # no error: the records holding NUL are rejected one by one


def test_a_batch_refused_whole_whose_records_raise_alone_asks_the_done_chunk(tmp_path: Path) -> None:
    """A batch the model refuses (InputError) whose records then raise alone: the done chunk of the
    job shows the model works, so they are rejects, not a failed chunk (it skipped that check)."""
    from appliance.batch import fake
    from runtime.errors import InputError

    refuse = "R" + POISON[1:]

    class Model(fake.FakeModel):
        def embed_tokens(self, tokens: Any) -> Any:
            texts = [t.text for t in tokens]
            if refuse in texts:
                raise InputError("too long")
            if POISON in texts:
                raise RuntimeError("cannot take this record")
            return super().embed_tokens(tokens)

    model = Model()
    box = Box(tmp_path, lambda n, v: model, chunk_size=20, batch_size=4)
    lines = [json.dumps({"id": i, "text": f"text number {i}"}) for i in range(20)]
    lines += [json.dumps({"id": i, "text": refuse if i % 4 == 0 else POISON}) for i in range(20, 28)]
    job_id = box.submit(lines)
    box.worker.run_once()
    job = box.store.require_job(job_id)
    assert (job.state, job.ok, job.rejected) == ("done", 20, 8), job.error


def test_valid_utf8_with_some_nul_bytes_on_one_side_is_not_taken_for_utf16(tmp_path: Path) -> None:
    for name, data in (
        ("rows.csv", b"id,text\n" + b"".join(b"%04d,ab\x00c\n" % i for i in range(100))),
        ("cjk.csv", b"id,text\n" + b"".join(b"%04d," % i + "\u540d".encode() + b"\x00\n" for i in range(100))),
        ("tiny.csv", b"text\n\x00\n"),
    ):
        src = tmp_path / name
        src.write_bytes(data)
        check_encoding(src)  # accepted: a record holding NUL is judged on its own
    latin16 = tmp_path / "latin16.csv"
    latin16.write_bytes("id,text\n1,hello\n2,world\n".encode("utf-16-le"))
    with pytest.raises(BatchError, match="UTF-16"):
        check_encoding(latin16)


def test_short_bad_records_filling_the_first_batches_do_not_fail_a_one_chunk_job(tmp_path: Path) -> None:
    """Batches are sorted by length: short records the model raises on fill the first two batches.
    The batches after them work, so the waiting ones are split and only the bad records rejected
    (it failed the chunk after two whole batches, with no done chunk to ask)."""
    from appliance.batch import fake

    bad = "zz"

    class Model(fake.FakeModel):
        def embed_tokens(self, tokens: Any) -> Any:
            if any(t.text == bad for t in tokens):
                raise RuntimeError("cannot take this record")
            return super().embed_tokens(tokens)

    model = Model()
    box = Box(tmp_path, lambda n, v: model, chunk_size=100, batch_size=8)
    lines = [json.dumps({"id": i, "text": bad}) for i in range(16)]
    lines += [json.dumps({"id": i, "text": f"a longer good text number {i}"}) for i in range(16, 100)]
    job_id = box.submit(lines)
    box.worker.run_once()
    job = box.store.require_job(job_id)
    assert (job.state, job.ok, job.rejected) == ("done", 84, 16), job.error

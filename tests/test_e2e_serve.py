"""End to end: a real ``inferbox serve`` process on 127.0.0.1 with the real MiniLM package.

The server is started once per module as a user would start it (the CLI, a
fresh home, auth and audit on), and stopped with SIGTERM so that the clean
shutdown path (final checkpoint) runs before the audit assertions.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from appliance.cli import main
from export.spec import BATCH_GATE

ROOT = Path(__file__).resolve().parents[1]
CANARY_TEXT = "CANARY patient Zebedee Quibblesworth-7731 was admitted"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBOX_")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def cli(*args: str, home: Path, repository: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args, "--home", str(home), "--repository", str(repository)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
        check=False,
    )


@dataclass
class Served:
    url: str
    home: Path
    repository: Path
    key: str
    proc: subprocess.Popen[bytes]
    log: Path

    def headers(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}


def _start(
    repository: Path,
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    client_tls: ssl.SSLContext | None = None,
    ctrl_c: bool = False,
) -> tuple[subprocess.Popen[bytes], str, Path]:
    for _attempt in range(3):
        started = _try_start(repository, home, *args, env=env, client_tls=client_tls, ctrl_c=ctrl_c)
        if started is not None:
            return started
    pytest.fail("three free ports were taken before inferbox serve could listen on them")


_AS_A_TERMINAL = (
    "import runpy, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
    "sys.argv[0] = 'inferbox'\n"
    "runpy.run_module('appliance', run_name='__main__')\n"
)


def _try_start(
    repository: Path,
    home: Path,
    *args: str,
    env: dict[str, str] | None = None,
    client_tls: ssl.SSLContext | None = None,
    ctrl_c: bool = False,
) -> tuple[subprocess.Popen[bytes], str, Path] | None:
    """A started server, or None when the free port was taken meanwhile (another test's server).
    ``ctrl_c``: SIGINT as a terminal's Ctrl-C has it (a test run started in the background by a
    non-interactive shell hands every process SIGINT ignored, and Python keeps it so)."""
    port = _free_port()
    log = home.parent / f"{home.name}-server.log"
    launcher = ["-c", _AS_A_TERMINAL] if ctrl_c else ["-m", "appliance"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                *launcher,
                "serve",
                "--home",
                str(home),
                "--repository",
                str(repository),
                "--port",
                str(port),
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**_env(), **(env or {})},
            cwd=ROOT,
        )
    url = f"{'http' if client_tls is None else 'https'}://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            ready = httpx.get(f"{url}/v2/health/ready", timeout=2, verify=client_tls or True)
            if ready.status_code == 200:
                return proc, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.2)  # polling for start-up, not an assertion
    proc.kill()
    said = log.read_text(errors="replace")
    if proc.wait() != 0 and f"127.0.0.1:{port} is in use" in said:
        return None
    pytest.fail(f"inferbox serve did not become ready:\n{said[-4000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def assert_header_deadline(url: str, seconds: str) -> None:
    """The server ``url`` closes a connection that sent nothing, and answers one that sent part of its
    headers 408 naming ``header_timeout_s`` = ``seconds`` (the setting reached the process that took it)."""
    address = urllib.parse.urlsplit(url)
    idle = socket.create_connection((address.hostname, address.port), timeout=60)
    stalled = socket.create_connection((address.hostname, address.port), timeout=60)
    with idle, stalled:
        stalled.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\n")
        answers = []
        for sock in (idle, stalled):
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
            answers.append(got)
    assert answers[0] == b"", answers
    assert answers[1].startswith(b"HTTP/1.1 408 "), answers
    assert f"within {seconds} s (header_timeout_s)".encode() in answers[1], answers
    # counted where no request shows it (each worker writes its counts every second: polled)
    series = 'inferbox_connections_closed_total{reason="header_timeout"}'
    deadline = time.monotonic() + 60
    while True:
        lines = httpx.get(f"{url}/metrics", timeout=30).text.splitlines()
        counted = [float(line.rpartition(" ")[2]) for line in lines if line.startswith(series + " ")]
        if counted and counted[0] >= 1:
            break
        assert time.monotonic() < deadline, counted
        time.sleep(0.5)  # polling, not an assertion


@contextlib.contextmanager
def serving(repository: Path, home: Path) -> Iterator[Served]:
    """A real ``inferbox serve`` on ``home`` with its first admin key, stopped with SIGTERM after."""
    proc, url, log = _start(repository, home)
    key = (home / "keys" / "first-admin.key").read_text().strip()
    try:
        yield Served(url=url, home=home, repository=repository, key=key, proc=proc, log=log)
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def served(minilm_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(minilm_repository, tmp_path_factory.mktemp("serve-home")) as srv:
        assert oct((srv.home / "keys" / "first-admin.key").stat().st_mode & 0o777) == "0o600"
        yield srv


def _embed(srv: Served, texts: list[str] | str, key: str | None = None) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/v1/embeddings", json={"model": "minilm", "input": texts}, headers=srv.headers(key), timeout=60
    )


def _vectors(resp: httpx.Response) -> np.ndarray:
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    return np.array([d["embedding"] for d in sorted(data, key=lambda d: d["index"])], dtype=np.float32)


TEXTS = [
    "?",
    "hello",
    "The patient was discharged after three days.",
    "Quarterly revenue rose 12% on strong demand for cloud services in Europe and Asia.",
    "Der Bericht ist fertig und liegt auf dem Tisch.",
    " ".join(["A long paragraph about data protection and the duties of a controller."] * 30),
]


def test_embeddings_match_sentence_transformers_within_the_gate(served: Served) -> None:
    from sentence_transformers import SentenceTransformer

    from export.default import minilm_dir

    got = _vectors(_embed(served, TEXTS))
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(TEXTS, normalize_embeddings=True)
    cos = np.sum(got * reference, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1))
    assert float(cos.mean()) >= 0.99, cos
    assert float(cos.min()) >= 0.97, cos
    usage = _embed(served, "hello world").json()["usage"]
    assert usage["prompt_tokens"] == usage["total_tokens"] == 4  # [CLS] hello world [SEP]


def test_kserve_bytes_input_equals_openai_route(served: Served) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": TEXTS[1:3]}]}
    resp = httpx.post(f"{served.url}/v2/models/minilm/infer", json=body, headers=served.headers(), timeout=60)
    assert resp.status_code == 200, resp.text
    out = resp.json()["outputs"][0]
    kserve = np.array(out["data"], dtype=np.float32).reshape(out["shape"])
    np.testing.assert_allclose(kserve, _vectors(_embed(served, TEXTS[1:3])), atol=1e-5)


def _served_variant(served: Served, request_id: str) -> tuple[str, str]:
    """(backend, variant) the server answered request ``request_id`` with, from its audit record."""
    (record,) = httpx.get(
        f"{served.url}/v1/audit", params={"request_id": request_id}, headers=served.headers(), timeout=30
    ).json()["records"]
    return record["backend"], record["variant"]


def _served_precision(served: Served) -> str:
    """The exec precision the server runs MiniLM in, from its ``inferbox_model_info`` metric."""
    text = httpx.get(f"{served.url}/metrics", headers=served.headers(), timeout=30).text
    found = re.search(r'inferbox_model_info\{[^}]*model="minilm"[^}]*exec_precision="(\w+)"', text)
    assert found is not None, text[:2000]
    return found[1]


def _batch_tolerance(answer: np.ndarray) -> float:
    """What batching may change in an answer: the export's gate (the served variant passed it)."""
    return max(1e-4, BATCH_GATE["max_batch_rel_diff"] * float(np.abs(answer).max()))


def test_concurrent_requests_equal_unbatched(served: Served) -> None:
    texts = [f"request number {i} about {'claims ' * (i % 7)}processing" for i in range(24)]
    alone = {t: _vectors(_embed(served, [t]))[0] for t in texts}
    with ThreadPoolExecutor(max_workers=12) as pool:
        together = list(pool.map(lambda t: _vectors(_embed(served, [t]))[0], texts))
    for t, v in zip(texts, together, strict=True):
        np.testing.assert_allclose(v, alone[t], atol=_batch_tolerance(alone[t]))


def test_the_served_model_runs_as_streams_on_a_cpu(served: Served) -> None:
    """``streams`` auto: two on a CPU with two or more cores (the concurrent test above went
    through them); /metrics says what runs."""
    from runtime.hardware import default_threads

    text = httpx.get(f"{served.url}/metrics", headers=served.headers(), timeout=30).text
    (line,) = [x for x in text.splitlines() if x.startswith("inferbox_model_info{") and 'model="minilm"' in x]
    cpu = any(f'backend="{b}"' in line for b in ("ort-cpu", "ov-cpu"))
    expected = 2 if cpu and default_threads() >= 2 else 1
    assert f'streams="{expected}"' in line, line


def test_a_repeated_lone_query_gets_a_static_shape_copy_on_openvino(served: Served) -> None:
    """A lone client's text runs on the all-core session; on OpenVINO its padded shape gets a
    static-shape copy once it repeats (``static_shapes`` setting, default 4) and /metrics counts
    the copies; the answer stays the one computed before."""
    import time

    def metrics() -> tuple[str, int]:
        text = httpx.get(f"{served.url}/metrics", headers=served.headers(), timeout=30).text
        (info,) = [x for x in text.splitlines() if x.startswith("inferbox_model_info{") and 'model="minilm"' in x]
        (count,) = [x for x in text.splitlines() if x.startswith('inferbox_static_shapes{model="minilm"}')]
        return info, int(count.rsplit(" ", 1)[1])

    info, before = metrics()
    query = ["what does the audit log record about this static shape query"]
    first = _vectors(_embed(served, query))[0]
    answers = [first]
    if 'backend="ov-' not in info:
        answers += [_vectors(_embed(served, query))[0] for _ in range(50)]
        assert metrics()[1] == 0  # ONNX Runtime: no copies
        return
    # the shape is compiled once its calls took STATIC_AFTER_S (1 s): a few hundred queries; one
    # more copy must come, unless earlier tests' lone texts already took the four, or the copy
    # answered otherwise than the dynamic model on its first call and was dropped (said in the log:
    # an INT8 variant's copy can pick other kernels)
    wanted = min(before + 1, 4)

    def dropped() -> bool:
        return re.search(r"static-shape copy for .* dropped", served.log.read_text(errors="replace")) is not None

    deadline = time.monotonic() + 90
    while metrics()[1] < wanted and not dropped() and time.monotonic() < deadline:
        answers += [_vectors(_embed(served, query))[0] for _ in range(50)]
    assert metrics()[1] >= wanted or dropped()
    answers.append(_vectors(_embed(served, query))[0])  # on the copy
    for answer in answers:
        np.testing.assert_allclose(answer, first, atol=_batch_tolerance(first))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread CPU is read from /proc")
def test_metrics_split_the_servers_cpu_by_thread(served: Served) -> None:
    """The server names its threads in the kernel; /metrics sums their CPU by kind, and the
    requests ran on the event loop and the model's inference threads."""
    texts = [f"where does the CPU of request {i} go, thread by thread" for i in range(32)]
    for _ in range(10):  # enough model time for a clock tick (10 ms) even when run alone
        _vectors(_embed(served, texts))
    text = httpx.get(f"{served.url}/metrics", headers=served.headers(), timeout=30).text
    found = re.findall(r'^inferbox_thread_cpu_seconds_total\{thread="(\w+)"\} (\S+)$', text, re.MULTILINE)
    seconds = {kind: float(value) for kind, value in found}
    assert set(seconds) == {"loop", "inference", "audit", "other"}, text
    assert seconds["loop"] > 0 and seconds["inference"] > 0
    names = {p.read_text().strip() for p in Path(f"/proc/{served.proc.pid}/task").glob("*/comm")}
    assert "audit-writer" in names and any(n.startswith("infer-minilm") for n in names), names
    # the audit log's group commit: records, commits (one fsync each), nobody waiting after the answers
    audit = {m[0]: float(m[1]) for m in re.findall(r"^inferbox_audit_(\w+) (\S+)$", text, re.MULTILINE)}
    assert audit["records_total"] >= 10 and 1 <= audit["commit_seconds_count"] <= audit["records_total"], audit
    assert audit["commit_seconds_sum"] > 0 and audit["pending_records"] == 0, audit


def test_binary_tensor_extension_over_real_http(served: Served) -> None:
    from api.codec import encode_bytes_elements

    texts = ["binary hello", "a second text"]
    raw = encode_bytes_elements(texts)
    header = json.dumps(
        {
            "inputs": [
                {"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": len(raw)}}
            ],
            "outputs": [{"name": "sentence_embedding", "parameters": {"binary_data": True}}],
        }
    ).encode()
    resp = httpx.post(
        f"{served.url}/v2/models/minilm/infer",
        content=header + raw,
        headers={
            **served.headers(),
            "Inference-Header-Content-Length": str(len(header)),
            "Content-Type": "application/octet-stream",
        },
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    n = int(resp.headers["inference-header-content-length"])
    meta = json.loads(resp.content[:n])
    out = meta["outputs"][0]
    vectors = np.frombuffer(resp.content[n:], dtype="<f4").reshape(out["shape"])
    np.testing.assert_allclose(vectors, _vectors(_embed(served, texts)), atol=1e-5)


@pytest.mark.parametrize(
    ("path", "body", "status", "field"),
    [
        ("/v1/embeddings", {"model": "minilm"}, 400, "input"),
        ("/v1/embeddings", {"model": "minilm", "input": [[101, 102]]}, 400, "input"),
        ("/v1/embeddings", {"model": "nosuch", "input": "x"}, 404, "model"),
        ("/v1/embeddings", {"model": "minilm", "input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
        (
            "/v2/models/minilm/infer",
            {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            400,
            "BYTES",
        ),
        (
            "/v2/models/minilm/infer",
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a"]}]},
            400,
            "shape",
        ),
        ("/v2/models/nosuch/infer", {"inputs": []}, 404, "nosuch"),
        ("/v2/models/minilm/versions/9/infer", {"inputs": []}, 404, "version"),
    ],
)
def test_error_table_over_real_http(
    served: Served, path: str, body: dict[str, object], status: int, field: str
) -> None:
    resp = httpx.post(f"{served.url}{path}", json=body, headers=served.headers(), timeout=30)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert field in message, message
    assert "Traceback" not in resp.text and resp.headers["x-request-id"]


def test_keys_through_the_cli_govern_access(served: Served) -> None:
    assert _embed(served, "x", key="ibx_000000000000_wrong").status_code == 401
    assert httpx.post(f"{served.url}/v1/embeddings", json={"model": "minilm", "input": "x"}).status_code == 401
    made = cli(
        "keys",
        "create",
        "--scope",
        "infer",
        "--model",
        "other",
        "--json",
        home=served.home,
        repository=served.repository,
    )
    assert made.returncode == 0, made.stderr
    other = json.loads(made.stdout)
    assert _embed(served, "x", key=other["key"]).status_code == 403
    made = cli(
        "keys",
        "create",
        "--scope",
        "infer",
        "--model",
        "minilm",
        "--json",
        home=served.home,
        repository=served.repository,
    )
    scoped = json.loads(made.stdout)
    assert _embed(served, "x", key=scoped["key"]).status_code == 200
    revoked = cli("keys", "revoke", scoped["id"], home=served.home, repository=served.repository)
    assert revoked.returncode == 0, revoked.stderr
    assert _embed(served, "x", key=scoped["key"]).status_code == 401


def _post_with_two_keys(srv: Served, first: str, second: str) -> tuple[int, bytes]:
    """A POST with two Authorization lines, as a proxy adding its own key sends it (httpx joins them)."""
    host, port = srv.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"model": "minilm", "input": "x"}).encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    try:
        conn.putrequest("POST", "/v1/embeddings")
        for key in (first, second):
            conn.putheader("Authorization", f"Bearer {key}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def test_two_keys_on_one_request_are_refused_and_names_cannot_forge_log_lines(served: Served) -> None:
    """Two Authorization lines let the first one in whatever the second said; and a model name with a
    newline wrote a log line of the client's choosing (``... ERROR forged: audit disabled``)."""
    for first, second in ((served.key, "ibx_000000000000_wrong"), ("ibx_000000000000_wrong", served.key)):
        status, body = _post_with_two_keys(served, first, second)
        assert status == 401 and b"sent 2 times" in body, (status, body)
    forged = "2026-12-07 11:99:99,000 ERROR forged: audit disabled"
    name = urllib.parse.quote(f"x\n{forged}\x00", safe="")
    r = httpx.post(f"{served.url}/v2/repository/models/{name}/load", headers=served.headers(), timeout=60)
    assert r.status_code == 404, r.text
    lines = served.log.read_text(errors="replace").splitlines()
    assert not any(line.startswith(forged[:23]) for line in lines), lines[-5:]
    assert any(f"\\n{forged}\\x00" in line for line in lines), lines[-5:]  # there, escaped on its own line


def test_a_head_probe_is_answered_over_real_http(served: Served) -> None:
    """uvicorn sends no body for a HEAD; the route answered 405 before HEAD was taken as GET."""
    for path in ("/v2/health/ready", "/v2/health/live"):
        r = httpx.head(f"{served.url}{path}", timeout=30)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)


def test_readme_curl_command_works(served: Served) -> None:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(curl .*?)```", readme, flags=re.S)
    assert len(blocks) >= 2, "README lost its curl examples"
    for block in blocks:
        command = block.replace("http://127.0.0.1:8080", served.url)
        done = subprocess.run(
            ["bash", "-c", command], capture_output=True, text=True, env={**_env(), "KEY": served.key}, timeout=60
        )
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert "error" not in answer, answer
        vector = answer["data"][0]["embedding"] if "data" in answer else answer["outputs"][0]["data"]
        assert len(vector) == 384


def test_audit_is_readable_over_the_api_with_its_own_scope(served: Served) -> None:
    # its own records to read, whatever ran before it in this module (or did not: run alone)
    for text in ("one", "two", "three"):
        ok = httpx.post(
            f"{served.url}/v1/embeddings", json={"model": "minilm", "input": text}, headers=served.headers(), timeout=30
        )
        assert ok.status_code == 200, ok.text
    unknown = httpx.post(
        f"{served.url}/v1/embeddings",
        json={"model": "no-such-model", "input": "x"},
        headers=served.headers(),
        timeout=30,
    )
    assert unknown.status_code == 404, unknown.text
    made = cli("keys", "create", "--scope", "infer", "--json", home=served.home, repository=served.repository)
    infer_only = json.loads(made.stdout)["key"]
    denied = httpx.get(f"{served.url}/v1/audit", headers=served.headers(infer_only), timeout=30)
    assert denied.status_code == 403
    page = httpx.get(f"{served.url}/v1/audit", params={"limit": 5}, headers=served.headers(), timeout=30)
    assert page.status_code == 200, page.text
    body = page.json()
    assert [r["seq"] for r in body["records"]] == [1, 2, 3, 4, 5]
    assert body["next_after_seq"] == 5
    inferences = httpx.get(
        f"{served.url}/v1/audit", params={"event": "inference", "limit": 1000}, headers=served.headers(), timeout=30
    ).json()["records"]
    served_ok = [r for r in inferences if r["outcome"] == "success"]
    assert served_ok and all(r["model_name"] == "minilm" and len(r["model_sha256"]) == 64 for r in served_ok)
    assert all(r["backend"] and r["variant"] for r in served_ok)
    assert all(r["input_digest"] for r in served_ok) and all(r["digest_key_id"] for r in inferences)
    # a request refused before its body was read (an unknown model) has no input digest, not the empty body's
    assert all(len(r["input_digest"]) in (0, 64) for r in inferences)
    # failures are recorded too (the error-table requests above), with their status
    assert any(r["outcome"] == "failure" and r["status"] == 404 for r in inferences)
    reads = httpx.get(
        f"{served.url}/v1/audit", params={"event": "audit_read", "limit": 1000}, headers=served.headers(), timeout=30
    ).json()["records"]
    assert len(reads) >= 2  # the earlier reads were recorded
    bad = httpx.get(f"{served.url}/v1/audit", params={"limit": 0}, headers=served.headers(), timeout=30)
    assert bad.status_code == 400 and "limit" in bad.text


def test_a_parquet_file_without_the_text_column_is_refused_for_a_text_model(served: Served, tmp_path: Path) -> None:
    """Submit reads the model's manifest for the hint: a text model's Parquet job without its text
    column became a 'done' job with every row rejected (a tensor model's columns are its inputs)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "job.parquet"
    pq.write_table(pa.table({"id": [1], "body": ["hello"]}), source)
    refused = cli("batch", "submit", str(source), "--model", "minilm", home=served.home, repository=served.repository)
    assert refused.returncode == 2 and "has no column 'text'" in refused.stderr, refused.stderr
    assert not list((served.home / "spool" / "new").glob("*"))  # nothing spooled


def test_batch_job_results_equal_the_api_and_share_the_audit_chain(served: Served, tmp_path: Path) -> None:
    texts = ["short", "", "a claim about a broken windscreen", 42, "Der Vertrag endet am 31. Dezember."]
    source = tmp_path / "job.jsonl"
    source.write_text("".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    submitted = cli("batch", "submit", str(source), "--model", "minilm", home=served.home, repository=served.repository)
    assert submitted.returncode == 0, submitted.stderr
    assert "warning" not in submitted.stderr, submitted.stderr  # the repository holds minilm
    job = submitted.stdout.strip().split()[-1]
    # The batch worker is a second process appending to the same audit chain as the running API.
    ran = cli("batch", "run", "--once", home=served.home, repository=served.repository)
    assert ran.returncode == 0, ran.stderr
    outbox = served.home / "outbox" / job
    rows = [json.loads(line) for part in sorted(outbox.glob("part-*.jsonl")) for line in part.read_text().splitlines()]
    rejects = [json.loads(line) for line in (outbox / "rejects.jsonl").read_text().splitlines()]
    # "" is embedded, as /v1/embeddings embeds it (MiniLM's tokenizer makes it [CLS] [SEP]); 42 is rejected
    assert sorted(r["id"] for r in rows) == ["r0", "r1", "r2", "r4"]
    assert {r["id"] for r in rejects} | {r["id"] for r in rows} == {f"r{i}" for i in range(5)}
    assert any(r["id"] == "r3" and "text" in r["reason"] for r in rejects)
    good = [r for r in rows if texts[int(r["id"][1:])]]
    answered = _embed(served, [str(texts[int(r["id"][1:])]) for r in good])
    api = _vectors(answered)
    batch = np.array([r["embedding"] for r in good], dtype=np.float32)
    events = httpx.get(
        f"{served.url}/v1/audit", params={"job_id": job, "limit": 100}, headers=served.headers(), timeout=30
    ).json()["records"]
    kinds = [e["event"] for e in events]
    assert "batch_start" in kinds and "batch_end" in kinds
    end = next(e for e in events if e["event"] == "batch_end")
    assert len(end["details"]["merkle_root"]) == 64
    # The server ranks the package's candidates by their stream timings, a batch job by its b32 ones:
    # on the same candidate (backend, variant and exec precision) the answers agree within what
    # batching may change; on two (close timings: OV INT8 run in fp32 by one and in bf16 by the
    # other, say) each passed the export's accuracy gate, so they agree as embeddings.
    start = next(e for e in events if e["event"] == "batch_start")
    served_variant = _served_variant(served, answered.headers["x-request-id"])
    worker = re.search(r"loaded minilm/\d+ on (\S+) \(([^,]+), (\w+);", ran.stderr)
    assert worker is not None, ran.stderr
    assert (worker[1], worker[2]) == (start["backend"], start["variant"])
    if (*served_variant, _served_precision(served)) == (worker[1], worker[2], worker[3]):
        np.testing.assert_allclose(batch, api, atol=_batch_tolerance(api))
    else:
        cos = np.sum(batch * api, axis=1) / (np.linalg.norm(batch, axis=1) * np.linalg.norm(api, axis=1))
        assert float(cos.min()) > 0.97, (cos, start["variant"], served_variant)


def test_a_client_cannot_name_its_own_origin_in_the_audit_log(served: Served) -> None:
    """uvicorn believed X-Forwarded-For from any connection from 127.0.0.1, which on a box served on
    loopback is every client: a client wrote the origin of its own records.  With no
    ``trusted_proxies`` the origin is the connection's peer."""
    from appliance.commands.serve import proxy_options
    from appliance.settings import load_settings
    from runtime.errors import ConfigError

    for key in (None, "ibx_000000000000_" + "x" * 43):  # a request and an auth failure
        r = httpx.get(
            f"{served.url}/v2",
            headers={**served.headers(key), "X-Forwarded-For": "6.6.6.6", "X-Request-Id": f"xff-{key is None}"},
            timeout=30,
        )
        assert r.status_code == (200 if key is None else 401), r.text
        (record,) = httpx.get(
            f"{served.url}/v1/audit", params={"request_id": f"xff-{key is None}"}, headers=served.headers(), timeout=30
        ).json()["records"]
        assert record["origin"] == "127.0.0.1", record
    assert proxy_options(load_settings({}, environ={})) == {"proxy_headers": False, "forwarded_allow_ips": None}
    trusted = load_settings({"trusted_proxies": " 127.0.0.1, 10.0.0.0/24 "}, environ={})
    assert proxy_options(trusted) == {"proxy_headers": True, "forwarded_allow_ips": "127.0.0.1,10.0.0.0/24"}
    with pytest.raises(ConfigError, match=r"trusted_proxies .*'\*' is not an address or a network"):
        load_settings({"trusted_proxies": "*"}, environ={})
    # uvicorn reads networks strictly: host bits set would be a literal that never matches
    with pytest.raises(ConfigError, match=r"'10.0.0.1/24' is not an address or a network \(did you mean 10.0.0.0/24"):
        load_settings({"trusted_proxies": "10.0.0.1/24"}, environ={})


def test_audit_log_records_requests_verifies_and_holds_no_payload(served: Served) -> None:
    assert _embed(served, [CANARY_TEXT]).status_code == 200
    # Stop the server: the clean shutdown signs a final checkpoint.
    served.proc.send_signal(signal.SIGTERM)
    served.proc.wait(timeout=60)
    verify = cli("audit", "verify", home=served.home, repository=served.repository)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    export = served.home / "audit-export.jsonl"
    done = cli("audit", "export", "--out", str(export), home=served.home, repository=served.repository)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in export.read_text().splitlines()]
    events = [line.get("event") for line in lines]
    assert "service_start" in events and "service_stop" in events and "inference" in events
    # the load at start names its model in the record's columns, as an API load does (a filter by model
    # found the loads of the repository routes, not the one that served from the start)
    (load,) = [
        line for line in lines if line.get("event") == "model_load" and line.get("action", "").startswith("load ")
    ]
    assert load["model_name"] == "minilm" and len(load["model_sha256"]) == 64 and load["backend"] and load["variant"]
    # The canary: neither the request text nor any key secret is stored anywhere.
    # ``ibx_<id>_<secret>``: the secret is token_urlsafe and may itself hold "_".
    key_secret = served.key.split("_", 2)[2]
    assert len(key_secret) == 43, served.key
    secrets = [CANARY_TEXT.encode(), served.key.encode(), key_secret.encode()]
    places = [p for p in served.home.rglob("*") if p.is_file() and "keys" not in p.parts]
    places.append(served.log)
    assert any(p.suffix == ".db" for p in places)
    for place in places:
        data = place.read_bytes()
        for secret in secrets:
            assert secret not in data, f"{secret[:12]!r}... found in {place}"


def test_tampering_with_the_served_log_is_caught(served: Served, tmp_path: Path) -> None:
    """The chain written by the real API and batch processes, tampered with the ways audit-design.md lists."""
    import shutil

    sys.path.insert(0, str(ROOT / "tests" / "appliance"))
    import audit_tamper as tamper

    from appliance.audit.verify import verify_db
    from runtime.signing import load_private_key

    if served.proc.poll() is None:
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(timeout=60)
    public = load_private_key(served.home / "keys" / "signing.key").public_key()
    source = served.home / "audit.db"
    assert verify_db(source, public).ok
    records = tamper.records(source)
    inference = next(r.seq for r in records if r.event == "inference")
    batch_end = next(r.seq for r in records if r.event == "batch_end")
    keep = len(records) // 2
    cases = {
        "changed field": (lambda db: tamper.change_field(db, inference, "actor", "someone-else"), inference),
        "deleted batch record": (lambda db: tamper.delete_record(db, batch_end), batch_end),
        "reordered": (lambda db: tamper.swap_records(db, inference, inference + 1), inference),
        "tail cut below a checkpoint": (lambda db: tamper.cut_tail(db, keep), keep + 1),
    }
    for what, (damage, expected_seq) in cases.items():
        db = tmp_path / f"{what.replace(' ', '-')}.db"
        for suffix in ("", "-wal"):
            if Path(f"{source}{suffix}").exists():
                shutil.copy(f"{source}{suffix}", f"{db}{suffix}")
        damage(db)
        report = verify_db(db, public)
        assert not report.ok, what
        assert report.first_bad_seq == expected_seq, (what, report.summary())


def _client_tls(tls: Any, *, with_certificate: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    if with_certificate:
        ctx.load_cert_chain(str(tls.client_cert), str(tls.client_key))
    return ctx


def _tls11_handshake_with_a_permissive_server(client: ssl.SSLContext, tls: Any) -> str | None:
    """The protocol ``client`` agrees with a throwaway server whose floor is TLS 1.0."""
    import threading
    import warnings

    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(tls.cert), str(tls.key))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        server.minimum_version = ssl.TLSVersion.TLSv1
    server.set_ciphers("ALL:@SECLEVEL=0")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)

        def accept() -> None:
            conn, _ = listener.accept()
            with conn, server.wrap_socket(conn, server_side=True):
                pass

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, client.wrap_socket(raw) as tls_sock:
            version = tls_sock.version()
        thread.join(10)
    return version


def test_mutual_tls_serves_https_and_refuses_everything_else(
    minilm_repository: Path, tmp_path: Path, tls_files: Any, tls_factory: Any
) -> None:
    """A real server with ``--tls-cert/--tls-key/--tls-client-ca``: what a client on the network meets."""
    home = tmp_path / "tls-home"
    client = _client_tls(tls_files, with_certificate=True)
    proc, url, log = _start(
        minilm_repository,
        home,
        "--tls-cert",
        str(tls_files.cert),
        "--tls-key",
        str(tls_files.key),
        "--tls-client-ca",
        str(tls_files.ca),
        client_tls=client,
    )
    try:
        assert url.startswith("https://")
        key = (home / "keys" / "first-admin.key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "minilm", "input": ["over an encrypted connection"]}
        ok = httpx.post(f"{url}/v1/embeddings", json=body, headers=headers, timeout=60, verify=client)
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["data"][0]["embedding"]) == 384
        # no client certificate: the handshake (or, with TLS 1.3, the first read) fails
        with pytest.raises(httpx.TransportError):
            httpx.post(
                f"{url}/v1/embeddings",
                json=body,
                headers=headers,
                timeout=10,
                verify=_client_tls(tls_files, with_certificate=False),
            )
        # plain HTTP to the HTTPS port gets no answer
        with pytest.raises(httpx.TransportError):
            httpx.post(url.replace("https://", "http://"), json=body, headers=headers, timeout=10)
        # a client that offers at most TLS 1.1 is refused by the server
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        # control: this client does speak TLS 1.1 to a server that allows it (so a refusal is the server's)
        assert _tls11_handshake_with_a_permissive_server(old, tls_files) == "TLSv1.1"
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, pytest.raises(ssl.SSLError):
            old.wrap_socket(raw).do_handshake()  # the server's alert, or its closing the connection
        # the audit log records what clients were served over, and which certificate
        records = httpx.get(
            f"{url}/v1/audit", params={"event": "service_start"}, headers=headers, timeout=30, verify=client
        ).json()["records"]
        assert records and records[-1]["details"]["transport"] == "mutual-tls"
        from appliance.tls import certificate_info

        assert records[-1]["details"]["tls_cert_sha256"] == certificate_info(tls_files.cert).sha256
        # and who called: the client certificate beside the API key, in the request's own record
        (record,) = httpx.get(
            f"{url}/v1/audit",
            params={"request_id": ok.headers["x-request-id"]},
            headers=headers,
            timeout=30,
            verify=client,
        ).json()["records"]
        client_info = certificate_info(tls_files.client_cert)
        assert record["details"]["client_cert"] == client_info.subject == "CN=client"
        assert record["details"]["client_cert_sha256"] == client_info.sha256
        by_certificate = httpx.get(
            f"{url}/v1/audit",
            params={"client_cert_sha256": client_info.sha256.upper()},
            headers=headers,
            timeout=30,
            verify=client,
        ).json()["records"]
        assert record["seq"] in [r["seq"] for r in by_certificate]
        assert all(r["details"]["client_cert_sha256"] == client_info.sha256 for r in by_certificate)
        # keys bound to a certificate: this client's works, one bound to another certificate does not
        for cert, status in ((tls_files.client_cert, 200), (tls_factory().client_cert, 401)):
            made = CliRunner().invoke(
                main,
                ["keys", "create", "--home", str(home), "--scope", "infer", "--client-cert", str(cert), "--json"],
                catch_exceptions=False,
            )
            assert made.exit_code == 0, made.output
            bound_key = json.loads(made.stdout)["key"]
            answer = httpx.post(
                f"{url}/v1/embeddings",
                json=body,
                headers={"Authorization": f"Bearer {bound_key}"},
                timeout=60,
                verify=client,
            )
            assert answer.status_code == status, answer.text
        assert "bound to a client certificate" in answer.text
        # the operator's load test reaches it too: the private CA verifies it, the client certificate opens it
        key_file = tmp_path / "admin.key"
        key_file.write_text(key)
        load = ["bench", "minilm", "--url", url, "--key-file", str(key_file), "--concurrency", "2", "--duration", "1"]
        untrusted = CliRunner().invoke(main, [*load, "--quick"])
        assert untrusted.exit_code != 0 and "pass --ca-file" in untrusted.output, untrusted.output
        tls_args = ["--ca-file", str(tls_files.ca), "--client-cert", str(tls_files.client_cert)]
        tls_args += ["--client-key", str(tls_files.client_key)]
        loaded = CliRunner().invoke(main, [*load, *tls_args, "--quick", "--json"])
        assert loaded.exit_code == 0, loaded.output
        report = json.loads(loaded.stdout)
        assert report["client"] == "httpx"  # wrk would not verify the server, so it never gets the key
        assert [r["ok"] > 0 and r["errors"] == {} for r in report["rows"]] == [True, True], report["rows"]
        opened = CliRunner().invoke(
            main, [*load[:-4], "--rate", "5", "--duration", "1", *tls_args, "--quick", "--json"]
        )
        assert opened.exit_code == 0, opened.output  # the open loop's own client over the same mutual TLS
        assert [(r["ok"], r["errors"]) for r in json.loads(opened.stdout)["rows"]] == [(5, {}), (5, {})]
    finally:
        _stop(proc)
    assert "HTTPS (mutual-tls)" in log.read_text(errors="replace")


def test_tiny_queue_answers_429_with_retry_after(minilm_repository: Path, tmp_path: Path) -> None:
    home = tmp_path / "tiny-home"
    env = {"INFERBOX_QUEUE_LIMIT": "1", "INFERBOX_MAX_BATCH_SIZE": "1", "INFERBOX_MAX_QUEUE_DELAY_MS": "0"}
    proc, url, log = _start(minilm_repository, home, "--no-auth", "--no-audit", env=env)
    try:
        text = " ".join(["a long text that keeps the single queue slot busy"] * 20)
        together = threading.Barrier(24)  # each thread's first request at once: more than 2 arrive together

        def send(i: int) -> httpx.Response:
            if i < 24:
                together.wait(60)
            return httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": text}, timeout=60)

        with ThreadPoolExecutor(max_workers=24) as pool:
            answers = list(pool.map(send, range(48)))
        codes = [a.status_code for a in answers]
        assert set(codes) <= {200, 429}, codes
        assert 429 in codes and 200 in codes, codes
        refused = next(a for a in answers if a.status_code == 429)
        assert float(refused.headers["retry-after"]) > 0
        assert "queue" in refused.json()["error"]["message"]
        # systemctl reload (SIGHUP) on a plain-HTTP server: said in the log, and it keeps serving
        proc.send_signal(signal.SIGHUP)
        _wait_for_log(log, "no certificate to reload")
        assert proc.poll() is None
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
    finally:
        _stop(proc)


def _wait_for_log(log: Path, text: str) -> None:
    deadline = time.monotonic() + 30
    while text not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{log.read_text(errors='replace')[-3000:]}"
        time.sleep(0.1)  # polling the log, not an assertion


def _presented_certificate(url: str, client: ssl.SSLContext) -> str:
    """SHA-256 of the certificate a new handshake with the server presents."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, client.wrap_socket(raw) as tls_sock:
        der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return hashlib.sha256(der).hexdigest()


def test_sighup_loads_a_renewed_certificate_without_a_restart(
    minilm_repository: Path, tmp_path: Path, tls_files: Any, tls_factory: Any
) -> None:
    cert, key = tls_files.copy_server_pair(tmp_path / "tls")
    home = tmp_path / "reload-home"
    proc, url, log = _start(
        minilm_repository,
        home,
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        client_tls=_client_tls(tls_files, with_certificate=False),
    )
    try:
        anyone = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        anyone.check_hostname = False
        anyone.verify_mode = ssl.CERT_NONE
        from appliance.tls import certificate_info

        assert _presented_certificate(url, anyone) == certificate_info(tls_files.cert).sha256
        renewed = tls_factory(server_days=90)
        shutil.copy(renewed.cert, cert)
        shutil.copy(renewed.key, key)
        proc.send_signal(signal.SIGHUP)
        _wait_for_log(log, "reloaded the certificate")
        assert proc.poll() is None
        assert _presented_certificate(url, anyone) == certificate_info(renewed.cert).sha256
        # the renewed certificate serves requests (checked against its own CA)
        key_text = (home / "keys" / "first-admin.key").read_text().strip()
        headers = {"Authorization": f"Bearer {key_text}"}
        renewed_ca = _client_tls(renewed, with_certificate=False)
        ok = httpx.post(
            f"{url}/v1/embeddings",
            json={"model": "minilm", "input": "x"},
            headers=headers,
            timeout=60,
            verify=renewed_ca,
        )
        assert ok.status_code == 200, ok.text
        (record,) = httpx.get(
            f"{url}/v1/audit", params={"event": "tls_reload"}, headers=headers, timeout=30, verify=renewed_ca
        ).json()["records"]
        assert record["outcome"] == "success"
        assert record["details"]["tls_cert_sha256"] == certificate_info(renewed.cert).sha256
        assert record["details"]["previous_tls_cert_sha256"] == certificate_info(tls_files.cert).sha256
    finally:
        _stop(proc)


def test_unload_load_and_stop_leave_a_clean_exit(minilm_repository: Path, tmp_path: Path) -> None:
    """Unload as soon as the server is ready (its stream sessions may still be opening), load again,
    serve, unload, then SIGTERM: each process exits as a stopped server does. Closing the unloaded
    OpenVINO model from a worker thread made the process die of SIGSEGV at exit."""
    body = {"model": "minilm", "input": "a text"}
    for round_ in ("unload at once", "unload, load, unload"):
        home = tmp_path / round_.replace(" ", "-").replace(",", "")
        proc, url, log = _start(minilm_repository, home, "--no-auth")
        try:
            assert httpx.post(f"{url}/v2/repository/models/minilm/unload", timeout=60).status_code == 200
            assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).status_code == 404
            if round_ != "unload at once":
                assert httpx.post(f"{url}/v2/repository/models/minilm/load", timeout=120).status_code == 200
                assert httpx.post(f"{url}/v1/embeddings", json=body, timeout=60).status_code == 200
                assert httpx.post(f"{url}/v2/repository/models/minilm/unload", timeout=60).status_code == 200
        finally:
            _stop(proc)
        assert proc.returncode in (0, -signal.SIGTERM), (
            round_,
            proc.returncode,
            log.read_text(errors="replace")[-3000:],
        )
        verify = cli("audit", "verify", home=home, repository=minilm_repository)
        assert verify.returncode == 0, verify.stdout + verify.stderr


def test_ctrl_c_stops_the_server_cleanly_with_exit_0(minilm_repository: Path, tmp_path: Path) -> None:
    """uvicorn raises the Ctrl-C again after its clean shutdown: click printed "Aborted!" and exited 1,
    and `make run` ended every session with "make: *** [run] Error 1"."""
    home = tmp_path / "home"
    proc, url, log = _start(minilm_repository, home, "--no-auth", ctrl_c=True)
    try:
        assert httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}, timeout=60).status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    said = log.read_text(errors="replace")
    assert proc.returncode == 0, (proc.returncode, said[-3000:])
    assert "Application shutdown complete" in said and "Aborted!" not in said and "Traceback" not in said, said
    verify = cli("audit", "verify", home=home, repository=minilm_repository)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_metrics_of_several_workers_add_up_whichever_worker_answers(minilm_repository: Path, tmp_path: Path) -> None:
    """``--workers 2``: the kernel hands each connection to either worker, and each counts only its
    own requests; every scrape must still give all of them (before: about half, up and down)."""
    proc, url, log = _start(
        minilm_repository, tmp_path / "metrics-home", "--workers", "2", "--no-auth",
        env={"INFERBOX_HEADER_TIMEOUT_S": "3"},
    )  # fmt: skip
    series = 'inferbox_requests_total{model="minilm",route="/v1/embeddings",status="200"}'

    def scrape() -> dict[str, float]:
        text = httpx.get(f"{url}/metrics", timeout=30).text  # a new connection: either worker answers
        samples = (line.rpartition(" ") for line in text.splitlines() if line and not line.startswith("#"))
        return {k: float(v) for k, _, v in samples}

    try:
        deadline = time.monotonic() + 120
        while scrape().get("inferbox_workers") != 2:  # the second worker may still be loading its model
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)  # polling for start-up, not an assertion
        sent = 40
        for i in range(sent):  # a new connection each: the requests are spread over both workers
            r = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": f"text {i}"}, timeout=60)
            assert r.status_code == 200
        # each worker writes its series every second (off its loop): on a busy box a write can be late,
        # so wait (at most 60 s) for 5 scrapes in a row with every request, then they must stay so
        deadline, in_a_row = time.monotonic() + 60, 0
        while in_a_row < 5:
            assert time.monotonic() < deadline, scrape().get(series)
            in_a_row = in_a_row + 1 if scrape().get(series) == sent else 0
            time.sleep(0.2)  # polling, not an assertion
        for _ in range(8):
            seen = scrape()
            assert seen[series] == sent, seen.get(series)
            assert seen['inferbox_request_duration_seconds_count{route="/v1/embeddings"}'] == sent
            # this scrape (the other worker's snapshot may hold the scrape before: gauges are approximate)
            assert seen["inferbox_workers"] == 2 and seen["inferbox_in_flight_requests"] >= 1
        for _ in range(2):  # whichever worker takes the connections: each has the setting
            assert_header_deadline(url, "3")
    finally:
        _stop(proc)


def test_workers_under_systemd_are_heard_through_the_main_process(minilm_repository: Path, tmp_path: Path) -> None:
    """``--workers 2`` with a Type=notify unit's NotifyAccess=main: READY=1, WATCHDOG=1 and
    STOPPING=1 all come from the process systemd started (uvicorn's supervisor), which relays its
    workers'; a worker writing to systemd's socket itself would be ignored by systemd."""
    import struct

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    path = tmp_path / "systemd.sock"
    sock.bind(str(path))
    heard: list[tuple[int, bytes]] = []

    def listen(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                return
            pid = next(
                struct.unpack("3i", d[:12])[0]
                for level, kind, d in ancdata
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
            )
            heard.append((pid, data))

    # a 10 s watchdog: with 2 s, a worker starved that long on a busy box (two workers loading the model
    # on 2 cores) was killed by the relay, and the request sent to it failed
    env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "10000000"}
    proc, url, _log = _start(minilm_repository, tmp_path / "workers-home", "--workers", "2", "--no-auth", env=env)
    try:
        listen(6.5)  # the workers ping every half interval (5 s); the relay forwards as often
        assert httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}, timeout=60).status_code == 200
    finally:
        _stop(proc)
    listen(2)
    sock.close()
    states = [data for _, data in heard]
    assert {pid for pid, _ in heard} == {proc.pid}, heard
    assert states.count(b"READY=1") == 1 and b"WATCHDOG=1" in states and states[-1] == b"STOPPING=1", states


def test_sigterm_with_a_drain_answers_not_ready_while_it_still_serves(minilm_repository: Path, tmp_path: Path) -> None:
    """The listener closed the moment SIGTERM came: a load balancer that had not yet seen readiness fail
    sent connections into a closed port. With shutdown_drain_s readiness answers 503 first, requests are
    still answered, and only then does the port close (the audit log's clean stop after)."""
    home = tmp_path / "home"
    proc, url, log = _start(minilm_repository, home, "--no-auth", env={"INFERBOX_SHUTDOWN_DRAIN_S": "4"})
    try:
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 3
        while httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200:
            assert time.monotonic() < deadline, "readiness still 200 after SIGTERM"
            time.sleep(0.05)  # polling, not an assertion
        assert httpx.get(f"{url}/v2/health/live", timeout=5).status_code == 200
        served = httpx.post(f"{url}/v1/embeddings", json={"model": "minilm", "input": "x"}, timeout=30)
        assert served.status_code == 200 and proc.poll() is None
        proc.wait(timeout=60)
    finally:
        _stop(proc)
    said = log.read_text(errors="replace")
    assert proc.returncode in (0, -signal.SIGTERM), (proc.returncode, said[-3000:])
    assert "serving 4 s more before the stop (shutdown_drain_s)" in said and "Traceback" not in said, said
    verify = cli("audit", "verify", home=home, repository=minilm_repository)
    assert verify.returncode == 0, verify.stdout + verify.stderr

"""``inferbox bench MODEL --url URL``: the load test an operator runs against the installed server.

A real ``inferbox serve`` (auth and audit on) with the real MiniLM package, and one
with a tensor package; the command is run as a user runs it.  What it reports is
checked against what the server itself counted in ``/metrics``.  (Over mutual TLS:
``test_e2e_serve.test_mutual_tls_serves_https_and_refuses_everything_else``.)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from appliance.cli import main
from tests.test_e2e_serve import Served, _free_port, _start, _stop, cli, serving


@pytest.fixture(scope="module")
def server(minilm_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(minilm_repository, tmp_path_factory.mktemp("bench-remote-home")) as srv:
        yield srv


def bench(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["bench", *args], env={"INFERBOX_API_KEY": "", **(env or {})})


def loaded(result: Result) -> dict[str, Any]:
    assert result.exit_code == 0, result.output
    out: dict[str, Any] = json.loads(result.stdout)
    return out


@pytest.mark.parametrize("client", ["default", "python"])
def test_the_load_test_measures_each_endpoint_and_level_as_the_server_counted_it(
    server: Served, tmp_path: Path, client: str
) -> None:
    """``default``: wrk where it is installed, else httpx; ``python``: httpx (no wrk on PATH)."""
    key_file = tmp_path / "key"
    key_file.write_text(server.key + "\n")
    result = bench(
        "minilm", "--url", server.url + "/", "--key-file", str(key_file), "--concurrency", "1,3",
        "--duration", "1", "--quick", "--json", "--out", str(tmp_path / "out"),
        env={"PATH": str(tmp_path)} if client == "python" else None,
    )  # fmt: skip
    report = loaded(result)
    assert report["client"] == ("wrk" if client == "default" and shutil.which("wrk") else "httpx")
    assert server.key not in result.output  # the key is never printed
    assert report["served_by"]["backend"] in ("ov-cpu", "ort-cpu")
    rows = report["rows"]
    assert [(r["endpoint"], r["concurrency"]) for r in rows] == [
        ("/v1/embeddings", 1),
        ("/v1/embeddings", 3),
        ("/v2/models/minilm/infer", 1),
        ("/v2/models/minilm/infer", 3),
    ]
    for row in rows:
        assert row["errors"] == {} and row["ok"] > 0, row
        assert row["p50_ms"] <= row["p99_ms"]
        # the server's own count of 200s on that route: every answer the client counted, and at
        # most the requests wrk left in flight when its window ended (twice: warm-up and run)
        assert row["ok"] <= row["served"] <= row["ok"] + 2 * row["concurrency"], row
        assert row["batch_rows_mean"] >= 1.0 and row["queue_ms_mean"] >= 0.0, row
        assert row["server_cpu_ms"] > 0, row
        # the server's audit log is on: every answer waited for a commit of one record or more
        assert row["audit_records_per_commit"] >= 1.0 and row["audit_commit_ms"] > 0, row
    # one client has no company in its batches (but for one request wrk may leave in flight)
    assert rows[0]["batch_rows_mean"] <= 1.05, rows[0]
    assert json.loads((tmp_path / "out" / "remote.json").read_text())["rows"] == json.loads(json.dumps(rows))


def test_the_open_loop_reports_latency_at_a_given_load(server: Served) -> None:
    result = bench(
        "minilm", "--url", server.url, "--rate", "10,20", "--duration", "1", "--quick", "--json",
        env={"INFERBOX_API_KEY": server.key},
    )  # fmt: skip
    report = loaded(result)
    assert report["client"] == "open loop" and server.key not in result.output
    rows = report["rows"]
    assert [(r["endpoint"], r["rate"]) for r in rows] == [
        ("/v1/embeddings", 10.0),
        ("/v1/embeddings", 20.0),
        ("/v2/models/minilm/infer", 10.0),
        ("/v2/models/minilm/infer", 20.0),
    ]
    for row in rows:
        assert row["errors"] == {} and row["dropped"] == 0, row
        assert row["ok"] == row["scheduled"] == row["rate"], row  # one second of the schedule, all answered
        # the open loop waits for every answer before the scrape after it: the server's count is exact
        assert row["served"] == row["ok"], row
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"], row
        assert row["client_cpu_ms"] > 0 and row["connections"] >= 1, row


def test_the_open_loop_sends_poisson_arrivals_when_asked(server: Served) -> None:
    result = bench(
        "minilm", "--url", server.url, "--rate", "20", "--arrivals", "poisson", "--endpoint", "v1",
        "--duration", "1", "--quick", "--json", env={"INFERBOX_API_KEY": server.key},
    )  # fmt: skip
    report = loaded(result)
    assert (report["client"], report["arrivals"]) == ("open loop, poisson arrivals", "poisson")
    (row,) = report["rows"]
    assert row["arrivals"] == "poisson" and row["errors"] == {} and row["dropped"] == 0, row
    assert row["ok"] == row["scheduled"] == 20 and row["served"] == row["ok"], row


def test_a_p99_target_judges_each_rate_and_fails_the_run_that_misses_it(server: Served) -> None:
    env = {"INFERBOX_API_KEY": server.key}
    kept = loaded(bench("minilm", "--url", server.url, "--rate", "5", "--p99-ms", "60000", "--endpoint", "v1", "--duration", "1", "--quick", "--json", env=env))  # fmt: skip
    assert kept["p99_target_ms"] == 60000 and "capacity" not in kept and kept["endpoint"] == "v1"
    assert [(r["endpoint"], r["meets"]) for r in kept["rows"]] == [("/v1/embeddings", True)]
    assert "missed" not in kept["rows"][0] and kept["rows"][0]["served"] == kept["rows"][0]["ok"] == 5
    missed = bench("minilm", "--url", server.url, "--rate", "5", "--p99-ms", "0.001", "--duration", "1", "--quick", env=env)  # fmt: skip
    stopped(missed, "the p99 target of 0.001 ms was missed: /v1/embeddings 5/s: p99 ", code=1)
    assert "/v2/models/minilm/infer 5/s: p99 " in missed.output and "meets" in missed.output


def test_the_capacity_search_finds_the_highest_rate_that_keeps_the_target(server: Served, tmp_path: Path) -> None:
    env = {"INFERBOX_API_KEY": server.key}
    # a target any rate keeps, and a ceiling: one window and its confirmation per endpoint
    report = loaded(
        bench(
            "minilm", "--url", server.url, "--p99-ms", "60000", "--max-rate", "8", "--duration", "1", "--quick",
            "--json", "--out", str(tmp_path),
            env=env,
        )
    )  # fmt: skip
    assert report["client"] == "open loop" and report["max_rate"] == 8
    assert [(f["endpoint"], f["rate"], f["at_max_rate"], f["confirmed"]) for f in report["capacity"]] == [
        ("/v1/embeddings", 8.0, True, True),
        ("/v2/models/minilm/infer", 8.0, True, True),
    ]
    rows = report["rows"]
    assert [(r["endpoint"], r["rate"], r.get("confirming", False)) for r in rows] == [
        ("/v1/embeddings", 8.0, False),
        ("/v1/embeddings", 8.0, True),
        ("/v2/models/minilm/infer", 8.0, False),
        ("/v2/models/minilm/infer", 8.0, True),
    ]
    for row in rows:
        assert row["meets"] and row["errors"] == {} and row["served"] == row["ok"] == 8, row
    assert json.loads((tmp_path / "remote.json").read_text())["capacity"] == report["capacity"]
    # a target no rate keeps: down to 1/s, then a failure naming why, and the table all the same
    none = bench("minilm", "--url", server.url, "--p99-ms", "0.001", "--max-rate", "4", "--endpoint", "v2", "--duration", "1", "--quick", env=env)  # fmt: skip
    stopped(none, "/v2/models/minilm/infer: no rate from 1/s up met p99 <= 0.001 ms twice (at 1/s: p99 ", code=1)
    assert "/v1/embeddings" not in none.output  # --endpoint v2: that one only
    assert none.output.count("/v2/models/minilm/infer 4/s") == 1 and "/v2/models/minilm/infer 1/s" in none.output


def test_the_load_test_sends_the_operators_own_texts(server: Served, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    mine = ["first customer text", "second customer text, a little longer than the first"]
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{mine[0]}\n\n   \n{mine[1]}\n")
    tokenizer = Tokenizer.from_file(str(server.repository / "minilm" / "1" / "tokenizer" / "tokenizer.json"))
    tokenizer.no_padding()
    lengths = {str(len(e.ids)) for e in tokenizer.encode_batch(mine)}
    last = _records_after(server, 0)[-1]["seq"]
    report = loaded(
        bench(
            "minilm",
            "--url",
            server.url,
            "--concurrency",
            "2",
            "--duration",
            "1",
            "--quick",
            "--json",
            "--texts",
            str(texts),
            env={"INFERBOX_API_KEY": server.key},
        )
    )
    # the audit records (no payload, but the token count) of every /v1/embeddings request (the load's,
    # its probe's and its warm-up's): one of the two texts, and nothing else
    assert report["rows"][0]["served"] > 0
    # (a request still in flight when the run ended was abandoned by the client: recorded 499, no count)
    records = [r for r in _records_after(server, last) if r["action"] == "POST /v1/embeddings"]
    embedded = [r for r in records if r["status"] == 200]
    assert {r["details"]["tokens"] for r in embedded} == lengths
    assert {r["status"] for r in records} <= {200, 499}, records


def test_a_client_that_batches_sends_that_many_texts_a_request(server: Served, tmp_path: Path) -> None:
    """``--batch-size 3`` with two texts of the operator's: every request carries three (the list
    wraps round), as the server's audit records say.  (Its batches are no proof: the batcher
    may split a request's texts between length buckets.)"""
    texts = tmp_path / "texts.txt"
    texts.write_text("first customer text\nsecond customer text, a little longer than the first\n")
    last = _records_after(server, 0)[-1]["seq"]
    result = bench(
        "minilm", "--url", server.url, "--concurrency", "2", "--duration", "1", "--quick", "--json",
        "--texts", str(texts), "--batch-size", "3", env={"INFERBOX_API_KEY": server.key},
    )  # fmt: skip
    report = loaded(result)
    assert report["per_request"] == 3
    for row in report["rows"]:
        assert row["errors"] == {} and row["ok"] > 0 and (row["per_request"], row["unit"]) == (3, "texts"), row
        assert row["items_per_s"] == pytest.approx(3 * row["rps"]), row
    # (the requests still in flight when the run ends are abandoned by the client: recorded 499, no count)
    records = [r for r in _records_after(server, last) if r["action"] == "POST /v1/embeddings"]
    embedded = [r for r in records if r["status"] == 200]
    assert embedded and {r["details"]["inputs"] for r in embedded} == {"3"}
    assert {r["status"] for r in records} <= {200, 499}, records
    # more texts a request than the server takes: its own message, before any load
    refused = bench("minilm", "--url", server.url, "--batch-size", "2100", "--duration", "1", "--quick",
                    env={"INFERBOX_API_KEY": server.key})  # fmt: skip
    assert refused.exit_code != 0 and "over the limit of 2048" in refused.output, refused.output


def _records_after(server: Served, seq: int) -> list[dict[str, Any]]:
    """Every audit record after ``seq``, page by page."""
    out: list[dict[str, Any]] = []
    while True:
        page = httpx.get(
            f"{server.url}/v1/audit", params={"after_seq": seq, "limit": 1000}, headers=server.headers(), timeout=60
        ).json()
        out += page["records"]
        if page["next_after_seq"] is None:
            return out
        seq = page["next_after_seq"]


def stopped(result: Result, message: str, code: int = 2) -> None:
    """The command stopped with ``code`` and ``message``, and no exception reached the user."""
    assert result.exit_code == code and isinstance(result.exception, SystemExit), result.output
    assert message in result.output, result.output


def test_the_load_test_names_the_fix_when_it_cannot_run(server: Served, tmp_path: Path) -> None:
    wrong_key = "ibx_000000000000_" + "x" * 43
    refused = bench("minilm", "--url", server.url, "--quick", env={"INFERBOX_API_KEY": wrong_key})
    stopped(refused, "the server refused the key")
    assert "--key-file" in refused.output
    stopped(bench("minilm", "--url", server.url, "--quick"), "the server needs an API key")
    unknown = bench("nosuch", "--url", server.url, "--quick", env={"INFERBOX_API_KEY": server.key})
    stopped(unknown, "does not serve model 'nosuch'")
    port = _free_port()
    stopped(bench("minilm", "--url", f"http://127.0.0.1:{port}", "--quick"), f"cannot reach http://127.0.0.1:{port}")
    # a key that is not one key (two keys, a line break): named by where it came from, never printed
    two_keys = tmp_path / "two-keys"
    two_keys.write_text(f"{server.key}\n{server.key}\n")
    for result in (
        bench("minilm", "--url", server.url, "--key-file", str(two_keys)),
        bench("minilm", "--url", server.url, env={"INFERBOX_API_KEY": f"{server.key}\n{server.key}"}),
        bench("minilm", "--url", server.url, env={"INFERBOX_API_KEY": f"{server.key}\u00e9"}),
    ):
        stopped(result, "must hold one API key")
        assert server.key not in result.output
    bom = tmp_path / "bom.key"
    bom.write_bytes(b"\xef\xbb\xbf" + server.key.encode() + b"\r\n")  # a key file saved by a Windows editor
    loaded(
        bench(
            "minilm",
            "--url",
            server.url,
            "--key-file",
            str(bom),
            "--concurrency",
            "1",
            "--duration",
            "1",
            "--quick",
            "--json",
        )
    )
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate")
    for args, message in (
        (("--url", "ftp://127.0.0.1:1"), "give the server's base URL"),
        (("--url", "http://127.0.0.1:port"), "give the server's base URL"),
        (("--url", "http://[::1"), "give the server's base URL"),
        (("--url", server.url + "/prefix"), "with no path, user or password"),
        (("--url", server.url.replace("://", "://user:secret@")), "with no path, user or password"),
        (("--url", server.url, "--concurrency", "0,8"), "client counts from 1 to 1024"),
        (("--url", server.url, "--rate", "0"), "requests per second from 0.1"),
        (("--url", server.url, "--rate", "5", "--concurrency", "2"), "two ways; give one"),
        (("--rate", "5"), "--rate goes with --url"),
        (("--url", server.url, "--home", str(tmp_path)), "--home / --repository pick a local package"),
        (("--url", server.url, "--concurrency", ""), "client counts from 1 to 1024"),
        (("--url", "http://b\u00fccher..example:8080"), "give the server's base URL"),
        (("--url", server.url, "--duration", "0"), "--duration"),
        (("--url", server.url, "--with-pytorch"), "does not go with --url"),
        (("--url", server.url, "--ca-file", str(two_keys)), "need an https:// --url"),
        (("--url", server.url.replace("http://", "https://"), "--client-key", str(cert)), "--client-key goes with"),
        (("--concurrency", "4"), "goes with --url"),
        (("--texts", str(two_keys)), "--texts goes with --url"),
        (("--p99-ms", "100"), "--p99-ms goes with --url"),
        (("--url", server.url, "--p99-ms", "100", "--concurrency", "8"), "--p99-ms is judged on the open loop"),
        (("--url", server.url, "--max-rate", "100"), "--max-rate bounds the capacity search"),
        (("--url", server.url, "--p99-ms", "100", "--rate", "5", "--max-rate", "9"), "--max-rate bounds the"),
        (("--url", server.url, "--p99-ms", "0"), "--p99-ms"),
        (("--url", server.url, "--p99-ms", "nan"), "give a finite number"),
        (("--endpoint", "v1"), "--endpoint goes with --url"),
        (("--url", server.url, "--endpoint", "v3"), "'v3' is not one of 'v1', 'v2'"),
        (("--url", server.url, "--p99-ms", "100", "--max-rate", "nan"), "give a finite number"),
        (("--batch-size", "4"), "--batch-size goes with --url"),
        (("--arrivals", "poisson"), "--arrivals goes with --url"),
        (("--url", server.url, "--arrivals", "poisson"), "--arrivals shapes the open loop"),
        (("--url", server.url, "--rate", "5", "--arrivals", "bursty"), "'bursty' is not one of 'constant', 'poisson'"),
        (("--url", server.url, "--batch-size", "0"), "--batch-size"),
    ):
        stopped(bench("minilm", *args), message)
    slow = bench(
        "minilm", "--url", server.url, "--rate", "0.2", "--duration", "2", env={"INFERBOX_API_KEY": server.key}
    )
    stopped(slow, "no request would be due in 2 s")
    https = server.url.replace("http://", "https://")
    stopped(
        bench("minilm", "--url", https, "--client-cert", str(cert)), "--client-cert / --client-key: cannot use them"
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    nothing = bench("minilm", "--url", server.url, "--texts", str(empty), env={"INFERBOX_API_KEY": server.key})
    stopped(nothing, "holds no text")


def test_the_key_variable_leaves_the_other_commands_working(tmp_path: Path) -> None:
    """``INFERBOX_API_KEY`` is for the load test; every other command reads the settings beside it."""
    shown = CliRunner().invoke(
        main, ["config", "--home", str(tmp_path)], env={"INFERBOX_API_KEY": "ibx_000000000000_" + "x" * 43}
    )
    assert shown.exit_code == 0, shown.output
    assert "ibx_000000000000" not in shown.output
    wrong = CliRunner().invoke(main, ["config", "--home", str(tmp_path)], env={"INFERBOX_API_KYE": "x"})
    stopped(wrong, "INFERBOX_API_KYE is not an inferbox setting")


def test_the_load_test_of_a_tensor_model_sends_rows_its_metadata_describes(tmp_path: Path) -> None:
    from tests.appliance.test_models_cli import publish

    home = tmp_path / "tensor-home"
    made = cli("signing-key", "create", home=home, repository=home / "models")
    assert made.returncode == 0, made.stderr
    publish(home)
    proc, url, _log = _start(home / "models", home, "--no-auth")
    try:
        report = loaded(bench("mlp", "--url", url, "--concurrency", "2", "--duration", "1", "--quick", "--json"))
        (row,) = report["rows"]
        assert row["endpoint"] == "/v2/models/mlp/infer" and row["errors"] == {} and row["ok"] > 0, row
        assert row["ok"] <= row["served"] <= row["ok"] + 4, row
        # a client that batches: four rows a request, as the server counted them in its batches
        report = loaded(bench("mlp", "--url", url, "--concurrency", "2", "--duration", "1", "--quick", "--json",
                              "--batch-size", "4"))  # fmt: skip
        (row,) = report["rows"]
        assert (
            row["errors"] == {} and (row["per_request"], row["unit"]) == (4, "rows") and row["batch_rows_mean"] >= 4.0
        ), row
        texts = tmp_path / "texts.txt"
        texts.write_text("a text\n")
        stopped(bench("mlp", "--url", url, "--texts", str(texts)), "takes tensors, not text")
        stopped(bench("mlp", "--url", url, "--endpoint", "v1"), "model 'mlp' is served on /v2/models/mlp/infer only")
    finally:
        _stop(proc)

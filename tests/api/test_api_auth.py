"""API keys on the wire: 401 / 403 / 429 with a real KeyStore on SQLite, and the audit trail."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from api.auth import RateLimiter
from appliance.keys import KeyStore

from .conftest import MemoryAudit, infer_json

X = np.zeros((1, 4), dtype=np.float32)
IDS = np.zeros((1, 3), dtype=np.int64)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 6, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Any:
    s = KeyStore(tmp_path / "state.db", clock=clock)
    yield s
    s.close()


def _h(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_missing_wrong_revoked_expired_are_401(
    client_factory: Any, store: KeyStore, clock: Clock, audit: MemoryAudit
) -> None:
    c = client_factory(keys=store)
    _, good = store.create(["infer"])
    _, soon = store.create(["infer"], expires=clock.now + timedelta(hours=1))
    revoked_rec, revoked = store.create(["infer"])
    store.revoke(revoked_rec.id)
    assert c.get("/v2/models/tabular", headers=_h(good)).status_code == 200
    assert c.get("/v2/models/tabular", headers=_h(soon)).status_code == 200
    clock.now += timedelta(hours=2)
    tampered = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    cases = {
        "missing": {},
        "not bearer": {"Authorization": f"Basic {good}"},
        "wrong": _h(tampered),
        "garbage": _h("ibx_nothing"),
        "revoked": _h(revoked),
        "expired": _h(soon),
    }
    for what, headers in cases.items():
        r = c.get("/v2/models/tabular", headers=headers)
        assert r.status_code == 401, what
        assert r.headers["www-authenticate"].startswith("Bearer"), what
        assert "error" in r.json(), what
    assert "revoked" in c.get("/v2", headers=_h(revoked)).json()["error"]
    assert "expired" in c.get("/v2", headers=_h(soon)).json()["error"]
    r = c.post("/v1/embeddings", json={"input": "x", "model": "minilm"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    failures = [e for e in audit.events if e.event == "auth_failure"]
    assert len(failures) == 9
    assert all(e.outcome == "failure" and e.status == 401 for e in failures)
    assert good not in repr(audit.events) and soon not in repr(audit.events)


def test_two_authorization_headers_are_refused_whichever_comes_first(
    client_factory: Any, store: KeyStore, audit: MemoryAudit
) -> None:
    """The first of two Authorization headers was checked and the other ignored: a valid key then
    garbage was let in, garbage then the valid key was not (a proxy adding its own key decided).
    The test client joins the two into one line (``Bearer a, Bearer b``), which no key matches;
    uvicorn hands them over apart (tests/test_e2e_serve.py sends them so)."""
    from litestar.datastructures import Headers

    from api.auth import authorization_of
    from runtime.errors import AuthError

    def headers(*values: bytes) -> Headers:
        return Headers.from_scope({"type": "http", "headers": [(b"authorization", v) for v in values]})  # type: ignore[arg-type]

    assert authorization_of(headers()) is None
    assert authorization_of(headers(b"Bearer a")) == "Bearer a"
    for pair in ((b"Bearer a", b"Bearer b"), (b"Bearer a", b"Bearer a")):
        with pytest.raises(AuthError, match="sent 2 times"):
            authorization_of(headers(*pair))
    c = client_factory(keys=store)
    _, good = store.create(["infer"])
    for pair in ([good, "ibx_nothing"], ["ibx_nothing", good]):
        r = c.get("/v2/models/tabular", headers=[("Authorization", f"Bearer {key}") for key in pair])
        assert r.status_code == 401 and audit.events[-1].event == "auth_failure", (pair, r.text)
    assert c.get("/v2/models/tabular", headers=_h(good)).status_code == 200


def test_scopes_403(client_factory: Any, store: KeyStore) -> None:
    c = client_factory(keys=store)
    _, only_minilm = store.create(["infer:minilm"])
    _, admin = store.create(["models:admin"])
    _, audit_reader = store.create(["audit:read"])
    body = infer_json({"x": X, "ids": IDS})
    assert c.post("/v2/models/tabular/infer", json=body, headers=_h(only_minilm)).status_code == 403
    r = c.post("/v1/embeddings", json={"input": "x", "model": "minilm"}, headers=_h(only_minilm))
    assert r.status_code == 200
    _, only_tabular = store.create(["infer:tabular"])
    r = c.post("/v1/embeddings", json={"input": "x", "model": "minilm"}, headers=_h(only_tabular))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"
    # a model the key may not use: 403 whether it is loaded or not, never a list of what is loaded
    r = c.post("/v1/embeddings", json={"input": "x", "model": "ghost"}, headers=_h(only_tabular))
    assert r.status_code == 403 and "minilm" not in r.text
    assert c.post("/v2/models/ghost/infer", json=body, headers=_h(only_tabular)).status_code == 403
    assert c.post("/v2/models/tabular/infer", json=body, headers=_h(admin)).status_code == 403
    assert c.post("/v2/repository/index", headers=_h(only_minilm)).status_code == 403
    assert c.post("/v2/repository/index", headers=_h(admin)).status_code == 200
    assert c.get("/v2", headers=_h(audit_reader)).status_code == 403
    r = c.get("/v1/models", headers=_h(audit_reader))
    assert r.status_code == 403 and "www-authenticate" not in r.headers
    # /v1/models lists only the models a key may use (metadata of the others is a 403 too)
    listed = {m["id"] for m in c.get("/v1/models", headers=_h(only_tabular)).json()["data"]}
    assert listed == {"tabular"}
    assert c.get("/v2/models/minilm", headers=_h(only_tabular)).status_code == 403
    _, everything = store.create(["infer"])
    assert {m["id"] for m in c.get("/v1/models", headers=_h(everything)).json()["data"]} >= {"tabular", "minilm"}


def test_open_routes_need_no_key(client_factory: Any, store: KeyStore) -> None:
    c = client_factory(keys=store)
    assert c.get("/v2/health/live").status_code == 200
    assert c.get("/v2/health/ready").status_code == 200
    assert c.get("/metrics").status_code == 200
    assert c.get("/v2").status_code == 401


def test_rate_limit_per_key_not_per_header(client_factory: Any, store: KeyStore) -> None:
    t = [1000.0]
    c = client_factory(keys=store, rate_limit_per_minute=2, clock=lambda: t[0])
    _, a = store.create(["infer"])
    _, b = store.create(["infer"])
    assert c.get("/v2", headers=_h(a)).status_code == 200
    assert c.get("/v2", headers={**_h(a), "X-Forwarded-For": "10.0.0.9"}).status_code == 200
    r = c.get("/v2", headers={**_h(a), "X-Forwarded-For": "10.0.0.10"})
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert c.get("/v2", headers=_h(b)).status_code == 200  # another key has its own bucket
    t[0] += 30.0  # one token back after half a minute at 2/min
    assert c.get("/v2", headers=_h(a)).status_code == 200
    assert c.get("/v2", headers=_h(a)).status_code == 429


def test_per_key_rate_limit_overrides_default(client_factory: Any, store: KeyStore) -> None:
    c = client_factory(keys=store, rate_limit_per_minute=0, clock=lambda: 5.0)
    _, k = store.create(["infer"], rate_limit_per_minute=1)
    assert c.get("/v2", headers=_h(k)).status_code == 200
    assert c.get("/v2", headers=_h(k)).status_code == 429


def test_auth_on_without_a_key_store_is_refused() -> None:
    from api.app import create_app
    from api.config import ApiConfig
    from runtime.errors import ConfigError

    from .conftest import make_registry

    with pytest.raises(ConfigError, match="key store"):
        create_app(registry=make_registry([]), config=ApiConfig(auth=True), audit=None, keys=None)


def test_audit_records_actor_and_model(client_factory: Any, store: KeyStore, audit: MemoryAudit) -> None:
    c = client_factory(keys=store)
    rec, key = store.create(["infer"])
    r = c.post("/v2/models/tabular/infer", json=infer_json({"x": X, "ids": IDS}), headers=_h(key))
    assert r.status_code == 200
    event = audit.events[-1]
    assert event.event == "inference" and event.actor == rec.id and event.credential_id == rec.id
    assert event.model_name == "tabular" and event.model_version == "1" and len(event.model_sha256) == 64
    assert event.backend == "fake" and event.variant == "onnx-fp32"
    assert event.input_digest == audit.digest(r.request.content).hexdigest
    assert event.output_digest == audit.digest(r.content).hexdigest
    assert event.request_id == r.headers["x-request-id"]


def test_a_refused_inference_is_recorded_as_one_and_without_a_digest_of_a_body_never_read(
    client_factory: Any, store: KeyStore, audit: MemoryAudit
) -> None:
    """A request refused before its body was read recorded the digest of b"" (as if it had sent nothing:
    an auditor holding the real input would conclude it never came), and one refused by the rate limit
    was recorded as a metadata read with no model (missed by ?event=inference)."""
    c = client_factory(keys=store)
    _, key = store.create(["infer"], rate_limit_per_minute=1)
    body = infer_json({"x": X, "ids": IDS})
    assert c.post("/v2/models/tabular/infer", json=body, headers=_h(key)).status_code == 200
    ok = audit.events[-1]
    assert ok.event == "inference" and ok.input_digest and ok.input_digest != audit.digest(b"").hexdigest
    r = c.post("/v2/models/tabular/infer", json=body, headers=_h(key))
    assert r.status_code == 429
    limited = audit.events[-1]
    assert limited.event == "inference" and limited.outcome == "failure" and limited.model_name == "tabular"
    assert limited.input_digest == "" and limited.output_digest == audit.digest(r.content).hexdigest
    assert limited.digest_key_id  # the output's digest key
    r = c.post("/v1/embeddings", json={"model": "minilm", "input": ["hello"]}, headers=_h("ib_not-a-key"))
    assert r.status_code == 401
    refused = audit.events[-1]
    assert refused.event == "auth_failure" and refused.input_digest == ""


def test_a_path_no_route_matches_records_the_key_that_asked(
    client_factory: Any, store: KeyStore, audit: MemoryAudit
) -> None:
    """No guard runs for an unknown path, so its record said `anonymous` whether a valid key, a
    revoked key or none came with it (review 14)."""
    c = client_factory(keys=store)
    good_rec, good = store.create(["infer"])
    gone_rec, gone = store.create(["infer"])
    store.revoke(gone_rec.id)
    for headers in (_h(good), _h(gone), {}):
        r = c.get("/v2/modelz/tabular", headers=headers)
        assert r.status_code == 404
        assert r.json()["error"] == "no route GET /v2/modelz/tabular; docs/api.md lists the routes"
    valid, revoked, none = audit.events[-3:]
    assert valid.actor == valid.credential_id == good_rec.id and valid.status == 404
    assert revoked.actor == "anonymous" and revoked.details["refused_key_id"] == gone_rec.id
    assert none.actor == "anonymous" and "refused_key_id" not in none.details
    # a method the path does not take is the same case (own review 14: recorded as anonymous)
    r = c.get("/v1/embeddings", headers=_h(good))
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert r.json()["error"]["message"].startswith("/v1/embeddings does not take GET; it takes POST")
    assert audit.events[-1].actor == good_rec.id and audit.events[-1].status == 405


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("post", "/v2/repository/models/tabular/load", "models:admin"),
        ("post", "/v2/repository/models/tabular/unload", "models:admin"),
        ("post", "/v2/repository/index", "models:admin"),
        ("get", "/v1/audit", "audit:read"),
    ],
)
def test_an_inference_key_is_refused_on_admin_routes(
    client_factory: Any, store: KeyStore, method: str, path: str, scope: str
) -> None:
    c = client_factory(keys=store)
    _, infer_key = store.create(["infer"])
    r = getattr(c, method)(path, headers={"Authorization": f"Bearer {infer_key}"})
    assert r.status_code == 403, (r.status_code, r.text)
    assert scope in r.text


def test_the_wall_clock_stepping_back_locks_no_key_out(tmp_path: Path, store: KeyStore) -> None:
    # NTP or a restored VM steps the wall clock back an hour: the rate limit counts with the
    # monotonic clock (before: Retry-After 3,630 s for a key that had used its 2 a minute)
    from litestar.testing import TestClient

    from api.app import create_app
    from api.config import ApiConfig

    from .conftest import make_registry, tensor_model

    wall = [1_000_000.0]
    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]),
        config=ApiConfig(rate_limit_per_minute=2),
        audit=None,
        keys=store,
        clock=lambda: wall[0],
    )
    _, key = store.create(["infer"])
    with TestClient(app) as c:
        assert [c.get("/v2/models/tabular", headers=_h(key)).status_code for _ in range(2)] == [200, 200]
        wall[0] -= 3600
        r = c.get("/v2/models/tabular", headers=_h(key))
        assert r.status_code == 429 and float(r.headers["retry-after"]) <= 31, r.headers
    limiter = RateLimiter(lambda: wall[0])
    limiter.take("k", 60)
    wall[0] -= 3600
    limiter.take("k", 60)  # a limiter given a clock that steps back refills nothing, takes nothing more


def test_a_request_during_which_the_wall_clock_steps_back_lasts_what_it_lasted(tmp_path: Path) -> None:
    # its duration counts with the monotonic clock: the wall clock stepping back an hour mid-request
    # made /metrics' duration sum -3600, which Prometheus takes for a counter reset
    from litestar.testing import TestClient

    from api.app import create_app
    from api.config import ApiConfig

    from .conftest import make_registry, tensor_model

    readings = iter([1_000_000.0])
    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]),
        config=ApiConfig(auth=False),
        audit=None,
        keys=None,
        clock=lambda: next(readings, 1_000_000.0 - 3600),
    )
    with TestClient(app) as c:
        assert c.get("/v2/models/tabular").status_code == 200
        text = c.get("/metrics").text
    sums = [
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("inferbox_request_duration_seconds_sum")
    ]
    assert sums and all(0 <= s < 60 for s in sums), sums


def test_a_key_for_a_model_that_is_not_loaded_learns_nothing_of_the_loaded_ones(
    client_factory: Any, store: KeyStore
) -> None:
    """The scope passes (the key may use "ghost"), then the 404 listed every loaded model."""
    c = client_factory(keys=store)
    _, only_ghost = store.create(["infer:ghost"])
    _, every = store.create(["infer"])
    for key in (only_ghost, every):
        embed = c.post("/v1/embeddings", json={"input": "x", "model": "ghost"}, headers=_h(key))
        meta = c.get("/v2/models/ghost", headers=_h(key))
        assert embed.status_code == meta.status_code == 404
        assert "model 'ghost' is not loaded" in embed.json()["error"]["message"]
        listed = "loaded models: ['minilm'" in embed.text and "minilm" in meta.text
        assert listed is (key == every), (key == every, embed.text, meta.text)


def test_openais_retrieve_model_answers_one_card_a_key_may_use(client_factory: Any, store: KeyStore) -> None:
    """`client.models.retrieve(name)` got "no route GET /v1/models/minilm"."""
    c = client_factory(keys=store)
    _, every = store.create(["infer"])
    _, only_tabular = store.create(["infer:tabular"])
    card = c.get("/v1/models/minilm", headers=_h(every))
    assert card.status_code == 200, card.text
    assert card.json() == {"id": "minilm", "object": "model", "created": card.json()["created"], "owned_by": "inferbox"}
    assert card.json() in c.get("/v1/models", headers=_h(every)).json()["data"]
    assert c.get("/v1/models/minilm", headers=_h(only_tabular)).status_code == 403
    missing = c.get("/v1/models/ghost", headers=_h(every))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_input_digest_is_of_the_body_the_application_wrote(client_factory: Any, audit: MemoryAudit) -> None:
    """A gzipped body's digest was of the gzip bytes, whose header holds a time: the same body sent
    twice had two digests, and neither matched the application's own (uncompressed) copy."""
    import gzip

    c = client_factory()
    body = b'{"model": "minilm", "input": "Jane Roe"}'
    digests = []
    for mtime in (1, 2):
        r = c.post("/v1/embeddings", content=gzip.compress(body, mtime=mtime), headers={"Content-Encoding": "gzip"})
        assert r.status_code == 200, r.text
        digests.append(audit.events[-1].input_digest)
    assert c.post("/v1/embeddings", content=body).status_code == 200
    digests.append(audit.events[-1].input_digest)
    assert digests == [audit.digest(body).hexdigest] * 3
    # a body that does not inflate: the digest is of what arrived
    r = c.post("/v1/embeddings", content=b"junk", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400 and audit.events[-1].input_digest == audit.digest(b"junk").hexdigest


def test_a_keys_rate_limit_and_a_full_queue_are_told_apart(
    client_factory: Any, store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both answered 429 rate_limit_exceeded: a client could not tell whether to slow its own key down
    or to back off from a busy server without parsing the message."""
    from api.server import Server
    from runtime.errors import OverloadError

    t = [1000.0]
    c = client_factory(keys=store, rate_limit_per_minute=1, clock=lambda: t[0])
    _, a = store.create(["infer"])
    assert c.get("/v1/models", headers=_h(a)).status_code == 200
    limited = c.get("/v1/models", headers=_h(a))
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"

    async def full(*args: Any, **kwargs: Any) -> Any:
        raise OverloadError("the queue of model 'minilm' is full", retry_after=2.0)

    monkeypatch.setattr(Server, "embed_texts", full)
    _, b = store.create(["infer"])
    t[0] += 120.0
    busy = c.post("/v1/embeddings", headers=_h(b), json={"model": "minilm", "input": ["a"]})
    assert busy.status_code == 429 and busy.json()["error"]["code"] == "server_busy", busy.text
    assert busy.headers["retry-after"] == "2"
    # and /metrics tells them apart (one requests_total{status="429"} series held both)
    lines = c.get("/metrics").text.splitlines()
    assert 'inferbox_refused_requests_total{code="rate_limit_exceeded"} 1' in lines
    assert 'inferbox_refused_requests_total{code="server_busy"} 1' in lines


def test_a_keys_tokens_per_minute_limit_counts_the_tokens_its_texts_bring(
    client_factory: Any, store: KeyStore, audit: MemoryAudit
) -> None:
    """The rate limit counted requests: one key's 2,048 long texts a request starved every other key's
    single queries at the same limit. A key (or the server's default) may now be held to tokens a minute,
    counted as the model tokenizes its texts (what usage.prompt_tokens reports)."""
    skew = [0.0]  # a clock that runs (the batcher waits by it), stepped a minute on below
    c = client_factory(keys=store, tokens_per_minute=0, clock=lambda: time.monotonic() + skew[0])
    _, big = store.create(["infer"])  # no limit: the server's default is none
    one = c.post("/v1/embeddings", headers=_h(big), json={"model": "minilm", "input": ["a few words here"]})
    assert one.status_code == 200
    tokens = one.json()["usage"]["prompt_tokens"]
    assert tokens >= 3
    _, key = store.create(["infer"], tokens_per_minute=3 * tokens)
    body = {"model": "minilm", "input": ["a few words here", "a few words here"]}
    assert c.post("/v1/embeddings", headers=_h(key), json=body).status_code == 200  # 2 of 3 texts' worth
    limited = c.post("/v1/embeddings", headers=_h(key), json=body)  # 4 > 3 left: nothing taken, nothing run
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert f"{3 * tokens} tokens per minute" in limited.json()["error"]["message"]
    assert int(limited.headers["retry-after"]) >= 1
    one_text = {"model": "minilm", "input": ["a few words here"]}
    assert c.post("/v1/embeddings", headers=_h(key), json=one_text).status_code == 200  # the third fits
    # the KServe text route and rerank draw on the same bucket; a minute refills it
    kserve = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a few words here"]}]}
    assert c.post("/v2/models/minilm/infer", headers=_h(key), json=kserve).status_code == 429
    skew[0] += 60.0
    assert c.post("/v2/models/minilm/infer", headers=_h(key), json=kserve).status_code == 200
    # more than a minute's worth in one request can never pass: a 400 naming the field, not a 429 to retry
    never = c.post("/v1/embeddings", headers=_h(key), json={"model": "minilm", "input": ["a few words here"] * 4})
    assert never.status_code == 400 and never.json()["error"]["param"] == "input"
    assert "send fewer or shorter texts" in never.json()["error"]["message"]
    # another key has its own bucket; requests without texts are not charged
    assert c.post("/v1/embeddings", headers=_h(big), json=body).status_code == 200
    assert c.get("/v1/models", headers=_h(key)).status_code == 200


def test_the_servers_tokens_per_minute_holds_keys_without_their_own(client_factory: Any, store: KeyStore) -> None:
    c = client_factory(keys=store, tokens_per_minute=1)
    _, key = store.create(["infer"])
    r = c.post("/v1/embeddings", headers=_h(key), json={"model": "minilm", "input": ["hello"]})
    assert r.status_code == 400 and "limit of 1 tokens per minute" in r.json()["error"]["message"]
    _, own = store.create(["infer"], tokens_per_minute=10_000)
    assert c.post("/v1/embeddings", headers=_h(own), json={"model": "minilm", "input": ["hello"]}).status_code == 200


def test_a_request_the_server_refuses_gets_its_tokens_back(client_factory: Any, store: KeyStore) -> None:
    """The tokens were taken before the batcher admitted the request: a full queue (or more texts than it
    holds) spent them, and the key's next request got rate_limit_exceeded, "slow that key down", for the
    server's refusal."""
    c = client_factory(keys=store, queue_limit=2, max_inputs=2048)
    _, probe = store.create(["infer"])
    one = c.post("/v1/embeddings", headers=_h(probe), json={"model": "minilm", "input": ["a few words here"]})
    tokens = one.json()["usage"]["prompt_tokens"]
    _, key = store.create(["infer"], tokens_per_minute=3 * tokens)
    three = {"model": "minilm", "input": ["a few words here"] * 3}
    refused = c.post("/v1/embeddings", headers=_h(key), json=three)  # 3 texts, a queue of 2: never queued
    assert refused.status_code == 400 and "queue_limit" in refused.text, refused.text
    for _ in range(3):  # all three texts' worth still there
        ok = c.post("/v1/embeddings", headers=_h(key), json={"model": "minilm", "input": ["a few words here"]})
        assert ok.status_code == 200, ok.text
    spent = c.post("/v1/embeddings", headers=_h(key), json={"model": "minilm", "input": ["a few words here"]})
    assert spent.status_code == 429 and spent.json()["error"]["code"] == "rate_limit_exceeded"

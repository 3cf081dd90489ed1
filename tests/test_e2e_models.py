"""A package exported and signed on a build box, packed, imported on a serving box that requires its own
signature, and served by a real ``inferbox serve`` over HTTP: loaded into the running server, answering
with the imported weights, and recorded in the same audit chain as the requests."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort

from tests.appliance.test_models_cli import publish
from tests.test_e2e_serve import _start, _stop, assert_header_deadline, cli


def test_an_imported_version_is_loaded_into_a_running_server_and_audited(tmp_path: Path) -> None:
    build, serving = tmp_path / "build", tmp_path / "serving"
    for home in (build, serving):
        made = cli("signing-key", "create", home=home, repository=home / "models")
        assert made.returncode == 0, made.stderr
    publish(build, version=1, seed=0)
    publish(build, version=2, seed=7)
    build_pub = build / "keys" / "signing.key.pub"
    # the serving box requires packages signed with its own key, as `inferbox install` sets it up
    config = serving / "inferbox.toml"
    config.write_text(f'[paths]\npublic_key = "{serving / "keys" / "signing.key.pub"}"\n')
    for version in (1, 2):
        packed = cli(
            "models", "pack", "mlp", "--version", str(version), "--out", str(tmp_path / f"mlp-{version}.tar"),
            home=build, repository=build / "models",
        )  # fmt: skip
        assert packed.returncode == 0, packed.stderr
    first = cli(
        "models", "import", str(tmp_path / "mlp-1.tar"), "--publisher-key", str(build_pub),
        home=serving, repository=serving / "models",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr

    proc, url, log = _start(serving / "models", serving, "--no-auth", env={"INFERBOX_HEADER_TIMEOUT_S": "2.5"})
    try:
        x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
        body = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 8], "data": x.ravel().tolist()}]}

        def served_logits() -> tuple[str, np.ndarray]:
            resp = httpx.post(f"{url}/v2/models/mlp/infer", json=body, timeout=60)
            assert resp.status_code == 200, resp.text
            out = {o["name"]: o for o in resp.json()["outputs"]}
            return resp.json()["model_version"], np.asarray(out["logits"]["data"], np.float32).reshape(2, 4)

        def expected(version: int) -> np.ndarray:
            session = ort.InferenceSession(
                str(build / "models" / "mlp" / str(version) / "onnx" / "model.onnx"),
                providers=["CPUExecutionProvider"],
            )
            return np.asarray(session.run(["logits"], {"x": x})[0])

        version, logits = served_logits()
        assert version == "1"
        np.testing.assert_allclose(logits, expected(1), rtol=1e-5, atol=1e-6)

        second = cli(
            "models", "import", str(tmp_path / "mlp-2.tar"), "--publisher-key", str(build_pub),
            home=serving, repository=serving / "models",
        )  # fmt: skip
        assert second.returncode == 0, second.stderr
        index = httpx.post(f"{url}/v2/repository/index", json={}, timeout=30).json()
        states = {(e["name"], e["version"]): e["state"] for e in index}
        assert states == {("mlp", "1"): "READY", ("mlp", "2"): "UNAVAILABLE"}, index
        # load alone swaps the newest version in; a client sending meanwhile never sees a gap
        # (a request already in flight when load answers may still be served by version 1, so only
        # requests sent after the answer must see version 2)
        statuses: list[tuple[int, str, bool]] = []
        swapped = threading.Event()

        def client() -> None:
            with httpx.Client(timeout=60) as http:
                while sum(after for _, _, after in statuses) < 2 or len(statuses) < 5:
                    after = swapped.is_set()
                    resp = http.post(f"{url}/v2/models/mlp/infer", json=body)
                    statuses.append((resp.status_code, resp.json().get("model_version", resp.text), after))

        sender = threading.Thread(target=client)
        sender.start()
        try:
            assert httpx.post(f"{url}/v2/repository/models/mlp/load", timeout=120).status_code == 200
        finally:
            swapped.set()
            sender.join(60)
        assert statuses and {code for code, _, _ in statuses} == {200}, statuses
        served_after = [version for _, version, after in statuses if after]
        assert len(served_after) >= 2 and set(served_after) == {"2"}, statuses
        version, logits = served_logits()
        assert version == "2"
        np.testing.assert_allclose(logits, expected(2), rtol=1e-5, atol=1e-6)
        assert not np.allclose(expected(1), expected(2))  # the test can tell the versions apart

        assert_header_deadline(url, "2.5")  # serve's one process has the setting too

        removed = cli("models", "remove", "mlp", "1", "--yes", home=serving, repository=serving / "models")
        assert removed.returncode == 0, removed.stderr
        assert httpx.post(f"{url}/v2/models/mlp/versions/1/infer", json=body, timeout=60).status_code == 404
    finally:
        _stop(proc)
    tail = cli("audit", "tail", "-n", "50", "--json", home=serving, repository=serving / "models")
    assert tail.returncode == 0, tail.stderr
    events = [line for line in tail.stdout.splitlines() if '"model_import"' in line or '"model_remove"' in line]
    assert len(events) == 3, tail.stdout
    verify = cli("audit", "verify", home=serving, repository=serving / "models")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "Traceback" not in log.read_text(errors="replace")

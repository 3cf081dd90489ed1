"""The client libraries application teams already use, against a real ``inferbox serve``.

An application team moving to inferbox keeps its code: the official ``openai``
package for ``/v1/embeddings`` and NVIDIA's ``tritonclient`` (HTTP, sync and
asyncio) for the KServe v2 routes.  These tests drive the real server (uvicorn
on 127.0.0.1, the MiniLM package, auth and audit on) through those libraries,
so a response that strays from what they parse fails here, not at a customer.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tests.test_e2e_serve import Served, serving

TEXTS = ["The patient was discharged after three days.", "Quarterly revenue rose 12 %."]


@pytest.fixture(scope="module")
def served(minilm_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving(minilm_repository, tmp_path_factory.mktemp("clients-home")) as srv:
        yield srv


def _reference(served: Served, texts: list[str]) -> np.ndarray:
    """The same texts through plain JSON over httpx: what the clients must decode to."""
    resp = httpx.post(
        f"{served.url}/v1/embeddings",
        json={"model": "minilm", "input": texts, "encoding_format": "float"},
        headers=served.headers(),
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]], dtype=np.float32)


# --- openai ------------------------------------------------------------------------------------


def _openai(served: Served, key: str | None = None) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key or served.key, max_retries=0, timeout=60)


@pytest.mark.parametrize("encoding_format", ["base64", "float"])
def test_openai_client_embeds_in_either_encoding(served: Served, encoding_format: str) -> None:
    client = _openai(served)
    resp = client.embeddings.create(model="minilm", input=TEXTS, encoding_format=encoding_format)
    assert resp.object == "list" and resp.model == "minilm"
    assert [d.index for d in resp.data] == [0, 1]
    # asked for base64 by name, the SDK hands the string back as it came (it decodes only its own default)
    got = np.array(
        [
            np.frombuffer(base64.b64decode(d.embedding), "<f4") if encoding_format == "base64" else d.embedding
            for d in resp.data
        ],
        dtype=np.float32,
    )
    np.testing.assert_allclose(got, _reference(served, TEXTS), atol=1e-6)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens > len(TEXTS)


def test_openai_client_default_sends_base64_and_decodes_it(served: Served) -> None:
    """The SDK asks for base64 unless told otherwise: the default path must round-trip too."""
    resp = _openai(served).embeddings.create(model="minilm", input=TEXTS[0])
    np.testing.assert_allclose(
        np.array(resp.data[0].embedding, dtype=np.float32), _reference(served, TEXTS[:1])[0], atol=1e-6
    )


def test_openai_client_raises_its_own_errors_with_the_servers_message(served: Served) -> None:
    import openai

    client = _openai(served)
    with pytest.raises(openai.NotFoundError, match="nosuch"):
        client.embeddings.create(model="nosuch", input="x")
    with pytest.raises(openai.BadRequestError, match="dimensions") as bad:
        client.embeddings.create(model="minilm", input="x", dimensions=10)
    assert bad.value.body["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError, match="check_embedding_ctx_length"):
        client.embeddings.create(model="minilm", input=[[101, 2023, 102]])
    with pytest.raises(openai.AuthenticationError, match="keys create"):
        _openai(served, key="ibx_not_a_key").embeddings.create(model="minilm", input="x")


def test_openai_client_lists_the_loaded_models(served: Served) -> None:
    models = _openai(served).models.list()
    assert [m.id for m in models.data] == ["minilm"]
    assert models.data[0].created > 1_500_000_000  # a Unix time, as the SDK's Model type says
    assert _openai(served).models.retrieve("minilm") == models.data[0]
    # up to 2,048 inputs a request, as OpenAI's API (LangChain sends up to 1,000 by default)
    many = _openai(served).embeddings.create(model="minilm", input=[f"text {i}" for i in range(2048)])
    assert len(many.data) == 2048 and [d.index for d in many.data] == list(range(2048))


# --- tritonclient -------------------------------------------------------------------------------


def _triton(served: Served) -> Any:
    import tritonclient.http as th

    return th.InferenceServerClient(url=served.url.removeprefix("http://"))


def _bytes_input(th: Any, texts: list[str], *, binary: bool) -> Any:
    inp = th.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object), binary_data=binary)
    return inp


def test_tritonclient_health_and_metadata(served: Served) -> None:
    client = _triton(served)
    headers = served.headers()
    # tritonclient writes its own headers into the dict it is given, so each call gets a copy
    assert client.is_server_live(headers=dict(headers)) and client.is_server_ready(headers=dict(headers))
    assert client.is_model_ready("minilm", headers=dict(headers))
    meta = client.get_model_metadata("minilm", headers=dict(headers))
    assert meta["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert meta["outputs"][0]["name"] == "sentence_embedding" and meta["outputs"][0]["shape"] == [-1, 384]
    index = client.get_model_repository_index(headers=dict(headers))
    assert {"name": "minilm", "version": "1", "state": "READY"}.items() <= index[0].items()


def test_tritonclient_reads_the_config_and_the_statistics(served: Served) -> None:
    import tritonclient.http as th

    client = _triton(served)
    config = client.get_model_config("minilm", headers=dict(served.headers()))
    assert config["input"] == [{"name": "text", "data_type": "TYPE_STRING", "dims": [-1]}]
    assert config["output"] == [{"name": "sentence_embedding", "data_type": "TYPE_FP32", "dims": [-1, 384]}]
    assert config["max_batch_size"] == 0 and config["instance_group"][0]["kind"] == "KIND_CPU"

    def minilm() -> dict[str, Any]:
        stats = client.get_inference_statistics("minilm", "1", headers=dict(served.headers()))
        assert [s["name"] for s in stats["model_stats"]] == ["minilm"]
        return dict(stats["model_stats"][0])

    before = minilm()
    client.infer("minilm", [_bytes_input(th, TEXTS, binary=True)], headers=dict(served.headers()))
    after = minilm()
    assert after["inference_count"] - before["inference_count"] == len(TEXTS)
    ok = after["inference_stats"]["success"]
    assert ok["count"] - before["inference_stats"]["success"]["count"] == 1 and ok["ns"] > 0
    assert after["execution_count"] > before["execution_count"]
    assert after["last_inference"] >= before["last_inference"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary-extension", "json"])
def test_tritonclient_infer_matches_the_openai_route(served: Served, binary: bool) -> None:
    import tritonclient.http as th

    out = th.InferRequestedOutput("sentence_embedding", binary_data=binary)
    result = _triton(served).infer(
        "minilm", [_bytes_input(th, TEXTS, binary=binary)], outputs=[out], headers=served.headers(), request_id="r-1"
    )
    assert result.get_response()["id"] == "r-1" and result.get_response()["model_version"] == "1"
    np.testing.assert_allclose(result.as_numpy("sentence_embedding"), _reference(served, TEXTS), atol=1e-6)


def test_tritonclient_errors_carry_the_servers_message(served: Served) -> None:
    import tritonclient.http as th
    from tritonclient.utils import InferenceServerException

    client = _triton(served)
    with pytest.raises(InferenceServerException, match="nosuch") as missing:
        client.infer("nosuch", [_bytes_input(th, ["x"], binary=True)], headers=served.headers())
    assert missing.value.status() == "404"
    wrong = th.InferInput("text", [1], "FP32")
    wrong.set_data_from_numpy(np.array([1.0], dtype=np.float32))
    with pytest.raises(InferenceServerException, match="BYTES") as bad:
        client.infer("minilm", [wrong], headers=served.headers())
    assert bad.value.status() == "400"


def test_tritonclient_asyncio_client(served: Served) -> None:
    import tritonclient.http.aio as ta

    async def infer() -> np.ndarray:
        client = ta.InferenceServerClient(url=served.url.removeprefix("http://"))
        try:
            result = await client.infer("minilm", [_bytes_input(ta, TEXTS, binary=True)], headers=served.headers())
            return np.asarray(result.as_numpy("sentence_embedding"))
        finally:
            await client.close()

    np.testing.assert_allclose(asyncio.run(infer()), _reference(served, TEXTS), atol=1e-6)

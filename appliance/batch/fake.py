"""A deterministic model for tests and dry runs of the batch machinery.

``FakeModel`` answers like a loaded model without any runtime: embeddings are a
pure function of the text, classifier logits of the text, tensor outputs a fixed
linear map.  ``delay_s`` makes every call take that long, so that a test can
kill a worker in the middle of a job.  Loaders built by :func:`loader` are
picklable (Dask ships them to workers).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import ModelNotFoundError
from runtime.manifest import Manifest, Provenance, TensorSpec, TextConfig

__all__ = ["FAKE_MODELS", "FakeModel", "loader", "settings_loader"]

#: model name -> task of the fakes :func:`loader` knows
FAKE_MODELS = {
    "fake-embed": "feature-extraction",
    "fake-classify": "text-classification",
    "fake-tensor": "tensor",
}
_WEIGHTS = np.arange(8, dtype=np.float32).reshape(4, 2) / 8.0


def _manifest(name: str, version: int, task: str, dim: int) -> Manifest:
    provenance = Provenance(
        source_kind="onnx", source="fake", source_sha256="0" * 64, created_at="1970-01-01T00:00:00Z"
    )
    if task == "tensor":
        return Manifest(
            name=name,
            version=version,
            task="tensor",
            inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
            outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 2])],
            variants=[],
            files=[],
            provenance=provenance,
        )
    classify = task == "text-classification"
    return Manifest(
        name=name,
        version=version,
        task="text-classification" if classify else "feature-extraction",
        inputs=[TensorSpec(name="input_ids", dtype="int64", shape=[-1, -1])],
        outputs=[TensorSpec(name="out", dtype="float32", shape=[-1, 2 if classify else dim])],
        variants=[],
        files=[],
        provenance=provenance,
        text=TextConfig(output="out"),
        labels=["negative", "positive"] if classify else None,
    )


@dataclass(frozen=True)
class FakeTokens:
    """A "tokenized" text for the fake: one token per word."""

    text: str

    def __len__(self) -> int:
        return len(self.text.split())


@dataclass
class FakeModel:
    """A deterministic stand-in for ``runtime.serving.LoadedModel``."""

    name: str = "fake-embed"
    version: int = 1
    task: str = "feature-extraction"
    dim: int = 8
    delay_s: float = 0.0
    backend: str = "fake"
    variant: str = "fake"
    package_sha256: str = "f" * 64
    calls: int = 0
    pid: int = field(default_factory=os.getpid)
    manifest: Manifest = field(init=False)

    def __post_init__(self) -> None:
        self.manifest = _manifest(self.name, self.version, self.task, self.dim)

    def _vector(self, text: str, dim: int) -> npt.NDArray[np.float32]:
        seed = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
        v = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
        return v

    def embed(self, texts: Sequence[str], *, truncate: bool = True) -> tuple[npt.NDArray[np.float32], list[int]]:
        tokens = self.tokenize(texts, truncate=truncate)
        return self.embed_tokens(tokens), [len(t) for t in tokens]

    def tokenize(self, texts: Sequence[str], *, truncate: bool = True) -> list[FakeTokens]:
        return [FakeTokens(t) for t in texts]

    def tokenize_pairs(self, query: str, documents: Sequence[str], *, truncate: bool = True) -> list[FakeTokens]:
        return [FakeTokens(f"{query} [SEP] {d}") for d in documents]

    def embed_tokens(self, tokens: Sequence[FakeTokens]) -> npt.NDArray[np.float32]:
        self._tick()
        dim = 2 if self.task == "text-classification" else self.dim
        return np.stack([self._vector(t.text, dim) for t in tokens]) if tokens else np.zeros((0, dim), np.float32)

    def infer(
        self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]:
        self._tick()
        x = np.asarray(inputs["x"], dtype=np.float32)
        return {"y": x @ _WEIGHTS}

    def _tick(self) -> None:
        self.calls += 1
        if self.delay_s > 0:
            time.sleep(self.delay_s)


def loader(name: str, version: int | None = None, *, delay_s: float = 0.0, variant: str = "fake") -> FakeModel:
    """Load one of :data:`FAKE_MODELS` (version defaults to 1)."""
    task = FAKE_MODELS.get(name)
    if task is None:
        raise ModelNotFoundError(f"no fake model {name!r}; the fakes are {sorted(FAKE_MODELS)}")
    return FakeModel(name=name, version=version or 1, task=task, delay_s=delay_s, variant=variant)


def settings_loader(settings: object) -> Callable[[str, int | None], FakeModel]:
    """For ``inferbox batch run --loader appliance.batch.fake:settings_loader`` (tests, dry runs)."""
    return loader

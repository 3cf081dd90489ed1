"""``ModelRegistry.load``: the newest version replaces a loaded older one; an unload meanwhile stands."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from runtime.errors import ModelNotFoundError
from runtime.manifest import Manifest, Provenance, TensorSpec
from runtime.serving import IndexEntry, ModelRegistry

MANIFEST = Manifest(
    name="m",
    version=1,
    task="tensor",
    inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
    outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 2])],
    variants=[],
    files=[],
    provenance=Provenance(source_kind="onnx", source="x", source_sha256="", created_at=""),
)


class Model:
    def __init__(self, name: str, version: int) -> None:
        self.name, self.version, self.closed = name, version, False
        self.manifest = MANIFEST

    def close(self) -> None:
        self.closed = True


def registry(disk: list[int], loader: Any = None) -> ModelRegistry:
    def load(name: str, version: int | None) -> Any:
        return Model(name, version or max(disk))

    return ModelRegistry(loader or load, lambda: [IndexEntry("m", v, "UNAVAILABLE") for v in disk])


def test_load_swaps_in_the_newest_version_and_retires_the_old() -> None:
    disk = [1]
    reg = registry(disk)
    first = reg.load("m")
    assert reg.load("m") is first  # nothing newer: the same model
    disk.append(2)
    second = reg.load("m")
    assert (second.version, reg.get("m").version) == (2, 2)
    assert first.closed  # type: ignore[attr-defined]


def test_an_unload_during_a_swap_is_not_undone() -> None:
    disk = [1]
    opening, go_on = threading.Event(), threading.Event()

    def slow(name: str, version: int | None) -> Any:
        if disk[-1] == 2:
            opening.set()
            go_on.wait(10)
        return Model(name, version or max(disk))

    reg = registry(disk, slow)
    reg.load("m")
    disk.append(2)
    errors: list[BaseException] = []

    def swap() -> None:
        try:
            reg.load("m")
        except ModelNotFoundError as exc:
            errors.append(exc)

    worker = threading.Thread(target=swap)
    worker.start()
    assert opening.wait(10)
    reg.unload("m")  # answered 200 to its client
    go_on.set()
    worker.join(10)
    assert reg.loaded() == [] and len(errors) == 1 and "unloaded while" in str(errors[0])
    with pytest.raises(ModelNotFoundError):
        reg.get("m")

"""What the batch worker needs from a loaded model (``runtime.serving.LoadedModel`` fits).

The worker codes to this Protocol so that it runs with the real loader, the
deterministic fake backend, or :class:`appliance.batch.fake.FakeModel` alike.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy.typing as npt

    from runtime.manifest import Manifest

__all__ = ["BatchModel", "LoaderFactory", "ModelLoader"]


class BatchModel(Protocol):
    """A loaded model: ``embed`` for text tasks, ``infer`` for tensor tasks."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> int: ...

    @property
    def package_sha256(self) -> str: ...

    @property
    def backend(self) -> str: ...

    @property
    def variant(self) -> str: ...

    @property
    def manifest(self) -> Manifest: ...

    def infer(
        self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[Any]]: ...

    def embed(self, texts: Sequence[str], *, truncate: bool) -> tuple[npt.NDArray[Any], list[int]]: ...


#: ``loader(name, version)`` -> a loaded model (``appliance.models.model_loader(settings)`` returns one).
ModelLoader = Callable[[str, "int | None"], BatchModel]
#: A picklable zero-argument callable that builds a :data:`ModelLoader` (sent to Dask workers).
LoaderFactory = Callable[[], ModelLoader]

"""What the batch worker needs from a loaded model (``runtime.serving.LoadedModel`` fits).

The worker codes to this Protocol so that it runs with the real loader, the
deterministic fake backend, or :class:`appliance.batch.fake.FakeModel` alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence, Sized
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import numpy.typing as npt

    from runtime.manifest import Manifest

__all__ = ["BatchModel", "LatestVersion", "LoaderFactory", "ModelLoader", "repository_latest"]


class BatchModel(Protocol):
    """A loaded model: ``tokenize`` + ``embed_tokens`` for text tasks, ``infer`` for tensor tasks.

    Texts are tokenized once per chunk so batches can be formed by token count
    (sorting by characters padded measurably worse: 400 vs 510 texts/s on the
    mixed corpus).
    """

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

    def tokenize(self, texts: Sequence[str], *, truncate: bool) -> Sequence[Sized]:
        """One token sequence per text (its ``len`` is the token count); too long and not truncating -> InputError."""
        ...

    def tokenize_pairs(self, query: str, documents: Sequence[str], *, truncate: bool) -> Sequence[Sized]:
        """``(query, document)`` pairs as the model was trained on them (a cross-encoder, NLI)."""
        ...

    def embed_tokens(self, tokens: Sequence[Any]) -> npt.NDArray[Any]:
        """Outputs ``[N, D]`` for sequences from :meth:`tokenize` (embeddings, or logits for classifiers)."""
        ...


#: ``loader(name, version)`` -> a loaded model (``appliance.models.model_loader(settings)`` returns one).
ModelLoader = Callable[[str, "int | None"], BatchModel]
#: A picklable zero-argument callable that builds a :data:`ModelLoader` (sent to Dask workers).
LoaderFactory = Callable[[], ModelLoader]
#: ``latest(name)`` -> (the latest version of ``name``, that package's sha256), read cheaply (no
#: session); it may raise, and then the worker loads "latest" to find out (and to name the error).
LatestVersion = Callable[[str], tuple[int, str]]


def repository_latest(root: Path) -> LatestVersion:
    """:data:`LatestVersion` of the model repository at ``root``: the highest version folder and
    the sha256 of its ``manifest.json`` (a package's identity, ``runtime.package.Package.sha256``).
    Nothing is verified here: the loader verifies the package whenever it loads it."""

    def latest(name: str) -> tuple[int, str]:
        from runtime.package import MANIFEST
        from runtime.repository import Repository

        repository = Repository(root)
        version = repository.latest(name)
        data = (repository.path(name, version) / MANIFEST).read_bytes()
        return version, hashlib.sha256(data).hexdigest()

    return latest

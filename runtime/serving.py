"""Models as the server holds them: one opened version (:class:`LoadedModel`) and the registry.

:class:`LoadedModel` validates request tensors against the manifest (names,
dtypes, shapes, NaN/Inf) and raises :class:`~runtime.errors.InputError` naming the
field; :meth:`LoadedModel.embed` runs a text model end to end (tokenize -> session
-> pooling).  :class:`ModelRegistry` is the thread-safe set of loaded models; the
package loader (package -> backend -> session) is passed in as a callable, so
this module knows nothing about repositories on disk.

:func:`run_tensor_batch` and :func:`tensor_group` let a
:class:`~runtime.batcher.DynamicBatcher` concatenate requests along the batch axis.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from runtime.backends.base import Session
from runtime.errors import InferboxError, InputError, ModelNotFoundError, shown
from runtime.interface import interface_changes
from runtime.manifest import Manifest, TensorSpec
from runtime.text import TextEncoder, Tokens, postprocess

__all__ = [
    "IndexEntry",
    "LoadedModel",
    "ModelRegistry",
    "TensorRequest",
    "run_tensor_batch",
    "tensor_group",
]

logger = logging.getLogger(__name__)

Array = npt.NDArray[Any]


@dataclass(frozen=True)
class IndexEntry:
    """A model version in the repository, as the repository extension reports it."""

    name: str
    version: int
    state: Literal["READY", "UNAVAILABLE"]
    reason: str = ""
    #: the package's identity (SHA-256 of its manifest) where it could be read, else ""
    sha256: str = ""


def _is_float(dtype: np.dtype[Any]) -> bool:
    return bool(np.issubdtype(dtype, np.floating))


@dataclass
class LoadedModel:
    """One version of one model, opened and ready."""

    name: str
    version: int
    manifest: Manifest
    package_sha256: str
    backend: str
    variant: str
    exec_precision: str
    session: Session
    text: TextEncoder | None = None
    #: sessions in ``session`` that run side by side (a :class:`~runtime.streams.SessionPool` when > 1)
    streams: int = 1

    # -- facts --------------------------------------------------------------------------
    @property
    def is_text(self) -> bool:
        return self.text is not None and self.manifest.text is not None

    @property
    def is_embedding(self) -> bool:
        return self.is_text and self.manifest.task == "feature-extraction"

    @property
    def is_reranker(self) -> bool:
        """A cross-encoder: a text classifier with one score per text (a single logit), fed
        ``(query, document)`` pairs by ``POST /v1/rerank``."""
        if not self.is_text or self.manifest.task != "text-classification":
            return False
        config = self.manifest.text
        if config is None or config.pooling != "none":
            return False
        spec = self._text_output()
        return spec is not None and len(spec.shape) == 2 and spec.shape[-1] == 1

    @property
    def text_output_name(self) -> str:
        """The output a text model answers from (``text.output``, else the first)."""
        config = self.manifest.text
        return (config.output if config is not None else None) or self.manifest.outputs[0].name

    def _text_output(self) -> TensorSpec | None:
        name = self.text_output_name
        return next((o for o in self.manifest.outputs if o.name == name), None)

    @property
    def max_length(self) -> int:
        return self.manifest.text.max_length if self.manifest.text is not None else 0

    @property
    def batchable(self) -> bool:
        """True when every input and output has a dynamic first dimension and it is the same
        (batch) axis: requests may then be concatenated along it and the outputs split by rows.

        The ONNX symbolic names decide (:attr:`~runtime.manifest.TensorSpec.dim_names`): an
        output whose first dimension is named otherwise (``[num_boxes, 7]``, a ``Reshape(-1,
        ...)``, a sequence-first ``[T, N, F]``) or not at all is not the batch axis, nor is a
        name that also names another axis of some input or output.  A package
        exported before the names were kept has none: it batches as before, and
        :func:`run_tensor_batch` checks each output's rows before splitting.
        """
        specs = [*self.manifest.inputs, *self.manifest.outputs]
        if not all(s.shape and s.shape[0] == -1 for s in specs):
            return False
        named = {s.dim_names[0] if s.dim_names else "" for s in specs if s.dim_names is not None}
        if not named:
            return True
        if len(named) != 1 or "" in named:
            return False
        # the batch name on another axis too (a [T, N, F] output whose T is also named so) is not one batch axis
        (batch,) = named
        return not any(batch in (s.dim_names or [])[1:] for s in specs)

    @property
    def static_shapes(self) -> int:
        """Static-shape copies compiled so far (OpenVINO; in a pool, the all-core session's)."""
        return len(getattr(self.session, "static_shapes", ()))

    def output_names(self) -> list[str]:
        return [o.name for o in self.manifest.outputs]

    # -- validation -----------------------------------------------------------------------
    def check_outputs(self, outputs: Sequence[str] | None) -> list[str] | None:
        if outputs is None:
            return None
        known = self.output_names()
        for i, name in enumerate(outputs):
            if name not in known:
                raise InputError(
                    f"outputs[{i}].name: model {self.name!r} has no output {shown(name)}; it has {known}",
                    field=f"outputs[{i}].name",
                )
        return list(outputs)

    def check_inputs(self, inputs: dict[str, Array]) -> dict[str, Array]:
        """Names, dtypes, ranks, fixed dims, equal batch dims, no NaN/Inf. Returns the feeds."""
        specs = {s.name: s for s in self.manifest.inputs}
        for name in inputs:
            if name not in specs:
                raise InputError(
                    f"inputs: model {self.name!r} has no input {shown(name)}; it has {list(specs)}",
                    field=f"inputs[{name}]",
                )
        batch: int | None = None
        for spec in self.manifest.inputs:
            if spec.name not in inputs:
                raise InputError(
                    f"inputs: input {spec.name!r} ({spec.dtype} {spec.shape}) is missing", field=f"inputs[{spec.name}]"
                )
            arr = inputs[spec.name]
            _check_tensor(spec, arr)
            if spec.shape and spec.shape[0] == -1 and arr.ndim:
                if batch is not None and arr.shape[0] != batch:
                    raise InputError(
                        f"inputs[{spec.name}].shape: batch dimension {arr.shape[0]} differs from the other "
                        f"inputs' {batch}",
                        field=f"inputs[{spec.name}].shape",
                    )
                batch = arr.shape[0]
        return {s.name: inputs[s.name] for s in self.manifest.inputs}

    # -- running ----------------------------------------------------------------------------
    def infer(self, inputs: dict[str, Array], outputs: list[str] | None = None) -> dict[str, Array]:
        """Validate and run one request's tensors. Unknown input/output names -> InputError."""
        feeds = self.check_inputs(inputs)
        wanted = self.check_outputs(outputs)
        return dict(self.session.run(feeds, wanted))

    def tokenize(self, texts: Sequence[str], *, truncate: bool, field: str = "input") -> list[Tokens]:
        """Each text's tokens (capped at max_length when truncating); too long and not truncating -> InputError
        naming ``field[i]``."""
        if self.text is None:
            raise InputError(f"model {self.name!r} is not a text model; send tensors", field=field)
        return self.text.tokenize(texts, truncate=truncate, field=field)

    def tokenize_pairs(self, query: str, documents: Sequence[str], *, truncate: bool) -> list[Tokens]:
        """``(query, document)`` pairs tokenized for a cross-encoder (see :attr:`is_reranker`)."""
        if self.text is None:
            raise InputError(f"model {self.name!r} is not a text model; send tensors", field="model")
        return self.text.tokenize_pairs(query, documents, truncate=truncate)

    @functools.cached_property
    def pad_multiple(self) -> int:
        """A text batch's width is padded to a multiple of this many tokens: the session's
        ``pad_multiple`` (OpenVINO: so input shapes repeat, see
        :data:`runtime.backends.openvino.PAD_MULTIPLES`), and only where padding changes no
        answer: right padding, the mask fed, and an answer without a length (pooled, or a
        classifier's ``[N, C]`` scores; a token-level ``[N, L, D]`` output keeps its width); else 1.
        Batching already pads a short text to its batch's longest, which the export's batch gate
        held to the lone text's answer.  Fixed once the model is open (read once)."""
        config = self.manifest.text
        if self.text is None or config is None or not self.text.pads_invisibly:
            return 1
        if config.pooling == "none":
            spec = self._text_output()
            if spec is None or len(spec.shape) != 2:
                return 1
        return max(1, int(getattr(self.session, "pad_multiple", 1)))

    def embed_tokens(self, tokens: Sequence[Tokens]) -> Array:
        """Embeddings [N, D] float32 of tokenized texts (one padded batch)."""
        if self.text is None or self.manifest.text is None:
            raise InputError(f"model {self.name!r} is not a text model; send tensors", field="model")
        config = self.manifest.text
        encoded = self.text.pad(tokens, multiple=self.pad_multiple)
        output = self.text_output_name
        result = self.session.run(dict(encoded.feeds), [output])
        return postprocess({output: result[output]}, encoded.attention_mask, config)

    def embed(self, texts: Sequence[str], *, truncate: bool) -> tuple[Array, list[int]]:
        """Embeddings [N, D] float32 and token counts for ``texts``."""
        tokens = self.tokenize(texts, truncate=truncate)
        return self.embed_tokens(tokens), [len(t) for t in tokens]

    def close(self) -> None:
        self.session.close()


def _check_tensor(spec: TensorSpec, arr: Array) -> None:
    where = f"inputs[{spec.name}]"
    if arr.dtype != np.dtype(spec.dtype):
        raise InputError(
            f"{where}.datatype: got {arr.dtype.name}, the model expects {spec.dtype}", field=f"{where}.datatype"
        )
    if arr.ndim != len(spec.shape):
        raise InputError(
            f"{where}.shape: got {list(arr.shape)} (rank {arr.ndim}), the model expects {spec.shape} "
            f"(rank {len(spec.shape)}; -1 is any size)",
            field=f"{where}.shape",
        )
    for got, want in zip(arr.shape, spec.shape, strict=True):
        if want not in (-1, got):
            raise InputError(
                f"{where}.shape: got {list(arr.shape)}, the model expects {spec.shape} (-1 is any size)",
                field=f"{where}.shape",
            )
    if _is_float(arr.dtype) and arr.size and not bool(np.isfinite(arr).all()):
        raise InputError(f"{where}.data: NaN or Inf is not allowed in a model input", field=f"{where}.data")


# -- tensor batching -------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TensorRequest:
    """One validated tensor request, as queued in a batcher."""

    feeds: dict[str, Array]
    outputs: tuple[str, ...] | None

    @property
    def rows(self) -> int:
        first = next(iter(self.feeds.values()), None)
        return int(first.shape[0]) if first is not None and first.ndim else 1


def tensor_group(model: LoadedModel) -> Callable[[TensorRequest], Hashable]:
    """Requests that concatenate along axis 0 share a group; unbatchable models batch nothing."""

    def group(req: TensorRequest) -> Hashable:
        if not model.batchable:
            return id(req)
        shapes = tuple((k, v.dtype.str, v.shape[1:]) for k, v in req.feeds.items())
        return (shapes, req.outputs)

    return group


def run_tensor_batch(model: LoadedModel) -> Callable[[list[TensorRequest]], list[dict[str, Array]]]:
    """A ``run_batch`` for the batcher: concatenate, run once, split by rows.

    Splitting is sound only when every output has one row per input row.  When an output of
    the batched run has another number of rows (its first axis is not the batch axis, which a
    package without dimension names cannot tell beforehand), nothing is split: each request is
    run again on its own, and from then on this model's requests always run one at a time, so
    no client ever receives rows computed from another client's input.
    """
    alone = False

    def one_by_one(batch: list[TensorRequest], outputs: list[str] | None) -> list[dict[str, Array]]:
        return [dict(model.session.run(r.feeds, outputs)) for r in batch]

    def run(batch: list[TensorRequest]) -> list[dict[str, Array]]:
        nonlocal alone
        outputs = list(batch[0].outputs) if batch[0].outputs is not None else None
        if len(batch) == 1 or alone:
            return one_by_one(batch, outputs)
        feeds = {name: np.concatenate([r.feeds[name] for r in batch], axis=0) for name in batch[0].feeds}
        result = model.session.run(feeds, outputs)
        rows = [r.rows for r in batch]
        total = sum(rows)
        odd = {name: list(arr.shape) for name, arr in result.items() if arr.ndim == 0 or arr.shape[0] != total}
        if odd:
            alone = True
            logger.warning(
                "model %s: output shapes %s of a batch of %d rows do not follow the batch axis; "
                "its requests run one at a time from now on",
                model.name,
                odd,
                total,
            )
            return one_by_one(batch, outputs)
        bounds = np.cumsum(rows)[:-1]
        parts = {name: np.split(arr, bounds, axis=0) for name, arr in result.items()}
        return [{name: parts[name][i] for name in parts} for i in range(len(batch))]

    return run


# -- the registry -------------------------------------------------------------------------------


def _close_now(model: LoadedModel) -> None:
    model.close()


class ModelRegistry:
    """The models the API serves. Thread-safe; ``loader(name, version)`` opens a package."""

    def __init__(
        self,
        loader: Callable[[str, int | None], LoadedModel],
        index: Callable[[], list[IndexEntry]],
        root: Path | None = None,
    ) -> None:
        self._loader = loader
        self._index = index
        #: the repository's folder on the box: :meth:`public` names its files relative to it
        self._roots = sorted({f"{r}/" for r in (root, root.resolve())}, key=len, reverse=True) if root else []
        self._root = root
        self._lock = threading.RLock()
        #: serializes loads (slow: opening a session) without blocking get()
        self._load_lock = threading.Lock()
        self._models: dict[str, LoadedModel] = {}
        self._errors: dict[tuple[str, int], str] = {}
        #: name -> the version it had, of the models unloaded on request and not loaded since
        self._unloaded: dict[str, int] = {}
        #: called with (event, model) on "load" / "unload", e.g. to start / stop a batcher
        self.listeners: list[Callable[[str, LoadedModel], None]] = []
        #: what becomes of a model the registry lets go of (unloaded, or replaced by another
        #: version): closed at once by default; a server that may still be running it installs
        #: a hook that closes it once its in-flight batches are done
        self.retire: Callable[[LoadedModel], None] = _close_now

    def add(self, model: LoadedModel) -> None:
        """Register an already opened model (replaces and closes another version of it)."""
        with self._lock:
            old = self._models.get(model.name)
            self._models[model.name] = model
            self._unloaded.pop(model.name, None)
        if old is not None and old is not model:
            self._notify("unload", old)
            self.retire(old)
        self._notify("load", model)

    def holds(self, model: LoadedModel) -> bool:
        """Whether ``model`` (this very object) is still the loaded version of its name."""
        with self._lock:
            return self._models.get(model.name) is model

    def get(self, name: str, version: int | None = None) -> LoadedModel:
        with self._lock:
            model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(
                f"model {shown(name)} is not loaded{{loaded}} (load it with POST /v2/repository/models/{{name}}/load)",
                loaded=sorted(self._models),
            )
        if version is not None and model.version != version:
            raise ModelNotFoundError(f"model {shown(name)} version {version} is not loaded; version {model.version} is")
        return model

    def load(self, name: str, version: int | None = None) -> LoadedModel:
        """Open ``name`` (newest version when None) unless that version is loaded; serving goes on meanwhile.

        With ``version`` None the newest version in the repository serves: when the loaded one is not
        it (a newer one was exported or imported since, or the loaded one was removed: a rollback, or
        replaced by another package under its number), the newest replaces it, as Triton's load does:
        the old one answers what it accepted, then closes.  With no version of ``name`` left in the
        repository the loader's :class:`~runtime.errors.ModelNotFoundError` is raised and the loaded
        version goes on serving (a load never unloads).
        """
        with self._load_lock:
            with self._lock:
                current = self._models.get(name)
            if current is not None and version is None:
                if self._newest_is(current):
                    return current
            elif current is not None and current.version == version:
                return current
            try:
                model = self._loader(name, version)
            except InferboxError as exc:
                # the version that failed, so that the repository index gives the reason (the newest on
                # disk when none was asked: the loader opens the newest)
                tried = version
                if tried is None:
                    tried = max((e.version for e in self._index() if e.name == name), default=None)
                logger.warning(
                    "model %s version %s did not load: %s", shown(name), tried if tried is not None else "?", exc
                )
                if tried is not None:
                    with self._lock:
                        self._errors[(name, tried)] = str(exc)
                raise
            with self._lock:
                self._errors.pop((name, model.version), None)
                unloaded = current is not None and self._models.get(name) is not current
            if unloaded:  # unloaded while the newer version opened: an unload that answered 200 stands
                model.close()
                raise ModelNotFoundError(f"model {shown(name)} was unloaded while version {model.version} was loading")
            self.add(model)
        if current is not None and current is not model:
            changes = interface_changes(current.manifest, model.manifest)
            if changes:  # export and import refuse it unless told it is meant: the clients may not know
                logger.warning(
                    "model %s version %d replaced version %d with another interface: %s; its clients written for "
                    "version %d may fail (a text route answering 404, vectors of another dimension)",
                    shown(name),
                    model.version,
                    current.version,
                    "; ".join(changes),
                    current.version,
                )
        return model

    def _newest_is(self, model: LoadedModel) -> bool:
        """Whether ``model`` is the newest version of its name in the repository (the same package: a
        version removed and exported again under its number is another one)."""
        entries = [e for e in self._index() if e.name == model.name]
        newest = max(entries, key=lambda e: e.version, default=None)
        if newest is None or newest.version != model.version:
            return False
        return not newest.sha256 or newest.sha256 == model.package_sha256

    def unload(self, name: str) -> None:
        with self._lock:
            model = self._models.pop(name, None)
            if model is not None:
                self._unloaded[name] = model.version
        if model is None:
            raise ModelNotFoundError(f"model {shown(name)} is not loaded{{loaded}}", loaded=sorted(self._models))
        self._notify("unload", model)
        self.retire(model)

    def loaded(self) -> list[LoadedModel]:
        with self._lock:
            return sorted(self._models.values(), key=lambda m: m.name)

    def readiness(self) -> list[tuple[str, int, bool]]:
        """(name, version, ready) for ``/metrics``, from what the registry holds (no package is read):
        each loaded version, ready; not ready, each version whose last load failed and each model
        unloaded on request (the version it had), while its version folder is in the repository (one
        ``stat`` each, where the registry knows the folder). The names and versions are the
        repository's: a load picks its version from the index, never from a client."""
        with self._lock:
            ready = {(m.name, m.version) for m in self._models.values()}
            other = {*self._errors, *self._unloaded.items()} - ready
        root = self._root
        if root is not None:
            other = {
                (name, version)
                for name, version in other
                if name and "/" not in name and not name.startswith(".") and (root / name / str(version)).is_dir()
            }
        return sorted([*((n, v, True) for n, v in ready), *((n, v, False) for n, v in other)])

    def index(self) -> list[IndexEntry]:
        """Every version on disk (from ``index``) plus what is loaded, with READY/UNAVAILABLE."""
        with self._lock:
            loaded = {(m.name, m.version) for m in self._models.values()}
            errors = dict(self._errors)
        seen: dict[tuple[str, int], IndexEntry] = {}
        for entry in self._index():
            key = (entry.name, entry.version)
            if key in loaded:
                seen[key] = IndexEntry(entry.name, entry.version, "READY", "")
            else:
                reason = self.public(errors.get(key, entry.reason))
                seen[key] = IndexEntry(entry.name, entry.version, "UNAVAILABLE", reason)
        for name, version in loaded:
            seen.setdefault((name, version), IndexEntry(name, version, "READY", ""))
        return [seen[k] for k in sorted(seen)]

    def public(self, message: str) -> str:
        """``message`` (a package's or a load's reason) for a client: the repository's files named
        relative to it (``broken/1/manifest.json``), not by the box's paths."""
        for root in self._roots:
            message = message.replace(root, "")
        return message

    def close(self) -> None:
        for model in self.loaded():
            self.unload(model.name)

    def _notify(self, event: str, model: LoadedModel) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, model)
            except Exception:
                logger.exception("registry listener failed on %s of %s", event, model.name)

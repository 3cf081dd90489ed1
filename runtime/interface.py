"""A model's interface as its clients see it, and what a new version changes of it.

The server serves the newest version of a name: a version whose task, tensors, embedding
dimension or labels differ from the one before breaks that name's clients at the next load
(``/v1/embeddings`` answers 404 for a tensor model; a vector index of 384 dimensions takes no
256-dimension vectors).  :func:`interface` is what a package declares of it (as the KServe
metadata shows it: a text model takes texts and answers one output), :func:`interface_changes`
the differences between two, which ``inferbox export`` and ``inferbox models import`` refuse
unless told the change is meant (:func:`check_new_interface`), and the server's load logs.
"""

from __future__ import annotations

from pathlib import Path

from runtime.errors import InferboxError
from runtime.manifest import Manifest, TensorSpec, decode_manifest

__all__ = [
    "POOLED_OUTPUT",
    "check_new_interface",
    "interface",
    "interface_changes",
    "newest_manifest",
    "refusal",
]

#: output name of a text embedding model whose pooling runs in the server (KServe's metadata)
POOLED_OUTPUT = "sentence_embedding"
_LABELS_SHOWN = 4


def _tensors(specs: list[TensorSpec]) -> str:
    return ", ".join(f"{s.name} {s.dtype} {s.shape}" for s in specs) or "none"


def _labels(labels: list[str] | None) -> str:
    if not labels:
        return "none"
    shown = ", ".join(map(repr, labels[:_LABELS_SHOWN])) + (", ..." if len(labels) > _LABELS_SHOWN else "")
    return f"{len(labels)} [{shown}]"


def interface(manifest: Manifest) -> dict[str, str]:
    """What clients of ``manifest``'s model depend on, by aspect: ``task``, ``inputs``, ``outputs``, and
    for a text model ``embedding dimension`` (feature extraction) or ``classes``, and ``labels``."""
    out: dict[str, str] = {"task": manifest.task}
    text = manifest.text
    if text is None:
        out["inputs"] = _tensors(manifest.inputs)
        out["outputs"] = _tensors(manifest.outputs)
    else:
        # as KServe shows a text model: one BYTES input of texts, one FP32 output [-1, D]
        name = text.output or (manifest.outputs[0].name if manifest.outputs else "")
        spec = next((o for o in manifest.outputs if o.name == name), None)
        dim = spec.shape[-1] if spec is not None and spec.shape else -1
        out["inputs"] = "text (texts)"
        out["outputs"] = f"{POOLED_OUTPUT if text.pooling != 'none' else name} float32"
        out["embedding dimension" if manifest.task == "feature-extraction" else "classes"] = str(dim)
    out["labels"] = _labels(manifest.labels)
    return out


def interface_changes(old: Manifest, new: Manifest) -> list[str]:
    """``"ASPECT OLD -> NEW"`` for each aspect of :func:`interface` that differs (empty: the same)."""
    before, after = interface(old), interface(new)
    changes = [
        f"{aspect} {before.get(aspect, 'none')} -> {after.get(aspect, 'none')}"
        for aspect in dict.fromkeys([*before, *after])
        if aspect != "labels" and before.get(aspect) != after.get(aspect)
    ]
    if (old.labels or []) != (new.labels or []):
        a, b = old.labels or [], new.labels or []
        change = f"labels {_labels(a)} -> {_labels(b)}"
        if _labels(a) == _labels(b):  # they differ past the ones shown
            i = next(i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y)
            change = f"labels[{i}] {a[i]!r} -> {b[i]!r}"
        changes.append(change)
    return changes


def newest_manifest(repository: Path, name: str) -> Manifest | None:
    """The manifest of the newest version of ``name`` in ``repository`` that reads, or None when there is none."""
    from runtime.package import MANIFEST, list_versions

    try:
        versions = list_versions(repository, name)
    except (InferboxError, OSError):
        return None
    for version in sorted(versions, reverse=True):
        path = Path(repository) / name / str(version) / MANIFEST
        try:
            manifest = decode_manifest(path.read_bytes(), where=str(path))
        except (InferboxError, OSError):
            continue  # a broken version is no interface to keep: the one before it is
        if manifest.name == name and manifest.version == version:
            return manifest
    return None


def check_new_interface(
    repository: Path,
    new: Manifest,
    *,
    allowed: bool,
    error: type[InferboxError],
    what: str,
    fix: str,
) -> None:
    """Raise ``error`` when ``new`` changes the interface of the newest version of its name in
    ``repository`` (unless ``allowed``: ``--new-interface``).  ``what`` names the new version
    (``"the new version"``), ``fix`` says what else to do than pass ``--new-interface``.  A version
    older than the newest (an old one imported again) is not compared: it does not become what serves."""
    if allowed:
        return
    old = newest_manifest(repository, new.name)
    if old is None or 0 < new.version < old.version:  # 0: an export's version, not known yet (the next)
        return
    changes = interface_changes(old, new)
    if changes:
        raise error(refusal(new.name, old.version, changes, what=what, fix=fix))


def refusal(name: str, old_version: int, changes: list[str], *, what: str, fix: str) -> str:
    """Why a new version of ``name`` is refused: its ``changes`` from ``old_version``, and what to do."""
    return (
        f"{what} of {name} changes its interface from version {old_version}: {'; '.join(changes)}. The server "
        f"serves the newest version of a name: at its next load {name}'s clients would get another model (a "
        f"text route answering 404, vectors of another dimension for an index). {fix}, or pass --new-interface "
        "if the change is meant"
    )

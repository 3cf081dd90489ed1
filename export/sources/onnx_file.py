"""An existing ONNX file -> a generic tensor model, reference = the fp32 ONNX itself (on ort-cpu).

Samples come from the customer (``.npz`` / ``.jsonl``, one array per input) or
are generated from the declared shapes: dynamic dimensions become 1 for the
batch axis and 16 elsewhere; integer inputs get values 0..255, floats a normal
distribution.  A file whose inputs all fix the batch axis (to B rows) is run in
calls of exactly B rows (:func:`runtime.manifest.fixed_batch`; whole calls only,
rows left over are dropped); the server then runs each request as sent, never
batching requests together.  Weights kept in external files beside the
``.onnx`` file (as ``torch.onnx.export`` writes them for large models) are read
and saved into the package's one ``model.onnx`` (up to protobuf's 2 GiB), and
the source hash covers them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.samples import read_arrays
from export.sources import Feeds, Prepared, hash_files, hash_path, onnx_io, tile_rows
from export.spec import STREAM_BATCH, STREAM_SCENARIO
from runtime.errors import SourceError
from runtime.manifest import TensorSpec, fixed_batch

if TYPE_CHECKING:
    from export.spec import ExportSpec

__all__ = ["external_files", "generate", "prepare"]

DYNAMIC_SIZE = 16


def generate(inputs: list[TensorSpec], n: int, seed: int) -> Feeds:
    rng = np.random.default_rng(seed)
    out: Feeds = {}
    for spec in inputs:
        shape = [n] + [d if d > 0 else DYNAMIC_SIZE for d in spec.shape[1:]]
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            out[spec.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            out[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
        else:
            out[spec.name] = rng.integers(0, 256, size=shape).astype(dtype)
    return out


#: protobuf's limit on one serialized model; a larger model keeps its weights in external files
PROTOBUF_LIMIT = 2 * 1024**3 - 1


def _tensors(graph: Any) -> Iterator[Any]:
    """Every TensorProto of a graph: initializers and tensor attributes, subgraphs included."""
    from onnx import AttributeProto

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == AttributeProto.TENSORS:
                yield from attr.tensors
            elif attr.type == AttributeProto.GRAPH:
                yield from _tensors(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _tensors(sub)


def external_files(path: Path) -> list[Path]:
    """The files beside ``path`` that its tensors keep their data in (``torch.onnx.export`` writes
    ``model.onnx.data`` for large models), sorted; each must exist inside the model's folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.resolve()
    found: set[Path] = set()
    for tensor in _tensors(model.graph):
        if not uses_external_data(tensor):
            continue
        location = ExternalDataInfo(tensor).location
        target = (folder / location).resolve()
        if not target.is_relative_to(folder):
            raise SourceError(
                f"{path.name}: tensor {tensor.name!r} keeps its data in {location!r}, outside the model's folder; "
                "only files beside the .onnx file are read"
            )
        if not target.is_file():
            raise SourceError(
                f"{path.name}: tensor {tensor.name!r} keeps its data in {location!r}, which is not in {folder}; "
                "copy the weights file next to the .onnx file"
            )
        found.add(target)
    return sorted(found)


def _inline_external_data(path: Path, external: list[Path], target: Path) -> None:
    """Save the model with its external weights as one self-contained file (under protobuf's
    2 GB limit), so every later step (optimizer, quantizers, OpenVINO) reads one file."""
    import onnx

    size = path.stat().st_size + sum(f.stat().st_size for f in external)
    if size > PROTOBUF_LIMIT:
        raise SourceError(
            f"{path.name} and its weights ({', '.join(f.name for f in external)}) take {size / 1024**3:.1f} GiB: "
            "models over 2 GiB are not supported yet; export a smaller model"
        )
    onnx.save(onnx.load(str(path)), str(target))


def _batch_axis(inputs: list[TensorSpec]) -> int | None:
    """The rows of every call when the inputs fix the batch axis, None when it is dynamic; inputs
    that fix different sizes (or mix fixed and dynamic) have no common batch axis to run."""
    fixed = fixed_batch(inputs)
    firsts = {spec.name: spec.shape[0] for spec in inputs if spec.shape}
    if fixed is None and any(size > 0 for size in firsts.values()):
        raise SourceError(
            f"the inputs' first axes are {firsts} (-1: dynamic): a batch axis must be dynamic in every input or "
            "fixed to the same size in every input; re-export the ONNX file that way"
        )
    return fixed


def prepare(spec: ExportSpec, staging: Path, reference_run: Any) -> Prepared:
    """``reference_run(onnx_path, batches) -> array`` runs the fp32 file on ort-cpu (the pipeline's runner)."""
    path = Path(spec.source)
    if not path.exists():
        raise SourceError(f"source {path} does not exist; give an .onnx file, a Hugging Face folder or a module")
    if spec.task != "tensor":
        raise SourceError(f"an ONNX file imports as task 'tensor', not {spec.task!r}; pass --task tensor")
    inputs, outputs = onnx_io(path)
    onnx_path = staging / "onnx" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    external = external_files(path)
    if external:
        _inline_external_data(path, external, onnx_path)
    else:
        shutil.copyfile(path, onnx_path)
    expected = {i.name: i.dtype for i in inputs}

    def samples(given: Any, n: int, seed: int) -> Feeds:
        if given is None:
            return generate(inputs, n, seed)
        if isinstance(given, str | Path):
            return read_arrays(Path(given), expected)
        missing = [k for k in expected if k not in given]
        if missing:
            raise SourceError(f"samples lack inputs {missing}; give every input of the model")
        return {k: np.asarray(given[k]).astype(expected[k]) for k in expected}

    val = samples(spec.validation, 64, 1)
    cal = samples(spec.calibration, 32, 2)
    n = len(next(iter(val.values())))
    # a file whose inputs fix the batch axis (exported with batch 1, say) takes exactly that many
    # rows per call: validation, calibration and timing run in calls of that size
    fixed = _batch_axis(inputs)
    step = fixed or 32
    if fixed is not None:
        # whole calls only (rows left over are not validated twice); fewer rows than one call
        # are repeated to fill it
        val = tile_rows(val, fixed) if n < fixed else {k: v[: n - n % fixed] for k, v in val.items()}
        cal = tile_rows(cal, fixed) if len(next(iter(cal.values()))) < fixed else cal
        n = len(next(iter(val.values())))
    validation = [{k: v[i : i + step] for k, v in val.items()} for i in range(0, n, step)]
    one = fixed or 1
    n_cal = len(next(iter(cal.values())))
    calibration = [{k: v[i : i + one] for k, v in cal.items()} for i in range(0, n_cal - n_cal % one, one)]
    output = outputs[0].name
    return Prepared(
        kind="onnx",
        task="tensor",
        source=str(path.resolve()),
        source_sha256=hash_path(path) if not external else hash_files(path.parent, [path, *external]),
        onnx_path=onnx_path,
        inputs=inputs,
        outputs=outputs,
        reference_name="onnx-fp32",
        validation=validation,
        calibration=calibration,
        reference=reference_run(onnx_path, validation, output),
        timing={
            "b1": (tile_rows(val, fixed or 1), None),
            "b32-typical": (tile_rows(val, fixed or 32), None),
            STREAM_SCENARIO: (tile_rows(val, fixed or STREAM_BATCH), None),
        },
        output=output,
        validation_labels=spec.validation_labels,
        notes={"validation_samples": str(n), "calibration_samples": str(len(calibration))},
    )

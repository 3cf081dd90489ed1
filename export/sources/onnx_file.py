"""An existing ONNX file -> a generic tensor model, reference = the fp32 ONNX itself (on ort-cpu).

Samples come from the customer (``.npz`` / ``.jsonl``, one array per input) or
are generated from the declared shapes: dynamic dimensions become 1 for the
batch axis and 16 elsewhere; integer inputs get values 0..255, floats a normal
distribution.  A file whose inputs all fix the batch axis (to B rows) is run in
calls of exactly B rows (:func:`runtime.manifest.fixed_batch`; whole calls only,
rows left over are dropped); the server then runs each request as sent, never
batching requests together.  Weights kept in external files beside the
``.onnx`` file (as ``torch.onnx.export``'s dynamo exporter writes them) are read
and saved into the package's one ``model.onnx`` (up to protobuf's 2 GiB), and
the source hash covers them.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from export.samples import GENERATED, read_arrays, sources_of
from export.sources import Feeds, Prepared, hash_files, hash_path, onnx_io, tile_rows
from export.spec import STREAM_BATCH, STREAM_SCENARIO
from runtime.errors import SourceError
from runtime.manifest import TensorSpec, fixed_batch

if TYPE_CHECKING:
    from export.spec import ExportSpec

__all__ = ["external_files", "generate", "inline_external_data", "prepare"]

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


def external_files(path: Path) -> dict[str, Path]:
    """Location -> file, for every tensor of ``path`` that keeps its data in a file beside it
    (``torch.onnx.export`` writes ``model.onnx.data``), sorted by location.  Each must be a
    regular file (not a link) inside the model's folder, and what the tensors read from them
    must fit in one model (protobuf's 2 GiB)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo

    from runtime.package import onnx_tensors

    model = onnx.load(str(path), load_external_data=False)
    folder = path.parent.absolute()
    found: dict[str, Path] = {}
    size = path.stat().st_size
    for tensor in onnx_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = ExternalDataInfo(tensor)
        location = str(info.location)
        what = f"{path.name}: tensor {tensor.name!r} keeps its data in {location!r}"
        target = folder / location  # an absolute location replaces the folder: caught below
        if target.is_symlink():
            raise SourceError(f"{what}, which is a link; copy the file itself next to the .onnx file")
        if not location or not target.resolve().is_relative_to(folder.resolve()):
            raise SourceError(f"{what}, outside the model's folder; only files beside the .onnx file are read")
        if not target.is_file():
            raise SourceError(f"{what}, which is not in {folder}; copy the weights file next to the .onnx file")
        found[location] = target
        length = int(info.length) if info.length else target.stat().st_size - int(info.offset or 0)
        size += max(0, length)
    if size > PROTOBUF_LIMIT:
        raise SourceError(
            f"{path.name} and the weights its tensors read ({', '.join(found)}) take {size / 1024**3:.1f} GiB: "
            "models over 2 GiB are not supported yet; export a smaller model"
        )
    return dict(sorted(found.items()))


def inline_external_data(path: Path, target: Path) -> None:
    """Save the model with its external weights as one self-contained file, so every later step
    (optimizer, quantizers, OpenVINO) reads one file."""
    import onnx

    from runtime.package import onnx_tensors

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx's checks of locations, offsets and lengths
        raise SourceError(f"{path.name}: its external weights cannot be read ({exc}); re-export the model") from exc
    left = [t.name for t in onnx_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL]
    if left:
        raise SourceError(f"{path.name}: tensors {left} stay external after loading (sparse tensors?); not supported")
    if model.ByteSize() > PROTOBUF_LIMIT:
        raise SourceError(f"{path.name} with its weights is over 2 GiB: not supported yet; export a smaller model")
    onnx.save(model, str(target))


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
    """``reference_run(onnx_path, batches) -> {output: array}`` runs the fp32 file on ort-cpu (the
    pipeline's runner) and returns every output (the server returns them all)."""
    path = Path(spec.source)
    if not path.exists():
        raise SourceError(f"source {path} does not exist; give an .onnx file, a Hugging Face folder or a module")
    if spec.task != "tensor":
        raise SourceError(f"an ONNX file imports as task 'tensor', not {spec.task!r}; pass --task tensor")
    inputs, outputs = onnx_io(path)
    expected = {i.name: i.dtype for i in inputs}
    shapes = {i.name: list(i.shape[1:]) for i in inputs}  # -1: a free axis

    def samples(given: Any, n: int, seed: int) -> Feeds:
        if given is None:
            return generate(inputs, n, seed)
        if isinstance(given, str | Path):
            return read_arrays(Path(given), expected, shapes=shapes)
        missing = [k for k in expected if k not in given]
        if missing:
            raise SourceError(f"samples lack inputs {missing}; give every input of the model")
        arrays = {k: np.asarray(given[k]).astype(expected[k]) for k in expected}
        rows = {k: int(a.shape[0]) if a.ndim else 0 for k, a in arrays.items()}
        if len(set(rows.values())) != 1 or 0 in rows.values():
            raise SourceError(f"samples need the same number of rows (at least one) in every input; got {rows}")
        return arrays

    # the customer's own rows for both when only one kind was given: random rows decided what passed
    val_given = spec.validation if spec.validation is not None else spec.calibration
    cal_given = spec.calibration if spec.calibration is not None else spec.validation
    val = samples(val_given, 64, 1)  # sample files are read before the (large) file is copied
    cal = samples(cal_given, 32, 2)
    onnx_path = staging / "onnx" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    external = external_files(path)
    if external:
        inline_external_data(path, onnx_path)
    else:
        shutil.copyfile(path, onnx_path)
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
    references = reference_run(onnx_path, validation)
    return Prepared(
        kind="onnx",
        task="tensor",
        source=str(path.resolve()),
        source_sha256=hash_files([(path.name, path), *external.items()]) if external else hash_path(path),
        onnx_path=onnx_path,
        inputs=inputs,
        outputs=outputs,
        reference_name="onnx-fp32",
        validation=validation,
        calibration=calibration,
        reference=references[output],
        output_references={k: v for k, v in references.items() if k != output},
        timing={
            "b1": (tile_rows(val, fixed or 1), None),
            "b32-typical": (tile_rows(val, fixed or 32), None),
            STREAM_SCENARIO: (tile_rows(val, fixed or STREAM_BATCH), None),
        },
        output=output,
        validation_labels=spec.validation_labels,
        notes={
            "validation_samples": str(n),
            "calibration_samples": str(len(calibration)),
            **sources_of(spec, made=GENERATED),
        },
    )

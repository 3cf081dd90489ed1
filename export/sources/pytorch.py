"""A PyTorch ``nn.Module`` with example inputs -> ONNX (TorchScript exporter), reference = the module.

Every input and output gets a dynamic batch dimension (axis 0); other axes keep
the example's sizes.  The answer is the first output (logits for
classification tasks); the module's other outputs (a tuple) are the reference of
the graph's other outputs, which the server returns too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from export.samples import GENERATED, read_arrays, sources_of
from export.sources import Feeds, Prepared, join_parts, onnx_io, tile_rows
from export.spec import STREAM_BATCH, STREAM_SCENARIO
from runtime.errors import SourceError

if TYPE_CHECKING:
    from export.spec import ExportSpec

__all__ = ["OPSET", "generate_like", "load_factory", "prepare"]

OPSET = 17
_TASKS = ("image-classification", "text-classification", "tensor")


def load_factory(ref: str) -> Any:
    """``path/to/module.py:factory`` -> the object ``factory()`` returns (CLI sources)."""
    import importlib.util

    path_s, sep, attr = ref.rpartition(":")
    path = Path(path_s)
    if not sep or not path.is_file() or not attr:
        raise SourceError(f"{ref!r} is not FILE.py:FACTORY with an existing file; e.g. models/net.py:build")
    module_spec = importlib.util.spec_from_file_location(f"inferbox_user_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise SourceError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the customer's code: a SyntaxError, a missing import, anything
        raise SourceError(f"{path} failed to import ({type(exc).__name__}: {exc}); fix the file") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SourceError(f"{path} has no callable {attr!r}")
    try:
        return factory()
    except Exception as exc:  # a corrupt or missing checkpoint, a bug in the factory
        raise SourceError(
            f"{ref}: the factory raised {type(exc).__name__}: {exc}; fix the factory or the files it loads"
        ) from exc


def generate_like(example: Mapping[str, npt.NDArray[np.generic]], n: int, seed: int) -> Feeds:
    """``n`` rows shaped like ``example``: normal floats, or ints within the example's range."""
    rng = np.random.default_rng(seed)
    out: Feeds = {}
    for k, v in example.items():
        shape = (n, *np.shape(v)[1:])
        if np.issubdtype(v.dtype, np.floating):
            out[k] = rng.standard_normal(shape).astype(v.dtype)
        else:
            hi = max(int(np.max(v)) + 1, 2) if v.size else 2
            out[k] = rng.integers(0, hi, size=shape).astype(v.dtype)
    return out


def _arrays(given: Any, example: Mapping[str, npt.NDArray[np.generic]], n: int, seed: int) -> Feeds:
    """Samples like ``example``: generated, read from a file, or given as arrays; a row's shape must be
    the example's (the export keeps every axis but the batch axis at the example's size)."""
    expected = {k: str(v.dtype) for k, v in example.items()}
    shapes = {k: list(np.shape(v)[1:]) for k, v in example.items()}
    if given is None:
        return generate_like(example, n, seed)
    if isinstance(given, str | Path):
        return read_arrays(Path(given), expected, shapes=shapes)
    missing = [k for k in example if k not in given]
    if missing:
        raise SourceError(f"samples lack inputs {missing}; give every input of the example")
    arrays = {k: np.asarray(given[k]).astype(expected[k]) for k in example}
    for k, a in arrays.items():
        if list(a.shape[1:]) != shapes[k] or len(a) == 0:
            raise SourceError(
                f"samples for input {k!r} have shape {list(a.shape)}, the model takes [N, "
                + ", ".join(map(str, shapes[k]))
                + "] (the example's shape); give rows of that shape"
            )
    return arrays


def prepare(spec: ExportSpec, staging: Path) -> Prepared:
    import torch

    module = spec.source
    if not isinstance(module, torch.nn.Module):
        raise SourceError(f"source {module!r} is not a torch.nn.Module")
    if spec.task not in _TASKS:
        raise SourceError(f"task {spec.task!r} is not supported for a PyTorch module; use one of {_TASKS}")
    if not spec.example_inputs:
        raise SourceError("a PyTorch source needs example_inputs (input name -> array with a batch axis)")
    example = {k: np.asarray(v) for k, v in spec.example_inputs.items()}
    names = list(example)
    out_names = list(spec.output_names or ["output"])
    module = module.eval()
    # sample files are read before the export: a bad one is found before the slow part
    # the customer's own rows for both when only one kind was given: random rows decided what passed
    val = _arrays(spec.validation if spec.validation is not None else spec.calibration, example, 64, 1)
    cal = _arrays(spec.calibration if spec.calibration is not None else spec.validation, example, 32, 2)
    onnx_path = staging / "onnx" / "model.onnx"
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    # only the inputs' batch axis is named: torch carries the name to each output axis that really is
    # it (a [T, N, F] output gets it on axis 1, a Reshape(-1, ...) gets its own names), so the server
    # never splits an output along an axis that is not the batch (runtime.serving.LoadedModel.batchable)
    dynamic = {n: {0: "batch"} for n in names}
    try:
        with torch.inference_mode():
            torch.onnx.export(
                module,
                tuple(torch.from_numpy(example[n]) for n in names),
                str(onnx_path),
                input_names=names,
                output_names=out_names,
                dynamic_axes=dynamic,
                opset_version=OPSET,
                dynamo=False,
            )
    except Exception as exc:
        raise SourceError(
            f"torch.onnx.export failed for {type(module).__name__} ({type(exc).__name__}: {exc})"
        ) from exc
    inputs, outputs = onnx_io(onnx_path)
    n = len(next(iter(val.values())))
    validation = [{k: v[i : i + 32] for k, v in val.items()} for i in range(0, n, 32)]
    calibration = [{k: v[i : i + 1] for k, v in cal.items()} for i in range(len(next(iter(cal.values()))))]
    graph_outputs = [o.name for o in outputs]
    refs: dict[str, list[npt.NDArray[np.float32]]] = {}
    with torch.inference_mode():
        for b in validation:
            try:
                y = module(*(torch.from_numpy(np.ascontiguousarray(b[k])) for k in names))
            except Exception as exc:  # the customer's module, on rows it did not take at the export
                raise SourceError(
                    f"{type(module).__name__} failed on the validation samples ({type(exc).__name__}: {exc}); "
                    "give samples the module takes, shaped like the example inputs"
                ) from exc
            ys = list(y) if isinstance(y, tuple | list) else [y]
            if len(ys) != len(graph_outputs) or not all(isinstance(t, torch.Tensor) for t in ys):
                ys = ys[:1]  # nested outputs: the others are compared with the fp32 ONNX file's
            for name, t in zip(graph_outputs, ys, strict=False):
                refs.setdefault(name, []).append(t.float().numpy())
    answer = graph_outputs[0]
    rows = [len(next(iter(b.values()))) for b in validation]
    cls = f"{type(module).__module__}.{type(module).__qualname__}"
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        digest.update(key.encode() + b"\0" + tensor.detach().cpu().contiguous().numpy().tobytes())
    return Prepared(
        kind="pytorch",
        task=spec.task,
        source=f"{spec.source_label} ({cls})" if spec.source_label else cls,
        source_sha256=digest.hexdigest(),
        onnx_path=onnx_path,
        inputs=inputs,
        outputs=outputs,
        reference_name="pytorch",
        validation=validation,
        calibration=calibration,
        reference=join_parts(refs[answer], rows),
        output_references={k: join_parts(v, rows) for k, v in refs.items() if k != answer},
        timing={
            "b1": (tile_rows(val, 1), None),
            "b32-typical": (tile_rows(val, 32), None),
            STREAM_SCENARIO: (tile_rows(val, STREAM_BATCH), None),
        },
        output=answer,
        labels=list(spec.labels) if spec.labels else None,
        validation_labels=spec.validation_labels,
        notes={
            "validation_samples": str(n),
            "calibration_samples": str(len(calibration)),
            **sources_of(spec, made=GENERATED),
        },
    )

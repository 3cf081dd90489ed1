"""``fake``: a deterministic backend, so the whole server is testable without a real model.

It opens either an ONNX file (reading only input/output names, dtypes and shapes,
never the weights) or a small JSON spec::

    {"inputs":  [{"name": "x", "dtype": "float32", "shape": [-1, 4]}],
     "outputs": [{"name": "y", "dtype": "float32", "shape": [-1, 3]}]}

Each output row is a pure function of the matching input rows: a generator
seeded by the sha256 of every input's row (trailing zeros dropped, so padding a
row with zeros does not change it) and the output's name.  Hence row ``i`` of a
batch equals running row ``i`` alone, and, for token-level outputs, the first
``n`` positions of a padded row equal those of the unpadded row (so masked mean
pooling gives the same answer).  Non-batch dynamic output dimensions take the
size of the input dimension with the same symbolic name, else 1.

``FakeBackend(delay_s=...)`` sleeps in every ``run`` (through an injectable
``sleep``) for queue and timeout tests; each session records the batch sizes it
ran in ``batch_sizes``.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.backends.base import OpenOptions, Probe
from runtime.backends.checks import TensorInfo, check_inputs, check_outputs
from runtime.errors import BackendError

if TYPE_CHECKING:
    import numpy.typing as npt

    from runtime.hardware import HardwareProfile

__all__ = ["FakeBackend", "FakeSession", "FakeTensor"]


@dataclass(frozen=True)
class FakeTensor:
    """A tensor of the fake model. ``shape`` entries: int (fixed), None or a symbolic name (dynamic)."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


def _row_digest(inputs: dict[str, npt.NDArray[np.generic]], names: tuple[str, ...], row: int) -> bytes:
    h = hashlib.sha256()
    for name in sorted(names):
        flat = np.ascontiguousarray(inputs[name][row]).reshape(-1)
        nonzero = np.flatnonzero(flat)
        end = int(nonzero[-1]) + 1 if nonzero.size else 0
        h.update(name.encode() + b"\0" + str(flat.dtype).encode() + b"\0")
        h.update(flat[:end].tobytes())
        h.update(b"\1")
    return h.digest()


class FakeSession:
    """Deterministic outputs shaped like the model's; no computation worth the name."""

    def __init__(
        self,
        inputs: tuple[FakeTensor, ...],
        outputs: tuple[FakeTensor, ...],
        delay_s: float,
        sleep: Callable[[float], None],
    ) -> None:
        self.backend = "fake"
        self.active: tuple[str, ...] = ("fake",)
        self.fallback: str | None = None
        self.exec_precision = "fp32"
        self.input_names = tuple(t.name for t in inputs)
        self.output_names = tuple(t.name for t in outputs)
        self.batch_sizes: list[int] = []
        self._inputs = inputs
        self._outputs = outputs
        self._checks = tuple(
            TensorInfo(
                name=t.name,
                dtype=np.dtype(t.dtype),
                shape=tuple(d if isinstance(d, int) and d >= 0 else None for d in t.shape),
            )
            for t in inputs
        )
        self._delay_s = delay_s
        self._sleep = sleep
        self._lock = threading.Lock()
        self._closed = False

    def _out_shape(self, out: FakeTensor, inputs: dict[str, npt.NDArray[np.generic]]) -> tuple[int, ...]:
        dims: list[int] = []
        for axis, d in enumerate(out.shape[1:], start=1):
            if isinstance(d, int) and d >= 0:
                dims.append(d)
                continue
            size = 1
            for t in self._inputs:
                if isinstance(d, str) and d in t.shape:
                    size = int(inputs[t.name].shape[t.shape.index(d)])
                    break
            else:
                first = self._inputs[0] if self._inputs else None
                if d is None and first is not None and axis < inputs[first.name].ndim:
                    size = int(inputs[first.name].shape[axis])
            dims.append(size)
        return tuple(dims)

    def run(
        self, inputs: dict[str, npt.NDArray[np.generic]], outputs: list[str] | None = None
    ) -> dict[str, npt.NDArray[np.generic]]:
        if self._closed:
            raise BackendError("fake session is closed; open a new one")
        check_inputs(inputs, self._checks)
        names = check_outputs(outputs, self.output_names)
        batch = int(inputs[self.input_names[0]].shape[0]) if self.input_names else 1
        if self._delay_s > 0:
            self._sleep(self._delay_s)
        with self._lock:
            self.batch_sizes.append(batch)
        digests = [_row_digest(inputs, self.input_names, i) for i in range(batch)]
        result: dict[str, npt.NDArray[np.generic]] = {}
        for out in self._outputs:
            if out.name not in names:
                continue
            trailing = self._out_shape(out, inputs)
            size = int(np.prod(trailing, dtype=np.int64))
            dtype = np.dtype(out.dtype)
            rows = []
            for digest in digests:
                seed = int.from_bytes(hashlib.sha256(digest + out.name.encode()).digest()[:8], "little")
                rng = np.random.default_rng(seed)
                if np.issubdtype(dtype, np.floating):
                    values: npt.NDArray[np.generic] = rng.standard_normal(size).astype(dtype)
                elif dtype == np.bool_:
                    values = rng.integers(0, 2, size).astype(dtype)
                else:
                    values = rng.integers(0, 100, size).astype(dtype)
                rows.append(values.reshape(trailing))
            result[out.name] = np.stack(rows) if rows else np.zeros((0, *trailing), dtype=dtype)
        return {name: result[name] for name in names}

    def close(self) -> None:
        self._closed = True


def _onnx_tensors(path: Path) -> tuple[tuple[FakeTensor, ...], tuple[FakeTensor, ...]]:
    import onnx
    from onnx import helper

    model = onnx.load(str(path), load_external_data=False)
    initializers = {i.name for i in model.graph.initializer}

    def convert(vi: Any) -> FakeTensor:
        tt = vi.type.tensor_type
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).name
        shape: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                shape.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                shape.append(d.dim_param)
            else:
                shape.append(None)
        return FakeTensor(name=vi.name, dtype=dtype, shape=tuple(shape))

    inputs = tuple(convert(vi) for vi in model.graph.input if vi.name not in initializers)
    return inputs, tuple(convert(vi) for vi in model.graph.output)


def _json_tensors(path: Path) -> tuple[tuple[FakeTensor, ...], tuple[FakeTensor, ...]]:
    spec = json.loads(path.read_text())

    def convert(t: dict[str, Any]) -> FakeTensor:
        shape = tuple(None if d == -1 else d for d in t["shape"])
        return FakeTensor(name=str(t["name"]), dtype=str(t.get("dtype", "float32")), shape=shape)

    return tuple(convert(t) for t in spec["inputs"]), tuple(convert(t) for t in spec["outputs"])


class FakeBackend:
    """Always usable; the lowest speed class, so never picked over a real backend."""

    name = "fake"

    def __init__(self, delay_s: float = 0.0, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self.delay_s = delay_s
        self._sleep = sleep

    def probe(self, profile: HardwareProfile | None = None) -> Probe:
        return Probe(
            name="fake",
            usable=True,
            reason="deterministic fake outputs (tests only)",
            runtime="fake",
            device="cpu",
            precisions=("fp32",),
            formats=("onnx",),
            speed_class=0,
        )

    def open(self, model_path: Path, options: OpenOptions) -> FakeSession:
        try:
            if model_path.suffix == ".json":
                inputs, outputs = _json_tensors(model_path)
            else:
                inputs, outputs = _onnx_tensors(model_path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BackendError(f"fake backend cannot read {model_path}: {exc}") from exc
        except Exception as exc:  # onnx's DecodeError and friends
            raise BackendError(f"fake backend cannot read {model_path}: {type(exc).__name__}: {exc}") from exc
        if not outputs:
            raise BackendError(f"fake backend: {model_path} declares no outputs")
        return FakeSession(inputs, outputs, self.delay_s, self._sleep)

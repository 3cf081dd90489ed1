"""Input checks shared by the backends, so every backend reports bad input the same way.

A request that does not fit the model is an :class:`~runtime.errors.InputError`
naming the field, raised before the runtime sees it (runtimes' own messages
are cryptic and differ between ONNX Runtime and OpenVINO).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from runtime.errors import InputError

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["TensorInfo", "check_inputs", "check_outputs", "physical_threads"]


@dataclass(frozen=True)
class TensorInfo:
    """A graph input as a backend sees it. ``None`` in ``shape`` is a dynamic dimension."""

    name: str
    dtype: np.dtype[np.generic] | None  # None: not known / not checked
    shape: tuple[int | None, ...] | None  # None: rank unknown


def check_inputs(inputs: Mapping[str, npt.NDArray[np.generic]], specs: Sequence[TensorInfo]) -> None:
    """Raise :class:`InputError` for missing / unknown inputs, wrong dtype, rank or fixed dim."""
    names = [s.name for s in specs]
    for name in inputs:
        if name not in names:
            raise InputError(f"unknown input {name!r}; the model takes {names}", field=name)
    for spec in specs:
        if spec.name not in inputs:
            raise InputError(f"missing input {spec.name!r}; the model takes {names}", field=spec.name)
        arr = inputs[spec.name]
        if not isinstance(arr, np.ndarray):
            raise InputError(f"input {spec.name!r} must be a numpy array, got {type(arr).__name__}", field=spec.name)
        if spec.dtype is not None and arr.dtype != spec.dtype:
            raise InputError(
                f"input {spec.name!r} has dtype {arr.dtype}, the model wants {spec.dtype}", field=spec.name
            )
        if spec.shape is None:
            continue
        if arr.ndim != len(spec.shape):
            raise InputError(
                f"input {spec.name!r} has shape {list(arr.shape)} (rank {arr.ndim}), the model wants rank "
                f"{len(spec.shape)}: {[-1 if d is None else d for d in spec.shape]}",
                field=spec.name,
            )
        for axis, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
            if want is not None and got != want:
                raise InputError(
                    f"input {spec.name!r} has size {got} on axis {axis}, the model wants {want}", field=spec.name
                )


def check_outputs(outputs: Sequence[str] | None, output_names: Sequence[str]) -> list[str]:
    """The requested output names (all when ``outputs`` is None); unknown ones are an InputError."""
    if outputs is None:
        return list(output_names)
    for name in outputs:
        if name not in output_names:
            raise InputError(f"unknown output {name!r}; the model has {list(output_names)}", field="outputs")
    return list(outputs)


def physical_threads(requested: int) -> int:
    """``requested`` threads, or the physical cores this process may use when it is 0."""
    if requested > 0:
        return requested
    from runtime.hardware import default_threads

    return default_threads()

"""Triton's classification extension: an output answered as its top classes instead of raw values.

A request asks for it per output, ``"outputs": [{"name": "logits",
"parameters": {"classification": 3}}]``; that output then comes back as a
BYTES tensor of shape ``[N, k]`` for a model that batches (each row's values
ranked: ``[N]`` gives ``[N, 1]``, ``[N, H, W]`` ranks each row's ``H*W``), else
``[k]`` of all the output's values,
each element ``"<value>:<index>"`` or, when the package knows the class names
(``labels`` in the manifest: a Hugging Face model's ``id2label``),
``"<value>:<index>:<label>"``, highest value first (ties: lower index first),
as tritonclient's ``InferRequestedOutput(name, class_count=k)`` reads it.
The values are the model's own (logits stay logits), as in Triton.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.errors import InputError

__all__ = ["BytesTensor", "classification_count", "classify"]

PARAMETER = "classification"


@dataclass(frozen=True)
class BytesTensor:
    """A BYTES output with its shape (row major ``values``)."""

    values: list[str]
    shape: list[int]


def classification_count(parameters: dict[str, Any], where: str) -> int | None:
    """The ``classification`` parameter of one requested output: a count >= 1, or None when absent."""
    if PARAMETER not in parameters:
        return None
    value = parameters[PARAMETER]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(
            f"{where}.{PARAMETER}: must be a whole number of classes >= 1, got {value!r:.40}",
            field=f"{where}.{PARAMETER}",
        )
    return value


def classify(
    name: str, value: Any, count: int, labels: Sequence[str] | None, where: str, *, batched: bool
) -> BytesTensor:
    """The top ``count`` classes of output ``name``: of each row's values when the model batches
    (its first axis is the batch: ``[N, ...]`` -> ``[N, k]``), else of all its values (``[k]``),
    as Triton reads an output."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or (batched and arr.ndim < 1):
        raise InputError(
            f"{where}.{PARAMETER}: output {name!r} is {arr.dtype.name} {list(arr.shape)}; classification needs "
            "numeric scores; ask for the tensor itself instead",
            field=f"{where}.{PARAMETER}",
        )
    # explicit widths: reshape(0, -1) cannot infer the width of an empty batch
    rows = arr.reshape(arr.shape[0], math.prod(arr.shape[1:])) if batched else arr.reshape(1, arr.size)
    classes = rows.shape[1]
    if classes == 0:
        shape = [arr.shape[0], 0] if batched else [0]
        return BytesTensor([], shape)
    k = min(count, classes)
    names = list(labels) if labels is not None and len(labels) == classes else None
    # highest first; a stable sort of the negated scores keeps the lower index first among ties
    order = np.argsort(-rows.astype(np.float64), axis=1, kind="stable")[:, :k]
    is_float = arr.dtype.kind == "f"
    values: list[str] = []
    for row, picks in zip(rows, order, strict=True):
        for index in picks.tolist():
            score = row[index]
            text = f"{float(score):f}" if is_float else str(int(score))
            values.append(f"{text}:{index}:{names[index]}" if names is not None else f"{text}:{index}")
    shape = [rows.shape[0], k] if batched else [k]
    return BytesTensor(values, shape)

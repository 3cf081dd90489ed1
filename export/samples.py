"""Calibration and validation sample files: texts (JSONL / CSV) and tensors (NPZ / JSONL).

Every bad row is reported with its row number (1-based line of the file) in a
:class:`~runtime.errors.CalibrationError`, so the customer can fix the file.
Files are UTF-8; a byte-order mark (Excel's "CSV UTF-8") is allowed.  Tensor rows
holding NaN or infinity are refused: the server refuses them too, and a reference
that is NaN fails every accuracy gate for no fixable reason.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from runtime.errors import CalibrationError

__all__ = [
    "GENERATED",
    "PROJECT_TEXTS",
    "check_shapes",
    "default_texts",
    "read_arrays",
    "read_texts",
    "sample_source",
    "sources_of",
]

#: what the notes say of samples made up from the inputs' shapes (no file given)
GENERATED = "GENERATED: random rows shaped like the inputs, not your data (pass --validation / --calibration FILE)"
#: what they say of the project's own sample texts (no file given)
PROJECT_TEXTS = "the project's sample texts, not yours (pass --validation / --calibration FILE)"

_MAX_ERRORS = 5
#: UTF-8, with or without a byte-order mark
_ENCODING = "utf-8-sig"
_NOT_UTF8 = "is not UTF-8 ({exc}); save it as UTF-8"


def read_texts(path: Path) -> list[str]:
    """Texts from ``.jsonl`` (``{"text": ...}`` or a JSON string per line) or ``.csv`` (a ``text`` column).

    Only the text is read: other fields or columns (an id, a ``label``) are ignored, so a
    labelled data set can be given as it is; labels are not read from files (the export
    CLI has no label gate; see docs/cli.md).
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"sample file {path} does not exist; give a JSONL or CSV file of texts")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        texts = _read_jsonl_texts(path)
    elif suffix in (".csv", ".tsv"):
        texts = _read_csv_texts(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise CalibrationError(f"sample file {path}: unknown format {suffix!r}; use .jsonl, .csv or .tsv")
    if not texts:
        raise CalibrationError(f"sample file {path} holds no texts; add at least one row")
    return texts


def _fail(path: Path, errors: list[str]) -> None:
    more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
    raise CalibrationError(f"sample file {path} has bad rows: " + "; ".join(errors[:_MAX_ERRORS]) + more)


def _read_jsonl_texts(path: Path) -> list[str]:
    texts: list[str] = []
    errors: list[str] = []
    for row, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"row {row}: not valid JSON ({exc.msg})")
            continue
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str) or not text:
            errors.append(f'row {row}: expected {{"text": "<non-empty string>"}}')
            continue
        texts.append(text)
    if errors:
        if path.suffix.lower() == ".json" and any("not valid JSON" in e for e in errors):
            errors[0] += "; the file is read as JSON Lines: one string or object per line, not one JSON array"
        _fail(path, errors)
    return texts


def _read_csv_texts(path: Path, delimiter: str) -> list[str]:
    texts: list[str] = []
    errors: list[str] = []
    try:
        with path.open(newline="", encoding=_ENCODING) as f:
            reader = csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return []
            column = header.index("text") if "text" in header else None
            if column is None:
                raise CalibrationError(f"sample file {path}: row 1 must be a header with a 'text' column")
            for row, record in enumerate(reader, start=2):
                if not record:
                    continue
                if len(record) != len(header):
                    errors.append(f"row {row}: {len(record)} fields, the header has {len(header)}")
                elif not record[column].strip():
                    errors.append(f"row {row}: empty text")
                else:
                    texts.append(record[column])
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"sample file {path} " + _NOT_UTF8.format(exc=exc)) from None
    except csv.Error as exc:
        raise CalibrationError(f"sample file {path}: not valid CSV: {exc}") from None
    if errors:
        _fail(path, errors)
    return texts


def read_arrays(
    path: Path,
    expected: Mapping[str, str] | None = None,
    *,
    shapes: Mapping[str, Sequence[int | None]] | None = None,
) -> dict[str, npt.NDArray[np.generic]]:
    """Input batches from ``.npz`` (one array per input name) or ``.jsonl`` (one object per row).

    ``expected`` maps input name -> numpy dtype name; every input must be present
    and values are cast to that dtype.  ``shapes`` maps input name -> the shape of one
    sample (the batch axis left out; ``None`` or a negative size for a free axis), checked
    so that, say, 64x64 or channels-last images are refused naming the shape the model takes.
    Float rows holding NaN or infinity are refused by row number.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"sample file {path} does not exist; give an .npz or .jsonl file of inputs")
    arrays: dict[str, npt.NDArray[np.generic]]
    npz = path.suffix.lower() == ".npz"
    if npz:
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except Exception as exc:  # a damaged file fails anywhere: zip, zlib, even numpy's header parser
            raise CalibrationError(
                f"sample file {path} is not a readable .npz ({exc}); write it again with numpy.savez"
            ) from None
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        arrays = _read_jsonl_arrays(path, expected)
    else:
        raise CalibrationError(f"sample file {path}: unknown format {path.suffix!r}; use .npz or .jsonl")
    if not arrays:
        raise CalibrationError(f"sample file {path} holds no rows; add at least one row per input")
    if expected is not None:
        missing = [k for k in expected if k not in arrays]
        if missing:
            raise CalibrationError(f"sample file {path} lacks inputs {missing}; it has {sorted(arrays)}")
        arrays = {k: _cast(path, k, arrays[k], expected[k]) for k in expected}
    for k, a in arrays.items():
        if a.ndim == 0:
            raise CalibrationError(
                f"sample file {path}: input {k!r} is a single value (shape ()); give one row per sample, "
                "an array of shape [N, ...]"
            )
        if len(a) == 0:
            raise CalibrationError(f"sample file {path}: input {k!r} holds no rows; add at least one row")
        if npz:  # JSONL rows were checked as they were read, by line
            _check_finite_rows(path, k, a)
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1:
        raise CalibrationError(f"sample file {path}: inputs have different batch sizes {sorted(sizes)}")
    check_shapes(path, arrays, shapes or {})
    return arrays


def check_shapes(
    path: Path, arrays: Mapping[str, npt.NDArray[np.generic]], shapes: Mapping[str, Sequence[int | None]]
) -> None:
    """The samples read from ``path`` against ``shapes`` (see :func:`read_arrays`): a source that
    reads its files before it knows the model's shapes checks them here once it does."""
    for k, want in shapes.items():
        if k in arrays:
            _check_shape(path, k, arrays[k], want)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding=_ENCODING).splitlines()
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"sample file {path} " + _NOT_UTF8.format(exc=exc)) from None


def _cast(path: Path, name: str, array: npt.NDArray[np.generic], dtype: str) -> npt.NDArray[np.generic]:
    try:
        with np.errstate(over="ignore"):  # a value too large for dtype becomes inf: refused as a bad row
            return array.astype(dtype)
    except (ValueError, TypeError) as exc:
        raise CalibrationError(
            f"sample file {path}: input {name!r} holds {array.dtype} values that do not convert to {dtype} "
            f"({exc}); save numbers of that type"
        ) from None


def _check_finite_rows(path: Path, name: str, array: npt.NDArray[np.generic]) -> None:
    if not np.issubdtype(array.dtype, np.inexact):
        return
    bad = np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))
    if bad.size:
        rows = ", ".join(str(int(i) + 1) for i in bad[:_MAX_ERRORS])
        more = f" (and {bad.size - _MAX_ERRORS} more)" if bad.size > _MAX_ERRORS else ""
        raise CalibrationError(
            f"sample file {path}: input {name!r} rows {rows}{more} (counted from 1 along the first axis) "
            "hold NaN or infinity; the server refuses such inputs: fix or drop those rows"
        )


def _check_shape(path: Path, name: str, array: npt.NDArray[np.generic], want: Sequence[int | None]) -> None:
    got = array.shape[1:]
    fits = len(got) == len(want) and all(w is None or w < 0 or g == w for g, w in zip(got, want, strict=True))
    if not fits:
        model = "[N, " + ", ".join("?" if w is None or w < 0 else str(w) for w in want) + "]"
        raise CalibrationError(
            f"sample file {path}: input {name!r} has shape {list(array.shape)}, the model takes {model} "
            "(? is any size); resize or transpose the samples to that shape"
        )


def _read_jsonl_arrays(path: Path, expected: Mapping[str, str] | None) -> dict[str, npt.NDArray[np.generic]]:
    rows: dict[str, list[npt.NDArray[np.generic]]] = {}
    errors: list[str] = []
    for row, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("expected an object {input name: nested list}")
            values: dict[str, npt.NDArray[np.generic]] = {}
            for k, v in obj.items():
                dtype = expected.get(k, "float32") if expected else "float32"
                with np.errstate(over="ignore"):  # a value too large for dtype becomes inf: refused below
                    values[k] = np.asarray(v, dtype=dtype)
                if np.issubdtype(values[k].dtype, np.inexact) and not np.isfinite(values[k]).all():
                    raise ValueError(
                        f"input {k!r} holds NaN or infinity, which the server refuses: fix or drop the row"
                    )
            for k, a in values.items():
                rows.setdefault(k, []).append(a)
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            errors.append(f"row {row}: {exc}")
    if errors:
        _fail(path, errors)
    try:
        return {k: np.stack(v) for k, v in rows.items()}
    except ValueError as exc:
        raise CalibrationError(f"sample file {path}: rows have different shapes ({exc})") from None


def sources_of(spec: Any, *, made: str) -> dict[str, str]:
    """The notes ``validation_source`` and ``calibration_source`` of an export of ``spec`` (an
    :class:`~export.spec.ExportSpec`) whose samples, when none are given, are ``made``."""
    val, cal = spec.validation, spec.calibration
    return {
        "validation_source": sample_source(val, cal, kind="validation", other="calibration", made=made),
        "calibration_source": sample_source(cal, val, kind="calibration", other="validation", made=made),
    }


def sample_source(given: object, fallback: object, *, kind: str, other: str, made: str) -> str:
    """What the ``kind`` samples were, for the manifest's notes and the report: the file (or arrays)
    given, the ``other`` kind's when only those were given, else ``made`` (:data:`GENERATED`)."""
    if given is not None:
        return _described(given)
    if fallback is not None:
        # one set for both: a static INT8 variant is checked on the rows it was calibrated on
        return (
            f"{_described(fallback)} (the {other} samples: none were given for {kind}; the calibrated INT8 "
            "variants' gates are in-sample)"
        )
    return made


def _described(given: object) -> str:
    return f"file {Path(given).name}" if isinstance(given, str | Path) else "samples given to the export"


def default_texts(kind: str) -> list[str]:
    """The project's own text sets: ``kind`` is ``calibration`` or ``validation``."""
    ref = resources.files("export.data").joinpath(f"minilm_{kind}.jsonl")
    with resources.as_file(ref) as path:
        return read_texts(path)

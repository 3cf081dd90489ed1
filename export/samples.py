"""Calibration and validation sample files: texts (JSONL / CSV) and tensors (NPZ / JSONL).

Every bad row is reported with its row number (1-based line of the file) in a
:class:`~runtime.errors.CalibrationError`, so the customer can fix the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path

import numpy as np
import numpy.typing as npt

from runtime.errors import CalibrationError

__all__ = ["default_texts", "read_arrays", "read_texts"]

_MAX_ERRORS = 5


def read_texts(path: Path) -> list[str]:
    """Texts from ``.jsonl`` (``{"text": ...}`` or a JSON string per line) or ``.csv`` (a ``text`` column)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"sample file {path} does not exist; give a JSONL or CSV file of texts")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        texts = _read_jsonl_texts(path)
    elif suffix in (".csv", ".tsv"):
        texts = _read_csv_texts(path, "\t" if suffix == ".tsv" else ",")
    else:
        raise CalibrationError(f"sample file {path}: unknown format {suffix!r}; use .jsonl or .csv")
    if not texts:
        raise CalibrationError(f"sample file {path} holds no texts; add at least one row")
    return texts


def _fail(path: Path, errors: list[str]) -> None:
    more = f" (and {len(errors) - _MAX_ERRORS} more)" if len(errors) > _MAX_ERRORS else ""
    raise CalibrationError(f"sample file {path} has bad rows: " + "; ".join(errors[:_MAX_ERRORS]) + more)


def _read_jsonl_texts(path: Path) -> list[str]:
    texts: list[str] = []
    errors: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise CalibrationError(f"sample file {path} is not UTF-8 ({exc}); save it as UTF-8") from None
    for row, line in enumerate(lines, start=1):
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
        _fail(path, errors)
    return texts


def _read_csv_texts(path: Path, delimiter: str) -> list[str]:
    texts: list[str] = []
    errors: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
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
        raise CalibrationError(f"sample file {path} is not UTF-8 ({exc}); save it as UTF-8") from None
    except csv.Error as exc:
        raise CalibrationError(f"sample file {path}: not valid CSV: {exc}") from None
    if errors:
        _fail(path, errors)
    return texts


def read_arrays(path: Path, expected: Mapping[str, str] | None = None) -> dict[str, npt.NDArray[np.generic]]:
    """Input batches from ``.npz`` (one array per input name) or ``.jsonl`` (one object per row).

    ``expected`` maps input name -> numpy dtype name; every input must be present
    and values are cast to that dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise CalibrationError(f"sample file {path} does not exist; give an .npz or .jsonl file of inputs")
    arrays: dict[str, npt.NDArray[np.generic]]
    if path.suffix.lower() == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as exc:
            raise CalibrationError(f"sample file {path} is not a readable .npz ({exc})") from None
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        arrays = _read_jsonl_arrays(path, expected)
    else:
        raise CalibrationError(f"sample file {path}: unknown format {path.suffix!r}; use .npz or .jsonl")
    if expected is not None:
        missing = [k for k in expected if k not in arrays]
        if missing:
            raise CalibrationError(f"sample file {path} lacks inputs {missing}; it has {sorted(arrays)}")
        arrays = {k: arrays[k].astype(expected[k]) for k in expected}
    sizes = {len(a) for a in arrays.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise CalibrationError(f"sample file {path}: inputs have different or zero batch sizes {sorted(sizes)}")
    return arrays


def _read_jsonl_arrays(path: Path, expected: Mapping[str, str] | None) -> dict[str, npt.NDArray[np.generic]]:
    rows: dict[str, list[npt.NDArray[np.generic]]] = {}
    errors: list[str] = []
    for row, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("expected an object {input name: nested list}")
            for k, v in obj.items():
                dtype = expected.get(k, "float32") if expected else "float32"
                rows.setdefault(k, []).append(np.asarray(v, dtype=dtype))
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            errors.append(f"row {row}: {exc}")
    if errors:
        _fail(path, errors)
    try:
        return {k: np.stack(v) for k, v in rows.items()}
    except ValueError as exc:
        raise CalibrationError(f"sample file {path}: rows have different shapes ({exc})") from None


def default_texts(kind: str) -> list[str]:
    """The project's own text sets: ``kind`` is ``calibration`` or ``validation``."""
    ref = resources.files("export.data").joinpath(f"minilm_{kind}.jsonl")
    with resources.as_file(ref) as path:
        return read_texts(path)

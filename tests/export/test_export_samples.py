"""Sample files (row-numbered errors) and the project's own MiniLM text sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.default import minilm_dir
from export.samples import default_texts, read_arrays, read_texts
from runtime.errors import CalibrationError


def test_jsonl_and_csv_texts(tmp_path: Path) -> None:
    j = tmp_path / "a.jsonl"
    j.write_text('{"text": "one"}\n\n"two"\n{"text": "three, with comma"}\n', encoding="utf-8")
    assert read_texts(j) == ["one", "two", "three, with comma"]
    c = tmp_path / "a.csv"
    c.write_text('id,text\n1,hello\n2,"a, b"\n', encoding="utf-8")
    assert read_texts(c) == ["hello", "a, b"]


def test_jsonl_bad_rows_are_numbered(tmp_path: Path) -> None:
    j = tmp_path / "bad.jsonl"
    j.write_text('{"text": "ok"}\n{"text": 3}\nnot json\n{"txt": "x"}\n', encoding="utf-8")
    with pytest.raises(CalibrationError) as err:
        read_texts(j)
    msg = str(err.value)
    assert "row 2" in msg and "row 3" in msg and "row 4" in msg and "row 1:" not in msg
    assert str(j) in msg


def test_csv_bad_rows_are_numbered(tmp_path: Path) -> None:
    c = tmp_path / "bad.csv"
    c.write_text("text,label\nfine,1\n,0\nextra,1,2\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"row 3: empty text.*row 4: 3 fields"):
        read_texts(c)
    nohead = tmp_path / "nohead.csv"
    nohead.write_text("sentence\nx\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="'text' column"):
        read_texts(nohead)


def test_missing_empty_and_unknown_files(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="does not exist"):
        read_texts(tmp_path / "nope.jsonl")
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="no texts"):
        read_texts(tmp_path / "e.jsonl")
    (tmp_path / "t.txt").write_text("x", encoding="utf-8")
    with pytest.raises(CalibrationError, match="unknown format"):
        read_texts(tmp_path / "t.txt")


def test_read_arrays_npz_and_jsonl(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", x=np.ones((3, 4)), y=np.zeros((3, 2)))
    got = read_arrays(tmp_path / "s.npz", {"x": "float32"})
    assert list(got) == ["x"] and got["x"].dtype == np.float32 and got["x"].shape == (3, 4)
    with pytest.raises(CalibrationError, match="lacks inputs"):
        read_arrays(tmp_path / "s.npz", {"z": "float32"})
    j = tmp_path / "s.jsonl"
    j.write_text('{"x": [1, 2]}\n{"x": [3, 4]}\n', encoding="utf-8")
    assert read_arrays(j, {"x": "int32"})["x"].tolist() == [[1, 2], [3, 4]]
    j.write_text('{"x": [1, 2]}\n[1]\n{"x": [3, 4]}\n', encoding="utf-8")
    with pytest.raises(CalibrationError, match="row 2"):
        read_arrays(j, {"x": "int32"})


def test_default_sets_are_large_varied_and_disjoint() -> None:
    from tokenizers import Tokenizer

    val, cal = default_texts("validation"), default_texts("calibration")
    assert len(val) >= 220 and 100 <= len(cal) <= 150
    assert len(set(val)) == len(val) and len(set(cal)) == len(cal)
    assert not set(val) & set(cal), "calibration and validation overlap"
    assert "?" in val
    tok = Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    for texts, longest in ((val, 256), (cal, 128)):
        lengths = [len(e.ids) for e in tok.encode_batch(texts)]
        assert min(lengths) == 3  # [CLS] one-token [SEP]
        assert max(lengths) > longest  # validation goes beyond the max length: truncation is exercised
        assert sum(n <= 5 for n in lengths) >= 10  # many very short inputs (where INT8 suffers most)
        assert any(not t.isascii() for t in texts)  # some non-English


def test_default_set_files_are_one_json_object_per_line() -> None:
    from importlib import resources

    for kind in ("validation", "calibration"):
        text = resources.files("export.data").joinpath(f"minilm_{kind}.jsonl").read_text(encoding="utf-8")
        for line in text.splitlines():
            assert set(json.loads(line)) == {"text"}

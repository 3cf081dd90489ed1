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


# --------------------------------------------------------------------------- bad sample files: an error, no traceback


def test_utf8_bom_files_read_like_plain_utf8(tmp_path: Path) -> None:
    """Excel's "CSV UTF-8" starts with a byte-order mark; the header is still 'text'."""
    c = tmp_path / "excel.csv"
    c.write_bytes("\ufefftext,label\nhello,1\nworld,0\n".encode())
    assert read_texts(c) == ["hello", "world"]
    j = tmp_path / "bom.jsonl"
    j.write_bytes('\ufeff{"text": "one"}\n{"text": "two"}\n'.encode())
    assert read_texts(j) == ["one", "two"]
    a = tmp_path / "bom_arrays.jsonl"
    a.write_bytes('\ufeff{"x": [1, 2]}\n{"x": [3, 4]}\n'.encode())
    assert read_arrays(a, {"x": "float32"})["x"].tolist() == [[1, 2], [3, 4]]


def test_read_texts_reads_only_the_text_of_labelled_rows(tmp_path: Path) -> None:
    j = tmp_path / "labelled.jsonl"
    j.write_text('{"text": "great", "label": 1}\n{"text": "awful", "label": 0}\n', encoding="utf-8")
    assert read_texts(j) == ["great", "awful"]


def test_unreadable_npz_is_a_calibration_error(tmp_path: Path) -> None:
    np.savez(tmp_path / "good.npz", x=np.ones((4, 16), np.float32))
    data = (tmp_path / "good.npz").read_bytes()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CalibrationError, match=rf"{cut}.* not a readable \.npz.*numpy\.savez"):
        read_arrays(cut, {"x": "float32"})
    np.savez_compressed(tmp_path / "z.npz", x=np.random.default_rng(0).random((400, 16)))
    damaged = bytearray((tmp_path / "z.npz").read_bytes())
    damaged[200] ^= 0xFF  # inside the deflated member: zlib fails, not the zip directory
    bad = tmp_path / "damaged.npz"
    bad.write_bytes(bytes(damaged))
    with pytest.raises(CalibrationError, match=rf"{bad}.* not a readable \.npz"):
        read_arrays(bad, {"x": "float32"})


def test_non_utf8_jsonl_arrays_is_a_calibration_error(tmp_path: Path) -> None:
    j = tmp_path / "latin1.jsonl"
    j.write_bytes(('{"x": [1, 2]} \xe9\n').encode("latin-1"))
    with pytest.raises(CalibrationError, match=rf"{j} is not UTF-8.*save it as UTF-8"):
        read_arrays(j, {"x": "float32"})


def test_npz_values_that_do_not_cast_name_the_input(tmp_path: Path) -> None:
    s = tmp_path / "str.npz"
    np.savez(s, x=np.array([["a"] * 4] * 2))
    with pytest.raises(CalibrationError, match=rf"{s}: input 'x' holds <U1 values that do not convert to float32"):
        read_arrays(s, {"x": "float32"})


def test_npz_single_value_is_refused(tmp_path: Path) -> None:
    s = tmp_path / "scalar.npz"
    np.savez(s, x=np.float32(1.0))
    with pytest.raises(CalibrationError, match=rf"{s}: input 'x' is a single value.*shape \[N, \.\.\.\]"):
        read_arrays(s, {"x": "float32"})
    with pytest.raises(CalibrationError, match="single value"):
        read_arrays(s)


def test_non_finite_jsonl_rows_are_refused_by_row(tmp_path: Path) -> None:
    j = tmp_path / "nan.jsonl"
    j.write_text(
        '{"x": [1, 2]}\n{"x": [NaN, 2]}\n{"x": [3, 4]}\n{"x": [1, Infinity]}\n{"x": [1e39, 0]}\n', encoding="utf-8"
    )
    with pytest.raises(CalibrationError) as err:
        read_arrays(j, {"x": "float32"})
    msg = str(err.value)
    assert str(j) in msg and "NaN or infinity" in msg
    assert "row 2:" in msg and "row 4:" in msg and "row 5:" in msg  # 1e39 is inf as float32
    assert "row 1:" not in msg and "row 3:" not in msg


def test_non_finite_npz_rows_are_refused_by_row(tmp_path: Path) -> None:
    x = np.ones((6, 3), np.float32)
    x[1, 0] = np.nan
    x[4, 2] = -np.inf
    s = tmp_path / "nan.npz"
    np.savez(s, ids=np.ones((6, 3), np.int64), x=x)
    with pytest.raises(CalibrationError, match=rf"{s}: input 'x' rows 2, 5 .*NaN or infinity.*fix or drop"):
        read_arrays(s, {"ids": "int64", "x": "float32"})
    # float64 values beyond float32 become inf when cast to the model's dtype
    big = tmp_path / "big.npz"
    np.savez(big, x=np.array([[1.0], [1e300]]))
    with pytest.raises(CalibrationError, match="input 'x' rows 2 "):
        read_arrays(big, {"x": "float32"})


def test_sample_shapes_are_checked_against_the_model(tmp_path: Path) -> None:
    s = tmp_path / "img.npz"
    shapes = {"pixel_values": (3, 32, 32)}
    np.savez(s, pixel_values=np.zeros((2, 3, 32, 32), np.float32))
    assert read_arrays(s, {"pixel_values": "float32"}, shapes=shapes)["pixel_values"].shape == (2, 3, 32, 32)
    for wrong in ((2, 3, 64, 64), (2, 32, 32, 3), (2, 3, 32)):
        np.savez(s, pixel_values=np.zeros(wrong, np.float32))
        with pytest.raises(
            CalibrationError,
            match=rf"{s}: input 'pixel_values' has shape \[{', '.join(map(str, wrong))}\], "
            r"the model takes \[N, 3, 32, 32\].*resize or transpose",
        ):
            read_arrays(s, {"pixel_values": "float32"}, shapes=shapes)
    # a free axis (None or -1) takes any size
    np.savez(s, ids=np.zeros((2, 7), np.int64))
    assert read_arrays(s, {"ids": "int64"}, shapes={"ids": (-1,)})["ids"].shape == (2, 7)
    assert read_arrays(s, {"ids": "int64"}, shapes={"ids": (None,)})["ids"].shape == (2, 7)

"""Sessions, tokenizers and samples open a private copy made from the bytes that were verified.

Before, ``read_package`` hashed each file and the backends opened it again by path after the
hardware probe and the selection: a file swapped in that gap was served under the signed
package's identity (the review's t6 script).
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

import runtime.hardware as hardware
from runtime.errors import InferboxError, IntegrityError
from runtime.loader import LoaderOptions, load_model
from runtime.package import read_package
from runtime.verified import STALE_S, VerifiedCopy
from tests.runtime.conftest import build_mlp, publish_mlp


def _publish(root: Path) -> Path:
    """A one-variant tensor package ``mlp/1`` under ``root``; returns the package folder."""
    return publish_mlp(root, ["ort-cpu"]) / "mlp" / "1"


def _evil(tmp: Path) -> Path:
    return build_mlp(tmp / "evil.onnx", seed=99)  # same inputs and outputs, other weights


X = np.ones((2, 8), np.float32)


def _answer(model_path: Path) -> np.ndarray:
    import onnxruntime as ort

    return np.asarray(ort.InferenceSession(str(model_path)).run(["logits"], {"x": X})[0])


def test_a_file_swapped_after_it_was_verified_is_not_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = _publish(tmp_path / "repo")
    evil = _evil(tmp_path)
    real = hardware.probe_hardware

    def probe_and_swap() -> hardware.HardwareProfile:
        os.replace(evil, pkg / "onnx" / "model.onnx")  # after read_package hashed it, before any open
        return real()

    monkeypatch.setattr(hardware, "probe_hardware", probe_and_swap)
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        load_model(tmp_path / "repo", "mlp", options=LoaderOptions(backend="ort-cpu", cache_dir=tmp_path / "cache"))


def test_the_model_runs_from_the_copy_whatever_the_repository_holds_later(tmp_path: Path) -> None:
    pkg = _publish(tmp_path / "repo")
    good = _answer(pkg / "onnx" / "model.onnx")
    cache = tmp_path / "cache"
    model = load_model(tmp_path / "repo", "mlp", options=LoaderOptions(backend="ort-cpu", cache_dir=cache))
    try:
        os.replace(_evil(tmp_path), pkg / "onnx" / "model.onnx")
        assert not np.allclose(_answer(pkg / "onnx" / "model.onnx"), good)  # the swap changes the answers
        copy = cache / "verified" / model.package_sha256 / "onnx" / "model.onnx"
        assert np.allclose(_answer(copy), good)  # the copy the sessions open is the verified one
        (out,) = [v for k, v in model.session.run({"x": X}).items() if k == "logits"]
        assert np.allclose(out, good)
        assert oct(os.stat(cache / "verified").st_mode & 0o777) == "0o700"
    finally:
        model.close()


def test_a_copy_in_the_cache_is_reused_and_stale_ones_are_swept(tmp_path: Path) -> None:
    source = read_package(_publish(tmp_path / "repo"))
    cache = tmp_path / "cache"
    stale = cache / "verified" / ("0" * 64)
    stale.mkdir(parents=True)
    old = time.time() - STALE_S - 60
    os.utime(stale, (old, old))
    first = VerifiedCopy.under(source, cache)
    path = first.variant_file("onnx-fp32")
    inode = path.stat().st_ino
    assert not stale.exists()  # a copy no load used for STALE_S is removed
    again = VerifiedCopy.under(source, cache).variant_file("onnx-fp32")
    assert again == path and again.stat().st_ino == inode  # not copied twice
    assert not first.temporary


def test_without_a_cache_folder_the_copy_goes_with_the_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _publish(tmp_path / "repo")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    model = load_model(tmp_path / "repo", "mlp", options=LoaderOptions(backend="ort-cpu"))
    (copy,) = scratch.iterdir()
    assert (copy / "onnx" / "model.onnx").is_file() and oct(copy.stat().st_mode & 0o777) == "0o700"
    model.close()
    del model
    gc.collect()
    assert not copy.exists()
    # a load that fails leaves nothing behind either
    with pytest.raises(InferboxError):
        load_model(tmp_path / "repo", "mlp", options=LoaderOptions(backend="no-such-backend"))
    assert list(scratch.iterdir()) == []


def test_a_file_changed_before_the_load_is_refused_by_the_copy(tmp_path: Path) -> None:
    """The loader leaves the hashing of the files it uses to the copy: a changed one still fails."""
    pkg = _publish(tmp_path / "repo")
    model = pkg / "onnx" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[-1] ^= 1  # same size: only the hash can tell
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="does not match the manifest"):
        load_model(tmp_path / "repo", "mlp", options=LoaderOptions(backend="ort-cpu", cache_dir=tmp_path / "cache"))
    assert not list((tmp_path / "cache" / "verified").rglob("model.onnx"))  # nothing unverified kept

"""A small CNN trained on sklearn's bundled digits, exported from an nn.Module: INT8 keeps its accuracy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.pipeline import export_model
from export.quantize import count_ops
from export.spec import ExportSpec
from runtime.backends.base import OpenOptions
from runtime.backends.registry import get_backend
from runtime.manifest import Manifest
from runtime.package import read_package


def _train() -> tuple[object, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    torch.manual_seed(0)
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.25, random_state=0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(32 * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    torch.set_num_threads(2)
    for _epoch in range(15):
        perm = torch.randperm(len(xt))
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    return model.eval(), x_train, x_test, y_train, y_test


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest, np.ndarray, np.ndarray]:
    model, x_train, x_test, _y_train, y_test = _train()
    repo = tmp_path_factory.mktemp("digits-repo")
    spec = ExportSpec(
        source=model,
        task="image-classification",
        name="digits",
        repository=repo,
        timing="quick",
        example_inputs={"pixels": x_train[:1]},
        output_names=["logits"],
        calibration={"pixels": x_train[:300]},
        validation={"pixels": x_test},
        validation_labels=y_test,
        labels=[str(i) for i in range(10)],
    )
    manifest = export_model(spec)
    return repo / "digits" / "1", manifest, x_test, y_test


#: rows per validation batch of a PyTorch source
VALIDATION_ROWS = 32


def _accuracy(path: Path, backend: str, precision: str, x: np.ndarray, y: np.ndarray) -> float:
    session = get_backend(backend).open(path, OpenOptions(exec_precision=precision, intra_op_threads=2))
    try:
        # In the export's validation batches (export/sources/pytorch.py): dynamic INT8 quantizes
        # activations with one scale per batch, so other batches can flip a borderline digit.
        logits = np.concatenate(
            [session.run({"pixels": x[i : i + VALIDATION_ROWS]})["logits"] for i in range(0, len(x), VALIDATION_ROWS)]
        )
    finally:
        session.close()
    return float((np.asarray(logits).argmax(1) == y).mean())


def test_int8_accuracy_within_one_point_of_fp32(digits: tuple[Path, Manifest, np.ndarray, np.ndarray]) -> None:
    path, manifest, x_test, y_test = digits
    pkg = read_package(path)
    fp32 = _accuracy(path / "onnx" / "model.onnx", "ort-cpu", "fp32", x_test, y_test)
    assert fp32 > 0.9, f"the CNN did not train ({fp32:.3f})"
    int8 = [v for v in pkg.manifest.variants if v.precision == "int8"]
    assert int8, f"no INT8 variant kept: {[(a.variant, a.recipe, a.reason) for a in manifest.attempts]}"
    for variant in int8:
        for acc in variant.accuracy:
            if not acc.passed:
                continue
            backend = "ort-cpu" if acc.runtime == "onnxruntime" else "ov-cpu"
            measured = _accuracy(path / variant.files[0], backend, acc.exec_precision, x_test, y_test)
            assert measured >= fp32 - 0.01, (variant.id, acc.exec_precision, measured, fp32)
            # the manifest says the same, computed the same way
            assert acc.metrics["label_accuracy"] == pytest.approx(measured, abs=1e-6)
            assert acc.metrics["label_accuracy_drop"] <= 0.01
            assert acc.gate["max_label_accuracy_drop"] == 0.01
            assert acc.samples == len(y_test) and acc.reference == "pytorch"


def test_digits_manifest(digits: tuple[Path, Manifest, np.ndarray, np.ndarray]) -> None:
    path, manifest, _x, _y = digits
    assert manifest.labels == [str(i) for i in range(10)]
    assert manifest.provenance.source_kind == "pytorch" and len(manifest.provenance.source_sha256) == 64
    assert [i.name for i in manifest.inputs] == ["pixels"] and manifest.inputs[0].shape == [-1, 1, 8, 8]
    assert all(v.timings for v in manifest.variants)
    if any(v.id == "onnx-int8" for v in manifest.variants):
        ops = count_ops(path / "onnx" / "model.int8.onnx")
        assert ops.get("QuantizeLinear", 0) + ops.get("ConvInteger", 0) + ops.get("MatMulInteger", 0) >= 2
        assert ops.get("Conv", 0) + ops.get("ConvInteger", 0) >= 2

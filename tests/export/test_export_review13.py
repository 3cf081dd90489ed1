"""Bad export inputs refused before the slow work, naming the file and the fix: a model without
the classification head its task needs, corrupt weights, a broken tokenizer, sample files that do
not read, gates on metrics the task never measures, and factories that raise (tiny models built
here; the slow ONNX export is replaced by one that fails the test if it is reached)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from appliance.cli import main
from export.pipeline import export_model
from export.samples import read_arrays
from export.sources import hf
from export.spec import ExportSpec, check_gates, parse_gate
from runtime.errors import CalibrationError, ExportError, GateError, SourceError
from tests.export.conftest import quick_spec as _spec
from tests.export.conftest import tiny_bert_parts

WORDS = ["the", "a", "loan", "bank", "card", "pay", "good", "bad", "day", "night"]
TEXTS = ["good day", "bad night", "the bank", "pay the card"]


@pytest.fixture(scope="module")
def headless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain ``BertModel`` folder (architectures BertModel, no classifier weights) with its tokenizer."""
    from transformers import BertModel

    folder = tmp_path_factory.mktemp("headless") / "bert"
    tokenizer, config = tiny_bert_parts(WORDS)
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    return folder


@pytest.fixture
def no_onnx_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """The HF folder's ONNX export (the slow part) fails the test if it is reached."""

    def reached(*_: object) -> None:
        raise AssertionError("the ONNX export started before the bad input was found")

    monkeypatch.setattr(hf, "_export_onnx", reached)


def _invoke(home: Path, *args: str) -> Result:
    env = {k: None for k in os.environ if k.startswith("INFERBOX_")}
    return CliRunner().invoke(main, [*args, "--home", str(home)], env=env, prog_name="inferbox")


# -- 1. a model without the head its task needs ------------------------------------------------------


@pytest.mark.usefixtures("no_onnx_export")
def test_a_headless_text_model_is_refused_as_a_classifier_before_the_export(headless: Path, tmp_path: Path) -> None:
    spec = _spec(headless, "text-classification", tmp_path / "repo", validation=TEXTS, calibration=TEXTS)
    with pytest.raises(SourceError) as caught:
        export_model(spec)
    message = str(caught.value)
    assert "no classification head" in message and "architectures: BertModel" in message
    assert "classifier.weight" in message and "--task feature-extraction" in message
    assert not (tmp_path / "repo" / "m").exists()


@pytest.mark.usefixtures("no_onnx_export")
def test_a_headless_image_model_is_refused_as_a_classifier_before_the_export(tmp_path: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    ViTModel(config).save_pretrained(tmp_path / "vit")
    with pytest.raises(SourceError, match=r"no classification head .*architectures: ViTModel") as caught:
        export_model(_spec(tmp_path / "vit", "image-classification", tmp_path / "repo"))
    assert "fine-tune a classifier first" in str(caught.value)
    assert "feature-extraction" not in str(caught.value)  # a text task: no advice for an image model


# -- 2. a sample file of zero rows -------------------------------------------------------------------


def test_a_zero_row_npz_names_the_file(tmp_path: Path) -> None:
    zero = tmp_path / "zero.npz"
    np.savez(zero, x=np.zeros((0, 16), np.float32))
    with pytest.raises(CalibrationError, match=r"zero\.npz: input 'x' holds no rows"):
        read_arrays(zero, {"x": "float32"})
    empty = tmp_path / "empty.npz"
    np.savez(empty)
    with pytest.raises(CalibrationError, match=r"empty\.npz holds no rows"):
        read_arrays(empty)


def test_a_zero_row_npz_is_an_error_not_a_traceback(tmp_path: Path, tiny_onnx: Path) -> None:
    zero = tmp_path / "zero.npz"
    np.savez(zero, x=np.zeros((0, 16), np.float32))
    args = ("export", str(tiny_onnx), "--task", "tensor", "--name", "z", "--variants", "onnx-fp32")
    result = _invoke(tmp_path / "home", *args, "--timing", "quick", "--validation", str(zero))
    assert result.exit_code == 2, result.output
    assert f"{zero}: input 'x' holds no rows" in result.output and "Traceback" not in result.output


# -- 4. gates ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_gate_that_is_not_a_finite_number_is_refused(value: str) -> None:
    with pytest.raises(ExportError, match="not a finite number"):
        parse_gate(f"max_max_rel_diff={value}")
    with pytest.raises(ExportError, match="not a finite number"):
        check_gates("tensor", {"max_max_rel_diff": float(value)})


@pytest.mark.parametrize(
    ("task", "gate", "names"),
    [
        ("feature-extraction", "min_cosin_min", "cosine_min"),  # a typo
        ("tensor", "min_cosine_min", "max_rel_diff"),  # a metric of another task
        ("text-classification", "max_label_accuracy_drop", "top1_agreement"),  # labels: Python API only
        ("feature-extraction", "max_max_rel_diff[logits]", "topk_agreement"),  # no per-output metrics
        ("tensor", "max_max_rel_diff[]", "max_rel_diff[NAME]"),
        ("tensor", "max_cosine", "batch_rel_diff"),
    ],
)
def test_a_gate_on_a_metric_the_task_never_measures_is_refused_naming_the_known_ones(
    tmp_path: Path, task: str, gate: str, names: str
) -> None:
    with pytest.raises(ExportError, match="measures no") as caught:
        ExportSpec(source=tmp_path, task=task, name="m", repository=tmp_path, gates={gate: 0.5})
    assert names in str(caught.value)


def test_gates_on_measured_metrics_are_accepted(tmp_path: Path) -> None:
    check_gates("feature-extraction", {"min_cosine_min": 0.98, "min_topk_agreement": 0.8, "max_batch_rel_diff": 1})
    check_gates("tensor", {"max_max_rel_diff[y]": 0.01, "max_max_abs_diff": 1e-3})
    check_gates("image-classification", {"max_label_accuracy_drop": 0.02}, labelled=True)
    labels = np.zeros(4, np.int64)
    ExportSpec(
        source=tmp_path,
        task="text-classification",
        name="m",
        repository=tmp_path,
        validation_labels=labels,
        gates={"max_label_accuracy_drop": 0.02},
    )


def test_a_gate_typo_is_refused_before_the_source_is_read(tmp_path: Path) -> None:
    result = _invoke(
        tmp_path / "home",
        "export",
        str(tmp_path / "missing.onnx"),
        "--task",
        "tensor",
        "--name",
        "m",
        "--gate",
        "min_cosin_min=0.98",
    )
    assert result.exit_code == 2 and "measures no 'cosin_min'" in result.output, result.output


def test_a_gate_on_an_output_the_model_lacks_is_refused_before_any_variant(tmp_path: Path, tiny_onnx: Path) -> None:
    spec = _spec(tiny_onnx, "tensor", tmp_path / "repo", gates={"max_max_rel_diff[nope]": 0.01})
    with pytest.raises(ExportError, match=r"no output 'nope' measured on its own") as caught:
        export_model(spec)
    assert not isinstance(caught.value, GateError)  # refused, not failed at the end
    assert "--gate max_max_rel_diff=VALUE" in str(caught.value)


# -- 5. sample files read before the slow export -------------------------------------------------------


@pytest.mark.usefixtures("no_onnx_export")
@pytest.mark.parametrize("which", ["calibration", "validation"])
def test_a_missing_text_sample_file_is_found_before_the_export(headless: Path, tmp_path: Path, which: str) -> None:
    missing = tmp_path / "missing.jsonl"
    spec = _spec(headless, "feature-extraction", tmp_path / "repo", **{which: missing})
    with pytest.raises(CalibrationError, match=re.escape(f"{missing} does not exist")):
        export_model(spec)


def test_a_json_array_and_a_text_file_are_told_the_formats_read(tmp_path: Path) -> None:
    from export.samples import read_texts

    array = tmp_path / "texts.json"
    array.write_text(json.dumps(["good day", "bad night"], indent=2), encoding="utf-8")
    with pytest.raises(CalibrationError, match="read as JSON Lines: one string or object per line, not one JSON array"):
        read_texts(array)
    plain = tmp_path / "texts.txt"
    plain.write_text("good day\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match=r"unknown format '\.txt'; use \.jsonl, \.csv or \.tsv"):
        read_texts(plain)


@pytest.mark.usefixtures("no_onnx_export")
def test_an_older_tokenizer_without_tokenizer_json_is_told_how_to_write_one(headless: Path, tmp_path: Path) -> None:
    folder = tmp_path / "older"
    shutil.copytree(headless, folder)
    (folder / "tokenizer.json").unlink()
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n", encoding="utf-8")
    with pytest.raises(SourceError) as caught:
        export_model(_spec(folder, "feature-extraction", tmp_path / "repo"))
    assert "has no tokenizer.json (it has vocab.txt: an older tokenizer)" in str(caught.value)
    assert "AutoTokenizer.from_pretrained(FOLDER).save_pretrained(FOLDER)" in str(caught.value)


@pytest.mark.usefixtures("no_onnx_export")
def test_a_csv_without_a_text_column_is_found_before_the_export(headless: Path, tmp_path: Path) -> None:
    csv = tmp_path / "nocol.csv"
    csv.write_text("id,body\n1,good day\n", encoding="utf-8")
    with pytest.raises(CalibrationError, match="'text' column"):
        export_model(_spec(headless, "feature-extraction", tmp_path / "repo", validation=csv))


@pytest.mark.usefixtures("no_onnx_export")
def test_an_image_sample_file_is_read_before_the_export(tmp_path: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    zero = tmp_path / "zero.npz"
    np.savez(zero, pixel_values=np.zeros((0, 3, 16, 16), np.float32))
    with pytest.raises(CalibrationError, match="holds no rows"):
        export_model(_spec(tmp_path / "vit", "image-classification", tmp_path / "repo", calibration=zero))


def test_a_module_sample_file_is_read_before_the_torch_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    def reached(*_: object, **__: object) -> None:
        raise AssertionError("torch.onnx.export started before the bad sample file was found")

    monkeypatch.setattr(torch.onnx, "export", reached)
    spec = _spec(
        torch.nn.Linear(4, 2),
        "tensor",
        tmp_path / "repo",
        example_inputs={"x": np.zeros((1, 4), np.float32)},
        calibration=tmp_path / "missing.npz",
    )
    with pytest.raises(CalibrationError, match=r"missing\.npz does not exist"):
        export_model(spec)


# -- 6. a malformed tokenizer.json in the source folder ------------------------------------------------


@pytest.mark.usefixtures("no_onnx_export")
def test_a_malformed_tokenizer_names_the_source_file_and_the_fix(headless: Path, tmp_path: Path) -> None:
    folder = tmp_path / "badtok"
    shutil.copytree(headless, folder)
    (folder / "tokenizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(SourceError) as caught:
        export_model(_spec(folder, "feature-extraction", tmp_path / "repo", validation=TEXTS))
    message = str(caught.value)
    assert message.startswith(f"{folder / 'tokenizer.json'}: cannot load the tokenizer")
    assert "repair or replace it" in message and "re-export" not in message and ".staging" not in message


# -- 7. corrupt weights, factories that raise ----------------------------------------------------------


@pytest.mark.usefixtures("no_onnx_export")
def test_corrupt_weights_are_a_source_error_naming_the_file(headless: Path, tmp_path: Path) -> None:
    folder = tmp_path / "corrupt"
    shutil.copytree(headless, folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(SourceError) as caught:
        export_model(_spec(folder, "feature-extraction", tmp_path / "repo", validation=TEXTS))
    message = str(caught.value)
    assert f"the model in {folder} does not load" in message and "pytorch_model.bin" in message
    assert "tensorflow" not in message.lower()


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("def build():\n    raise RuntimeError('checkpoint is corrupt')\n", "the factory raised RuntimeError"),
        ("def build(:\n", "failed to import (SyntaxError"),
        ("import no_such_module_here\n\ndef build():\n    pass\n", "failed to import (ModuleNotFoundError"),
    ],
)
def test_a_factory_that_raises_is_an_error_naming_the_file(tmp_path: Path, code: str, expected: str) -> None:
    src = tmp_path / "net.py"
    src.write_text(code, encoding="utf-8")
    result = _invoke(tmp_path / "home", "export", f"{src}:build", "--task", "tensor", "--name", "net")
    assert result.exit_code == 2, (result.output, result.exception)
    assert str(src) in result.output and expected in result.output and "Traceback" not in result.output


def test_a_classifier_whose_checkpoint_lacks_only_buffers_is_not_refused(tmp_path: Path) -> None:
    """BatchNorm's num_batches_tracked (dropped by some tools) is a buffer, unused in eval mode: the
    head check refused such an image classifier as headless, naming buffers as its missing weights."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    folder = tmp_path / "resnet"
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=3)
    ResNetForImageClassification(config).save_pretrained(folder)
    weights = folder / "model.safetensors"
    kept = {k: v for k, v in load_file(weights).items() if "num_batches_tracked" not in k}
    save_file(kept, weights, metadata={"format": "pt"})
    model = hf._load_model(folder, "image-classification", json.loads((folder / "config.json").read_text()))
    assert model is not None
    head = next(k for k in kept if k.startswith("classifier") and k.endswith("weight"))
    del kept[head]  # a real weight of the head missing: still refused
    save_file(kept, weights, metadata={"format": "pt"})
    with pytest.raises(SourceError, match="no classification head") as caught:
        hf._load_model(folder, "image-classification", json.loads((folder / "config.json").read_text()))
    assert head in str(caught.value) and "num_batches_tracked" not in str(caught.value)

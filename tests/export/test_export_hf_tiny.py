"""Hugging Face folders for text- and image-classification: tiny random models built by the test itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.pipeline import export_model
from export.spec import ExportSpec
from runtime.backends.base import OpenOptions
from runtime.backends.registry import get_backend
from runtime.package import read_package
from runtime.text import TextEncoder

WORDS = [
    "the",
    "a",
    "patient",
    "loan",
    "bank",
    "account",
    "card",
    "pay",
    "refund",
    "night",
    "day",
    "good",
    "bad",
    "fine",
    "help",
    "open",
    "close",
]


def _tiny_bert_folder(folder: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=32,
    )
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        id2label={0: "neg", 1: "neutral", 2: "pos"},
        label2id={"neg": 0, "neutral": 1, "pos": 2},
    )
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _tiny_vit_folder(folder: Path) -> Path:
    import torch
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=8,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=4,
    )
    ViTForImageClassification(config).eval().save_pretrained(folder)
    return folder


def test_text_classification_folder(tmp_path: Path) -> None:
    folder = _tiny_bert_folder(tmp_path / "bert")
    texts = [" ".join(WORDS[i % len(WORDS) : i % len(WORDS) + 1 + i % 7]) for i in range(40)]
    manifest = export_model(
        ExportSpec(
            source=folder,
            task="text-classification",
            name="tinycls",
            repository=tmp_path / "repo",
            timing="quick",
            validation=texts,
            calibration=["good day", "bad night", "help", "open the account"],
            variants=("onnx-fp32", "onnx-opt", "onnx-int8", "ov-fp32"),
        )
    )
    path = tmp_path / "repo" / "tinycls" / "1"
    pkg = read_package(path)
    assert manifest.labels == ["neg", "neutral", "pos"]
    assert manifest.text is not None and manifest.text.output == "logits" and manifest.text.pooling == "none"
    assert manifest.text.max_length == 32
    assert set(manifest.text.input_map.values()) <= {"input_ids", "attention_mask", "token_type_ids"}
    assert (path / "tokenizer" / "tokenizer.json").is_file()
    fp32 = pkg.manifest.variant("onnx-fp32")
    acc = fp32.accuracy[0]
    assert acc.passed and acc.metrics["top1_agreement"] == 1.0 and acc.metrics["max_prob_diff"] < 1e-4
    assert acc.samples == 40 and acc.reference == "pytorch"
    # the package runs through the runtime's own tokenizer and backend and agrees with transformers
    import torch
    from transformers import AutoModelForSequenceClassification

    enc = TextEncoder.from_dir(path / "tokenizer", manifest.text).encode(["good day", "the patient"])
    session = get_backend("ort-cpu").open(path / "onnx" / "model.onnx", OpenOptions(intra_op_threads=1))
    logits = session.run(enc.feeds)["logits"]
    with torch.inference_mode():
        ref = (
            AutoModelForSequenceClassification.from_pretrained(folder)
            .eval()(**{k: torch.from_numpy(v) for k, v in enc.feeds.items()})
            .logits.numpy()
        )
    np.testing.assert_allclose(logits, ref, atol=1e-4)


def test_image_classification_folder(tmp_path: Path) -> None:
    folder = _tiny_vit_folder(tmp_path / "vit")
    manifest = export_model(
        ExportSpec(
            source=folder,
            task="image-classification",
            name="tinyvit",
            repository=tmp_path / "repo",
            timing="quick",
            variants=("onnx-fp32", "ov-fp32", "ov-int8"),
        )
    )
    assert [(i.name, i.shape[1:]) for i in manifest.inputs] == [("pixel_values", [3, 16, 16])]
    fp32 = manifest.variant("onnx-fp32")
    assert fp32.accuracy[0].passed and fp32.accuracy[0].samples == 64
    assert fp32.accuracy[0].metrics["top1_agreement"] == 1.0
    assert manifest.text is None and manifest.labels is not None and len(manifest.labels) == 4
    # the export's 2 threads: a server would run 2 streams, so the stream scenario is timed on one
    assert {t.scenario for t in fp32.timings} == {"b1", "b32-typical", "stream"}
    (stream,) = [t for t in fp32.timings if t.scenario == "stream"]
    assert (stream.batch, stream.threads) == (4, 1)
    assert {a.variant for a in manifest.attempts} >= {"onnx-fp32", "ov-fp32", "ov-int8"}


def test_wrong_task_for_folder(tmp_path: Path) -> None:
    from runtime.errors import SourceError

    folder = _tiny_vit_folder(tmp_path / "vit")
    with pytest.raises(SourceError, match=r"no tokenizer\.json"):
        export_model(ExportSpec(source=folder, task="text-classification", name="x", repository=tmp_path / "r"))
    with pytest.raises(SourceError, match="not supported for a Hugging Face folder"):
        export_model(ExportSpec(source=folder, task="tensor", name="x", repository=tmp_path / "r"))
    assert not any((tmp_path / "r" / ".staging").iterdir())

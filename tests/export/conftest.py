"""Small real models for the export tests, built here (onnx.helper / torch / transformers), never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from export.spec import ExportSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def build_mlp(path: Path, seed: int = 0) -> Path:
    """``x`` float32 [N, 16] -> ``y`` float32 [N, 4]: two Gemm-free MatMul+Add layers with a Relu."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.standard_normal(4).astype(np.float32) * 0.1, "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("MatMul", ["h2", "w2"], ["y0"], name="fc2"),
        helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2_bias"),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_mlp(tmp_path_factory.mktemp("tiny") / "mlp.onnx")


@pytest.fixture(scope="session")
def magika_onnx() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("magika")
    assert spec is not None and spec.submodule_search_locations
    found = sorted(Path(next(iter(spec.submodule_search_locations))).glob("models/*/model.onnx"))
    assert found, "magika ships no ONNX model"
    return found[-1]


def tiny_bert_parts(words: list[str], **config: object) -> tuple[object, object]:
    """A WordPiece tokenizer over ``words`` (BERT's special tokens first, [CLS] a [SEP] b [SEP])
    and a 2-layer, 32-wide ``BertConfig`` for it (``config``: more fields, e.g. labels); seeds torch.
    Returns (PreTrainedTokenizerFast, BertConfig)."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import BertConfig, PreTrainedTokenizerFast

    torch.manual_seed(0)
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
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
    bert = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        **config,
    )
    return fast, bert


def quick_spec(source: object, task: str, repo: Path, **extra: object) -> ExportSpec:
    """An export of ``source`` named ``m`` into ``repo``: quick timing, one thread, the fp32 ONNX
    variant only unless ``variants`` says otherwise."""
    given: dict[str, object] = {"variants": ("onnx-fp32",), **extra}
    return ExportSpec(source=source, task=task, name="m", repository=repo, timing="quick", threads=1, **given)  # type: ignore[arg-type]

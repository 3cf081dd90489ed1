"""sentence-transformers folders: the package pools and normalizes as the folder's modules do, refuses
modules it cannot reproduce, and a malformed JSON file is a SourceError (tiny models built here)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from export.pipeline import export_model
from export.spec import ExportSpec
from runtime.errors import SourceError
from tests.export.conftest import tiny_bert_parts

WORDS = ["the", "a", "patient", "loan", "bank", "account", "card", "pay", "refund", "night", "day", "good", "bad"]
TEXTS = [" ".join(WORDS[i % len(WORDS) : i % len(WORDS) + 1 + i % 5]) for i in range(24)]


def _tiny_bert(folder: Path) -> Path:
    from transformers import BertModel

    tokenizer, config = tiny_bert_parts(WORDS)
    tokenizer.save_pretrained(folder)  # type: ignore[attr-defined]
    BertModel(config).eval().save_pretrained(folder)
    return folder


def _st_folder(folder: Path, pooling: dict[str, object], *, normalize: bool, extra: list[str] = ()) -> Path:
    """A sentence-transformers folder around the tiny BERT: Transformer, Pooling (``pooling`` as its
    config), optionally Normalize and further module types."""
    _tiny_bert(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, **pooling}))
    for kind in extra:
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": f"{len(modules)}_{kind}",
                "type": f"sentence_transformers.models.{kind}",
            }
        )
    if normalize:
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": f"{len(modules)}_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))
    return folder


LEGACY_CLS = {
    "pooling_mode_cls_token": True,
    "pooling_mode_mean_tokens": False,
    "pooling_mode_max_tokens": False,
    "pooling_mode_mean_sqrt_len_tokens": False,
}


def _export(folder: Path, repo: Path):  # type: ignore[no-untyped-def]
    return export_model(
        ExportSpec(
            source=folder,
            task="feature-extraction",
            name="st",
            repository=repo,
            timing="quick",
            threads=1,
            validation=TEXTS,
            calibration=TEXTS[:4],
            variants=("onnx-fp32",),
        )
    )


@pytest.mark.parametrize(
    ("pooling", "normalize", "expected"),
    [(LEGACY_CLS, False, "cls"), ({"pooling_mode": "mean"}, True, "mean")],
)
def test_pooling_and_normalize_follow_the_folder(
    tmp_path: Path, pooling: dict[str, object], normalize: bool, expected: str
) -> None:
    folder = _st_folder(tmp_path / "st", pooling, normalize=normalize)
    manifest = _export(folder, tmp_path / "repo")
    assert manifest.text is not None
    assert (manifest.text.pooling, manifest.text.normalize) == (expected, normalize)
    acc = manifest.variant("onnx-fp32").accuracy[0]
    assert acc.passed and acc.metrics["cosine_min"] > 0.9999, acc.metrics
    # the package's own answers (runtime tokenizer, backend, pooling) match sentence-transformers'
    from sentence_transformers import SentenceTransformer

    from runtime.backends.base import OpenOptions
    from runtime.backends.registry import get_backend
    from runtime.text import TextEncoder, postprocess

    path = tmp_path / "repo" / "st" / "1"
    enc = TextEncoder.from_dir(path / "tokenizer", manifest.text).encode(TEXTS[:5])
    session = get_backend("ort-cpu").open(path / "onnx" / "model.onnx", OpenOptions(intra_op_threads=1))
    try:
        ours = postprocess(session.run(dict(enc.feeds)), enc.attention_mask, manifest.text)
    finally:
        session.close()
    ref = SentenceTransformer(str(folder), device="cpu", local_files_only=True).encode(TEXTS[:5])
    np.testing.assert_allclose(ours, ref, atol=1e-4)


@pytest.mark.parametrize(
    ("pooling", "extra", "expected"),
    [
        ({"pooling_mode": "mean"}, ["Dense"], r"2_Dense \(sentence_transformers\.models\.Dense\).*not supported"),
        ({"pooling_mode_max_tokens": True}, [], r"pooling \['max'\] is not supported"),
        ({"pooling_mode": ["cls", "mean"]}, [], r"pooling \['cls', 'mean'\] is not supported"),
        ({"pooling_mode": "mean_sqrt_len_tokens"}, [], "mean_sqrt_len_tokens"),
    ],
)
def test_modules_the_package_cannot_run_are_refused(
    tmp_path: Path, pooling: dict[str, object], extra: list[str], expected: str
) -> None:
    folder = _st_folder(tmp_path / "st", pooling, normalize=True, extra=extra)
    with pytest.raises(SourceError, match=expected):
        _export(folder, tmp_path / "repo")
    assert not (tmp_path / "repo" / "st").exists()


@pytest.mark.parametrize("name", ["config.json", "modules.json", "1_Pooling/config.json", "sentence_bert_config.json"])
def test_malformed_json_is_a_source_error(tmp_path: Path, name: str) -> None:
    folder = _st_folder(tmp_path / "st", {"pooling_mode": "mean"}, normalize=True)
    (folder / name).write_text('{"hidden_size": 32,', encoding="utf-8")
    with pytest.raises(SourceError, match=rf"{name}.*not readable JSON"):
        _export(folder, tmp_path / "repo")

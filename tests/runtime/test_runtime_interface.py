"""``runtime.interface``: what a new version changes of the interface its clients see."""

from __future__ import annotations

import msgspec

from runtime.interface import interface, interface_changes
from runtime.manifest import Manifest, Provenance, TensorSpec, TextConfig

IDS = [TensorSpec(name=n, dtype="int64", shape=[-1, -1]) for n in ("input_ids", "attention_mask", "token_type_ids")]


def _classifier(labels: list[str], **text: object) -> Manifest:
    return Manifest(
        name="sentiment",
        version=1,
        task="text-classification",
        inputs=IDS,
        outputs=[TensorSpec(name="logits", dtype="float32", shape=[-1, len(labels)])],
        variants=[],
        files=[],
        provenance=Provenance(source_kind="hf", source="x", source_sha256="", created_at=""),
        text=TextConfig(output="logits", **text),  # type: ignore[arg-type]
        labels=labels,
    )


def test_a_text_model_is_its_texts_in_and_its_answer_out_not_its_graph() -> None:
    """Another tokenizer's graph inputs (no token_type_ids) or max_length change nothing a client sends."""
    old = _classifier(["neg", "pos"], max_length=128)
    new = msgspec.structs.replace(_classifier(["neg", "pos"], max_length=512), inputs=IDS[:2], version=2)
    assert interface(old) == {
        "task": "text-classification",
        "inputs": "text (texts)",
        "outputs": "logits float32",
        "classes": "2",
        "labels": "2 ['neg', 'pos']",
    }
    assert interface_changes(old, new) == []


def test_labels_that_change_are_named_where_they_differ() -> None:
    many = [f"class{i}" for i in range(10)]
    swapped = [*many[:7], "class8", "class7", "class9"]
    assert interface_changes(_classifier(["neg", "pos"]), _classifier(["pos", "neg"])) == [
        "labels 2 ['neg', 'pos'] -> 2 ['pos', 'neg']"
    ]
    assert interface_changes(_classifier(many), _classifier(swapped)) == ["labels[7] 'class7' -> 'class8'"]
    assert interface_changes(_classifier(["neg", "pos"]), _classifier(["neg", "neutral", "pos"])) == [
        "classes 2 -> 3",
        "labels 2 ['neg', 'pos'] -> 3 ['neg', 'neutral', 'pos']",
    ]

"""Accuracy of a variant against the reference: metrics per task, held to a gate.

* embeddings: ``cosine_mean``, ``cosine_min`` (per sample, vectors L2-normalised),
  ``topk_agreement`` (mean overlap of the top-5 neighbours of every sample within
  the validation set, variant vs reference);
* classification: ``top1_agreement``, ``max_prob_diff`` (softmax of logits), and
  ``label_accuracy`` / ``label_accuracy_drop`` when labels are known;
* tensor: ``max_abs_diff`` and ``max_rel_diff`` = max|out - ref| / max|ref|;
* every task: ``batch_rel_diff``, how much a sample's answer changes with the
  samples batched beside it: max|alone - in batch| / max|in batch| over the first
  rows of the validation batches (:func:`batch_rel_diff`).  A server batches
  whoever's requests arrive together, so an answer must not depend on them:
  per-tensor dynamic INT8 (one activation scale for the whole batch) fails this
  (~0.1 on MiniLM), fp32 / bf16 / per-token quantization do not (< 1e-3).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["TOPK", "batch_rel_diff", "classification_metrics", "embedding_metrics", "softmax", "tensor_metrics"]

TOPK = 5

F32 = npt.NDArray[np.float32]


def _unit(x: npt.NDArray[np.generic]) -> F32:
    a = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    unit: F32 = (a / np.clip(np.linalg.norm(a, axis=1, keepdims=True), 1e-12, None)).astype(np.float32)
    return unit


def _topk(unit: F32, k: int) -> npt.NDArray[np.intp]:
    sims = unit @ unit.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def embedding_metrics(out: npt.NDArray[np.generic], ref: npt.NDArray[np.generic]) -> dict[str, float]:
    a, b = _unit(out), _unit(ref)
    cos = (a * b).sum(axis=1)
    metrics = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min())}
    k = min(TOPK, len(a) - 1)
    if k >= 1:
        ta, tb = _topk(a, k), _topk(b, k)
        overlap = [len(set(x) & set(y)) / k for x, y in zip(ta.tolist(), tb.tolist(), strict=True)]
        metrics["topk_agreement"] = float(np.mean(overlap))
    return metrics


def softmax(logits: npt.NDArray[np.generic]) -> F32:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    probs: F32 = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def classification_metrics(
    out: npt.NDArray[np.generic],
    ref: npt.NDArray[np.generic],
    *,
    labels: Sequence[int] | npt.NDArray[np.generic] | None = None,
    probabilities: bool = False,
) -> dict[str, float]:
    """``out``/``ref`` are logits (or probabilities when ``probabilities``) ``[N, C]``."""
    pa = np.asarray(out, dtype=np.float32) if probabilities else softmax(out)
    pb = np.asarray(ref, dtype=np.float32) if probabilities else softmax(ref)
    top_a, top_b = pa.argmax(axis=1), pb.argmax(axis=1)
    metrics = {
        "top1_agreement": float((top_a == top_b).mean()),
        "max_prob_diff": float(np.abs(pa - pb).max()),
    }
    if labels is not None:
        y = np.asarray(labels).reshape(-1)
        acc, ref_acc = float((top_a == y).mean()), float((top_b == y).mean())
        metrics["label_accuracy"] = acc
        metrics["reference_label_accuracy"] = ref_acc
        metrics["label_accuracy_drop"] = max(0.0, ref_acc - acc)
    return metrics


def tensor_metrics(out: npt.NDArray[np.generic], ref: npt.NDArray[np.generic]) -> dict[str, float]:
    a = np.asarray(out, dtype=np.float64)
    b = np.asarray(ref, dtype=np.float64)
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else diff}


def batch_rel_diff(alone: npt.NDArray[np.generic], batched: npt.NDArray[np.generic]) -> float:
    """max|alone - batched| / max|batched|: rows answered one at a time vs the same rows in their batches."""
    return tensor_metrics(alone, batched)["max_rel_diff"]

"""Accuracy of a variant against the reference: metrics per task, held to a gate.

* embeddings: ``cosine_mean``, ``cosine_min`` (per sample, vectors L2-normalised),
  ``topk_agreement`` (mean overlap of the top-5 neighbours of every sample within
  the validation set, variant vs reference);
* classification: ``top1_agreement``, ``max_prob_diff`` (softmax of logits), and
  ``label_accuracy`` / ``label_accuracy_drop`` when labels are known.  Outputs that already
  are probabilities (every reference row non-negative and summing to 1,
  :func:`looks_like_probabilities`) are compared as they are, not softmaxed again.  A
  single-logit head (``[N, 1]``: rerankers, binary classifiers) goes through a sigmoid
  instead (a softmax over one class is always 1, so no gate could fail): ``top1_agreement``
  is then the agreement of the decisions (logit > 0, or probability > 0.5 when the
  reference holds values in [0, 1] only), ``max_prob_diff`` the largest sigmoid difference,
  and ``max_rel_diff`` of the raw scores is reported too (gate it with
  ``--gate max_max_rel_diff=...`` when the ranking matters);
* tensor: ``max_abs_diff`` and ``max_rel_diff`` = max|out - ref| / max|ref|;
* every task: ``batch_rel_diff``, how much a sample's answer changes with the
  samples batched beside it: max|alone - in batch| / max|in batch| over four
  rows of every validation batch, of a text batch its most padded ones
  (:func:`batch_rel_diff`, :func:`export.pipeline.alone_rows`; validation batches of fewer
  than 8 rows add a probe batch, :func:`export.pipeline.batch_probe`).  A server batches
  whoever's requests arrive together, so an answer must not depend on them:
  per-tensor dynamic INT8 (one activation scale for the whole batch) fails this
  (~0.1 on MiniLM), fp32 / bf16 / static INT8 do not (< 1e-3); OpenVINO's
  run-time activation quantization fails it on an AVX2 box (short texts in
  batches of 8 or more: 0.014).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from runtime import scores

__all__ = [
    "PROB_TOLERANCE",
    "TOPK",
    "batch_rel_diff",
    "classification_metrics",
    "embedding_metrics",
    "looks_like_probabilities",
    "sigmoid",
    "softmax",
    "tensor_metrics",
]

TOPK = 5
#: how far a row of probabilities may sum from 1 (float32 softmax outputs: ~1e-6)
PROB_TOLERANCE = 1e-3

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
    return scores.softmax(logits)


def sigmoid(logits: npt.NDArray[np.generic]) -> F32:
    return scores.sigmoid(logits).astype(np.float32)


def looks_like_probabilities(ref: npt.NDArray[np.generic]) -> bool:
    """True when ``ref`` ``[N, C]`` already holds probabilities: for ``C >= 2`` every row is
    non-negative and sums to 1 (within :data:`PROB_TOLERANCE`); for ``C == 1`` every value lies in
    [0, 1] (a sigmoid output; logits that happen to stay there are then held to the stricter
    raw difference)."""
    a = np.asarray(ref, dtype=np.float64)
    if a.ndim != 2 or not a.size or not bool(np.isfinite(a).all()) or float(a.min()) < 0:
        return False
    if a.shape[1] == 1:
        return float(a.max()) <= 1.0
    return bool(np.all(np.abs(a.sum(axis=1) - 1.0) <= PROB_TOLERANCE))


def classification_metrics(
    out: npt.NDArray[np.generic],
    ref: npt.NDArray[np.generic],
    *,
    labels: Sequence[int] | npt.NDArray[np.generic] | None = None,
    probabilities: bool = False,
) -> dict[str, float]:
    """``out``/``ref`` are logits (or probabilities when ``probabilities``) ``[N, C]``.

    ``C == 1`` (one score per sample): sigmoid probabilities, the decision is the score above
    0 (above 0.5 for probabilities), and ``max_rel_diff`` of the raw scores is added.
    """
    a = np.asarray(out, dtype=np.float32)
    b = np.asarray(ref, dtype=np.float32)
    single = a.ndim == 2 and a.shape[1] == 1
    if single:
        pa = a if probabilities else sigmoid(a)
        pb = b if probabilities else sigmoid(b)
        top_a, top_b = (pa[:, 0] > 0.5).astype(np.intp), (pb[:, 0] > 0.5).astype(np.intp)
    else:
        pa = a if probabilities else softmax(a)
        pb = b if probabilities else softmax(b)
        top_a, top_b = pa.argmax(axis=1), pb.argmax(axis=1)
    metrics = {
        "top1_agreement": float((top_a == top_b).mean()),
        "max_prob_diff": float(np.abs(pa.astype(np.float64) - pb).max()),
    }
    if single:
        metrics["max_rel_diff"] = tensor_metrics(a, b)["max_rel_diff"]
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
    if a.shape != b.shape:  # another number of detections, say: not the reference's answer
        return {"max_abs_diff": math.inf, "max_rel_diff": math.inf}
    diff = float(np.abs(a - b).max()) if a.size else 0.0
    scale = float(np.abs(b).max()) if b.size else 0.0
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else diff}


def batch_rel_diff(alone: npt.NDArray[np.generic], batched: npt.NDArray[np.generic]) -> float:
    """max|alone - batched| / max|batched|: rows answered one at a time vs the same rows in their batches."""
    return tensor_metrics(alone, batched)["max_rel_diff"]

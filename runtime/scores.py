"""Scores from logits: the softmax of a classifier's row and the sigmoid of a single logit.

One definition for the export's accuracy gates, the batch outputs and the rerank route,
so that what a gate held is what a client is given.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["sigmoid", "softmax"]


def softmax(logits: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
    """Along the last axis, computed in float64 (shifted by the row's maximum), returned as float32."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    probs: npt.NDArray[np.float32] = (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
    return probs


def sigmoid(logits: npt.NDArray[np.generic] | float) -> npt.NDArray[np.float64]:
    """Elementwise, in float64; the tanh form never overflows, whatever the logit."""
    x = np.asarray(logits, dtype=np.float64)
    out: npt.NDArray[np.float64] = 0.5 * (1.0 + np.tanh(0.5 * x))
    return out

"""Graph optimization: ORT's transformer optimizer for BERT-like graphs, ORT offline optimization otherwise.

The transformer optimizer fuses attention, SkipLayerNormalization,
EmbedLayerNormalization and BiasGelu (contrib ops: the result runs on ONNX
Runtime, not on other ONNX consumers).  Other graphs get ONNX Runtime's
extended offline optimizations (constant folding, Conv+BN/activation fusion).
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["optimize_onnx"]

logger = logging.getLogger(__name__)


def optimize_onnx(src: Path, dst: Path, bert: tuple[int, int] | None) -> str:
    """Write the optimized graph to ``dst``; returns a one-line description of what was done."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if bert is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        heads, hidden = bert
        model = optimize_model(str(src), model_type="bert", num_heads=heads, hidden_size=hidden)
        stats = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(dst))
        return f"onnxruntime transformers optimizer (bert, {heads} heads, hidden {hidden}): fused {stats}"
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(dst)
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return "onnxruntime offline graph optimization (extended: constant folding, node fusions)"

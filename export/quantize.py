"""ONNX Runtime INT8 recipes, in the order the pipeline tries them (first that passes its gate wins).

Transformer graphs (measured on all-MiniLM-L6-v2, see the export report):

1. ``dynamic-per-channel``: weights per-channel INT8, activations quantized per
   tensor at run time, on the fused graph (fastest; usually loses too much on
   very short inputs);
2. ``dynamic-per-channel-skip-sensitive``: the same, leaving the attention
   core (Q/K/V + softmax), the FFN down projections and the last layer in fp32;
3. ``dynamic-per-channel-ffn-up``: only the FFN up projections in INT8 (last
   layer excepted);
4. ``static-qdq``: QDQ with MinMax calibration on the customer's samples,
   per-channel weights, sensitive nodes in fp32.

Other graphs (CNNs, MLPs): static QDQ first (per-channel, calibrated), then
dynamic per-channel, then static QDQ with the first and last node in fp32.

Every recipe quantizes for the CPU it is validated on: ``reduce_range`` (7-bit
weights) where INT8 saturates (x86 without VNNI / AMX), else 8-bit weights and
``requires`` ``cpu-vnni``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from export.sources import Feeds, Prepared

__all__ = ["QUANT_OPS", "Int8Target", "OrtRecipe", "count_ops", "int8_target", "is_quantized", "ort_recipes"]

logger = logging.getLogger(__name__)

#: ops a quantizer turns into INT8 compute (structural checks count these)
QUANT_OPS = (
    "MatMulInteger",
    "DynamicQuantizeMatMul",
    "QuantizeLinear",
    "DequantizeLinear",
    "ConvInteger",
    "QLinearConv",
    "QLinearMatMul",
    "QAttention",
    "DynamicQuantizeLinear",
    "QGemm",
    "DynamicQuantizeLSTM",
)
#: prefixes of the quantized ops ONNX Runtime's quantizer writes besides those (QLinearAdd, QLinearMul,
#: QLinearSigmoid, DynamicQuantizeLSTM, ...): every op whose name starts so computes in INT8
QUANT_PREFIXES = ("QLinear", "DynamicQuantize", "MatMulInteger", "ConvInteger")


def is_quantized(op_type: str) -> bool:
    """Whether an ONNX op computes in (or converts to) INT8: what makes a file an INT8 variant."""
    return op_type in QUANT_OPS or op_type.startswith(QUANT_PREFIXES)


@dataclass(frozen=True)
class OrtRecipe:
    name: str
    description: str
    build: Callable[[Path], None]
    #: ``Variant.requires`` of what it builds
    requires: tuple[str, ...] = ()


@dataclass(frozen=True)
class Int8Target:
    """How INT8 weights are quantized for the CPU that validates them (ORT and OpenVINO alike)."""

    #: 7-bit weights: x86 INT8 kernels without VNNI / AMX saturate on 8-bit ones
    seven_bit: bool
    #: ``Variant.requires`` of an 8-bit-weight variant: a CPU where they are exact
    requires: tuple[str, ...]
    #: appended to recipe descriptions
    note: str


def int8_target() -> Int8Target:
    """This CPU's :class:`Int8Target` (see :func:`runtime.hardware.int8_saturates`)."""
    from runtime.hardware import local_int8_saturates

    if local_int8_saturates():
        return Int8Target(seven_bit=True, requires=(), note=", 7-bit weights (no VNNI here)")
    return Int8Target(seven_bit=False, requires=("cpu-vnni",), note="")


def count_ops(path: Path) -> dict[str, int]:
    """op type -> node count (top-level graph) of an ONNX file."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _node_names(path: Path, op_types: tuple[str, ...]) -> list[str]:
    import onnx

    return [n.name for n in onnx.load(str(path), load_external_data=False).graph.node if n.op_type in op_types]


class _Reader:
    """CalibrationDataReader over the prepared calibration samples (one unpadded sample each)."""

    def __init__(self, samples: list[Feeds], input_names: set[str]) -> None:
        self._samples = samples
        self._names = input_names
        self._it: Iterator[Feeds] = iter(())
        self.rewind()

    def get_next(self) -> Feeds | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = ({k: v for k, v in s.items() if k in self._names} for s in self._samples)


def _layers(names: list[str]) -> list[int]:
    import re

    found = {int(m.group(1)) for n in names if (m := re.search(r"layer[._/](\d+)[./]", n))}
    return sorted(found)


def ort_recipes(prepared: Prepared, fp32: Path, optimized: Path | None) -> list[OrtRecipe]:
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    base = optimized if optimized is not None else fp32
    extra = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    input_names = {i.name for i in prepared.inputs}
    # MLAS multiplies u8 activations by s8 weights with VPMADDUBSW unless the CPU has VNNI, and
    # those int16 pair sums saturate on 8-bit weights: there, quantize weights to 7 bits
    # (reduce_range); with VNNI keep 8 bits and require such a CPU (see runtime.hardware).
    target = int8_target()
    reduce, requires, weights = target.seven_bit, target.requires, target.note

    def dynamic(exclude: list[str]) -> Callable[[Path], None]:
        def build(dst: Path) -> None:
            quantize_dynamic(
                str(base),
                str(dst),
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=reduce,
                nodes_to_exclude=exclude,
                extra_options=extra,
            )

        return build

    def static(exclude: list[str]) -> Callable[[Path], None]:
        def build(dst: Path) -> None:
            quantize_static(
                str(fp32),
                str(dst),
                _Reader(prepared.calibration, input_names),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                per_channel=True,
                reduce_range=reduce,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                calibrate_method=CalibrationMethod.MinMax,
                extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
            )

        return build

    if prepared.bert is not None:
        names = _node_names(base, ("MatMul", "Attention", "Gemm"))
        layers = _layers(names)
        last = layers[-1] if layers else -1

        def in_last(n: str) -> bool:
            return f"layer.{last}/" in n or n == f"Attention_{last}"

        # the attention core (fused Attention op, or the Q/K/V projections); its output projection may be INT8
        attention = [n for n in names if n.startswith("Attention") or "/attention/self/" in n]
        down = [n for n in names if "/output/dense" in n and "/attention/" not in n]
        sensitive = sorted(set(attention + down + [n for n in names if in_last(n)]))
        ffn_up = [n for n in names if "/intermediate/" in n and not in_last(n)]
        static_sensitive = _node_names(fp32, ("MatMul", "Gemm"))
        static_exclude = [n for n in static_sensitive if "/output/dense" in n and "/attention/" not in n]
        static_exclude += [n for n in static_sensitive if f"layer.{last}/" in n]
        return [
            OrtRecipe(
                "dynamic-per-channel",
                "quantize_dynamic per-channel QInt8, every MatMul/Attention of the "
                f"{'fused' if optimized else 'fp32'} graph{weights}",
                dynamic([]),
                requires,
            ),
            OrtRecipe(
                "dynamic-per-channel-skip-sensitive",
                f"quantize_dynamic per-channel; {len(sensitive)} nodes "
                f"in fp32 (attention core, FFN down projections, last layer){weights}",
                dynamic(sensitive),
                requires,
            ),
            OrtRecipe(
                "dynamic-per-channel-ffn-up",
                f"quantize_dynamic per-channel on the {len(ffn_up)} FFN up projections only (last layer in fp32)"
                f"{weights}",
                dynamic([n for n in names if n not in ffn_up]),
                requires,
            ),
            OrtRecipe(
                "static-qdq",
                f"quantize_static QDQ MinMax on {len(prepared.calibration)} calibration samples, "
                f"per-channel weights, {len(static_exclude)} sensitive MatMuls in fp32{weights}",
                static(static_exclude),
                requires,
            ),
        ]
    nodes = _node_names(fp32, ("Conv", "MatMul", "Gemm"))
    edge = [nodes[0], nodes[-1]] if len(nodes) > 2 else []
    return [
        OrtRecipe(
            "static-qdq",
            f"quantize_static QDQ MinMax on {len(prepared.calibration)} calibration samples, per-channel "
            f"weights{weights}",
            static([]),
            requires,
        ),
        OrtRecipe(
            "dynamic-per-channel",
            f"quantize_dynamic per-channel QInt8 on every MatMul/Conv/Gemm{weights}",
            lambda dst: quantize_dynamic(
                str(fp32), str(dst), weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce
            ),
            requires,
        ),
        OrtRecipe(
            "static-qdq-skip-edges",
            f"quantize_static QDQ, first and last compute node in fp32{weights}",
            static(edge),
            requires,
        ),
    ]

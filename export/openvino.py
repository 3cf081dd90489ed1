"""OpenVINO IR: fp32 conversion and the NNCF INT8 recipes, in the order the pipeline tries them.

``ov.save_model`` is always called with ``compress_to_fp16=False`` (its default
silently stores FP16 weights).  INT8 recipes:

1. ``nncf-quantize``: full INT8 (weights and activations), calibrated on the
   customer's samples, ``ModelType.TRANSFORMER`` for transformer graphs;
2. ``nncf-quantize-dynamic-down`` (transformers): SmoothQuant alpha 0.5
   (migrates activation outliers into the weights) and static INT8 everywhere
   except the FFN down projections, whose input (the GELU output) has outlier
   channels no per-tensor scale fits; those get INT8 weights
   (``compress_weights`` INT8_SYM) and OpenVINO quantizes their activations
   at run time per group of :data:`DYNAMIC_GROUP` values
   (``DYNAMIC_QUANTIZATION_GROUP_SIZE``, stored in the IR's
   ``rt_info/runtime_options`` so every compile of the package uses it);
3. ``nncf-quantize-skip-sensitive`` (transformers): SmoothQuant alpha 0.5,
   FFN down projections and the last layer left in fp32;
4. ``nncf-compress-weights``: INT8 weight-only compression (activations stay
   in the exec precision); slower than full INT8, much closer to fp32.

The static recipes quantize for the CPU they are validated on: on an x86 CPU
without VNNI / AMX (:func:`runtime.hardware.int8_saturates`) with 7-bit weights
(NNCF's overflow fix on every layer); elsewhere with 8-bit weights, and the
variant then ``requires`` ``cpu-vnni``.

Measured on all-MiniLM-L6-v2 (AVX-512 + VNNI box, b32 x 128 tokens, bf16 exec, cosine vs
fp32 on the 230 validation sentences): full INT8 ~180/s but cosine min 0.96;
dynamic-down ~175-185/s, cosine min 0.993; skip-sensitive ~140-155/s, 0.997;
group sizes 32 / 128 / 512 / 1536 change cosine by < 0.001, 32 is ~15 % slower.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from export.sources import Prepared

__all__ = ["DYNAMIC_GROUP", "OvRecipe", "bf16_supported", "convert", "count_ov_ops", "ov_recipes", "save"]

logger = logging.getLogger(__name__)

#: activation group size for the dynamically quantized MatMuls (OpenVINO's CPU default is 32)
DYNAMIC_GROUP = 128
#: FFN down projections of HF BERT-style graphs (``.../layer.N/output/dense/MatMul``, not the attention output)
FFN_DOWN = r"^(?!.*/attention/).*/output/dense/MatMul$"


@dataclass(frozen=True)
class OvRecipe:
    name: str
    description: str
    #: returns the compressed ov.Model (saved by the pipeline)
    build: Callable[[], Any]
    #: ``Variant.requires`` of what it builds
    requires: tuple[str, ...] = ()


def convert(onnx_path: Path) -> Any:
    from runtime.offline import import_openvino

    ov = import_openvino()

    return ov.convert_model(str(onnx_path))


def save(model: Any, xml_path: Path) -> None:
    from runtime.offline import import_openvino

    ov = import_openvino()

    xml_path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(xml_path), compress_to_fp16=False)


def bf16_supported() -> bool:
    """True when OpenVINO's CPU plugin lists BF16 among its optimization capabilities."""
    try:
        from runtime.offline import openvino_core

        return "BF16" in openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception as exc:  # a missing plugin means "no"
        logger.info("cannot read OpenVINO CPU capabilities: %s", exc)
        return False


def count_ov_ops(xml_path: Path) -> dict[str, int]:
    """op type -> count in an IR (FakeQuantize / FakeConvert mark full INT8, int8 Constants weight compression)."""
    from runtime.offline import openvino_core

    counts: dict[str, int] = {}
    for op in openvino_core().read_model(str(xml_path)).get_ops():
        t = op.get_type_name()
        if t == "Constant" and op.get_element_type().get_type_name() in ("i8", "u8"):
            t = "Constant:int8"
        counts[t] = counts.get(t, 0) + 1
    return counts


def ov_recipes(prepared: Prepared, onnx_path: Path) -> list[OvRecipe]:
    from export.quantize import int8_target
    from runtime.offline import stay_offline

    stay_offline()  # NNCF starts the same telemetry client at import
    import nncf

    transformer = prepared.bert is not None or prepared.text is not None
    names = {i.name for i in prepared.inputs}
    samples = [{k: v for k, v in s.items() if k in names} for s in prepared.calibration]
    # Validated here, so quantized for here: 7-bit weights where 8-bit ones would saturate
    # (NNCF's overflow fix on every layer); 8-bit weights are kept only where VNNI makes them
    # exact, and the variant then requires such a CPU.
    target = int8_target()
    overflow_fix = nncf.OverflowFix.ENABLE if target.seven_bit else None
    static_requires, weights = target.requires, target.note

    def quantize(ignored: list[str] | None, alpha: float | None) -> Callable[[], Any]:
        def build() -> Any:
            options: dict[str, Any] = {}
            if alpha is not None:
                options["smooth_quant_alphas"] = nncf.AdvancedSmoothQuantParameters(matmul=alpha)
            if overflow_fix is not None:
                options["overflow_fix"] = overflow_fix
            advanced = nncf.AdvancedQuantizationParameters(**options) if options else None
            scope = nncf.IgnoredScope(patterns=ignored, validate=False) if ignored else None
            return nncf.quantize(
                convert(onnx_path),
                nncf.Dataset(samples),
                model_type=nncf.ModelType.TRANSFORMER if transformer else None,
                subset_size=len(samples),
                ignored_scope=scope,
                advanced_parameters=advanced,
            )

        return build

    def compress() -> Any:
        return nncf.compress_weights(convert(onnx_path), mode=nncf.CompressWeightsMode.INT8_ASYM)

    def quantize_dynamic_down() -> Any:
        # static INT8 except the FFN down projections, then INT8 weights for what is left in fp32
        model = nncf.compress_weights(quantize([FFN_DOWN], 0.5)(), mode=nncf.CompressWeightsMode.INT8_SYM)
        model.set_rt_info(str(DYNAMIC_GROUP), ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])
        return model

    n = len(samples)
    if transformer:
        recipes = [
            OvRecipe(
                "nncf-quantize",
                f"nncf.quantize full INT8, ModelType.TRANSFORMER (its default SmoothQuant), {n} calibration "
                f"samples{weights}",
                quantize(None, None),
                static_requires,
            )
        ]
        recipes.append(
            OvRecipe(
                "nncf-quantize-dynamic-down",
                "nncf.quantize full INT8, ModelType.TRANSFORMER, SmoothQuant alpha 0.5, FFN down projections "
                f"with INT8 weights and activations quantized at run time (groups of {DYNAMIC_GROUP}), "
                f"{n} calibration samples{weights}",
                quantize_dynamic_down,
                static_requires,
            )
        )
        last = _last_layer(onnx_path)
        ignored = [FFN_DOWN]
        ignored += [rf".*/layer\.{last}/.*"] if last is not None else []
        recipes.append(
            OvRecipe(
                "nncf-quantize-skip-sensitive",
                "nncf.quantize full INT8, ModelType.TRANSFORMER, SmoothQuant alpha 0.5, FFN down projections "
                f"and the last layer in fp32, {n} calibration samples{weights}",
                quantize(ignored, 0.5),
                static_requires,
            )
        )
    else:
        recipes = [
            OvRecipe(
                "nncf-quantize",
                f"nncf.quantize full INT8, {n} calibration samples{weights}",
                quantize(None, None),
                static_requires,
            )
        ]
    recipes.append(OvRecipe("nncf-compress-weights", "nncf.compress_weights INT8_ASYM (weights only)", compress))
    return recipes


def _last_layer(onnx_path: Path) -> int | None:
    import re

    import onnx

    found = {
        int(m.group(1))
        for node in onnx.load(str(onnx_path), load_external_data=False).graph.node
        if (m := re.search(r"layer\.(\d+)/", node.name))
    }
    return max(found) if found else None

"""What to export and how it is judged: :class:`ExportSpec`, the variant ids and the accuracy gates.

A gate maps a metric name prefixed ``min_`` or ``max_`` to a threshold
(``min_cosine_min=0.97`` means "cosine_min must be >= 0.97").  Each task has
defaults (:data:`DEFAULT_GATES`); an export may override any of them
(``--gate min_cosine_min=0.98``) or add one for another metric it computes, also
one output's of a model with several (``--gate max_max_rel_diff[logits]=0.01``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from runtime.errors import ExportError, SourceError
from runtime.selection import RANKED_SCENARIOS, STREAM_SCENARIO

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

__all__ = [
    "BATCH_GATE",
    "DEFAULT_GATES",
    "QUICK_RANKED_MIN_S",
    "RANKED_ROUNDS",
    "RANKED_SCENARIOS",
    "STREAM_BATCH",
    "STREAM_SCENARIO",
    "STREAM_TOKENS",
    "TASKS",
    "TIMING_BUDGET_S",
    "TIMING_MIN_S",
    "TIMING_RUNS",
    "TIMING_WINDOWS",
    "VARIANT_IDS",
    "ExportSpec",
    "Progress",
    "check_gate",
    "check_gates",
    "check_version",
    "gates_for",
    "metric_kind",
    "parse_gate",
    "parse_variants",
]

TASKS = ("feature-extraction", "text-classification", "image-classification", "tensor")
VARIANT_IDS = ("onnx-fp32", "onnx-opt", "onnx-int8", "ov-fp32", "ov-int8")

#: metric family per task: which numbers validation computes
MetricKind = Literal["embeddings", "classification", "tensor"]

DEFAULT_GATES: dict[str, dict[str, float]] = {
    "embeddings": {"min_cosine_mean": 0.99, "min_cosine_min": 0.97},
    "classification": {"min_top1_agreement": 0.98, "max_max_prob_diff": 0.05},
    # max_rel_diff is max|out - ref| / max|ref| over the whole validation set
    "tensor": {"max_max_rel_diff": 0.05},
}
#: every task: a sample's answer alone vs in its validation batch (see export.validate.batch_rel_diff)
BATCH_GATE = {"max_batch_rel_diff": 0.01}
#: extra default when the validation samples carry labels (digits: INT8 within 1 point of the reference)
LABEL_GATE = {"max_label_accuracy_drop": 0.01}
#: the metrics validation computes per metric family (export.validate; a classifier's max_abs_diff /
#: max_rel_diff: of a single score or of its other outputs) besides batch_rel_diff: a gate on any
#: other metric could never hold, and is refused before any work is done
METRICS: dict[MetricKind, tuple[str, ...]] = {
    "embeddings": ("cosine_mean", "cosine_min", "topk_agreement"),
    "classification": ("top1_agreement", "max_prob_diff", "max_abs_diff", "max_rel_diff"),
    "tensor": ("max_abs_diff", "max_rel_diff"),
}
#: classification metrics measured when the validation samples carry labels
LABEL_METRICS = ("label_accuracy", "reference_label_accuracy", "label_accuracy_drop")
#: metrics also measured per output (``max_rel_diff[NAME]``) of a model with several
PER_OUTPUT_METRICS = ("max_abs_diff", "max_rel_diff")

#: (warmup runs, timed runs) per scenario
TIMING_RUNS: dict[str, tuple[int, int]] = {"quick": (1, 2), "full": (3, 20)}
#: which ONNX Runtime INT8 recipes an export tries (export.quantize): all in their order, or only the
#: static ones (calibrated on the samples) or the dynamic ones (activations quantized at run time)
INT8_RECIPES = ("auto", "static", "dynamic")
#: seconds of calls per scenario (warm-up included) after which "full" timing stops early
TIMING_BUDGET_S = 5.0
#: "full" timing goes on past its runs until the timed calls took this long (a 0.1 s window of
#: 20 fast calls let one slow spell of the VM decide serve's choice)
TIMING_MIN_S = 1.0
#: "full" timing's items/s is the best of this many consecutive windows of its timed calls
TIMING_WINDOWS = 3
#: the timing scenario of a server's batches: STREAM_BATCH rows of STREAM_TOKENS tokens (text) on
#: one stream's session (its share of the cores, :mod:`runtime.streams`), timed for CPU backends
#: when this box would serve as several streams.  A server at 32 concurrent single-text requests
#: formed batches of ~5 texts of ~35 tokens (MiniLM, 2 AVX2 cores, 2026-12-03); there ORT ran
#: them 5 % faster than OpenVINO on one thread while OpenVINO led at batch 32 x 128 on two.
STREAM_BATCH = 4
STREAM_TOKENS = 32
#: the scenarios the runtime ranks candidates by (:data:`runtime.selection.RANKED_SCENARIOS`: ``b1``
#: for latency, ``b32-typical`` for throughput, ``stream`` for a server running streams) are timed
#: side by side at the end of an export, in this many rounds; a candidate's best round counts.  Timed right
#: after each variant was built, minutes apart, they read the box's drift: on 2 AVX2 cores a build
#: timed OpenVINO fp32 7 % ahead of ORT at batch 32 while ORT ran it 9-17 % faster in alternating
#: windows (2026-12-06), and the batch worker, ranked by that figure, ran the slower one
RANKED_ROUNDS = 3
#: with "quick" timing the ranked scenarios are still timed side by side, for this long each in all
QUICK_RANKED_MIN_S = 0.3

#: progress callback: (step name, human message)
Progress = Callable[[str, str], None]


def metric_kind(task: str) -> MetricKind:
    if task == "feature-extraction":
        return "embeddings"
    if task in ("text-classification", "image-classification"):
        return "classification"
    if task == "tensor":
        return "tensor"
    raise SourceError(f"task {task!r} is not supported; use one of {', '.join(TASKS)}")


def gates_for(
    task: str, overrides: Mapping[str, float], *, labelled: bool = False, other_outputs: bool = False
) -> dict[str, float]:
    """The task's default gates, the batch gate, the label gate when labelled, and the tensor
    gate when the server returns outputs besides the answer (``other_outputs``: a classifier
    with more graph outputs; ``max_rel_diff`` is then the worst of those), then ``overrides``."""
    gates = {**DEFAULT_GATES[metric_kind(task)], **BATCH_GATE}
    if labelled:
        gates.update(LABEL_GATE)
    if other_outputs:
        gates = {**DEFAULT_GATES["tensor"], **gates}
    gates.update(overrides)
    return gates


def parse_gate(text: str) -> tuple[str, float]:
    """``min_cosine_min=0.98`` -> (``min_cosine_min``, 0.98)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key.startswith(("min_", "max_")):
        raise ExportError(
            f"gate {text!r} is not KEY=VALUE with KEY starting min_ or max_ (e.g. --gate min_cosine_min=0.98)"
        )
    try:
        number = float(value)
    except ValueError:
        raise ExportError(f"gate {text!r}: {value!r} is not a number (e.g. --gate {key}=0.98)") from None
    if not math.isfinite(number):
        raise ExportError(f"gate {text!r}: {value.strip()!r} is not a finite number (e.g. --gate {key}=0.98)")
    return key, number


def _known_metrics(task: str, *, labelled: bool = False) -> tuple[str, ...]:
    """The metrics an export of ``task`` measures (what a gate may hold), ``labelled``: with labels."""
    kind = metric_kind(task)
    labels = LABEL_METRICS if labelled and kind == "classification" else ()
    return (*METRICS[kind], *labels, *(k[4:] for k in BATCH_GATE))


def check_gates(task: str, gates: Mapping[str, Any], *, labelled: bool = False) -> None:
    """Gate overrides checked before any work: ``min_``/``max_`` + a metric ``task`` measures (per
    output ``METRIC[NAME]`` for :data:`PER_OUTPUT_METRICS`), a finite number.  Which outputs a
    ``[NAME]`` may name is known once the source is read (see export.pipeline)."""
    known = _known_metrics(task, labelled=labelled)
    per_output = [m for m in PER_OUTPUT_METRICS if m in known]
    for key, value in gates.items():
        if not _measured(str(key), known, per_output):
            forms = [*known, *(f"{m}[NAME]" for m in per_output)]
            raise ExportError(
                f"gate {key!r}: a {task} export measures no {str(key)[4:]!r}; gate min_ or max_ + one of "
                f"{', '.join(forms)} (e.g. --gate {_example(task)})"
            )
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ExportError(f"gate {key!r}: {value!r} is not a finite number (e.g. --gate {key}=0.98)")
        if (why := _never_met(str(key), float(value))) is not None:
            raise ExportError(f"gate {key!r}: {value:g} can never be met ({why}); every variant would fail it")


#: the range a metric's values lie in (a gate outside it fails every variant, after the whole export)
_METRIC_RANGES = {
    "cosine_mean": (-1.0, 1.0),
    "cosine_min": (-1.0, 1.0),
    "topk_agreement": (0.0, 1.0),
    "top1_agreement": (0.0, 1.0),
    "label_accuracy": (0.0, 1.0),
    "max_prob_diff": (0.0, 1.0),
}


def _never_met(key: str, value: float) -> str | None:
    """Why a ``min_``/``max_`` gate of ``value`` no measurement can meet, or None."""
    metric = key[4:].partition("[")[0]
    lo, hi = _METRIC_RANGES.get(metric, (0.0, math.inf))  # the rest are differences: at least 0
    if key.startswith("min_") and value > hi:
        return f"{metric} is at most {hi:g}"
    if key.startswith("max_") and value < lo:
        return f"{metric} is at least {lo:g}"
    return None


def _measured(key: str, known: Sequence[str], per_output: Sequence[str]) -> bool:
    """``key`` is ``min_``/``max_`` + a metric in ``known``, or + ``METRIC[NAME]`` of ``per_output``."""
    if not key.startswith(("min_", "max_")):
        return False
    base, bracket, rest = key[4:].partition("[")
    if bracket:
        return base in per_output and len(rest) > 1 and rest.endswith("]")
    return base in known


def _example(task: str) -> str:
    key, value = next(iter(DEFAULT_GATES[metric_kind(task)].items()))
    return f"{key}={value:g}"


def parse_variants(text: str | Sequence[str]) -> tuple[str, ...]:
    items = [s.strip() for s in (text.split(",") if isinstance(text, str) else text) if s.strip()]
    unknown = [s for s in items if s not in VARIANT_IDS]
    if unknown or not items:
        raise ExportError(f"unknown variants {unknown or text!r}; choose from {','.join(VARIANT_IDS)}")
    return tuple(v for v in VARIANT_IDS if v in items)


def check_gate(metrics: Mapping[str, float], gate: Mapping[str, float]) -> tuple[bool, list[str]]:
    """(passed, failures). A gate on a metric that was not computed fails (it cannot be checked)."""
    failures: list[str] = []
    for key, threshold in gate.items():
        name = key[4:]
        value = metrics.get(name)
        if value is None:
            failures.append(f"{name} not measured")
        elif key.startswith("min_") and not value >= threshold:
            failures.append(f"{name} {value:.4f} < {threshold:g}")
        elif key.startswith("max_") and not value <= threshold:
            failures.append(f"{name} {value:.4g} > {threshold:g}")
    return not failures, failures


@dataclass(frozen=True)
class ExportSpec:
    """One export. ``source``: a folder (HF), an ``.onnx`` file, or a ``torch.nn.Module``.

    Samples: for text tasks a JSONL/CSV file of texts or a list of strings; for
    tensor / image / PyTorch sources an ``.npz`` file or a dict of arrays
    (input name -> batch).  ``validation_labels`` (optional) lets the pipeline
    measure label accuracy of every variant (gate ``max_label_accuracy_drop``).
    """

    source: Path | Any
    task: str
    name: str
    repository: Path
    version: int | None = None
    calibration: Path | Sequence[str] | Mapping[str, npt.NDArray[np.generic]] | None = None
    validation: Path | Sequence[str] | Mapping[str, npt.NDArray[np.generic]] | None = None
    validation_labels: npt.NDArray[np.generic] | None = None
    labels: Sequence[str] | None = None
    gates: Mapping[str, float] = field(default_factory=dict)
    variants: tuple[str, ...] = VARIANT_IDS
    #: "quick" (tests) or "full" (CLI default): see TIMING_RUNS
    timing: str = "full"
    threads: int = 2
    max_length: int | None = None
    #: PyTorch sources: example inputs (input name -> array) fixing names, dtypes and ranks
    example_inputs: Mapping[str, npt.NDArray[np.generic]] | None = None
    #: a module source's name as the customer gave it (the CLI's ``/abs/path/net.py:build``): recorded
    #: with the module's class in the provenance, which the class alone did not tell apart
    source_label: str | None = None
    output_names: Sequence[str] | None = None
    signing_key: Ed25519PrivateKey | None = None
    #: test hook / extension point: called with the staging folder just before finalizing
    before_finalize: Callable[[Path], None] | None = None
    #: the new version may change the interface of the name's newest version (task, tensors, embedding
    #: dimension, labels: :mod:`runtime.interface`); without it such an export is refused
    new_interface: bool = False
    #: the ONNX Runtime INT8 recipes tried: :data:`INT8_RECIPES`
    int8_recipe: str = "auto"

    def __post_init__(self) -> None:
        metric_kind(self.task)
        check_gates(self.task, self.gates, labelled=self.validation_labels is not None)
        if self.timing not in TIMING_RUNS:
            raise ExportError(f"timing {self.timing!r} is not one of {', '.join(TIMING_RUNS)}")
        parse_variants(self.variants)
        check_version(self.version)
        if self.int8_recipe not in INT8_RECIPES:
            raise ExportError(f"int8 recipe {self.int8_recipe!r} is not one of {', '.join(INT8_RECIPES)}")


def check_version(version: int | None) -> None:
    """A pinned version must be a usable folder name (>= 1); checked before any work is done."""
    if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
        raise ExportError(f"version {version!r} is not usable; pass --version N with N >= 1 (or leave it out)")

"""In-process timings of a tensor package (task ``tensor`` or ``image-classification``).

The text part (:mod:`bench.inprocess`) feeds texts; a model exported from an
ONNX file or a PyTorch module takes tensors instead.  This part times every
(backend, variant, exec precision) the ranking admits here on the package's own
sample inputs (``samples/samples.npz``, written by the export), each opened as
``inferbox serve`` opens it:

- ``b1_p50_ms`` / ``b1_p99_ms``: one sample row per call (B rows for a model
  that fixes its batch axis to B: its smallest call);
- ``rows_per_s``: rows per second in calls of ``batch`` rows: 32 (the samples
  repeated), or the size a model fixes its batch axis to (an ONNX file exported
  with batch 1 takes one row per call; the server then runs each request as sent);
- accuracy against the plainest fp32 candidate (ONNX Runtime on the plain
  ONNX file first) on every sample row: ``max_abs_diff`` over all outputs,
  the cosine per row of the first output (``cos_mean`` / ``cos_min``) and, for
  a classifier, ``top1_agree`` (the share of rows whose arg-max agrees);
- ``peak_frac``: rows/s x FLOPs per row (matrix products and convolutions,
  counted on the plain fp32 ONNX file, :mod:`bench.roofline`) over the CPU's
  peak for the compute kind.

There is no PyTorch baseline here: the source of a tensor package may be an
ONNX file.  The accuracy the export measured against the source is in the
package's manifest (``inferbox models show``).
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from bench.common import (
    Config,
    format_table,
    skipped,
    summarize,
    time_calls,
    write_chart,
    write_json,
)
from bench.inprocess import (
    Runner,
    add_peak,
    auto_aliases,
    choice,
    cosine_stats,
    open_candidate,
    plain_fp32_onnx,
    plainest_fp32_first,
    top1_agreement,
    warm,
)

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from runtime.package import Package

    Feeds = dict[str, npt.NDArray[np.generic]]

__all__ = ["BATCH", "COLUMNS", "accuracy_stats", "run"]

logger = logging.getLogger(__name__)

#: rows per call of the throughput scenario
BATCH = 32
#: the table's columns, in order
COLUMNS = (
    "runner",
    "b1_p50_ms",
    "b1_p99_ms",
    "rows_per_s",
    "batch",
    "max_abs_diff",
    "cos_mean",
    "cos_min",
    "top1_agree",
    "peak_frac",
)


def accuracy_stats(outputs: Mapping[str, Any], reference: Mapping[str, Any], *, classifier: bool) -> dict[str, Any]:
    """``max_abs_diff`` over every output both have (``inf`` when an output holds NaN or Inf: a
    broken answer never reads as agreement), the cosine per row of the first shared output
    (mean, min) and, for a classifier, the share of rows whose arg-max agrees."""
    import numpy as np

    names = [n for n in reference if n in outputs]
    if not names:
        raise ValueError(f"no output in common: {sorted(outputs)} vs reference {sorted(reference)}")
    diff = 0.0
    for n in names:
        a = np.asarray(outputs[n], dtype=np.float64)
        b = np.asarray(reference[n], dtype=np.float64)
        if a.shape != b.shape:
            raise ValueError(f"output {n!r}: shape {list(a.shape)} vs the reference's {list(b.shape)}")
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
            diff = math.inf
        elif a.size:
            diff = max(diff, float(np.max(np.abs(a - b))))
    first_a = np.asarray(outputs[names[0]], dtype=np.float64)
    rows = first_a.shape[0] if first_a.ndim else 1
    a2 = first_a.reshape(rows, -1)
    b2 = np.asarray(reference[names[0]], dtype=np.float64).reshape(rows, -1)
    cos_mean, cos_min = cosine_stats(a2, b2)
    stats: dict[str, Any] = {"max_abs_diff": diff, "cos_mean": cos_mean, "cos_min": cos_min, "rows_compared": rows}
    if classifier and a2.shape[1] > 1:
        stats["top1_agree"] = top1_agreement(a2, b2)
    return stats


def _measure_one(runner: Runner, b1: Feeds, bn: Feeds, rows: int, cfg: Config) -> dict[str, Any]:
    warm(runner, b1)
    one = summarize(
        time_calls(
            lambda: runner.encode(b1), warmup=cfg.pick(2, 10), runs=cfg.pick(10, 200), budget_s=cfg.pick(1.0, 4.0)
        )
    )
    warm(runner, bn)
    many = summarize(
        time_calls(lambda: runner.encode(bn), warmup=cfg.pick(1, 3), runs=cfg.pick(5, 50), budget_s=cfg.pick(1.0, 4.0))
    )
    return {
        **runner.identity(),
        "b1_p50_ms": one.p50 * 1000,
        "b1_p99_ms": one.p99 * 1000,
        "b1_runs": one.n,
        "rows_per_s": rows / many.median,
        "batch": rows,
        "batch_runs": many.n,
    }


def _flops(package: Package, b1: Feeds, rows: int) -> dict[str, Any]:
    """FLOPs per row, counted on the plain fp32 ONNX variant with ``b1`` (``rows`` rows)."""
    from bench.roofline import count_matmul_flops

    plain = plain_fp32_onnx(package)
    if plain is None:
        return skipped("no fp32 ONNX variant to count FLOPs on")
    count = count_matmul_flops(package.variant_path(plain.id), b1)
    if count.total <= 0:
        return skipped(f"no matrix product or convolution in {plain.id}: nothing to compare with the peak")
    by_op = {op: flops / rows for op, flops in count.by_op.items()}
    return {
        "variant": plain.id,
        "flops_per_item": count.per_item(rows),
        "products": count.products,
        "by_op_per_item": by_op,
    }


def run(cfg: Config, *, package: Package, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure every admissible candidate of a tensor package; print the table (through
    ``echo``); write ``inprocess.json`` (+ PNG) under ``cfg.out``."""
    from bench.roofline import gemm_rates, machine_peaks
    from export.sources import tile_rows
    from runtime.autotune import load_samples
    from runtime.manifest import fixed_batch

    result: dict[str, Any] = {
        "part": "inprocess",
        "kind": "tensor",
        "quick": cfg.quick,
        "package": {"name": package.name, "version": package.version, "sha256": package.sha256},
        "task": package.manifest.task,
    }
    peaks = machine_peaks(measure=0.1 if cfg.quick else 0.4)
    result["machine"] = peaks.to_dict()
    result["baselines"] = skipped(
        f"no PyTorch baseline for a {package.manifest.task} model (its source may be an ONNX file)"
    )
    samples = load_samples(package)
    if not samples:
        result["skipped"] = (
            f"{package.name} has no sample inputs (samples/samples.npz): re-export it (`inferbox export`; "
            "every export writes them)"
        )
        echo(f"  skipped: {result['skipped']}")
        return result
    wanted = [s.name for s in package.manifest.inputs]
    missing = [n for n in wanted if n not in samples]
    if missing:
        result["skipped"] = f"the package's samples lack the inputs {missing}; re-export it"
        echo(f"  skipped: {result['skipped']}")
        return result
    samples = {n: samples[n] for n in wanted}
    fixed = fixed_batch(package.manifest.inputs)
    rows = fixed or BATCH
    if min(int(a.shape[0]) if a.ndim else 0 for a in samples.values()) < 1:
        result["skipped"] = f"the package's samples have no rows ({ {n: list(a.shape) for n, a in samples.items()} })"
        echo(f"  skipped: {result['skipped']}")
        return result
    b1 = tile_rows(samples, fixed or 1)
    bn = tile_rows(samples, rows)
    # every sample row once (a model with a fixed batch axis: one call of its rows)
    accuracy_feeds = tile_rows(samples, fixed) if fixed else samples
    sample_rows = min(int(a.shape[0]) for a in accuracy_feeds.values())
    result["inputs"] = {n: {"shape": list(a.shape), "dtype": str(a.dtype)} for n, a in samples.items()}
    result["batch"] = rows
    try:
        flops = _flops(package, b1, fixed or 1)
    except Exception as exc:
        flops = skipped(f"FLOP count failed: {type(exc).__name__}: {exc}")
    result["flops"] = flops
    classifier = package.manifest.task == "image-classification" or bool(package.manifest.labels)

    rows_out: list[dict[str, Any]] = []
    decision, chosen = choice(package)
    result["choice"] = str(chosen) if chosen else None
    result["rejected"] = [{"candidate": str(v.candidate), "reason": v.reason} for v in decision.rejected]
    candidates = [v.candidate for v in decision.admissible]
    reference_candidate = plainest_fp32_first(candidates, package)
    aliases = auto_aliases(candidates)
    reference: dict[str, Any] | None = None
    for c in candidates:
        if c in aliases:
            rows_out.append({"runner": str(c), **skipped(aliases[c])})
            continue
        try:
            runner = open_candidate(package, c.backend, c.variant, c.exec_precision, tensors=True)
        except Exception as exc:
            logger.warning("%s: cannot open: %s", c, exc)
            rows_out.append({"runner": str(c), **skipped(f"{type(exc).__name__}: {exc}")})
            continue
        try:
            row = _measure_one(runner, b1, bn, rows, cfg)
            outputs: dict[str, Any] = runner.encode(accuracy_feeds)
            if c == reference_candidate:
                reference = outputs
            if reference is not None:
                row.update(accuracy_stats(outputs, reference, classifier=classifier))
            rows_out.append(row)
            echo(
                f"  {row['runner']}: {row['rows_per_s']:.1f} rows/s in calls of {rows}, b1 p50 {row['b1_p50_ms']:.3f} ms"
            )
        except Exception as exc:
            logger.warning("%s: failed: %s", c, exc)
            rows_out.append({"runner": str(c), **skipped(f"{type(exc).__name__}: {exc}")})
        finally:
            runner.close()
            del runner
            gc.collect()
    result["reference"] = str(reference_candidate) if reference is not None else None
    # measured again after the rows: the clock they ran at may have been higher than at the start
    peaks = peaks.with_rates(gemm_rates(seconds=0.1 if cfg.quick else 0.4))
    result["machine"] = peaks.to_dict()
    flops_item = flops.get("flops_per_item") if "skipped" not in flops else None
    for r in rows_out:
        if "skipped" in r:
            continue
        add_peak(r, r["rows_per_s"], flops_item, peaks)
    result["rows"] = rows_out
    good = [r for r in rows_out if "skipped" not in r]
    columns = [c for c in COLUMNS if c == "runner" or any(r.get(c) is not None for r in good)]
    result["table"] = format_table(columns, good)
    echo(result["table"])
    if reference is not None:
        echo(
            f"accuracy against {result['reference']} on the package's {sample_rows} sample row{'s' * (sample_rows != 1)}"
        )
    else:
        echo("  no accuracy columns: no fp32 candidate was measured here to compare with")
    if "skipped" in flops:
        echo(f"  no peak_frac: {flops['skipped']}")
    for r in rows_out:
        if "skipped" in r:
            echo(f"  skipped {r['runner']}: {r['skipped']}")
    cfg.out.mkdir(parents=True, exist_ok=True)
    result["chart"] = write_chart(
        cfg.out / "inprocess.png",
        f"In-process throughput of {package.name} (rows/s in calls of {rows}, higher is better)",
        [r["runner"] for r in good],
        {f"batch {rows}": [r["rows_per_s"] for r in good]},
        ylabel="rows / s",
    ) or str(cfg.out / "inprocess.png")
    write_json(cfg.out / "inprocess.json", result)
    return result

"""The export report: every variant and every attempt with its accuracy, verdict and speed."""

from __future__ import annotations

from typing import Any

import msgspec

from runtime.manifest import Accuracy, Manifest

__all__ = ["format_report", "report_dict"]

_KEY_METRICS = (
    "cosine_mean",
    "cosine_min",
    "topk_agreement",
    "top1_agreement",
    "max_prob_diff",
    "label_accuracy",
    "max_abs_diff",
    "max_rel_diff",
    "batch_rel_diff",
)


def report_dict(manifest: Manifest) -> dict[str, Any]:
    """Plain JSON-able report (what ``inferbox export --json`` prints)."""
    return {
        "name": manifest.name,
        "version": manifest.version,
        "task": manifest.task,
        "provenance": msgspec.to_builtins(manifest.provenance),
        "variants": msgspec.to_builtins(manifest.variants),
        "attempts": msgspec.to_builtins(manifest.attempts),
        "notes": dict(manifest.notes),
    }


def _metrics(a: Accuracy) -> str:
    parts = [f"{k}={a.metrics[k]:.4g}" for k in _KEY_METRICS if k in a.metrics]
    # a model with several served outputs: each output's own numbers (max_rel_diff[NAME])
    parts += [f"{k}={v:.4g}" for k, v in a.metrics.items() if k.startswith("max_rel_diff[")]
    return " ".join(parts)


def format_report(manifest: Manifest) -> str:
    lines = [f"{manifest.name} version {manifest.version} ({manifest.task})"]
    notes = manifest.notes
    for kind in ("validation", "calibration"):
        if f"{kind}_source" in notes:  # what decided which variants passed: the customer's data or not
            count = notes.get(f"{kind}_samples", "?")
            lines.append(f"  {kind}: {count} samples, {notes[f'{kind}_source']}")
    lines += ["", "attempts:"]
    for at in manifest.attempts:
        verdict = "KEPT" if at.kept else "dropped"
        lines.append(f"  {at.variant:<10} {at.recipe:<36} {verdict:<8} {at.reason}")
        for a in at.accuracy:
            ok = "pass" if a.passed else "FAIL"
            lines.append(f"      {a.runtime}/{a.exec_precision:<5} {ok}  {_metrics(a)}")
    lines += ["", "variants (timings on this box):"]
    header = f"  {'variant':<10} {'backend':<8} {'prec':<5} {'scenario':<12} {'p50 ms':>9} {'p99 ms':>9} {'items/s':>9}"
    lines.append(header)
    for v in manifest.variants:
        if not v.timings:
            lines.append(f"  {v.id:<10} (no passing precision timed)")
        for t in v.timings:
            lines.append(
                f"  {v.id:<10} {t.backend:<8} {t.exec_precision:<5} {t.scenario:<12} "
                f"{t.p50_ms:>9.2f} {t.p99_ms:>9.2f} {t.items_per_s:>9.1f}"
            )
    needs = [v for v in manifest.variants if v.requires]
    if needs:
        lines += ["", "requirements (selection refuses these variants on a box without them):"]
        lines += [f"  {v.id:<10} requires {', '.join(v.requires)}" for v in needs]
    return "\n".join(lines)

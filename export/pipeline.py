"""``export_model(spec) -> Manifest``: source -> ONNX -> optimize -> INT8 -> OpenVINO -> validate -> time -> package.

Every candidate (fp32 export, optimized graph, each INT8 recipe, each OpenVINO
form) is run through the *runtime's* backends (``ort-cpu``, ``ov-cpu``) on the
validation samples and compared with the reference, so what was validated is
what will run.  Candidates become :class:`~runtime.manifest.Attempt` records;
those that pass their gate at some exec precision are kept as variants and
timed at every passing precision.  INT8 recipes are tried in order and the
first one that passes is kept; a recipe that quantized nothing (no quantized op
in the ONNX file, no FakeQuantize / int8 constant in the IR) is dropped, never
kept as "int8".  Every output the server returns is gated: the answer with the
task's metrics, each other output of a tensor model with ``max_abs_diff`` /
``max_rel_diff`` (per output as ``max_rel_diff[NAME]``, the worst as
``max_rel_diff``).  Everything is built in a staging folder and published by
:func:`runtime.package.finalize_package` (atomic rename; without ``--version``
the next free version at that moment); any failure removes the staging folder,
and an export first removes the staging folders of exports that died.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Literal

import msgspec
import numpy as np
import numpy.typing as npt

from export.chatter import quieted
from export.provenance import provenance_of
from export.sources import Feeds, Prepared, join_parts, tile_rows, weights_precision
from export.spec import (
    QUICK_RANKED_MIN_S,
    RANKED_ROUNDS,
    RANKED_SCENARIOS,
    STREAM_SCENARIO,
    TIMING_BUDGET_S,
    TIMING_MIN_S,
    TIMING_RUNS,
    TIMING_WINDOWS,
    ExportSpec,
    Progress,
    check_gate,
    check_version,
    gates_for,
    metric_kind,
)
from export.timing import Measured, time_session
from export.validate import (
    batch_rel_diff,
    classification_metrics,
    embedding_metrics,
    looks_like_probabilities,
    tensor_metrics,
)
from runtime.backends.base import OpenOptions, Session
from runtime.errors import BackendError, ExportError, GateError, InputError, SourceError
from runtime.interface import check_new_interface, newest_manifest, refusal
from runtime.manifest import Accuracy, Attempt, Manifest, Provenance, Timing, Variant, fixed_batch

__all__ = ["ONNX_BACKENDS", "OV_BACKENDS", "check_output_gates", "export_model", "run_outputs"]

logger = logging.getLogger(__name__)

ONNX_BACKENDS = ["ort-cpu", "ort-cuda", "ort-tensorrt", "ort-openvino"]
OV_BACKENDS = ["ov-cpu", "ov-gpu", "ov-npu", "ov-auto"]
SAMPLE_ROWS = 8
#: what an export that changes its name's interface may do instead of --new-interface
INTERFACE_FIX = "Export it under another --name (clients then move to it when they are ready)"


def _log_progress(step: str, message: str) -> None:
    logger.info("[%s] %s", step, message)


@dataclass
class _Candidate:
    """A file validated on (backend, precision) pairs; sessions stay open for timing."""

    accuracy: list[Accuracy]
    sessions: dict[tuple[str, str], Session]
    #: the file validated (the stream timing opens it again with a stream's share of the cores)
    path: Path | None = None

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()

    @property
    def passed(self) -> bool:
        return any(a.passed for a in self.accuracy)


@dataclass(frozen=True)
class _TimingJob:
    """A ranked scenario of one kept (variant, backend, precision), timed at the end side by side."""

    variant: str
    backend: str
    precision: str
    path: Path
    #: a stream's share of the cores (the stream scenario), or None: the export's threads
    threads: int | None
    scenario: str
    feeds: Feeds
    seq_len: int | None


class _Exporter:
    def __init__(self, spec: ExportSpec, say: Progress) -> None:
        self.spec = spec
        self.say = say
        self.attempts: list[Attempt] = []
        self.variants: list[Variant] = []
        self.prepared: Prepared | None = None
        self.probe: Feeds | None = None  # batch_probe(): a batch for the batch gate when validation's are small
        self.gate: dict[str, float] = {}
        #: the float precision the source's weights are stored in (fp16 sources stay fp16)
        self.stored: Literal["fp32", "fp16"] = "fp32"
        self._bf16: bool | None = None
        #: ranked scenarios waiting for :meth:`time_side_by_side`
        self._queued: list[_TimingJob] = []

    # ---------------------------------------------------------------- running
    def open(self, backend: str, path: Path, precision: str, *, threads: int | None = None) -> Session:
        """A session on ``path``; ``threads`` (a stream's share of the cores) opens it as a
        stream does, unpinned (:mod:`runtime.streams`)."""
        from runtime.backends.registry import get_backend

        if threads is None:
            options = OpenOptions(exec_precision=precision, intra_op_threads=self.spec.threads)
        else:
            options = OpenOptions(exec_precision=precision, intra_op_threads=threads, cpu_pinning=False)
        return get_backend(backend).open(path, options)

    def precisions(self, fmt: str) -> list[tuple[str, str, str]]:
        """(backend, runtime, exec precision) a variant of this format is validated on."""
        if fmt == "onnx":
            return [("ort-cpu", "onnxruntime", "fp32")]
        if self._bf16 is None:
            from export.openvino import bf16_supported

            self._bf16 = bf16_supported()
        out = [("ov-cpu", "openvino", "fp32")]
        if self._bf16:
            out.append(("ov-cpu", "openvino", "bf16"))
        return out

    def _recipe_failed(self, variant: str, recipe: str, description: str, exc: Exception) -> None:
        """A recipe that raised: kept out of the package, its failure in the report."""
        logger.warning("recipe %s failed: %s", recipe, exc)
        reason = f"{description}; failed: {type(exc).__name__}: {exc}"
        self.attempts.append(Attempt(variant=variant, recipe=recipe, kept=False, reason=reason))

    def _nothing_quantized(self, variant: str, recipe: str, description: str, ops: dict[str, int]) -> None:
        """A recipe whose file holds no quantized op: an fp32 copy labelled int8 (and refused on
        boxes without VNNI) is never kept; its attempt says why."""
        found = ", ".join(f"{k}={v}" for k, v in sorted(ops.items()))
        reason = f"{description}; nothing quantized: the file has no quantized op (ops: {found})"
        self.say("quantize", f"{variant} [{recipe}] nothing quantized; dropped")
        self.attempts.append(Attempt(variant=variant, recipe=recipe, kept=False, reason=reason))

    def validate(self, path: Path, fmt: str) -> _Candidate:
        p = self.prepared
        assert p is not None
        cand = _Candidate([], {}, path)
        for backend, runtime, precision in self.precisions(fmt):
            try:
                session = self.open(backend, path, precision)
                out, others = run_outputs(p, session, p.validation)
                rows, alone, alone_others = run_alone(p, session)
                probed = self.probed(p, session, path, backend, precision)
            except BackendError as exc:
                logger.warning("%s on %s/%s: %s", path.name, backend, precision, exc)
                self.say("validate", f"{path.name} cannot run on {backend}/{precision}: {exc}")
                continue
            metrics = _metrics(p, out, others)
            total = sum(_rows(b) for b in p.validation)
            batch = max([0.0, *_batch_diffs(out, others, rows, alone, alone_others, total), *probed])
            metrics["batch_rel_diff"] = round(batch, 6)
            passed, _ = check_gate(metrics, self.gate)
            cand.accuracy.append(
                Accuracy(
                    runtime=runtime,  # type: ignore[arg-type]
                    exec_precision=precision,  # type: ignore[arg-type]
                    samples=len(out),
                    metrics=metrics,
                    gate=dict(self.gate),
                    passed=passed,
                    reference=p.reference_name,
                )
            )
            if passed:
                cand.sessions[(backend, precision)] = session
            else:
                session.close()
        return cand

    def probed(self, p: Prepared, session: Session, path: Path, backend: str, precision: str) -> list[float]:
        """``batch_rel_diff`` of the probe batch on ``session`` (none without a probe).  A probe the
        session refuses (rows a model cannot take: its own validation still ran) is not measured:
        said once, never an export or a candidate failed by the probe itself."""
        if self.probe is None:
            return []
        try:
            return _probe_pairs(p, session, self.probe)
        except (BackendError, InputError) as exc:
            self.say("validate", f"{path.name} on {backend}/{precision}: the batch gate's probe was refused ({exc})")
            p.notes["batch_probe"] += f"; refused by {path.name} on {backend}/{precision}: not measured there"
            return []

    def time(self, cand: _Candidate, variant_id: str) -> list[Timing]:
        """The scenarios nothing ranks by, now, on the candidate's sessions (with full timing
        only); the ranked ones (:data:`~export.spec.RANKED_SCENARIOS`) are queued for
        :meth:`time_side_by_side`."""
        p = self.prepared
        assert p is not None
        warmup, runs = TIMING_RUNS[self.spec.timing]
        full = self.spec.timing == "full"
        min_s, windows = (TIMING_MIN_S, TIMING_WINDOWS) if full else (0.0, 1)
        timings: list[Timing] = []
        for (backend, precision), session in cand.sessions.items():
            for scenario, (feeds, seq_len) in p.timing.items():
                if scenario == STREAM_SCENARIO:
                    streams, threads = self.stream_plan(backend)
                    if streams > 1 and cand.path is not None:  # else b32 ranks it: one session here
                        self._queued.append(
                            _TimingJob(variant_id, backend, precision, cand.path, threads, scenario, feeds, seq_len)
                        )
                    continue
                if scenario not in RANKED_SCENARIOS and not full:
                    # quick timing (a first `serve`'s build, tests) times what the ranking reads
                    # only: b32-max's calls took ~7 s a candidate of a 200 s build on 2 AVX2 cores
                    continue
                if scenario in RANKED_SCENARIOS and cand.path is not None:
                    self._queued.append(
                        _TimingJob(variant_id, backend, precision, cand.path, None, scenario, feeds, seq_len)
                    )
                    continue
                m = time_session(
                    session, feeds, warmup=warmup, runs=runs, budget_s=TIMING_BUDGET_S, min_s=min_s, windows=windows
                )
                timings.append(_timing(backend, precision, scenario, seq_len, self.spec.threads, m))
        return timings

    def time_side_by_side(self, clock: Callable[[], float] = perf_counter) -> None:
        """The ranked scenarios of every kept candidate, timed side by side: RANKED_ROUNDS rounds,
        in each every scenario in turn and each one on every candidate in turn (one session per
        candidate and thread count, open for all rounds), and a candidate's best round counts.
        Timed each right after its variant was built, minutes apart, two candidates read this
        box's drift (its speed moves by 20 % between minutes; serve and the batch worker rank by
        these figures)."""
        jobs, self._queued = self._queued, []
        if not jobs:
            return
        warmup, runs = TIMING_RUNS[self.spec.timing]
        full = self.spec.timing == "full"
        # quick timing (a first `serve` builds with it) still ranks serve's choice: rounds too,
        # short ones
        rounds = RANKED_ROUNDS
        min_s = (TIMING_MIN_S if full else QUICK_RANKED_MIN_S) / rounds
        budget_s = TIMING_BUDGET_S / rounds
        # the calls of one timing spread over the rounds; a quick build's sessions are warm after
        # round 0 (a warm-up call a round made a first `serve` on 2 AVX2 cores ~25 s slower: its
        # batch-32 calls take 0.8 s)
        runs = max(1, runs // rounds)
        later_warmup = 1 if full else 0
        keys = [(job.variant, job.backend, job.precision, job.path, job.threads) for job in jobs]
        self.say("time", f"ranked scenarios: {len(set(keys))} session(s) side by side, {rounds} round(s)")
        sessions: dict[tuple[str, str, str, Path, int | None], Session] = {}
        best: dict[int, Measured] = {}
        try:
            for key in dict.fromkeys(keys):
                variant, backend, precision, path, threads = key
                try:
                    sessions[key] = self.open(backend, path, precision, threads=threads)
                except BackendError as exc:
                    logger.warning("%s on %s/%s: not timed: %s", variant, backend, precision, exc)
            # scenario by scenario within a round, so one scenario's candidates are timed close together
            scenarios = list(dict.fromkeys(job.scenario for job in jobs))
            for r in range(rounds):
                for scenario in scenarios:
                    for i, job in enumerate(jobs):
                        session = sessions.get(keys[i])
                        if job.scenario != scenario or session is None:
                            continue
                        m = time_session(
                            session,
                            job.feeds,
                            warmup=warmup if r == 0 else later_warmup,
                            runs=runs,
                            budget_s=budget_s,
                            min_s=min_s,
                            clock=clock,
                        )
                        if i not in best or m.items_per_s > best[i].items_per_s:
                            best[i] = m
        finally:
            for session in sessions.values():
                session.close()
        extra: dict[str, list[Timing]] = {}
        for i, m in best.items():
            job = jobs[i]
            threads = job.threads if job.threads is not None else self.spec.threads
            extra.setdefault(job.variant, []).append(
                _timing(job.backend, job.precision, job.scenario, job.seq_len, threads, m)
            )
        listed = list(self.prepared.timing) if self.prepared is not None else []
        rank = {s: n for n, s in enumerate(listed)}

        def in_order(timings: list[Timing]) -> list[Timing]:
            """Each (backend, precision)'s scenarios in the order the source lists them."""
            pairs = list(dict.fromkeys((t.backend, t.exec_precision) for t in timings))
            return sorted(
                timings,
                key=lambda t: (pairs.index((t.backend, t.exec_precision)), rank.get(t.scenario, len(rank))),
            )

        self.variants = [
            msgspec.structs.replace(v, timings=in_order([*v.timings, *extra[v.id]])) if v.id in extra else v
            for v in self.variants
        ]

    def stream_plan(self, backend: str) -> tuple[int, int]:
        """(streams, threads per stream) a server on this box runs ``backend`` with (auto); the
        cores are the export's threads (the box's physical cores unless set)."""
        from runtime.streams import plan_streams

        device = "cpu" if backend.endswith("-cpu") else backend
        return plan_streams(0, device, max(1, self.spec.threads))

    def complete_references(self, p: Prepared) -> None:
        """A reference for every output the server returns: a tensor model's KServe answer holds
        all its outputs (a text model's only its answer).  Outputs the source has no reference for
        are compared with the fp32 ONNX file's answers on ort-cpu."""
        if p.text is not None:
            p.output_references = {}
            return
        missing = [o.name for o in p.outputs if o.name != p.output and o.name not in p.output_references]
        if not missing:
            return
        session = self.open("ort-cpu", p.onnx_path, "fp32")
        try:
            runs = [session.run({k: v for k, v in b.items() if k in set(session.input_names)}) for b in p.validation]
        finally:
            session.close()
        rows = [_rows(b) for b in p.validation]
        for name in missing:
            p.output_references[name] = join_parts([np.asarray(r[name], dtype=np.float32) for r in runs], rows)
        p.notes["output_references"] = f"{', '.join(missing)}: onnx-fp32"

    # ---------------------------------------------------------------- recording
    def record(
        self,
        variant_id: str,
        recipe: str,
        cand: _Candidate,
        *,
        fmt: str,
        precision: str,
        files: list[str],
        keep: bool,
        description: str,
        requires: tuple[str, ...] = (),
    ) -> None:
        summary = (
            "; ".join(
                f"{a.runtime}/{a.exec_precision}: "
                + ("pass" if a.passed else "fail (" + ", ".join(check_gate(a.metrics, a.gate)[1]) + ")")
                for a in cand.accuracy
            )
            or "could not run"
        )
        self.say("validate", f"{variant_id} [{recipe}] {summary}")
        reason = f"{description}; {summary}"
        if not keep and cand.passed:  # passed, yet dropped: say why (the report read "dropped ... pass")
            reason += "; not kept: --variants did not ask for it (built as the base of another variant)"
        self.attempts.append(
            Attempt(variant=variant_id, recipe=recipe, kept=keep, reason=reason, accuracy=cand.accuracy)
        )
        if keep:
            self.say("time", f"{variant_id}: timing {len(cand.sessions)} backend/precision pair(s)")
            timings = self.time(cand, variant_id)
            self.variants.append(
                Variant(
                    id=variant_id,
                    format=fmt,  # type: ignore[arg-type]
                    precision=precision,  # type: ignore[arg-type]
                    files=files,
                    backends=list(ONNX_BACKENDS if fmt == "onnx" else OV_BACKENDS),
                    recipe=recipe,
                    accuracy=cand.accuracy,
                    timings=timings,
                    requires=list(requires),
                )
            )
        cand.close()

    def check_interface(self, p: Prepared) -> None:
        """The source's interface against the newest version of its name, once the source is read and
        before the slow steps (variants, validation, timing): a change is refused unless meant."""
        spec = self.spec
        provisional = Manifest(
            name=spec.name,
            version=0,
            task=spec.task,  # type: ignore[arg-type]
            inputs=p.inputs,
            outputs=p.outputs,
            variants=[],
            files=[],
            provenance=Provenance(source_kind=p.kind, source=p.source, source_sha256=p.source_sha256, created_at=""),
            text=p.text,
            labels=p.labels,
        )
        check_new_interface(
            Path(spec.repository),
            provisional,
            allowed=spec.new_interface,
            error=ExportError,
            what="this export",
            fix=INTERFACE_FIX,
        )

    # ---------------------------------------------------------------- steps
    def run(self, staging: Path, work: Path) -> Manifest:
        spec = self.spec
        self.say("source", f"preparing {spec.task} model from {spec.source_label or _describe(spec.source)}")
        p = self.prepared = _prepare(spec, staging, self)
        self.check_interface(p)
        self.complete_references(p)
        self.probe, probe_note = batch_probe(p, calibrated=spec.calibration is not None)
        if probe_note:
            p.notes["batch_probe"] = probe_note
            self.say("source", f"batch gate: {probe_note}")
        check_output_gates(spec.gates, p)
        self.gate = gates_for(
            spec.task, spec.gates, labelled=p.validation_labels is not None, other_outputs=bool(p.output_references)
        )
        self.say(
            "source",
            f"fp32 ONNX written; {sum(len(next(iter(b.values()))) for b in p.validation)} "
            f"validation samples, reference {p.reference_name}; gate {self.gate}",
        )
        wanted = set(spec.variants)
        fp32 = p.onnx_path
        self.stored = weights_precision(fp32)
        cand = self.validate(fp32, "onnx")
        keep_fp32 = "onnx-fp32" in wanted and cand.passed
        self.record(
            "onnx-fp32",
            "export",
            cand,
            fmt="onnx",
            precision=self.stored,
            files=["onnx/model.onnx"],
            keep=keep_fp32,
            description=f"{self.stored} ONNX from the {p.kind} source",
        )
        optimized: Path | None = None
        if "onnx-opt" in wanted or "onnx-int8" in wanted:
            optimized = self.optimize(fp32, staging, keep="onnx-opt" in wanted)
        if "onnx-int8" in wanted:
            self.quantize_onnx(fp32, optimized, staging, work)
        if optimized is not None and "onnx-opt" not in wanted:
            optimized.unlink(missing_ok=True)
        if "ov-fp32" in wanted:
            self.openvino_fp32(fp32, staging)
        if "ov-int8" in wanted:
            self.openvino_int8(fp32, staging, work)
        self.time_side_by_side()
        if not keep_fp32:
            fp32.unlink()
        if not self.variants:
            raise GateError(
                "no variant passed its accuracy gate; attempts: "
                + "; ".join(f"{a.variant}[{a.recipe}]: {a.reason}" for a in self.attempts)
                + ". Check the source and samples, or relax a gate with --gate KEY=VALUE"
            )
        samples = self.write_samples(staging)
        return Manifest(
            name=spec.name,
            version=0,  # set by export_model
            task=spec.task,  # type: ignore[arg-type]
            inputs=p.inputs,
            outputs=p.outputs,
            variants=self.variants,
            files=[],
            provenance=provenance_of(p),
            text=p.text,
            labels=p.labels,
            samples=samples,
            attempts=self.attempts,
            notes={**p.notes, "gate": ", ".join(f"{k}={v:g}" for k, v in self.gate.items()), "timing": spec.timing},
        )

    def optimize(self, fp32: Path, staging: Path, keep: bool) -> Path | None:
        from export.optimize import optimize_onnx

        p = self.prepared
        assert p is not None
        dst = staging / "onnx" / "model.opt.onnx"
        self.say("optimize", "graph optimization")
        try:
            description = optimize_onnx(fp32, dst, p.bert)
        except Exception as exc:
            logger.warning("graph optimization failed: %s", exc)
            self.attempts.append(
                Attempt(
                    variant="onnx-opt",
                    recipe="optimize",
                    kept=False,
                    reason=f"optimization failed: {type(exc).__name__}: {exc}",
                )
            )
            dst.unlink(missing_ok=True)
            return None
        cand = self.validate(dst, "onnx")
        ok = cand.passed
        self.record(
            "onnx-opt",
            "optimize",
            cand,
            fmt="onnx",
            precision=self.stored,
            files=["onnx/model.opt.onnx"],
            keep=keep and ok,
            description=description,
        )
        if not ok:
            dst.unlink(missing_ok=True)
            return None
        return dst

    def quantize_onnx(self, fp32: Path, optimized: Path | None, staging: Path, work: Path) -> None:
        from export.quantize import count_ops, is_quantized, ort_recipes

        p = self.prepared
        assert p is not None
        recipes = ort_recipes(p, fp32, optimized)
        asked = self.spec.int8_recipe
        for recipe in recipes:
            if asked != "auto" and not recipe.name.startswith(asked):
                self.attempts.append(
                    Attempt(
                        variant="onnx-int8",
                        recipe=recipe.name,
                        kept=False,
                        reason=f"not tried: --int8-recipe {asked}",
                    )
                )
                continue
            candidate = work / f"int8-{recipe.name}.onnx"
            self.say("quantize", f"onnx-int8 recipe {recipe.name}")
            try:
                recipe.build(candidate)
            except Exception as exc:
                self._recipe_failed("onnx-int8", recipe.name, recipe.description, exc)
                continue
            ops = count_ops(candidate)
            quant = {k: v for k, v in sorted(ops.items()) if is_quantized(k)}
            if not quant:
                self._nothing_quantized("onnx-int8", recipe.name, recipe.description, ops)
                candidate.unlink(missing_ok=True)
                continue
            cand = self.validate(candidate, "onnx")
            keep = cand.passed
            if keep:
                dst = staging / "onnx" / "model.int8.onnx"
                shutil.move(candidate, dst)
                cand.path = dst
                for (backend, precision), session in list(cand.sessions.items()):  # reopen on the final path
                    session.close()
                    cand.sessions[(backend, precision)] = self.open(backend, dst, precision)
            self.record(
                "onnx-int8",
                recipe.name,
                cand,
                fmt="onnx",
                precision="int8",
                files=["onnx/model.int8.onnx"],
                keep=keep,
                description=f"{recipe.description}; quantized nodes {quant}",
                requires=recipe.requires,
            )
            candidate.unlink(missing_ok=True)
            if keep:
                return

    def openvino_fp32(self, fp32: Path, staging: Path) -> None:
        from export.openvino import convert, save

        self.say("openvino", f"converting to OpenVINO IR ({self.stored} weights, as the source)")
        xml = staging / "openvino" / "model.xml"
        try:
            save(convert(fp32), xml)
        except Exception as exc:
            logger.warning("OpenVINO conversion failed: %s", exc)
            self.attempts.append(
                Attempt(
                    variant="ov-fp32",
                    recipe="convert",
                    kept=False,
                    reason=f"ov.convert_model failed: {type(exc).__name__}: {exc}",
                )
            )
            return
        cand = self.validate(xml, "openvino")
        keep = cand.passed
        self.record(
            "ov-fp32",
            "convert",
            cand,
            fmt="openvino",
            precision=self.stored,
            files=["openvino/model.xml", "openvino/model.bin"],
            keep=keep,
            description="ov.convert_model + save_model(compress_to_fp16=False)",
        )
        if not keep:
            xml.unlink(missing_ok=True)
            xml.with_suffix(".bin").unlink(missing_ok=True)

    def openvino_int8(self, fp32: Path, staging: Path, work: Path) -> None:
        from export.openvino import count_ov_ops, ov_recipes, save

        p = self.prepared
        assert p is not None
        for recipe in ov_recipes(p, fp32):
            self.say("quantize", f"ov-int8 recipe {recipe.name}")
            xml = work / f"ov-{recipe.name}.xml"
            try:
                save(recipe.build(), xml)
            except Exception as exc:
                self._recipe_failed("ov-int8", recipe.name, recipe.description, exc)
                continue
            ops = count_ov_ops(xml)
            quant = {k: v for k, v in sorted(ops.items()) if k in ("FakeQuantize", "FakeConvert", "Constant:int8")}
            if not quant:
                self._nothing_quantized("ov-int8", recipe.name, recipe.description, ops)
                xml.unlink(missing_ok=True)
                xml.with_suffix(".bin").unlink(missing_ok=True)
                continue
            cand = self.validate(xml, "openvino")
            keep = cand.passed
            if keep:
                dst = staging / "openvino" / "model.int8.xml"
                for (backend, precision), session in list(cand.sessions.items()):
                    session.close()
                    del cand.sessions[(backend, precision)]
                shutil.move(xml, dst)
                shutil.move(xml.with_suffix(".bin"), dst.with_suffix(".bin"))
                cand.path = dst
                for a in cand.accuracy:
                    if a.passed:
                        cand.sessions[("ov-cpu", a.exec_precision)] = self.open("ov-cpu", dst, a.exec_precision)
            self.record(
                "ov-int8",
                recipe.name,
                cand,
                fmt="openvino",
                precision="int8",
                files=["openvino/model.int8.xml", "openvino/model.int8.bin"],
                keep=keep,
                description=f"{recipe.description}; int8 ops {quant}",
                requires=recipe.requires,
            )
            if keep:
                return

    def write_samples(self, staging: Path) -> str:
        p = self.prepared
        assert p is not None
        first = p.validation[0]
        names = [i.name for i in p.inputs]
        # a model with a fixed batch axis takes exactly that many rows per call: so do its samples
        count = fixed_batch(p.inputs) or SAMPLE_ROWS
        rows = {k: np.ascontiguousarray(first[k][:count]) for k in names}
        (staging / "samples").mkdir(exist_ok=True)
        np.savez(staging / "samples" / "samples.npz", **rows)  # type: ignore[arg-type]
        return "samples/samples.npz"


def _timing(backend: str, precision: str, scenario: str, seq_len: int | None, threads: int, m: Measured) -> Timing:
    return Timing(
        backend=backend,
        exec_precision=precision,  # type: ignore[arg-type]
        scenario=scenario,
        batch=m.batch,
        seq_len=seq_len,
        p50_ms=round(m.p50_ms, 3),
        p99_ms=round(m.p99_ms, 3),
        items_per_s=round(m.items_per_s, 2),
        threads=threads,
    )


def row_aligned(answer: npt.NDArray[np.float32], rows: int) -> bool:
    """An output whose first axis holds one entry per input row (what a server may batch and split)."""
    return answer.ndim >= 1 and answer.shape[0] == rows


def _mask_name(p: Prepared) -> str | None:
    """The graph input a text model's attention mask feeds (``attention_mask`` unless its
    input map names another), or None for a model without text."""
    if p.text is None:
        return None
    return next((g for g, kind in p.text.input_map.items() if kind == "attention_mask"), "attention_mask")


def _rows(batch: Feeds) -> int:
    return len(next(iter(batch.values())))


def run_outputs(
    p: Prepared, session: Session, batches: list[Feeds]
) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
    """Run ``batches`` through ``session``: the task's answers (concatenated) and every other
    output the server returns, by name (``p.output_references``' outputs; none for text)."""
    from runtime.text import postprocess

    wanted = set(session.input_names)
    mask_name = _mask_name(p) if p.task == "feature-extraction" else None
    out = []
    others: dict[str, list[npt.NDArray[np.float32]]] = {k: [] for k in p.output_references}
    for b in batches:
        res = session.run({k: v for k, v in b.items() if k in wanted})
        if p.text is not None and mask_name is not None:
            out.append(postprocess(res, b[mask_name], p.text))
        else:
            out.append(np.asarray(res[p.output], dtype=np.float32))
        for k, acc in others.items():
            acc.append(np.asarray(res[k], dtype=np.float32))
    rows = [_rows(b) for b in batches]
    return join_parts(out, rows), {k: join_parts(v, rows) for k, v in others.items()}


#: rows per validation batch that are also answered alone
ALONE_ROWS = 4
#: at most this many rows answered alone (of a model with a fixed batch axis, whose lone row is a
#: whole call: those of the first two batches only)
ALONE_MAX = 64


#: a validation set whose largest batch holds fewer rows than this gets a probe batch for the batch
#: gate (:func:`batch_probe`): one row batched with nothing can never show what batching changes
PROBE_MIN_ROWS = 8
#: rows of the probe batch
PROBE_ROWS = 32


def batch_probe(p: Prepared, *, calibrated: bool = True) -> tuple[Feeds | None, str]:
    """A batch measured by the batch gate only (never by the accuracy gate), and what it is, when
    the validation batches are too small to show how an answer changes with its batch-mates (a
    validation file of 1 row kept a per-batch dynamic INT8 with ``batch_rel_diff`` 0, a 20-row one
    dropped it at 0.0117).  Text models: the project's own validation texts (their lengths vary,
    so rows are padded; a cross-encoder's as query-document pairs); other models: the validation
    rows with the customer's calibration rows (``calibrated``; generated ones may hold values the
    model refuses), when they share one shape.  A model fixing its batch
    axis has its calls measured already (:func:`run_alone`), and a set with big enough batches needs
    no probe: ``(None, "")``.  ``(None, reason)`` when the gate cannot be measured."""
    largest = max((_rows(b) for b in p.validation), default=0)
    if largest >= PROBE_MIN_ROWS or fixed_batch(p.inputs) is not None:
        return None, ""
    said = f"the validation batches hold at most {largest} row(s)"
    if p.encode is not None:
        from export.samples import default_texts

        texts = default_texts("validation")[:PROBE_ROWS]
        return p.encode(texts), f"{said}: measured on {len(texts)} of the built-in validation texts too"
    joined = _stacked([*p.validation, *p.calibration]) if calibrated else {}
    n = min((len(v) for v in joined.values()), default=0)
    if n > largest:
        return joined, f"{said}: measured on a batch of {n} validation and calibration rows too"
    seen = "not measured" if largest < 2 else "measured on those rows only"
    return None, (
        f"{said} and no probe batch could be formed ({seen}); give at least {PROBE_MIN_ROWS} validation rows, "
        "or a calibration file of rows shaped like them"
    )


def _stacked(batches: list[Feeds]) -> Feeds:
    """The rows of ``batches`` as one batch of at most :data:`PROBE_ROWS` rows; empty when they do not
    stack (a free axis of different sizes, other inputs)."""
    try:
        return {k: np.concatenate([b[k] for b in batches])[:PROBE_ROWS] for k in batches[0]}
    except (ValueError, KeyError, IndexError):
        return {}


def _probe_pairs(p: Prepared, session: Session, probe: Feeds) -> list[float]:
    """``batch_rel_diff`` of the probe batch's rows alone against within it, for every output the
    server returns per row."""
    out, others = run_outputs(p, session, [probe])
    rows, alone, alone_others = run_alone(p, session, [probe])
    return _batch_diffs(out, others, rows, alone, alone_others, _rows(probe))


def _batch_diffs(
    out: npt.NDArray[np.float32],
    others: dict[str, npt.NDArray[np.float32]],
    rows: list[int],
    alone: npt.NDArray[np.float32],
    alone_others: dict[str, npt.NDArray[np.float32]],
    total: int,
) -> list[float]:
    """``batch_rel_diff`` of every output the server returns, the ``rows`` answered ``alone`` against
    the same rows among the ``total`` answered in batches: every output must not depend on the rows
    batched beside it (those with a row per input row: a server never batches a model with any
    other kind)."""
    pairs = [(alone, out), *((alone_others[k], others[k]) for k in alone_others)]
    return [
        batch_rel_diff(lone, joined[rows])
        for lone, joined in pairs
        if row_aligned(joined, total) and row_aligned(lone, len(rows))
    ]


def alone_rows(p: Prepared, batches: list[Feeds] | None = None) -> list[tuple[int, int]]:
    """(batch, row) of the validation rows :func:`run_alone` answers alone: :data:`ALONE_ROWS` of
    every batch, up to :data:`ALONE_MAX`; of a text batch the ones with the fewest real tokens,
    the most padded in it: short texts are where an answer's dependence on its batch showed.
    OpenVINO's INT8 with activations quantized at run time (``nncf-quantize-dynamic-down``) kept
    MiniLM's first eight rows (of the first two batches) within 0.0051 on the AVX2 box and moved
    a short request's answer by 0.024 when the server batched it with 7 or more others (these
    rows of the 230: 0.0139, all 230: 0.0163)."""
    if batches is None:
        batches = p.validation if (fixed_batch(p.inputs) or 1) == 1 else p.validation[:2]
    mask_name = _mask_name(p)
    picked: list[tuple[int, int]] = []
    for b, batch in enumerate(batches):
        n = len(next(iter(batch.values())))
        if mask_name is not None and mask_name in batch:
            real = np.asarray(batch[mask_name]).reshape(n, -1).sum(axis=1)
            rows = sorted(int(i) for i in np.argsort(real, kind="stable")[:ALONE_ROWS])
        else:
            rows = list(range(min(n, ALONE_ROWS)))
        picked += [(b, i) for i in rows]
    return picked[:ALONE_MAX]


def run_alone(
    p: Prepared, session: Session, batches: list[Feeds] | None = None
) -> tuple[list[int], npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]]]:
    """The validation rows (or those of ``batches``) :func:`alone_rows` picks, each run as a batch of one.

    Returns their indices in the concatenated answers, their answers and their other outputs.
    Text rows lose the batch's padding (a lone request is not padded), so the comparison sees
    what a server that batches strangers' requests together would change.
    """
    indices: list[int] = []
    feeds: list[Feeds] = []
    # a model that fixes its batch axis to B rows: a row "alone" is a call of that row B times
    # (a request's rows still share one call, so what one row does to another must be measured)
    fixed = fixed_batch(p.inputs) or 1
    mask_name = _mask_name(p)
    source = p.validation if batches is None else batches
    offsets = np.cumsum([0] + [_rows(b) for b in source]).tolist()
    for b, i in alone_rows(p, batches):
        row = {k: v[i : i + 1] for k, v in source[b].items()}
        if mask_name is not None and mask_name in row:
            length = max(1, int(np.asarray(row[mask_name]).sum()))
            row = {k: v[:, :length] if v.ndim == 2 else v for k, v in row.items()}
        indices.append(int(offsets[b]) + i)
        feeds.append(tile_rows(row, fixed) if fixed > 1 else row)
    answers, others = run_outputs(p, session, feeds)
    return indices, answers[::fixed], {k: v[::fixed] for k, v in others.items()}


def _metrics(
    p: Prepared, out: npt.NDArray[np.float32], others: dict[str, npt.NDArray[np.float32]] | None = None
) -> dict[str, float]:
    """The task's metrics of the answer; with other outputs (a tensor model's KServe answer holds
    them all) also ``max_abs_diff[NAME]`` / ``max_rel_diff[NAME]`` per output and the worst of
    every output compared as a tensor as ``max_abs_diff`` / ``max_rel_diff`` (the gated ones)."""
    kind = metric_kind(p.task)
    if kind == "embeddings":
        m = embedding_metrics(out, p.reference)
    elif kind == "classification":
        m = classification_metrics(
            out, p.reference, labels=p.validation_labels, probabilities=looks_like_probabilities(p.reference)
        )
    else:
        m = tensor_metrics(out, p.reference)
    if others:
        per = {k: tensor_metrics(v, p.output_references[k]) for k, v in others.items()}
        if kind == "tensor":
            per = {p.output: dict(m), **per}
        else:
            m.pop("max_rel_diff", None)  # a single-logit head's score diff: the answer's, not the worst
        for name, tm in per.items():
            for metric, value in tm.items():
                m[f"{metric}[{name}]"] = value
        for metric in ("max_abs_diff", "max_rel_diff"):
            m[metric] = max(tm[metric] for tm in per.values())
    return {k: round(v, 6) for k, v in m.items()}


def check_output_gates(gates: Mapping[str, float], p: Prepared) -> None:
    """A ``METRIC[NAME]`` gate must name an output measured on its own: known once the source is
    read, checked before any variant is built (else it failed as "not measured" at the end)."""
    measured = set(p.output_references)
    if measured and metric_kind(p.task) == "tensor":
        measured.add(p.output)
    for key in gates:
        metric, bracket, rest = key.partition("[")
        if bracket and rest[:-1] not in measured:
            shown = ", ".join(sorted(measured)) if measured else "none: its answer is the only output gated"
            raise ExportError(
                f"gate {key!r}: the model has no output {rest[:-1]!r} measured on its own (outputs: {shown}); "
                f"gate one of those, or the worst of them as --gate {metric}=VALUE"
            )


def _describe(source: Any) -> str:
    return str(source) if isinstance(source, str | Path) else type(source).__name__


def _prepare(spec: ExportSpec, staging: Path, exporter: _Exporter) -> Prepared:
    source = spec.source
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.exists():
            raise SourceError(
                f"source {path} does not exist; give a Hugging Face model folder, an .onnx file or FILE.py:FACTORY"
            )
        if path.is_file() and path.suffix.lower() == ".onnx":
            from export.sources import onnx_file

            def reference_run(onnx_path: Path, batches: list[Feeds]) -> dict[str, npt.NDArray[np.float32]]:
                session = exporter.open("ort-cpu", onnx_path, "fp32")
                try:
                    runs = [session.run(b) for b in batches]
                finally:
                    session.close()
                rows = [_rows(b) for b in batches]
                return {k: join_parts([np.asarray(r[k], dtype=np.float32) for r in runs], rows) for k in runs[0]}

            return onnx_file.prepare(spec, staging, reference_run)
        if path.is_dir():
            from export.sources import hf

            return hf.prepare(spec, staging)
        hint = (
            "; a PyTorch checkpoint or module file is given as FILE.py:FACTORY, a function that builds the module, "
            "loads the checkpoint and returns (module, example_inputs) (docs/cli.md)"
            if path.suffix.lower() in (".pt", ".pth", ".bin", ".ckpt", ".py", ".safetensors")
            else ""
        )
        raise SourceError(f"source {path} is neither a model folder nor an .onnx file{hint}")
    try:
        import torch
    except ImportError as exc:  # pragma: no cover - the export extra brings torch
        raise SourceError(f"a module source needs torch: pip install 'inferbox[export]' ({exc})") from exc
    if isinstance(source, torch.nn.Module):
        from export.sources import pytorch

        return pytorch.prepare(spec, staging)
    raise SourceError(f"source {source!r} is not a path or a torch.nn.Module")


def export_model(spec: ExportSpec, progress: Progress | None = None) -> Manifest:
    """Export ``spec.source`` into ``spec.repository`` as one new package version; returns its manifest.

    Raises :class:`~runtime.errors.SourceError` / ``CalibrationError`` for bad
    inputs and :class:`~runtime.errors.GateError` when no variant passes.  A
    failure leaves nothing in the repository.
    """
    import msgspec

    from runtime.package import (
        check_new_model_name,
        clean_stale_staging,
        discard_staging,
        finalize_package,
        next_version,
        staging_dir,
        work_dir,
    )

    say: Progress = progress or _log_progress
    check_new_model_name(spec.name)
    check_version(spec.version)
    repository = Path(spec.repository)
    newest = None if spec.new_interface else newest_manifest(repository, spec.name)
    if newest is not None and newest.task != spec.task:  # the rest of the interface is known once the source is read
        raise ExportError(
            refusal(
                spec.name,
                newest.version,
                [f"task {newest.task} -> {spec.task}"],
                what="this export",
                fix=INTERFACE_FIX,
            )
        )
    pinned = spec.version is not None
    # without --version the number is the next free one when the package is written (another
    # export of this model may land first): this one is where it would go now
    version = spec.version if spec.version is not None else next_version(repository, spec.name)
    if (repository / spec.name / str(version)).exists():
        raise ExportError(
            f"{spec.name} version {version} already exists in {repository}; pass --version "
            f"{next_version(repository, spec.name)} or remove it"
        )
    removed = clean_stale_staging(repository)
    if removed:
        say("staging", f"removed {len(removed)} stale staging folder(s) of exports that died: {', '.join(removed)}")
    staging = staging_dir(repository)
    exporter = _Exporter(spec, say)
    try:
        # the toolchain (optimum; NNCF's progress bars at log level debug) prints to stdout: keep stdout
        # for the caller's report; its log lines below WARNING and NNCF's bars stay out (export.chatter)
        work = work_dir(staging)  # beside staging: a killed export's is cleaned with it (not left in /tmp)
        try:
            with contextlib.redirect_stdout(sys.stderr), quieted():
                manifest = exporter.run(staging, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        manifest = msgspec.structs.replace(manifest, version=version)
        if spec.before_finalize is not None:
            spec.before_finalize(staging)
    except BaseException:
        discard_staging(staging)
        raise
    say("package", f"writing {spec.name} ({len(manifest.variants)} variants)")

    def same_interface(final: Manifest) -> None:  # under the model's lock: no other version lands meanwhile
        check_new_interface(
            repository, final, allowed=spec.new_interface, error=ExportError, what="this export", fix=INTERFACE_FIX
        )

    package = finalize_package(
        staging,
        manifest,
        repository,
        signing_key=spec.signing_key,
        next_free=not pinned,
        before_publish=same_interface,
    )
    say("package", f"done: {spec.name} version {package.manifest.version} at {package.path}")
    return package.manifest

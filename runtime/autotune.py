"""Autotune: time every admissible candidate on the package's samples; cache the result.

:func:`autotune` opens each admissible candidate of a ranked :class:`Decision`,
runs the package's sample inputs (``warmup`` times untimed, then ``runs`` times
timed) and keeps the one with the lowest median.  :class:`DecisionCache` keeps
decisions in a small JSON file (``<home>/cache/decisions.json``) keyed by hardware
fingerprint, package sha256 and preference; :func:`decide` glues ranking, cache and
autotune together, and reads the cache only when autotune is on.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from runtime.backends.base import CopyCheck, Probe, Session
from runtime.errors import PackageError, UnsafePathError
from runtime.manifest import Manifest
from runtime.selection import Candidate, Decision, Preference, Verdict, preference_hash, rank
from runtime.verified import VerifiedCopy

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

__all__ = [
    "CACHE_FORMAT",
    "DecisionCache",
    "OpenSession",
    "PackageLike",
    "autotune",
    "cache_key",
    "decide",
    "load_samples",
    "recall",
    "session_opener",
]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1

Samples = dict[str, "npt.NDArray[np.generic]"]
OpenSession = Callable[[Candidate], Session]


class PackageLike(Protocol):
    """What selection needs from an opened package (:class:`runtime.package.Package`)."""

    @property
    def manifest(self) -> Manifest: ...

    @property
    def sha256(self) -> str: ...

    @property
    def path(self) -> Path: ...


def load_samples(package: PackageLike) -> Samples | None:
    """The package's sample inputs (``manifest.samples``, an ``.npz``), or None when it has none."""
    rel = package.manifest.samples
    if not rel:
        return None
    if isinstance(package, VerifiedCopy):
        package.file(rel)  # copied (and checked) before it is read
    root = Path(package.path).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        raise UnsafePathError(f"samples path {rel!r} leaves the package {root}; re-export the package", path=rel)
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: np.asarray(data[name]) for name in data.files}
    except FileNotFoundError as exc:
        raise PackageError(f"samples file {rel} is missing from {root}; re-export the package", path=rel) from exc
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise PackageError(
            f"samples file {rel} in {root} is not a readable .npz ({exc}); re-export the package", path=rel
        ) from exc


def session_opener(
    package: PackageLike,
    *,
    threads: int = 0,
    allow_fallback: bool = False,
    cache_dir: Path | None = None,
    cpu_pinning: bool | None = None,
    static_shapes: int = 0,
    copy_check: CopyCheck | None = None,
) -> OpenSession:
    """``open_session`` for :func:`autotune` / :func:`decide`: the registry's backend opens the variant's file
    (``static_shapes``: :attr:`runtime.backends.base.OpenOptions.static_shapes`)."""
    from runtime.backends.base import OpenOptions
    from runtime.backends.registry import get_backend

    def open_session(candidate: Candidate) -> Session:
        variant = package.manifest.variant(candidate.variant)
        options = OpenOptions(
            intra_op_threads=threads,
            exec_precision=candidate.exec_precision,
            allow_fallback=allow_fallback,
            cache_dir=cache_dir,
            cpu_pinning=cpu_pinning,
            static_shapes=static_shapes,
            copy_check=copy_check,
        )
        if isinstance(package, VerifiedCopy):  # the private copy, made from the bytes it checked
            return get_backend(candidate.backend).open(package.variant_file(candidate.variant), options)
        entry = package.manifest.file(variant.files[0])  # ManifestError when the file is not listed
        return get_backend(candidate.backend).open(Path(package.path) / entry.path, options)

    return open_session


def _batch_size(samples: Samples) -> int:
    for array in samples.values():
        if array.ndim > 0:
            return max(1, int(array.shape[0]))
    return 1


def _time_one(session: Session, samples: Samples, warmup: int, runs: int, clock: Callable[[], float]) -> float:
    wanted = set(session.input_names)
    feed = {k: v for k, v in samples.items() if not wanted or k in wanted}
    for _ in range(warmup):
        session.run(feed)
    times: list[float] = []
    for _ in range(runs):
        start = clock()
        session.run(feed)
        times.append(clock() - start)
    return statistics.median(times)


def autotune(
    package: PackageLike,
    decision: Decision,
    open_session: OpenSession,
    samples: Samples,
    *,
    warmup: int = 2,
    runs: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> Decision:
    """Time every admissible candidate of ``decision``; the fastest median wins.

    Candidates that fail to open or run are rejected with the error.  Verdicts
    of the result: timed candidates fastest first, then every rejection.
    """
    if runs < 1:
        raise ValueError("runs must be at least 1")
    name = f"{package.manifest.name}/{package.manifest.version}"
    batch = _batch_size(samples)
    timed: list[tuple[float, int, Verdict]] = []
    failed: list[Verdict] = []
    for order, verdict in enumerate(decision.admissible):
        cand = verdict.candidate
        try:
            session = open_session(cand)
        except Exception as exc:
            log.warning("autotune %s: %s does not open: %s", name, cand, exc)
            failed.append(Verdict(cand, False, f"autotune: could not open: {exc}", 0.0))
            continue
        try:
            median = _time_one(session, samples, warmup, runs, clock)
        except Exception as exc:
            log.warning("autotune %s: %s fails on the samples: %s", name, cand, exc)
            failed.append(Verdict(cand, False, f"autotune: failed on the package samples: {exc}", 0.0))
            continue
        finally:
            session.close()
        per_s = batch / median if median > 0 else float("inf")
        why = f"autotuned: median {median * 1000:.3f} ms over {runs} runs of batch {batch} ({per_s:.4g} items/s)"
        timed.append((median, order, Verdict(cand, True, why, per_s)))
        log.info("autotune %s: %s median %.3f ms", name, cand, median * 1000)
    timed.sort(key=lambda t: (t[0], t[1]))
    verdicts = tuple(v for _, _, v in timed)
    choice = verdicts[0].candidate if verdicts else None
    return Decision(choice=choice, verdicts=(*verdicts, *failed, *decision.rejected), source="autotune")


def cache_key(fingerprint: str, package_sha256: str, preference: Preference) -> str:
    return f"{fingerprint}:{package_sha256}:{preference_hash(preference)}"


def _encode(decision: Decision) -> dict[str, Any]:
    def cand(c: Candidate) -> dict[str, str]:
        return {"backend": c.backend, "variant": c.variant, "exec_precision": c.exec_precision}

    return {
        "choice": cand(decision.choice) if decision.choice else None,
        "source": decision.source,
        "verdicts": [
            {"candidate": cand(v.candidate), "admissible": v.admissible, "reason": v.reason, "score": v.score}
            for v in decision.verdicts
        ],
    }


def _decode(raw: dict[str, Any]) -> Decision:
    def cand(c: dict[str, Any]) -> Candidate:
        return Candidate(str(c["backend"]), str(c["variant"]), str(c["exec_precision"]))

    verdicts = tuple(
        Verdict(cand(v["candidate"]), bool(v["admissible"]), str(v["reason"]), float(v["score"]))
        for v in raw["verdicts"]
    )
    choice = cand(raw["choice"]) if raw.get("choice") else None
    return Decision(choice=choice, verdicts=verdicts, source=str(raw.get("source", "rank")))


class DecisionCache:
    """Decisions in one small JSON file, written atomically (temp file + rename).

    A missing or unreadable file reads as empty (a cache never stops serving).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("decision cache %s is unreadable (%s); ignoring it", self.path, exc)
            return {}
        if (
            not isinstance(data, dict)
            or data.get("format") != CACHE_FORMAT
            or not isinstance(data.get("entries"), dict)
        ):
            log.warning("decision cache %s has an unknown format; ignoring it", self.path)
            return {}
        entries: dict[str, Any] = data["entries"]
        return entries

    def _write(self, entries: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"format": CACHE_FORMAT, "entries": entries}, indent=2, sort_keys=True) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(body)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def keys(self) -> list[str]:
        return sorted(self._read())

    def get(self, key: str) -> Decision | None:
        raw = self._read().get(key)
        if raw is None:
            return None
        try:
            decision = _decode(raw)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("decision cache %s: entry %s is malformed (%s); ignoring it", self.path, key, exc)
            return None
        return Decision(choice=decision.choice, verdicts=decision.verdicts, source="cache")

    def put(self, key: str, decision: Decision) -> None:
        entries = self._read()
        entries[key] = _encode(decision)
        self._write(entries)

    def clear(self, key: str | None = None) -> int:
        """Forget one entry (``key``) or all of them; returns how many were removed."""
        entries = self._read()
        if key is None:
            removed = len(entries)
            entries = {}
        else:
            removed = 1 if entries.pop(key, None) is not None else 0
        if removed or self.path.exists():
            self._write(entries)
        return removed


def recall(
    package: PackageLike,
    probes: Sequence[Probe],
    preference: Preference,
    *,
    fingerprint: str,
    cache: DecisionCache,
) -> Decision:
    """What a load with autotune on would use, timing nothing (``inferbox doctor``): the cached
    decision while its choice is still admissible in the fresh ranking, else the ranking."""
    ranked = rank(probes, package.manifest, preference)
    if ranked.choice is None:
        return ranked
    return _cached(cache, cache_key(fingerprint, package.sha256, preference), ranked) or ranked


def _cached(cache: DecisionCache, key: str, ranked: Decision) -> Decision | None:
    """The cached decision under ``key`` while its choice is still admissible in ``ranked`` (a backend
    may have disappeared); None otherwise."""
    hit = cache.get(key)
    if hit is None or hit.choice is None:
        return None
    still = ranked.verdict(hit.choice)
    if still is not None and still.admissible:
        return hit
    log.info("cached choice %s for %s is no longer admissible; re-deciding", hit.choice, key)
    return None


def decide(
    package: PackageLike,
    probes: Sequence[Probe],
    preference: Preference,
    *,
    fingerprint: str,
    cache: DecisionCache | None = None,
    autotune: bool = False,
    force: bool = False,
    open_session: OpenSession | None = None,
    samples: Samples | None = None,
    warmup: int = 2,
    runs: int = 7,
    clock: Callable[[], float] = time.perf_counter,
) -> Decision:
    """Rank; with ``autotune``, use a cached decision (unless ``force``) or autotune and cache the result.

    Without ``autotune`` the ranking is returned and the cache is neither read nor written: an
    operator who turned autotune off gets the ranking, not what an earlier ``serve --autotune``
    timed (the cache is ``<home>/cache/decisions.json``; ``serve --autotune --retune`` re-times).
    A cached choice is used only while it is still admissible in the fresh ranking (a backend may
    have disappeared).  Without samples / ``open_session`` the ranking is returned and nothing is
    cached.
    """
    ranked = rank(probes, package.manifest, preference)
    if ranked.choice is None or not autotune:
        return ranked
    key = cache_key(fingerprint, package.sha256, preference)
    if cache is not None and not force:
        hit = _cached(cache, key, ranked)
        if hit is not None:
            return hit
    if samples is None:
        samples = load_samples(package)
    if samples is None or open_session is None:
        log.warning(
            "autotune of %s/%s skipped: %s; using the ranking",
            package.manifest.name,
            package.manifest.version,
            "the package has no samples" if samples is None else "no way to open sessions",
        )
        return ranked
    tuned = _autotune(package, ranked, open_session, samples, warmup=warmup, runs=runs, clock=clock)
    if cache is not None and tuned.choice is not None:
        cache.put(key, tuned)
    return tuned


_autotune = autotune

"""From a repository entry to a model ready to serve: package -> selection -> session.

``load_model`` verifies the package (hashes, paths, signature), ranks every
(backend, variant, precision) candidate on this box (or autotunes them, with the
decision cached per hardware fingerprint + package sha256), opens the chosen
session — which proves what really runs — and wraps it as a
:class:`~runtime.serving.LoadedModel`.

With ``backend = auto`` a choice whose session cannot be proved (onnxruntime-gpu lists
TensorRT with no TensorRT installed) is recorded as a rejected verdict and the next
admissible candidate is opened, in ranked order; the load fails only when every one
fails, listing each.  A forced backend fails at once.  The ``LoadedModel`` names what
the proved session runs on (with ``allow_fallback``, the backend and precision it fell
back to; ``session.fallback`` says from what).
"""

from __future__ import annotations

import functools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.autotune import DecisionCache, OpenSession, PackageLike, decide, load_samples, session_opener
from runtime.backends.base import Probe, Session
from runtime.errors import BackendError, SelectionError
from runtime.repository import Repository
from runtime.selection import Candidate, Decision, Preference, Verdict, rank, require_choice
from runtime.serving import IndexEntry, LoadedModel
from runtime.streams import open_pool, plan_for
from runtime.verified import VerifiedCopy

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "FAKE_BACKEND_WARNING",
    "LoaderOptions",
    "Opened",
    "load_model",
    "open_first",
    "preference_for",
    "repository_index",
]

log = logging.getLogger(__name__)

#: said at every load on the ``fake`` backend (and by ``serve`` / ``doctor`` when it is set): its
#: answers are not the model's, and nothing gates them
FAKE_BACKEND_WARNING = (
    "the fake backend answers made-up outputs (no model runs, no accuracy gate) and is for tests only; "
    "set backend = auto (or a real backend) to serve the model"
)


@dataclass(frozen=True)
class LoaderOptions:
    public_key: Ed25519PublicKey | None = None
    backend: str = "auto"
    objective: str = "throughput"
    threads: int = 0
    allow_fallback: bool = False
    autotune: bool = False
    force_autotune: bool = False
    #: decision cache file (JSON); None disables caching
    decision_cache: Path | None = None
    #: OpenVINO CACHE_DIR / TensorRT engine cache
    cache_dir: Path | None = None
    #: sessions run side by side (:mod:`runtime.streams`); 0 = auto (2 on a CPU, 1 on an accelerator)
    streams: int = 1
    #: what the model will run: ``online`` (a server's small batches; with streams, ranked by the
    #: ``stream`` timings) or ``batch`` (length-sorted batches of a job: ranked by the ``b32``
    #: timings whatever ``streams`` is)
    workload: str = "online"
    #: OpenVINO static-shape copies of the all-core session (the one a lone caller gets) for
    #: input shapes that repeat (:mod:`runtime.backends.static_shapes`); 0 = none
    static_shapes: int = 0
    #: server processes sharing this box (``serve --workers``): with ``threads = 0`` each gets
    #: its share of the cores (:func:`runtime.hardware.cpu_budget`)
    workers: int = 1


def preference_for(options: LoaderOptions) -> Preference:
    """The ranking preference of a load with ``options``: a server running streams (``streams``
    not 1, ``workload`` online) ranks by the ``stream`` timings (:func:`runtime.selection.rank`);
    a batch job by the ``b32`` ones."""
    fake = options.backend == "fake"
    if options.objective == "latency":
        return Preference(backend=options.backend, objective="latency", allow_fake=fake)
    online = options.workload != "batch"
    return Preference(
        backend=options.backend, objective="throughput", allow_fake=fake, streams=online and options.streams != 1
    )


def load_model(
    repository: Path,
    name: str,
    version: int | None = None,
    *,
    options: LoaderOptions | None = None,
    probes: Sequence[Probe] | None = None,
) -> LoadedModel:
    """Open ``name`` (latest version unless given) on the best admissible backend here."""
    opts = options or LoaderOptions()
    # the signature, listing, sizes and paths of the whole package; each file's sha256 as it is
    # copied for use: every file is opened from a private copy made from the bytes that were
    # checked (runtime/verified.py), and a file never used is never read twice
    source = Repository(repository, public_key=opts.public_key).open(name, version, verify_hashes=False)
    package = VerifiedCopy.under(source, opts.cache_dir)
    try:
        loaded = _load(package, opts, probes)
    except BaseException:
        package.close()  # a temporary copy; one in the cache folder is kept for the next load
        raise
    if package.temporary:  # no cache folder: the copy lives as long as the model (stream sessions open later)
        weakref.finalize(loaded, package.close)
    return loaded


def _load(package: VerifiedCopy, opts: LoaderOptions, probes: Sequence[Probe] | None) -> LoadedModel:
    from runtime.backends.registry import probe_all
    from runtime.hardware import default_threads, probe_hardware
    from runtime.text import TextEncoder, answers_agree

    profile = probe_hardware()
    found = list(probes) if probes is not None else probe_all(profile)
    cores = default_threads(opts.workers)
    # explicit: with several workers `threads = 0` is this process's share, not every core
    opener = functools.partial(
        session_opener,
        package,
        threads=opts.threads or cores,
        allow_fallback=opts.allow_fallback,
        cache_dir=opts.cache_dir,
    )
    open_session = opener()
    preference = preference_for(opts)
    decision: Decision = decide(
        package,
        found,
        preference,
        fingerprint=profile.fingerprint(),
        cache=DecisionCache(opts.decision_cache) if opts.decision_cache is not None else None,
        autotune=opts.autotune,
        force=opts.force_autotune,
        open_session=open_session,
        samples=load_samples(package) if opts.autotune else None,
    )
    where = f"{package.manifest.name}/{package.manifest.version}"
    require_choice(decision, where)
    # only the all-core session (the one a lone caller gets) keeps static-shape copies
    # its copies must give the answers the gate held (a text model: the pooled embeddings)
    check = answers_agree(package.manifest.text) if package.manifest.text is not None else None
    open_wide = opener(static_shapes=opts.static_shapes, copy_check=check) if opts.static_shapes else open_session

    def open_candidate(cand: Candidate) -> tuple[Session, Session, int]:
        streams, stream_open = _streams(package, cand.backend, found, opts, cores, open_session)
        wide: list[Session] = []

        def first() -> Session:
            wide.append(open_wide(cand))
            return wide[0]

        session = open_pool(functools.partial(stream_open, cand), streams, first)
        return session, wide[0], streams

    fresh = rank(found, package.manifest, preference) if decision.source != "rank" else decision
    opened = open_first(decision, open_candidate, where=where, forced=opts.backend != "auto", fresh=fresh)
    choice, session = opened.candidate, opened.session
    manifest = package.manifest
    text = None
    if manifest.text is not None:
        text = TextEncoder.from_dir(package.folder(manifest.text.tokenizer_dir), manifest.text)
    log.info(
        "loaded %s on %s (%s, %s; active %s; %d stream(s); decided by %s%s%s)",
        where,
        opened.backend,
        choice.variant,
        opened.exec_precision,
        ",".join(session.active),
        opened.streams,
        decision.source,
        f"; FALLBACK from {choice}: {session.fallback}" if session.fallback else "",
        f"; {len(opened.failed)} candidate(s) before it failed their proof" if opened.failed else "",
    )
    if opened.backend == "fake":
        log.warning("%s is loaded on the fake backend: %s", where, FAKE_BACKEND_WARNING)
    loaded = LoadedModel(
        name=manifest.name,
        version=manifest.version,
        manifest=manifest,
        package_sha256=package.sha256,
        backend=opened.backend,
        variant=choice.variant,
        exec_precision=opened.exec_precision,
        session=session,
        text=text,
        streams=opened.streams,
    )
    return loaded


@dataclass(frozen=True)
class Opened:
    """What :func:`open_first` opened: the candidate, its session, and what the proof found."""

    candidate: Candidate
    session: Session
    streams: int
    #: the backend the proved session runs on (the candidate's unless it fell back)
    backend: str
    #: the precision the proved session computes in (read back by OpenVINO; fp32 for ORT)
    exec_precision: str
    #: the candidates tried before it whose session could not be proved, as rejected verdicts
    failed: tuple[Verdict, ...]
    #: ``decision`` with the opened candidate as its choice and the failed ones rejected
    decision: Decision


def open_first(
    decision: Decision,
    open_candidate: Callable[[Candidate], tuple[Session, Session, int]],
    *,
    where: str,
    forced: bool = False,
    fresh: Decision | None = None,
) -> Opened:
    """Open ``decision``'s choice; when its session cannot be proved (:class:`BackendError`, a
    :class:`FallbackError` included) and the backend is not ``forced``, the next admissible
    candidate in ranked order, and so on (those still admissible in ``fresh``, the ranking on this
    box now, when ``decision`` came from a cache).  ``open_candidate(c)`` returns (the session to
    serve, the session whose proof it carries, streams).  Each failure is logged and kept as a
    rejected verdict; :class:`SelectionError` listing every one when none opens."""
    from runtime.backends.registry import ran_on

    choice = require_choice(decision, where)
    order = [choice]
    if not forced:
        for v in decision.admissible:
            still = fresh.verdict(v.candidate) if fresh is not None else v
            if v.candidate != choice and still is not None and still.admissible:
                order.append(v.candidate)
    failed: list[Verdict] = []
    for cand in order:
        try:
            session, proved, streams = open_candidate(cand)
        except BackendError as exc:
            if forced:
                raise
            why = f"{type(exc).__name__}: {exc}"
            failed.append(Verdict(cand, False, f"could not be opened and proved here: {why}", 0.0))
            log.warning("%s: %s could not be opened and proved (%s); trying the next candidate", where, cand, why)
            continue
        rest = tuple(v for v in decision.verdicts if v.candidate not in (cand, *(f.candidate for f in failed)))
        chosen = decision.verdict(cand) or Verdict(cand, True, "opened", 0.0)
        return Opened(
            candidate=cand,
            session=session,
            streams=streams,
            backend=ran_on(cand.backend, proved.active) if proved.fallback else cand.backend,
            exec_precision=str(getattr(proved, "exec_precision", cand.exec_precision)),
            failed=tuple(failed),
            decision=Decision(
                choice=cand,
                verdicts=(chosen, *(v for v in rest if v.admissible), *failed, *(v for v in rest if not v.admissible)),
                source=decision.source,
            ),
        )
    lines = "\n  - ".join(f"{v.candidate}: {v.reason}" for v in failed)
    raise SelectionError(
        f"{where}: every admissible (backend, variant, precision) failed to open here; fix one of them, "
        f"force another backend, or allow fallback (allow_fallback = true):\n  - {lines}"
    )


def _streams(
    package: PackageLike,
    backend: str,
    probes: Sequence[Probe],
    opts: LoaderOptions,
    cores: int,
    open_session: OpenSession,
) -> tuple[int, OpenSession]:
    """How many streams to open for ``backend`` and the opener giving each its share of ``cores``."""
    if opts.streams == 1:
        return 1, open_session
    streams, threads = plan_for(backend, probes, opts.streams, cores, threads=opts.threads, objective=opts.objective)
    if streams == 1:
        return 1, open_session
    # unpinned: OpenVINO pins each single-thread session's thread to the same first core (a pair
    # of pinned streams ran at half the speed of one session)
    return streams, session_opener(
        package, threads=threads, allow_fallback=opts.allow_fallback, cache_dir=opts.cache_dir, cpu_pinning=False
    )


def repository_index(repository: Path, public_key: Ed25519PublicKey | None = None) -> list[IndexEntry]:
    """Every version on disk; never raises (a broken package is UNAVAILABLE with its reason)."""
    entries = Repository(repository, public_key=public_key).entries(verify_hashes=False)
    return [
        IndexEntry(e.name, e.version, "UNAVAILABLE", "" if e.ok else (e.error or "unreadable"), e.sha256 or "")
        for e in entries
    ]

"""From a repository entry to a model ready to serve: package -> selection -> session.

``load_model`` verifies the package (hashes, paths, signature), ranks every
(backend, variant, precision) candidate on this box (or autotunes them, with the
decision cached per hardware fingerprint + package sha256), opens the chosen
session — which proves what really runs — and wraps it as a
:class:`~runtime.serving.LoadedModel`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from runtime.autotune import DecisionCache, OpenSession, PackageLike, decide, load_samples, session_opener
from runtime.backends.base import Probe
from runtime.repository import Repository
from runtime.selection import Decision, Preference, require_choice
from runtime.serving import IndexEntry, LoadedModel
from runtime.streams import open_pool, plan_for

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["LoaderOptions", "load_model", "preference_for", "repository_index"]

log = logging.getLogger(__name__)


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
    from runtime.backends.registry import probe_all
    from runtime.hardware import probe_hardware
    from runtime.text import TextEncoder

    opts = options or LoaderOptions()
    package = Repository(repository, public_key=opts.public_key).open(name, version)
    profile = probe_hardware()
    found = list(probes) if probes is not None else probe_all(profile)
    opener = functools.partial(
        session_opener, package, threads=opts.threads, allow_fallback=opts.allow_fallback, cache_dir=opts.cache_dir
    )
    open_session = opener()
    decision: Decision = decide(
        package,
        found,
        preference_for(opts),
        fingerprint=profile.fingerprint(),
        cache=DecisionCache(opts.decision_cache) if opts.decision_cache is not None else None,
        autotune=opts.autotune,
        force=opts.force_autotune,
        open_session=open_session,
        samples=load_samples(package) if opts.autotune else None,
    )
    where = f"{package.manifest.name}/{package.manifest.version}"
    choice = require_choice(decision, where)
    streams, stream_open = _streams(package, choice.backend, found, opts, open_session)
    # only the all-core session (the one a lone caller gets) keeps static-shape copies
    open_wide = opener(static_shapes=opts.static_shapes) if opts.static_shapes else open_session
    session = open_pool(lambda: stream_open(choice), streams, lambda: open_wide(choice))
    manifest = package.manifest
    text = None
    if manifest.text is not None:
        text = TextEncoder.from_dir(package.path / manifest.text.tokenizer_dir, manifest.text)
    log.info(
        "loaded %s on %s (%s, %s; active %s; %d stream(s); decided by %s)",
        where,
        choice.backend,
        choice.variant,
        choice.exec_precision,
        ",".join(session.active),
        streams,
        decision.source,
    )
    return LoadedModel(
        name=manifest.name,
        version=manifest.version,
        manifest=manifest,
        package_sha256=package.sha256,
        backend=choice.backend,
        variant=choice.variant,
        exec_precision=choice.exec_precision,
        session=session,
        text=text,
        streams=streams,
    )


def _streams(
    package: PackageLike, backend: str, probes: Sequence[Probe], opts: LoaderOptions, open_session: OpenSession
) -> tuple[int, OpenSession]:
    """How many streams to open for ``backend`` and the opener giving each its share of the cores."""
    from runtime.hardware import default_threads

    if opts.streams == 1:
        return 1, open_session
    streams, threads = plan_for(
        backend, probes, opts.streams, default_threads(), threads=opts.threads, objective=opts.objective
    )
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
    return [IndexEntry(e.name, e.version, "UNAVAILABLE", "" if e.ok else (e.error or "unreadable")) for e in entries]

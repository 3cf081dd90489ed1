"""The composition root of the API process: settings -> key store, audit log, registry -> app.

``prepare(settings)`` does the once-per-box work (state directory, signing key,
default model, first admin key) and ``build_app(settings)`` wires the
collaborators into :func:`api.create_app`.  ``app_factory()`` is what each
uvicorn worker imports when ``--workers`` > 1 (settings from ``INFERBOX_*``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
from collections.abc import AsyncGenerator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.settings import METRICS_DIR_ENV, Settings, load_settings
from runtime.errors import ConfigError, InferboxError
from runtime.logs import configure as configure_logging
from runtime.times import utc_iso

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from litestar import Litestar

    from appliance.audit.log import AuditLog
    from appliance.tls_reload import CertificateReloader
    from runtime.serving import LoadedModel, ModelRegistry

__all__ = ["Prepared", "app_factory", "batch_loader", "build_app", "model_loader", "prepare", "public_key_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """What ``prepare`` did, for the CLI to tell the operator."""

    built_default: bool
    admin_key: str | None  # the secret, shown once
    admin_key_id: str | None


def public_key_of(settings: Settings) -> Ed25519PublicKey | None:
    """The key package manifests must be signed with (None: signatures not required)."""
    if settings.public_key is None:
        return None
    from runtime.signing import load_public_key

    return load_public_key(settings.public_key)


def ensure_signing_key(settings: Settings) -> None:
    """The audit checkpoints (and signed exports) need a private key; create it on a new box."""
    if settings.signing_key.exists():
        return
    from runtime.signing import generate_private_key, write_private_key, write_public_key

    key = generate_private_key()
    try:
        write_private_key(key, settings.signing_key)
    except ConfigError:
        if settings.signing_key.is_file() and not settings.signing_key.is_symlink():
            return  # another server first started on this home at the same moment made it
        raise
    # the public half, for auditors (audit verify --public-key) and for requiring signed packages
    pub = write_public_key(key, settings.signing_key)
    log.info("created signing key %s (mode 0600) and its public key %s", settings.signing_key, pub)


def _build_default_child(repository: str, name: str, threads: int, signing_key: str) -> None:
    """The default model's export, run in a spawned child of :func:`prepare` (its logs go to stderr)."""
    import sys

    from export.default import build_default
    from runtime.offline import stay_offline
    from runtime.signing import load_private_key

    stay_offline()
    configure_logging(logging.INFO)
    try:
        build_default(
            Path(repository),
            name=name,
            timing="quick",
            threads=threads,
            signing_key=load_private_key(Path(signing_key)),
        )
    except InferboxError as exc:
        log.error("building the default model failed: %s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        # Ctrl-C reaches the terminal's whole process group: the parent says "Aborted!" and the next
        # start builds again; this child printed a stack trace from wherever the export was
        sys.exit(130)


def prepare(settings: Settings, *, build_default: bool = True) -> Prepared:
    """Make the box ready: directories, signing key, the default model, the first admin key."""
    for path in (settings.home, settings.keys_dir, settings.repository):
        path.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.home, 0o700)
    os.chmod(settings.keys_dir, 0o700)
    ensure_signing_key(settings)

    built = False
    from runtime.repository import Repository

    if build_default and not Repository(settings.repository).models():
        try:
            from export.default import build_default as export_default
        except ImportError as exc:  # serving-only install
            raise ConfigError(
                f"the repository {settings.repository} is empty and the export toolchain is not installed "
                f"({exc.name}); install it with `pip install 'inferbox[export]'` and run `inferbox init`, "
                "or copy a package into the repository"
            ) from exc
        del export_default  # built in a child process (below)
        if settings.audit:
            _check_audit_log(settings)  # the build is recorded: a log that cannot be written stops it first
        log.info("repository %s is empty: building the default model %s", settings.repository, settings.default_model)
        # In a child process: the export loads torch, transformers and the converters, which the
        # server must not hold (memory; and a server that had run the export in-process sometimes
        # died of SIGSEGV at exit after a model unload). Quick timing: the first start takes ~2
        # minutes instead of ~6; the stream scenario serve ranks by is still timed side by side in
        # rounds (export.pipeline time_streams), so the choice holds. `inferbox init --force
        # --timing full` re-times a new version.
        import multiprocessing

        from runtime.hardware import default_threads

        child = multiprocessing.get_context("spawn").Process(
            target=_build_default_child,
            args=(
                str(settings.repository),
                settings.default_model,
                settings.threads or default_threads(),
                str(settings.signing_key),
            ),
            name="inferbox-build-default",
        )
        started = datetime.now(UTC)
        child.start()
        child.join()
        if child.exitcode != 0:
            raise ConfigError(
                f"building the default model {settings.default_model} into {settings.repository} failed "
                f"(exit code {child.exitcode}; its log is above); run `inferbox init` to see the whole report"
            )
        built = True
        from appliance.commands.export import record_export
        from runtime.package import list_versions, read_package

        version = list_versions(settings.repository, settings.default_model)[-1]
        default = read_package(settings.repository / settings.default_model / str(version), verify_hashes=False)
        record_export(
            settings,
            default.manifest,
            started,
            "inferbox serve (first start: the default model)",
            create_log=True,
            actor="system:first-start",
        )

    admin_key = admin_id = None
    if settings.auth:
        from appliance.keys import FirstKeyExistsError, KeyStore

        store = KeyStore(settings.state_db)
        try:
            if store.count() == 0:
                admin_id, admin_key = _create_first_admin_key(settings, store)
        except FirstKeyExistsError:
            pass  # another server started on this home at the same moment made it (and shows it)
        finally:
            store.close()
    return Prepared(built_default=built, admin_key=admin_key, admin_key_id=admin_id)


def _check_audit_log(settings: Settings) -> None:
    """Open the audit log once (made on a new box): a log that cannot be written is a refused configuration
    (exit 78: systemd does not restart into a two-minute model build that cannot be recorded)."""
    import sqlite3

    from appliance.audit.log import AuditLog

    try:
        log = AuditLog.open(settings)
        try:
            _ = log.log_id  # opens it: the schema is made or read
        finally:
            log.close()
    except (sqlite3.Error, OSError, InferboxError) as exc:
        raise ConfigError(
            f"the audit log {settings.audit_db} cannot be opened ({exc}): the default model's build would not be "
            "recorded; move the file aside and investigate it (inferbox audit verify), then start again"
        ) from exc


def _create_first_admin_key(settings: Settings, store: Any) -> tuple[str, str]:
    """The first admin key, recorded as ``key_create`` like ``inferbox keys create`` records its keys.

    The audit log is opened before the key is made, so a log that cannot be written stops serve."""
    from api.protocols import SCOPES, AuditEvent

    audit = None
    if settings.audit:
        from appliance.audit.log import AuditLog

        audit = AuditLog.open(settings)
    try:
        started = utc_iso()
        name = "first admin (created by serve)"
        record, secret = store.create(SCOPES, name=name, first=True)
        if audit is not None:
            audit.append(
                AuditEvent(
                    event="key_create",
                    action="inferbox serve (first admin key)",
                    actor="system:first-start",
                    origin=f"inferbox-api@{socket.gethostname()}",
                    outcome="success",
                    status=0,
                    started_at=started,
                    ended_at=utc_iso(),
                    credential_id=record.id,
                    details={"scopes": ",".join(record.scopes), "name": name, "expires_at": ""},
                )
            )
    finally:
        if audit is not None:
            audit.close()
    return record.id, secret


def model_loader(
    settings: Settings, *, streams: int = 1, workload: str = "online", workers: int = 1
) -> Callable[[str, int | None], LoadedModel]:
    """``loader(name, version)`` for the registry and the batch worker, configured by ``settings``.

    ``streams``: sessions per model run side by side (0 = auto; the server and the batch worker
    pass ``settings.streams``); ``workload``: ``online`` or ``batch`` (how the choice is ranked,
    :class:`runtime.loader.LoaderOptions`); ``workers``: server processes sharing the cores (the
    server passes ``settings.workers``: with ``threads = 0`` each takes its share)."""
    from runtime.loader import LoaderOptions, load_model

    options = LoaderOptions(
        public_key=public_key_of(settings),
        backend=settings.backend,
        threads=settings.threads,
        allow_fallback=settings.allow_fallback,
        autotune=settings.autotune,
        decision_cache=settings.decision_cache,
        cache_dir=settings.cache_dir,
        streams=streams,
        workload=workload,
        static_shapes=settings.static_shapes,
        workers=workers,
    )

    def load(name: str, version: int | None) -> LoadedModel:
        return load_model(settings.repository, name, version, options=options)

    return load


def batch_loader(settings: Settings) -> Callable[[str, int | None], LoadedModel]:
    """The batch worker's loader: the choice ranked for length-sorted batches of 32, opened as
    ``settings.streams`` streams (a chunk's batches run on them side by side,
    :func:`appliance.batch.unit.run_chunk`)."""
    return model_loader(settings, streams=settings.streams, workload="batch")


def build_registry(settings: Settings) -> ModelRegistry:
    from runtime.loader import repository_index
    from runtime.repository import Repository
    from runtime.serving import ModelRegistry

    public_key = public_key_of(settings)
    registry = ModelRegistry(
        model_loader(settings, streams=settings.streams, workers=settings.workers),
        lambda: repository_index(settings.repository, public_key),
        settings.repository,
    )
    for name in Repository(settings.repository).models():
        try:
            registry.load(name)
        except InferboxError as exc:
            # One broken package must not keep the others from serving; the index shows why.
            log.error("model %s not loaded: %s", name, exc)
    return registry


def _event(event: str, action: str, outcome: str = "success", **details: str) -> Any:
    from api.protocols import AuditEvent

    now = utc_iso()
    return AuditEvent(
        event=event,
        action=action,
        actor="system",
        origin=f"inferbox-api@{socket.gethostname()}",
        outcome="success" if outcome == "success" else "failure",
        status=0,
        started_at=now,
        ended_at=now,
        details=dict(details),
    )


def _record_unaudited_start(settings: Settings) -> None:
    """A server started with the audit log off on a box that keeps one: it answered with no trace at
    all, and ``audit verify`` and the report went on as before.  The log gets this start (its settings
    included, ``audit = False``: the report's last start), and the service's log a warning."""
    from appliance.audit.log import AuditLog

    source = settings.sources.get("audit", "")
    log.warning(
        "audit is off (%s) on a box that keeps an audit log (%s): nothing this server answers is recorded; "
        "the log records this start",
        source,
        settings.audit_db,
    )
    try:
        with AuditLog.open(settings) as audit:
            audit.append(_event("service_start", "inferbox serve (audit off)", pid=str(os.getpid()), audit="off"))
            details = {k: str(v) for k, v in settings.public_dict().items()}
            audit.append(_event("config", "settings at start", **details))
    except (InferboxError, OSError, sqlite3.Error) as exc:  # a log that cannot be written: the warning stands alone
        log.warning("the start with audit off could not be recorded in %s: %s", settings.audit_db, exc)


def _load_event(loaded: LoadedModel, /, **details: str) -> Any:
    """``model_load`` at start, its columns naming the model as an API load's do (so that
    ``?event=model_load&model=NAME`` finds the loads at start too)."""
    import msgspec

    return msgspec.structs.replace(
        _event("model_load", f"load {loaded.name}/{loaded.version}", **details),
        model_name=loaded.name,
        model_version=str(loaded.version),
        model_sha256=loaded.package_sha256,
        backend=loaded.backend,
        variant=loaded.variant,
    )


def build_app(
    settings: Settings,
    *,
    reloads: bool = False,
    reloader: CertificateReloader | None = None,
    announces_ready: bool = False,
) -> Litestar:
    """The API app with its real collaborators; the lifespan records start / stop and closes them.

    ``reloads``: this process owns SIGHUP (``systemctl reload``): it loads a renewed certificate
    into ``reloader``'s live context, and says so in the log and the audit log (without TLS there
    is nothing to reload, and SIGHUP must still not end the service).  ``announces_ready``: a
    worker of ``--workers N`` says ``READY=1`` once started (to the main process's relay,
    :mod:`appliance.systemd.relay`); one process says it from ``serve`` once the socket listens.
    """
    from api.app import create_app
    from api.config import ApiConfig

    registry = build_registry(settings)
    keys = None
    if settings.auth:
        from appliance.keys import KeyStore

        keys = KeyStore(settings.state_db)
    audit: AuditLog | None = None
    if not settings.audit and settings.audit_db.exists():
        _record_unaudited_start(settings)
    if settings.audit:
        from appliance.audit.log import AuditLog

        audit = AuditLog.open(settings)
        audit.start()
        from appliance.tls import plan_tls

        tls = plan_tls(settings)  # what clients are served over, for the record (serve checked it already)
        audit.append(
            _event(
                "service_start",
                "inferbox serve",
                pid=str(os.getpid()),
                transport="http" if tls is None else tls.mode,
                tls_cert_sha256="" if tls is None else tls.certificate.sha256,
                signing_key_id=audit.signing_key_id,
            )
        )
        config_details = {k: str(v) for k, v in settings.public_dict().items()}
        audit.append(_event("config", "settings at start", **config_details))
        for model in registry.loaded():
            audit.append(
                _load_event(
                    model,
                    model=f"{model.name}/{model.version}",
                    sha256=model.package_sha256,
                    exec_precision=model.exec_precision,
                    fallback=model.session.fallback or "",
                )
            )

    @asynccontextmanager
    async def resources(_app: Litestar) -> AsyncGenerator[None, None]:
        from appliance.systemd.notify import Watchdog

        # READY=1 is sent by the serve command once the socket listens (a worker: here); the watchdog here
        watchdog = Watchdog.from_environment()
        await watchdog.start()
        if announces_ready:
            watchdog.ready()
        loop = asyncio.get_running_loop()
        if reloads:
            loop.add_signal_handler(signal.SIGHUP, reload_certificate, reloader, audit)
        try:
            yield
        finally:
            if reloads:
                # replaced, never removed: removing restores the default action, which ends the
                # process (and would skip the audit log's closing checkpoint)
                loop.add_signal_handler(signal.SIGHUP, _sighup_not_serving, signal.SIGHUP, None)
            await watchdog.stop()
            registry.close()
            if keys is not None:
                keys.close()
            if audit is not None:
                audit.append(_event("service_stop", "inferbox serve", pid=str(os.getpid())))
                audit.close()

    return create_app(
        registry=registry,
        # a worker of --workers N: where the workers pool their metrics (set by run_workers)
        config=ApiConfig.from_settings(settings, metrics_folder=os.environ.get(METRICS_DIR_ENV, "")),
        certificate_expiry=_certificate_expiry(settings, reloader),
        connection_closes=_connection_closes,
        audit=audit,
        keys=keys,
        lifespan=[resources],
        audit_reader=audit,
    )


def _connection_closes() -> dict[str, int]:
    """What the serving protocol (:mod:`appliance.http_protocol`) closed, read at each scrape."""
    from appliance.http_protocol import closed_connections

    return closed_connections()


def _certificate_expiry(settings: Settings, reloader: CertificateReloader | None) -> Callable[[], float | None]:
    """When the served certificate expires (Unix seconds), for ``/metrics``: the reloader's, which
    follows each reload; a worker of ``--workers N`` serves the one it started with; None over HTTP."""
    if reloader is not None:
        live = reloader

        def followed() -> float:  # read at each scrape: a reload replaces the plan
            return live.plan.certificate.not_after.timestamp()

        return followed
    from appliance.tls import plan_tls

    try:
        plan = plan_tls(settings)
    except (InferboxError, OSError):  # serve checked the files before it started the workers, and said why
        plan = None
    expiry = None if plan is None else plan.certificate.not_after.timestamp()
    return lambda: expiry


def hold_sighup() -> None:
    """Log and ignore SIGHUP while the server starts or stops (its own handler is in place only
    while it serves): the default action ends the process, which systemd counts as a clean exit
    and so does not restart; a renewal hook's ``kill -HUP`` during a model load would stop it."""
    signal.signal(signal.SIGHUP, _sighup_not_serving)


def _sighup_not_serving(_signum: int, _frame: Any) -> None:
    log.warning("SIGHUP while the server is starting or stopping: ignored; reload once it serves")


def reload_certificate(tls: CertificateReloader | None, audit: AuditLog | None) -> None:
    """SIGHUP: load the renewed certificate (or say why not; the running one stays) and record it."""
    if tls is None:
        log.warning("SIGHUP: this server speaks plain HTTP; there is no certificate to reload")
        return
    try:
        done = tls.reload()
    except Exception as exc:  # a handler's error would only reach asyncio's log, unrecorded
        if tls.broken:
            log.critical("SIGHUP: the certificate was not reloaded: %s", exc)
        else:
            log.error("SIGHUP: the certificate was not reloaded, the running one stays: %s", exc)
        if audit is not None:
            audit.append(
                _event(
                    "tls_reload",
                    "reload certificate",
                    "failure",
                    tls_cert_sha256=tls.plan.certificate.sha256,
                    reason=str(exc)[:500],
                )
            )
        return
    log.info(
        "SIGHUP: reloaded the certificate %s, sha256 %s, valid until %s (was %s)",
        done.after.subject,
        done.after.sha256,
        done.after.not_after.isoformat(),
        done.before.sha256,
    )
    if done.client_ca_changed:
        log.warning("tls_client_ca changed: a restart applies it (systemctl restart inferbox-api); a reload does not")
    if audit is not None:
        audit.append(
            _event(
                "tls_reload",
                "reload certificate",
                tls_cert_sha256=done.after.sha256,
                previous_tls_cert_sha256=done.before.sha256,
                client_ca_changed=str(done.client_ca_changed).lower(),
            )
        )


def app_factory() -> Litestar:
    """For uvicorn workers: settings from the environment the serve command exported."""
    from runtime.offline import stay_offline

    stay_offline()
    try:
        settings = load_settings()
        # a spawned worker starts with logging unset: its records went bare (warnings) or nowhere (info)
        configure_logging(settings.log_level)
        return build_app(settings, announces_ready=True)
    except Exception:
        # uvicorn restarts a worker that dies, forever, except one exiting with its start-up failure
        # code (3), after which it stops the service: serve then exits 1 and systemd restarts it
        log.exception("this worker could not build the app")
        raise SystemExit(3) from None


def settings_environment(settings: Settings) -> dict[str, str]:
    """``INFERBOX_*`` variables that rebuild ``settings`` in a worker process."""
    env: dict[str, str] = {}
    for key, value in settings.public_dict().items():
        if value is None:
            continue
        env[f"INFERBOX_{key.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env

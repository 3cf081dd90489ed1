"""``inferbox doctor``: what this box has, what each backend can do, what each model would run on.

Prints the hardware profile, every backend probe (usable, or why not), and for
every model in the repository (or one package folder) every candidate
(backend, variant, precision), admissible or rejected with the reason, and the
final choice.  Exit status 0 when every model can run (or there is none), 1 when
a model cannot run at all (package refused, or no admissible candidate).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.commands.options import build_settings, state_options
from appliance.settings import Settings

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from runtime.backends.base import Probe
    from runtime.hardware import HardwareProfile
    from runtime.package import Package
    from runtime.selection import Decision, Preference

__all__ = ["ModelReport", "doctor", "model_reports"]

_GIB = 1 << 30


@dataclass(frozen=True)
class ModelReport:
    """One package: whether it verified, and (when it did) the selection decision."""

    name: str
    version: int | None
    path: Path
    ok: bool
    error: str | None
    sha256: str | None = None
    signed_by: str | None = None
    decision: Decision | None = None
    #: how `serve` would open the choice: (streams, threads per stream, threads of the all-core session)
    serving: tuple[int, int, int] | None = None

    @property
    def runnable(self) -> bool:
        return self.ok and self.decision is not None and self.decision.choice is not None

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "name": self.name,
            "version": self.version,
            "path": str(self.path),
            "ok": self.ok,
            "error": self.error,
            "sha256": self.sha256,
            "signed_by": self.signed_by,
            "runnable": self.runnable,
            "serving": (
                dict(zip(("streams", "threads_per_stream", "all_core_threads"), self.serving, strict=True))
                if self.serving is not None
                else None
            ),
            "choice": str(d.choice) if d is not None and d.choice is not None else None,
            "source": d.source if d is not None else None,
            "verdicts": [
                {
                    "candidate": str(v.candidate),
                    **asdict(v.candidate),
                    "admissible": v.admissible,
                    "reason": v.reason,
                    "score": v.score,
                }
                for v in (d.verdicts if d is not None else ())
            ],
        }


def _decide(
    package: Package, probes: list[Probe], preference: Preference, fingerprint: str, cache_path: Path
) -> Decision:
    from runtime.autotune import DecisionCache, recall

    # with autotune on, a cached autotune result is what `serve` would use; otherwise the ranking
    return recall(package, probes, preference, fingerprint=fingerprint, cache=DecisionCache(cache_path))


def model_reports(
    probes: list[Probe],
    preference: Preference,
    *,
    repository: Path,
    public_key: Ed25519PublicKey | None = None,
    package: Path | None = None,
    fingerprint: str = "",
    cache_path: Path | None = None,
) -> list[ModelReport]:
    """Verify each package (all of ``repository``, or the folder ``package``) and decide for it. Never raises."""
    from runtime.package import read_package
    from runtime.repository import Repository
    from runtime.selection import rank

    def report(name: str, version: int | None, path: Path, opener: Callable[[], Package]) -> ModelReport:
        try:
            pkg = opener()
        except Exception as exc:  # doctor reports every refusal, it never stops at the first
            return ModelReport(name, version, path, ok=False, error=f"{type(exc).__name__}: {exc}")
        try:
            if cache_path is not None:
                decision = _decide(pkg, probes, preference, fingerprint, cache_path)
            else:
                decision = rank(probes, pkg.manifest, preference)
        except Exception as exc:
            return ModelReport(name, version, path, ok=False, error=f"{type(exc).__name__}: {exc}")
        return ModelReport(
            pkg.manifest.name,
            pkg.manifest.version,
            path,
            ok=True,
            error=None,
            sha256=pkg.sha256,
            signed_by=pkg.signed_by,
            decision=decision,
        )

    if package is not None:
        return [report(package.name, None, package, partial(read_package, package, public_key=public_key))]
    repo = Repository(repository, public_key=public_key)
    out: list[ModelReport] = []
    for folder in repo.folders():
        if folder.error is not None:  # an unreadable model folder: reported, the others still are
            error = f"{type(folder.error).__name__}: {folder.error}"
            out.append(ModelReport(folder.name, None, folder.path, ok=False, error=error))
            continue
        opener = partial(repo.open, folder.name, folder.version)
        out.append(report(folder.name, folder.version, folder.path, opener))
    return out


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _hardware_lines(hw: HardwareProfile) -> list[str]:
    from runtime.hardware import ISA_FLAGS

    lines = [
        f"  cpu:         {hw.cpu_model} ({hw.physical_cores} physical / {hw.logical_cores} logical cores)",
        "  isa:         " + ", ".join(f"{f} {_yes(hw.has_flag(f))}" for f in ISA_FLAGS),
        "  int8:        "
        + (
            "saturating on 8-bit weights (no VNNI / AMX): INT8 variants exported here use 7-bit weights; "
            "ones that require cpu-vnni are refused"
            if hw.int8_saturates() and hw.cpu_flags_known
            else "saturating on 8-bit weights assumed (ISA flags unknown on x86, see the note): INT8 variants "
            "that require cpu-vnni are refused"
            if hw.int8_saturates()
            else "exact (VNNI / AMX, or not an x86 CPU)"
        ),
        f"  memory:      {hw.memory_total_bytes / _GIB:.1f} GiB total, "
        f"{hw.memory_available_bytes / _GIB:.1f} GiB available",
        "  numa:        " + (f"nodes {', '.join(map(str, hw.numa_nodes))}" if hw.numa_nodes else "not visible"),
    ]
    if hw.onnxruntime is not None:
        providers = ", ".join(hw.onnxruntime.providers) or "none"
        lines.append(f"  onnxruntime: {hw.onnxruntime.version} (providers listed: {providers})")
    else:
        lines.append("  onnxruntime: not installed")
    if hw.openvino is not None:
        devices = "; ".join(
            f"{d.name} {d.full_name} [{', '.join(d.capabilities)}]".replace("  ", " ") for d in hw.openvino.devices
        )
        lines.append(f"  openvino:    {hw.openvino.version} (devices: {devices or 'none'})")
    else:
        lines.append("  openvino:    not installed")
    if hw.gpus:
        for gpu in hw.gpus:
            mem = f", {gpu.memory_total_mib} MiB" if gpu.memory_total_mib is not None else ""
            lines.append(f"  gpu:         {gpu.name}{mem}, driver {gpu.driver_version}")
    else:
        lines.append("  gpus:        none (" + ("nvidia-smi lists none" if hw.nvidia_smi else "no nvidia-smi") + ")")
    lines.append(f"  fingerprint: {hw.fingerprint()}")
    lines.extend(f"  note:        {note}" for note in hw.notes)
    return lines


def _probe_lines(probes: list[Probe]) -> list[str]:
    width = max((len(p.name) for p in probes), default=0)
    lines = []
    for p in probes:
        if p.usable:
            lines.append(
                f"  [usable]   {p.name:<{width}}  {p.device}: {p.reason} "
                f"(precisions {', '.join(p.precisions)}; formats {', '.join(p.formats)})"
            )
        else:
            lines.append(f"  [rejected] {p.name:<{width}}  {p.reason}")
    return lines


def _model_lines(m: ModelReport) -> list[str]:
    title = f"{m.name}/{m.version}" if m.version is not None else m.name
    if not m.ok or m.decision is None:
        return [f"  {title}  ({m.path})", f"    REFUSED: {m.error}"]
    d = m.decision
    signed = f", signed by {m.signed_by}" if m.signed_by else ""
    lines = [f"  {title}  ({m.path}; sha256 {m.sha256}{signed})"]
    if d.choice is not None:
        lines.append(f"    choice: {d.choice} (by {d.source})")
        if m.serving is not None:
            from runtime.streams import describe_plan

            streams, threads, wide = m.serving
            lines.append(f"    serving: {describe_plan(streams, threads, wide)} (settings streams, threads)")
    else:
        lines.append("    choice: NONE: no candidate can run this model here (reasons below)")
    for v in d.admissible:
        lines.append(f"    [admissible] {v.candidate}: {v.reason}")
    # candidates of one backend rejected for one reason (an unusable backend) fold into one line
    by_backend: dict[str, list[str]] = {}
    for v in d.rejected:
        by_backend.setdefault(v.candidate.backend, []).append(v.reason)
    for v in d.rejected:
        reasons = by_backend.get(v.candidate.backend)
        if reasons is None:
            continue
        if len(reasons) > 1 and len(set(reasons)) == 1:
            lines.append(f"    [rejected]   {v.candidate.backend}/* ({len(reasons)} candidates): {reasons[0]}")
            del by_backend[v.candidate.backend]
        else:
            lines.append(f"    [rejected]   {v.candidate}: {v.reason}")
    return lines


def server_report(settings: Settings) -> dict[str, Any]:
    """How `serve` would expose the API with these settings: address, keys, HTTPS; a problem stops it."""
    from datetime import UTC, datetime

    from appliance.exposure import check_exposure
    from appliance.tls import EXPIRY_WARNING_DAYS
    from runtime.errors import ConfigError

    out: dict[str, Any] = {
        "listen": f"{settings.host}:{settings.port}",
        "auth": settings.auth,
        "tls": "off",
        "certificate": None,
        "problem": None,
        "warning": None,
    }
    if settings.backend == "fake":
        from runtime.loader import FAKE_BACKEND_WARNING

        _warn(out, f"backend = fake ({settings.sources.get('backend')}): {FAKE_BACKEND_WARNING}")
    from appliance.settings import setting_warnings

    for warning in setting_warnings(settings):
        _warn(out, warning)
    try:
        plan = check_exposure(settings)
    except ConfigError as exc:
        out["problem"] = f"serve would refuse to start: {exc}"
        if settings.tls_cert is not None:  # "off" beside a refused certificate read as TLS switched off
            out["tls"] = f"not usable ({settings.tls_cert}): see the problem below"
        return out
    _warn_unusable_bound_keys(settings, plan, out)
    if plan is None:
        if settings.allow_plaintext:
            _warn(out, "plain HTTP (allow_plaintext): a TLS proxy in front must terminate HTTPS")
        return out
    cert = plan.certificate
    days = cert.days_left()
    out["tls"] = plan.mode
    out["certificate"] = {
        "file": str(plan.cert),
        "subject": cert.subject,
        "issuer": cert.issuer,
        "names": list(cert.names),
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "days_left": round(days, 1),
        "sha256": cert.sha256,
    }
    if days < 0:
        out["problem"] = f"the TLS certificate {plan.cert} expired on {cert.not_after.date()}: clients will refuse it"
    elif cert.not_before > datetime.now(UTC):
        out["problem"] = (
            f"the TLS certificate {plan.cert} is not valid before {cert.not_before.isoformat()}: clients will "
            "refuse it until then (or this box's clock is wrong)"
        )
    elif days < EXPIRY_WARNING_DAYS:
        _warn(out, f"the TLS certificate {plan.cert} expires in {days:.0f} days ({cert.not_after.date()})")
    return out


#: free space under which the home is a problem: the audit log refuses records (every request a 503)
STORAGE_PROBLEM_BYTES = 64 << 20
#: free space under which it is a warning (or under 5 % of the file system)
STORAGE_WARNING_BYTES = 1 << 30


def storage_report(settings: Settings) -> dict[str, Any]:
    """The home's file system (free space, read-only) and the audit log's size; read without writing."""
    out: dict[str, Any] = {"home": str(settings.home), "problem": None, "warning": None}
    where = settings.home
    while not where.exists() and where.parent != where:  # a home not made yet: the file system it will be on
        where = where.parent
    try:
        fs = os.statvfs(where)
    except OSError as exc:
        out["problem"] = f"the home {settings.home} cannot be read ({exc.strerror})"
        return out
    free, total = fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize
    out.update(free_bytes=free, total_bytes=total, read_only=bool(fs.f_flag & os.ST_RDONLY))
    db = settings.audit_db
    try:
        out["audit_db_bytes"] = sum(p.stat().st_size for p in (db, db.with_name(db.name + "-wal")) if p.is_file())
    except OSError as exc:  # a home this user cannot read (another user's, mode 0700)
        out["audit_db_bytes"] = None
        _warn(out, f"the audit log {db} cannot be read by this user ({exc.strerror})")
    if out["read_only"]:
        out["problem"] = (
            f"the file system of {settings.home} is mounted read-only: the audit log, keys and batch jobs cannot "
            "be written (every request would get 503)"
        )
    elif free < STORAGE_PROBLEM_BYTES:
        out["problem"] = (
            f"{_size(free)} free on the file system of {settings.home}: the audit log refuses records at a full "
            "disk, and every request gets 503; free space (old batch outputs: `inferbox batch purge`; old audit "
            "records: `inferbox audit prune`; backups)"
        )
    elif free < STORAGE_WARNING_BYTES or (total and free < 0.05 * total):
        _warn(out, f"{_size(free)} free on the file system of {settings.home} ({free / total:.0%} of it)")
    return out


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _storage_lines(storage: dict[str, Any]) -> list[str]:
    lines = ["storage"]
    if "free_bytes" in storage:
        ro = ", READ-ONLY" if storage["read_only"] else ""
        lines.append(
            f"  home:        {storage['home']}: {_size(storage['free_bytes'])} free of "
            f"{_size(storage['total_bytes'])}{ro}"
        )
        if storage["audit_db_bytes"] is not None:
            lines.append(f"  audit log:   {_size(storage['audit_db_bytes'])}")
    if storage["warning"]:
        lines.append(f"  WARNING: {storage['warning']}")
    if storage["problem"]:
        lines.append(f"  PROBLEM: {storage['problem']}")
    return lines


def _warn(out: dict[str, Any], text: str) -> None:
    out["warning"] = text if not out["warning"] else f"{out['warning']}; {text}"


def _warn_unusable_bound_keys(settings: Settings, plan: Any, out: dict[str, Any]) -> None:
    """Keys bound to a client certificate work only over mutual TLS: say so when it is off."""
    if not settings.auth or (plan is not None and plan.mode == "mutual-tls") or not settings.state_db.is_file():
        return
    import sqlite3

    from appliance.keys import bound_key_ids

    try:  # read-only: doctor changes nothing
        bound = bound_key_ids(settings.state_db)
    except sqlite3.Error as exc:
        _warn(out, f"the key table in {settings.state_db} could not be read ({exc})")
        return
    if bound:
        _warn(
            out,
            f"{len(bound)} active API key(s) bound to a client certificate ({', '.join(bound[:5])}) are refused: "
            "this server asks for no client certificates (set tls_client_ca for mutual TLS)",
        )


def _server_lines(server: dict[str, Any]) -> list[str]:
    lines = [
        "server",
        f"  listen:      {server['listen']} ({'https' if server['tls'] != 'off' else 'http'})",
        f"  auth:        {'API keys' if server['auth'] else 'OFF'}",
        f"  tls:         {server['tls']}",
    ]
    cert = server["certificate"]
    if cert is not None:
        names = ", ".join(cert["names"]) or "no subject alternative names"
        lines.append(f"  certificate: {cert['subject']} ({names})")
        lines.append(f"               until {cert['not_after']} ({cert['days_left']} days), sha256 {cert['sha256']}")
    if server["warning"]:
        lines.append(f"  WARNING: {server['warning']}")
    if server["problem"]:
        lines.append(f"  PROBLEM: {server['problem']}")
    return lines


@click.command()
@state_options
@click.option(
    "--package",
    "package",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Check this package folder instead of the repository.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--backend", default=None, help="Force this backend (as the backend setting does), or auto.")
def doctor(
    home: Path | None, repository: Path | None, package: Path | None, as_json: bool, backend: str | None
) -> None:
    """Show the hardware, every backend probe, and what each model would run on (and why not the rest).

    Exits 1 when a model in the repository cannot run at all, when `serve` would refuse
    the server settings (plain HTTP on a network address, TLS files wrong, certificate expired),
    or when the home's file system is read-only or nearly full (the audit log refuses records).
    """
    import msgspec

    from runtime.backends.registry import probe_all
    from runtime.hardware import cpu_budget, probe_hardware
    from runtime.loader import LoaderOptions, preference_for
    from runtime.streams import plan_for

    # an unknown backend name is refused here, by the settings (appliance.settings)
    settings = build_settings(home=home, repository=repository, backend=backend)
    public_key = None
    if settings.public_key is not None:
        from runtime.signing import load_public_key

        public_key = load_public_key(settings.public_key)

    hardware = probe_hardware()
    probes = probe_all(hardware)
    # the preference `serve` uses (runtime.loader), so cached autotune decisions are found
    preference = preference_for(LoaderOptions(backend=settings.backend, streams=settings.streams))
    reports = model_reports(
        probes,
        preference,
        repository=settings.repository,
        public_key=public_key,
        package=package,
        fingerprint=hardware.fingerprint(),
        # `serve` reads its autotune decisions only with autotune on (runtime.autotune.decide)
        cache_path=settings.decision_cache if settings.autotune else None,
    )
    budget = cpu_budget(settings.workers)
    cores = budget.threads
    for i, m in enumerate(reports):
        if m.runnable and m.decision is not None and m.decision.choice is not None:
            streams, threads = plan_for(
                m.decision.choice.backend, probes, settings.streams, cores, threads=settings.threads
            )
            reports[i] = replace(m, serving=(streams, threads, settings.threads or cores))
    failed = [m for m in reports if not m.runnable]
    server = server_report(settings)
    storage = storage_report(settings)
    hint = None
    if not reports:
        hint = f"no models in {settings.repository}: run `inferbox init` to build the default model"

    if as_json:
        out = {
            "hardware": {
                **hardware.to_dict(),
                "threads": {**msgspec.to_builtins(budget), "bound_by": budget.describe()},
            },
            "backends": [asdict(p) for p in probes],
            "preference": asdict(preference),
            "repository": str(settings.repository),
            "models": [m.to_dict() for m in reports],
            "server": server,
            "storage": storage,
            "ok": not failed and server["problem"] is None and storage["problem"] is None,
            "hint": hint,
        }
        click.echo(json.dumps(out, indent=2, default=str))
    else:
        lines = ["hardware", *_hardware_lines(hardware)]
        lines += [f"  threads:     {budget.describe()} (threads = 0)", "backends", *_probe_lines(probes)]
        where = str(package) if package is not None else str(settings.repository)
        lines.append(f"models ({where}; backend={preference.backend}, objective={preference.objective})")
        if hint:
            lines.append(f"  {hint}")
        for m in reports:
            lines.extend(_model_lines(m))
        if failed:
            names = ", ".join(f"{m.name}/{m.version}" if m.version is not None else m.name for m in failed)
            lines.append(f"PROBLEM: cannot run {names}; see the reasons above")
        lines.extend(_server_lines(server))
        lines.extend(_storage_lines(storage))
        click.echo("\n".join(lines))
    if failed or server["problem"] is not None or storage["problem"] is not None:
        sys.exit(1)

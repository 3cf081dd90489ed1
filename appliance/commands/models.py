"""``inferbox models list | pack | import | remove``: the model repository as an operator manages it.

Import, removal and packing are recorded in the audit log (``model_import``,
``model_remove``, ``model_pack``) with the package's name, version and identity, and the
record is durable before the repository changes or the archive appears.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.commands.options import build_settings, existing_home, state_options

if TYPE_CHECKING:
    from appliance.models.importing import Imported
    from appliance.settings import Settings

__all__ = ["models"]


def _now() -> datetime:
    return datetime.now(UTC)


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _settings(home: Path | None, repository: Path | None) -> Settings:
    """The settings, refusing a state folder that does not exist (a mistyped or default home, or root's)."""

    settings = build_settings(home=home, repository=repository)
    return existing_home(settings, "models", "the models go to the repository of the state folder the server uses")


def _record(
    settings: Settings,
    event: str,
    action: str,
    started: datetime,
    model: tuple[str, int, str],
    details: dict[str, str],
    *,
    ok: bool = True,
) -> None:
    """Append one durable audit record naming the package (nothing when audit is off)."""
    if not settings.audit:
        return
    from appliance.commands.audit import record_cli_event

    record_cli_event(settings, event, action, started, details, ok=ok, model=model)


@click.group()
def models() -> None:
    """The model repository: list its packages, pack one for another box, import one, remove one."""


@models.command(name="list")
@state_options
@click.option("--verify", is_flag=True, help="Hash every file too (slower; without it: listing, sizes, signature).")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def list_cmd(home: Path | None, repository: Path | None, verify: bool, as_json: bool) -> None:
    """Every version in the repository: would the server load it, who signed it, what it holds.

    Exit 1 when a package does not verify.
    """
    from appliance.models.listing import list_packages

    # the home's repository of a home that is not there is no empty repository: a mistyped --home
    settings = build_settings(home=home, repository=repository)
    if settings.sources.get("repository", "default") == "default":  # <home>/models: the home must be there
        settings = _settings(home, repository)
    listed = list_packages(settings, verify=verify)
    if as_json:
        click.echo(json.dumps([{**item.__dict__, "path": str(item.path)} for item in listed], indent=2))
    elif not listed:
        click.echo(
            f"no packages in {settings.repository}: build the default model with `inferbox init`, export one with "
            "`inferbox export`, or bring one from another box with `inferbox models import`"
        )
    else:
        rows = [("MODEL", "VERSION", "TASK", "SIZE", "PACKAGE", "SIGNED BY", "KEPT VARIANTS", "STATUS")]
        for item in listed:
            status = "ok" if item.ok else "BROKEN"
            rows.append(
                (
                    item.name,
                    str(item.version),
                    item.task or "?",
                    _mb(item.size) if item.size else "?",
                    item.sha256[:16] or "?",
                    item.signed or "?",
                    ",".join(item.kept) or "none",
                    status,
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
        for item in listed:
            if not item.ok:
                click.echo(f"{item.name} version {item.version}: {item.problem}", err=True)
        if not verify:
            click.echo("(file hashes not checked: --verify checks them)")
    if any(not item.ok for item in listed):
        sys.exit(1)


@models.command()
@state_options
@click.argument("name")
@click.option("--version", "version", type=click.IntRange(min=1), default=None, help="[default: the latest]")
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The file to write [default: ./<name>-<version>.tar]; never replaced.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def pack(
    home: Path | None, repository: Path | None, name: str, version: int | None, out: Path | None, as_json: bool
) -> None:
    """Write one package as one tar to carry to another box (`inferbox models import` there).

    The package is verified first (every file's hash) and packed from the bytes verified.
    """
    from appliance.models.archive import Packed, pack_package
    from appliance.server import public_key_of
    from runtime.package import read_signature
    from runtime.repository import Repository

    settings = build_settings(home=home, repository=repository)
    started = _now()
    package = Repository(settings.repository, public_key=public_key_of(settings)).open(name, version)
    target = out if out is not None else Path.cwd() / f"{package.name}-{package.version}.tar"
    identity = (package.name, package.version, package.sha256)

    def details(packed: Packed) -> dict[str, str]:
        return {"file": str(target.resolve()), "archive_sha256": packed.sha256, "bytes": str(packed.size)}

    def before_publish(packed: Packed) -> None:
        _record(settings, "model_pack", "inferbox models pack", started, identity, details(packed))

    def publish_failed(packed: Packed, exc: BaseException) -> None:
        failed = {**details(packed), "error": f"the file did not appear: {exc}"[:500]}
        _record(settings, "model_pack", "inferbox models pack", started, identity, failed, ok=False)

    signed_by = package.signed_by or _signer_id(settings, package.path)
    packed = pack_package(package, target, before_publish=before_publish, publish_failed=publish_failed)
    result = {
        "file": str(packed.path),
        "bytes": packed.size,
        "archive_sha256": packed.sha256,
        "model": package.name,
        "version": package.version,
        "package_sha256": package.sha256,
        "signed_by": signed_by,
    }
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"packed {package.name} version {package.version} into {packed.path} ({_mb(packed.size)})")
    click.echo(f"  package (identity): {package.sha256}")
    click.echo(f"  file sha256:        {packed.sha256}")
    signed = read_signature(package.path) is not None
    click.echo(
        f"  signed by key {signed_by}"
        if signed_by
        else "  NOT signed by a key of this box: the serving box needs the signer's public key"
        if signed
        else "  NOT signed: the serving box takes it only with --allow-unsigned"
    )
    click.echo(
        f"on the serving box: inferbox models import {packed.path.name} {_trust_flag(signed_by, signed)} "
        f"--expect-sha256 {package.sha256}"
    )


def _trust_flag(signed_by: str | None, signed: bool) -> str:
    """What `models import` needs to trust the package: the key that signed it, or, for a package that
    carries no signature, --allow-unsigned (--publisher-key alone refuses it)."""
    if signed_by:
        return "--publisher-key <this box's public key>"
    if signed:
        return "--publisher-key <the public key of the box that signed it>"
    return "--allow-unsigned"


@models.command(name="import")
@state_options
@click.argument("source", type=click.Path(path_type=Path, exists=True))
@click.option(
    "--publisher-key",
    "publisher_keys",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    multiple=True,
    help="Public key (PEM) of the box that exported the package (`inferbox signing-key show` there); "
    "repeatable [default: this box's own keys].",
)
@click.option(
    "--expect-sha256",
    default=None,
    help="The package's identity as the exporting box printed it (`models pack`, `models list --json`).",
)
@click.option(
    "--allow-unsigned", is_flag=True, help="Import a package that carries no signature (the audit record says so)."
)
@click.option(
    "--new-interface",
    is_flag=True,
    help="The package may change the interface of the model's newest version here (task, inputs, outputs, "
    "embedding dimension, labels); without it such an import is refused.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def import_cmd(
    home: Path | None,
    repository: Path | None,
    source: Path,
    publisher_keys: tuple[Path, ...],
    expect_sha256: str | None,
    allow_unsigned: bool,
    new_interface: bool,
    as_json: bool,
) -> None:
    """Check a package exported on another box (a package folder or a `models pack` tar) and add it.

    The signature must verify with a publisher key, every file's hash must match, and the
    package is signed again with this box's key (its identity does not change), so the
    server serves it.  The version is the publisher's; an identical one already here is
    reported, another one refused.
    """
    from appliance.models.importing import import_package
    from runtime import signing
    from runtime.package import list_versions

    settings = _settings(home, repository)
    started = _now()
    keys = [signing.load_public_key(p) for p in publisher_keys]
    action = "inferbox models import"

    def details(imported: Imported) -> dict[str, str]:
        out = {
            "source": str(imported.source.resolve()),
            "publisher": imported.publisher,
            "files": str(imported.files),
            "bytes": str(imported.size),
        }
        if imported.archive_sha256:
            out["archive_sha256"] = imported.archive_sha256
        if imported.publisher_signature:
            out["publisher_signature"] = imported.publisher_signature
        if imported.signed_by:
            out["signed_by"] = imported.signed_by
        for key in ("cpu", "cpus"):
            if key in imported.exported_on:  # the publisher's words: short and printable
                out[f"exported_on_{key}"] = _fact(imported.exported_on[key])
        return out

    recorded: list[Imported] = []

    def before_publish(imported: Imported) -> None:
        p = imported.package
        _record(settings, "model_import", action, started, (p.name, p.version, p.sha256), details(imported))
        recorded.append(imported)

    try:
        imported = import_package(
            settings,
            source,
            publisher_keys=keys,
            expect_sha256=expect_sha256,
            allow_unsigned=allow_unsigned,
            new_interface=new_interface,
            before_publish=before_publish,
        )
    except BaseException as exc:
        for done in recorded:  # the record said it would be placed: say it was not
            p = done.package
            failed = {**details(done), "error": f"not placed: {exc}"[:500]}
            _record(settings, "model_import", action, started, (p.name, p.version, p.sha256), failed, ok=False)
        raise
    p = imported.package
    if as_json:
        click.echo(json.dumps(_import_json(imported), indent=2))
        return
    if imported.already:
        click.echo(f"{p.name} version {p.version} is already in the repository (the same package {p.sha256[:16]}...)")
        return
    click.echo(f"imported {p.name} version {p.version} into {p.path} ({_mb(imported.size)}, {imported.files} files)")
    click.echo(f"  package (identity): {p.sha256}")
    who = "unsigned (--allow-unsigned)" if imported.publisher == "unsigned" else f"key {imported.publisher}"
    click.echo(f"  published by: {who}; signed for this box by: {imported.signed_by or 'nobody (no signing key)'}")
    here = _this_cpu()
    there = _fact(imported.exported_on.get("cpu", ""))
    cpus = _fact(imported.exported_on.get("cpus", "?"))
    if there and here and (there != here or cpus != str(_cpu_count())):
        click.echo(
            f"  its timings were measured on {there} ({cpus} CPUs), not on this box "
            f"({here}, {_cpu_count()} CPUs): `inferbox bench {p.name}` times the candidates here, and "
            "`serve --autotune` picks by timings taken here"
        )
    newest = max(list_versions(settings.repository, p.name), default=p.version)
    if newest > p.version:
        click.echo(
            f"the server serves the newest version of {p.name}, {newest}, not this one: `inferbox models remove "
            f"{p.name} {newest}` retires it"
        )
    else:
        click.echo(
            f"serve it: POST /v2/repository/models/{p.name}/load on the running server (a models:admin key) swaps "
            "the newest version in without a gap, or restart the server"
        )


def _import_json(imported: Imported) -> dict[str, Any]:
    p = imported.package
    return {
        "model": p.name,
        "version": p.version,
        "path": str(p.path),
        "package_sha256": p.sha256,
        "already": imported.already,
        "publisher": imported.publisher,
        "signed_by": imported.signed_by,
        "archive_sha256": imported.archive_sha256,
        "files": imported.files,
        "bytes": imported.size,
        "exported_on": imported.exported_on,
    }


def _signer_id(settings: Settings, folder: Path) -> str | None:
    """The key id of this box's key (current or retired, or ``public_key``) that signed the package; else None."""
    from appliance.models.trust import box_keys, signer
    from runtime.errors import InferboxError
    from runtime.signing import key_id

    try:
        key = signer(folder, box_keys(settings))
    except (InferboxError, OSError, ValueError):  # signed by none of them, or a key file that does not load
        return None
    return key_id(key) if key is not None else None


def _fact(text: str, limit: int = 100) -> str:
    """A value the publisher wrote (its manifest), made safe for a terminal line and an audit record."""
    from appliance.commands.audit import printable

    return printable(text[:limit])


def _this_cpu() -> str:
    from runtime.hardware import parse_cpu_model

    try:
        return parse_cpu_model(Path("/proc/cpuinfo").read_text(encoding="utf-8"))
    except OSError:
        return ""


def _cpu_count() -> int:
    import os

    return os.cpu_count() or 0


@models.command()
@state_options
@click.argument("name")
@click.argument("version", type=click.IntRange(min=1))
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def remove(home: Path | None, repository: Path | None, name: str, version: int, yes: bool, as_json: bool) -> None:
    """Remove one version of a model from the repository (recorded in the audit log first).

    A server serving it keeps its private verified copy until the model is unloaded, loaded
    again (POST /v2/repository/models/NAME/load serves the newest version left: a rollback) or
    the server restarts; it cannot load that version again.
    """
    from appliance.models.removing import Removed, remove_package

    settings = _settings(home, repository)
    started = _now()
    if not yes:
        if not sys.stdin.isatty():
            raise click.UsageError(f"removing {name} version {version} cannot be undone: pass --yes to confirm")
        click.confirm(f"remove {name} version {version} from {settings.repository}?", abort=True)

    recorded: list[tuple[Removed, dict[str, str]]] = []

    def before_remove(removed: Removed) -> None:
        details = {"remaining": ",".join(map(str, removed.remaining)) or "none"}
        if not removed.sha256:
            details["note"] = "the manifest could not be read; the identity is unknown"
        _record(settings, "model_remove", "inferbox models remove", started, (name, version, removed.sha256), details)
        recorded.append((removed, details))

    try:
        removed = remove_package(settings, name, version, before_remove=before_remove)
    except BaseException as exc:
        for done, details in recorded:  # the record said it would be removed: say it was not
            failed = {**details, "error": f"not removed: {exc}"[:500]}
            named = (name, version, done.sha256)
            _record(settings, "model_remove", "inferbox models remove", started, named, failed, ok=False)
        raise
    if as_json:
        click.echo(
            json.dumps(
                {"model": name, "version": version, "package_sha256": removed.sha256, "remaining": removed.remaining}
            )
        )
        return
    left = ", ".join(map(str, removed.remaining)) if removed.remaining else "none: the model is gone"
    identity = removed.sha256[:16] or "unreadable manifest"
    click.echo(f"removed {name} version {version} ({identity}); versions left: {left}")
    if removed.remaining and version > max(removed.remaining):
        click.echo(
            f"a running server serving version {version} goes on with it until POST /v2/repository/models/{name}/load "
            f"(a models:admin key) serves version {max(removed.remaining)}, or until it restarts"
        )

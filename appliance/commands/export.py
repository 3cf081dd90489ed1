"""``inferbox export``: a thin shell over :func:`export.pipeline.export_model`.

Progress goes to stderr, one line per step; the final report (every variant and
every attempt with accuracy, verdict and timings) to stdout, or the report as
JSON with ``--json``.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from appliance.commands.options import build_settings, state_options

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from appliance.settings import Settings
    from runtime.manifest import Manifest

__all__ = ["export_cmd", "record_export", "resolve_signing_key", "resolve_threads"]

_TASKS = ("feature-extraction", "text-classification", "image-classification", "tensor")


def resolve_signing_key(settings: Settings, sign: bool | None) -> Ed25519PrivateKey | None:
    """``--sign``: the key must exist; default: use it when the file exists; ``--no-sign``: none."""
    from runtime.errors import ConfigError
    from runtime.signing import load_private_key

    path = settings.signing_key
    if sign is False:
        return None
    if sign is None and not path.exists():
        return None
    if sign and not path.exists():
        raise ConfigError(
            f"--sign: the signing key {path} does not exist; create one with `inferbox signing-key create`"
        )
    return load_private_key(path)


def record_export(
    settings: Settings,
    manifest: Manifest,
    started: datetime,
    action: str,
    *,
    create_log: bool = False,
    actor: str | None = None,
) -> None:
    """``model_export`` in the box's audit log (when it keeps one, or ``create_log``: the first start): who
    put which package into the repository, from what source.  A package that cannot be recorded is taken
    out again: the box holds none unrecorded."""
    if not settings.audit or not (create_log or settings.audit_db.exists()):
        return  # a build box that never served keeps no log
    import hashlib

    from runtime.package import read_manifest_bytes

    path = settings.repository / manifest.name / str(manifest.version)
    sha256 = hashlib.sha256(read_manifest_bytes(path)).hexdigest()
    p = manifest.provenance
    details = {
        "source_kind": p.source_kind,
        "source": p.source[:300],
        "source_sha256": p.source_sha256,
        "variants": ",".join(v.id for v in manifest.variants if any(a.passed for a in v.accuracy)),
    }
    from appliance.audit.log import AuditLog
    from appliance.commands.audit import cli_event

    identity = (manifest.name, manifest.version, sha256)
    event = cli_event("model_export", action, started, details, model=identity, actor=actor)
    log = None
    try:
        log = AuditLog.open(settings)
        log.append(event)
    except BaseException:
        from appliance.models.removing import remove_package

        if log is not None:
            log.close()
        remove_package(settings, manifest.name, manifest.version)  # not recorded: not on the box
        raise
    log.close()  # the record is committed: a failure from here on (a checkpoint) leaves the package


def resolve_threads(settings: Settings) -> int:
    if settings.threads > 0:
        return settings.threads
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return os.cpu_count() or 1


def _progress(step: str, message: str) -> None:
    click.echo(f"[{step}] {message}", err=True)


def _source(source: str) -> tuple[Any, dict[str, Any] | None]:
    """A path, or ``FILE.py:FACTORY`` (the factory returns a module with ``example_inputs``, or (module, inputs))."""
    path_part, sep, _attr = source.rpartition(":")
    if sep and path_part.endswith(".py"):
        from export.sources.pytorch import load_factory
        from runtime.errors import SourceError

        made = load_factory(source)
        module, example = made if isinstance(made, tuple) else (made, getattr(made, "example_inputs", None))
        if not isinstance(example, dict):
            got = "nothing" if example is None else f"a {type(example).__name__}"
            raise SourceError(
                f"{source}: the factory must return (module, example_inputs) or a module with an example_inputs "
                f"attribute, where example_inputs is a dict of input name -> tensor or array with a batch axis, "
                f'e.g. {{"x": torch.zeros(1, 8)}} (its keys name the model\'s inputs); it gave {got}'
            )
        return module, example
    return Path(source), None


def _label(source: str) -> str:
    """``FILE.py:FACTORY`` with the file's absolute path: what the provenance and the audit record name."""
    path_part, _, attr = source.rpartition(":")
    return f"{Path(path_part).resolve()}:{attr}"


@click.command("export")
@click.argument("source")
@click.option("--task", required=True, type=click.Choice(_TASKS), help="What the model does.")
@click.option("--name", required=True, help="Model name in the repository.")
@click.option(
    "--version",
    type=click.IntRange(min=1),
    default=None,
    help="Package version, 1 or more [default: the next free one when the package is written].",
)
@click.option(
    "--calibration", type=click.Path(path_type=Path), default=None, help="Calibration samples (JSONL/CSV/NPZ)."
)
@click.option("--validation", type=click.Path(path_type=Path), default=None, help="Validation samples (JSONL/CSV/NPZ).")
@click.option("--gate", "gates", multiple=True, metavar="KEY=VALUE", help="Override a gate, e.g. min_cosine_min=0.98.")
@click.option("--variants", default="onnx-fp32,onnx-opt,onnx-int8,ov-fp32,ov-int8", show_default=True)
@click.option("--sign/--no-sign", default=None, help="Sign the manifest [default: when the signing key exists].")
@click.option("--timing", type=click.Choice(["quick", "full"]), default="full", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option(
    "--int8-recipe",
    type=click.Choice(["auto", "static", "dynamic"]),
    default="auto",
    show_default=True,
    help="ONNX Runtime INT8 recipes to try: all in order (the first that passes is kept), only static QDQ "
    "(calibrated on --calibration), or only dynamic (activations quantized at run time). OpenVINO INT8 is "
    "always calibrated.",
)
@click.option(
    "--new-interface",
    is_flag=True,
    help="The new version may change the interface of the name's newest version (task, inputs, outputs, "
    "embedding dimension, labels); without it such an export is refused.",
)
@state_options
def export_cmd(
    source: str,
    task: str,
    name: str,
    version: int | None,
    calibration: Path | None,
    validation: Path | None,
    gates: tuple[str, ...],
    variants: str,
    sign: bool | None,
    timing: str,
    as_json: bool,
    new_interface: bool,
    int8_recipe: str,
    home: Path | None,
    repository: Path | None,
) -> None:
    """Export SOURCE (HF folder, .onnx file, or FILE.py:FACTORY) into a validated package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # entry point: the appliance never downloads
    from export.pipeline import export_model
    from export.report import format_report, report_dict
    from export.spec import ExportSpec, check_gates, parse_gate, parse_variants

    settings = build_settings(home=home, repository=repository)
    overrides = dict(parse_gate(g) for g in gates)
    check_gates(task, overrides)  # before the source is loaded: a typo is found at once
    variant_ids = parse_variants(variants)
    src, example = _source(source)
    spec = ExportSpec(
        source=src,
        task=task,
        name=name,
        repository=settings.repository,
        version=version,
        calibration=calibration,
        validation=validation,
        gates=overrides,
        variants=variant_ids,
        timing=timing,
        threads=resolve_threads(settings),
        example_inputs=example,
        source_label=_label(source) if example is not None else None,
        signing_key=resolve_signing_key(settings, sign),
        new_interface=new_interface,
        int8_recipe=int8_recipe,
    )
    started = datetime.now(UTC)
    manifest = export_model(spec, progress=_progress)
    record_export(settings, manifest, started, "inferbox export")
    package = published(settings, manifest, spec.signing_key)
    if as_json:
        click.echo(json.dumps({**report_dict(manifest), "package": package}, indent=2, sort_keys=True))
    else:
        click.echo(format_report(manifest))
        click.echo("")
        click.echo(f"package:   {package['path']}")
        click.echo(
            f"identity:  sha256 {package['sha256']} (what `models import --expect-sha256` and the audit log name)"
        )
        if package["signed_by"]:
            click.echo(f"signed by: key {package['signed_by']} ({settings.signing_key})")
        else:
            click.echo(
                "signed by: UNSIGNED: a box that requires signatures (public_key) refuses it; sign exports with "
                "`inferbox signing-key create` (then every export is signed) or --sign"
            )
    sys.stdout.flush()


def published(settings: Settings, manifest: Manifest, key: Ed25519PrivateKey | None) -> dict[str, str | None]:
    """Where the package went, its identity (SHA-256 of its manifest) and the id of the key that signed it."""
    import hashlib

    from runtime.package import read_manifest_bytes
    from runtime.signing import key_id

    path = settings.repository / manifest.name / str(manifest.version)
    return {
        "path": str(path),
        "sha256": hashlib.sha256(read_manifest_bytes(path)).hexdigest(),
        "signed_by": key_id(key) if key is not None else None,
    }

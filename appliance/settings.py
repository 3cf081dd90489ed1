"""The appliance's settings: one immutable object, built once by an entry point.

Precedence, lowest to highest: defaults < TOML file < ``INFERBOX_*`` environment
variables < CLI flags.  Every problem is reported at once in one
:class:`~runtime.errors.ConfigError`.

The TOML file groups keys in tables (``[server]``, ``[models]``, ...) for
readability; every key is unique across tables, and its environment variable is
``INFERBOX_`` + the key in upper case (``port`` -> ``INFERBOX_PORT``).
The file is ``$INFERBOX_CONFIG``, else ``<home>/inferbox.toml`` when it exists.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.backends.static_shapes import DEFAULT_STATIC_SHAPES
from runtime.errors import ConfigError

__all__ = [
    "FIELDS",
    "METRICS_DIR_ENV",
    "Field",
    "Settings",
    "default_home",
    "load_settings",
    "queue_problem",
    "retention_problem",
    "setting_warnings",
]


@dataclass(frozen=True)
class Field:
    name: str
    type: type
    default: Any
    section: str
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None


#: most threads (and streams) of a session: far above any CPU's cores, far below the C int that
#: onnxruntime and OpenVINO take (a larger value passed validation and crashed there)
MAX_THREADS = 1024
#: most uvicorn worker processes (each holds its own copy of every model)
MAX_WORKERS = 256
#: longest span in days (100 years; Python's timedelta overflows past 999999999 days)
MAX_DAYS = 36500

FIELDS: tuple[Field, ...] = (
    # paths ([paths]); None means "derived from home"
    Field("home", Path, None, "paths", "state directory (models, databases, keys)"),
    Field("repository", Path, None, "paths", "model repository (default <home>/models)"),
    Field("public_key", Path, None, "paths", "Ed25519 public key (PEM) that package manifests must be signed with"),
    Field("signing_key", Path, None, "paths", "Ed25519 private key (PEM, 0600) signing packages and audit checkpoints"),
    # server
    Field("host", str, "127.0.0.1", "server", "address to listen on"),
    Field("port", int, 8080, "server", "TCP port", minimum=1, maximum=65535),
    Field("workers", int, 1, "server", "uvicorn worker processes", minimum=1, maximum=MAX_WORKERS),
    Field("auth", bool, True, "server", "require API keys"),
    Field("docs", bool, True, "server", "serve OpenAPI docs at /docs"),
    Field("metrics_auth", bool, False, "server", "/metrics needs an API key with the metrics:read scope"),
    Field("log_level", str, "info", "server", "logging level", choices=("debug", "info", "warning", "error")),
    Field(
        "allow_plaintext",
        bool,
        False,
        "server",
        "serve plain HTTP on a non-loopback host (only behind a TLS proxy that terminates HTTPS)",
    ),
    Field(
        "trusted_proxies",
        str,
        None,
        "server",
        "addresses or networks (comma-separated) of the proxies whose X-Forwarded-For names a request's "
        "origin; unset: none, the origin is the connection's peer",
    ),
    Field(
        "shutdown_drain_s",
        float,
        0.0,
        "server",
        "on SIGTERM, seconds the API answers readiness 503 and goes on serving before it stops taking "
        "connections (a load balancer's health-check interval or more; one worker process only)",
        minimum=0.0,
    ),
    Field(
        "shutdown_timeout_s",
        float,
        20.0,
        "server",
        "seconds the requests in flight get to finish after it stops taking connections (keep drain + "
        "this below the unit's TimeoutStopSec, 30 s: the audit log's clean-shutdown checkpoint comes last)",
        minimum=0.001,
    ),
    # tls
    Field("tls_cert", Path, None, "tls", "PEM certificate (with its chain) the API serves HTTPS with"),
    Field("tls_key", Path, None, "tls", "PEM private key of tls_cert (unencrypted; mode 0600 or 0640)"),
    Field(
        "tls_client_ca",
        Path,
        None,
        "tls",
        "PEM CA bundle: clients must present a certificate it signed (mutual TLS, on top of API keys)",
    ),
    # models
    Field("default_model", str, "minilm", "models", "model built by `inferbox init` and served by default"),
    Field("backend", str, "auto", "models", "backend name to force, or auto"),
    Field("autotune", bool, False, "models", "time every admissible candidate at load and keep the fastest"),
    Field("allow_fallback", bool, False, "models", "accept a session that silently runs on another device (recorded)"),
    Field(
        "threads",
        int,
        0,
        "models",
        "intra-op threads per session (0 = physical cores, split among streams)",
        minimum=0,
        maximum=MAX_THREADS,
    ),
    Field(
        "streams",
        int,
        0,
        "models",
        "sessions per served model running batches side by side (0 = auto: 2 on a CPU)",
        minimum=0,
        maximum=MAX_THREADS,
    ),
    Field(
        "static_shapes",
        int,
        DEFAULT_STATIC_SHAPES,
        "models",
        "OpenVINO: static-shape copies of a model's all-core session for input shapes that repeat "
        "(0 = none; each costs a compiled model's memory)",
        minimum=0,
    ),
    Field("truncate", bool, True, "models", "truncate texts over the model's maximum length (else 400)"),
    # batching
    Field("max_batch_size", int, 32, "batching", "largest batch the dynamic batcher forms", minimum=1),
    Field("max_queue_delay_ms", float, 2.0, "batching", "longest a request waits for a batch to fill", minimum=0),
    Field(
        "queue_limit",
        int,
        4096,
        "batching",
        "queued texts (text models) or requests (tensor models) per model before 429",
        minimum=1,
    ),
    Field(
        "request_timeout_s",
        float,
        30.0,
        "batching",
        "a request waiting longer gets 504 (429 at once when the queue ahead would keep it longer)",
        minimum=0.001,
    ),
    # limits
    Field("max_body_bytes", int, 16 << 20, "limits", "largest request body, also after decompression", minimum=1),
    Field(
        "body_timeout_s",
        float,
        60.0,
        "limits",
        "a request body not received in full within this many seconds gets 408",
        minimum=0.001,
    ),
    Field(
        "header_timeout_s",
        float,
        10.0,
        "limits",
        "a connection that has not sent a request's headers this many seconds after it opened (or after "
        "its last answer) is closed, with 408 if the headers began",
        minimum=0.001,
    ),
    Field("max_inputs", int, 2048, "limits", "most inputs (texts / batch rows) per request (OpenAI's)", minimum=1),
    Field("max_tensor_elements", int, 16 * 1024 * 1024, "limits", "most elements in one tensor", minimum=1),
    Field("max_json_depth", int, 32, "limits", "deepest JSON nesting accepted", minimum=1),
    Field("rate_limit_per_minute", int, 0, "limits", "requests per key per minute (0 = unlimited)", minimum=0),
    Field(
        "tokens_per_minute",
        int,
        0,
        "limits",
        "tokens a key's text requests may bring per minute (0 = unlimited)",
        minimum=0,
    ),
    # audit
    Field("audit", bool, True, "audit", "write the tamper-evident audit log"),
    Field("checkpoint_every", int, 1000, "audit", "sign a checkpoint every N records", minimum=1),
    Field(
        "checkpoint_minutes",
        float,
        10.0,
        "audit",
        "sign a checkpoint every T minutes even when idle",
        minimum=0.01,
        maximum=MAX_DAYS * 24 * 60,
    ),
    Field("retention_days", int, 365, "audit", "audit records are kept this long", minimum=1, maximum=MAX_DAYS),
    Field(
        "min_retention_days",
        int,
        183,
        "audit",
        "prune refuses to cut newer records unless forced",
        minimum=0,
        maximum=MAX_DAYS,
    ),
    Field(
        "digest_key_days",
        int,
        30,
        "audit",
        "rotate the HMAC digest key after this many days",
        minimum=1,
        maximum=MAX_DAYS,
    ),
    Field(
        "ship_dir",
        Path,
        None,
        "audit",
        "folder on another machine (a mounted share) that `inferbox audit ship` copies the log to",
    ),
    # batch
    Field(
        "batch_retention_days",
        float,
        0.0,
        "batch",
        "a finished batch job's input copy and outputs are deleted this many days after it ended, by `inferbox "
        "batch run` (0: kept until `inferbox batch purge`)",
        minimum=0,
        maximum=MAX_DAYS,
    ),
    # backup
    Field(
        "backup_dir",
        Path,
        None,
        "backup",
        "folder on another disk or machine (a mounted share) that `inferbox backup create` writes to",
    ),
    Field(
        "backup_keep",
        int,
        7,
        "backup",
        "`inferbox backup create` keeps this many archives in its folder, removing older ones (0: keep all)",
        minimum=0,
    ),
    Field(
        "backup_encrypt_to",
        Path,
        None,
        "backup",
        "public key (`inferbox backup keygen`'s .pub) that `inferbox backup create` encrypts archives to; its "
        "private key stays off the box",
    ),
)

_BY_NAME = {f.name: f for f in FIELDS}


def default_home(environ: Mapping[str, str]) -> Path:
    """``$STATE_DIRECTORY`` under systemd, else ``~/.inferbox``."""
    state = environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    return Path(environ.get("HOME", str(Path.home()))) / ".inferbox"


@dataclass(frozen=True)
class Settings:
    home: Path
    repository: Path
    public_key: Path | None
    signing_key: Path
    host: str
    port: int
    workers: int
    auth: bool
    docs: bool
    metrics_auth: bool
    log_level: str
    allow_plaintext: bool
    trusted_proxies: str | None
    shutdown_drain_s: float
    shutdown_timeout_s: float
    tls_cert: Path | None
    tls_key: Path | None
    tls_client_ca: Path | None
    default_model: str
    backend: str
    autotune: bool
    allow_fallback: bool
    threads: int
    streams: int
    static_shapes: int
    truncate: bool
    max_batch_size: int
    max_queue_delay_ms: float
    queue_limit: int
    request_timeout_s: float
    max_body_bytes: int
    body_timeout_s: float
    header_timeout_s: float
    max_inputs: int
    max_tensor_elements: int
    max_json_depth: int
    rate_limit_per_minute: int
    tokens_per_minute: int
    audit: bool
    checkpoint_every: int
    checkpoint_minutes: float
    retention_days: int
    min_retention_days: int
    digest_key_days: int
    ship_dir: Path | None
    backup_dir: Path | None
    batch_retention_days: float
    backup_keep: int
    backup_encrypt_to: Path | None
    #: where each value came from (default / file / env / cli), for `inferbox config`
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict, compare=False)
    #: the configuration file that was read (``$INFERBOX_CONFIG`` or ``<home>/inferbox.toml``), if any
    config_file: Path | None = dataclasses.field(default=None, compare=False)

    @property
    def state_db(self) -> Path:
        return self.home / "state.db"

    @property
    def audit_db(self) -> Path:
        return self.home / "audit.db"

    @property
    def keys_dir(self) -> Path:
        return self.home / "keys"

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    @property
    def outbox(self) -> Path:
        return self.home / "outbox"

    @property
    def cache_dir(self) -> Path:
        return self.home / "cache"

    @property
    def decision_cache(self) -> Path:
        """Autotune's decisions (read only with autotune on; ``serve --autotune --retune`` re-times)."""
        return self.cache_dir / "decisions.json"

    def public_dict(self) -> dict[str, Any]:
        """Settings as plain values (paths as strings), for logs and the audit log."""
        out: dict[str, Any] = {}
        for f in FIELDS:
            v = getattr(self, f.name)
            out[f.name] = str(v) if isinstance(v, Path) else v
        return out


def _did_you_mean(name: str, *, prefix: str = "") -> str:
    """``"; did you mean X?"`` for the setting whose name is closest to ``name`` (a typo), else ``""``."""
    import difflib

    close = difflib.get_close_matches(name.lower(), list(_BY_NAME), n=1, cutoff=0.75)
    return f"; did you mean {prefix}{close[0].upper() if prefix else close[0]}?" if close else ""


def _coerce(field: Field, raw: Any, where: str, problems: list[str]) -> Any:
    label = f"{field.name} ({where})"
    try:
        if field.type is bool:
            if isinstance(raw, bool):
                value: Any = raw
            elif isinstance(raw, str) and raw.strip().lower() in {"1", "true", "yes", "on"}:
                value = True
            elif isinstance(raw, str) and raw.strip().lower() in {"0", "false", "no", "off"}:
                value = False
            else:
                raise ValueError("expected true or false")
        elif field.type is int:
            if isinstance(raw, bool):
                raise ValueError("expected an integer")
            if isinstance(raw, float) and not (math.isfinite(raw) and raw.is_integer()):
                raise ValueError("expected a whole number (a fraction would be cut off)")
            try:
                value = int(raw)
            except ValueError:  # int()'s own words: "invalid literal for int() with base 10: 'abc'"
                raise ValueError("expected a whole number") from None
        elif field.type is float:
            if isinstance(raw, bool):
                raise ValueError("expected a number")
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
        elif field.type is Path:
            if not isinstance(raw, str | Path) or not str(raw):
                raise ValueError("expected a path")
            value = Path(raw).expanduser()
        else:
            if not isinstance(raw, str):
                raise ValueError("expected a string")
            if not raw.strip():
                raise ValueError("must not be empty (remove the setting to use the default)")
            value = raw
    except (TypeError, ValueError) as exc:
        problems.append(f"{label}: {raw!r} is not valid: {exc}")
        return None
    if field.choices and value not in field.choices:
        problems.append(f"{label}: {value!r} is not one of {', '.join(field.choices)}")
        return None
    if field.minimum is not None and isinstance(value, int | float) and value < field.minimum:
        problems.append(f"{label}: {_shown(value)} is below the minimum {field.minimum:g}")
        return None
    if field.maximum is not None and isinstance(value, int | float) and value > field.maximum:
        problems.append(f"{label}: {_shown(value)} is above the maximum {field.maximum:g}")
        return None
    return value


def _check_backend(values: Mapping[str, Any], sources: Mapping[str, str], problems: list[str]) -> None:
    """``backend`` must name a registered backend (or be ``auto``): a typo loaded no model at all and
    logged why for every candidate.  The names come from the registry's table; nothing is probed."""
    from runtime.backends.registry import BACKENDS

    backend = values.get("backend")
    if backend is not None and backend != "auto" and backend not in BACKENDS:
        problems.append(
            f"backend ({sources.get('backend')}): {backend!r} is not a backend; "
            f"use auto or one of {', '.join(BACKENDS)}"
        )


def _check_proxies(values: Mapping[str, Any], sources: Mapping[str, str], problems: list[str]) -> None:
    """``trusted_proxies``: addresses or networks, each one; ``*`` (uvicorn's "trust anyone") would let
    every client write its own origin into the audit log, and a typo would be trusted as a literal."""
    import ipaddress

    for item in str(values.get("trusted_proxies") or "").split(","):
        if not item.strip():
            continue
        try:
            ipaddress.ip_network(item.strip())  # strict, as uvicorn reads it (else a literal that never matches)
        except ValueError:
            meant = ""
            with contextlib.suppress(ValueError):
                meant = f" (did you mean {ipaddress.ip_network(item.strip(), strict=False)}?)"
            problems.append(
                f"trusted_proxies ({sources.get('trusted_proxies')}): {item.strip()!r} is not an address or a "
                f"network{meant} (e.g. 127.0.0.1, 10.0.0.0/24); name each proxy, a comma between them"
            )


def _check_queue_delay(values: Mapping[str, Any], sources: Mapping[str, str], problems: list[str]) -> None:
    """``max_queue_delay_ms`` must be at most half of ``request_timeout_s``: a lone request may wait that
    long for company before its batch runs, and one that waited past its timeout gets 504 (a delay
    above the timeout timed out every request that came alone)."""
    delay, timeout = values.get("max_queue_delay_ms"), values.get("request_timeout_s")
    if delay is None or timeout is None or delay <= timeout * 1000 / 2:
        return
    problems.append(
        f"max_queue_delay_ms ({sources.get('max_queue_delay_ms')}): {_shown(delay)} ms is more than half of "
        f"request_timeout_s ({sources.get('request_timeout_s')}) = {_shown(timeout)} s, so requests would time "
        f"out waiting for a batch to fill; lower max_queue_delay_ms to at most {_shown(timeout * 500)} or raise "
        f"request_timeout_s to at least {_shown(delay / 500)}"
    )


def retention_problem(settings: Settings) -> str | None:
    """What is wrong when ``retention_days`` (the policy the record of processing states) is below
    ``min_retention_days`` (the floor ``audit prune`` keeps without ``--force``): the report stated
    both, and a prune to the policy is refused.  A warning (serve, doctor, the report), not a refusal:
    a configuration that started before must not stop every service at an upgrade."""
    kept, floor = settings.retention_days, settings.min_retention_days
    if kept >= floor:
        return None
    return (
        f"retention_days ({settings.sources.get('retention_days')}) = {kept} is below min_retention_days "
        f"({settings.sources.get('min_retention_days')}) = {floor}, the floor audit prune keeps without --force; "
        f"raise retention_days to at least {floor} or lower min_retention_days to at most {kept}"
    )


def queue_problem(settings: Settings) -> str | None:
    """What is wrong when ``max_inputs`` is above ``queue_limit``: a text request of more texts than
    the queue holds gets a 400 however empty the queue is.  A warning (an older configuration that
    kept queue_limit 1024 meets the 2,048 inputs OpenAI's clients send), not a refusal."""
    if settings.max_inputs <= settings.queue_limit:
        return None
    return (
        f"max_inputs ({settings.sources.get('max_inputs')}) = {settings.max_inputs} is above queue_limit "
        f"({settings.sources.get('queue_limit')}) = {settings.queue_limit}: a text request of more than "
        f"{settings.queue_limit} texts gets a 400; raise queue_limit to at least {settings.max_inputs} (or lower "
        "max_inputs)"
    )


def setting_warnings(settings: Settings) -> list[str]:
    """Every combination of settings that starts but is worth a warning (serve's log, doctor)."""
    found = (retention_problem(settings), queue_problem(settings), shutdown_problem(settings))
    return [p for p in found if p is not None]


#: the API unit's TimeoutStopSec (appliance/systemd/inferbox-api.service): systemd's SIGKILL after it
UNIT_STOP_TIMEOUT_S = 30.0


def shutdown_problem(settings: Settings) -> str | None:
    """A drain that does nothing (several workers), or a stop longer than the unit waits for."""
    if settings.shutdown_drain_s > 0 and settings.workers > 1:
        return (
            f"shutdown_drain_s = {settings.shutdown_drain_s:g} does nothing with workers = {settings.workers}: "
            "only one worker process drains before a stop"
        )
    longest = settings.shutdown_drain_s + math.ceil(settings.shutdown_timeout_s)
    if longest >= UNIT_STOP_TIMEOUT_S:
        return (
            f"shutdown_drain_s + shutdown_timeout_s = {longest:g} s is not below the unit's TimeoutStopSec "
            f"({UNIT_STOP_TIMEOUT_S:g} s): a slow stop is killed before the audit log's clean-shutdown "
            "checkpoint; lower them, or raise TimeoutStopSec in a drop-in"
        )
    return None


def _shown(value: float) -> str:
    """A number for a message: ``1e+300`` rather than the 301 digits of ``int(1e300)``; an integer past
    what a float holds (400 digits) by its first digits and its length."""
    if abs(value) < 1e15:
        return repr(value)
    try:
        return f"{value:.6g}"
    except OverflowError:
        digits = str(abs(int(value)))
        return f"{'-' if value < 0 else ''}{digits[:6]}... ({len(digits)} digits)"


def _read_toml(path: Path, problems: list[str]) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        problems.append(f"config file {path}: cannot read it: {exc.strerror}")
        return {}
    except UnicodeDecodeError as exc:
        problems.append(f"config file {path}: not UTF-8 text (byte {exc.start}); save it as UTF-8")
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: not valid TOML: {exc}")
        return {}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for k, v in value.items():
                f = _BY_NAME.get(k)
                if f is None:
                    problems.append(f"config file {path}: unknown key [{key}] {k}{_did_you_mean(k)}")
                elif f.section != key:
                    problems.append(f"config file {path}: {k} belongs in [{f.section}], not [{key}]")
                else:
                    flat[k] = v
        elif key in _BY_NAME:
            flat[key] = value
        else:
            problems.append(f"config file {path}: unknown key {key}{_did_you_mean(key)}")
    return flat


#: INFERBOX_ variables that are not settings: the config file's path, and the API key a client
#: command (``inferbox bench --url``) sends
#: set by ``serve --workers N`` for its workers: where each writes its metrics (:mod:`api.metrics_share`)
METRICS_DIR_ENV = "INFERBOX_METRICS_DIR"
NOT_SETTINGS_ENV = frozenset({"INFERBOX_CONFIG", "INFERBOX_API_KEY", METRICS_DIR_ENV})


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    """Build the settings. ``overrides`` are CLI flags (None values are ignored)."""
    env = dict(os.environ if environ is None else environ)
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    problems: list[str] = []
    for k in cli:
        if k not in _BY_NAME:
            problems.append(f"unknown setting {k!r}{_did_you_mean(k)}")

    env_values: dict[str, str] = {}
    known_env = {"INFERBOX_" + f.name.upper() for f in FIELDS} | NOT_SETTINGS_ENV
    for key, value in env.items():
        if key.startswith("INFERBOX_"):
            if key not in known_env:
                guess = _did_you_mean(key.removeprefix("INFERBOX_").lower(), prefix="INFERBOX_")
                problems.append(f"environment variable {key} is not an inferbox setting{guess}")
            elif key not in NOT_SETTINGS_ENV:
                env_values[key.removeprefix("INFERBOX_").lower()] = value

    # home decides where the default config file is; resolve it first.
    home_raw = cli.get("home", env_values.get("home"))
    # absolute from here: a job stores its folders, a backup its home, and a relative one named another
    # folder for a command run elsewhere (outputs written under the wrong folder, jobs failed for good)
    home = Path(os.path.abspath(Path(home_raw).expanduser() if home_raw else default_home(env)))
    if config_file is None:
        explicit = env.get("INFERBOX_CONFIG")
        if explicit:
            config_file = Path(explicit)
        elif (home / "inferbox.toml").is_file():
            config_file = home / "inferbox.toml"
    file_values = _read_toml(config_file, problems) if config_file is not None else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in FIELDS:
        raw, src = f.default, "default"
        if f.name in file_values:
            raw, src = file_values[f.name], f"file {config_file}"
        if f.name in env_values:
            raw, src = env_values[f.name], f"env INFERBOX_{f.name.upper()}"
        if f.name in cli:
            raw, src = cli[f.name], "cli"
        values[f.name] = None if raw is None else _coerce(f, raw, src, problems)
        sources[f.name] = src

    _check_backend(values, sources, problems)
    _check_proxies(values, sources, problems)
    _check_queue_delay(values, sources, problems)
    if problems:
        raise ConfigError(problems)
    # a relative path: in the config file, from the home (the home itself: from the file's folder);
    # in a flag or a variable, from the folder the command runs in
    in_file = {f.name for f in FIELDS if sources[f.name].startswith("file ")}
    if values["home"] is not None and not values["home"].is_absolute():
        base = config_file.parent if "home" in in_file and config_file is not None else Path.cwd()
        values["home"] = Path(os.path.normpath(base.absolute() / values["home"]))
    home = values["home"] or home
    for f in FIELDS:
        path = values[f.name]
        if f.type is Path and path is not None and not path.is_absolute():
            values[f.name] = Path(os.path.normpath((home if f.name in in_file else Path.cwd()) / path))
    values["home"] = values["home"] or home
    values["repository"] = values["repository"] or values["home"] / "models"
    values["signing_key"] = values["signing_key"] or values["home"] / "keys" / "signing.key"
    return Settings(**values, sources=sources, config_file=config_file)

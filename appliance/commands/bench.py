"""``inferbox bench MODEL``: time every admissible candidate of a package on this box.

A thin shell over the in-process part of the benchmark suite, for every
(backend, variant, exec precision) the ranking admits here:

- a text model (:func:`bench.inprocess.run`): batch-1 latency, batch 32 x 128
  tokens (the model's maximum length if shorter) and mixed-corpus throughput,
  and the fraction of the CPU's peak; ``--with-pytorch`` adds the PyTorch fp32 /
  bf16 baselines (needs the ``export`` extra);
- a tensor or image model (:func:`bench.tensors.run`): batch-1 latency and
  rows/s in calls of 32 on the package's own sample inputs, agreement with the
  plain fp32 candidate, and the fraction of the CPU's peak.

With ``--url`` it times nothing in this process: it loads a running server
(:mod:`bench.remote`) at each ``--concurrency`` level (a closed loop) or each
``--rate`` (an open loop: latency at a given load), with the key from
``--key-file`` or ``INFERBOX_API_KEY`` (never from the command line, where
``ps`` would show it), and fails when any request failed.  ``--p99-ms`` is a
latency target: each ``--rate`` must meet it, or, without ``--rate``, the
command searches each endpoint's capacity at it (:mod:`bench.capacity`) and
fails only when no rate met it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from appliance.commands.options import build_settings, state_options

__all__ = ["bench"]


def _import_bench() -> None:
    """Make ``bench`` importable: installed, or beside ``appliance`` in a source tree.

    An editable install made before ``bench`` joined the packages does not map
    it; the source tree next to this package still has it.
    """
    import importlib.util

    if importlib.util.find_spec("bench") is not None:
        return
    root = Path(__file__).resolve().parents[2]
    if (root / "bench" / "__init__.py").is_file():
        sys.path.append(str(root))
        return
    raise click.ClickException(
        "the benchmark suite (package `bench`) is not installed; reinstall inferbox (`pip install -e .` "
        "from the source tree) so that it is included"
    )


def _finite(_ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """A number option's value, or a usage error for nan or infinity (which a range lets through)."""
    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value!r}: give a finite number", param=param)
    return value


@click.command()
@click.argument("model")
@state_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (progress goes to stderr).")
@click.option(
    "--quick",
    is_flag=True,
    help="Few runs and a small corpus: a check, not a measurement (10-15 s a candidate on 2 cores; "
    "with --url, 2 s per endpoint and level).",
)
@click.option("--with-pytorch", is_flag=True, help="Also measure the PyTorch baselines (needs torch installed).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also keep inprocess.json (and a PNG chart) in this folder (remote.json with --url).",
)
@click.option(
    "--url",
    default=None,
    help="Load the running server at this URL (http[s]://host:port) instead of timing in this process.",
)
@click.option(
    "--key-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="With --url: a file holding the API key (scope infer) [env INFERBOX_API_KEY].",
)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="With an https --url: the CA certificate(s) that signed the server's certificate.",
)
@click.option(
    "--client-cert",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="With an https --url: a client certificate (PEM) for mutual TLS.",
)
@click.option(
    "--client-key",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    default=None,
    help="The private key of --client-cert, when it is not in the same file.",
)
@click.option(
    "--concurrency",
    default=None,
    help="With --url: the closed-loop client counts to measure, comma-separated [default 1,8,32].",
)
@click.option(
    "--rate",
    default=None,
    help="With --url, instead of --concurrency: open-loop loads to measure in requests/s, comma-separated "
    "(e.g. 50,100,200): latency at a given load, counted from when each request was due.",
)
@click.option(
    "--p99-ms",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    callback=_finite,
    help="With --url: a latency target in ms. With --rate, each rate must meet it (else exit 1); without, "
    "search each endpoint's capacity: the highest open-loop rate whose p99 stays within it.",
)
@click.option(
    "--max-rate",
    type=click.FloatRange(min=1, max=100_000),
    default=None,
    callback=_finite,
    help="With --p99-ms and no --rate: the highest rate the search may offer, requests/s [default 10000].",
)
@click.option(
    "--endpoint",
    type=click.Choice(["v1", "v2"]),
    default=None,
    help="With --url: load only /v1/embeddings (v1) or /v2/models/MODEL/infer (v2) [default: each the model has].",
)
@click.option(
    "--duration",
    type=click.IntRange(min=1, max=3600),
    default=None,
    help="With --url: whole seconds per endpoint and level [default 10; 2 with --quick].",
)
@click.option(
    "--texts",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="With --url on a text model: a UTF-8 file of the texts to send, one per line [default: a mixed corpus].",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1, max=65_536),
    default=None,
    help="With --url: texts (a tensor model: rows) in each request, as a client that batches sends them "
    "[default 1]; the server's max_inputs bounds it.",
)
@click.option(
    "--arrivals",
    type=click.Choice(["constant", "poisson"]),
    default=None,
    help="With --rate or --p99-ms: how the open loop's requests arrive, evenly spaced (constant) or at random "
    "as from many independent callers (poisson, the longer tail) [default constant].",
)
def bench(
    model: str,
    home: Path | None,
    repository: Path | None,
    as_json: bool,
    quick: bool,
    with_pytorch: bool,
    out: Path | None,
    url: str | None,
    key_file: Path | None,
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    concurrency: str | None,
    rate: str | None,
    p99_ms: float | None,
    max_rate: float | None,
    endpoint: str | None,
    duration: int | None,
    texts: Path | None,
    batch_size: int | None,
    arrivals: str | None,
) -> None:
    """Time every admissible (backend, variant, precision) of MODEL here and print the table;
    with --url, load a running server instead: requests/s and latency per concurrency level,
    latency at a given load with --rate, or the highest load that keeps a p99 target (--p99-ms)."""
    _import_bench()
    remote_only = {
        "--key-file": key_file,
        "--ca-file": ca_file,
        "--client-cert": client_cert,
        "--client-key": client_key,
        "--concurrency": concurrency,
        "--rate": rate,
        "--p99-ms": p99_ms,
        "--max-rate": max_rate,
        "--endpoint": endpoint,
        "--duration": duration,
        "--texts": texts,
        "--batch-size": batch_size,
        "--arrivals": arrivals,
    }
    if url is None:
        given = [name for name, value in remote_only.items() if value is not None]
        if given:
            raise click.UsageError(f"{', '.join(given)} goes with --url (a running server to load)")
    else:
        if with_pytorch:
            raise click.UsageError("--with-pytorch times PyTorch in this process; it does not go with --url")
        if home is not None or repository is not None:
            raise click.UsageError("--home / --repository pick a local package; --url loads a server: leave them out")
        _bench_remote(
            model,
            url,
            key_file,
            ca_file,
            client_cert,
            client_key,
            concurrency,
            rate,
            p99_ms,
            max_rate,
            endpoint,
            duration,
            texts,
            batch_size,
            arrivals,
            quick,
            out,
            as_json,
        )
        return
    from bench.common import Config
    from bench.inprocess import run
    from runtime.repository import Repository
    from runtime.signing import load_public_key

    settings = build_settings(home=home, repository=repository)
    public_key = load_public_key(settings.public_key) if settings.public_key is not None else None
    package = Repository(settings.repository, public_key=public_key).open(model)

    def echo(line: str) -> None:
        click.echo(line, err=as_json)

    with tempfile.TemporaryDirectory(prefix="inferbox-bench-") as tmp:
        cfg = Config(out=out or Path(tmp), quick=quick, model=model, home=settings.home, repository=settings.repository)
        if package.manifest.text is not None:
            result = run(cfg, baselines=with_pytorch, package=package, echo=echo)
        else:
            from bench import tensors

            if with_pytorch:
                echo(f"  no PyTorch baseline for {model}: it is a {package.manifest.task} model")
            result = tensors.run(cfg, package=package, echo=echo)
    if as_json:
        json.dump(result, sys.stdout, indent=2, default=str)
        click.echo()
    _fail_unless_measured(model, result)


def _numbers(text: str, kind: type[float], low: float, high: float, what: str, option: str, example: str) -> list[Any]:
    """Comma-separated numbers of ``kind`` within ``[low, high]``, or a usage error naming ``option``."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not low <= v <= high for v in values):
        raise click.BadParameter(
            f"{text!r}: give {what} from {low:g} to {high:g}, comma-separated (e.g. {example})", param_hint=option
        )
    return values


def _api_key(key_file: Path | None) -> str | None:
    """The key from ``key_file``, else ``INFERBOX_API_KEY``, else None (a server without auth);
    either must be one key (:func:`bench.remote.check_key`)."""
    from bench.remote import check_key

    if key_file is None:
        key = os.environ.get("INFERBOX_API_KEY", "").strip()
        return check_key(key, "INFERBOX_API_KEY") if key else None
    try:
        key = key_file.read_text(encoding="utf-8-sig").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(
            f"cannot read {key_file}: {getattr(exc, 'strerror', None) or exc}", param_hint="--key-file"
        ) from None
    return check_key(key, f"--key-file {key_file}")


def _base_url(url: str) -> str:
    """``url`` as the base the routes are added to, or a usage error: http(s), a host, a port
    that is a number, and nothing else (no path, whose routes wrk would not follow, no user or
    password, which would be echoed and reach wrk's command line)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        _ = parts.port  # a port that is not a number raises ValueError
        (parts.hostname or "").encode("idna")  # nor can a name that has no DNS form be reached
    except (ValueError, UnicodeError):
        parts = None
    if (
        parts is None
        or parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise click.BadParameter(
            f"{url!r}: give the server's base URL, http://host:port or https://host:port, with no path, "
            "user or password",
            param_hint="--url",
        )
    return f"{parts.scheme}://{parts.netloc}"


def _bench_remote(
    model: str,
    url: str,
    key_file: Path | None,
    ca_file: Path | None,
    client_cert: Path | None,
    client_key: Path | None,
    concurrency: str | None,
    rate: str | None,
    p99_ms: float | None,
    max_rate: float | None,
    endpoint: str | None,
    duration: int | None,
    texts: Path | None,
    batch_size: int | None,
    arrivals: str | None,
    quick: bool,
    out: Path | None,
    as_json: bool,
) -> None:
    from bench.common import Config
    from bench.remote import MAX_RATE, Target, capacity_line, read_texts, run

    base = _base_url(url)
    if base.startswith("http://") and (ca_file or client_cert or client_key):
        raise click.UsageError("--ca-file / --client-cert / --client-key need an https:// --url")
    if client_key is not None and client_cert is None:
        raise click.UsageError("--client-key goes with --client-cert")
    target = Target(base, model, _api_key(key_file), ca_file, client_cert, client_key)
    if concurrency is not None and rate is not None:
        raise click.UsageError("--concurrency (a closed loop) and --rate (an open loop) are two ways; give one")
    if p99_ms is not None and concurrency is not None:
        raise click.UsageError(
            "--p99-ms is judged on the open loop (latency from when each request was due): give --rate, "
            "or leave both out to search the capacity"
        )
    if arrivals is not None and rate is None and p99_ms is None:
        raise click.UsageError(
            "--arrivals shapes the open loop: give --rate, or --p99-ms to search the capacity "
            "(a closed loop's clients send when answered)"
        )
    if max_rate is not None and (p99_ms is None or rate is not None):
        raise click.UsageError("--max-rate bounds the capacity search: it goes with --p99-ms and without --rate")
    clients = concurrency if concurrency is not None else "1,8,32"
    levels = _numbers(clients, int, 1, 1024, "client counts", "--concurrency", "1,8,32")
    rates = _numbers(rate, float, 0.1, 100_000, "requests per second", "--rate", "50,100,200") if rate else None

    def echo(line: str) -> None:
        click.echo(line, err=as_json)

    with tempfile.TemporaryDirectory(prefix="inferbox-bench-") as tmp:
        cfg = Config(out=out or Path(tmp), quick=quick, model=model)
        sent = read_texts(texts) if texts else None
        result = run(
            cfg,
            target,
            levels=levels,
            rates=rates,
            p99_ms=p99_ms,
            max_rate=max_rate if max_rate is not None else MAX_RATE,
            duration_s=duration,
            texts=sent,
            endpoint=endpoint,
            per_request=batch_size,
            arrivals=arrivals or "constant",
            echo=echo,
        )
    if as_json:
        json.dump(result, sys.stdout, indent=2, default=str)
        click.echo()
    else:
        click.echo(result["table"])
        if "capacity" in result:
            click.echo(result["capacity_table"])
            for found in result["capacity"]:
                click.echo(f"{found['endpoint']}: {capacity_line(found)}")
        if "metrics" in result:
            click.echo(f"server figures: {result['metrics']}")
    if "capacity" in result:
        _fail_unless_found(result)
    else:
        _fail_unless_loaded(result)


def _fail_unless_found(result: dict[str, Any]) -> None:
    """Exit 1 when on some endpoint no rate met the p99 target, or requests failed when the rate
    found ran again (the windows that missed it under load, with their errors, are the search's
    findings, not a failure)."""
    from bench.remote import capacity_line

    lost = [
        f"{f['endpoint']}: {capacity_line(f)}"
        for f in result["capacity"]
        if f["rate"] is None or f.get("confirm_failed")
    ]
    if lost:
        raise click.ClickException("; ".join(lost))


def _fail_unless_loaded(result: dict[str, Any]) -> None:
    """Exit 1 when a level got no answer or any request failed, naming where and the first error,
    or (given ``--p99-ms``) a level missed the target."""
    from bench.remote import level_name

    bad = []
    for row in result["rows"]:
        where = level_name(row)
        if "skipped" in row:
            bad.append(f"{where}: {row['skipped']}")
        elif row.get("errors"):
            first = f" (first: {row['first_error']})" if row.get("first_error") else ""
            bad.append(f"{where}: {sum(row['errors'].values())} failed requests {row['errors']}{first}")
    missed = [f"{level_name(row)}: {row['missed']}" for row in result["rows"] if "missed" in row]
    if missed:  # every level judged against the p99 target: a failed request is a miss too
        error = next((str(row["first_error"]) for row in result["rows"] if row.get("first_error")), None)
        raise click.ClickException(
            f"the p99 target of {result['p99_target_ms']:g} ms was missed: "
            + "; ".join(missed)
            + (f" (first error: {error})" if error else "")
        )
    if bad:
        raise click.ClickException("requests failed under load: " + "; ".join(bad))


def _fail_unless_measured(model: str, result: dict[str, object]) -> None:
    """A run in which no candidate of the package was measured is a failure (exit 1 naming the
    reasons), not an empty table."""
    if "skipped" in result:
        raise click.ClickException(str(result["skipped"]))
    rows = result.get("rows")
    rows = rows if isinstance(rows, list) else []
    if any("skipped" not in r and r.get("kind") == "candidate" for r in rows):
        return
    reasons = "; ".join(f"{r.get('runner')}: {r['skipped']}" for r in rows if "skipped" in r)
    raise click.ClickException(
        f"no candidate of {model} could be measured here ({reasons or 'the ranking admitted none'}); "
        "`inferbox doctor` shows what each backend needs"
    )

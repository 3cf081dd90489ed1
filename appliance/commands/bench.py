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
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

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


@click.command()
@click.argument("model")
@state_options
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON (progress goes to stderr).")
@click.option("--quick", is_flag=True, help="Few runs and a small corpus: a check in seconds, not a measurement.")
@click.option("--with-pytorch", is_flag=True, help="Also measure the PyTorch baselines (needs torch installed).")
@click.option(
    "--out",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Also keep inprocess.json (and a PNG chart) in this folder.",
)
def bench(
    model: str,
    home: Path | None,
    repository: Path | None,
    as_json: bool,
    quick: bool,
    with_pytorch: bool,
    out: Path | None,
) -> None:
    """Time every admissible (backend, variant, precision) of MODEL here and print the table."""
    _import_bench()
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

"""A new version of a model name with another interface than its newest (task, tensors, embedding dimension,
labels) is refused by ``inferbox export`` and ``inferbox models import`` unless ``--new-interface`` says it is
meant: the server serves the newest version, and its clients broke silently at the next load (a text
embedding model exported over by a tensor model: ``/v1/embeddings`` answered 404)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import Result

from runtime.package import read_package
from tests.runtime.conftest import build_mlp, publish_embedder, publish_mlp

from .conftest import run_cli as run

pytestmark = pytest.mark.usefixtures("clean_env")

EXPORT = ("--timing", "quick", "--variants", "onnx-fp32")


def _versions(home: Path, name: str) -> list[str]:
    folder = home / "models" / name
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def _refused(result: Result, *changes: str) -> str:
    assert result.exit_code == 2, result.output
    error = result.output
    assert "error: " in error and "Traceback" not in error, error
    assert "--new-interface" in error, error
    for change in changes:
        assert change in error, error
    return error


def _import(home: Path, source: Path, *args: str) -> Result:
    return run(home, "models", "import", str(source), "--allow-unsigned", *args)


def test_an_import_that_changes_the_embedding_dimension_or_the_task_is_refused_unless_meant(tmp_path: Path) -> None:
    build, serving = tmp_path / "build" / "models", tmp_path / "serving"
    serving.mkdir(parents=True)
    assert run(serving, "signing-key", "create").exit_code == 0
    publish_embedder(build, "tinybert", version=1, dim=8)
    publish_embedder(build, "tinybert", version=2, dim=8)
    publish_embedder(build, "tinybert", version=3, dim=16)
    publish_mlp(build, ["ort-cpu"], "mlp", version=4)
    for version in (1, 2):  # the same interface: taken as before
        assert _import(serving, build / "tinybert" / str(version)).exit_code == 0
    refused = _refused(_import(serving, build / "tinybert" / "3"), "embedding dimension 8 -> 16", "from version 2")
    assert "version 3 of tinybert" in refused
    assert _versions(serving, "tinybert") == ["1", "2"]
    assert not any((serving / "models" / ".staging").iterdir())

    # a tensor model's package put where tinybert's would go (as `models pack` names it: tinybert/4)
    tensor = tmp_path / "tensor"
    publish_mlp(tensor, ["ort-cpu"], "tinybert", version=4)
    _refused(_import(serving, tensor / "tinybert" / "4"), "task feature-extraction -> tensor", "outputs ")

    meant = _import(serving, build / "tinybert" / "3", "--new-interface")
    assert meant.exit_code == 0, meant.output
    assert _versions(serving, "tinybert") == ["1", "2", "3"]


def test_an_export_over_another_task_is_refused_before_any_work(tmp_path: Path) -> None:
    """The review's case: `inferbox export model.onnx --task tensor --name tinybert` where tinybert is a text
    embedding model made version 3 a tensor model; the next load broke /v1/embeddings."""
    home = tmp_path / "home"
    publish_embedder(home / "models", "tinybert", version=1)
    publish_embedder(home / "models", "tinybert", version=2)
    source = build_mlp(tmp_path / "model.onnx")
    args = ("export", str(source), "--task", "tensor", "--name", "tinybert", *EXPORT)
    refused = run(home, *args)
    error = _refused(refused, "task feature-extraction -> tensor", "from version 2", "another --name")
    assert "this export of tinybert" in error
    assert "[source]" not in refused.output  # refused before the source was read
    assert _versions(home, "tinybert") == ["1", "2"]

    meant = run(home, *args, "--new-interface")
    assert meant.exit_code == 0, meant.output
    assert read_package(home / "models" / "tinybert" / "3").manifest.task == "tensor"


def test_an_export_that_changes_the_outputs_is_refused_once_the_source_is_read(tmp_path: Path) -> None:
    home = tmp_path / "home"
    publish_mlp(home / "models", ["ort-cpu"], "mlp", version=1)  # x [-1, 8] -> hidden [-1, 16], logits [-1, 4]
    same = build_mlp(tmp_path / "same.onnx", seed=5)  # other weights, the same tensors: a new version as before
    done = run(home, "export", str(same), "--task", "tensor", "--name", "mlp", *EXPORT)
    assert done.exit_code == 0, done.output
    wider = build_mlp(tmp_path / "wider.onnx", out=6)
    refused = run(home, "export", str(wider), "--task", "tensor", "--name", "mlp", *EXPORT)
    error = _refused(
        refused,
        "outputs hidden float32 [-1, 16], logits float32 [-1, 4] -> hidden float32 [-1, 16], logits float32 [-1, 6]",
        "from version 2",
    )
    assert "inputs" not in error.split(": ", 2)[-1].split(". The server")[0]  # only what changed is named
    assert "fp32 ONNX written" not in refused.output  # before the variants were built and timed
    assert _versions(home, "mlp") == ["1", "2"]
    assert not any((home / "models" / ".staging").iterdir())


def test_a_version_with_another_interface_landing_during_an_export_stops_it(tmp_path: Path) -> None:
    """The check is made again under the model's lock as the package is published: an import of another
    interface that landed while this export ran (minutes) makes this one the change."""
    from export.pipeline import export_model
    from export.spec import ExportSpec
    from runtime.errors import ExportError

    repository = tmp_path / "models"
    publish_mlp(repository, ["ort-cpu"], "mlp", version=1)

    def meanwhile(staging: Path) -> None:
        publish_embedder(repository, "mlp", version=2)

    spec = ExportSpec(
        source=build_mlp(tmp_path / "model.onnx", seed=3),
        task="tensor",
        name="mlp",
        repository=repository,
        timing="quick",
        variants=("onnx-fp32",),
        before_finalize=meanwhile,
    )
    with pytest.raises(ExportError, match="from version 2: task feature-extraction -> tensor"):
        export_model(spec)
    assert _versions(tmp_path, "mlp") == ["1", "2"]
    assert not any((repository / ".staging").iterdir())


def test_an_older_version_imported_again_is_not_held_to_the_newest(tmp_path: Path) -> None:
    """Importing version 1 beside a newer version 3 of another interface was refused, though version 1 never
    becomes what the name serves (the check's reason)."""
    build, serving = tmp_path / "build" / "models", tmp_path / "serving"
    serving.mkdir(parents=True)
    assert run(serving, "signing-key", "create").exit_code == 0
    publish_embedder(build, "tinybert", version=1, dim=8)
    publish_embedder(build, "tinybert", version=3, dim=16)
    assert _import(serving, build / "tinybert" / "3").exit_code == 0
    older = _import(serving, build / "tinybert" / "1")
    assert older.exit_code == 0, older.output
    assert _versions(serving, "tinybert") == ["1", "3"]

"""``inferbox export`` end to end on a tiny ONNX model: report, JSON, gates, signing, bad sources."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgspec
import pytest
from click.testing import CliRunner, Result

from appliance.cli import main
from runtime.package import read_package
from runtime.signing import generate_private_key, load_public_key, public_key_pem, write_private_key


def export_args(source: Path) -> tuple[str, ...]:
    """``inferbox export`` of a tiny ONNX file as package mlp, one variant, quick timing."""
    return ("export", str(source), "--task", "tensor", "--name", "mlp", "--timing", "quick", "--variants", "onnx-fp32")


def _invoke(home: Path, *args: str) -> Result:
    env = {k: None for k in os.environ if k.startswith("INFERBOX_")}
    return CliRunner().invoke(main, [*args, "--home", str(home)], env=env, prog_name="inferbox")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path) -> tuple[Path, Result]:
    home = tmp_path_factory.mktemp("cli-home")
    result = _invoke(home, "export", str(tiny_onnx), "--task", "tensor", "--name", "mlp", "--timing", "quick", "--json")
    return home, result


def test_export_json_report_and_package(exported: tuple[Path, Result]) -> None:
    home, result = exported
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["name"] == "mlp" and report["version"] == 1 and report["task"] == "tensor"
    ids = [v["id"] for v in report["variants"]]
    assert ids[:2] == ["onnx-fp32", "onnx-opt"] and "ov-fp32" in ids
    for v in report["variants"]:
        assert any(a["passed"] for a in v["accuracy"])
        assert v["timings"], v["id"]
        assert all(a["reference"] == "onnx-fp32" for a in v["accuracy"])
    assert {a["variant"] for a in report["attempts"]} >= {"onnx-int8", "ov-int8"}
    assert "[source]" in result.stderr and "[package]" in result.stderr  # progress on stderr
    pkg = read_package(home / "models" / "mlp" / "1")
    assert pkg.manifest.samples == "samples/samples.npz"
    assert pkg.manifest.provenance.source_kind == "onnx"
    assert pkg.manifest.provenance.tool_versions["onnxruntime"] not in ("", "not installed")
    assert pkg.signed_by is None and not (pkg.path / "manifest.sig").exists()
    # where it went, its identity and its signer (none): the report said nothing of either
    assert report["package"] == {"path": str(pkg.path), "sha256": pkg.sha256, "signed_by": None}


def test_export_table_and_gate_override(exported: tuple[Path, Result], tiny_onnx: Path) -> None:
    home, _ = exported
    result = _invoke(
        home,
        "export",
        str(tiny_onnx),
        "--task",
        "tensor",
        "--name",
        "mlp",
        "--timing",
        "quick",
        "--variants",
        "onnx-fp32,onnx-int8",
        "--gate",
        "max_max_rel_diff=1e-9",
    )
    assert result.exit_code == 0, result.output
    assert "variants (timings on this box):" in result.stdout
    pkg = read_package(home / "models" / "mlp" / "2")
    assert f"identity:  sha256 {pkg.sha256}" in result.stdout and "signed by: UNSIGNED" in result.stdout
    assert [v.id for v in pkg.manifest.variants] == ["onnx-fp32"]  # no INT8 recipe can meet a 1e-9 gate
    int8 = [a for a in pkg.manifest.attempts if a.variant == "onnx-int8"]
    assert int8 and not any(a.kept for a in int8)
    assert all(a.accuracy[0].gate["max_max_rel_diff"] == 1e-9 for a in int8 if a.accuracy)
    assert "onnx-int8" in result.stdout and "dropped" in result.stdout
    # the optimized copy INT8 is made from passed, but was not asked for: the report says why it was dropped
    (opt,) = [a for a in pkg.manifest.attempts if a.variant == "onnx-opt"]
    assert not opt.kept and "not kept: --variants did not ask for it" in opt.reason
    assert "batch_rel_diff=" in result.stdout  # a gate on every task is shown with the others


def test_sign_requires_key_and_signs(tmp_path: Path, tiny_onnx: Path) -> None:
    result = _invoke(
        tmp_path,
        "export",
        str(tiny_onnx),
        "--task",
        "tensor",
        "--name",
        "m",
        "--sign",
        "--variants",
        "onnx-fp32",
        "--timing",
        "quick",
    )
    assert result.exit_code != 0
    assert "inferbox signing-key create" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "models" / "m").exists()
    key = generate_private_key()
    write_private_key(key, tmp_path / "keys" / "signing.key")
    result = _invoke(
        tmp_path,
        "export",
        str(tiny_onnx),
        "--task",
        "tensor",
        "--name",
        "m",
        "--variants",
        "onnx-fp32",
        "--timing",
        "quick",
    )  # key exists: signed by default
    assert result.exit_code == 0, result.output
    pkg = read_package(tmp_path / "models" / "m" / "1", public_key=load_public_key(public_key_pem(key)))
    assert pkg.signed_by is not None and f"signed by: key {pkg.signed_by}" in result.stdout
    result = _invoke(
        tmp_path,
        "export",
        str(tiny_onnx),
        "--task",
        "tensor",
        "--name",
        "m",
        "--no-sign",
        "--variants",
        "onnx-fp32",
        "--timing",
        "quick",
    )
    assert result.exit_code == 0 and not (tmp_path / "models" / "m" / "2" / "manifest.sig").exists()


@pytest.mark.parametrize(
    ("make_source", "task", "expected"),
    [
        (lambda d: d / "missing.onnx", "tensor", "does not exist"),
        (lambda d: _write(d / "garbage.onnx", b"this is not a protobuf"), "tensor", "not a readable ONNX model"),
        (lambda d: d / "model.onnx", "feature-extraction", "task 'tensor'"),
        (lambda d: _write(d / "notes.txt", b"x"), "tensor", "neither a model folder nor an .onnx file"),
        (lambda d: _write(d / "model.pt", b"x"), "tensor", "a PyTorch checkpoint or module file is given as FILE.py:"),
        (lambda d: _write(d / "net.py", b"x"), "tensor", "FACTORY, a function that builds the module, loads"),
        (lambda d: d, "feature-extraction", "no config.json"),
    ],
)
def test_bad_sources_name_the_problem(tmp_path: Path, tiny_onnx: Path, make_source, task: str, expected: str) -> None:
    (tmp_path / "model.onnx").write_bytes(tiny_onnx.read_bytes())
    result = _invoke(tmp_path / "home", "export", str(make_source(tmp_path)), "--task", task, "--name", "bad")
    assert result.exit_code != 0
    assert expected in result.output, result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "home" / "models" / "bad").exists()
    staging = tmp_path / "home" / "models" / ".staging"
    assert not staging.exists() or not any(staging.iterdir())


def test_calibration_file_with_bad_rows(tmp_path: Path, tiny_onnx: Path) -> None:
    cal = tmp_path / "cal.jsonl"
    cal.write_text('{"x": [' + ",".join(["0.5"] * 16) + ']}\n{"x": "oops"}\n', encoding="utf-8")
    result = _invoke(
        tmp_path / "home", "export", str(tiny_onnx), "--task", "tensor", "--name", "bad", "--calibration", str(cal)
    )
    assert result.exit_code != 0
    assert "row 2" in result.output and str(cal) in result.output and "Traceback" not in result.output


def test_bad_gate_and_variants(tmp_path: Path, tiny_onnx: Path) -> None:
    r = _invoke(tmp_path, "export", str(tiny_onnx), "--task", "tensor", "--name", "m", "--gate", "cosine=1")
    assert r.exit_code != 0 and "KEY=VALUE" in r.output
    r = _invoke(tmp_path, "export", str(tiny_onnx), "--task", "tensor", "--name", "m", "--variants", "tflite")
    assert r.exit_code != 0 and "unknown variants" in r.output


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_export_from_module_factory(tmp_path: Path) -> None:
    src = tmp_path / "net.py"
    src.write_text(
        "import numpy as np\nimport torch\n\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))\n"
        "    return net, {'features': np.zeros((1, 6), dtype=np.float32)}\n",
        encoding="utf-8",
    )
    result = _invoke(
        tmp_path / "home",
        "export",
        f"{src}:build",
        "--task",
        "tensor",
        "--name",
        "net",
        "--variants",
        "onnx-fp32,ov-fp32",
        "--timing",
        "quick",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["provenance"]["source_kind"] == "pytorch"
    # the file and factory, not only the class every Sequential shares
    assert report["provenance"]["source"] == f"{src.resolve()}:build (torch.nn.modules.container.Sequential)"
    assert f"preparing tensor model from {src.resolve()}:build" in result.stderr
    assert [v["id"] for v in report["variants"]] == ["onnx-fp32", "ov-fp32"]
    assert all(a["reference"] == "pytorch" for v in report["variants"] for a in v["accuracy"])
    bad = _invoke(tmp_path / "home", "export", f"{src}:nope", "--task", "tensor", "--name", "net")
    assert bad.exit_code != 0 and "no callable 'nope'" in bad.output
    # inputs as a tuple (as torch.onnx.export takes them): the message says what the dict must hold
    src.write_text(src.read_text().replace("{'features': np.zeros((1, 6), dtype=np.float32)}", "(torch.zeros(1, 6),)"))
    bad = _invoke(tmp_path / "home", "export", f"{src}:build", "--task", "tensor", "--name", "net2")
    assert bad.exit_code != 0 and "a dict of input name -> tensor or array" in bad.output, bad.output
    assert "it gave a tuple" in bad.output, bad.output


def test_text_report_lists_requirements(exported: tuple[Path, Result]) -> None:
    from export.report import format_report

    home, _ = exported
    manifest = read_package(home / "models" / "mlp" / "1").manifest
    assert ("requirements (" in format_report(manifest)) is any(v.requires for v in manifest.variants)
    first, *rest = manifest.variants
    needy = msgspec.structs.replace(manifest, variants=[msgspec.structs.replace(first, requires=["cpu-vnni"]), *rest])
    text = format_report(needy)
    assert "requirements (selection refuses these variants on a box without them):" in text
    assert f"  {first.id:<10} requires cpu-vnni" in text


def test_an_export_on_a_box_with_an_audit_log_is_recorded_or_taken_out(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.audit.log import AuditLog
    from appliance.settings import load_settings

    home = tmp_path / "box"
    assert _invoke(home, "signing-key", "create").exit_code == 0
    assert _invoke(home, "keys", "create", "--scope", "infer").exit_code == 0  # the box keeps a log
    args = export_args(tiny_onnx)
    result = _invoke(home, *args)
    assert result.exit_code == 0, result.output
    package = read_package(home / "models" / "mlp" / "1")
    with AuditLog.open(load_settings({"home": home})) as log:
        (rec,) = [r for r in log.tail(50) if r.event == "model_export"]
    assert (rec.model_name, rec.model_version, rec.model_sha256) == ("mlp", "1", package.sha256)
    assert rec.details["source_sha256"] == package.manifest.provenance.source_sha256
    assert rec.details["variants"] == "onnx-fp32"

    # a package the log cannot record is taken out again
    from runtime.errors import AuditError

    def broken(*a: object, **k: object) -> None:
        raise AuditError("the audit log cannot be written (test)")

    monkeypatch.setattr(AuditLog, "append", broken)
    failed = _invoke(home, *args)
    assert failed.exit_code == 2 and "cannot be written" in failed.output
    assert not (home / "models" / "mlp" / "2").exists()


def test_an_export_on_a_build_box_without_a_log_makes_none(tmp_path: Path, tiny_onnx: Path) -> None:
    home = tmp_path / "build"
    args = export_args(tiny_onnx)
    assert _invoke(home, *args).exit_code == 0
    assert not (home / "audit.db").exists()


def test_a_failure_after_the_export_record_is_committed_leaves_the_package(
    tmp_path: Path, tiny_onnx: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The record is in the log: taking the package out then would make the log say what is not so."""
    import sqlite3

    from appliance.audit.log import AuditLog
    from appliance.settings import load_settings

    home = tmp_path / "box"
    assert _invoke(home, "signing-key", "create").exit_code == 0
    assert _invoke(home, "keys", "create", "--scope", "infer").exit_code == 0
    real_close = AuditLog.close

    def close_fails(self: AuditLog) -> None:
        real_close(self)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(AuditLog, "close", close_fails)
    args = export_args(tiny_onnx)
    result = _invoke(home, *args)
    assert result.exit_code == 2
    monkeypatch.setattr(AuditLog, "close", real_close)
    assert (home / "models" / "mlp" / "1").is_dir()
    with AuditLog.open(load_settings({"home": home})) as log:
        assert [r.event for r in log.tail(10)].count("model_export") == 1


def test_a_first_start_with_an_unwritable_audit_log_builds_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import multiprocessing

    from appliance.server import prepare
    from appliance.settings import load_settings
    from runtime.errors import ConfigError

    home = tmp_path / "new"
    home.mkdir()
    (home / "audit.db").write_bytes(b"not a database at all" * 100)

    def no_build(*a: object, **k: object) -> None:
        raise AssertionError("the default model was built although its record could not be written")

    monkeypatch.setattr(multiprocessing, "get_context", no_build)
    with pytest.raises(ConfigError, match="cannot be opened"):
        prepare(load_settings({"home": home}))

"""``inferbox models list | pack | import | remove`` between two real homes: a build box and a serving box."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import Result

from appliance.audit.log import AuditLog
from appliance.models import importing
from appliance.settings import load_settings
from runtime.package import MANIFEST, SIGNATURE, finalize_package, read_package, staging_dir
from runtime.repository import Repository
from runtime.signing import key_id, load_private_key, load_public_key, verify
from tests.runtime.conftest import build_mlp, publish_mlp

from .conftest import run_cli as run

pytestmark = pytest.mark.usefixtures("clean_env")


def import_build(boxes: dict[str, Path], **env: str) -> Result:
    """``models import`` of the build box's mlp version 1 into the serving box, checked against its publisher key."""
    return run(
        boxes["serving"],
        "models",
        "import",
        str(boxes["build"] / "models/mlp/1"),
        "--publisher-key",
        str(boxes["build_pub"]),
        **env,
    )


def publish(home: Path, *, version: int = 1, name: str = "mlp", sign: bool = True, seed: int = 0) -> Path:
    """A one-variant ONNX tensor package ``<name>/<version>`` in ``home``'s repository, signed with its key."""
    key = load_private_key(home / "keys" / "signing.key") if sign else None
    machine = {"cpu": "Build Box CPU 9000", "cpus": "64"}
    publish_mlp(home / "models", ["ort-cpu"], name, version=version, seed=seed, signing_key=key, machine=machine)
    return home / "models" / name / str(version)


def records(home: Path, event: str) -> list[Any]:
    settings = load_settings({"home": home})
    with AuditLog.open(settings) as log:
        return [r for r in log.tail(1000) if r.event == event]


@pytest.fixture
def boxes(tmp_path: Path) -> dict[str, Path]:
    """Two homes with their own signing keys: ``build`` holds a signed ``mlp/1``, ``serving`` nothing."""
    out = {}
    for name in ("build", "serving"):
        home = tmp_path / name
        home.mkdir()
        assert run(home, "signing-key", "create").exit_code == 0
        out[name] = home
    publish(out["build"])
    out["build_pub"] = out["build"] / "keys" / "signing.key.pub"
    return out


def pack(home: Path, out: Path, *args: str) -> dict[str, Any]:
    result = run(home, "models", "pack", "mlp", "--out", str(out), "--json", *args)
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def no_leftovers(home: Path) -> None:
    staging = home / "models" / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), list(staging.iterdir())


def test_pack_then_import_on_another_box_serves_the_same_package(boxes: dict[str, Path], tmp_path: Path) -> None:
    build, serving = boxes["build"], boxes["serving"]
    packed = pack(build, tmp_path / "mlp-1.tar")
    original = read_package(build / "models" / "mlp" / "1")
    assert packed["package_sha256"] == original.sha256
    assert packed["signed_by"] == key_id(load_public_key(boxes["build_pub"]))  # no public_key set: still named
    assert packed["archive_sha256"] == hashlib.sha256((tmp_path / "mlp-1.tar").read_bytes()).hexdigest()
    # the build box recorded that the weights left it, before the file appeared
    (rec,) = records(build, "model_pack")
    assert (rec.model_name, rec.model_version, rec.model_sha256) == ("mlp", "1", original.sha256)
    assert rec.details["archive_sha256"] == packed["archive_sha256"]

    result = run(
        serving,
        "models",
        "import",
        str(tmp_path / "mlp-1.tar"),
        "--publisher-key",
        str(boxes["build_pub"]),
        "--expect-sha256",
        original.sha256,
    )
    assert result.exit_code == 0, result.output
    assert "imported mlp version 1" in result.output
    assert "not on this box" in result.output  # the timings came from the build box's CPU
    placed = serving / "models" / "mlp" / "1"
    serving_pub = load_public_key(serving / "keys" / "signing.key.pub")
    # the identity is unchanged; this box signed it again, so a server requiring its own key loads it
    package = Repository(serving / "models", public_key=serving_pub).open("mlp")
    assert package.sha256 == original.sha256
    assert (placed / "onnx" / "model.onnx").read_bytes() == (build / "models/mlp/1/onnx/model.onnx").read_bytes()
    # the audit record names the publisher and keeps its signature, which verifies over the manifest
    (rec,) = records(serving, "model_import")
    build_key = load_public_key(boxes["build_pub"])
    assert rec.model_sha256 == original.sha256
    assert rec.details["publisher"] == key_id(build_key)
    assert rec.details["signed_by"] == key_id(serving_pub)
    assert rec.details["archive_sha256"] == packed["archive_sha256"]
    verify(build_key, (placed / MANIFEST).read_bytes(), base64.b64decode(rec.details["publisher_signature"]))
    # and the model really runs from the imported files
    import onnxruntime as ort

    session = ort.InferenceSession(str(placed / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    reference = ort.InferenceSession(str(build / "models/mlp/1/onnx/model.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_array_equal(session.run(None, {"x": x})[1], reference.run(None, {"x": x})[1])
    no_leftovers(serving)

    listed = run(serving, "models", "list", "--verify")
    assert listed.exit_code == 0, listed.output
    assert "mlp" in listed.output and "this box" in listed.output and original.sha256[:16] in listed.output

    # importing it again changes nothing
    again = run(serving, "models", "import", str(tmp_path / "mlp-1.tar"), "--publisher-key", str(boxes["build_pub"]))
    assert again.exit_code == 0, again.output
    assert "already in the repository" in again.output
    assert len(records(serving, "model_import")) == 1
    assert run(serving, "audit", "verify").exit_code == 0


def test_import_refuses_a_package_nobody_it_trusts_signed(boxes: dict[str, Path], tmp_path: Path) -> None:
    pack(boxes["build"], tmp_path / "mlp-1.tar")
    result = run(boxes["serving"], "models", "import", str(tmp_path / "mlp-1.tar"))
    assert result.exit_code == 2, result.output
    assert "--publisher-key" in result.output
    assert not (boxes["serving"] / "models" / "mlp").exists()
    assert records(boxes["serving"], "model_import") == []
    no_leftovers(boxes["serving"])


def _rewrite_tar(src: Path, dst: Path, change: Any) -> None:
    """Copy the tar ``src`` to ``dst``, passing each (info, data) through ``change`` (None drops it)."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as tout:
        for info in tin:
            data = tin.extractfile(info).read() if info.isreg() else None  # type: ignore[union-attr]
            changed = change(info, data)
            if changed is None:
                continue
            info, data = changed
            if data is not None:
                info.size = len(data)
            tout.addfile(info, io.BytesIO(data) if data is not None else None)


def test_import_refuses_a_changed_file_or_manifest(boxes: dict[str, Path], tmp_path: Path) -> None:
    pack(boxes["build"], tmp_path / "mlp-1.tar")
    key = ["--publisher-key", str(boxes["build_pub"])]

    def flip_weight(info: tarfile.TarInfo, data: bytes | None) -> Any:
        if info.name.endswith("model.onnx") and data is not None:
            data = data[:-1] + bytes([data[-1] ^ 1])
        return info, data

    _rewrite_tar(tmp_path / "mlp-1.tar", tmp_path / "weights.tar", flip_weight)
    result = run(boxes["serving"], "models", "import", str(tmp_path / "weights.tar"), *key)
    assert result.exit_code == 2
    assert "sha256" in result.output and "onnx/model.onnx" in result.output

    def renumber(info: tarfile.TarInfo, data: bytes | None) -> Any:
        if info.name.endswith(MANIFEST) and data is not None:
            assert b'"version": 1\n}' in data
            data = data.replace(b'"version": 1\n}', b'"version": 7\n}')
        return info, data

    _rewrite_tar(tmp_path / "mlp-1.tar", tmp_path / "manifest.tar", renumber)
    result = run(boxes["serving"], "models", "import", str(tmp_path / "manifest.tar"), *key)
    assert result.exit_code == 2
    assert "verifies with none" in result.output
    assert not (boxes["serving"] / "models" / "mlp").exists()
    no_leftovers(boxes["serving"])


@pytest.mark.parametrize(
    ("member", "kind", "message"),
    [
        ("mlp/1/../../evil", tarfile.REGTYPE, "'..'"),
        ("/etc/evil", tarfile.REGTYPE, "absolute"),
        ("mlp/1/link", tarfile.SYMTYPE, "link"),
        ("mlp/1/fifo", tarfile.FIFOTYPE, "special file"),
        ("other/1/manifest.json", tarfile.REGTYPE, "more than one package"),
        ("mlp/latest/x", tarfile.REGTYPE, "<model name>/<version>/"),
        ("mlp/1/extra.txt", tarfile.REGTYPE, "extra file"),
    ],
)
def test_import_refuses_members_a_package_never_holds(
    boxes: dict[str, Path], tmp_path: Path, member: str, kind: bytes, message: str
) -> None:
    pack(boxes["build"], tmp_path / "mlp-1.tar")
    _rewrite_tar(tmp_path / "mlp-1.tar", tmp_path / "bad.tar", lambda info, data: (info, data))
    with tarfile.open(tmp_path / "bad.tar", "a") as tar:
        info = tarfile.TarInfo(member)
        info.type = kind
        if kind == tarfile.SYMTYPE:
            info.linkname = "/etc/passwd"
        payload = b"x" if kind == tarfile.REGTYPE else b""
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload) if payload else None)
    result = run(
        boxes["serving"], "models", "import", str(tmp_path / "bad.tar"), "--publisher-key", str(boxes["build_pub"])
    )
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (boxes["serving"] / "models" / "mlp").exists()
    assert not (tmp_path / "evil").exists() and not Path("/etc/evil").exists()
    no_leftovers(boxes["serving"])


def test_import_a_truncated_archive_names_the_damage(boxes: dict[str, Path], tmp_path: Path) -> None:
    pack(boxes["build"], tmp_path / "mlp-1.tar")
    data = (tmp_path / "mlp-1.tar").read_bytes()
    with tarfile.open(tmp_path / "mlp-1.tar") as tar:
        weights = next(m for m in tar if m.name.endswith("model.onnx"))
    (tmp_path / "cut.tar").write_bytes(data[: weights.offset_data + weights.size // 2])
    result = run(
        boxes["serving"], "models", "import", str(tmp_path / "cut.tar"), "--publisher-key", str(boxes["build_pub"])
    )
    assert result.exit_code == 2
    assert "truncated" in result.output
    no_leftovers(boxes["serving"])


def test_unsigned_needs_allow_unsigned_and_is_then_signed_here(boxes: dict[str, Path], tmp_path: Path) -> None:
    build, serving = boxes["build"], boxes["serving"]
    publish(build, version=2, sign=False)
    folder = build / "models" / "mlp" / "2"
    refused = run(serving, "models", "import", str(folder))
    assert refused.exit_code == 2
    assert "not signed" in refused.output and "--allow-unsigned" in refused.output
    result = run(serving, "models", "import", str(folder), "--allow-unsigned")
    assert result.exit_code == 0, result.output
    serving_pub = load_public_key(serving / "keys" / "signing.key.pub")
    assert Repository(serving / "models", public_key=serving_pub).open("mlp", 2).version == 2
    (rec,) = records(serving, "model_import")
    assert rec.details["publisher"] == "unsigned"
    assert "publisher_signature" not in rec.details


def test_a_folder_imports_and_the_model_folder_gets_a_hint(boxes: dict[str, Path]) -> None:
    hint = run(boxes["serving"], "models", "import", str(boxes["build"] / "models" / "mlp"))
    assert hint.exit_code == 2
    assert "holds version folders (1)" in hint.output
    result = run(
        boxes["serving"],
        "models",
        "import",
        str(boxes["build"] / "models" / "mlp" / "1"),
        "--publisher-key",
        str(boxes["build_pub"]),
    )
    assert result.exit_code == 0, result.output
    assert (boxes["serving"] / "models" / "mlp" / "1" / SIGNATURE).exists()


def test_another_package_under_a_taken_version_or_an_unexpected_identity_is_refused(
    boxes: dict[str, Path], tmp_path: Path
) -> None:
    build, serving = boxes["build"], boxes["serving"]
    key = ["--publisher-key", str(boxes["build_pub"])]
    wrong = run(serving, "models", "import", str(build / "models/mlp/1"), *key, "--expect-sha256", "ab" * 32)
    assert wrong.exit_code == 2 and "not the expected" in wrong.output
    assert not (serving / "models" / "mlp").exists()
    # the serving box has its own mlp/1 (other weights)
    publish(serving, seed=5)
    taken = run(serving, "models", "import", str(build / "models/mlp/1"), *key)
    assert taken.exit_code == 2
    assert "already in the repository as another package" in taken.output
    assert "inferbox models remove mlp 1" in taken.output


def test_a_server_requiring_the_publishers_key_keeps_its_signature(boxes: dict[str, Path], tmp_path: Path) -> None:
    serving = boxes["serving"]
    config = tmp_path / "serving.toml"
    config.write_text(f'[paths]\npublic_key = "{boxes["build_pub"]}"\n')
    result = import_build(boxes, INFERBOX_CONFIG=str(config))
    assert result.exit_code == 0, result.output
    build_pub = load_public_key(boxes["build_pub"])
    assert Repository(serving / "models", public_key=build_pub).open("mlp").signed_by == key_id(build_pub)
    # an unsigned package cannot be signed for that key here: refused, naming the setting
    publish(boxes["build"], version=2, sign=False)
    refused = run(
        serving,
        "models",
        "import",
        str(boxes["build"] / "models/mlp/2"),
        "--allow-unsigned",
        INFERBOX_CONFIG=str(config),
    )
    assert refused.exit_code == 2
    assert "public_key" in refused.output
    assert not (serving / "models" / "mlp" / "2").exists()


def test_a_failed_audit_record_places_nothing(
    boxes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from runtime.errors import AuditError

    def broken(*args: Any, **kwargs: Any) -> None:
        raise AuditError("the audit log cannot be written (test)")

    monkeypatch.setattr("appliance.commands.models._record", broken)
    result = import_build(boxes)
    assert result.exit_code == 2
    assert "cannot be written" in result.output
    assert not (boxes["serving"] / "models" / "mlp").exists()
    no_leftovers(boxes["serving"])
    # nor a pack file
    packed = run(boxes["build"], "models", "pack", "mlp", "--out", str(tmp_path / "x.tar"))
    assert packed.exit_code == 2 and not (tmp_path / "x.tar").exists()


def test_pack_is_reproducible_and_never_replaces_a_file(boxes: dict[str, Path], tmp_path: Path) -> None:
    a = pack(boxes["build"], tmp_path / "a.tar")
    b = pack(boxes["build"], tmp_path / "b.tar")
    assert a["archive_sha256"] == b["archive_sha256"]
    again = run(boxes["build"], "models", "pack", "mlp", "--out", str(tmp_path / "a.tar"))
    assert again.exit_code == 2 and "already exists" in again.output
    assert hashlib.sha256((tmp_path / "a.tar").read_bytes()).hexdigest() == a["archive_sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []


def test_pack_refuses_a_package_changed_on_disk(boxes: dict[str, Path], tmp_path: Path) -> None:
    model = boxes["build"] / "models" / "mlp" / "1" / "onnx" / "model.onnx"
    data = model.read_bytes()
    model.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = run(boxes["build"], "models", "pack", "mlp", "--out", str(tmp_path / "m.tar"))
    assert result.exit_code == 2
    assert "sha256" in result.output
    assert not (tmp_path / "m.tar").exists()
    listed = run(boxes["build"], "models", "list", "--verify")
    assert listed.exit_code == 1
    assert "BROKEN" in listed.output
    assert run(boxes["build"], "models", "list").exit_code == 0  # sizes match: only the hashes tell


def test_remove_records_first_and_takes_the_version_out(boxes: dict[str, Path]) -> None:
    build = boxes["build"]
    publish(build, version=2, seed=1)
    sha1 = read_package(build / "models" / "mlp" / "1").sha256
    unasked = run(build, "models", "remove", "mlp", "1")
    assert unasked.exit_code == 2 and "--yes" in unasked.output
    assert (build / "models" / "mlp" / "1").is_dir()
    missing = run(build, "models", "remove", "mlp", "9", "--yes")
    assert missing.exit_code == 2 and "versions of mlp: 1, 2" in missing.output
    result = run(build, "models", "remove", "mlp", "1", "--yes")
    assert result.exit_code == 0, result.output
    assert "versions left: 2" in result.output
    assert "running server" not in result.output  # not the newest: nothing serves it
    assert not (build / "models" / "mlp" / "1").exists()
    (rec,) = records(build, "model_remove")
    assert (rec.model_name, rec.model_version, rec.model_sha256) == ("mlp", "1", sha1)
    assert rec.details["remaining"] == "2"
    assert run(build, "models", "remove", "mlp", "2", "--yes").exit_code == 0
    assert not (build / "models" / "mlp").exists()  # no empty model folder left
    no_leftovers(build)
    assert "no packages" in run(build, "models", "list").output
    assert run(build, "audit", "verify").exit_code == 0


def test_removing_the_newest_version_says_how_a_running_server_rolls_back(boxes: dict[str, Path]) -> None:
    build = boxes["build"]
    publish(build, version=2, seed=1)
    result = run(build, "models", "remove", "mlp", "2", "--yes")
    assert result.exit_code == 0, result.output
    assert "POST /v2/repository/models/mlp/load (a models:admin key) serves version 1" in result.output
    assert run(build, "audit", "verify").exit_code == 0


def test_remove_takes_out_a_broken_package_too(boxes: dict[str, Path]) -> None:
    (boxes["build"] / "models" / "mlp" / "1" / MANIFEST).unlink()
    result = run(boxes["build"], "models", "remove", "mlp", "1", "--yes")
    assert result.exit_code == 0, result.output
    (rec,) = records(boxes["build"], "model_remove")
    assert rec.model_sha256 == "" and "could not be read" in rec.details["note"]


def test_list_json_says_who_signed_each_version(boxes: dict[str, Path], tmp_path: Path) -> None:
    build = boxes["build"]
    publish(build, version=2, sign=False)
    shutil.copytree(boxes["serving"] / "keys", tmp_path / "otherkeys")
    result = run(build, "models", "list", "--json")
    assert result.exit_code == 0, result.output
    rows = {row["version"]: row for row in json.loads(result.stdout)}
    own = key_id(load_public_key(boxes["build_pub"]))
    assert rows[1]["signed"] == f"this box ({own})" and rows[1]["ok"] is True
    assert rows[2]["signed"] == "unsigned"
    assert rows[1]["kept"] == ["onnx-fp32"] and rows[1]["task"] == "tensor"
    assert rows[1]["sha256"] == read_package(build / "models/mlp/1").sha256


def test_import_module_leaves_no_staging_when_interrupted(
    boxes: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = load_settings({"home": boxes["serving"]})

    def interrupted(imported: importing.Imported) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        importing.import_package(
            settings,
            boxes["build"] / "models" / "mlp" / "1",
            publisher_keys=[load_public_key(boxes["build_pub"])],
            before_publish=interrupted,
        )
    assert not (boxes["serving"] / "models" / "mlp").exists()
    no_leftovers(boxes["serving"])


def test_pack_writes_to_a_disk_without_hard_links(
    boxes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    def no_links(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(src), None, str(dst))

    monkeypatch.setattr("runtime.durable.os.link", no_links)  # a USB disk formatted vfat or exFAT
    packed = pack(boxes["build"], tmp_path / "usb.tar")
    assert hashlib.sha256((tmp_path / "usb.tar").read_bytes()).hexdigest() == packed["archive_sha256"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")] == []
    again = run(boxes["build"], "models", "pack", "mlp", "--out", str(tmp_path / "usb.tar"))
    assert again.exit_code == 2 and "already exists" in again.output


# -- review round 1: each test failed on the code before its fix


def _unsigned_copy(boxes: dict[str, Path], tmp_path: Path, **changes: Any) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(boxes["build"] / "models" / "mlp" / "1", folder)
    (folder / SIGNATURE).unlink()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest.update(changes)
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("changes", [{"name": "../../escaped"}, {"name": "ABSOLUTE"}, {"version": 0}])
def test_a_manifest_cannot_name_a_folder_outside_the_repository(
    boxes: dict[str, Path], tmp_path: Path, changes: dict[str, Any]
) -> None:
    if changes.get("name") == "ABSOLUTE":
        changes = {"name": str(tmp_path / "absolute")}
    folder = _unsigned_copy(boxes, tmp_path, **changes)
    result = run(boxes["serving"], "models", "import", str(folder), "--allow-unsigned")
    assert result.exit_code == 2, result.output
    assert "not usable" in result.output
    assert not (tmp_path / "escaped").exists() and not (boxes["serving"].parent / "escaped").exists()
    assert not (tmp_path / "absolute").exists()
    assert records(boxes["serving"], "model_import") == []
    no_leftovers(boxes["serving"])


def test_concurrent_removals_of_one_version_record_one_removal(boxes: dict[str, Path]) -> None:
    import subprocess
    import sys

    build = boxes["build"]
    for version in (2, 3, 4):
        publish(build, version=version, seed=version)
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBOX_")}
    env["INFERBOX_HOME"] = str(build)
    for version in (1, 2, 3):
        command = [sys.executable, "-m", "appliance", "models", "remove", "mlp", str(version), "--yes"]
        procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        codes = sorted(p.wait(timeout=120) for p in procs)
        assert codes == [0, 2], codes
    removals = records(build, "model_remove")
    assert [r.model_version for r in removals] == ["1", "2", "3"]
    assert all(r.outcome == "success" for r in removals)


def test_a_placement_that_fails_after_the_record_is_recorded_as_failed(
    boxes: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(*args: Any, **kwargs: Any) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("appliance.models.importing.place_staged", disk_full)
    result = import_build(boxes)
    assert result.exit_code == 2
    done, failed = records(boxes["serving"], "model_import")
    assert (done.outcome, failed.outcome) == ("success", "failure")
    assert "not placed" in failed.details["error"] and failed.model_sha256 == done.model_sha256
    no_leftovers(boxes["serving"])


def test_pack_records_nothing_when_the_file_cannot_be_written(boxes: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "taken.tar").write_bytes(b"someone else's file")
    taken = run(boxes["build"], "models", "pack", "mlp", "--out", str(tmp_path / "taken.tar"))
    nowhere = run(boxes["build"], "models", "pack", "mlp", "--out", str(tmp_path / "nodir" / "x.tar"))
    assert taken.exit_code == 2 and nowhere.exit_code == 2
    assert (tmp_path / "taken.tar").read_bytes() == b"someone else's file"
    assert records(boxes["build"], "model_pack") == []


def test_a_huge_header_block_is_refused_before_it_is_read(boxes: dict[str, Path], tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.tar"
    long_name = "mlp/1/" + "x" * (1 << 20)  # a 1 MiB GNU long name: read whole into memory by tarfile
    with tarfile.open(bomb, "w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(long_name)
        tar.addfile(info, io.BytesIO(b""))
    result = run(boxes["serving"], "models", "import", str(bomb), "--allow-unsigned")
    assert result.exit_code == 2
    assert "header block" in result.output
    no_leftovers(boxes["serving"])


def test_import_says_how_a_running_server_takes_the_new_version(boxes: dict[str, Path]) -> None:
    result = import_build(boxes)
    assert result.exit_code == 0, result.output
    assert "/v2/repository/models/mlp/load" in result.output and "without a gap" in result.output


def test_a_folder_of_odd_subfolders_gets_a_message_not_a_traceback(boxes: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    (folder / "²").mkdir(parents=True)
    (folder / "01").mkdir()
    result = run(boxes["serving"], "models", "import", str(folder))
    assert result.exit_code == 2
    assert "holds no manifest.json" in result.output and "version folders" not in result.output


# -- review round 2


def test_model_locks_live_apart_from_staging_and_the_index(boxes: dict[str, Path]) -> None:
    assert import_build(boxes).exit_code == 0
    repository = boxes["serving"] / "models"
    assert (repository / ".locks" / "model-mlp.lock").is_file()
    assert not (repository / ".staging").exists() or list((repository / ".staging").iterdir()) == []
    assert Repository(repository).models() == ["mlp"]


@pytest.mark.parametrize("kind", ["old GNU sparse", "GNU sparse 1.0 (pax)"])
def test_sparse_members_are_refused_before_their_map_is_read(boxes: dict[str, Path], tmp_path: Path, kind: str) -> None:
    bomb = tmp_path / "sparse.tar"
    if kind == "old GNU sparse":
        info = tarfile.TarInfo("mlp/1/onnx/model.onnx")
        info.type = tarfile.GNUTYPE_SPARSE
        with tarfile.open(bomb, "w", format=tarfile.GNU_FORMAT) as tar:
            tar.addfile(info, io.BytesIO(b""))
    else:
        sparse_map = b"1000000\n" + b"0\n1\n" * 1000  # the map sits in the member's data
        info = tarfile.TarInfo("mlp/1/onnx/model.onnx")
        info.size = len(sparse_map)
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": info.name}
        with tarfile.open(bomb, "w", format=tarfile.PAX_FORMAT) as tar:
            tar.addfile(info, io.BytesIO(sparse_map))
    for command in (["models", "import", str(bomb), "--allow-unsigned"], ["backup", "check", str(bomb)]):
        result = run(boxes["serving"], *command)
        assert result.exit_code in (1, 2), result.output
        assert "sparse" in result.output and "Traceback" not in result.output, result.output
    no_leftovers(boxes["serving"])


def test_a_missing_home_is_refused_before_anything_is_written(boxes: dict[str, Path], tmp_path: Path) -> None:
    nohome = tmp_path / "nohome"
    result = run(
        nohome, "models", "import", str(boxes["build"] / "models/mlp/1"), "--publisher-key", str(boxes["build_pub"])
    )
    assert result.exit_code == 2 and "no state folder" in result.output
    assert not nohome.exists()
    assert run(nohome, "models", "remove", "mlp", "1", "--yes").exit_code == 2 and not nohome.exists()


def test_importing_an_older_version_says_the_newer_one_stays_served(boxes: dict[str, Path]) -> None:
    publish(boxes["serving"], version=5, seed=9)
    result = import_build(boxes)
    assert result.exit_code == 0, result.output
    assert "serves the newest version of mlp, 5" in result.output and "restart the server" not in result.output


# -- review round 3


def test_root_is_refused_on_a_state_folder_another_user_owns(
    boxes: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Root working in folders the service user can write could be led through its links (and would leave
    files the service cannot read): the command says to run as that user instead."""
    monkeypatch.setattr("os.geteuid", lambda: 0)
    owned = boxes["serving"] / "elsewhere"  # the service's repository, passed to root's own home
    monkeypatch.setattr(
        "appliance.commands.options.foreign_owner",
        lambda path: "inferbox" if path in (boxes["serving"], owned) else None,
    )
    for home, extra in ((boxes["serving"], []), (boxes["build"], ["--repository", str(owned)])):
        for command in (
            ["models", "import", str(boxes["build"] / "models/mlp/1"), "--publisher-key", str(boxes["build_pub"])],
            ["models", "remove", "mlp", "1", "--yes"],
        ):
            result = run(home, *command, *extra)
            assert result.exit_code == 2 and "sudo -u inferbox" in result.output, result.output
    assert not (boxes["serving"] / "models").exists() and not owned.exists()
    assert (boxes["build"] / "models" / "mlp" / "1").is_dir()


def test_a_retired_key_is_not_trusted_by_default(boxes: dict[str, Path], tmp_path: Path) -> None:
    """After a rotation (the old key may have been stolen) a package signed with it needs --publisher-key."""
    serving = boxes["serving"]
    retired = serving / "keys" / "retired"
    retired.mkdir()
    old_private = tmp_path / "stolen.key"
    shutil.copy(serving / "keys" / "signing.key", old_private)
    shutil.copy(serving / "keys" / "signing.key.pub", retired / "old.pub")
    assert run(serving, "signing-key", "create", "--force").exit_code == 0
    attacker = tmp_path / "attacker"
    (attacker / "keys").mkdir(parents=True)
    shutil.copy(old_private, attacker / "keys" / "signing.key")
    publish(attacker, version=7, seed=4)
    result = run(serving, "models", "import", str(attacker / "models" / "mlp" / "7"))
    assert result.exit_code == 2 and "verifies with none" in result.output
    assert not (serving / "models" / "mlp").exists()
    listed = run(attacker, "models", "list", "--json")
    assert listed.exit_code == 0


def test_the_publishers_words_reach_the_terminal_and_the_log_short_and_printable(
    boxes: dict[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "copy"
    shutil.copytree(boxes["build"] / "models" / "mlp" / "1", folder)
    (folder / SIGNATURE).unlink()
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["provenance"]["machine"]["cpu"] = "x\x1b[2A\r\n  published by: key 0000TRUSTED" + "A" * 5000
    (folder / MANIFEST).write_text(json.dumps(manifest))
    result = run(boxes["serving"], "models", "import", str(folder), "--allow-unsigned")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\n  published by: key 0000" not in result.output
    (rec,) = records(boxes["serving"], "model_import")
    assert len(rec.details["exported_on_cpu"]) <= 400 and "\x1b" not in rec.details["exported_on_cpu"]


def test_a_package_listing_a_file_named_like_a_temporary_signature_imports(
    boxes: dict[str, Path], tmp_path: Path
) -> None:
    from runtime.manifest import decode_manifest

    build = boxes["build"]
    staging = staging_dir(build / "models")
    (staging / "onnx").mkdir()
    build_mlp(staging / "onnx" / "model.onnx")
    (staging / "manifest.sig.new").write_text("a file of the package\n")
    base = decode_manifest((build / "models" / "mlp" / "1" / MANIFEST).read_bytes())
    import msgspec

    manifest = msgspec.structs.replace(base, version=3)
    finalize_package(staging, manifest, build / "models", signing_key=load_private_key(build / "keys" / "signing.key"))
    result = run(
        boxes["serving"], "models", "import", str(build / "models/mlp/3"), "--publisher-key", str(boxes["build_pub"])
    )
    assert result.exit_code == 0, result.output
    assert (boxes["serving"] / "models" / "mlp" / "3" / "manifest.sig.new").read_text() == "a file of the package\n"


def test_an_unreadable_model_folder_is_one_broken_row_and_the_server_loads_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model folder the service cannot list (root copied it in, mode 0700) once stopped the server at
    start; now `models list` names it with the fix and the server serves the other models."""
    import appliance.server as server_mod
    from runtime import package as package_mod

    home = tmp_path / "home"
    publish_mlp(home / "models", ["ort-cpu"])
    (home / "models" / "locked" / "1").mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        if Path(str(path)) == home / "models" / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(package_mod.os, "scandir", scandir)
    listed = run(home, "models", "list")
    assert listed.exit_code == 1 and "cannot list its versions" in listed.output and "mlp" in listed.output
    registry = server_mod.build_registry(load_settings({"home": home}))
    try:
        assert [m.name for m in registry.loaded()] == ["mlp"]
    finally:
        registry.close()

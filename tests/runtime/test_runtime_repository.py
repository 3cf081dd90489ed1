"""The model repository: listing, latest, verified open, and a never-raising index."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.errors import IntegrityError, ManifestError, ModelNotFoundError, SignatureError, UnsafePathError
from runtime.manifest import Manifest, Provenance, TensorSpec, Variant
from runtime.package import STAGING, finalize_package, staging_dir
from runtime.repository import RepoEntry, Repository
from runtime.signing import Ed25519PrivateKey, generate_private_key, key_id


def _publish(root: Path, name: str, version: int, key: Ed25519PrivateKey | None = None) -> Path:
    staging = staging_dir(root)
    (staging / "onnx").mkdir()
    w = numpy_helper.from_array(np.full((2, 2), version, dtype=np.float32), name="W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 2])],
        [w],
    )
    onnx.save_model(helper.make_model(graph), staging / "onnx" / "model.onnx")
    manifest = Manifest(
        name=name,
        version=version,
        task="tensor",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 2])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 2])],
        variants=[
            Variant(
                id="onnx-fp32",
                format="onnx",
                precision="fp32",
                files=["onnx/model.onnx"],
                backends=["ort-cpu"],
                recipe="",
            )
        ],
        files=[],
        provenance=Provenance(source_kind="onnx", source="x", source_sha256="", created_at="2026-11-28T00:00:00Z"),
    )
    return finalize_package(staging, manifest, root, signing_key=key).path


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def root(tmp_path: Path, key: Ed25519PrivateKey) -> Path:
    r = tmp_path / "models"
    _publish(r, "minilm", 1, key)
    _publish(r, "minilm", 2, key)
    _publish(r, "minilm", 10, key)
    _publish(r, "digits", 3, key)
    # noise the repository ignores
    (r / "minilm" / "latest").mkdir()
    (r / "minilm" / "007").mkdir()
    (r / "minilm" / "README").write_text("hi")
    (r / "empty-model").mkdir()
    (r / ".hidden" / "1").mkdir(parents=True)
    (r / "notes.txt").write_text("x")
    return r


def test_models_and_versions(root: Path, key: Ed25519PrivateKey) -> None:
    repo = Repository(root, public_key=key.public_key())
    assert (root / STAGING).is_dir()
    assert repo.models() == ["digits", "minilm"]
    assert repo.versions("minilm") == [1, 2, 10]  # numeric order, not "10" < "2"
    assert repo.versions("digits") == [3]
    assert repo.versions("nope") == []
    assert repo.versions(STAGING) == []
    assert repo.versions("../models/minilm") == []
    assert repo.latest("minilm") == 10


def test_missing_root_is_empty(tmp_path: Path) -> None:
    repo = Repository(tmp_path / "nothing-here")
    assert repo.models() == []
    assert repo.entries() == []
    with pytest.raises(ModelNotFoundError, match="models there: none"):
        repo.latest("minilm")


def test_latest_of_unknown_model_names_models_and_fix(root: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="digits, minilm") as info:
        Repository(root).latest("bert")
    assert "inferbox init" in str(info.value) and "inferbox export" in str(info.value)


def test_open_latest_and_specific_version(root: Path, key: Ed25519PrivateKey) -> None:
    repo = Repository(root, public_key=key.public_key())
    latest = repo.open("minilm")
    assert (latest.name, latest.version) == ("minilm", 10)
    assert latest.signed_by == key_id(key)
    assert latest.path == root / "minilm" / "10"
    two = repo.open("minilm", 2)
    assert two.version == 2
    assert two.sha256 != latest.sha256
    with pytest.raises(ModelNotFoundError, match=r"no version 5.*versions: 1, 2, 10"):
        repo.open("minilm", 5)
    with pytest.raises(ModelNotFoundError, match="not in the repository"):
        repo.open("bert", 1)


def test_open_refuses_a_renamed_folder(root: Path, key: Ed25519PrivateKey) -> None:
    """An old signed version copied to a higher number must not be served as the new one."""
    shutil.copytree(root / "minilm" / "1", root / "minilm" / "11")
    repo = Repository(root, public_key=key.public_key())
    with pytest.raises(ManifestError, match=r"manifest is for minilm version 1.*folder says minilm version 11"):
        repo.open("minilm")
    shutil.copytree(root / "digits" / "3", root / "minilm" / "12")
    with pytest.raises(ManifestError, match="manifest is for digits version 3"):
        repo.open("minilm", 12)


def test_open_verifies_the_package(root: Path, key: Ed25519PrivateKey) -> None:
    model = root / "minilm" / "10" / "onnx" / "model.onnx"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        Repository(root, public_key=key.public_key()).open("minilm")
    with pytest.raises(SignatureError, match="does not verify"):
        Repository(root, public_key=generate_private_key().public_key()).open("minilm", 1)


def test_entries_report_every_version_and_never_raise(root: Path, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    _publish(root, "unsigned", 1)
    (root / "minilm" / "2" / "onnx" / "model.onnx").write_bytes(b"tampered")
    shutil.copytree(root / "digits" / "3", tmp_path / "digits-copy")
    (root / "digits" / "4").symlink_to(tmp_path / "digits-copy", target_is_directory=True)
    (root / "digits" / "5").mkdir()  # a version folder without a manifest
    repo = Repository(root, public_key=key.public_key())
    entries = repo.entries()
    by_key = {(e.name, e.version): e for e in entries}
    assert sorted(by_key) == [
        ("digits", 3),
        ("digits", 4),
        ("digits", 5),
        ("minilm", 1),
        ("minilm", 2),
        ("minilm", 10),
        ("unsigned", 1),
    ]
    good = by_key[("minilm", 10)]
    assert good == RepoEntry(
        "minilm", 10, root / "minilm" / "10", ok=True, error=None, sha256=good.sha256, signed_by=key_id(key)
    )
    assert good.sha256 is not None and len(good.sha256) == 64
    assert by_key[("minilm", 1)].ok and by_key[("digits", 3)].ok
    expected_errors = {
        ("minilm", 2): IntegrityError,
        ("digits", 4): UnsafePathError,
        ("digits", 5): ManifestError,
        ("unsigned", 1): SignatureError,
    }
    for k, exc in expected_errors.items():
        entry = by_key[k]
        assert not entry.ok
        assert entry.sha256 is None
        assert entry.error is not None and entry.error.startswith(exc.__name__ + ":"), entry.error
    # the fast listing skips content hashes but still sees the size change
    fast = {(e.name, e.version): e for e in repo.entries(verify_hashes=False)}
    assert not fast[("minilm", 2)].ok
    assert [k for k, e in fast.items() if e.ok] == [k for k, e in by_key.items() if e.ok]


def test_entries_without_public_key_accept_unsigned(root: Path) -> None:
    _publish(root, "unsigned", 1)
    entries = Repository(root).entries()
    assert all(e.ok for e in entries), [e.error for e in entries if not e.ok]
    assert {e.signed_by for e in entries} == {None}


def test_an_unreadable_model_folder_is_named_and_the_others_still_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A folder the service cannot list (copied in by root, mode 0700) once stopped `serve` at start with a
    traceback; now it is one broken entry that says how to fix it, and the other models are still there."""
    import os

    from runtime import package as package_mod
    from runtime.errors import PackageError

    _publish(tmp_path, "good", 1)
    (tmp_path / "locked" / "1").mkdir(parents=True)
    real_scandir = os.scandir

    def scandir(path: object) -> object:
        if Path(str(path)) == tmp_path / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)  # type: ignore[arg-type]

    monkeypatch.setattr(package_mod.os, "scandir", scandir)
    repo = Repository(tmp_path)
    assert repo.models() == ["good", "locked"]
    with pytest.raises(PackageError, match="chown -R inferbox:"):
        repo.versions("locked")
    entries = {(e.name, e.version): e for e in repo.entries()}
    assert entries[("good", 1)].ok
    assert not entries[("locked", 0)].ok and "cannot list its versions" in (entries[("locked", 0)].error or "")

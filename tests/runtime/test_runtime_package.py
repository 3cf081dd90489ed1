"""Model package reader/writer: real files, real ONNX models, every tampering refused."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import threading
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from runtime import package as package_mod
from runtime.errors import IntegrityError, ManifestError, PackageError, SignatureError, UnsafePathError
from runtime.manifest import (
    Accuracy,
    Attempt,
    FileEntry,
    Manifest,
    Provenance,
    TensorSpec,
    TextConfig,
    Timing,
    Variant,
    decode_manifest,
    encode_manifest,
)
from runtime.package import (
    LOCKS,
    MANIFEST,
    SIGNATURE,
    STAGING,
    Package,
    check_onnx_external_data,
    finalize_package,
    next_version,
    read_package,
    sha256_file,
    staging_dir,
)
from runtime.repository import RepoEntry, Repository
from runtime.signing import Ed25519PrivateKey, generate_private_key, key_id, sign

# The files the builder lays out; the flip-a-byte test is parametrized over them.
PACKAGE_FILES = [
    "onnx/model.ext.onnx",
    "onnx/model.onnx",
    "onnx/weights.bin",
    "openvino/model.bin",
    "openvino/model.xml",
    "samples/samples.npz",
    "tokenizer/tokenizer.json",
]


def _graph(name: str) -> onnx.GraphProto:
    w = numpy_helper.from_array(np.arange(32, dtype=np.float32).reshape(4, 8) / 10, name="W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8])
    return helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], name, [x], [y], [w])


def _model(name: str) -> onnx.ModelProto:
    return helper.make_model(_graph(name), opset_imports=[helper.make_opsetid("", 17)])


def build_staging(root: Path) -> Path:
    """Lay out a small but complete package (ONNX with and without external data, OV, tokenizer, samples)."""
    staging = staging_dir(root)
    (staging / "onnx").mkdir()
    onnx.save_model(_model("plain"), staging / "onnx" / "model.onnx")
    onnx.save_model(
        _model("ext"),
        staging / "onnx" / "model.ext.onnx",
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    (staging / "openvino").mkdir()
    (staging / "openvino" / "model.xml").write_text("<net name='m'/>\n" * 4)
    (staging / "openvino" / "model.bin").write_bytes(bytes(range(64)))
    (staging / "tokenizer").mkdir()
    (staging / "tokenizer" / "tokenizer.json").write_text('{"model": {"type": "WordPiece"}, "pad": 0}\n')
    (staging / "samples").mkdir()
    np.savez(staging / "samples" / "samples.npz", x=np.ones((2, 4), dtype=np.float32))
    (staging / "empty" / "nested").mkdir(parents=True)  # finalize prunes empty folders
    return staging


def make_manifest(name: str = "tiny", version: int = 1) -> Manifest:
    acc = Accuracy(
        runtime="onnxruntime",
        exec_precision="fp32",
        samples=2,
        metrics={"max_abs_diff": 0.0},
        gate={"max_max_abs_diff": 1e-4},
        passed=True,
        reference="onnx-fp32",
    )
    return Manifest(
        name=name,
        version=version,
        task="tensor",
        inputs=[TensorSpec(name="x", dtype="float32", shape=[-1, 4])],
        outputs=[TensorSpec(name="y", dtype="float32", shape=[-1, 8])],
        variants=[
            Variant(
                id="onnx-fp32",
                format="onnx",
                precision="fp32",
                files=["onnx/model.onnx"],
                backends=["ort-cpu"],
                recipe="plain",
                accuracy=[acc],
            ),
            Variant(
                id="onnx-ext",
                format="onnx",
                precision="fp32",
                files=["onnx/model.ext.onnx", "onnx/weights.bin"],
                backends=["ort-cpu"],
                recipe="external data",
            ),
            Variant(
                id="ov-fp32",
                format="openvino",
                precision="fp32",
                files=["openvino/model.xml", "openvino/model.bin"],
                backends=["ov-cpu"],
                recipe="ov.convert_model",
            ),
        ],
        files=[],
        provenance=Provenance(
            source_kind="onnx", source="model.onnx", source_sha256="0" * 64, created_at="2026-11-28T00:00:00Z"
        ),
        text=TextConfig(tokenizer_dir="tokenizer"),
        samples="samples/samples.npz",
    )


@pytest.fixture(scope="module")
def key() -> Ed25519PrivateKey:
    return generate_private_key()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    r = tmp_path / "repo"
    r.mkdir()
    return r


@pytest.fixture
def signed(repo: Path, key: Ed25519PrivateKey) -> Package:
    return finalize_package(build_staging(repo), make_manifest(), repo, signing_key=key)


@pytest.fixture
def unsigned(repo: Path) -> Package:
    return finalize_package(build_staging(repo), make_manifest(), repo)


def rewrite_manifest(pkg: Path, manifest: Manifest, key: Ed25519PrivateKey | None) -> None:
    data = encode_manifest(manifest)
    (pkg / MANIFEST).write_bytes(data)
    if key is not None:
        (pkg / SIGNATURE).write_bytes(sign(key, data))


def relist(pkg: Path, rel: str, key: Ed25519PrivateKey | None) -> None:
    """Update ``rel``'s sha256/size in the manifest (and re-sign): only a non-hash check can then refuse."""
    m = decode_manifest((pkg / MANIFEST).read_bytes())
    full = pkg / rel
    entry = FileEntry(path=rel, sha256=sha256_file(full), bytes=full.stat().st_size)
    files = sorted([f for f in m.files if f.path != rel] + [entry], key=lambda f: f.path)
    rewrite_manifest(pkg, msgspec.structs.replace(m, files=files), key)


# --------------------------------------------------------------------------- good packages


def test_finalize_lists_every_file_and_signs(signed: Package, repo: Path, key: Ed25519PrivateKey) -> None:
    assert signed.path == repo / "tiny" / "1"
    assert [f.path for f in signed.manifest.files] == PACKAGE_FILES
    for f in signed.manifest.files:
        data = (signed.path / f.path).read_bytes()
        assert f.sha256 == hashlib.sha256(data).hexdigest()
        assert f.bytes == len(data)
    assert signed.sha256 == hashlib.sha256((signed.path / MANIFEST).read_bytes()).hexdigest()
    assert signed.signed_by == key_id(key)
    assert not (signed.path / "empty").exists()  # pruned
    assert list((repo / STAGING).iterdir()) == []
    assert (signed.path / SIGNATURE).stat().st_size == 64


def test_signed_package_reads_and_verifies(signed: Package, key: Ed25519PrivateKey) -> None:
    pkg = read_package(signed.path, public_key=key.public_key())
    assert pkg == signed
    assert pkg.signed_by == key_id(key)
    assert pkg.variant_path("onnx-ext") == signed.path / "onnx" / "model.ext.onnx"
    assert pkg.file_path("samples/samples.npz").is_file()
    with pytest.raises(ManifestError, match="not listed"):
        pkg.file_path("../manifest.json")
    with pytest.raises(ManifestError, match="no variant"):
        pkg.variant_path("nope")
    # the external-data model really loads from the package
    loaded = onnx.load(str(pkg.variant_path("onnx-ext")))
    assert numpy_helper.to_array(loaded.graph.initializer[0]).shape == (4, 8)


def test_unsigned_package_reads_without_key(unsigned: Package) -> None:
    pkg = read_package(unsigned.path)
    assert pkg.signed_by is None
    assert not (unsigned.path / SIGNATURE).exists()
    assert pkg.manifest == unsigned.manifest


def test_signed_package_reads_without_key(signed: Package) -> None:
    assert read_package(signed.path).signed_by is None


def test_sha256_file_streams(tmp_path: Path) -> None:
    p = tmp_path / "big"
    data = os.urandom(3 * (1 << 20) + 17)
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()


def test_next_version(repo: Path, key: Ed25519PrivateKey) -> None:
    assert next_version(repo, "tiny") == 1
    finalize_package(build_staging(repo), make_manifest(version=1), repo)
    finalize_package(build_staging(repo), make_manifest(version=7), repo)
    (repo / "tiny" / "notes").mkdir()
    assert next_version(repo, "tiny") == 8


# --------------------------------------------------------------------------- tampering


def _flip_middle_byte(path: Path) -> None:
    with path.open("r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0x01]))


@pytest.mark.parametrize("signed_pkg", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("rel", PACKAGE_FILES)
def test_one_changed_byte_in_any_file_is_refused(
    repo: Path, key: Ed25519PrivateKey, rel: str, signed_pkg: bool
) -> None:
    pkg = finalize_package(build_staging(repo), make_manifest(), repo, signing_key=key if signed_pkg else None)
    _flip_middle_byte(pkg.path / rel)
    with pytest.raises(IntegrityError, match="sha256") as info:
        read_package(pkg.path, public_key=key.public_key() if signed_pkg else None)
    assert info.value.path == rel
    if not rel.endswith(".onnx"):  # (a corrupt ONNX file may fail to parse even then)
        # the size-only fast check does not see it; the hash check does
        read_package(pkg.path, public_key=key.public_key() if signed_pkg else None, verify_hashes=False)


def test_changed_byte_in_signed_manifest_breaks_signature(signed: Package, key: Ed25519PrivateKey) -> None:
    _flip_middle_byte(signed.path / MANIFEST)
    with pytest.raises(SignatureError, match="does not verify"):
        read_package(signed.path, public_key=key.public_key())


def test_changed_sha_in_unsigned_manifest_is_a_mismatch(unsigned: Package) -> None:
    data = (unsigned.path / MANIFEST).read_bytes()
    entry = unsigned.manifest.file("tokenizer/tokenizer.json")
    other = "0" if entry.sha256[10] != "0" else "1"
    changed = entry.sha256[:10] + other + entry.sha256[11:]
    (unsigned.path / MANIFEST).write_bytes(data.replace(entry.sha256.encode(), changed.encode()))
    with pytest.raises(IntegrityError, match=r"tokenizer.json: sha256"):
        read_package(unsigned.path)


def test_broken_manifest_json_is_a_manifest_error(unsigned: Package) -> None:
    (unsigned.path / MANIFEST).write_bytes((unsigned.path / MANIFEST).read_bytes()[:-20])
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_package(unsigned.path)


def test_missing_manifest_is_a_manifest_error(unsigned: Package) -> None:
    (unsigned.path / MANIFEST).unlink()
    with pytest.raises(ManifestError, match=r"manifest.json is missing"):
        read_package(unsigned.path)


@pytest.mark.parametrize("rel", ["extra.txt", "onnx/extra.onnx", "tokenizer/vocab.txt", "newdir/x"])
def test_extra_file_is_refused(signed: Package, key: Ed25519PrivateKey, rel: str) -> None:
    (signed.path / rel).parent.mkdir(exist_ok=True)
    (signed.path / rel).write_bytes(b"x")
    with pytest.raises(IntegrityError, match="extra file") as info:
        read_package(signed.path, public_key=key.public_key())
    assert info.value.path == rel


def test_extra_empty_directory_is_refused(signed: Package, key: Ed25519PrivateKey) -> None:
    """Decision: a package holds exactly its manifest's files; an empty folder is refused too."""
    (signed.path / "onnx" / "leftover").mkdir()
    with pytest.raises(IntegrityError, match="extra directory"):
        read_package(signed.path, public_key=key.public_key())


@pytest.mark.parametrize("rel", ["onnx/weights.bin", "samples/samples.npz"])
def test_missing_file_is_refused(signed: Package, key: Ed25519PrivateKey, rel: str) -> None:
    (signed.path / rel).unlink()
    with pytest.raises(IntegrityError, match="missing") as info:
        read_package(signed.path, public_key=key.public_key())
    assert info.value.path == rel


def test_missing_folder_is_refused(signed: Package, key: Ed25519PrivateKey) -> None:
    shutil.rmtree(signed.path / "tokenizer")
    with pytest.raises(IntegrityError, match=r"missing tokenizer/tokenizer.json"):
        read_package(signed.path, public_key=key.public_key())


@pytest.mark.parametrize("rel", ["onnx/model.onnx", "onnx/weights.bin", MANIFEST, SIGNATURE])
def test_file_replaced_by_symlink_to_identical_copy_is_refused(
    signed: Package, key: Ed25519PrivateKey, tmp_path: Path, rel: str
) -> None:
    outside = tmp_path / "outside-copy"
    shutil.copyfile(signed.path / rel, outside)
    (signed.path / rel).unlink()
    (signed.path / rel).symlink_to(outside)
    with pytest.raises(UnsafePathError, match="symlink"):
        read_package(signed.path, public_key=key.public_key())


def test_symlinked_directory_is_refused(signed: Package, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    outside = tmp_path / "tokenizer-copy"
    shutil.copytree(signed.path / "tokenizer", outside)
    shutil.rmtree(signed.path / "tokenizer")
    (signed.path / "tokenizer").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="tokenizer is a symlink"):
        read_package(signed.path, public_key=key.public_key())


def test_symlinked_package_folder_is_refused(signed: Package, key: Ed25519PrivateKey, tmp_path: Path) -> None:
    link = tmp_path / "link"
    link.symlink_to(signed.path, target_is_directory=True)
    with pytest.raises(UnsafePathError, match="package folder"):
        read_package(link, public_key=key.public_key())


@pytest.mark.parametrize("rel", ["onnx/model.onnx", "openvino/model.bin", MANIFEST])
def test_hard_link_is_refused(signed: Package, key: Ed25519PrivateKey, tmp_path: Path, rel: str) -> None:
    os.link(signed.path / rel, tmp_path / "second-name")
    with pytest.raises(UnsafePathError, match="hard link"):
        read_package(signed.path, public_key=key.public_key())


def test_special_file_is_refused(signed: Package, key: Ed25519PrivateKey) -> None:
    os.mkfifo(signed.path / "onnx" / "pipe")
    with pytest.raises(UnsafePathError, match="not a regular file"):
        read_package(signed.path, public_key=key.public_key())


def _refused_without_blocking(fifo: Path, read: Callable[[], object]) -> BaseException | None:
    """Run ``read`` in a thread; if it is stuck in ``open()`` on ``fifo``, unblock it and fail the test.

    The join timeout only guards against a hang (the old code waited forever for a writer);
    nothing is asserted about how long a passing read takes.
    """
    raised: list[BaseException | None] = []

    def target() -> None:
        try:
            read()
        except BaseException as exc:  # handed to the test
            raised.append(exc)
        else:
            raised.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer comes and goes: open() returns
        thread.join(10)
        pytest.fail(f"reading blocked in open() on the FIFO {fifo}")
    return raised[0]


@pytest.mark.parametrize("rel", [MANIFEST, SIGNATURE])
def test_fifo_manifest_or_signature_is_refused_without_blocking(
    signed: Package, key: Ed25519PrivateKey, rel: str
) -> None:
    fifo = signed.path / rel
    fifo.unlink()
    os.mkfifo(fifo)
    exc = _refused_without_blocking(fifo, lambda: read_package(signed.path, public_key=key.public_key()))
    assert isinstance(exc, UnsafePathError) and "not a regular file" in str(exc)


def test_fifo_manifest_is_one_bad_entry_of_the_repository(repo: Path, signed: Package, key: Ed25519PrivateKey) -> None:
    """One bad folder is reported as a bad package; the index of the others still comes back."""
    bad = repo / "tiny" / "2"
    bad.mkdir()
    os.mkfifo(bad / MANIFEST)
    entries: list[RepoEntry] = []
    exc = _refused_without_blocking(
        bad / MANIFEST, lambda: entries.extend(Repository(repo, public_key=key.public_key()).entries())
    )
    assert exc is None
    by_version = {e.version: e for e in entries}
    assert by_version[1].ok
    assert not by_version[2].ok and "not a regular file" in (by_version[2].error or "")


def test_sha256_file_of_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    exc = _refused_without_blocking(fifo, lambda: sha256_file(fifo))
    assert isinstance(exc, UnsafePathError) and "not a regular file" in str(exc)


def test_opened_package_file_reads_blocking(signed: Package) -> None:
    """The non-blocking open is undone once the file is known to be regular."""
    fd = package_mod._open_nofollow(signed.path / MANIFEST, MANIFEST)
    try:
        assert os.get_blocking(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- ONNX external data


def _external_tensor(location: str) -> onnx.TensorProto:
    t = helper.make_tensor("c", TensorProto.FLOAT, [1], [0.0])
    t.data_location = TensorProto.EXTERNAL
    del t.float_data[:]
    t.external_data.add(key="location", value=location)
    t.external_data.add(key="offset", value="0")
    t.external_data.add(key="length", value="4")
    return t


def _set_location(onnx_path: Path, location: str, *, where: str = "initializer") -> None:
    """Point one external tensor of the model at ``location`` (in an initializer, a subgraph or a function)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    out = helper.make_tensor_value_info("c_out", TensorProto.FLOAT, [1])
    const = helper.make_node("Constant", [], ["c_out"], value=_external_tensor(location))
    if where == "subgraph":
        # an If node whose then-branch holds a Constant with an external tensor attribute
        branch = helper.make_graph([const], "b", [], [out])
        model.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], then_branch=branch, else_branch=branch))
    elif where == "function":
        model.functions.append(helper.make_function("local", "f", [], ["c_out"], [const], []))
    elif where == "training-info":
        info = model.training_info.add()
        info.initialization.CopyFrom(helper.make_graph([const], "init", [], [out]))
    else:
        tensor = model.graph.initializer[0]
        assert tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx_path.write_bytes(model.SerializeToString())


def test_external_data_rewrite_control(signed: Package, key: Ed25519PrivateKey) -> None:
    """The rewrite + relist below is sound: with the original location the package still reads."""
    _set_location(signed.path / "onnx" / "model.ext.onnx", "weights.bin")
    relist(signed.path, "onnx/model.ext.onnx", key)
    read_package(signed.path, public_key=key.public_key())


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("../../outside.bin", "'..' component"),
        ("../onnx/weights.bin", "'..' component"),
        ("/etc/passwd", "absolute"),
        ("ABSOLUTE_COPY", "absolute"),
        ("other.bin", "not a file listed"),
        ("", "empty"),
        ("sub\\..\\..\\x.bin", "backslash"),
    ],
)
@pytest.mark.parametrize("where", ["initializer", "subgraph", "function", "training-info"])
def test_external_data_outside_the_package_is_refused(
    signed: Package, key: Ed25519PrivateKey, tmp_path: Path, location: str, message: str, where: str
) -> None:
    copy = tmp_path / "outside.bin"
    shutil.copyfile(signed.path / "onnx" / "weights.bin", copy)  # real, identical data outside
    if location == "ABSOLUTE_COPY":
        location = str(copy)
    _set_location(signed.path / "onnx" / "model.ext.onnx", location, where=where)
    relist(signed.path, "onnx/model.ext.onnx", key)
    with pytest.raises(UnsafePathError, match=message) as info:
        read_package(signed.path, public_key=key.public_key())
    assert info.value.path == "onnx/model.ext.onnx"


def test_external_data_through_symlink_is_refused(signed: Package, tmp_path: Path) -> None:
    """The tree walk refuses any symlink; the ONNX check refuses one on its own as well."""
    copy = tmp_path / "outside.bin"
    shutil.copyfile(signed.path / "onnx" / "weights.bin", copy)
    (signed.path / "onnx" / "link.bin").symlink_to(copy)
    _set_location(signed.path / "onnx" / "model.ext.onnx", "link.bin")
    listed = {f.path for f in signed.manifest.files} | {"onnx/link.bin"}
    with pytest.raises(UnsafePathError, match="symlink"):
        check_onnx_external_data(signed.path, "onnx/model.ext.onnx", listed)
    (signed.path / "onnx" / "sub").symlink_to(tmp_path, target_is_directory=True)
    _set_location(signed.path / "onnx" / "model.ext.onnx", "sub/outside.bin")
    with pytest.raises(UnsafePathError, match="symlink"):
        check_onnx_external_data(signed.path, "onnx/model.ext.onnx", listed | {"onnx/sub/outside.bin"})
    with pytest.raises(UnsafePathError, match="symlink"):
        read_package(signed.path)


def test_onnx_named_variant_file_is_checked_even_without_onnx_suffix(signed: Package, key: Ed25519PrivateKey) -> None:
    """A variant of format onnx whose file is not called *.onnx still gets its external data checked."""
    pkg = signed.path
    (pkg / "onnx" / "model.ext.onnx").rename(pkg / "onnx" / "model.data")
    _set_location(pkg / "onnx" / "model.data", "/etc/passwd")
    m = decode_manifest((pkg / MANIFEST).read_bytes())
    variants = [
        msgspec.structs.replace(v, files=["onnx/model.data", "onnx/weights.bin"]) if v.id == "onnx-ext" else v
        for v in m.variants
    ]
    files = [f for f in m.files if f.path != "onnx/model.ext.onnx"]
    rewrite_manifest(pkg, msgspec.structs.replace(m, variants=variants, files=files), key)
    relist(pkg, "onnx/model.data", key)
    with pytest.raises(UnsafePathError, match="absolute"):
        read_package(pkg, public_key=key.public_key())


def test_garbage_onnx_file_is_refused(signed: Package, key: Ed25519PrivateKey) -> None:
    (signed.path / "onnx" / "model.onnx").write_bytes(b"\xff\xfe not a protobuf at all \x00\x01" * 3)
    relist(signed.path, "onnx/model.onnx", key)
    with pytest.raises(IntegrityError, match="not a readable ONNX model"):
        read_package(signed.path, public_key=key.public_key())


def test_garbage_holding_the_word_location_is_parsed_and_refused(signed: Package, key: Ed25519PrivateKey) -> None:
    (signed.path / "onnx" / "model.onnx").write_bytes(b"\xff\xfe location of nothing \x00\x01" * 3)
    relist(signed.path, "onnx/model.onnx", key)
    with pytest.raises(IntegrityError, match="not a readable ONNX model"):
        read_package(signed.path, public_key=key.public_key())


def test_top_level_fields_of_a_real_model_and_of_broken_bytes() -> None:
    data = _model("g").SerializeToString()
    fields = package_mod._top_level_fields(data)
    assert (package_mod.GRAPH_FIELD, 2) in fields and (1, 0) in fields  # graph; ir_version
    assert package_mod._top_level_fields(data[:-1]) == set()  # the graph's length runs past the end
    assert package_mod._top_level_fields(b"\x80") == set()  # a truncated varint
    assert package_mod._top_level_fields(b"\x0b") == set()  # wire type 3 (groups) is not ONNX
    assert package_mod._top_level_fields(b"") == set()


def test_checking_a_model_without_external_data_does_not_import_onnx(signed: Package) -> None:
    """The server reads every package at start; importing onnx took ~1 s of its cold start."""
    import subprocess
    import sys

    def onnx_imported(rel: str) -> str:
        code = (
            "import sys; from pathlib import Path; from runtime.package import check_onnx_external_data; "
            f"check_onnx_external_data(Path({str(signed.path)!r}), {rel!r}, {{'onnx/weights.bin'}}); "
            "print('onnx' in sys.modules)"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return out.stdout.strip()

    assert onnx_imported("onnx/model.onnx") == "False"
    assert onnx_imported("onnx/model.ext.onnx") == "True"  # external data: parsed and checked in full


# --------------------------------------------------------------------------- manifest paths


@pytest.mark.parametrize(
    "bad",
    ["/etc/passwd", "../outside.bin", "onnx/../../x", "onnx\\model.onnx", "a\x00b", "./onnx/model.onnx", "a//b", ""],
)
def test_unsafe_path_in_manifest_files_is_refused(signed: Package, key: Ed25519PrivateKey, bad: str) -> None:
    m = signed.manifest
    files = [*m.files, FileEntry(path=bad, sha256="0" * 64, bytes=1)]
    rewrite_manifest(signed.path, msgspec.structs.replace(m, files=files), key)
    with pytest.raises(UnsafePathError, match="package paths are relative"):
        read_package(signed.path, public_key=key.public_key())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("variant-unlisted", "is not in files"),
        ("variant-unsafe", "is absolute"),
        ("samples-unlisted", "samples file"),
        ("tokenizer-empty", "tokenizer_dir"),
        ("duplicate", "listed twice"),
        ("lists-manifest", "must not list"),
    ],
)
def test_manifest_references_must_be_listed(signed: Package, key: Ed25519PrivateKey, change: str, message: str) -> None:
    m = signed.manifest
    if change == "variant-unlisted":
        v = msgspec.structs.replace(m.variants[0], files=["onnx/nope.onnx"])
        m = msgspec.structs.replace(m, variants=[v, *m.variants[1:]])
    elif change == "variant-unsafe":
        v = msgspec.structs.replace(m.variants[0], files=["/etc/passwd"])
        m = msgspec.structs.replace(m, variants=[v, *m.variants[1:]])
    elif change == "samples-unlisted":
        m = msgspec.structs.replace(m, samples="samples/other.npz")
    elif change == "tokenizer-empty":
        m = msgspec.structs.replace(m, text=TextConfig(tokenizer_dir="tok"))
    elif change == "duplicate":
        m = msgspec.structs.replace(m, files=[*m.files, m.files[0]])
    else:
        m = msgspec.structs.replace(m, files=[*m.files, FileEntry(path=MANIFEST, sha256="0" * 64, bytes=1)])
    rewrite_manifest(signed.path, m, key)
    with pytest.raises((ManifestError, UnsafePathError), match=message):
        read_package(signed.path, public_key=key.public_key())


# --------------------------------------------------------------------------- signatures


def test_missing_signature_when_required(unsigned: Package, key: Ed25519PrivateKey) -> None:
    with pytest.raises(SignatureError, match=r"manifest.sig is missing.*public_key is set"):
        read_package(unsigned.path, public_key=key.public_key())


def test_signature_by_another_key(signed: Package) -> None:
    other = generate_private_key()
    with pytest.raises(SignatureError, match=f"does not verify with key {key_id(other)}"):
        read_package(signed.path, public_key=other.public_key())


@pytest.mark.parametrize("length", [0, 1, 63, 65])
def test_truncated_or_padded_signature(signed: Package, key: Ed25519PrivateKey, length: int) -> None:
    sig = (signed.path / SIGNATURE).read_bytes()
    (signed.path / SIGNATURE).write_bytes((sig + b"\x00")[:length])
    with pytest.raises(SignatureError, match=f"is {length} bytes"):
        read_package(signed.path, public_key=key.public_key())


def test_signature_of_another_manifest_is_refused(repo: Path, key: Ed25519PrivateKey) -> None:
    a = finalize_package(build_staging(repo), make_manifest(version=1), repo, signing_key=key)
    b = finalize_package(build_staging(repo), make_manifest(version=2), repo, signing_key=key)
    shutil.copyfile(a.path / SIGNATURE, b.path / SIGNATURE)
    with pytest.raises(SignatureError, match="does not verify"):
        read_package(b.path, public_key=key.public_key())


# --------------------------------------------------------------------------- writing


def _staging_leftovers(repo: Path) -> list[Path]:
    return list((repo / STAGING).iterdir()) if (repo / STAGING).exists() else []


def test_existing_version_is_refused(repo: Path, signed: Package, key: Ed25519PrivateKey) -> None:
    before = (signed.path / MANIFEST).read_bytes()
    staging = build_staging(repo)
    with pytest.raises(PackageError, match=r"already exists.*--version 2"):
        finalize_package(staging, make_manifest(), repo, signing_key=key)
    assert not staging.exists()
    assert _staging_leftovers(repo) == []
    assert (signed.path / MANIFEST).read_bytes() == before


def test_failed_rename_leaves_nothing(repo: Path, key: Ed25519PrivateKey, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", boom)
    staging = build_staging(repo)
    with pytest.raises(OSError, match="No space left"):
        finalize_package(staging, make_manifest(), repo, signing_key=key)
    assert not staging.exists()
    assert _staging_leftovers(repo) == []
    assert not (repo / "tiny" / "1").exists()


def test_failed_signing_leaves_nothing(repo: Path, monkeypatch: pytest.MonkeyPatch, key: Ed25519PrivateKey) -> None:
    def boom(private_key: object, data: bytes) -> bytes:
        raise RuntimeError("HSM unplugged")

    monkeypatch.setattr(package_mod, "sign", boom)
    with pytest.raises(RuntimeError, match="HSM"):
        finalize_package(build_staging(repo), make_manifest(), repo, signing_key=key)
    assert _staging_leftovers(repo) == []
    assert not (repo / "tiny").joinpath("1").exists()


@pytest.mark.parametrize(
    "problem", ["unlisted-variant-file", "symlink", "hard-link", "bad-name", "bad-version", "external-data"]
)
def test_invalid_staging_is_refused_and_removed(repo: Path, tmp_path: Path, problem: str) -> None:
    staging = build_staging(repo)
    manifest = make_manifest()
    expected: type[Exception] = UnsafePathError
    if problem == "unlisted-variant-file":
        (staging / "onnx" / "weights.bin").rename(staging / "weights.bin")
        expected = ManifestError  # variant onnx-ext names onnx/weights.bin, which is no longer there
    elif problem == "symlink":
        (staging / "onnx" / "alias.onnx").symlink_to(staging / "onnx" / "model.onnx")
    elif problem == "hard-link":
        os.link(staging / "onnx" / "model.onnx", tmp_path / "elsewhere")
    elif problem == "bad-name":
        manifest = make_manifest(name="../evil")
        expected = ManifestError
    elif problem == "bad-version":
        manifest = make_manifest(version=0)
        expected = ManifestError
    else:
        _set_location(staging / "onnx" / "model.ext.onnx", "../../../etc/passwd")
    with pytest.raises(expected):
        finalize_package(staging, manifest, repo)
    assert not staging.exists()
    assert _staging_leftovers(repo) == []
    assert sorted(p.name for p in repo.iterdir()) in ([STAGING], sorted([STAGING, LOCKS]))  # no version folder


def test_manifest_files_are_replaced_by_what_is_staged(repo: Path) -> None:
    stale = msgspec.structs.replace(make_manifest(), files=[FileEntry(path="ghost", sha256="0" * 64, bytes=0)])
    pkg = finalize_package(build_staging(repo), stale, repo)
    assert [f.path for f in pkg.manifest.files] == PACKAGE_FILES
    assert decode_manifest((pkg.path / MANIFEST).read_bytes()) == pkg.manifest
    # the staging folder was private (0700); the published package has its model folder's mode
    assert stat.S_IMODE(pkg.path.stat().st_mode) == stat.S_IMODE(pkg.path.parent.stat().st_mode)


# --------------------------------------------------------------------------- codec round trip

_names = st.text(min_size=1, max_size=12)
_floats = st.floats(allow_nan=False, allow_infinity=False)
_prec = st.sampled_from(["fp32", "bf16", "fp16"])
_acc = st.builds(
    Accuracy,
    runtime=st.sampled_from(["onnxruntime", "openvino"]),
    exec_precision=_prec,
    samples=st.integers(0, 10**6),
    metrics=st.dictionaries(_names, _floats, max_size=3),
    gate=st.dictionaries(_names, _floats, max_size=3),
    passed=st.booleans(),
    reference=st.sampled_from(["pytorch", "onnx-fp32"]),
)
_timing = st.builds(
    Timing,
    backend=_names,
    exec_precision=_prec,
    scenario=_names,
    batch=st.integers(1, 512),
    seq_len=st.none() | st.integers(1, 4096),
    p50_ms=_floats,
    p99_ms=_floats,
    items_per_s=_floats,
    threads=st.integers(0, 256),
)
_variant = st.builds(
    Variant,
    id=_names,
    format=st.sampled_from(["onnx", "openvino"]),
    precision=st.sampled_from(["fp32", "fp16", "int8"]),
    files=st.lists(_names, min_size=1, max_size=3),
    backends=st.lists(_names, max_size=3),
    recipe=st.text(max_size=30),
    accuracy=st.lists(_acc, max_size=2),
    timings=st.lists(_timing, max_size=2),
)
_spec = st.builds(TensorSpec, name=_names, dtype=_names, shape=st.lists(st.integers(-1, 1 << 20), max_size=4))
_manifest = st.builds(
    Manifest,
    name=_names,
    version=st.integers(0, 1 << 31),
    task=st.sampled_from(["feature-extraction", "text-classification", "image-classification", "tensor"]),
    inputs=st.lists(_spec, max_size=3),
    outputs=st.lists(_spec, max_size=3),
    variants=st.lists(_variant, max_size=3),
    files=st.lists(
        st.builds(
            FileEntry,
            path=_names,
            sha256=st.text("0123456789abcdef", min_size=64, max_size=64),
            bytes=st.integers(0, 1 << 40),
        ),
        max_size=4,
    ),
    provenance=st.builds(
        Provenance,
        source_kind=st.sampled_from(["hf", "pytorch", "onnx"]),
        source=st.text(max_size=40),
        source_sha256=st.text("0123456789abcdef", max_size=64),
        created_at=st.text(max_size=25),
        tool_versions=st.dictionaries(_names, _names, max_size=3),
        machine=st.dictionaries(_names, _names, max_size=3),
    ),
    text=st.none()
    | st.builds(
        TextConfig,
        tokenizer_dir=_names,
        max_length=st.integers(1, 8192),
        input_map=st.dictionaries(
            _names, st.sampled_from(["input_ids", "attention_mask", "token_type_ids"]), max_size=3
        ),
        output=st.text(max_size=20),
        pooling=st.sampled_from(["mean", "cls", "none"]),
        normalize=st.booleans(),
        do_lower_case=st.booleans(),
    ),
    labels=st.none() | st.lists(st.text(max_size=10), max_size=4),
    samples=st.none() | _names,
    attempts=st.lists(
        st.builds(
            Attempt,
            variant=_names,
            recipe=_names,
            kept=st.booleans(),
            reason=st.text(max_size=20),
            accuracy=st.lists(_acc, max_size=1),
        ),
        max_size=2,
    ),
    notes=st.dictionaries(_names, st.text(max_size=20), max_size=3),
)


@settings(max_examples=150, deadline=None)
@given(_manifest)
def test_manifest_round_trip(manifest: Manifest) -> None:
    data = encode_manifest(manifest)
    back = decode_manifest(data)
    assert back == manifest
    assert encode_manifest(back) == data  # canonical: the same bytes, so the same sha256 and signature
    assert data.endswith(b"\n")


def test_a_package_may_not_take_a_name_the_api_routes_take(tmp_path: Path) -> None:
    # GET /v2/models/stats is every model's statistics: a model called "stats" would lose its metadata
    from runtime.errors import ManifestError
    from tests.runtime.conftest import publish_mlp

    with pytest.raises(ManifestError, match=r"model name 'stats' is taken by the API.*--name"):
        publish_mlp(tmp_path / "repo", ["ort-cpu"], "stats")
    assert not (tmp_path / "repo" / "stats").exists()
    publish_mlp(tmp_path / "repo", ["ort-cpu"], "statistics")  # only the route's own name is taken

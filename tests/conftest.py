"""Session-wide fixtures shared by every test area.

``minilm_repository``: the default MiniLM package, built ONCE per test run by
the same code path as ``inferbox init`` (quick timing), in a temporary
repository; under pytest-xdist (``make test``) every worker shares the one
build.  Depend on it freely; it returns the repository Path, holding
``minilm/1``.  Treat the repository as read-only: other processes read it.

``tls_files``: a private CA with a server certificate for 127.0.0.1 /
localhost and a client certificate it signed (:func:`make_tls_files` makes
other sets, e.g. one about to expire).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runtime.offline import stay_offline

stay_offline()  # the test session is an entry point: no OpenVINO / NNCF telemetry from tests


@pytest.fixture(scope="session")
def minilm_repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield _build_minilm(tmp_path_factory.mktemp("minilm-home"))
        return
    # pytest-xdist (``make test`` runs a worker per core): one build for every worker, in the folder
    # the workers' temporary folders share; the first worker to need it builds it, the others wait
    import fcntl

    shared = tmp_path_factory.getbasetemp().parent
    home = shared / "minilm-home"
    with (shared / "minilm-home.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (home / "models" / "minilm" / "1" / "manifest.json").is_file():
            if home.exists():  # a worker's build failed: build afresh
                import shutil

                shutil.rmtree(home)
            home.mkdir()
            _build_minilm(home)
    yield home / "models"


def _build_minilm(home: Path) -> Path:
    """``inferbox init --timing quick`` into ``home``: its repository, holding ``minilm/1``."""
    from click.testing import CliRunner

    from appliance.cli import main

    repository = home / "models"
    result = CliRunner().invoke(
        main,
        ["init", "--home", str(home), "--repository", str(repository), "--timing", "quick"],
        env={k: None for k in os.environ if k.startswith("INFERBOX_")},
        catch_exceptions=False,
    )
    if result.exit_code != 0 or not (repository / "minilm" / "1" / "manifest.json").is_file():
        pytest.fail(f"building the MiniLM package failed (exit {result.exit_code}):\n{result.output[-4000:]}")
    return repository


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run the first test file that needs the MiniLM package first, then the files that do not
    need it, then the other files that do.  Under pytest-xdist (``make test``: ``--dist loadfile
    --no-loadscope-reorder`` hands the files out in this order) one worker builds the package
    (2.5-3 minutes on 2 busy cores) while the others run the tests that do not wait for it; with
    the files handed out largest first, two workers reached it together and one waited ~2
    minutes.  Run one at a time, the order changes nothing."""

    def file_of(item: pytest.Item) -> str:
        return item.nodeid.split("::")[0]

    needs: dict[str, bool] = {}
    for item in items:
        needs[file_of(item)] = needs.get(file_of(item), False) or "minilm_repository" in getattr(
            item, "fixturenames", ()
        )
    first = next((f for f, needed in needs.items() if needed), None)
    rank = {f: 0 if f == first else 2 if needed else 1 for f, needed in needs.items()}
    items.sort(key=lambda item: rank[file_of(item)])


@dataclass(frozen=True)
class TlsFiles:
    """A private CA, a server certificate for 127.0.0.1 / localhost it signed, and a client certificate."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path
    folder: Path

    def copy_server_pair(self, folder: Path) -> tuple[Path, Path]:
        """The server certificate and key copied into ``folder`` (key 0600): files a test may renew."""
        import shutil

        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / "server.crt", folder / "server.key"
        shutil.copy(self.cert, cert)
        shutil.copy(self.key, key)
        key.chmod(0o600)
        return cert, key


def _keypair_files(
    folder: Path,
    name: str,
    *,
    issuer: tuple[Any, Any] | None,
    days: float = 30,
    start_days: float = -1,
    sans: tuple[str, ...] = (),
    is_ca: bool = False,
) -> tuple[Path, Path, Any, Any]:
    """A certificate (and its key) signed by ``issuer`` (cert, key), or self-signed; PEM files, key 0600."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer if issuer is not None else (None, key)
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + timedelta(days=start_days))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if sans:
        entries: list[x509.GeneralName] = []
        for san in sans:
            try:
                entries.append(x509.IPAddress(ipaddress.ip_address(san)))
            except ValueError:
                entries.append(x509.DNSName(san))
        builder = builder.add_extension(x509.SubjectAlternativeName(entries), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path, key_path = folder / f"{name}.crt", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path, cert, key


def make_tls_files(folder: Path, *, server_days: float = 30, server_start_days: float = -1) -> TlsFiles:
    """``server_days``: the server certificate's validity from now; ``server_start_days``: from when."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_path, _, ca_cert, ca_key = _keypair_files(folder, "test-ca", issuer=None, days=365, is_ca=True)
    cert, key, _, _ = _keypair_files(
        folder,
        "server",
        issuer=(ca_cert, ca_key),
        days=server_days,
        start_days=server_start_days,
        sans=("127.0.0.1", "localhost"),
    )
    client_cert, client_key, _, _ = _keypair_files(folder, "client", issuer=(ca_cert, ca_key))
    return TlsFiles(ca_path, cert, key, client_cert, client_key, folder)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def tls_factory(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``tls_factory(server_days=...)``: another CA / server / client set (e.g. a certificate near expiry)."""

    def make(*, server_days: float = 30, server_start_days: float = -1) -> TlsFiles:
        return make_tls_files(
            tmp_path_factory.mktemp("tls"), server_days=server_days, server_start_days=server_start_days
        )

    return make

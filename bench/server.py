"""Start a real inferbox server subprocess on 127.0.0.1 for the HTTP benchmarks.

It runs ``inferbox serve --host 127.0.0.1 --port P --home H`` with a private
home (so the bench never touches the operator's keys or audit log) and the
real repository.  With auth on (the default), the API key comes from
``inferbox keys create --json`` run against that home beforehand; when that
fails, :class:`ServerError` says why (a server every request of which got a 401
would measure nothing).  It is always the real ``serve``: a stand-in composed
here could hide a broken serve behind good numbers.

Readiness is ``GET /v2/health/ready`` answering 200; the time from ``Popen``
to that answer is the cold start.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import free_port

__all__ = [
    "ServerError",
    "ServerHandle",
    "ensure_signing_key",
    "fresh_home",
    "inferbox_command",
    "running_server",
    "server_env",
    "wait_ready",
]


class ServerError(RuntimeError):
    """The server did not come up; the message holds the tail of its output."""


@dataclass
class ServerHandle:
    base_url: str
    api_key: str | None
    mode: str  # always "serve" (kept in the results for their shape)
    ready_s: float  # Popen -> /v2/health/ready 200
    home: Path
    pid: int
    output: list[str] = field(default_factory=list)
    #: why ``serve`` did not come up when the fallback ran instead
    serve_error: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def inferbox_command() -> list[str]:
    """How to run the ``inferbox`` CLI of this interpreter's environment."""
    exe = Path(sys.executable).parent / "inferbox"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "from appliance.cli import main; main()"]


def server_env(
    home: Path, repository: Path, audit: bool, auth: bool, extra: Mapping[str, str] | None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBOX_")}
    env.update(
        {
            "INFERBOX_HOME": str(home),
            "INFERBOX_REPOSITORY": str(repository),
            "INFERBOX_AUDIT": "true" if audit else "false",
            "INFERBOX_AUTH": "true" if auth else "false",
            "INFERBOX_LOG_LEVEL": "warning",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    # run the tree this bench sits in (also makes `bench` importable for the fallback server)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env.update(extra or {})
    return env


def _create_key(env: Mapping[str, str]) -> str:
    proc = subprocess.run(
        [*inferbox_command(), "keys", "create", "--scope", "infer", "--name", "bench", "--json"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        raise ServerError(f"inferbox keys create failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    try:
        key = json.loads(proc.stdout).get("key")
    except (json.JSONDecodeError, AttributeError):
        key = None
    if not isinstance(key, str) or not key:
        raise ServerError(f"inferbox keys create --json printed no key: {proc.stdout.strip()[-200:]!r}")
    return key


def ensure_signing_key(home: Path) -> None:
    """A signing key in the private home (the audit log signs checkpoints with it)."""
    path = home / "keys" / "signing.key"
    if path.exists():
        return
    try:
        from runtime.signing import generate_private_key, write_private_key
    except ImportError:
        return
    write_private_key(generate_private_key(), path)


def _reader(stream: object, sink: list[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.append(line.rstrip("\n"))


def wait_ready(base_url: str, *, timeout_s: float, proc: subprocess.Popen[str], poll_s: float = 0.02) -> float:
    """Poll ``/v2/health/ready`` until 200; returns the seconds waited. Raises ServerError."""
    import httpx

    t0 = time.perf_counter()
    with httpx.Client(timeout=2.0) as client:
        while time.perf_counter() - t0 < timeout_s:
            if proc.poll() is not None:
                raise ServerError(f"server exited with status {proc.returncode} before it was ready")
            try:
                if client.get(base_url + "/v2/health/ready").status_code == 200:
                    return time.perf_counter() - t0
            except httpx.TransportError:
                pass
            time.sleep(poll_s)
    raise ServerError(f"server not ready after {timeout_s:.0f} s")


def _stop(proc: subprocess.Popen[str], reader: threading.Thread) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    reader.join(timeout=5)


def _start(
    home: Path, env: Mapping[str, str], timeout_s: float
) -> tuple[subprocess.Popen[str], threading.Thread, ServerHandle]:
    port = free_port()
    cmd = [*inferbox_command(), "serve", "--host", "127.0.0.1", "--port", str(port), "--home", str(home)]
    base_url = f"http://127.0.0.1:{port}"
    output: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    reader = threading.Thread(target=_reader, args=(proc.stdout, output), daemon=True)
    reader.start()
    try:
        wait_ready(base_url, timeout_s=timeout_s, proc=proc)
    except ServerError as exc:
        _stop(proc, reader)
        tail = "\n".join(output[-12:])
        raise ServerError(f"serve: {exc}\n{tail}") from None
    handle = ServerHandle(
        base_url=base_url,
        api_key=None,
        mode="serve",
        ready_s=time.perf_counter() - t0,
        home=home,
        pid=proc.pid,
        output=output,
    )
    return proc, reader, handle


@contextmanager
def running_server(
    repository: Path,
    home: Path,
    *,
    audit: bool = True,
    auth: bool = True,
    timeout_s: float = 120.0,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[ServerHandle]:
    """Start a server, wait until ready, yield its handle, stop it (SIGTERM, then SIGKILL).

    A server that does not come up raises :class:`ServerError` with its output's tail.
    """
    home.mkdir(parents=True, exist_ok=True)
    env = server_env(home, repository, audit, auth, extra_env)
    ensure_signing_key(home)
    key = _create_key(env) if auth else None
    proc, reader, handle = _start(home, env, timeout_s)
    handle.api_key = key
    try:
        yield handle
    finally:
        _stop(proc, reader)


def fresh_home(root: Path, name: str) -> Path:
    """An empty private home under ``root`` (removed first if present)."""
    path = root / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, mode=0o700)
    return path

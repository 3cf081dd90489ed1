"""A closed-loop load generator written in C (``wrk``), for the HTTP parts.

On a 2-core box a Python client (httpx) burns ~0.6 of a core at 200 req/s
(measured: 9.1 s CPU in 15.4 s), a third of the machine the server is being
measured on; wrk uses ~0.01.  With wrk on PATH (Debian: ``apt-get install
wrk``) the HTTP parts measure the server, not the client; without it they fall
back to the Python client and say so in the results (``client``).

wrk keeps ``connections`` requests in flight (one per connection, each sent
when the previous answered): the same closed loop as :func:`bench.http.closed_loop`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["available", "lua_script", "parse_output", "run"]

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def available() -> str | None:
    return shutil.which("wrk")


def _long_string(text: str) -> str:
    level = 0
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return f"[{eq}[{text}]{eq}]"


def lua_script(path: str, bodies: Sequence[bytes], headers: dict[str, str]) -> str:
    """A wrk script that POSTs ``bodies`` to ``path`` in turn."""
    lines = ["local bodies = {"]
    lines += [f"  {_long_string(b.decode('utf-8'))}," for b in bodies]
    lines.append("}")
    lines.append('wrk.method = "POST"')
    for name, value in {"Content-Type": "application/json", **headers}.items():
        lines.append(f"wrk.headers[ {_long_string(name)} ] = {_long_string(value)}")
    lines += [
        "local counter = 0",
        "request = function()",
        "  counter = counter + 1",
        f"  return wrk.format(nil, {_long_string(path)}, nil, bodies[(counter % #bodies) + 1])",
        "end",
    ]
    return "\n".join(lines) + "\n"


def _ms(value: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", value.strip())
    if m is None:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_output(text: str, concurrency: int) -> dict[str, Any]:
    """requests/s (2xx only), p50/p99 latency (ms) and errors from wrk's ``--latency`` report."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    if done is None:
        raise ValueError(f"wrk printed no request count:\n{text[-800:]}")
    requests = int(done.group(1))
    seconds = _ms(done.group(2) + done.group(3)) / 1000.0
    errors: dict[str, int] = {}
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    if bad:
        errors["non-2xx"] = int(bad.group(1))
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if sock:
        for name, value in zip(("connect", "read", "write", "timeout"), sock.groups(), strict=True):
            if int(value):
                errors[name] = int(value)
    ok = requests - errors.get("non-2xx", 0)
    out: dict[str, Any] = {
        "concurrency": concurrency,
        "requests": requests,
        "ok": ok,
        "errors": errors,
        "seconds": seconds,
        "rps": ok / seconds if seconds > 0 else 0.0,
        "client": "wrk",
    }
    # wrk pads a one-letter unit with a trailing space ("   99%    1.40s "): two-letter ones have none
    for pct, key in (("50", "p50_ms"), ("99", "p99_ms")):
        m = re.search(rf"^\s+{pct}%\s+(\S+)\s*$", text, flags=re.M)
        if m:
            out[key] = _ms(m.group(1))
    return out


def run(
    base_url: str, path: str, bodies: Sequence[bytes], headers: dict[str, str], *, concurrency: int, duration_s: float
) -> dict[str, Any]:
    """One wrk run: ``concurrency`` connections for ``duration_s`` seconds, one thread."""
    binary = available()
    if binary is None:
        raise FileNotFoundError("wrk is not installed (apt-get install wrk)")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "load.lua"
        script.write_text(lua_script(path, bodies, headers), encoding="utf-8")
        seconds = max(1, round(duration_s))
        command = [binary, "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "60s", "--latency"]
        done = subprocess.run(
            [*command, "-s", str(script), base_url],
            capture_output=True,
            text=True,
            timeout=seconds + 120,
            check=False,
        )
    if done.returncode != 0 or "load.lua" in done.stderr:
        # wrk carries on with plain GETs when its script does not load: never measure that.
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr[-500:]}")
    return parse_output(done.stdout, concurrency)

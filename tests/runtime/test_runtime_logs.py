"""One log line a record: what a client put in a name cannot start a line of its own."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from runtime.logs import FORMAT, OneLineFormatter, one_line

ROOT = Path(__file__).resolve().parents[2]
FORGED = "2026-12-07 11:99:99,000 ERROR forged: audit disabled"


def _record(msg: str, *args: object, exc_info: object = None) -> logging.LogRecord:
    return logging.LogRecord("runtime.serving", logging.WARNING, __file__, 1, msg, args, exc_info)  # type: ignore[arg-type]


def test_control_characters_of_a_message_are_escaped_and_tabs_kept() -> None:
    assert one_line("a\nb\r\x00c\x1b[31m\x7f\x85d\u2028e\tf") == "a\\nb\\r\\x00c\\x1b[31m\\x7f\\x85d\\u2028e\tf"
    assert one_line("caf\u00e9 \u20ac") == "caf\u00e9 \u20ac"  # text is text


def test_a_name_with_a_newline_makes_one_line() -> None:
    line = OneLineFormatter(FORMAT).format(_record("model %s did not load", f"x\n{FORGED}"))
    assert "\n" not in line and line.endswith(f"model x\\n{FORGED} did not load")


def test_a_traceback_keeps_its_lines_but_not_the_exception_s_newlines() -> None:
    """A 500's traceback ends with the exception's text, which may hold what a client sent."""
    try:
        try:
            raise KeyError("inner")
        except KeyError as inner:
            raise ValueError(f"model x\n{FORGED}") from inner
    except ValueError:
        record = _record("failed: %s", "a\nb", exc_info=sys.exc_info())
    text = OneLineFormatter(FORMAT).format(record)
    first, *rest = text.splitlines()
    assert first.endswith("failed: a\\nb") and rest[0] == "Traceback (most recent call last):"
    assert rest[-1] == f"ValueError: model x\\n{FORGED}"
    assert "The above exception was the direct cause of the following exception:" in rest
    assert sum(line.startswith("  File ") for line in rest) == 2  # the stack, line by line
    assert not any(line.startswith(FORGED[:10]) for line in rest)
    assert record.getMessage() == "failed: a\nb"  # other handlers (pytest's, a test's) see it unchanged


def _forged_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip(" |").startswith(FORGED)]


def test_notes_and_grouped_exceptions_cannot_start_a_line_either() -> None:
    """Python yields a note line by line, and a grouped exception's message behind a margin
    (``    | ``): both got through as lines of their own."""
    noted = ValueError("noted")
    noted.add_note(f"\n{FORGED}")
    noted.add_note(f"  {FORGED}")
    group = ExceptionGroup(f"group\n{FORGED}", [ValueError(f"a\n{FORGED}"), TypeError(f"b\n{FORGED}")])
    for exc in (noted, group):
        try:
            raise exc
        except Exception:
            record = _record("failed", exc_info=sys.exc_info())
        text = OneLineFormatter(FORMAT).format(record)
        assert _forged_lines(text) == [], text
        assert sum(line.lstrip(" |").startswith("File ") for line in text.splitlines()) >= 1, text
    assert f"ValueError: noted\\n\\n{FORGED}\\n  {FORGED}" in OneLineFormatter(FORMAT).format(
        _record("failed", exc_info=(ValueError, noted, noted.__traceback__))
    )
    deep = RecursionError("maximum recursion depth exceeded")
    assert "RecursionError: maximum recursion depth exceeded" in OneLineFormatter(FORMAT).format(
        _record("failed", exc_info=(RecursionError, deep, None))
    )


def test_a_traceback_another_formatter_left_on_the_record_is_not_reused() -> None:
    try:
        raise ValueError(f"x\n{FORGED}")
    except ValueError:
        record = _record("failed", exc_info=sys.exc_info())
    plain = logging.Formatter(FORMAT).format(record)  # another handler's, first: it caches exc_text
    assert FORGED in plain.splitlines()[-1] and record.exc_text
    assert _forged_lines(OneLineFormatter(FORMAT).format(record)) == []
    assert record.exc_text and FORGED in record.exc_text.splitlines()[-1]  # the record left as it was


def test_configure_writes_one_line_records_to_stderr() -> None:
    code = (
        "import logging; from runtime.logs import configure; configure('info'); "
        f"logging.getLogger('t').info('model %s', {('x' + chr(10) + FORGED)!r})"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True, timeout=60
    )
    (line,) = done.stderr.splitlines()
    assert line.endswith(f"INFO t: model x\\n{FORGED}")


def test_uvicorns_info_lines_are_not_shown_under_an_error_logger_name() -> None:
    """serve hands uvicorn's loggers to the root logger (one format, no colour codes); its start and
    stop lines come from "uvicorn.error", which a grep for errors then found at every start."""
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server process [%d]", (7,), None)
    line = OneLineFormatter(FORMAT).format(record)
    assert line.endswith(" INFO uvicorn: Started server process [7]") and "error" not in line
    assert record.name == "uvicorn.error"  # other handlers see the record as it was
    other = logging.LogRecord("uvicorn.errors", logging.INFO, __file__, 1, "x", None, None)
    assert " uvicorn.errors: x" in OneLineFormatter(FORMAT).format(other)


def test_under_systemd_each_line_carries_its_priority_for_the_journal(tmp_path: Path) -> None:
    """Every line reached the journal as priority info: `journalctl -p err -u inferbox-api` found none
    of the service's errors. With stderr the stream JOURNAL_STREAM names, lines start with <N>."""
    code = (
        "import logging, os, sys; st = os.fstat(2); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'\n"
        "from runtime.logs import configure; configure('info'); log = logging.getLogger('t')\n"
        "log.info('started'); log.warning('slow'); log.error('failed')\n"
        "try:\n    raise ValueError('boom')\nexcept ValueError:\n    log.exception('crashed')\n"
    )
    err = tmp_path / "stderr.txt"
    with err.open("w") as stream:  # a file: its device and inode stand in for the journal's socket
        subprocess.run([sys.executable, "-c", code], stderr=stream, cwd=ROOT, check=True, timeout=60)
    lines = err.read_text().splitlines()
    assert lines[0].startswith("<6>") and lines[0].endswith("INFO t: started")
    assert lines[1].startswith("<4>") and lines[2].startswith("<3>") and lines[2].endswith("ERROR t: failed")
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[3:])  # the traceback's lines too
    # the variable inherited by a command run by hand (another stderr): no prefixes
    other = subprocess.run(
        [sys.executable, "-c", code.replace("os.fstat(2)", "os.fstat(0)")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert not any(line.startswith("<") for line in other.stderr.splitlines())


def test_a_commands_fatal_error_line_carries_the_err_priority_under_systemd(tmp_path: Path) -> None:
    """A unit's fatal refusal (a port in use, a bad setting) went to the journal as info: `journalctl -p err`
    did not show why the unit failed."""
    err = tmp_path / "stderr.txt"
    err.touch()
    st = err.stat()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERBOX_")}
    with err.open("w") as stream:
        done = subprocess.run(
            [sys.executable, "-m", "appliance", "keys", "list", "--home", str(tmp_path / "no-such-home")],
            stderr=stream,
            cwd=ROOT,
            env={**env, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            timeout=120,
            check=False,
        )
    assert done.returncode == 2
    assert err.read_text().startswith("<3>error: "), err.read_text()

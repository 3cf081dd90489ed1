"""The one exception hierarchy of inferbox.

Every error the four packages raise on purpose derives from :class:`InferboxError`.
Each message says what was wrong and what to do about it (which field, which
value, which install extra).  The tree::

    InferboxError
    ├── ConfigError                 settings: bad value, unknown key, bad file
    │   └── InstallError            `inferbox install` cannot set the box up
    ├── PackageError                a model package cannot be used
    │   ├── ManifestError           manifest.json missing, unreadable or invalid
    │   ├── IntegrityError          a file's sha256/size differs, a file is missing or extra
    │   ├── UnsafePathError         symlink, hard link, absolute or `..` path,
    │   │                           ONNX external data outside the package
    │   └── SignatureError          manifest.sig missing / bad / wrong key
    ├── ModelNotFoundError          no such model or version in the repository
    │   └── ModelKindError          loaded, but not the kind the route serves (404)
    ├── BackendError                a backend could not open or run a session
    │   ├── BackendUnavailableError the backend's library / device is not here
    │   └── FallbackError           the session silently runs somewhere else
    ├── SelectionError              no (backend, variant) can run this package
    ├── InputError                  request data does not fit the model (field named)
    │   ├── PayloadTooLargeError    request body over the size limit, also after decompression (413)
    │   ├── BodyTimeoutError        request body not received in full in time (408)
    │   └── FirstKeyExistsError     the first admin key exists already (another process made it)
    ├── ExportError                 the export pipeline failed
    │   ├── SourceError             bad source: missing file, wrong task, unreadable ONNX
    │   ├── CalibrationError        calibration / validation sample file has bad rows
    │   └── GateError               no variant passed its accuracy gate
    ├── AuthError                   missing / wrong / revoked / expired key (401)
    │   └── ForbiddenError          key lacks the scope (403)
    ├── OverloadError               queue full (429/503, has retry_after)
    ├── RequestTimeoutError         request waited longer than its timeout (504)
    ├── ClientGoneError             the client left before its answer (499, no traceback)
    ├── AuditError                  the audit log cannot be written or read
    │   └── VerificationError       the chain or a checkpoint does not verify
    ├── BatchError                  spool / job problems
    │   ├── InputChangedError       a job's input changed after it was planned
    │   └── RecordError             one record cannot be used: it goes to the rejects
    ├── BackupError                 a backup cannot be written or restored
    └── BenchError                  a load test cannot run (server, key, model named)
"""

from __future__ import annotations

__all__ = [
    "AuditError",
    "AuthError",
    "BackendError",
    "BackendUnavailableError",
    "BackupError",
    "BatchError",
    "BenchError",
    "BodyTimeoutError",
    "CalibrationError",
    "ClientGoneError",
    "ConfigError",
    "ExportError",
    "FallbackError",
    "ForbiddenError",
    "GateError",
    "InferboxError",
    "InputError",
    "IntegrityError",
    "ManifestError",
    "ModelNotFoundError",
    "OverloadError",
    "PackageError",
    "PayloadTooLargeError",
    "RequestTimeoutError",
    "SelectionError",
    "SignatureError",
    "SourceError",
    "UnsafePathError",
    "VerificationError",
    "shown",
]


class InferboxError(Exception):
    """Base of every deliberate inferbox error."""


class ConfigError(InferboxError):
    """Settings are invalid. ``problems`` lists every problem found at once; one problem given as a
    string (a flag, a key file) is the message itself, without the settings list's framing."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if isinstance(problems, str):
            super().__init__(problems)
        else:
            super().__init__("invalid settings:\n  - " + "\n  - ".join(self.problems))


class PackageError(InferboxError):
    """A model package cannot be used. ``path`` names the offending file if any."""

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(message)


class ManifestError(PackageError):
    pass


class IntegrityError(PackageError):
    pass


class UnsafePathError(PackageError):
    pass


class SignatureError(PackageError):
    pass


class ModelNotFoundError(InferboxError):
    """``loaded``: the names of the models that are loaded, where the message lists them; a server
    answering a key narrowed to some models says :attr:`narrow` instead (the others are not its to know)."""

    def __init__(self, message: str, *, loaded: list[str] | None = None) -> None:
        self.narrow = message
        self.loaded = loaded
        super().__init__(message if loaded is None else message.replace("{loaded}", f"; loaded models: {loaded}"))
        if loaded is not None:
            self.narrow = message.replace("{loaded}", "")


class ModelKindError(ModelNotFoundError):
    """The model is loaded but is not the kind the route serves (``/v1/embeddings`` given a
    classifier): still a 404 for the route, but OpenAI's ``model_not_found`` would say it is not there."""

    #: the request field at fault, as :class:`InputError` names it
    field = "model"


class BackendError(InferboxError):
    pass


class BackendUnavailableError(BackendError):
    pass


class FallbackError(BackendError):
    """The session does not run where it was asked to (e.g. CUDA EP -> CPU)."""

    def __init__(self, message: str, requested: str, active: list[str]) -> None:
        self.requested = requested
        self.active = active
        super().__init__(message)


class SelectionError(InferboxError):
    pass


class InputError(InferboxError):
    """Request data does not fit. ``field`` names the offending field (client-facing)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        self.field = field
        super().__init__(message)


class PayloadTooLargeError(InputError):
    pass


class BodyTimeoutError(InputError):
    """The request's body did not arrive in full within ``body_timeout_s`` (a stalled or slow client)."""


class ExportError(InferboxError):
    pass


class SourceError(ExportError):
    pass


class CalibrationError(ExportError):
    pass


class GateError(ExportError):
    pass


class AuthError(InferboxError):
    """Not authenticated. ``key_id``: the id of a real key that was refused (revoked, expired, bound
    to another certificate), for the audit record; None when no key could be identified."""

    def __init__(self, message: str, key_id: str | None = None) -> None:
        self.key_id = key_id
        super().__init__(message)


class ForbiddenError(AuthError):
    pass


class OverloadError(InferboxError):
    """429: the server's queue is full (``code`` ``server_busy``: back off from the server), or a key's
    rate limit is reached (``rate_limit_exceeded``: slow that key down)."""

    def __init__(self, message: str, retry_after: float = 1.0, code: str = "server_busy") -> None:
        self.retry_after = retry_after
        self.code = code
        super().__init__(message)


class RequestTimeoutError(InferboxError):
    pass


class ClientGoneError(InferboxError):
    """The client closed the connection before its answer (a body cut short): nothing to answer, no fault
    of the server (status 499, as nginx records it; logged without a traceback)."""


class AuditError(InferboxError):
    pass


class VerificationError(AuditError):
    """The audit chain does not verify. ``seq`` is the first failing record, if any."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        self.seq = seq
        super().__init__(message)


class BatchError(InferboxError):
    pass


class BenchError(InferboxError):
    """A benchmark cannot run: the server is unreachable, refuses the key, lacks the model (it names the fix)."""


class BackupError(InferboxError):
    """A backup cannot be written, or an archive cannot be restored (it names the file and the fix)."""


#: how much of a name a client gave an error message repeats
SHOWN_CHARS = 100


def shown(name: str) -> str:
    """``repr`` of a name a client gave (a model, an input), cut to :data:`SHOWN_CHARS` characters: an
    error answer repeats what was asked for, not the 100 kB a client sent (nor its newlines raw)."""
    if len(name) <= SHOWN_CHARS:
        return repr(name)
    return f"{name[:SHOWN_CHARS]!r}... ({len(name)} characters)"

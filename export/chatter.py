"""Keep the toolchain's own log lines out of an export's log (``inferbox serve``'s first build included).

ONNX Runtime's quantizer logs on the root logger: a line per tensor it leaves
alone (70 for MiniLM) and a warning per recipe that asks for a pre-processing
step the pipeline already does its own way; its transformers optimizer logs
every fusion (``fusion_base``, ``onnx_model``); NNCF logs each node it leaves
in fp32 on its own ``nncf`` logger, and draws a progress bar per step of each
OpenVINO INT8 recipe (4-5 lines a recipe in a log, each step a second or two).
On a first ``make run`` that was ~140 lines around the pipeline's ~25, which
already say what was fused, quantized and why a recipe failed.  :func:`quieted`
drops ONNX Runtime's records below WARNING (and that one warning), NNCF's below
WARNING and its progress bars while an export runs, unless the root logger is at
DEBUG, where an operator asked for everything.  Every other warning and error
still reaches the log, but for three lines an offline operator can do nothing
about, printed on every first start: transformers' "`torch_dtype` is
deprecated" (optimum's call, not ours), optimum's advice to install accelerate
(a check of tied weights MiniLM has none of), and the tracer's warning about
the constant in transformers' attention-mask code (:data:`KNOWN_NOISE`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

__all__ = ["quieted"]

#: loggers of libraries that log under their own name; WARNING and above still pass
OWN_LOGGERS = ("nncf",)
#: in ONNX Runtime's warning that asks for its pre-processing script on every quantizer call (the
#: pipeline's inputs are already shape-inferred ONNX it validates end to end)
PREPROCESS_ADVICE = "pre-process"


#: logger -> the start of a warning of it that is noise here (see the module)
KNOWN_NOISE = {
    "transformers.configuration_utils": "`torch_dtype` is deprecated!",
    "optimum.exporters.onnx.base": "Weight deduplication check in the ONNX export requires accelerate",
}
#: the tracer's warning (a Python warning) about ``torch.tensor(1.0)`` in transformers' mask code
TRACER_NOISE = r"torch\.tensor results are registered as constants in the trace"


class _Noise(logging.Filter):
    def __init__(self, start: str) -> None:
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def _onnxruntime_dir() -> str | None:
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "")


class _OnnxRuntimeChatter(logging.Filter):
    """Drops records made in ONNX Runtime's Python files below WARNING, and its pre-processing advice."""

    def __init__(self, folder: str) -> None:
        super().__init__()
        self.folder = folder

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.pathname.startswith(self.folder):
            return True
        if record.levelno < logging.WARNING:
            return False
        return not (record.levelno == logging.WARNING and PREPROCESS_ADVICE in record.getMessage())


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """NNCF's progress bars (``rich`` on its shared console, where NNCF passes none) draw nothing."""
    try:
        import rich
    except ImportError:  # no rich, no NNCF: nothing draws them
        yield
        return
    console = rich.get_console()
    was = console.quiet
    console.quiet = True
    try:
        yield
    finally:
        console.quiet = was


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING


@contextlib.contextmanager
def quieted() -> Iterator[None]:
    """While the block runs, the toolchain's chatter stays out of the log (see the module)."""
    root = logging.getLogger()
    folder = _onnxruntime_dir()
    if root.getEffectiveLevel() <= logging.DEBUG or folder is None:
        yield
        return
    chatter, below = _OnnxRuntimeChatter(folder), _BelowWarning()
    # records made on the root logger (the quantizer's logging.info) pass the root logger's
    # filters; those of named loggers (fusion_base, ...) only its handlers'.  NNCF's logger gets
    # a filter, not a level: importing nncf (inside the block, the first time) sets its level.
    handlers = list(root.handlers)
    root.addFilter(chatter)
    for handler in handlers:
        handler.addFilter(chatter)
    own = [logging.getLogger(name) for name in OWN_LOGGERS]
    for logger in own:
        logger.addFilter(below)
    # a logger's filter sees the records made on it: the emitting loggers, made now if not yet imported
    noise = [(logging.getLogger(name), _Noise(start)) for name, start in KNOWN_NOISE.items()]
    for logger, noise_filter in noise:
        logger.addFilter(noise_filter)
    try:
        with _no_progress_bars(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TRACER_NOISE)
            yield
    finally:
        root.removeFilter(chatter)
        for handler in handlers:
            handler.removeFilter(chatter)
        for logger in own:
            logger.removeFilter(below)
        for logger, noise_filter in noise:
            logger.removeFilter(noise_filter)

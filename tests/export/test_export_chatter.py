"""The toolchain's own log lines stay out of an export's log (export.chatter), and nothing else does."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from export.chatter import quieted


def _from_onnxruntime(records: list[logging.LogRecord]) -> list[logging.LogRecord]:
    return [r for r in records if "/onnxruntime/" in r.pathname]


def _quantize(src: Path, dst: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)


def test_the_quantizers_lines_are_dropped_inside_and_back_after(
    tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    _quantize(tiny_onnx, tmp_path / "a.onnx")
    before = _from_onnxruntime(caplog.records)
    assert any("pre-process" in r.getMessage() for r in before), [r.getMessage() for r in before]
    caplog.clear()
    with quieted():
        _quantize(tiny_onnx, tmp_path / "b.onnx")
    assert _from_onnxruntime(caplog.records) == []
    assert (tmp_path / "b.onnx").is_file()
    caplog.clear()
    _quantize(tiny_onnx, tmp_path / "c.onnx")
    assert _from_onnxruntime(caplog.records), "the filters stayed behind after the block"


def test_other_warnings_of_onnxruntime_and_everyone_elses_lines_pass(caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime

    caplog.set_level(logging.INFO)
    inside = str(Path(onnxruntime.__file__).parent / "quantization" / "quantize.py")

    def emit(name: str, level: int, message: str, pathname: str) -> None:
        logger = logging.getLogger(name)
        logger.handle(logger.makeRecord(name, level, pathname, 1, message, None, None))

    with quieted():
        emit("root", logging.WARNING, "Please consider to run pre-processing before quantization", inside)
        emit("root", logging.INFO, "Quantization parameters for tensor:'x' not specified", inside)
        emit("fusion_base", logging.INFO, "Fused Attention: 6", inside)
        emit("root", logging.WARNING, "the model has an op this version cannot quantize", inside)
        emit("export.pipeline", logging.INFO, "[quantize] onnx-int8 recipe static-qdq", __file__)
        logging.getLogger("runtime.serving").info("a line of our own")
    assert [r.getMessage() for r in caplog.records] == [
        "the model has an op this version cannot quantize",
        "[quantize] onnx-int8 recipe static-qdq",
        "a line of our own",
    ]


@pytest.fixture
def nncf_lines() -> Iterator[list[str]]:
    """What reaches a handler of the ``nncf`` logger (which NNCF keeps from propagating)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(f"{record.levelname} {record.getMessage()}")

    logger = logging.getLogger("nncf")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_nncf_keeps_its_warnings_even_when_it_sets_its_own_level_inside(nncf_lines: list[str]) -> None:
    logger = logging.getLogger("nncf")
    with quieted():
        logger.setLevel(logging.INFO)  # what importing nncf does, the first time, inside an export
        logger.info("Not adding activation input quantizer for operation: 118")
        logger.warning("a real warning")
    logger.info("after the block")
    assert nncf_lines == ["WARNING a real warning", "INFO after the block"]


def test_at_debug_nothing_is_dropped(tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with quieted():
        _quantize(tiny_onnx, tmp_path / "a.onnx")
    assert any("pre-process" in r.getMessage() for r in _from_onnxruntime(caplog.records))


def test_an_export_logs_its_own_steps_and_none_of_the_toolchains(
    tiny_onnx: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from export.pipeline import export_model
    from export.spec import ExportSpec

    caplog.set_level(logging.INFO)
    spec = ExportSpec(
        source=tiny_onnx,
        task="tensor",
        name="mlp",
        repository=tmp_path,
        timing="quick",
        variants=("onnx-fp32", "onnx-int8"),
    )
    manifest = export_model(spec)
    assert [a for a in manifest.attempts if a.variant == "onnx-int8"], "no INT8 recipe ran: nothing was quieted"
    steps = [r.getMessage() for r in caplog.records if r.name == "export.pipeline"]
    assert any("onnx-int8 recipe" in m for m in steps), steps
    assert _from_onnxruntime(caplog.records) == [], [r.getMessage() for r in _from_onnxruntime(caplog.records)]


def _draw_a_progress_bar() -> None:
    from nncf.common.logging.track_progress import track

    for _ in track(range(3), description="Statistics collection"):
        pass


def test_nncfs_progress_bars_draw_nothing_inside_and_again_after(
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with quieted():
        _draw_a_progress_bar()
    inside = capsys.readouterr()
    assert "Statistics collection" not in inside.out + inside.err
    _draw_a_progress_bar()
    after = capsys.readouterr()
    assert "Statistics collection" in after.out + after.err, "the console stayed quiet after the block"


def test_at_debug_the_progress_bars_draw(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with quieted():
        _draw_a_progress_bar()
    drawn = capsys.readouterr()
    assert "Statistics collection" in drawn.out + drawn.err


def test_the_first_starts_known_noise_is_dropped_and_nothing_like_it(caplog: pytest.LogCaptureFixture) -> None:
    """Three lines an offline operator can do nothing about were in every first start's log."""
    import warnings

    caplog.set_level(logging.INFO)
    config, base = (
        logging.getLogger("transformers.configuration_utils"),
        logging.getLogger("optimum.exporters.onnx.base"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning is recorded, but for those quieted's own filter drops
        with quieted():
            config.warning("`torch_dtype` is deprecated! Use `dtype` instead!")
            base.warning("Weight deduplication check in the ONNX export requires accelerate. Please install accelerate")
            config.warning("`foo` is deprecated! Use `bar` instead!")
            warnings.warn(
                "torch.tensor results are registered as constants in the trace. You can safely ignore", stacklevel=1
            )
            warnings.warn("Converting a tensor to a Python boolean might cause the trace to be incorrect", stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == ["`foo` is deprecated! Use `bar` instead!"]
    assert [str(w.message)[:30] for w in caught] == ["Converting a tensor to a Pytho"]
    caplog.clear()
    config.warning("`torch_dtype` is deprecated! Use `dtype` instead!")
    assert len(caplog.records) == 1, "the filter stayed behind after the block"

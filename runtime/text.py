"""Text in, tensors out, and back: tokenization and pooling for the serving path.

Uses the ``tokenizers`` library directly (never transformers).  A batch is
padded to its longest text, not to the model's maximum (a tokenizer.json that
asks for fixed-length padding is overridden); rounded up to a multiple of a few
tokens when asked (so that shapes repeat for a session with static-shape copies).  Texts over the maximum length
are truncated (keeping the special tokens; :attr:`Tokens.truncated` says so) or refused with
an :class:`~runtime.errors.InputError` naming the input; so is a text that has no tokens at all
(with a tokenizer that adds no special tokens, ``""`` would pool to a zero vector).

A text is read up to :attr:`TextEncoder.max_chars` characters (:data:`CHARS_PER_TOKEN` for each token
the model reads): the tokenizer reads the whole of a text before it truncates, so one 15 MB text
held a worker (the server's event loop, before it moved large requests off it) for 55 s to keep its
first 256 tokens.  A text cut there counts as truncated.  Prose takes 4-6 characters a token, so
only a text whose first ``max_length`` tokens are spread over more than ``max_chars`` characters
(long runs of blanks, words over the tokenizer's longest, which it reads as one unknown token) can
tokenize differently than it would whole; and a pair whose query and document are both cut there
may give the odd token of its ``max_length`` to the other one (which is longer is judged on what
was read).

A :class:`TextEncoder` is never mutated after construction, so one encoder may
be shared by threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.errors import InputError, ManifestError

if TYPE_CHECKING:
    import numpy.typing as npt

    from runtime.backends.base import CopyCheck
    from runtime.manifest import TextConfig

__all__ = [
    "CHARS_PER_TOKEN",
    "DEFAULT_INPUT_MAP",
    "FEED_KINDS",
    "Encoded",
    "TextEncoder",
    "Tokens",
    "answers_agree",
    "longest_first",
    "postprocess",
]

FEED_KINDS = ("input_ids", "attention_mask", "token_type_ids")
#: used when a TextConfig has an empty input_map
DEFAULT_INPUT_MAP = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
#: characters of a text read for each token the model reads (:attr:`TextEncoder.max_chars`)
CHARS_PER_TOKEN = 32


@dataclass(frozen=True)
class Encoded:
    """A tokenized batch. ``feeds`` are int64 ``[N, L]``, padded to the longest text."""

    feeds: dict[str, npt.NDArray[np.int64]]
    lengths: list[int]  # real tokens per text (after truncation)
    attention_mask: npt.NDArray[np.int64]


@dataclass(frozen=True)
class Tokens:
    """One tokenized text, after truncation, before padding (what the batcher carries)."""

    ids: list[int]
    type_ids: list[int]
    #: cut to the model's max_length (the text had more tokens), or to its max_chars first
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


class TextEncoder:
    """Tokenizes texts for one model, as its :class:`~runtime.manifest.TextConfig` says."""

    def __init__(self, tokenizer: Any, config: TextConfig) -> None:
        input_map = dict(config.input_map) or dict(DEFAULT_INPUT_MAP)
        for graph_name, kind in input_map.items():
            if kind not in FEED_KINDS:
                raise ManifestError(
                    f"text.input_map[{graph_name!r}] = {kind!r}: expected one of {list(FEED_KINDS)}; fix the manifest"
                )
        if config.max_length < 1:
            raise ManifestError(f"text.max_length = {config.max_length}: must be at least 1; fix the manifest")
        self.config = config
        self.max_length = config.max_length
        #: characters of one text read; the rest is cut before tokenizing (see the module docstring)
        self.max_chars = config.max_length * CHARS_PER_TOKEN
        self.input_map = input_map
        padding = tokenizer.padding or {}
        self._pad_id = int(padding.get("pad_id", _find_pad_id(tokenizer)))
        self._pad_type_id = int(padding.get("pad_type_id", 0))
        self._pad_left = str(padding.get("direction", "right")).lower() == "left"
        tokenizer.no_padding()
        tokenizer.no_truncation()
        self._plain = tokenizer
        self._truncating = type(tokenizer).from_str(tokenizer.to_str())
        self._truncating.enable_truncation(max_length=config.max_length)
        self._pair_template = _PairTemplate.learn(tokenizer)

    @property
    def pads_invisibly(self) -> bool:
        """Padding more than the longest text changes no answer: the pads go right (positions of
        the real tokens unchanged) and the model is fed the attention mask."""
        return not self._pad_left and "attention_mask" in self.input_map.values()

    @classmethod
    def from_dir(cls, tokenizer_dir: Path, config: TextConfig) -> TextEncoder:
        """Load ``tokenizer_dir/tokenizer.json``."""
        path = Path(tokenizer_dir) / "tokenizer.json"
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise ManifestError(f"the tokenizers library is missing ({exc}): pip install inferbox") from exc
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise ManifestError(
                f"{path}: cannot load the tokenizer ({exc}); re-export the package", path=str(path)
            ) from exc
        return cls(tokenizer, config)

    def _prepare(self, texts: Sequence[str], field: str = "input") -> tuple[list[str], set[int]]:
        """The texts as the tokenizer reads them (lower-cased when the model asks), each cut to
        :attr:`max_chars`, and the indices of those cut there."""
        if isinstance(texts, str):
            raise InputError(f"{field}: must be a list of strings, not one string", field=field)
        out = []
        cut: set[int] = set()
        limit = self.max_chars
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise InputError(f"{field}[{i}] must be a string, got {type(t).__name__}", field=f"{field}[{i}]")
            read = t
            if len(t) > limit:
                read = t[:limit]
                cut.add(i)
            out.append(read.lower() if self.config.do_lower_case else read)
        return out, cut

    def _refuse_cut(self, cut: set[int], field: str, truncate: bool) -> None:
        """Without truncation, a text over :attr:`max_chars` is an InputError naming it."""
        if cut and not truncate:
            i = min(cut)
            raise InputError(
                f"{field}[{i}] is over {self.max_chars} characters, more than the model's maximum of "
                f"{self.max_length} tokens can hold; shorten the text or enable truncation",
                field=f"{field}[{i}]",
            )

    def tokenize(self, texts: Sequence[str], *, truncate: bool = True, field: str = "input") -> list[Tokens]:
        """Each text's tokens (special tokens included), truncated to ``max_length`` when ``truncate``;
        a longer text without truncation, or a text of no tokens at all -> InputError naming it as
        ``field[i]`` (the request's own name for the texts: ``input``, ``inputs[0].data``)."""
        prepared, chars_cut = self._prepare(texts, field)
        self._refuse_cut(chars_cut, field, truncate)
        encodings = list(self._plain.encode_batch(prepared)) if prepared else []
        for i, e in enumerate(encodings):
            if not e.ids:  # a tokenizer without [CLS]/[SEP] on "" or "  ": nothing to embed
                raise InputError(
                    f"{field}[{i}] has no tokens after tokenization (empty, or only characters the model's "
                    "tokenizer drops); send some text",
                    field=f"{field}[{i}]",
                )
        long = [i for i, e in enumerate(encodings) if len(e.ids) > self.max_length]
        if long and not truncate:
            i = long[0]
            raise InputError(
                f"{field}[{i}] has {len(encodings[i].ids)} tokens, over the model's maximum {self.max_length}; "
                "shorten the text or enable truncation",
                field=f"{field}[{i}]",
            )
        if long:
            for i, e in zip(long, self._truncating.encode_batch([prepared[i] for i in long]), strict=True):
                encodings[i] = e
        cut = set(long) | chars_cut
        return [Tokens(e.ids, e.type_ids, truncated=i in cut) for i, e in enumerate(encodings)]

    def tokenize_pairs(self, query: str, documents: Sequence[str], *, truncate: bool = True) -> list[Tokens]:
        """``(query, document)`` pairs as a cross-encoder reads them (``[CLS] q [SEP] d [SEP]``, type
        ids 0 then 1), one per document; over ``max_length`` the longer part is cut first, as
        transformers' ``truncation=True`` does (or, without truncation, an InputError naming it).

        The query and the documents are each tokenized once; a pair is their heads put in the
        tokenizer's pair template (the special tokens and type ids it adds, learned from the
        tokenizer itself), cut to the lengths ``longest_first`` keeps.  Letting the tokenizer
        truncate each pair instead tokenized the query once per document and, for a long query
        and a long document, built every combination of their overflowing pieces (a 1 MB query
        and document: over 20 GB)."""
        if not isinstance(query, str):
            raise InputError("query: must be a string", field="query")
        (prepared_query,), query_cut = self._prepare([query])
        if query_cut and not truncate:
            raise InputError(
                f"query: is over {self.max_chars} characters, more than the model's maximum of {self.max_length} "
                "tokens can hold; shorten it or enable truncation",
                field="query",
            )
        prepared, chars_cut = self._prepare(documents, "documents")
        self._refuse_cut(chars_cut, "documents", truncate)
        if not prepared:
            return []
        if query_cut:  # every pair holds the cut query
            chars_cut = set(range(len(prepared)))
        template = self._pair_template
        if template is None:  # a post-processor this cannot mirror: the tokenizer pairs them itself
            return self._tokenize_pairs_slowly(prepared_query, prepared, truncate=truncate, chars_cut=chars_cut)
        q = self._plain.encode(prepared_query, add_special_tokens=False)
        docs = self._plain.encode_batch(prepared, add_special_tokens=False)
        budget = self.max_length - template.specials
        if budget < 1:
            raise ManifestError(
                f"text.max_length = {self.max_length} leaves no room for a pair's tokens beside its "
                f"{template.specials} special tokens; fix the manifest"
            )
        q_ids = q.ids  # a fresh list per access: read once
        out: list[Tokens] = []
        for i, d in enumerate(docs):
            d_ids = d.ids
            n_q, n_d = len(q_ids), len(d_ids)
            cut = self._pair_is_cut(i, n_q + n_d + template.specials, truncate)
            keep_q, keep_d = longest_first(n_q, n_d, budget) if cut else (n_q, n_d)
            ids, types = template.join(q_ids[:keep_q], d_ids[:keep_d])
            out.append(Tokens(ids, types, truncated=cut or i in chars_cut))
        return out

    def _pair_is_cut(self, i: int, total: int, truncate: bool) -> bool:
        """Whether pair ``i`` of ``total`` tokens must be cut; a pair of no tokens, or one too long
        without truncation, is an InputError naming ``documents[i]``."""
        if total == 0:  # a tokenizer without special tokens, on an empty query and document
            raise InputError(f"documents[{i}] and the query have no tokens; send text", field=f"documents[{i}]")
        cut = total > self.max_length
        if cut and not truncate:
            raise InputError(
                f"documents[{i}] with the query has {total} tokens, over the model's maximum "
                f"{self.max_length}; shorten the query or the document, or enable truncation",
                field=f"documents[{i}]",
            )
        return cut

    def _tokenize_pairs_slowly(
        self, query: str, documents: list[str], *, truncate: bool, chars_cut: set[int]
    ) -> list[Tokens]:
        """Each pair through the tokenizer (exact for any post-processor; no protection from the
        cost of a long query and document)."""
        out: list[Tokens] = []
        for i, d in enumerate(documents):
            pair = self._plain.encode(query, d)
            cut = self._pair_is_cut(i, len(pair.ids), truncate)
            if cut:
                pair = self._truncating.encode(query, d)
            out.append(Tokens(pair.ids, pair.type_ids, truncated=cut or i in chars_cut))
        return out

    def pad(self, tokens: Sequence[Tokens], *, multiple: int = 1) -> Encoded:
        """One batch of feeds from tokenized texts, padded to the longest, rounded up to a
        ``multiple`` of tokens (never past ``max_length`` unless a text is longer)."""
        lengths = [len(t) for t in tokens]
        width = max(lengths, default=0)
        if multiple > 1 and width:
            width = max(width, min(-(-width // multiple) * multiple, self.max_length))
        n = len(tokens)
        ids = np.full((n, width), self._pad_id, dtype=np.int64)
        types = np.full((n, width), self._pad_type_id, dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for row, (t, length) in enumerate(zip(tokens, lengths, strict=True)):
            cols = slice(width - length, width) if self._pad_left else slice(0, length)
            ids[row, cols] = t.ids
            types[row, cols] = t.type_ids
            mask[row, cols] = 1
        by_kind = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        feeds = {graph_name: by_kind[kind] for graph_name, kind in self.input_map.items()}
        return Encoded(feeds=feeds, lengths=lengths, attention_mask=mask)

    def encode(self, texts: Sequence[str], *, truncate: bool = True) -> Encoded:
        return self.pad(self.tokenize(texts, truncate=truncate))


def longest_first(n_first: int, n_second: int, budget: int) -> tuple[int, int]:
    """How many tokens of each sequence transformers' ``longest_first`` truncation keeps when the
    pair's ``n_first + n_second`` content tokens must fit ``budget``: tokens come off the longer
    one until both are as long, then alternately (the longer keeps the odd one)."""
    budget = max(budget, 0)
    if n_first + n_second <= budget:
        return n_first, n_second
    swap = n_first > n_second
    short, long = (n_second, n_first) if swap else (n_first, n_second)
    long = short if short > budget else max(short, budget - short)
    if short + long > budget:
        short = budget // 2
        long = short + budget % 2
    return (long, short) if swap else (short, long)


@dataclass(frozen=True)
class _PairTemplate:
    """What a tokenizer's ``encode(a, b)`` puts around the two sequences: fixed special tokens
    before, between and after them, and one type id per part (BERT: ``[CLS] a [SEP] b [SEP]``,
    0 / 1; RoBERTa: ``<s> a </s></s> b </s>``).  Learned once from the tokenizer itself."""

    before: tuple[tuple[int, int], ...]  #: (id, type id) of each special token
    between: tuple[tuple[int, int], ...]
    after: tuple[tuple[int, int], ...]
    first_type: int
    second_type: int

    @property
    def specials(self) -> int:
        return len(self.before) + len(self.between) + len(self.after)

    def join(self, first: Sequence[int], second: Sequence[int]) -> tuple[list[int], list[int]]:
        parts = (
            list(self.before),
            [(t, self.first_type) for t in first],
            list(self.between),
            [(t, self.second_type) for t in second],
            list(self.after),
        )
        pairs = [p for part in parts for p in part]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    @classmethod
    def learn(cls, tokenizer: Any) -> _PairTemplate | None:
        """The template, checked against the tokenizer on a second probe; None when it does not
        fit this shape (the tokenizer then pairs every pair itself)."""
        probes = (("hello world", "good day"), ("a b c", "d"))
        try:
            template = cls._from_probe(tokenizer, *probes[0])
            if template is None:
                return None
            a, b = probes[1]
            want = tokenizer.encode(a, b)
            ids, types = template.join(
                tokenizer.encode(a, add_special_tokens=False).ids, tokenizer.encode(b, add_special_tokens=False).ids
            )
            return template if (ids, types) == (list(want.ids), list(want.type_ids)) else None
        except Exception:  # a tokenizer this cannot read pairs its pairs itself
            return None

    @classmethod
    def _from_probe(cls, tokenizer: Any, a: str, b: str) -> _PairTemplate | None:
        a_ids = list(tokenizer.encode(a, add_special_tokens=False).ids)
        b_ids = list(tokenizer.encode(b, add_special_tokens=False).ids)
        pair = tokenizer.encode(a, b)
        ids, types, special = list(pair.ids), list(pair.type_ids), list(pair.special_tokens_mask)
        content = [i for i, s in enumerate(special) if not s]
        if not a_ids or not b_ids or len(content) != len(a_ids) + len(b_ids):
            return None
        a_at, b_at = content[: len(a_ids)], content[len(a_ids) :]
        contiguous = a_at == list(range(a_at[0], a_at[-1] + 1)) and b_at == list(range(b_at[0], b_at[-1] + 1))
        if not contiguous or [ids[i] for i in a_at] != a_ids or [ids[i] for i in b_at] != b_ids:
            return None
        if len({types[i] for i in a_at}) != 1 or len({types[i] for i in b_at}) != 1:
            return None

        def specials(lo: int, hi: int) -> tuple[tuple[int, int], ...]:
            return tuple((ids[i], types[i]) for i in range(lo, hi))

        return cls(
            before=specials(0, a_at[0]),
            between=specials(a_at[-1] + 1, b_at[0]),
            after=specials(b_at[-1] + 1, len(ids)),
            first_type=types[a_at[0]],
            second_type=types[b_at[0]],
        )


def _find_pad_id(tokenizer: Any) -> int:
    for token in ("[PAD]", "<pad>", "<|pad|>", "<unk>"):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found)
    return 0


def postprocess(
    outputs: dict[str, npt.NDArray[np.generic]], attention_mask: npt.NDArray[np.generic], config: TextConfig
) -> npt.NDArray[np.float32]:
    """Pick ``outputs[config.output]``, pool, L2-normalize if asked; float32 ``[N, D]``.

    Pooling ``mean`` is the mean over real tokens (``attention_mask`` 1), ``cls``
    takes the first token, ``none`` leaves the output as it is.
    """
    name = config.output or (next(iter(outputs)) if len(outputs) == 1 else "")
    if name not in outputs:
        raise ManifestError(
            f"text.output {config.output!r} is not among the model's outputs {sorted(outputs)}; fix the manifest"
        )
    arr = np.asarray(outputs[name], dtype=np.float32)
    if config.pooling == "mean":
        if arr.ndim != 3 or arr.shape[:2] != attention_mask.shape:
            raise ManifestError(
                f"mean pooling needs output {name!r} shaped [N, L, D] matching the mask {list(attention_mask.shape)}, "
                f"got {list(arr.shape)}; fix text.pooling in the manifest"
            )
        # [N, 1, L] @ [N, L, D]: one batched product, no [N, L, D] temporary (32 x 128 tokens:
        # 0.26 ms against 1.1 ms for multiply-and-sum; the same sums to 1e-7)
        mask = attention_mask.astype(np.float32)
        summed = np.matmul(mask[:, None, :], arr)[:, 0, :]
        pooled = summed / np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)
    elif config.pooling == "cls":
        if arr.ndim != 3:
            raise ManifestError(
                f"cls pooling needs output {name!r} shaped [N, L, D], got {list(arr.shape)}; fix text.pooling"
            )
        pooled = arr[:, 0]
    else:
        pooled = arr
    if config.normalize:
        norms = np.linalg.norm(pooled, axis=-1, keepdims=True)
        pooled = pooled / np.clip(norms, 1e-12, None)
    return np.ascontiguousarray(pooled, dtype=np.float32)


def answers_agree(config: TextConfig, tolerance: float | None = None) -> CopyCheck:
    """A static-shape copy check for a text model: the copy's *answers* (pooled, normalized as
    :func:`postprocess` makes them) must be within ``tolerance`` (default ``COPY_TOLERANCE``, the
    export's batch gate) of the dynamic model's, relative to their largest value: what the gate
    held, not the raw hidden states (bf16 moves those by 1-3 % of their largest value where the
    embeddings agree to cosine > 0.9999)."""
    from runtime.backends.static_shapes import COPY_TOLERANCE

    limit = COPY_TOLERANCE if tolerance is None else tolerance
    input_map = dict(config.input_map) or dict(DEFAULT_INPUT_MAP)
    mask_name = next((g for g, kind in input_map.items() if kind == "attention_mask"), "attention_mask")

    def check(
        inputs: dict[str, npt.NDArray[np.generic]],
        mine: dict[str, npt.NDArray[np.generic]],
        theirs: dict[str, npt.NDArray[np.generic]],
    ) -> str | None:
        mask = inputs.get(mask_name)
        if mask is None:
            return f"no {mask_name!r} input to pool with"
        a = postprocess(mine, np.asarray(mask), config).astype(np.float64)
        b = postprocess(theirs, np.asarray(mask), config).astype(np.float64)
        scale = float(np.abs(a).max()) if a.size else 0.0
        diff = float(np.abs(a - b).max()) if a.size else 0.0
        if np.isfinite(diff) and diff <= limit * max(scale, 1e-12):
            return None
        share = diff / scale if scale else diff
        return f"its answers differ by {diff:.3g} ({share:.2%} of their largest value; at most {limit:.0%})"

    return check

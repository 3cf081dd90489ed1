"""The headers of a model's answer: what answered (``X-Model-Version``, ``X-Model-Variant``: on every
answer of a model, OpenAI's, Cohere's and KServe's, a tensor model's too) and the texts cut (on the
routes that answer texts).

``X-Truncated-Inputs`` names the texts cut to the model's maximum length by index, comma-separated
(``1,3``).  A list longer than :data:`TRUNCATED_LIST_MAX` bytes is written as ranges (``0-999``), and
cut there (ending ``,...``) if still longer: a list of 2,048 indices was a 9 KB header, and a proxy
with its default 4 KiB header buffer (nginx, ingress-nginx) answered the client 502 for an answer the
server had made and recorded.  ``X-Truncated-Count`` gives the number, whatever the list shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runtime.serving import LoadedModel

__all__ = [
    "MODEL_VARIANT_HEADER",
    "MODEL_VERSION_HEADER",
    "TRUNCATED_COUNT_HEADER",
    "TRUNCATED_HEADER",
    "TRUNCATED_LIST_MAX",
    "answer_headers",
    "model_headers",
    "truncation_headers",
]

#: indices of the texts cut to the model's max_length (absent when none was)
TRUNCATED_HEADER = "X-Truncated-Inputs"
#: how many texts were cut (absent when none was)
TRUNCATED_COUNT_HEADER = "X-Truncated-Count"
#: the most bytes the index list takes in its header
TRUNCATED_LIST_MAX = 1024
#: the version of the package that answered (OpenAI's and Cohere's bodies name only the model;
#: KServe's carry ``model_version``): a client can tell an answer from before a swap from one after
MODEL_VERSION_HEADER = "X-Model-Version"
#: what of that package answered: ``backend/variant/precision`` (``ov-cpu/ov-int8/bf16``).  Variants pass
#: one accuracy gate but do not answer alike (ov-int8 against onnx-fp32: cosine 0.97-0.999 a text): an
#: index built from one box's answers and queried with another's can tell them apart
MODEL_VARIANT_HEADER = "X-Model-Variant"


def model_headers(model: LoadedModel) -> dict[str, str]:
    """``X-Model-Version`` and ``X-Model-Variant`` of ``model``: what answered (or, after a repository
    load, what serves now)."""
    return {
        MODEL_VERSION_HEADER: str(model.version),
        MODEL_VARIANT_HEADER: f"{model.backend}/{model.variant}/{model.exec_precision}",
    }


def answer_headers(model: LoadedModel, truncated: list[int]) -> dict[str, str]:
    """The headers of a text answer: the version that answered, and the texts cut to the model's
    max_length (usage counts only what the model saw) by index."""
    return {**model_headers(model), **truncation_headers(truncated)}


def truncation_headers(truncated: list[int]) -> dict[str, str]:
    """``X-Truncated-Inputs`` and ``X-Truncated-Count`` for the texts cut (none when none was)."""
    if not truncated:
        return {}
    listed = ",".join(map(str, truncated))
    if len(listed) > TRUNCATED_LIST_MAX:
        listed = _ranges(truncated)
    if len(listed) > TRUNCATED_LIST_MAX:
        listed = listed[: listed.rfind(",", 0, TRUNCATED_LIST_MAX - 4)] + ",..."
    return {TRUNCATED_HEADER: listed, TRUNCATED_COUNT_HEADER: str(len(truncated))}


def _ranges(indices: list[int]) -> str:
    """``0,1,2,5`` as ``0-2,5`` (indices ascending)."""
    parts: list[str] = []
    start = end = indices[0]
    for i in indices[1:]:
        if i == end + 1:
            end = i
            continue
        parts.append(str(start) if start == end else f"{start}-{end}")
        start = end = i
    parts.append(str(start) if start == end else f"{start}-{end}")
    return ",".join(parts)

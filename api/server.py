"""What the handlers share: the registry, one batcher per loaded model, limits, metrics.

Handlers reach it as ``request.app.state["server"]``.  Batchers are created
lazily on the event loop for the model version in use and stopped when a model
is unloaded or the app shuts down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import weakref
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
from litestar import Request
from litestar.exceptions import InternalServerException

from api.config import ApiConfig
from api.envelope import context_of
from api.metrics import Metrics, ModelInfo
from runtime.batcher import BatchStats, DynamicBatcher
from runtime.errors import (
    BackendError,
    BodyTimeoutError,
    ClientGoneError,
    InputError,
    OverloadError,
    PayloadTooLargeError,
)
from runtime.scores import sigmoid
from runtime.serving import LoadedModel, ModelRegistry, TensorRequest, run_tensor_batch, tensor_group
from runtime.text import Tokens

__all__ = ["INLINE_BODY_BYTES", "INLINE_CHARS", "Server", "TextItem", "TokenCharge", "off_loop_if_large"]

logger = logging.getLogger(__name__)

_R = TypeVar("_R")
#: takes a request's tokens (and the field its texts came in, for the error) from its key's bucket;
#: returns what gives them back
TokenCharge = Callable[[int, str], Callable[[], None]]

Array = npt.NDArray[Any]

#: a version a newer one replaced keeps answering the requests that found it before the swap (still
#: reading their body or tokenizing) this long, then answers what it accepted and closes: without it
#: such a request got a 429 in the middle of a gap-free swap (seen once in four runs of the e2e test)
REPLACED_GRACE_S = 2.0
#: characters of a request tokenized on the event loop (~15 ms here); a larger request is tokenized
#: in a worker thread (the tokenizer lets go of the GIL there), so that it never holds up the other
#: clients' requests and the health probes (one 15 MB text once held them for 55 s)
INLINE_CHARS = 16_384
#: bytes of a request body decoded on the event loop; a larger body is decoded in a worker thread.  A
#: 16 MB infer request took 1.2-2.1 s to decode into arrays, all of it on the loop: no other client and
#: no health probe was answered meanwhile.  The decoder holds the GIL for each of its C calls, so the
#: loop still waits out the longest one (~0.4 s for 8 M numbers), not the whole decode.
INLINE_BODY_BYTES = 65_536
#: a compressed body up to this size is inflated on the event loop (:func:`inflate`)
INLINE_COMPRESSED_BYTES = 1024


class TextItem:
    """One text queued for embedding, tokenized once on the way in; batched by its token count."""

    __slots__ = ("length", "tokens")

    def __init__(self, tokens: Tokens) -> None:
        self.tokens = tokens
        self.length = len(tokens)


def metric_label(model: LoadedModel, kind: str) -> str:
    """A batcher's ``model`` label in /metrics: the model's name for the kind of batcher it mostly
    has (``text`` for a text model, ``tensor`` otherwise), ``<name>:<kind>`` for the other one (a
    text model run on raw tensors). It depends on nothing but the model, so a series never moves."""
    main = "text" if model.is_text else "tensor"
    return model.name if kind == main else f"{model.name}:{kind}"


#: what a 413 advises: a client's batch of long texts (LangChain's 1,000 texts of ~18 KB) is over the limit
_SPLIT = "; send the texts in smaller batches (the model reads each text only up to its maximum length)"


class Server:
    def __init__(
        self, registry: ModelRegistry, config: ApiConfig, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self.registry = registry
        self.config = config
        self.metrics = metrics
        #: monotonic: the batchers' deadlines
        self.clock = clock
        self._tensor: dict[str, tuple[LoadedModel, DynamicBatcher[TensorRequest, dict[str, Array]]]] = {}
        self._text: dict[str, tuple[LoadedModel, DynamicBatcher[TextItem, tuple[Array, int]]]] = {}
        #: batchers of a model version another one replaced, until that version is retired, with
        #: their kind (``tensor`` or ``text``)
        self._stale: list[tuple[LoadedModel, str, DynamicBatcher[Any, Any]]] = []
        #: batchers of a retired version answering what they accepted before they stop
        self._draining: list[tuple[LoadedModel, str, DynamicBatcher[Any, Any]]] = []
        #: models the registry let go of -> their retirement (batchers stopped, then closed)
        self._retiring: dict[int, concurrent.futures.Future[None]] = {}
        #: how long a replaced version still takes the requests that found it (:meth:`retire`)
        #: versions past their grace (being stopped, or closed), by id while the object lives: a request
        #: still holding one is asked to retry
        self._ended: set[int] = set()
        self.replaced_grace_s = REPLACED_GRACE_S
        self._no_grace: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        #: the service is stopping (SIGTERM, ``shutdown_drain_s``): readiness answers 503 while it still serves
        self.draining = False

    # -- life cycle -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Take over closing the models the registry lets go of, while the app runs: a model
        unloaded or replaced by a new version is closed only after its batches are done (on
        the running loop; call from it)."""
        self._loop = asyncio.get_running_loop()
        self._no_grace = asyncio.Event()
        self.registry.retire = self._retire_soon

    async def stop(self) -> None:
        """Stop every batcher (at shutdown), then let the registry close its models at once again."""
        if self._no_grace is not None:
            self._no_grace.set()  # a replaced version's grace ends now
        for name in list({*self._tensor, *self._text}):
            await self.drop(name)
        stale, self._stale = self._stale, []
        for _, _, batcher in stale:
            await batcher.stop()
        self.registry.retire = lambda model: model.close()
        for fut in list(self._retiring.values()):  # those scheduled before the hook went back
            await asyncio.wrap_future(fut)

    async def drop(self, name: str) -> None:
        tensor = self._tensor.pop(name, None)
        text = self._text.pop(name, None)
        if tensor is not None:
            await tensor[1].stop()
        if text is not None:
            await text[1].stop()

    def _retire_soon(self, model: LoadedModel) -> None:
        """The registry's retire hook (any thread): schedule :meth:`retire` on the loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            model.close()
            return
        fut = asyncio.run_coroutine_threadsafe(self.retire(model), loop)
        self._retiring[id(model)] = fut
        fut.add_done_callback(lambda _f: self._retiring.pop(id(model), None))

    async def retire(self, model: LoadedModel) -> None:
        """Stop ``model``'s batchers once they answered what they accepted, then close it.  A version
        another one replaced first takes the requests that found it for ``replaced_grace_s``."""
        if any(m.name == model.name for m in self.registry.loaded()) and self._no_grace is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_grace.wait(), self.replaced_grace_s)
        self._ended.add(id(model))  # before its batchers are collected: none is made for it after
        weakref.finalize(model, self._ended.discard, id(model))
        batchers: list[tuple[LoadedModel, str, DynamicBatcher[Any, Any]]] = []
        for kind, table in (("tensor", self._tensor), ("text", self._text)):
            current = table.get(model.name)
            if current is not None and current[0] is model:
                del table[model.name]
                batchers.append((model, kind, current[1]))
        batchers += [entry for entry in self._stale if entry[0] is model]
        self._stale = [entry for entry in self._stale if entry[0] is not model]
        self._draining += batchers  # /metrics still shows their queues while they answer them
        for entry in batchers:
            await entry[2].stop(drain=True)
            # gone from /metrics' batchers and into its retired counts at once (no await between)
            self._draining.remove(entry)
            self.metrics.absorb(metric_label(model, entry[1]), entry[2].stats)
        self.metrics.forget_outcomes(model.name, str(model.version), id(model))
        # on the loop thread, as a plain unload always did: an OpenVINO model closed from a worker
        # thread made the process die of SIGSEGV at its exit (measured: unload, then SIGTERM)
        model.close()

    async def retired(self, model: LoadedModel) -> None:
        """Wait until ``model``, which the registry let go of, is closed."""
        fut = self._retiring.get(id(model))
        if fut is not None:
            await asyncio.wrap_future(fut)

    def _check_held(self, model: LoadedModel) -> None:
        """The version a request found must still be loaded to get a batcher; else the request
        is asked to retry (429 with Retry-After, as a full queue): the name may well be loaded
        again, as another version or the same one reloaded."""
        if not self.registry.holds(model):
            raise OverloadError(
                f"model {model.name!r} was unloaded or replaced while the request waited; retry", retry_after=1.0
            )

    def _batcher_kwargs(self, model: LoadedModel) -> dict[str, Any]:
        c = self.config
        return {
            "max_batch_size": c.max_batch_size,
            "max_delay_s": c.max_queue_delay_s,
            "queue_limit": c.queue_limit,
            "timeout_s": c.request_timeout_s,
            "clock": self.clock,
            "name": model.name,
            "workers": max(1, model.streams),
        }

    def _in_grace(self, model: LoadedModel) -> bool:
        """``model`` was replaced by another version and is not retired yet (its grace, or the moment
        between the swap and its retirement starting): a request that found it is answered by it."""
        if self._no_grace is None or self._no_grace.is_set():  # not attached, or stopping: closed at once
            return False
        if id(model) in self._ended or self.registry.holds(model):
            return False
        return any(m.name == model.name for m in self.registry.loaded())  # unloaded since: no grace

    def _graced(self, model: LoadedModel, kind: str) -> DynamicBatcher[Any, Any] | None:
        """A replaced version in its grace: its batcher of ``kind`` off the table (retire stops it),
        if it has one."""
        return next((b for m, k, b in self._stale if m is model and k == kind), None)

    def _batcher(
        self, kind: str, model: LoadedModel, make: Callable[[], DynamicBatcher[Any, Any]]
    ) -> DynamicBatcher[Any, Any]:
        """``model``'s batcher of ``kind`` (``tensor`` or ``text``), made by ``make`` the first time;
        a version replaced a moment ago gets one off the table (:meth:`_in_grace`), one no longer
        loaded none."""
        table: dict[str, tuple[LoadedModel, DynamicBatcher[Any, Any]]] = (
            self._tensor if kind == "tensor" else self._text
        )
        current = table.get(model.name)
        if current is not None and current[0] is model:
            return current[1]
        grace = self._in_grace(model)
        graced = self._graced(model, kind) if grace else None
        if graced is not None:
            return graced
        if not grace:
            self._check_held(model)
            if current is not None:  # another version: stopped when the registry retires it
                self._stale.append((current[0], kind, current[1]))
        batcher = make()
        batcher.start()
        if grace:  # replaced a moment ago: off the table, stopped when it is retired
            self._stale.append((model, kind, batcher))
        else:
            table[model.name] = (model, batcher)
        return batcher

    async def tensor_batcher(self, model: LoadedModel) -> DynamicBatcher[TensorRequest, dict[str, Array]]:
        def make() -> DynamicBatcher[TensorRequest, dict[str, Array]]:
            return DynamicBatcher(
                run_tensor_batch(model), group=tensor_group(model), rows=lambda r: r.rows, **self._batcher_kwargs(model)
            )

        return self._batcher("tensor", model, make)

    async def text_batcher(self, model: LoadedModel) -> DynamicBatcher[TextItem, tuple[Array, int]]:
        def run(items: list[TextItem]) -> list[tuple[Array, int]]:
            # the inference thread only pads, runs and pools: tokenizing happened on the way in
            vectors = model.embed_tokens([i.tokens for i in items])
            return [(vectors[i], len(item.tokens)) for i, item in enumerate(items)]

        def make() -> DynamicBatcher[TextItem, tuple[Array, int]]:
            # the cost planner sees the width a batch is padded to: texts whose lengths round up to
            # the same width batch together for nothing (runtime.serving.LoadedModel.pad_multiple)
            multiple = model.pad_multiple

            def width(item: TextItem) -> int:
                return -(-item.length // multiple) * multiple

            return DynamicBatcher(run, length=width, **self._batcher_kwargs(model))

        return self._batcher("text", model, make)

    # -- work -------------------------------------------------------------------------------------
    async def embed(self, model: LoadedModel, texts: list[str], field: str = "input") -> tuple[Array, list[int]]:
        """Embeddings [N, D] and token counts; each text is batched on its own (by token count).
        ``field``: the request's name for the texts, which errors name (``input``, ``inputs[0].data``)."""
        vectors, counts, _truncated = await self.embed_texts(model, texts, field)
        return vectors, counts

    async def embed_texts(
        self, model: LoadedModel, texts: list[str], field: str = "input", charge: TokenCharge | None = None
    ) -> tuple[Array, list[int], list[int]]:
        """:meth:`embed`, and the indices of the texts cut to the model's max_length.  ``charge``: takes
        the request's tokens from its key's tokens-per-minute bucket (:meth:`api.auth.Authenticator.token_charge`)
        once they are counted, before anything is queued."""
        if len(texts) > self.config.max_inputs:
            raise InputError(
                f"{field}: {len(texts)} texts is over the limit of {self.config.max_inputs} per request",
                field=field,
            )
        tokens = await off_loop_if_large(
            _chars(texts), INLINE_CHARS, model.tokenize, texts, truncate=self.config.truncate, field=field
        )
        refund = charge(sum(len(t) for t in tokens), field) if charge is not None else None
        batcher = await self.text_batcher(model)
        # all of the request's texts are queued or none (a full queue refuses the whole request,
        # leaving nothing of it to compute); a failed text or a client gone withdraws the rest
        results = await _admitted(batcher, [TextItem(t) for t in tokens], field, refund)
        truncated = [i for i, t in enumerate(tokens) if t.truncated]
        if not results:
            return np.zeros((0, 0), dtype=np.float32), [], truncated
        return np.stack([r[0] for r in results]), [r[1] for r in results], truncated

    async def rerank(
        self, model: LoadedModel, query: str, documents: list[str], charge: TokenCharge | None = None
    ) -> tuple[Array, list[int], list[int]]:
        """A cross-encoder's score of each ``(query, document)`` pair (sigmoid of its logit, as
        sentence-transformers' CrossEncoder gives it), tokens per pair, and the pairs cut to the
        model's max_length.  Pairs share the model's text batcher with its other requests."""
        if len(documents) > self.config.max_inputs:
            raise InputError(
                f"documents: {len(documents)} documents is over the limit of {self.config.max_inputs} per request",
                field="documents",
            )
        chars = _chars([query]) + _chars(documents)
        tokens = await off_loop_if_large(
            chars, INLINE_CHARS, model.tokenize_pairs, query, documents, truncate=self.config.truncate
        )
        refund = charge(sum(len(t) for t in tokens), "documents") if charge is not None else None
        batcher = await self.text_batcher(model)
        results = await _admitted(batcher, [TextItem(t) for t in tokens], "documents", refund)
        logits = np.array([float(r[0].reshape(-1)[0]) for r in results], dtype=np.float64)
        if not bool(np.isfinite(logits).all()):  # would be "relevance_score": null, which clients cannot parse
            raise BackendError(f"model {model.name!r} answered NaN or Inf for a document; its package needs a look")
        scores = sigmoid(logits)
        return scores, [r[1] for r in results], [i for i, t in enumerate(tokens) if t.truncated]

    async def infer(self, model: LoadedModel, inputs: dict[str, Array], outputs: list[str] | None) -> dict[str, Array]:
        feeds = model.check_inputs(inputs)
        wanted = model.check_outputs(outputs)
        request = TensorRequest(feeds, tuple(wanted) if wanted is not None else None)
        if model.batchable and request.rows > self.config.max_inputs:
            raise InputError(
                f"inputs: {request.rows} rows is over the limit of {self.config.max_inputs} per request",
                field="inputs",
            )
        batcher = await self.tensor_batcher(model)
        return await batcher.submit(request)

    # -- requests ---------------------------------------------------------------------------------
    async def read_body(self, request: Request[Any, Any, Any]) -> bytes:
        """The body, decompressed (gzip / deflate), at most ``max_body_bytes`` before and after."""
        limit = self.config.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isascii() and length.isdigit() and int(length) > limit:
            raise PayloadTooLargeError(
                f"body: {length} bytes is over the limit of {limit} (max_body_bytes){_SPLIT}", field="body"
            )
        parts: list[bytes] = []
        size = 0
        seconds = self.config.body_timeout_s
        try:
            # a client that sends part of its body and then nothing held its request (and a
            # connection) open for as long as it liked: 140 s for 1 of 100 bytes, until it left
            async with asyncio.timeout(seconds):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLargeError(
                            f"body: over the limit of {limit} bytes (max_body_bytes){_SPLIT}", field="body"
                        )
                    parts.append(chunk)
        except InternalServerException as exc:  # Litestar's word for the client closing mid-body
            raise ClientGoneError(f"the client closed the connection after {size} bytes of its body") from exc
        except TimeoutError:
            raise BodyTimeoutError(
                f"body: {size} bytes arrived in {seconds:g} s, and not the rest (body_timeout_s); send the whole "
                "body at once",
                field="body",
            ) from None
        raw = b"".join(parts)
        ctx = context_of(request.scope)
        ctx.raw_body = raw  # the audit record's input digest: the body as received, until it is inflated
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding in ("", "identity"):
            return raw
        if encoding not in ("gzip", "x-gzip", "deflate"):
            raise InputError(
                f"Content-Encoding: {encoding!r} is not supported; send gzip, deflate or identity",
                field="Content-Encoding",
            )
        # zlib inflates at most ~1000-fold: a body of up to 1 KiB is at most ~1 MB (a millisecond or two);
        # a bigger one, up to max_body_bytes of output (a 16 KB gzip of zeros is 16 MB), in a worker thread
        body = await off_loop_if_large(len(raw), INLINE_COMPRESSED_BYTES, inflate, raw, encoding, limit)
        # the digest is of the body the application wrote: the same body gzipped twice differs (gzip's
        # header holds a time), and the application's own copy is the uncompressed one
        ctx.raw_body = body
        return body

    # -- metrics ----------------------------------------------------------------------------------
    def _running(self) -> list[tuple[LoadedModel, str, DynamicBatcher[Any, Any]]]:
        """Every batcher still running, with its model and kind: the current ones, and those of a
        replaced version in its grace or of a retired one still answering what it accepted."""
        running: list[tuple[LoadedModel, str, DynamicBatcher[Any, Any]]] = [
            (m, "tensor", b) for m, b in self._tensor.values()
        ]
        running += [(m, "text", b) for m, b in self._text.values()]
        return [*running, *self._stale, *self._draining]

    def batch_stats_of(self, model: LoadedModel) -> list[BatchStats]:
        """The counters of every running batcher of this model version (:meth:`_running`)."""
        return [b.stats for m, _, b in self._running() if m is model]

    def render_metrics(self) -> str:
        stats: dict[str, list[BatchStats]] = {}
        for m, kind, b in self._running():
            stats.setdefault(metric_label(m, kind), []).append(b.stats)
        models = [ModelInfo.of(m) for m in self.registry.loaded()]
        return self.metrics.render(stats, models, self.registry.readiness())


async def _admitted(
    batcher: DynamicBatcher[TextItem, tuple[Array, int]],
    items: list[TextItem],
    field: str,
    refund: Callable[[], None] | None,
) -> list[tuple[Array, int]]:
    """``batcher.submit_many(items)``; a request it refused before queuing anything (a full queue, a wait
    past the timeout, more items than the queue holds), or an unload refused, gets its tokens back
    (``refund``): nothing of it ran, and the refusal was not its key's doing."""
    if refund is None:  # a key without a token limit: nothing to give back
        return await batcher.submit_many(items, field=field)
    queued = False

    def on_queued() -> None:
        nonlocal queued
        queued = True

    try:
        return await batcher.submit_many(items, field=field, on_queued=on_queued)
    except (OverloadError, InputError) as exc:
        if not queued or isinstance(exc, OverloadError):
            refund()
        raise


def _chars(texts: object) -> int:
    """Characters of the strings in ``texts`` (a list of anything: the tokenizer names what is not a string)."""
    if isinstance(texts, str):
        return len(texts)
    if not isinstance(texts, list | tuple):
        return 0
    return sum(len(t) for t in texts if isinstance(t, str))


def inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    """``raw`` decompressed (``gzip``, ``x-gzip`` or ``deflate``), at most ``limit`` bytes, else 413;
    a cut stream, bytes after its end or data that is no such stream are a 400."""
    # wbits 47: zlib or gzip header, auto-detected; raw deflate as a fallback for "deflate"
    for wbits in (47,) if encoding != "deflate" else (47, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(raw, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            raise PayloadTooLargeError(
                f"body: over the limit of {limit} bytes after decompression (max_body_bytes){_SPLIT}", field="body"
            )
        # a cut stream inflated to a cut body, and bytes after its end (a second gzip member, or
        # anything) were dropped unread: both answered as if the body were whole
        if not inflater.eof:
            raise InputError(
                f"body: the {encoding} data ends before its end marker (a cut body?); send the whole of it",
                field="Content-Encoding",
            )
        if inflater.unused_data:
            raise InputError(
                f"body: {len(inflater.unused_data)} bytes follow the end of the {encoding} data (a second "
                "gzip member?); send the body as one compressed stream",
                field="Content-Encoding",
            )
        return out
    raise InputError(f"body: not valid {encoding} data", field="Content-Encoding")


async def off_loop_if_large(size: int, inline: int, fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
    """``fn(*args, **kwargs)`` here when the work's ``size`` (characters to tokenize, bytes to decode) is
    at most ``inline``, else in a worker thread (a hand-off costs more than a few sentences' work)."""
    if size <= inline:
        return fn(*args, **kwargs)
    return await asyncio.to_thread(fn, *args, **kwargs)

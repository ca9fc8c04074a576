"""The HTTP API over ``deltalm.Translator`` (FastAPI on uvicorn).

    POST /v1/translate  {"text": ["...", ...], "beam": 5, ...}  ->  {"results": [{"id", "nbest"}, ...]}
    GET  /health        the process answers (and names the vocabulary shortlist, if the server uses one)
    GET  /ready         the model is loaded and warmed up (503 before, and while shutting down)
    GET  /metrics       Prometheus text format
    GET  /openapi.json, /docs

Options are ``deltalm.TranslateOptions``' fields (checked by ``TranslateOptions.from_mapping``);
each result is the record ``deltalm translate --format jsonl`` writes (``Translation.to_dict``), its
``id`` the sentence's position in the request. Every error is ``{"error": {"type", "message", ...}}``
with the HTTP status of its kind (``deltalm.serve.metrics.ERROR_KINDS``).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltalm import OptionError, TranslateOptions, Translator, __version__
from deltalm.artifact import sha256_file
from deltalm.errors import DeltaLMError, InputError, TokenizerError

from .batcher import Batcher, BatchLimits, BatchReport, QueueFull, ShuttingDown
from .metrics import ServeMetrics

WARMUP_TEXT = "warm up"


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 1 << 20
    max_sentences: int = 64  # per request
    max_sentence_tokens: int | None = None  # source tokens (prefix and </s> included); None: the model's
    timeout_s: float = 60.0  # arrival to answer


# --- the API's data, declared once (used for the OpenAPI schema; the handler checks requests with
# TranslateOptions.from_mapping, whose messages name the option) --------------------------------


def _option_model() -> type[pydantic.BaseModel]:
    fields: dict[str, Any] = {"text": (list[str], pydantic.Field(description="sentences to translate"))}
    hints = typing.get_type_hints(TranslateOptions)
    for f in dataclasses.fields(TranslateOptions):
        kind = {"src_prefix": list[str] | None, "tgt_prefix": list[str] | None}.get(f.name, hints[f.name])
        fields[f.name] = (kind, f.default)
    return pydantic.create_model("TranslateRequest", __config__=pydantic.ConfigDict(extra="forbid"), **fields)


TranslateRequest = _option_model()


class HypothesisOut(pydantic.BaseModel):
    tokens: list[int] = pydantic.Field(description="fairseq dictionary ids, </s> (and the target prefix) included")
    score: float | None = pydantic.Field(description="sum of log-probs (natural log) / length ** lenpen")
    positional_scores: list[float | None]
    text: str


class TranslationOut(pydantic.BaseModel):
    id: int = pydantic.Field(description="position of the sentence in the request")
    nbest: list[HypothesisOut] = pydantic.Field(description="best first; empty for a blank sentence")


class TranslateResponse(pydantic.BaseModel):
    results: list[TranslationOut]


class ErrorDetail(pydantic.BaseModel):
    type: str
    message: str
    option: str | None = None  # invalid_option: the option's name
    sentence: int | None = None  # sentence_too_long / invalid_sentence: its position in the request


class ErrorBody(pydantic.BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None, **extra):
        self.status, self.kind, self.message, self.headers, self.extra = status, kind, message, headers, extra


def error_response(status: int, kind: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    detail = {"type": kind, "message": message, **{k: v for k, v in extra.items() if v is not None}}
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


# --- the service ------------------------------------------------------------------------------------


class TranslationService:
    """State shared by the handlers: the batcher (which owns the Translator), limits, metrics."""

    def __init__(self, translator: Translator, batching: BatchLimits, limits: RequestLimits,
                 warmup: bool = True) -> None:
        self.translator = translator
        self.metrics = ServeMetrics()
        self.batcher = Batcher(translator, batching, self._on_batch)
        max_src = translator.config.max_positions
        # a sentence must fit a batch on its own
        self.max_sentence_tokens = min(limits.max_sentence_tokens or max_src, max_src, batching.max_batch_tokens)
        self.limits = limits
        self.warmup = warmup
        self.ready = asyncio.Event()
        self.draining = False
        self.metrics.queue.set_function(lambda: self.batcher.queued_sentences)

    def _on_batch(self, report: BatchReport) -> None:
        m = self.metrics
        m.batch_sentences.observe(report.sentences)
        m.batch_requests.observe(report.requests)
        m.sentences.inc(report.sentences)
        m.target_tokens.inc(report.target_tokens)
        m.source_tokens.inc(report.source_tokens)
        m.decode_seconds.inc(report.decode_s)
        if report.decode_s > 0:
            m.tokens_per_second.set(report.target_tokens / report.decode_s)

    async def start(self) -> None:
        self.batcher.start()
        if self.warmup:
            await self.batcher.run_in_worker(lambda: self.translator.translate_batch([WARMUP_TEXT]))
        self.ready.set()
        self.metrics.ready.set(1)

    def begin_drain(self) -> None:
        """Shutdown begins (SIGTERM): new requests are refused, queued ones decoded at once."""
        self.draining = True
        self.metrics.ready.set(0)
        self.batcher.flush()

    async def stop(self) -> None:
        self.begin_drain()
        await self.batcher.drain()

    # -- a translate request, from its body to its results
    def parse(self, body: bytes) -> tuple[list[str], list[int], TranslateOptions]:
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "malformed_json", f"the body is not JSON: {e}") from None
        if not isinstance(payload, dict):
            raise ApiError(422, "invalid_request", 'the body must be a JSON object {"text": [...], ...options}')
        if "text" not in payload:
            raise ApiError(422, "invalid_request", 'the body has no "text" (a list of sentences)')
        texts = payload.pop("text")
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise ApiError(422, "invalid_request", '"text" must be a list of strings')
        if len(texts) > self.limits.max_sentences:
            raise ApiError(413, "too_many_sentences",
                           f"{len(texts)} sentences in one request; the limit is {self.limits.max_sentences}")
        try:
            opts = TranslateOptions.from_mapping(payload)
        except OptionError as e:
            raise ApiError(422, "invalid_option", str(e), option=e.option) from None
        return texts, self._lengths(texts, opts), opts

    def _lengths(self, texts: list[str], opts: TranslateOptions) -> list[int]:
        """Source tokens of each sentence as the model would get them; the limits checked here so
        that no sentence can fail a batch that others share."""
        tok = self.translator.tokenizer
        try:
            src_prefix = tok.src_prefix if opts.src_prefix is None else tok.encode_source_prefix(opts.src_prefix)
        except DeltaLMError as e:
            raise ApiError(422, "invalid_option", str(e), option="src_prefix") from None
        if opts.tgt_prefix is not None:
            try:
                tok.encode_target_prefix(opts.tgt_prefix)
            except DeltaLMError as e:
                raise ApiError(422, "invalid_option", str(e), option="tgt_prefix") from None
        max_src = self.translator.config.max_positions
        lengths = []
        for k, text in enumerate(texts):
            try:
                n = len(tok.encode(text, src_prefix))
            except (DeltaLMError, UnicodeError) as e:
                raise ApiError(422, "invalid_sentence", f"sentence {k}: {e}", sentence=k) from None
            if opts.truncate:
                n = min(n, max_src)
            if n > self.max_sentence_tokens:
                hint = " (pass \"truncate\": true to cut it)" if n > max_src and self.max_sentence_tokens == max_src else ""
                raise ApiError(422, "sentence_too_long",
                               f"sentence {k} has {n} source tokens (with </s> and the source prefix); the "
                               f"limit is {self.max_sentence_tokens}{hint}", sentence=k)
            lengths.append(n)
        return lengths

    async def translate(self, texts: list[str], lengths: list[int], opts: TranslateOptions,
                        disconnected: asyncio.Future, deadline: float) -> list:
        try:
            request, future = self.batcher.submit(texts, lengths, opts)
        except QueueFull as e:
            raise ApiError(503, "queue_full", f"the server is busy: {e}; retry later",
                           headers={"Retry-After": str(e.retry_after_s)}) from None
        except ShuttingDown:
            raise ApiError(503, "shutting_down", "the server is shutting down",
                           headers={"Retry-After": "1"}) from None
        done, _ = await asyncio.wait({future, disconnected}, timeout=max(0.0, deadline - time.monotonic()),
                                     return_when=asyncio.FIRST_COMPLETED)
        if future in done and not future.cancelled():
            error = future.exception()
            if error is None:
                return future.result()
            if isinstance(error, OptionError):
                raise ApiError(422, "invalid_option", str(error), option=error.option)
            if isinstance(error, (InputError, TokenizerError)):  # the request's text or options
                raise ApiError(422, "invalid_sentence", str(error))
            raise ApiError(500, "internal", f"translation failed: {type(error).__name__}: {error}")
        self.batcher.cancel(request)
        if disconnected in done:
            raise ApiError(499, "client_disconnected", "the client closed the connection")
        raise ApiError(504, "timeout", f"no answer within the request timeout ({self.limits.timeout_s:g} s)")


def describe_shortlist(translator: Translator, path: str | Path | None) -> dict | None:
    """What /health says of the translator's vocabulary shortlist: None without one; else the
    file's name and the SHA-256 of its bytes (both None when the shortlist was given as an object,
    not a file) and how it was built (``Shortlist.info["built_from"]``)."""
    shortlist = getattr(translator, "shortlist", None)
    if shortlist is None:
        return None
    return {"file": Path(path).name if path is not None else None,
            "sha256": sha256_file(path) if path is not None else None,
            "built_from": shortlist.info.get("built_from")}


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, "body_too_large", f"the body has {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, "body_too_large", f"the body exceeds the limit of {limit} bytes")
    return bytes(body)


async def _wait_disconnect(receive) -> None:
    """Returns when the client has closed the connection (the ASGI server sends http.disconnect
    on the next receive once the request body is read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def create_app(translator: Translator, batching: BatchLimits = BatchLimits(),
               limits: RequestLimits = RequestLimits(), warmup: bool = True,
               shortlist_file: str | Path | None = None) -> FastAPI:
    """The ASGI app. The batcher starts with the app's lifespan (warm-up included: /ready turns
    200 after it) and drains at shutdown: every accepted request is answered. ``shortlist_file``:
    the file the translator's shortlist was loaded from, named by /health."""
    service = TranslationService(translator, batching, limits, warmup)
    health_body: dict[str, Any] = {"status": "ok"}
    if (shortlist := describe_shortlist(translator, shortlist_file)) is not None:
        health_body["shortlist"] = shortlist

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        warm = asyncio.get_running_loop().create_task(service.start())
        app.state.warmup_task = warm
        try:
            yield
        finally:
            await asyncio.gather(warm, return_exceptions=True)  # a failed warm-up: serve_app raises it
            await service.stop()

    app = FastAPI(title="deltalm serve", version=__version__, lifespan=lifespan,
                  description="DeltaLM translation with dynamic batching (fairseq-exact search).")
    app.state.service = service
    metrics = service.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e.status, e.kind, e.message, e.headers, **e.extra)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request")
        metrics.errors.labels(kind).inc()
        return error_response(e.status_code, kind, str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        metrics.errors.labels("internal").inc()
        return error_response(500, "internal", f"{type(e).__name__}: {e}")

    errors = {"model": ErrorBody}
    request_schema = TranslateRequest.model_json_schema()

    @app.post("/v1/translate", response_model=TranslateResponse,
              responses={400: errors, 413: errors, 422: errors, 503: errors, 504: errors},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
              summary="Translate sentences (one result per sentence, input order)")
    async def translate(request: Request):
        t0 = time.monotonic()
        metrics.in_progress.inc()
        watcher = None
        try:
            if service.draining:
                raise ApiError(503, "shutting_down", "the server is shutting down", headers={"Retry-After": "1"})
            if not service.ready.is_set():
                raise ApiError(503, "not_ready", "the model is still warming up", headers={"Retry-After": "1"})
            body = await _read_body(request, limits.max_body_bytes)
            texts, lengths, opts = service.parse(body)
            watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
            results = await service.translate(texts, lengths, opts, watcher, t0 + limits.timeout_s)
            response = JSONResponse({"results": [t.to_dict() for t in results]})
        except ApiError as e:
            metrics.errors.labels(e.kind).inc()
            response = error_response(e.status, e.kind, e.message, e.headers, **e.extra)
        finally:
            metrics.in_progress.dec()
            if watcher is not None:
                watcher.cancel()
        metrics.requests.labels(str(response.status_code)).inc()
        metrics.latency.observe(time.monotonic() - t0)
        return response

    @app.get("/health", summary="The process answers (and names the vocabulary shortlist in use, if any)")
    async def health():
        return health_body

    @app.get("/ready", summary="The model is loaded and warmed up", responses={503: errors})
    async def ready():
        if service.draining:
            return error_response(503, "shutting_down", "the server is shutting down")
        if not service.ready.is_set():
            return error_response(503, "not_ready", "the model is still warming up")
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

"""The HTTP API over ``deltalm.Translator`` (FastAPI on uvicorn).

    POST /v1/translate  {"text": ["...", ...], "beam": 5, ...}  ->  {"results": [{"id", "nbest"}, ...]}
                        with "stream": true: text/event-stream, a partial record per step and
                        sentence, each sentence's final record as soon as it is done, [DONE]
    GET  /              a page to try the model (HTML + JS shipped in the package)
    GET  /health        the process answers (and names the vocabulary shortlist, if the server uses one)
    GET  /ready         the model is loaded and warmed up (503 before, and while shutting down)
    GET  /metrics       Prometheus text format
    GET  /openapi.json, /docs, /redoc (their assets served from here, nothing from a CDN)

Options are ``deltalm.TranslateOptions``' fields (checked by ``TranslateOptions.from_mapping`` and
``Translator.options``); per-sentence fields (``PER_SENTENCE``: ``target_prefix``) have one entry
per sentence; sentences are tokenized and checked by ``Translator.prepare``. Each result is the
record ``deltalm translate --format jsonl`` writes (``Translation.to_dict``), its ``id`` the
sentence's position in the request. Every error is ``{"error": {"type", "message", ...}}`` with
the HTTP status of its kind (``deltalm.serve.metrics.ERROR_KINDS``); once a stream has begun, an
error is an event of that shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import typing
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse, ServerSentEvent
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltalm import OptionError, PartialTranslation, Sentence, TranslateOptions, Translation, Translator, __version__
from deltalm.artifact import sha256_file
from deltalm.errors import DecodeError, DeltaLMError, SentenceError, SentenceTooLong
from deltalm.scoring import Score, ScorePair

from .metrics import ServeMetrics
from .scheduler import Job, QueueFull, Scheduler, Scheduling, ScoreJob, ShuttingDown, StepReport

WARMUP_TEXT = "warm up"
STATIC = Path(__file__).resolve().parent / "static"  # resolved: an editable install links the files


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = 1 << 20
    max_sentences: int = 64  # per request
    max_sentence_tokens: int | None = None  # source tokens (prefix and </s> included); None: the model's
    timeout_s: float = 60.0  # arrival to answer (a stream: to its last final record)


# --- a translate request: the fields of its body ----------------------------------------------------

# Fields with one entry per sentence (a list as long as "text"), each passed to
# ``Translator.prepare`` under its own name: name -> (check of one entry, what an entry is).
PER_SENTENCE: dict[str, tuple[Callable[[Any], bool], str]] = {
    "target_prefix": (lambda v: v is None or isinstance(v, str), "a target prefix text or null"),
    "constraints": (
        lambda v: v is None or (isinstance(v, list) and all(isinstance(t, str) for t in v)),
        "a list of target texts (lexical constraints) or null",
    ),
}
REQUEST_FIELDS = ("text", "stream", *PER_SENTENCE)  # the body's fields that are not TranslateOptions


@dataclass(frozen=True)
class TranslateCall:
    """A parsed ``POST /v1/translate`` body."""

    texts: list[str]
    options: TranslateOptions
    per_sentence: dict[str, list]  # PER_SENTENCE fields given
    stream: bool = False


def _request_model() -> type[pydantic.BaseModel]:
    """The request body, declared once for the OpenAPI schema (the handler checks bodies itself,
    with messages that name the option)."""
    fields: dict[str, Any] = {
        "text": (list[str], pydantic.Field(description="sentences to translate")),
        "stream": (
            bool,
            pydantic.Field(
                False,
                description="answer text/event-stream: partial and final records as the decoding goes, then [DONE]",
            ),
        ),
        "target_prefix": (
            list[str | None] | None,
            pydantic.Field(None, description="per sentence, a target text the translation must begin with (or null)"),
        ),
        "constraints": (
            list[list[str] | None] | None,
            pydantic.Field(
                None,
                description="per sentence, target texts every hypothesis must contain (lexically constrained "
                "decoding; constraint_order says in which order), or null",
            ),
        ),
    }
    hints = typing.get_type_hints(TranslateOptions)
    for f in dataclasses.fields(TranslateOptions):
        kind = {"src_prefix": list[str] | None, "tgt_prefix": list[str] | None}.get(f.name, hints[f.name])
        fields[f.name] = (kind, f.default)
    return pydantic.create_model("TranslateRequest", __config__=pydantic.ConfigDict(extra="forbid"), **fields)


TranslateRequest = _request_model()


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


class ScoreRequest(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    source: list[str] = pydantic.Field(description="source sentences")
    target: list[str] = pydantic.Field(description="their translations, one per source")
    src_prefix: list[str] | None = None
    tgt_prefix: list[str] | None = pydantic.Field(None, description="symbols put before every target")
    truncate: bool = False


class ScoreOut(pydantic.BaseModel):
    id: int = pydantic.Field(description="position of the pair in the request")
    tokens: list[int] = pydantic.Field(description="the target's fairseq dictionary ids, </s> included")
    score: float | None = pydantic.Field(description="mean of the positional scores (natural log)")
    positional_scores: list[float | None] = pydantic.Field(description="log-prob of each target token")


class ScoreResponse(pydantic.BaseModel):
    results: list[ScoreOut]


SCORE_OPTIONS = ("src_prefix", "tgt_prefix", "truncate")  # the TranslateOptions a score request takes


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

    def body(self) -> dict:
        return {
            "error": {
                "type": self.kind,
                "message": self.message,
                **{k: v for k, v in self.extra.items() if v is not None},
            }
        }


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def shutting_down() -> ApiError:
    # Connection: close, so that a client on a kept-alive connection comes back on a new one
    return ApiError(
        503, "shutting_down", "the server is shutting down", headers={"Retry-After": "1", "Connection": "close"}
    )


# --- the service ------------------------------------------------------------------------------------


class TranslationService:
    """State shared by the handlers: the scheduler (which owns the Translator's engine), limits,
    metrics, and the count of accepted requests not yet answered (what a shutdown waits for)."""

    def __init__(
        self, translator: Translator, scheduling: Scheduling, limits: RequestLimits, warmup: bool = True
    ) -> None:
        self.translator = translator
        self.metrics = ServeMetrics()
        self.scheduler = Scheduler(translator, scheduling, self._on_step)
        max_src = translator.config.max_positions
        self.max_sentence_tokens = min(limits.max_sentence_tokens or max_src, max_src)
        self.limits = limits
        self.warmup = warmup
        self.ready = asyncio.Event()
        self.draining = False
        self.accepted = 0  # requests accepted and not yet answered
        self._answered = asyncio.Event()
        self._answered.set()
        self.metrics.queue.set_function(lambda: self.scheduler.waiting)

    def _on_step(self, report: StepReport, finished: list[Translation]) -> None:
        m = self.metrics
        m.step_seconds.observe(report.seconds)
        m.step_rows.observe(report.rows)
        m.admitted.observe(report.admitted)
        m.live_rows.set(report.live_rows)
        m.decode_seconds.inc(report.seconds)
        if finished:
            m.sentences.inc(len(finished))
            m.target_tokens.inc(sum(len(h.tokens) for t in finished for h in t.hypotheses))

    async def start(self) -> None:
        self.scheduler.start()
        if self.warmup:
            [sentence] = self.translator.prepare([WARMUP_TEXT], self.translator.options())
            await self.scheduler.submit([sentence]).done
        self.ready.set()
        self.metrics.ready.set(1)

    def begin_drain(self) -> None:
        """Shutdown begins (SIGTERM): new requests are refused (503), accepted ones finish."""
        self.draining = True
        self.metrics.ready.set(0)
        self.scheduler.stop_taking()

    async def wait_answered(self) -> None:
        """Returns once no accepted request is left unanswered (after ``begin_drain``: for good)."""
        await self._answered.wait()

    async def stop(self) -> None:
        self.begin_drain()
        await self.scheduler.close()

    def _accept(self) -> None:
        self.accepted += 1
        self._answered.clear()

    def answered(self) -> None:
        """An accepted request has had its answer (``submit`` counted it)."""
        self.accepted -= 1
        if self.accepted == 0:
            self._answered.set()

    # -- a translate request, from its body to its results
    def parse(self, body: bytes) -> TranslateCall:
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
            raise ApiError(
                413,
                "too_many_sentences",
                f"{len(texts)} sentences in one request; the limit is {self.limits.max_sentences}",
            )
        stream = payload.pop("stream", False)
        if not isinstance(stream, bool):
            raise ApiError(422, "invalid_option", f"stream must be true or false, got {stream!r}", option="stream")
        per_sentence = {}
        for name, (check, what) in PER_SENTENCE.items():
            if name not in payload or payload[name] is None:
                payload.pop(name, None)
                continue
            values = payload.pop(name)
            if not isinstance(values, list) or len(values) != len(texts):
                given = f"{len(values)} entries" if isinstance(values, list) else f"a {type(values).__name__}"
                raise ApiError(
                    422,
                    "invalid_option",
                    f"{name} must be a list with one entry per sentence of text ({len(texts)}), got {given}",
                    option=name,
                )
            for k, value in enumerate(values):
                if not check(value):
                    raise ApiError(
                        422, "invalid_option", f"{name}[{k}] must be {what}, got {value!r}", option=name, sentence=k
                    )
            per_sentence[name] = values
        try:
            options = self.translator.options(TranslateOptions.from_mapping(payload))
        except OptionError as e:
            raise ApiError(422, "invalid_option", str(e), option=e.option) from None
        return TranslateCall(texts, options, per_sentence, stream)

    def parse_scores(self, body: bytes) -> list[ScorePair]:
        """A ``POST /v1/score`` body, its pairs checked (``Translator.prepare_scores``)."""
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, "malformed_json", f"the body is not JSON: {e}") from None
        if not isinstance(payload, dict) or "source" not in payload or "target" not in payload:
            raise ApiError(422, "invalid_request", 'the body must be a JSON object {"source": [...], "target": [...]}')
        sources, targets = payload.pop("source"), payload.pop("target")
        for name, value in (("source", sources), ("target", targets)):
            if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
                raise ApiError(422, "invalid_request", f'"{name}" must be a list of strings')
        if len(sources) != len(targets):
            raise ApiError(
                422,
                "invalid_request",
                f'"source" has {len(sources)} sentences but "target" has {len(targets)}: give one target per source',
            )
        if len(sources) > self.limits.max_sentences:
            raise ApiError(
                413,
                "too_many_sentences",
                f"{len(sources)} pairs in one request; the limit is {self.limits.max_sentences}",
            )
        unknown = sorted(set(payload) - set(SCORE_OPTIONS))
        if unknown:
            raise ApiError(
                422,
                "invalid_option",
                f"{unknown[0]} is not an option of a score request (options: {', '.join(SCORE_OPTIONS)})",
                option=unknown[0],
            )
        try:
            options = self.translator.options(TranslateOptions.from_mapping(payload))
        except OptionError as e:
            raise ApiError(422, "invalid_option", str(e), option=e.option) from None
        try:
            pairs = self.translator.prepare_scores(sources, targets, options)
        except SentenceTooLong as e:
            raise self._too_long(e.index, e.length, e.limit == self.max_sentence_tokens) from None
        except SentenceError as e:
            raise ApiError(
                422,
                "invalid_sentence",
                f"pair {e.index} {e.reason}" if e.reason.startswith(("is ", "has ")) else f"pair {e.index}: {e.reason}",
                sentence=e.index,
            ) from None
        except DeltaLMError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        for pair in pairs:
            if len(pair.src) > self.max_sentence_tokens:
                raise self._too_long(pair.index, len(pair.src), False)
        return pairs

    def submit_scores(self, pairs: list[ScorePair]) -> ScoreJob:
        """Queue a score request (counted as accepted: ``answered`` ends it)."""
        try:
            job = self.scheduler.submit_scores(pairs)
        except ShuttingDown:
            raise shutting_down() from None
        self._accept()
        return job

    async def scores(self, job: ScoreJob, deadline: float) -> list[Score]:
        done, _ = await asyncio.wait({job.done}, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            raise self._timeout()
        if job.done.exception() is not None:
            raise self._failure(job.done.exception())
        return job.done.result()

    def prepare(self, call: TranslateCall) -> list[Sentence | None]:
        """The engine's sentences of ``call`` (``Translator.prepare``, on the event loop: ~0.02 ms a
        sentence, 17 ms for 64 sentences of 190 tokens), each checked against the limits."""
        try:
            sentences = self.translator.prepare(call.texts, call.options, **call.per_sentence)
        except SentenceTooLong as e:
            raise self._too_long(e.index, e.length, e.limit == self.max_sentence_tokens) from None
        except SentenceError as e:
            raise ApiError(
                422,
                "invalid_sentence",
                f"sentence {e.index} {e.reason}"
                if e.reason.startswith(("is ", "has "))
                else f"sentence {e.index}: {e.reason}",
                sentence=e.index,
            ) from None
        except DeltaLMError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        for k, sentence in enumerate(sentences):
            if sentence is not None and len(sentence.src) > self.max_sentence_tokens:
                raise self._too_long(k, len(sentence.src), False)
        return sentences

    def _too_long(self, k: int, length: int, can_truncate: bool) -> ApiError:
        hint = ' (pass "truncate": true to cut it)' if can_truncate else ""
        return ApiError(
            422,
            "sentence_too_long",
            f"sentence {k} has {length} source tokens (with </s> and the source "
            f"prefix); the limit is {self.max_sentence_tokens}{hint}",
            sentence=k,
        )

    def submit(self, sentences: list[Sentence | None], stream: bool) -> Job:
        try:
            job = self.scheduler.submit(sentences, stream)
        except QueueFull as e:
            raise ApiError(
                503,
                "queue_full",
                f"the server is busy: {e}; retry later",
                headers={"Retry-After": str(e.retry_after_s)},
            ) from None
        except ShuttingDown:
            raise shutting_down() from None
        self._accept()
        return job

    async def results(self, job: Job, disconnected: asyncio.Future, deadline: float) -> list[Translation]:
        """The job's translations; on a disconnect or past the deadline the job is cancelled."""
        done, _ = await asyncio.wait(
            {job.done, disconnected}, timeout=max(0.0, deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
        )
        if job.done in done:
            if job.done.exception() is not None:
                raise self._failure(job.done.exception())
            return job.done.result()
        self.scheduler.cancel(job)
        if disconnected in done:
            raise ApiError(499, "client_disconnected", "the client closed the connection")
        raise self._timeout()

    def _timeout(self) -> ApiError:
        return ApiError(504, "timeout", f"no answer within the request timeout ({self.limits.timeout_s:g} s)")

    @staticmethod
    def _failure(error: BaseException) -> ApiError:
        if isinstance(error, DecodeError):
            return ApiError(500, "internal", f"translation failed: {type(error.cause).__name__}: {error.cause}")
        return ApiError(500, "internal", f"translation failed: {type(error).__name__}: {error}")

    async def events(self, job: Job, deadline: float) -> AsyncIterator[PartialTranslation | Translation]:
        """The job's stream: partials (only the newest of a sentence, if the reader lags) and
        finals, until every sentence is final. A failure or the deadline raises ApiError."""
        queue = job.events
        left = len(job.sentences)
        while left:
            timeout = deadline - time.monotonic()
            try:
                first = await asyncio.wait_for(queue.get(), timeout) if timeout > 0 else queue.get_nowait()
            except (asyncio.TimeoutError, asyncio.QueueEmpty):
                self.scheduler.cancel(job)
                raise self._timeout() from None
            batch = [first] + [queue.get_nowait() for _ in range(queue.qsize())]
            newest = {}
            for k, event in enumerate(batch):
                if isinstance(event, (PartialTranslation, Translation)):
                    newest[event.index] = k
            for k, event in enumerate(batch):
                if isinstance(event, BaseException):
                    raise self._failure(event)
                if isinstance(event, PartialTranslation) and newest[event.index] != k:
                    continue  # a later event of this sentence is here already
                if isinstance(event, Translation):
                    left -= 1
                yield event


class _EventStream(EventSourceResponse):
    """The answer to a streamed request: its job's events as server-sent events, ``[DONE]`` at
    the end; an error after the stream began is an event (``{"error": ...}``). Whatever ends the
    response (the last event, the client leaving: sse-starlette cancels it), the job is cancelled
    if unfinished and the request counted as answered, exactly once."""

    def __init__(self, service: TranslationService, job: Job, t0: float, finish: Callable) -> None:
        self.service, self.job, self.t0, self.finish = service, job, t0, finish
        self.outcome: tuple[int, str | None] = (499, "client_disconnected")  # until the stream says otherwise
        super().__init__(self._events(), ping=0, sep="\n")

    async def _events(self) -> AsyncIterator[ServerSentEvent]:
        service = self.service
        try:
            async for event in service.events(self.job, self.t0 + service.limits.timeout_s):
                yield ServerSentEvent(json.dumps(event.to_dict(), ensure_ascii=False))
            self.outcome = (200, None)
        except ApiError as e:
            self.outcome = (e.status, e.kind)
            yield ServerSentEvent(json.dumps(e.body(), ensure_ascii=False))
        yield ServerSentEvent("[DONE]")

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.job.finished:
                self.service.scheduler.cancel(self.job)
            self.finish(self.t0, *self.outcome)
            self.service.answered()


def describe_shortlist(translator: Translator, path: str | Path | None) -> dict | None:
    """What /health says of the translator's vocabulary shortlist: None without one; else the
    file's name and the SHA-256 of its bytes (both None when the shortlist was given as an object,
    not a file) and how it was built (``Shortlist.info["built_from"]``)."""
    shortlist = getattr(translator, "shortlist", None)
    if shortlist is None:
        return None
    return {
        "file": Path(path).name if path is not None else None,
        "sha256": sha256_file(path) if path is not None else None,
        "built_from": shortlist.info.get("built_from"),
    }


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


def create_app(
    translator: Translator,
    scheduling: Scheduling = Scheduling(),  # noqa: B008 (frozen)
    limits: RequestLimits = RequestLimits(),
    warmup: bool = True,
    shortlist_file: str | Path | None = None,
) -> FastAPI:
    """The ASGI app. The scheduler starts with the app's lifespan (warm-up included: /ready turns
    200 after it) and drains at shutdown: every accepted request is answered. ``shortlist_file``:
    the file the translator's shortlist was loaded from, named by /health."""
    service = TranslationService(translator, scheduling, limits, warmup)
    health_body: dict[str, Any] = {"status": "ok"}
    if (shortlist := describe_shortlist(translator, shortlist_file)) is not None:
        health_body["shortlist"] = shortlist
    # sse-starlette ends every open stream when uvicorn begins to shut down; ours drain instead
    # (a stream is an accepted request: it is answered to its end)
    AppStatus.disable_automatic_graceful_drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        warm = asyncio.get_running_loop().create_task(service.start())
        app.state.warmup_task = warm
        try:
            yield
        finally:
            await asyncio.gather(warm, return_exceptions=True)  # a failed warm-up: serve_app raises it
            await service.stop()

    app = FastAPIOffline(
        title="deltalm serve",
        version=__version__,
        lifespan=lifespan,
        description="DeltaLM translation with in-flight batching (fairseq-exact search).",
    )
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    metrics = service.metrics

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "invalid_request")
        metrics.errors.labels(kind).inc()
        return error_response(ApiError(e.status_code, kind, str(e.detail), getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        metrics.errors.labels("internal").inc()
        return error_response(ApiError(500, "internal", f"{type(e).__name__}: {e}"))

    def finish(t0: float, status: int, kind: str | None = None) -> None:
        if kind is not None:
            metrics.errors.labels(kind).inc()
        metrics.in_progress.dec()
        metrics.requests.labels(str(status)).inc()
        metrics.latency.observe(time.monotonic() - t0)

    async def accepted_body(request: Request) -> bytes:
        """The body of a request the service takes: ApiError 503 while it drains or warms up, 413
        over the body limit."""
        if service.draining:
            raise shutting_down()
        if not service.ready.is_set():
            raise ApiError(503, "not_ready", "the model is still warming up", headers={"Retry-After": "1"})
        return await _read_body(request, limits.max_body_bytes)

    errors = {"model": ErrorBody}
    request_schema = TranslateRequest.model_json_schema()

    @app.post(
        "/v1/translate",
        response_model=TranslateResponse,
        responses={
            200: {
                "content": {"text/event-stream": {}},
                "description": 'with "stream": true, server-sent events (see the documentation)',
            },
            400: errors,
            413: errors,
            422: errors,
            503: errors,
            504: errors,
        },
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}}},
        summary="Translate sentences (one result per sentence, input order)",
    )
    async def translate(request: Request):
        t0 = time.monotonic()
        metrics.in_progress.inc()
        try:
            call = service.parse(await accepted_body(request))
            job = service.submit(service.prepare(call), call.stream)
        except ApiError as e:
            finish(t0, e.status, e.kind)
            return error_response(e)
        if call.stream:
            return _EventStream(service, job, t0, finish)
        watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
        try:
            results = await service.results(job, watcher, t0 + limits.timeout_s)
            response = JSONResponse({"results": [t.to_dict() for t in results]})
            finish(t0, 200)
        except ApiError as e:
            finish(t0, e.status, e.kind)
            response = error_response(e)
        finally:
            watcher.cancel()
            service.answered()
        return response

    @app.post(
        "/v1/score",
        response_model=ScoreResponse,
        responses={400: errors, 413: errors, 422: errors, 503: errors, 504: errors},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": ScoreRequest.model_json_schema()}},
            }
        },
        summary="Score given translations (fairseq's --score-reference; one result per pair, input order)",
    )
    async def score(request: Request):
        t0 = time.monotonic()
        metrics.in_progress.inc()
        try:
            job = service.submit_scores(service.parse_scores(await accepted_body(request)))
        except ApiError as e:
            finish(t0, e.status, e.kind)
            return error_response(e)
        try:
            scores = await service.scores(job, t0 + limits.timeout_s)
            response = JSONResponse({"results": [s.to_dict() for s in scores]})
            finish(t0, 200)
        except ApiError as e:
            finish(t0, e.status, e.kind)
            response = error_response(e)
        finally:
            service.answered()
        return response

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health", summary="The process answers (and names the vocabulary shortlist in use, if any)")
    async def health():
        return health_body

    @app.get("/ready", summary="The model is loaded and warmed up", responses={503: errors})
    async def ready():
        if service.draining:
            return error_response(ApiError(503, "shutting_down", "the server is shutting down"))
        if not service.ready.is_set():
            return error_response(ApiError(503, "not_ready", "the model is still warming up"))
        return {"status": "ready"}

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app

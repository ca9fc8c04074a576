"""The decoding side of ``deltalm serve``: one worker thread owns the search engine
(``Translator.engine``) and steps it while any sentence is live or waiting; the event loop only
hands it prepared sentences and cancellations and routes what comes back:

    handler ──submit(sentences)──► inbox (thread-safe) ──► worker: Engine.add / cancel at a step
       ▲                                                    boundary, Engine.step() while busy
       └──── Job: partial tokens, final records ◄──call_soon_threadsafe── the step's events

Two batching modes (``Scheduling.batching``):

- ``inflight`` (default): sentences join the running batch at the next step boundary while there
  is room (``max_batch_rows`` hypotheses = beam x sentences, ``max_batch_tokens`` padded source
  tokens), and leave it as soon as they are finished; a short request sent while long sentences
  decode is answered after its own steps.
- ``request``: a batch forms while nothing decodes (the oldest sentence waits up to ``max_wait_s``
  for others to join, and the clients a batch has just answered get ``rejoin_share`` of its decode
  time to come back) and runs until its last sentence is done; sentences arriving meanwhile wait.
  Kept to compare with.

Either way a sentence's result is the one it gets alone (``deltalm.search``: beam search and greedy
are batch-independent; sampling draws from a generator seeded by the request's seed and the
sentence's position), except with a vocabulary shortlist, whose candidates are the batch's.

A cancelled job (client gone, timeout) leaves the queue at once and the batch at the next step.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from deltalm import Finished, Partial, PartialTranslation, Sentence, Translation, Translator
from deltalm.errors import DecodeError
from deltalm.scoring import ScorePair, score_pairs

BATCHING_MODES = ("inflight", "request")
REPORT_EVERY_S = 0.5  # step reports (metrics) reach the event loop at least this often while decoding


class QueueFull(Exception):
    """``waiting`` sentences wait already (limit ``limit``); ``retry_after_s`` estimates when
    there will be room."""

    def __init__(self, waiting: int, limit: int, retry_after_s: int):
        self.waiting, self.limit, self.retry_after_s = waiting, limit, retry_after_s
        super().__init__(f"{waiting} sentences wait for the decoder (limit {limit})")


class ShuttingDown(Exception):
    """The scheduler takes no more jobs."""


@dataclass(frozen=True)
class Scheduling:
    batching: str = "inflight"  # see BATCHING_MODES
    max_batch_rows: int = 160  # hypotheses decoding at once: beam x sentences, over every beam size
    max_batch_tokens: int = 8192  # padded source tokens decoding at once (sentences x longest source)
    max_queue_sentences: int = 1024  # waiting to be admitted; beyond, submit raises QueueFull
    max_wait_s: float = 0.010  # request mode: how long a batch waits for more sentences
    rejoin_share: float = 0.02  # request mode: see the module docstring


@dataclass(frozen=True)
class StepReport:
    """What one engine step did (for metrics)."""

    seconds: float
    rows: int  # hypotheses decoded
    admitted: int  # sentences that joined
    live_rows: int  # after the step
    waiting: int  # sentences not yet admitted, after the step


class Job:
    """The sentences of one request on their way through the scheduler (event-loop side).
    ``done`` resolves to the ``Translation`` of every sentence (request order) or to the error
    that failed them; with ``stream`` every sentence's partials and final record also go to
    ``events`` (an asyncio.Queue of ``PartialTranslation`` / ``Translation`` / an exception)."""

    def __init__(self, number: int, sentences: list[Sentence | None], stream: bool) -> None:
        loop = asyncio.get_running_loop()
        self.number = number
        self.sentences = sentences
        self.stream = stream
        self.results: list[Translation | None] = [None] * len(sentences)
        self.todo = len(sentences)
        self.done: asyncio.Future = loop.create_future()
        self.events: asyncio.Queue | None = asyncio.Queue() if stream else None

    @property
    def finished(self) -> bool:
        return self.done.done()

    def keys(self) -> list[tuple[int, int]]:
        """The engine keys of its sentences not yet finished."""
        return [(self.number, k) for k, s in enumerate(self.sentences) if s is not None and self.results[k] is None]

    def _partial(self, partial: PartialTranslation) -> None:
        if self.events is not None and not self.finished:
            self.events.put_nowait(partial)

    def _final(self, translation: Translation) -> None:
        if self.finished or self.results[translation.index] is not None:
            return
        self.results[translation.index] = translation
        self.todo -= 1
        if self.events is not None:
            self.events.put_nowait(translation)
        if self.todo == 0:
            self.done.set_result(self.results)

    def _fail(self, error: BaseException) -> None:
        if self.finished:
            return
        self.done.set_exception(error)
        self.done.exception()  # retrieved: a job nobody awaits any more logs no warning
        if self.events is not None:
            self.events.put_nowait(error)


class ScoreJob:
    """The pairs of one score request (``Translator.prepare_scores``); ``done`` resolves to their
    ``Score`` records (request order) or to the error that failed them."""

    def __init__(self, number: int, pairs: list[ScorePair]) -> None:
        self.number = number
        self.pairs = pairs
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()

    def _scored(self, positional: list[list[float]]) -> None:
        if not self.done.done():
            self.done.set_result([pair.score(p) for pair, p in zip(self.pairs, positional)])

    def _fail(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
            self.done.exception()


class Scheduler:
    """Owns the Translator's engine through one worker thread. Use from one event loop:
    ``start()``, ``submit()`` / ``cancel()`` from request handlers, ``close()`` at shutdown."""

    def __init__(
        self,
        translator: Translator,
        scheduling: Scheduling,
        on_step: Callable[[StepReport, list[Translation]], None] | None = None,
    ) -> None:
        """``on_step(report, finished)``: on the event loop, for every engine step (in order, at
        the latest ``REPORT_EVERY_S`` after it), with the translations it finished."""
        if scheduling.batching not in BATCHING_MODES:
            raise ValueError(f"batching must be one of {', '.join(BATCHING_MODES)}, got {scheduling.batching!r}")
        self.translator = translator
        self.scheduling = scheduling
        self.on_step = on_step or (lambda report, finished: None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._jobs: dict[int, Job] = {}
        self._score_jobs: set[int] = set()
        self._numbers = iter(range(1 << 62))
        self._finished_times: deque[float] = deque(maxlen=256)  # when recent sentences finished (Retry-After)
        self._closing = False
        # shared with the worker, under _cond
        self._cond = threading.Condition()
        self._inbox: list[tuple] = []  # ("add", [(key, sentence)], stream) / ("cancel", [key]) / ("flush",) /
        # ("score", ScoreJob)
        self._inbox_sentences = 0
        self._engine_waiting = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self._idle = asyncio.Event()

    # -- state
    @property
    def waiting(self) -> int:
        """Sentences accepted and not yet decoding."""
        with self._cond:
            return self._inbox_sentences + self._engine_waiting

    @property
    def jobs(self) -> int:
        return len(self._jobs)

    # -- life cycle
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._idle.set()
        self._thread = threading.Thread(target=self._work, name="deltalm-decode", daemon=True)
        self._thread.start()

    def stop_taking(self) -> None:
        """Shutdown begins: ``submit`` raises ShuttingDown from now on; in request mode what waits
        is decoded at once, without waiting for more."""
        self._closing = True
        with self._cond:
            self._inbox.append(("flush",))
            self._cond.notify()

    async def wait_idle(self) -> None:
        """Returns once every job submitted so far is finished."""
        await self._idle.wait()

    async def close(self) -> None:
        """Stop taking jobs, finish every one accepted, stop the worker."""
        self.stop_taking()
        await self.wait_idle()
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)

    # -- jobs
    def submit(self, sentences: list[Sentence | None], stream: bool = False) -> Job:
        """Queue a request's prepared sentences (``Translator.prepare``; None: a blank one, answered
        at once). Raises ``QueueFull`` / ``ShuttingDown`` instead of queueing."""
        if self._closing:
            raise ShuttingDown()
        job = Job(next(self._numbers), sentences, stream)
        items = [((job.number, k), s) for k, s in enumerate(sentences) if s is not None]
        with self._cond:
            waiting = self._inbox_sentences + self._engine_waiting
            limit = self.scheduling.max_queue_sentences
            if items and waiting + len(items) > limit:
                raise QueueFull(waiting, limit, self._retry_after(waiting))
            if items:
                self._inbox.append(("add", items, stream))
                self._inbox_sentences += len(items)
                self._cond.notify()
        if items:
            self._jobs[job.number] = job
            self._idle.clear()
        for k, s in enumerate(sentences):
            if s is None:
                job._final(Translation(k))
        return job

    def submit_scores(self, pairs: list[ScorePair]) -> ScoreJob:
        """Queue a score request's pairs: the worker scores the pairs of every request waiting at
        that moment together, between two decoder steps. Raises ``ShuttingDown`` after shutdown."""
        if self._closing:
            raise ShuttingDown()
        job = ScoreJob(next(self._numbers), pairs)
        if not pairs:
            job._scored([])
            return job
        with self._cond:
            self._inbox.append(("score", job))
            self._cond.notify()
        self._score_jobs.add(job.number)
        self._idle.clear()
        job.done.add_done_callback(lambda _: (self._score_jobs.discard(job.number), self._check_idle()))
        return job

    def cancel(self, job: Job) -> None:
        """Forget a job (its client is gone, or it timed out): its waiting sentences leave the
        queue, its decoding ones the batch at the next step; nothing more is delivered to it."""
        if self._jobs.pop(job.number, None) is None:
            return
        keys = job.keys()
        if not job.finished:
            job.done.cancel()
        if keys:
            with self._cond:
                self._inbox.append(("cancel", keys))
                self._cond.notify()
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._jobs and not self._score_jobs:
            self._idle.set()

    def _retry_after(self, waiting: int) -> int:
        """Seconds until ``waiting`` sentences are likely through, from the recent finishing rate."""
        times = self._finished_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 1
        rate = (len(times) - 1) / (times[-1] - times[0])
        return max(1, min(60, math.ceil(waiting / rate)))

    # -- back on the event loop
    def _deliver(self, events: list, failures: list[tuple[list, BaseException]], reports: list[StepReport]) -> None:
        now = time.monotonic()
        finished: list[Translation] = []
        for event in events:
            number, k = event.key
            job = self._jobs.get(number)
            if job is None:
                continue
            sentence = job.sentences[k]
            if isinstance(event, Finished):
                translation = self.translator.translation(k, sentence, event.hypotheses)
                finished.append(translation)
                self._finished_times.append(now)
                job._final(translation)
                if job.finished:
                    del self._jobs[number]
            elif isinstance(event, Partial):
                job._partial(self.translator.partial(k, sentence, event.tokens))
        for keys, error in failures:
            for number in {key[0] for key in keys}:
                job = self._jobs.pop(number, None)
                if job is not None:
                    job._fail(error)
                    rest = [key for key in job.keys() if key not in keys]
                    if rest:  # its other sentences need not be decoded
                        with self._cond:
                            self._inbox.append(("cancel", rest))
                            self._cond.notify()
        for k, report in enumerate(reports):
            self.on_step(report, finished if k == len(reports) - 1 else [])
        self._check_idle()

    # -- the worker thread
    def _score(self, jobs: list[ScoreJob]) -> None:
        """Every waiting score request's pairs in one call (``score_pairs`` groups them by target
        length), the results routed back to each request."""
        pairs = [pair for job in jobs for pair in job.pairs]
        try:
            with self.translator.lock:
                scored = score_pairs(self.translator.backend, [p.src for p in pairs], [p.tokens for p in pairs])
        except Exception as e:  # noqa: BLE001 - delivered to the requests
            for job in jobs:
                self._loop.call_soon_threadsafe(job._fail, e)
            return
        start = 0
        for job in jobs:
            part = scored[start : start + len(job.pairs)]
            start += len(job.pairs)
            self._loop.call_soon_threadsafe(job._scored, part)

    def _work(self) -> None:
        sched = self.scheduling
        engine = self.translator.engine(max_rows=sched.max_batch_rows, max_tokens=sched.max_batch_tokens)
        request_mode = sched.batching == "request"
        streaming: set[Hashable] = set()  # keys whose partials are wanted
        in_engine: set[Hashable] = set()
        # the sentences not yet admitted, in the engine's (arrival) order: [key, arrival, beam]
        pending: deque[tuple[Hashable, float, int]] = deque()
        flushing = False
        free_since = last_batch_s = batch_start = 0.0
        reports: list[StepReport] = []  # not yet handed to the event loop
        reported = time.monotonic()

        def forget(key: Hashable) -> None:
            in_engine.discard(key)
            streaming.discard(key)

        def start_in(now: float) -> float:
            """Seconds until the engine should step (0: now; inf: nothing to do)."""
            if engine.idle:
                return math.inf
            if not request_mode or engine.live or flushing:
                return 0.0
            # request mode, a batch forming: full, or its oldest sentence waited long enough
            if sum(beam for _, _, beam in pending) >= sched.max_batch_rows:
                return 0.0
            rejoin = max(sched.max_wait_s, sched.rejoin_share * last_batch_s)
            return max(0.0, max(pending[0][1] + sched.max_wait_s, free_since + rejoin) - now)

        while True:
            with self._cond:
                while not self._inbox and not self._stop:
                    delay = start_in(time.monotonic())
                    if delay <= 0:
                        break
                    self._cond.wait(None if delay == math.inf else delay)
                inbox, self._inbox, self._inbox_sentences = self._inbox, [], 0
                if self._stop and not inbox and engine.idle:
                    return
            now = time.monotonic()
            scoring = [op[1] for op in inbox if op[0] == "score"]
            if scoring:
                self._score(scoring)
            for op in inbox:
                if op[0] == "add":
                    for key, sentence in op[1]:
                        engine.add(key, sentence)  # checked by Translator.prepare: cannot fail here
                        in_engine.add(key)
                        pending.append((key, now, sentence.options.beam))
                        if op[2]:
                            streaming.add(key)
                elif op[0] == "cancel":
                    for key in op[1]:
                        if key in in_engine:
                            engine.cancel(key)
                            forget(key)
                    if any(key not in in_engine for key, _, _ in pending):
                        pending = deque(p for p in pending if p[0] in in_engine)
                elif op[0] == "flush":
                    flushing = True
            if start_in(time.monotonic()) > 0:
                with self._cond:
                    self._engine_waiting = engine.waiting
                continue
            admit = not request_mode or engine.live == 0
            if request_mode and admit:
                batch_start = time.monotonic()
            engine.partials = bool(streaming)
            failures: list[tuple[list, BaseException]] = []
            t0 = time.perf_counter()
            try:
                with self.translator.lock:
                    events = engine.step(admit=admit)
            except DecodeError as e:  # the backend failed these sentences: the others go on
                events = []
                failures.append((list(e.keys), e))
                for key in e.keys:
                    engine.cancel(key)
            except Exception as e:  # noqa: BLE001 - a bug: fail every sentence, go on with a fresh engine
                events = []
                failures.append((list(in_engine), e))
                engine = self.translator.engine(max_rows=sched.max_batch_rows, max_tokens=sched.max_batch_tokens)
            seconds = time.perf_counter() - t0
            for _ in range(engine.admitted_last):  # admitted in arrival order
                pending.popleft()
            for keys, _ in failures:
                for key in keys:
                    forget(key)
                pending = deque(p for p in pending if p[0] in in_engine)
            kept = []
            for event in events:
                if isinstance(event, Finished):
                    forget(event.key)
                    kept.append(event)
                elif event.key in streaming:
                    kept.append(event)
            if request_mode and engine.live == 0:
                free_since = time.monotonic()
                last_batch_s = free_since - batch_start
            with self._cond:
                self._engine_waiting = engine.waiting
            reports.append(
                StepReport(seconds, engine.rows_last, engine.admitted_last, engine.live_rows, engine.waiting)
            )
            # wake the event loop only when there is something to route (or the reports are old):
            # a wake-up per step costs each step a GIL hand-over
            now = time.monotonic()
            if kept or failures or engine.idle or now - reported >= REPORT_EVERY_S:
                self._loop.call_soon_threadsafe(self._deliver, kept, failures, reports)
                reports, reported = [], now

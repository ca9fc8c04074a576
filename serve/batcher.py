"""Dynamic batching: sentences of concurrent requests decoded together, results routed back.

The event loop owns the queue and the schedule (no locks); one worker thread owns the
``Translator`` and runs one batch at a time, so the loop never blocks on decoding:

    request ──submit()──► queue (bounded, in sentences) ──► schedule ──► worker thread ──► Translator
       ▲                                                                                    │
       └─────────────── future resolved with the request's translations ◄──────────────────┘

A batch is formed when the worker is free: sentences are grouped by their ``TranslateOptions``
(with ``max_len_a`` > 0 also by source length, because fairseq's maximum length then depends on the
padded source width); the first group, in order of its oldest sentence, that is full
(``max_batch_sentences`` / ``max_batch_tokens``, rows x longest source) or whose oldest sentence
has waited ``max_wait_s`` (and, after a batch, the time its clients need to come back: see
``_deadline``) goes, as many of its sentences as fit, in arrival order. Requests are split across
batches when they do not fit in one.

Beam search and greedy decoding do not depend on what a sentence is batched with, so a result
equals ``deltalm translate`` on that sentence alone; sampling draws from one generator per batch
(as fairseq does), so with sampling the result depends on the batch even with a seed. So does a
translator with a vocabulary shortlist: a batch scores the candidates of all its sentences.

A request that is cancelled (client gone, timeout) leaves the queue at once; sentences of it that
are already being decoded finish with their batch (the others in the batch are not disturbed) and
their results are dropped.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from deltalm import TranslateOptions, Translation, Translator
from deltalm.errors import DeltaLMError


class QueueFull(Exception):
    """The queue holds ``limit`` sentences already; ``retry_after_s`` is an estimate of when it
    will have room."""

    def __init__(self, waiting: int, limit: int, retry_after_s: int):
        self.waiting, self.limit, self.retry_after_s = waiting, limit, retry_after_s
        super().__init__(f"the queue holds {waiting} sentences (limit {limit})")


class ShuttingDown(Exception):
    """The batcher no longer takes requests."""


@dataclass(frozen=True)
class BatchLimits:
    max_batch_sentences: int = 32
    max_batch_tokens: int = 4096  # rows x longest source (tokens, prefix and </s> included)
    max_wait_s: float = 0.010
    max_queue_sentences: int = 1024
    # after a batch, its clients get max(max_wait_s, this share of the batch's decode time) to send
    # their next sentences (for a model whose batch takes seconds, 10 ms is too short to gather them)
    rejoin_share: float = 0.02


@dataclass(frozen=True)
class BatchReport:
    """What the worker did with one batch (for metrics)."""

    sentences: int
    requests: int
    source_tokens: int  # padded: rows x longest source
    target_tokens: int  # tokens of every returned hypothesis
    decode_s: float


@dataclass(eq=False)
class _Request:
    opts: TranslateOptions
    texts: list[str]
    lengths: list[int]  # source tokens of each sentence (prefix and </s> included)
    future: asyncio.Future
    arrived: float
    results: list[Translation | None] = field(default_factory=list)
    todo: int = 0  # sentences not yet decoded
    cancelled: bool = False


@dataclass(eq=False)
class _Item:
    """One sentence waiting in the queue."""

    request: _Request
    position: int  # in its request

    @property
    def length(self) -> int:
        return self.request.lengths[self.position]

    @property
    def group(self) -> tuple:
        opts = self.request.opts
        return (opts, self.length if opts.max_len_a else None)


class Batcher:
    """Owns the Translator through a single worker thread. Use from one event loop:
    ``start()``, ``submit()`` from request handlers, ``drain()`` at shutdown."""

    def __init__(self, translator: Translator, limits: BatchLimits,
                 on_batch: Callable[[BatchReport], None] | None = None) -> None:
        self.translator = translator
        self.limits = limits
        self.on_batch = on_batch or (lambda report: None)
        self._queue: deque[_Item] = deque()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deltalm-decode")
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._closing = False
        self._flushing = False
        self._busy = False
        self._free_since = 0.0  # when the last batch ended (time.monotonic)
        self._last_decode_s = 0.0
        self._checked: set[TranslateOptions] = set()  # option sets the model accepted
        self._recent_decode_s = 0.0  # moving average of a batch's decode time (for Retry-After)

    # -- state
    @property
    def queued_sentences(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return self._busy

    # -- life cycle
    def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._schedule(), name="deltalm-batcher")

    async def run_in_worker(self, fn, *args):
        """``fn(*args)`` on the worker thread (model load, warm-up), in turn with the batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def flush(self) -> None:
        """From now on, decode what waits without waiting for more (shutdown)."""
        self._flushing = True
        if self._wakeup is not None:
            self._wakeup.set()

    async def drain(self) -> None:
        """Stop taking requests, decode every waiting sentence without waiting for more, and stop
        the worker."""
        self._closing = True
        self.flush()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    # -- requests
    def submit(self, texts: list[str], lengths: list[int], opts: TranslateOptions) -> tuple[_Request, asyncio.Future]:
        """Queue the sentences of one request; the future resolves to their translations (input
        order, ``index`` the position in the request) or to the error that failed them. Raises
        ``QueueFull`` / ``ShuttingDown`` instead of queueing."""
        if self._closing:
            raise ShuttingDown()
        limit = self.limits.max_queue_sentences
        if len(self._queue) + len(texts) > limit:
            raise QueueFull(len(self._queue), limit, self._retry_after(len(self._queue)))
        loop = asyncio.get_running_loop()
        request = _Request(opts, list(texts), list(lengths), loop.create_future(), time.monotonic(),
                           [None] * len(texts), len(texts))
        if not texts:
            request.future.set_result([])
            return request, request.future
        self._queue.extend(_Item(request, k) for k in range(len(texts)))
        self._wakeup.set()
        return request, request.future

    def cancel(self, request: _Request) -> int:
        """Forget a request (its client is gone or it timed out): its waiting sentences leave the
        queue; a batch already decoding some of them runs on for the others. Returns how many
        sentences left the queue."""
        request.cancelled = True
        before = len(self._queue)
        self._queue = deque(item for item in self._queue if item.request is not request)
        if not request.future.done():
            request.future.cancel()
        return before - len(self._queue)

    def _retry_after(self, waiting: int) -> int:
        batches = waiting / self.limits.max_batch_sentences + 1
        return max(1, round(batches * max(self._recent_decode_s, 0.05)))

    # -- the schedule
    async def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._drop_cancelled()
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._next_batch()
            if batch is None:  # not full yet: wait for more, at most until the oldest's deadline
                deadline = self._deadline(self._queue[0])
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    pass
                continue
            self._busy = True
            try:
                outcome = await loop.run_in_executor(self._executor, self._decode, batch)
            finally:
                self._busy = False
                self._free_since = time.monotonic()
            self._last_decode_s = outcome[1]
            self._deliver(batch, outcome)

    def _drop_cancelled(self) -> None:
        if any(item.request.cancelled for item in self._queue):
            self._queue = deque(item for item in self._queue if not item.request.cancelled)

    def _deadline(self, item: _Item) -> float:
        """When ``item``'s group goes, full or not: ``max_wait_s`` after it arrived, and not before
        the clients the last batch answered have had time to send their next sentences (``max_wait_s``
        or ``rejoin_share`` of that batch's decode time, whichever is longer), which then join those
        that waited meanwhile; without it a steady load splits into alternating part-full batches."""
        lim = self.limits
        rejoin = max(lim.max_wait_s, lim.rejoin_share * self._last_decode_s)
        return max(item.request.arrived + lim.max_wait_s, self._free_since + rejoin)

    def _next_batch(self) -> list[_Item] | None:
        """The batch to decode now, or None to wait for more sentences: the first group (in order
        of its oldest sentence) that is full or whose oldest sentence has waited ``max_wait_s``."""
        lim = self.limits
        groups: dict[tuple, list[_Item]] = {}
        for item in self._queue:
            groups.setdefault(item.group, []).append(item)
        now = time.monotonic()
        for items in groups.values():
            chosen: list[_Item] = []
            width = 0
            for item in items:
                w = max(width, item.length)
                if chosen and (len(chosen) + 1 > lim.max_batch_sentences or w * (len(chosen) + 1) > lim.max_batch_tokens):
                    break
                chosen.append(item)
                width = w
            full = len(chosen) < len(items) or len(chosen) == lim.max_batch_sentences
            if full or self._flushing or now >= self._deadline(items[0]):
                taken = set(map(id, chosen))
                self._queue = deque(item for item in self._queue if id(item) not in taken)
                return chosen
        return None

    def _decode(self, batch: list[_Item]):
        """On the worker thread: the translations of ``batch`` (a list) or the exception."""
        opts = batch[0].request.opts
        t0 = time.perf_counter()
        try:
            if opts not in self._checked:
                # what the model must allow for these options (beam < vocabulary, ...): checked on
                # no sentence at all, so that an error is the options' and fails only this group
                self.translator.translate_batch([], **_fields(opts))
                self._checked.add(opts)
            texts = [item.request.texts[item.position] for item in batch]
            try:
                results = self.translator.translate_batch(
                    texts, batch_size=self.limits.max_batch_sentences, max_tokens=self.limits.max_batch_tokens,
                    **_fields(opts))
            except DeltaLMError:
                if len({id(item.request) for item in batch}) == 1:
                    raise
                # one request's sentence failed the batch: decode request by request, so that
                # only the request at fault gets the error
                by_item: dict[int, Translation | Exception] = {}
                for request, items in _by_request(batch):
                    try:
                        done = self.translator.translate_batch(
                            [request.texts[i.position] for i in items], batch_size=self.limits.max_batch_sentences,
                            max_tokens=self.limits.max_batch_tokens, **_fields(opts))
                    except DeltaLMError as e:
                        done = [e] * len(items)
                    by_item.update(zip(map(id, items), done))
                results = [by_item[id(item)] for item in batch]
        except Exception as e:  # noqa: BLE001 - delivered to every request of the batch
            results = e
        decode_s = time.perf_counter() - t0
        self._recent_decode_s = 0.8 * self._recent_decode_s + 0.2 * decode_s if self._recent_decode_s else decode_s
        return results, decode_s

    def _deliver(self, batch: list[_Item], outcome) -> None:
        results, decode_s = outcome
        target_tokens = 0
        failed: set[int] = set()
        for k, item in enumerate(batch):
            request = item.request
            result = results if isinstance(results, Exception) else results[k]
            if isinstance(result, Exception):
                if id(request) not in failed and not request.future.done():
                    request.future.set_exception(result)
                failed.add(id(request))
                continue
            target_tokens += sum(len(h.tokens) for h in result.hypotheses)
            request.results[item.position] = dataclasses.replace(result, index=item.position)
            request.todo -= 1
            if request.todo == 0 and not request.future.done():
                request.future.set_result(request.results)
        for request_id in failed:  # its other sentences need not be decoded
            for item in batch:
                if id(item.request) == request_id:
                    self.cancel(item.request)
                    break
        width = max(item.length for item in batch)
        self.on_batch(BatchReport(len(batch), len({id(i.request) for i in batch}), width * len(batch),
                                  target_tokens, decode_s))


def _fields(opts: TranslateOptions) -> dict:
    return {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)}


def _by_request(batch: list[_Item]) -> list[tuple[_Request, list[_Item]]]:
    groups: dict[int, tuple[_Request, list[_Item]]] = {}
    for item in batch:
        groups.setdefault(id(item.request), (item.request, []))[1].append(item)
    return list(groups.values())

"""Merges concurrent requests' texts into encoder calls, budgeted in real tokens.

Two stages on two threads, as text-embeddings-inference and infinity split them: each request is first prepared
on the tokenizer thread (cache hits resolved, the distinct misses tokenized), so the queue knows exactly how
many tokens it holds and a request whose texts are all cached never waits for the encoder. One worker task owns
the encoder: while it runs a call on the encoder thread (so the event loop never blocks on inference, and the
tokenizer works on the next requests meanwhile), new requests queue up and the next call takes as many as fit
in `max_gather_tokens`. The encoder then sorts their texts by length and cuts them into its own batches, so
gathering widely costs no padding: it gives the sort more to work with. A request that is cancelled (client
gone) before its batch starts is dropped from the queue. Past `max_queue` queued items new requests are refused
with QueueFull, which the app turns into 429 + Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from models.scorer import EncodedItems, Prepared
from service.errors import Busy
from service.tasks import cancel

log = logging.getLogger(__name__)

# The queue hands the encoder this many of its batches' worth of tokens at once: enough texts for the length sort
# to group similar lengths (measured: 16 x 1024 on CPU kept padding under 5% on mixed GRPO groups), few enough that
# a request arriving just after a gather waits one bounded call.
GATHER_BATCHES = 16


# (items, tokens, seconds encoding, seconds each request of the batch waited in the queue)
BatchObserver = Callable[[int, int, float, list[float]], None]


class Encoder(Protocol):
    """The two stages of models.scorer.Scorer the batcher drives."""

    def prepare(self, prompts: Sequence[str], responses: Sequence[str]) -> Prepared: ...

    def run(self, jobs: Sequence[Prepared]) -> list[EncodedItems]: ...


class QueueFull(Busy):
    """The batcher holds `max_queue` items already."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"busy: {reason}")


@dataclass
class _Job:
    prepared: Prepared
    future: asyncio.Future[EncodedItems]
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def items(self) -> int:
        return self.prepared.n_items


class Batcher:
    def __init__(
        self,
        encoder: Encoder,
        max_gather_tokens: int,
        max_wait_ms: float,
        max_queue: int,
        observe_batch: BatchObserver | None = None,
    ) -> None:
        self._encoder = encoder
        self.max_gather_tokens = max_gather_tokens
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._observe = observe_batch
        self._jobs: deque[_Job] = deque()
        self._queued_items = 0
        self._queued_tokens = 0
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        # One thread each: the scorer parallelises inside onnxruntime (two batches at once would only contend), and
        # the tokenizer thread keeps the next requests ready while the encoder runs.
        self._tokenizer_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pal-tokenizer")
        self._encoder_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pal-encoder")

    @property
    def queue_depth(self) -> int:
        """Items waiting for a batch (not counting the batch running now)."""
        return self._queued_items

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.create_task(self._run(), name="pal-batcher")

    async def stop(self) -> None:
        await cancel(self._worker)
        self._worker = None
        for job in self._jobs:
            if not job.future.done():
                job.future.set_exception(RuntimeError("service is shutting down"))
        self._jobs.clear()
        self._queued_items = self._queued_tokens = 0
        self._tokenizer_pool.shutdown(wait=True)
        self._encoder_pool.shutdown(wait=True)

    def _check_room(self, n: int) -> None:
        if self._queued_items + n > self.max_queue:
            raise QueueFull(f"{self._queued_items} items queued; the limit is {self.max_queue} (PAL_MAX_QUEUE)")

    async def encode(self, prompts: list[str], responses: list[str]) -> EncodedItems:
        """Encode (prompt, response) pairs as part of whatever batch they land in; raises QueueFull."""
        self._check_room(len(responses))  # before tokenizing: a full queue refuses at no cost
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(self._tokenizer_pool, self._encoder.prepare, prompts, responses)
        if not prepared.pending:  # every text cached: nothing to queue
            return (await loop.run_in_executor(self._tokenizer_pool, self._encoder.run, [prepared]))[0]
        self._check_room(prepared.n_items)
        job = _Job(prepared, loop.create_future())
        self._jobs.append(job)
        self._queued_items += job.items
        self._queued_tokens += prepared.tokens
        self._wake.set()
        try:
            return await job.future
        finally:
            if not job.future.done():  # cancelled while queued: the worker skips it
                job.future.cancel()

    def _dequeue(self) -> _Job:
        job = self._jobs.popleft()
        self._queued_items -= job.items
        self._queued_tokens -= job.prepared.tokens
        return job

    def _take_batch(self) -> list[_Job]:
        batch: list[_Job] = []
        tokens = 0
        while self._jobs:
            job = self._jobs[0]
            if job.future.done():  # the caller went away
                self._dequeue()
                continue
            if batch and tokens + job.prepared.tokens > self.max_gather_tokens:
                break
            batch.append(self._dequeue())
            tokens += job.prepared.tokens
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._jobs:
                self._wake.clear()
                await self._wake.wait()
            # Give concurrent requests a short moment to join, unless the budget is already full.
            deadline = self._jobs[0].enqueued + self.max_wait_s
            while self._queued_tokens < self.max_gather_tokens and (left := deadline - time.perf_counter()) > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), left)
            batch = self._take_batch()
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._encoder_pool, self._encoder.run, [j.prepared for j in batch])
            except Exception as e:  # the encoder failed: every caller of this batch gets the error
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(e)
                continue
            if self._observe is not None:
                tokens = sum(j.prepared.tokens for j in batch)
                waits = [t0 - j.enqueued for j in batch]
                try:
                    self._observe(sum(j.items for j in batch), tokens, time.perf_counter() - t0, waits)
                except Exception:  # metrics must never take the worker (and every queued request) down
                    log.exception("batch observer failed")
            for j, result in zip(batch, results, strict=True):
                if not j.future.done():
                    j.future.set_result(result)

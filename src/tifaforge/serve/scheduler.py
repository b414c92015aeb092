"""Admission and batching in front of the engine, which is not thread-safe: one worker thread owns it.

    tifa serve models/tiny --max-concurrency 4

Up to `max_concurrency` requests are admitted at once; the app answers the rest with an immediate
429 (a queue nobody bounds only moves the wait into every client's timeout). The worker takes every
admitted job that is waiting and runs them as ONE batched `Engine.stream` call, so concurrent
clients share each forward pass. A job that arrives while a batch runs waits for the next batch: the
engine has no continuous batching.

A job whose client left is cancelled: it gets no more deltas and its slot is free at once. Its rows
keep decoding only while some live row shares the batch; the stream is closed (which stops
generation) as soon as every row still running belongs to a cancelled job.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Sequence

from tifaforge.engine.generate import Delta, Engine, Request


class Job:
    """One HTTP request's rows (its choices) and the events the worker sends back to the event loop."""

    def __init__(self, requests: Sequence[Request], loop: asyncio.AbstractEventLoop, on_close):
        self.requests = list(requests)
        self.loop, self._on_close = loop, on_close
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.finished: set[int] = set()  # choices the worker saw finish (worker thread only)

    def put(self, item: Delta | BaseException) -> None:
        """Called from the worker thread."""
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def running(self) -> bool:
        return not self.cancelled and len(self.finished) < len(self.requests)

    def close(self) -> None:
        """Stop wanting output (done, or the client left) and give the slot back; idempotent."""
        if not self.cancelled:
            self.cancelled = True
            self._on_close()

    async def deltas(self) -> AsyncIterator[Delta]:
        """Every delta of every choice, until each has finished; a worker error is raised here."""
        left = len(self.requests)
        while left:
            item = await self.events.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            left -= item.finish_reason is not None


class Scheduler:
    def __init__(self, engine: Engine, max_concurrency: int):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.engine, self.max_concurrency = engine, max_concurrency
        self.active = 0  # admitted jobs not yet closed
        self.busy = False  # the worker is inside an engine call (shown by /health)
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="tifa-engine", daemon=True)
        self._thread.start()

    def try_admit(self) -> bool:
        with self._lock:
            if self.active >= self.max_concurrency:
                return False
            self.active += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self.active -= 1

    def submit(self, requests: Sequence[Request]) -> Job:
        """Queue an admitted request's rows; call from the event loop after `try_admit()` said yes."""
        job = Job(requests, asyncio.get_running_loop(), self._release)
        self._queue.put(job)
        return job

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- worker thread ---------------------------------------------------------------------------

    def _work(self) -> None:
        waiting: list[Job] = []  # jobs that did not fit the last batch
        while True:
            if not waiting:
                job = self._queue.get()
                if job is None:
                    return
                waiting.append(job)
            waiting += self._drain()
            batch, waiting = self._fit([j for j in waiting if j is None or not j.cancelled])
            if batch:
                self._run(batch)
            if None in waiting:
                return

    def _drain(self) -> list:
        out = []
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out

    def _fit(self, jobs: list) -> tuple[list[Job], list]:
        """The jobs that share one batch: the engine gives every row `context - longest prompt` new
        tokens, so a job joins only if its rows keep their full `max_new_tokens` (first job always)."""
        batch, rest, width, longest = [], [], 0, 0
        for job in jobs:
            if job is None:
                rest.append(job)
                continue
            w = max([width] + [len(r.prompt) for r in job.requests])
            m = max([longest] + [r.sampling.max_new_tokens for r in job.requests])
            if batch and w + m > self.engine.context:
                rest.append(job)
                continue
            batch.append(job)
            width, longest = w, m
        return batch, rest

    def _run(self, batch: list[Job]) -> None:
        owners = [(job, i) for job in batch for i in range(len(job.requests))]
        stream = self.engine.stream([r for job in batch for r in job.requests])
        self.busy = True
        try:
            for d in stream:
                job, i = owners[d.index]
                job.put(Delta(i, d.text, d.finish_reason))
                if d.finish_reason is not None:
                    job.finished.add(i)
                if not any(j.running() for j in batch):
                    break
        except Exception as e:  # a bug or an engine error: every waiting client hears of it
            for job in batch:
                job.put(e)
        finally:
            stream.close()  # closing the generator stops the decode loop
            self.busy = False

"""Admission and batching in front of the engine, which is not thread-safe: one worker owns it.

`Worker` is the decode loop; `Scheduler` runs it in a thread of the server's process (tests, the
llama.cpp backend, `tifa serve --no-engine-process`); `serve.engine_process.EngineProcess` runs the
same loop in a process of its own (`tifa serve`'s default for the transformers engine).

    tifa serve models/tiny --max-concurrency 4

Up to `max_concurrency` requests are admitted at once; the app answers the rest with an immediate
429 (a queue nobody bounds only moves the wait into every client's timeout). The worker keeps one
`engine.generate.Batch` decoding: between two steps it adds every admitted job that arrived, so
concurrent clients share each forward pass and a new one waits one step, not for a whole batch.

A job whose client left is cancelled: it gets no more deltas, its slot is free at once and its rows
leave the batch before the next step. An engine that cannot batch (the llama.cpp backend holds one
sequence) gets its jobs one after another instead, still bounded and cancellable.

The worker runs torch on all CPUs but one (`worker_threads`), the one left to the event loop: every
CPU op waits for all its OpenMP threads, so a thread preempted by the event loop or another process
stalls it. On the 2-core dev machine, with another process training, one thread served 5 to 30 times
faster than two.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
import time
from collections.abc import AsyncIterator, Sequence

from tifaforge.engine.generate import Batch, Delta, Engine, Request


class Job:
    """One HTTP request's rows (its choices) and the events the worker sends back to the event loop."""

    def __init__(self, requests: Sequence[Request], loop: asyncio.AbstractEventLoop, on_close):
        self.requests = list(requests)
        self.loop, self._on_close = loop, on_close
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.first_sent = False  # the worker sent this job's first delta (sent at once, never held)

    def fail(self, error: BaseException) -> None:
        """Called from the worker thread: `deltas()` raises `error`."""
        self.loop.call_soon_threadsafe(deliver, [(self, error)])

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


class Admission:
    """At most `max_concurrency` jobs admitted at once (`active`); past it, `try_admit` says no at once."""

    max_concurrency: int
    active: int
    _lock: threading.Lock

    def try_admit(self) -> bool:
        with self._lock:
            if self.active >= self.max_concurrency:
                return False
            self.active += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self.active -= 1


class Worker:
    """The decode loop that owns the engine: between two steps it takes every job that arrived, drops
    the cancelled ones' rows, steps the batch and sends the deltas, coalesced (`_send`). Where the
    jobs come from (`_arrivals`) and where deltas go (`_deliver`) is the subclass's: the thread of
    `Scheduler`, or the engine process of `serve.engine_process`."""

    def __init__(self, engine, stream_interval: float = 0.02):
        if not 0 <= stream_interval <= 1:
            raise ValueError(f"stream_interval must be 0 to 1 seconds, got {stream_interval}")
        self.engine, self.stream_interval = engine, stream_interval
        self._held: dict = {}  # (job, choice) -> a delta not yet sent, merged from several steps
        self._sent_at = 0.0
        self.busy = False  # rows are decoding (shown by /health)

    def _arrivals(self, wait: bool) -> list:
        """Every job that arrived since the last step (None: stop); with `wait`, block until one does."""
        raise NotImplementedError

    def _deliver(self, deltas: list) -> None:
        """Hand ((job, choice), delta) pairs to their jobs."""
        raise NotImplementedError

    def _work(self) -> None:
        batch, owners = Batch(self.engine), {}  # owners: batch index -> (job, choice)
        while True:
            for job in self._arrivals(wait=not batch):
                if job is None:
                    return
                if not job.cancelled:
                    self._add(batch, owners, job)
            gone = [index for index, (job, _) in owners.items() if job.cancelled]
            batch.cancel(gone)
            for index in gone:
                del owners[index]
            if batch:
                self.busy = True
                batch = self._step(batch, owners)
            else:
                self._flush(0.0)  # nothing decoding: nothing may wait

    def _step(self, batch: Batch, owners: dict) -> Batch:
        """One decode step, its deltas sent to their jobs; after an error, a new empty batch."""
        try:
            deltas = batch.step()
        except Exception as e:  # a bug or an engine error: every client in the batch hears of it
            for job in {job for job, _ in owners.values()}:
                job.fail(e)
            owners.clear()
            return Batch(self.engine)
        self._send([(owners.pop(d.index) if d.finish_reason else owners[d.index], d) for d in deltas])
        return batch

    def _send(self, deltas: list) -> None:
        """Deltas to their jobs, coalesced: a choice's text of several steps goes out as one delta at
        most every `stream_interval` seconds. Every event costs the event loop Python work that
        contends with the engine for the GIL when both share a process (measured with one client:
        overhead against the engine alone 9% with an event per token, 6% coalesced; at 4 and 16
        clients steps take longer than the interval, so little is merged); a choice's first delta and
        its last are sent at once, so the time to first token and the end are never delayed (vLLM's
        --stream-interval, in time rather than tokens)."""
        now, first = time.monotonic(), False
        for key, d in deltas:
            held = self._held.get(key)
            if held is None:
                first |= key[0].first_sent is False
                key[0].first_sent = True
                self._held[key] = d
            else:
                lp = None if d.logprobs is None else (held.logprobs or []) + d.logprobs
                self._held[key] = dataclasses.replace(d, text=held.text + d.text, logprobs=lp)
        if first or now - self._sent_at >= self.stream_interval or any(d.finish_reason for _, d in deltas):
            self._flush(now)

    def _flush(self, now: float) -> None:
        if self._held:
            self._deliver([(key, d) for key, d in self._held.items() if not key[0].cancelled])
            self._held.clear()
        self._sent_at = now

    @staticmethod
    def _add(batch: Batch, owners: dict, job) -> None:
        try:
            indices = batch.add(job.requests)
        except Exception as e:  # an invalid request fails alone
            job.fail(e)
            return
        owners.update((index, (job, i)) for i, index in enumerate(indices))


class Scheduler(Admission, Worker):
    """The engine in a worker thread of the server's process (see the module docstring)."""

    def __init__(self, engine: Engine, max_concurrency: int, stream_interval: float = 0.02):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        super().__init__(engine, stream_interval)
        self.max_concurrency = max_concurrency
        self.active = 0  # admitted jobs not yet closed
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="tifa-engine", daemon=True)
        self._thread.start()

    def submit(self, requests: Sequence[Request]) -> Job:
        """Queue an admitted request's rows; call from the event loop after `try_admit()` said yes."""
        job = Job(requests, asyncio.get_running_loop(), self._release)
        self._queue.put(job)
        return job

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    # -- worker thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        if not getattr(self.engine, "continuous_batching", True):
            return self._work_in_turn()
        import torch

        torch.set_num_threads(worker_threads())
        self._work()

    def _work_in_turn(self) -> None:
        """For an engine that holds one sequence (llama.cpp's): admitted jobs run one after another,
        in arrival order; a job whose client left is skipped, or stopped at its next delta."""
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled:
                continue
            self.busy = True
            try:
                stream = self.engine.stream(job.requests)
                try:
                    for d in stream:
                        if job.cancelled:
                            break
                        self._send([((job, d.index), d)])
                    self._flush(0.0)
                finally:
                    stream.close()
            except Exception as e:  # an invalid request or an engine error: this job hears of it
                job.fail(e)
            finally:
                self.busy = not self._queue.empty()

    @staticmethod
    def _deliver(deltas: list) -> None:
        """Hand a step's deltas ((job, choice), delta) to the event loop in one call, not one each: a
        call writes to the loop's wake-up socket, and the loop it wakes takes the GIL from this thread."""
        by_loop: dict = {}
        for (job, i), d in deltas:
            by_loop.setdefault(job.loop, []).append((job, dataclasses.replace(d, index=i)))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(deliver, items)

    def _arrivals(self, wait: bool) -> list:
        """Every job queued since the last step; with `wait`, block until there is one."""
        out = []
        if wait:
            self.busy = False
            out.append(self._queue.get())
        while True:
            try:
                out.append(self._queue.get_nowait())
            except queue.Empty:
                return out


def deliver(items: list) -> None:
    """On the event loop: each (job, delta or error) to its job, unless the job was closed meanwhile."""
    for job, d in items:
        if not job.cancelled:
            job.events.put_nowait(d)


def worker_threads() -> int:
    """torch threads for the engine's thread: the process's setting (the main thread's
    `torch.set_num_threads`, else OMP_NUM_THREADS, else the CPUs) less one. Setting it in a thread
    other than the main one leaves the rest of the process as it was (OpenMP keeps it per thread)."""
    import torch

    return max(1, torch.get_num_threads() - 1)

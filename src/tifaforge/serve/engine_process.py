"""The engine in its own process, so the server's HTTP work never waits for the engine's GIL.

    tifa serve models/tiny                       # the default for the transformers backend
    tifa serve models/tiny --no-engine-process   # the engine in a thread of the server's process

In one process, the event loop's Python (HTTP parsing, JSON, SSE) and the engine thread's Python
(the model's module calls, the samplers, detokenising) take turns on one GIL: on the 2-core dev
machine that cost 14% of the engine's tokens/s at 4 and 16 concurrent clients, though the gaps
between steps were only ~1% of the time (bench/serve.py). This is the split vLLM V1 made
(`AsyncLLM` in the API server, `EngineCore` in a busy-loop process, messages over ZMQ): here the
child process runs the same decode loop as the thread (`scheduler.Worker`), and a pipe carries

    parent -> child: ("config", stream interval), ("add", job id, [Request]), ("cancel", job id),
                     ("stop",)
    child -> parent: ("ready", tokenizer, context) or ("error", exception) once, then
                     ("deltas", [(job id, Delta)]), ("fail", job id, exception), ("busy", bool)

Prompts arrive as token ids (the server tokenises and checks limits before admitting a request),
deltas are the coalesced ones of `Worker._send`, so the pipe carries one message per flush, not
one per token. In the server process a reader thread hands each message's deltas to the event
loop in one call. The tokenizer the server uses is the child's own (sent once, pickled), so both
sides agree on every id whatever the loader added.

Written by hand: vLLM's engine process is CUDA-only and brings its own model runner; the pieces
here are the standard library's (`multiprocessing` spawn context, `Connection`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import pickle
import queue
import threading
from collections.abc import Sequence

from tifaforge.serve.scheduler import Admission, Job, Worker, deliver

log = logging.getLogger("tifaforge.serve")


class EngineProcess(Admission):
    """An engine loaded in a child process, with the scheduler interface the app uses
    (`try_admit`, `submit`, `close`, `active`, `busy`, `max_concurrency`) and the engine attributes
    it reads (`tokenizer`, `context`, `render`).

    `threads`: torch threads of the child (default: the server's `worker_threads()`, all CPUs but
    one, the one left to the HTTP process). `load_kwargs` go to `Engine.load` in the child;
    `configure`, a module-level function (it is pickled by name), is called on the loaded engine there.
    The creator closes it (`close()`); an app built on it does not, so one engine process can serve
    several apps in turn."""

    continuous_batching = True
    supports_logprobs = True  # the child runs the transformers engine

    def __init__(self, path, *, threads: int | None = None, configure=None, start_timeout: float = 600,
                 **load_kwargs):
        import multiprocessing as mp

        from tifaforge.serve.scheduler import worker_threads

        self.max_concurrency = 4
        self.active, self.busy = 0, False
        self.prefix_stats = None  # the child's prefix cache, as of its last idle moment
        self._lock = threading.Lock()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # to the child, sent by `_sender`
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count()
        self._dead: str | None = None  # why requests can no longer be served
        self.failed: str | None = None  # the child died (not closed): /health answers 503 with this
        ctx = mp.get_context("spawn")  # fork after torch's threads started is unsafe
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, name="tifa-engine", daemon=True,
                                 args=(child, str(path), load_kwargs, threads or worker_threads(), configure))
        self._proc.start()
        child.close()
        if not self._conn.poll(start_timeout):
            self._proc.kill()
            raise RuntimeError(f"the engine process did not load {path} within {start_timeout:.0f} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise RuntimeError(f"the engine process exited while loading {path} (exit code {self._proc.exitcode})") from None
        if msg[0] == "error":
            self._proc.join(5)
            raise msg[1]
        _, self.tokenizer, self.context, self.kv_bytes_per_token, self.kv_free = msg
        self._reader = threading.Thread(target=self._read, name="tifa-engine-reader", daemon=True)
        self._reader.start()
        self._sender = threading.Thread(target=self._send_loop, name="tifa-engine-sender", daemon=True)
        self._sender.start()

    # -- what the app reads of an engine -----------------------------------------------------------

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from tifaforge.chat.template import render

        return render(messages, self.tokenizer, add_generation_prompt=add_generation_prompt)

    # -- the scheduler interface ---------------------------------------------------------------------

    def scheduler(self, max_concurrency: int, stream_interval: float = 0.02) -> EngineProcess:
        """Itself, admitting `max_concurrency` requests at once, the child coalescing each stream's
        text to one delta per `stream_interval` seconds (see `Worker._send`)."""
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        if not 0 <= stream_interval <= 1:
            raise ValueError(f"stream_interval must be 0 to 1 seconds, got {stream_interval}")
        self.max_concurrency = max_concurrency
        self._post(("config", stream_interval))
        return self

    def submit(self, requests: Sequence) -> Job:
        """Send an admitted request's rows to the engine process; call from the event loop."""
        job_id = next(self._ids)
        job = Job(requests, asyncio.get_running_loop(), lambda: self._closed(job_id))
        self._jobs[job_id] = job  # before the check: the reader sets _dead, then fails every job it has
        if self._dead:
            job.fail(RuntimeError(self._dead))
        else:
            self._post(("add", job_id, list(requests)))
        return job

    def close(self) -> None:
        """Stop the engine process (its rows are dropped) and wait for it; idempotent."""
        if self._conn.closed:
            return
        self._post(("stop",))
        self._outbox.put(None)
        self._sender.join(30)
        # The reader sees the pipe close when the child exits, then reaps it: wait for it before
        # joining here, as two threads in Process.join race on waitpid (the loser reads the reaped
        # child as alive, with no exit code).
        self._reader.join(35)
        self._proc.join(30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._conn.close()

    # -- internals --------------------------------------------------------------------------------

    def _closed(self, job_id: int) -> None:
        """A job is done or its client left: the slot is free at once; the child drops its rows."""
        self._release()
        self._jobs.pop(job_id, None)
        self._post(("cancel", job_id))

    def _post(self, msg) -> None:
        """Queue a message for the child. Sent from a thread of its own: a pipe write blocks while the
        pipe is full (the child reads between two steps), and the event loop must never block."""
        self._outbox.put(msg)

    def _send_loop(self) -> None:
        while (msg := self._outbox.get()) is not None:
            try:
                self._conn.send(msg)
            except (OSError, ValueError):  # the child is gone: the reader fails the jobs
                pass

    def _read(self) -> None:
        """The reader thread: each message's deltas to their jobs' event loops, in one call per loop."""
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                break
            if msg[0] == "deltas":
                by_loop: dict = {}
                for job_id, d in msg[1]:
                    if (job := self._jobs.get(job_id)) is not None:
                        by_loop.setdefault(job.loop, []).append((job, d))
                for loop, items in by_loop.items():
                    loop.call_soon_threadsafe(deliver, items)
            elif msg[0] == "fail":
                if (job := self._jobs.get(msg[1])) is not None:
                    job.fail(msg[2])
            elif msg[0] == "busy":
                self.busy, self.prefix_stats = msg[1], msg[2]
        self._proc.join(5)
        code = self._proc.exitcode
        if code not in (0, None):
            self._dead = self.failed = f"the engine process exited with code {code}"
            log.error("%s", self._dead)
            for job in list(self._jobs.values()):
                job.fail(RuntimeError(self._dead))
        else:
            self._dead = "the engine process has stopped"


# ---------------------------------------------------------------------------------------------
# The child process


class _RemoteJob:
    """The child's view of a job: its rows, and failures sent back by id."""

    def __init__(self, job_id: int, requests: list, conn):
        self.id, self.requests, self._conn = job_id, requests, conn
        self.cancelled = False
        self.first_sent = False

    def fail(self, error: BaseException) -> None:
        self._conn.send(("fail", self.id, _picklable(error)))


class _ChildWorker(Worker):
    def __init__(self, engine, conn, stream_interval: float):
        super().__init__(engine, stream_interval)
        self._conn = conn
        self._jobs: dict[int, _RemoteJob] = {}

    def _arrivals(self, wait: bool) -> list:
        out = []
        if wait:
            self._set_busy(False)
            out += self._handle(self._recv())
        while None not in out and self._conn.poll():  # after a stop (or the server's end of the pipe
            out += self._handle(self._recv())            # closing: poll() stays true at EOF) read no more
        if any(j is not None for j in out):
            self._set_busy(True)
        return out

    def _recv(self):
        try:
            return self._conn.recv()
        except EOFError:  # the server process is gone: nothing left to serve
            return ("stop",)

    def _set_busy(self, busy: bool) -> None:
        if busy != self.busy:
            self.busy = busy
            pc = getattr(self.engine, "prefix_cache", None)
            self._conn.send(("busy", busy, pc.stats() if pc is not None else None))

    def _handle(self, msg) -> list:
        if msg[0] == "add":
            job = self._jobs[msg[1]] = _RemoteJob(msg[1], msg[2], self._conn)
            return [job]
        if msg[0] == "cancel":
            if (job := self._jobs.pop(msg[1], None)) is not None:
                job.cancelled = True
            return []
        if msg[0] == "config":
            self.stream_interval = msg[1]
            return []
        return [None]  # stop

    def _deliver(self, deltas: list) -> None:
        self._conn.send(("deltas", [(job.id, dataclasses.replace(d, index=i)) for (job, i), d in deltas]))


def _picklable(error: BaseException) -> BaseException:
    try:
        pickle.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def _child_main(conn, path: str, load_kwargs: dict, threads: int, configure) -> None:
    import torch

    from tifaforge.engine.generate import Engine

    torch.set_num_threads(threads)
    try:
        engine = Engine.load(path, **load_kwargs)
        if configure is not None:
            configure(engine)
    except BaseException as e:  # the server reports it and exits
        conn.send(("error", _picklable(e)))
        return
    from tifaforge.engine.generate import free_memory_bytes

    conn.send(("ready", engine.tokenizer, engine.context, engine.kv_bytes_per_token,
               free_memory_bytes(engine.model.device)))
    try:
        _ChildWorker(engine, conn, 0.02)._work()  # the server's ("config", interval) follows
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server process is gone (killed): nobody to send to, stop
    conn.close()

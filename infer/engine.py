"""The model in a process of its own, so that the server's Python never stalls the decoding loop.

Every torch op gives up Python's GIL and must take it back (infer/batching.py measures what that
costs a second thread). In one process, uvicorn reading requests, JSON and PIL decoding hold the
GIL the decoding thread waits for at each op. So mmdlm-serve runs its Batcher in a child process
with one thread: between forwards it reads the requests that came down a pipe, and it sends back
each answer's progress and its Reply (or the error). On the 2-core CPU (bf16 demo model, 32
clients, same day) this took the load test from 304 to 385-438 VQA requests/s at batch 32, and
from 109 to 125-135 one at a time.

EngineProcess is the server's end: the Batcher's interface (submit -> Future of a Reply, waiting,
close), a thread that feeds the pipe (a blocking write never stalls the event loop) and one that
reads it. If the child dies, every pending request fails with an error that says so, and so does
every later one.
"""

from __future__ import annotations

import contextlib
import itertools
import multiprocessing
import pickle
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError

from PIL import Image

from mmdlm.infer.batching import Unavailable
from mmdlm.infer.infer import InferError
from mmdlm.sampling import SamplerConfig


class EngineProcess:
    """A Batcher of the model folder `model`, running in a child process; `start()` loads it there."""

    def __init__(self, model: str, max_batch_size: int = 16, device: str = "cpu", dtype: str | None = None,
                 threads: int | None = None):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: give at least 1")
        self.max_batch_size = max_batch_size
        self._args = (str(model), max_batch_size, device, dtype, threads)
        self._jobs: dict[int, tuple[Future, Callable | None]] = {}  # pending requests by key
        self._lock = threading.Lock()  # guards _jobs, _error and _closing
        self._keys = itertools.count()
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # messages for the child, sent by the feeder thread
        self._error: Unavailable | None = None  # set once the child has stopped
        self._closing = False
        self._reaping = threading.Lock()  # one thread at a time waits for the child (_reap)
        self._waiting = 0  # the child's count of requests not yet started, as of its last message
        self._process = None

    def start(self) -> EngineProcess:
        """Start the child and wait until its model is loaded; InferError with its message if loading fails."""
        if self._process is not None:
            return self
        context = multiprocessing.get_context("spawn")  # fork would copy this process's threads' locks
        self._conn, child = context.Pipe()
        self._process = context.Process(target=run_engine, args=(child, *self._args), name="mmdlm-engine",
                                        daemon=True)
        self._process.start()
        child.close()
        try:
            kind, message = self._conn.recv()
        except EOFError:
            kind, message = "failed", None
        if kind == "failed":
            self._process.join()
            raise InferError(message or f"the model process exited with code {self._process.exitcode}")
        for target in (self._feed, self._read):
            threading.Thread(target=target, name=f"mmdlm-engine{target.__name__}", daemon=True).start()
        return self

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def error(self) -> str | None:
        """Why the model process is gone, or None while it runs."""
        return None if self._error is None else str(self._error)

    def submit(self, prompt: list[int], images: list[Image.Image], config: SamplerConfig,
               on_progress: Callable[[list[int]], None] | None = None) -> Future:
        """Queue one request, as Batcher.submit; `on_progress` is called from the reader thread."""
        future = Future()
        with self._lock:
            if self._error is not None:
                raise Unavailable(str(self._error))  # a fresh one: a shared instance would collect tracebacks
            if self._closing:
                raise Unavailable("the server is shutting down")
            key = next(self._keys)
            self._jobs[key] = (future, on_progress)
        self._outbox.put(("submit", key, (prompt, images, config, on_progress is not None)))
        future.add_done_callback(lambda done: done.cancelled() and self._cancel(key))
        return future

    def _cancel(self, key: int) -> None:
        """Its client went away: forget the request, and drop it in the child unless it has started."""
        with self._lock:
            self._jobs.pop(key, None)
        self._outbox.put(("cancel", key, None))

    def close(self) -> None:
        """Let the child finish the rows it is decoding and exit; requests still waiting fail with Unavailable."""
        with self._lock:
            if self._closing or self._process is None:
                return
            self._closing = True
        self._outbox.put(("close", None, None))
        if self._reap(timeout=120) is None:
            self._process.terminate()
            self._reap(timeout=None)

    def _reap(self, timeout: float | None) -> int | None:
        """Wait for the child to exit; return its exit code, None if it still runs. One thread at a time: when
        two threads wait at once, the one whose waitpid finds the child already reaped takes it for running
        (multiprocessing's poll): close() once saw an exited child as alive (tests/test_engine.py, flaky)."""
        with self._reaping:
            self._process.join(timeout)
            return self._process.exitcode

    def _feed(self) -> None:
        while True:
            kind, key, payload = message = self._outbox.get()
            try:
                data = pickle.dumps(message)
            except Exception as error:  # noqa: BLE001 - a request that cannot be sent fails alone
                with self._lock:
                    future, _ = self._jobs.pop(key, (None, None))
                if future is not None:
                    with contextlib.suppress(InvalidStateError):
                        future.set_exception(TypeError(f"the request cannot go to the model process: {error}"))
                continue
            try:
                self._conn.send_bytes(data)
            except (OSError, ValueError):  # the child is gone: the reader fails the requests
                return
            if kind == "close":
                return

    def _read(self) -> None:
        try:
            while True:
                kind, key, payload, self._waiting = self._conn.recv()
                with self._lock:
                    entry = self._jobs.get(key) if kind == "progress" else self._jobs.pop(key, None)
                if entry is None:
                    continue  # cancelled meanwhile
                future, on_progress = entry
                # InvalidStateError: cancelled here meanwhile (its client went away); a failing progress
                # callback (its event loop closed) must not stop the reader either.
                with contextlib.suppress(Exception):
                    if kind == "progress":
                        on_progress(payload)
                    elif kind == "done":
                        future.set_result(payload)
                    else:
                        future.set_exception(payload)
        except (EOFError, OSError):
            pass
        code = self._reap(timeout=10)
        with self._lock:
            self._error = Unavailable("the server is shutting down" if self._closing else
                                       f"the model process stopped (exit code {code}): restart mmdlm-serve")
            pending, self._jobs = list(self._jobs.values()), {}
        for future, _ in pending:
            with contextlib.suppress(InvalidStateError):
                future.set_exception(self._error)


def portable(error: BaseException) -> BaseException:
    """`error` if it survives the pipe (pickled and rebuilt), else a RuntimeError with its type and message:
    a message the parent cannot unpickle would stop its reader."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - e.g. an exception class whose __init__ takes other arguments
        return RuntimeError(f"{type(error).__name__}: {error}")


def run_engine(conn, model: str, max_batch_size: int, device: str, dtype: str | None, threads: int | None) -> None:
    """The child: load the model, then decode what comes down `conn` in Batcher ticks until told to close.

    It ignores SIGINT: Ctrl-C in a terminal reaches the whole process group, and the server's
    shutdown closes the child after the rows it is decoding (or the child exits when the pipe closes).
    """
    import signal

    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)

    from mmdlm.infer.batching import Batcher
    from mmdlm.infer.infer import Answerer, load_model

    try:
        if threads:
            torch.set_num_threads(threads)
        batcher = Batcher(Answerer(*load_model(model, device, dtype)), max_batch_size)
    except Exception as error:  # noqa: BLE001 - the parent reports it and exits
        conn.send(("failed", str(error)))
        return
    conn.send(("ready", None))
    futures: dict[int, Future] = {}

    def finished(key: int, future: Future) -> None:
        futures.pop(key, None)
        if future.cancelled():
            return  # the parent cancelled it: it expects nothing
        error = future.exception()
        if error is not None:
            conn.send(("error", key, portable(error), batcher.waiting))
        else:
            conn.send(("done", key, future.result(), batcher.waiting))

    while True:
        for _ in range(4 * max_batch_size):  # read what came before the next forward (bounded: it runs)
            if not conn.poll(0 if batcher.busy else None):
                break
            try:
                kind, key, payload = conn.recv()
            except EOFError:  # the server is gone
                return
            if kind == "submit":
                prompt, images, config, streams = payload
                progress = (lambda tokens, key=key: conn.send(("progress", key, tokens, batcher.waiting))) \
                    if streams else None
                futures[key] = future = batcher.submit(prompt, images, config, progress)
                future.add_done_callback(lambda done, key=key: finished(key, done))
            elif kind == "cancel" and key in futures:
                futures[key].cancel()  # only a request not yet started can be
            elif kind == "close":
                batcher.close()
                return
        if batcher.busy:
            batcher.tick()

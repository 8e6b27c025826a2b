"""Dynamic batching: requests that arrive while the model is busy are decoded together.

One thread does all of the model's work, in rounds (`Batcher.tick`). With the uncached sampler,
or the prefix cache (the default for a model trained with prefix-DLM attention), it runs
continuous batching (infer/continuous.py): the rows being decoded form a running batch, and
before every forward the waiting requests with the same sampler options join it (up to
`max_batch_size` rows; their images go through the tower in one call), while each row leaves at
the forward that finishes it and its answer is handed back then. The batch so stays full under
load instead of draining to its slowest row. When the oldest waiting request has other options,
no one joins until the batch has drained, then those run. The block cache, classifier-free
guidance and the autoregressive twin are decoded by `generate` in whole batches: the oldest
waiting request and every other with its options. Either way a row's tokens do not depend on its
batch at temperature 0 (left-padded rows keep their unpadded positions); with temperature > 0
the Gumbel draws come from one generator for the whole batch, so a sample depends on its neighbours.

Why one thread: every torch op gives up Python's GIL and must take it back, so a second thread
running Python or torch stalls each of the decoding thread's ops. On a 2-core CPU, a batch of 16
demo rows took 15 ms a forward alone, 27 ms with the tower running in a second thread, and
2.5 s with a thread spinning in Python. `start()` runs the rounds on a worker thread in this
process (tests, the web demo); mmdlm-serve runs them in a process of their own (infer/engine.py).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from PIL import Image

from mmdlm.decoding import first_stop as first_stop_of
from mmdlm.infer.continuous import RunningBatch, supports
from mmdlm.infer.infer import Answer, Answerer
from mmdlm.sampling import SamplerConfig


class Unavailable(RuntimeError):
    """The model takes no requests: the server is shutting down, or its model process stopped (HTTP 503)."""


@dataclass
class Reply:
    answer: Answer
    batch_size: int  # rows in the forward that finished it
    prompt_tokens: int  # image placeholders included
    stopped: bool  # a stop token ended the answer (else the whole canvas was filled)


@dataclass(eq=False)
class Job:
    prompt: list[int]
    images: list[Image.Image]
    config: SamplerConfig
    on_progress: Callable[[list[int]], None] | None  # the answer's committed tokens so far (from the worker)
    future: Future = field(default_factory=Future)  # -> Reply
    forwards: int = 0  # forwards its row took part in
    sent: int = 0  # committed tokens already given to on_progress


class Batcher:
    """Decodes submitted requests in batches; `submit` returns a Future of a Reply.

    `tick()` is one round: start the waiting requests that can start, run one forward of the
    running batch. `start()` runs rounds on a worker thread until `close()`; without it the
    owner calls `tick()` itself while `busy` (infer/engine.py's process does).
    """

    def __init__(self, answerer: Answerer, max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: give at least 1")
        self.answerer, self.max_batch_size = answerer, max_batch_size
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()  # guards _waiting and _closing
        self._closing = False
        self._thread: threading.Thread | None = None
        self._running: RunningBatch | None = None  # touched by tick only

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._loop, name="mmdlm-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop once the rows being decoded finish; requests still waiting fail with Unavailable."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join()
        while self._running is not None:  # driven by its owner: finish the rows here
            self.tick()
        while self._waiting:
            job = self._waiting.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(Unavailable("the server is shutting down"))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def error(self) -> str | None:
        """Why the model cannot answer (an EngineProcess whose child stopped); None in process, where it always can."""
        return None

    @property
    def busy(self) -> bool:
        """Whether a tick has work: rows being decoded or requests waiting."""
        return self._running is not None or bool(self._waiting)

    def submit(self, prompt: list[int], images: list[Image.Image], config: SamplerConfig,
               on_progress: Callable[[list[int]], None] | None = None) -> Future:
        """Queue one request (a prompt from Answerer.prompt_ids and its images); return the Future of its Reply.

        `on_progress(tokens)` is called from the decoding thread whenever the answer's committed
        prefix (up to its first hole or stop token) grows: committed tokens never change.
        """
        job = Job(prompt, images, config, on_progress)
        with self._wake:
            if self._closing:
                raise Unavailable("the server is shutting down")
            self._waiting.append(job)
            self._wake.notify_all()
        return job.future

    def tick(self) -> None:
        """One round: start what can start (or decode one whole `generate` batch), run one forward of the rest."""
        jobs = self._take()
        if jobs and not supports(jobs[0].config):
            self._decode(jobs)
            return
        if jobs:
            self._join(jobs)
        if self._running is not None:
            self._step()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self.busy:
                    self._wake.wait()
                if self._closing and self._running is None:
                    return  # close() fails the requests still waiting
            self.tick()

    def _take(self) -> list[Job]:
        """Return the requests to start now (possibly none).

        With a running batch: the requests with its options, while the oldest waiting one has
        them, up to the free rows. Otherwise the oldest request's options, and every request with them.
        """
        running = self._running
        with self._wake:
            if self._closing or not self._waiting:
                return []
            config, room = self._waiting[0].config, self.max_batch_size
            if running is not None:
                if config != running.config:
                    return []  # the batch drains first
                room -= len(running)
            batch = [job for job in self._waiting if job.config == config][:room]
            for job in batch:
                self._waiting.remove(job)
        # A request whose client went away before it started is dropped here.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _join(self, jobs: list[Job]) -> None:
        """Add `jobs` to the running batch (a new one when none runs), their images through the tower in one call."""
        try:
            prefixes = self.answerer.prefix_rows([job.prompt for job in jobs], [job.images for job in jobs])
            if self._running is None:
                self._running = RunningBatch(self.answerer.model.lm, jobs[0].config, self.answerer.special.mask)
            self._running.join(jobs, prefixes)
        except Exception as error:  # noqa: BLE001 - a bad request fails itself, never the server
            if self._running is not None and not self._running:
                self._running = None
            if len(jobs) > 1:  # which one? each joins, or fails, on its own
                for job in jobs:
                    self._join([job])
            else:
                jobs[0].future.set_exception(error)

    def _step(self) -> None:
        """One forward of the running batch: stream what it committed, hand back the rows it finished."""
        running = self._running
        try:
            done = running.step_all()
        except Exception as error:  # noqa: BLE001 - one bad batch fails its requests, never the server
            for job in running.keys:
                job.future.set_exception(error)
            self._running = None
            return
        size = len(running) + len(done)
        for row in done:
            job = row.key
            self._send(job, row.tokens[: row.length])
            answer = self.answerer.make_answer(row.tokens, row.commit_step, row.length, row.forwards)
            job.future.set_result(self._reply(job, answer, size))
        if any(job.on_progress is not None for job in running.keys):
            for row, (job, ready) in enumerate(zip(running.keys, running.committed())):
                if ready > job.sent:
                    self._send(job, running.canvas[row, :ready].tolist())
        if not running:
            self._running = None

    @staticmethod
    def _send(job: Job, tokens: list[int]) -> None:
        if job.on_progress is not None and len(tokens) > job.sent:
            job.sent = len(tokens)
            job.on_progress(tokens)

    def _decode(self, batch: list[Job]) -> None:
        """Decode a whole batch with `generate` (what a RunningBatch does not run), handing back each row as it
        finishes."""
        try:
            def on_forward(*rows):
                self._progress(batch, *rows)

            answers = self.answerer.answer_prompts([j.prompt for j in batch], [j.images for j in batch],
                                                   batch[0].config, on_forward=on_forward)
        except Exception as error:  # noqa: BLE001 - a bad request fails itself, never the server
            rest = [job for job in batch if not job.future.done()]
            if len(batch) > 1:  # which one? the unfinished ones are decoded again, each on its own
                for job in rest:
                    job.forwards = 0
                    self._decode([job])
            elif rest:
                rest[0].future.set_exception(error)
            return
        for job, answer in zip(batch, answers):  # rows the sampler did not report (the autoregressive twin)
            if not job.future.done():
                job.future.set_result(self._reply(job, answer, len(batch)))

    def _reply(self, job: Job, answer: Answer, batch_size: int) -> Reply:
        return Reply(answer, batch_size, len(job.prompt), answer.length < job.config.gen_length)

    def _progress(self, batch: list[Job], index: torch.Tensor, canvas: torch.Tensor, steps: torch.Tensor) -> None:
        """After a forward of `generate`: report each row's newly committed tokens, hand back the rows it finished."""
        config, mask_id = batch[0].config, self.answerer.special.mask
        stop_ids = torch.tensor([config.eos_id, *config.stop_ids], device=canvas.device)
        G = canvas.shape[1]
        filled = (canvas != mask_id).long().cumprod(1).sum(1)  # [n] positions before the first hole
        first_stop = first_stop_of(canvas, stop_ids)  # [n]
        for k, (row, ready, stop) in enumerate(zip(index.tolist(), filled.tolist(), first_stop.tolist())):
            job = batch[row]
            job.forwards += 1
            if job.future.done():
                continue
            if min(ready, stop) > job.sent:
                self._send(job, canvas[k, : min(ready, stop)].tolist())
            if ready == G or (config.early_stop and stop < ready):  # the sampler's own rule for a finished row
                tokens, commit = canvas[k].tolist(), steps[k].tolist()
                if config.early_stop:  # its tail is dropped, as the sampler drops it
                    tokens = tokens[: stop + 1] + [config.eos_id] * (G - stop - 1)
                    commit = commit[: stop + 1] + [-1] * (G - stop - 1)
                answer = self.answerer.make_answer(tokens, commit, stop, job.forwards)
                job.future.set_result(self._reply(job, answer, len(index)))

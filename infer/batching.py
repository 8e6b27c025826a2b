"""Dynamic batching: requests that arrive while the model is busy are decoded together.

One worker thread owns the model. It takes the oldest waiting request and every other waiting
request with the same sampler options (up to `max_batch_size`), and decodes them in one call of
the batched sampler: prompts of different lengths are left-padded, every row stops on its own and
leaves the batch, and its answer is handed back at the forward that finished it, not when the
whole batch ends. A row's tokens do not depend on its batch at temperature 0 (the sampler's
contract: left-padded rows keep their unpadded positions); with temperature > 0 the Gumbel draws
come from one generator for the whole batch, so a sample depends on its neighbours.
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
from mmdlm.infer.infer import Answer, Answerer
from mmdlm.sampling import SamplerConfig


@dataclass
class Reply:
    answer: Answer
    batch_size: int  # rows decoded together in its sampler call
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
    """Decodes submitted requests in batches on one worker thread; `submit` returns a Future of a Reply."""

    def __init__(self, answerer: Answerer, max_batch_size: int = 16):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size}: give at least 1")
        self.answerer, self.max_batch_size = answerer, max_batch_size
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> Batcher:
        self._thread = threading.Thread(target=self._loop, name="mmdlm-batcher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the worker after its current batch; requests still waiting fail with RuntimeError."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        while self._waiting:
            job = self._waiting.popleft()
            if job.future.set_running_or_notify_cancel():
                job.future.set_exception(RuntimeError("the server is shutting down"))

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, prompt: list[int], images: list[Image.Image], config: SamplerConfig,
               on_progress: Callable[[list[int]], None] | None = None) -> Future:
        """Queue one request (a prompt from Answerer.prompt_ids and its images); return the Future of its Reply.

        `on_progress(tokens)` is called from the worker thread whenever the answer's committed
        prefix (up to its first hole or stop token) grows: committed tokens never change.
        """
        job = Job(prompt, images, config, on_progress)
        with self._wake:
            if self._closing:
                raise RuntimeError("the server is shutting down")
            self._waiting.append(job)
            self._wake.notify()
        return job.future

    def _take(self) -> list[Job] | None:
        """Return the next batch (the oldest request and those that share its options), None once closing."""
        with self._wake:
            while not self._waiting and not self._closing:
                self._wake.wait()
            if self._closing:
                return None
            config = self._waiting[0].config
            batch = [job for job in self._waiting if job.config == config][: self.max_batch_size]
            for job in batch:
                self._waiting.remove(job)
        # A request whose client went away before it started is dropped here.
        return [job for job in batch if job.future.set_running_or_notify_cancel()]

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        try:
            def on_forward(*rows):
                self._progress(batch, *rows)

            answers = self.answerer.answer_prompts([j.prompt for j in batch], [j.images for j in batch],
                                                   batch[0].config, on_forward=on_forward)
        except Exception as error:  # noqa: BLE001 - one bad batch fails its requests, never the server
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        for job, answer in zip(batch, answers):  # rows the sampler did not report (the autoregressive twin)
            if not job.future.done():
                job.future.set_result(self._reply(job, answer, len(batch)))

    def _reply(self, job: Job, answer: Answer, batch_size: int) -> Reply:
        return Reply(answer, batch_size, len(job.prompt), answer.length < job.config.gen_length)

    def _progress(self, batch: list[Job], index: torch.Tensor, canvas: torch.Tensor, steps: torch.Tensor) -> None:
        """After a forward: report each row's newly committed tokens, and hand back the rows it finished."""
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
            if job.on_progress is not None and min(ready, stop) > job.sent:
                job.sent = min(ready, stop)
                job.on_progress(canvas[k, : job.sent].tolist())
            if ready == G or (config.early_stop and stop < ready):  # the sampler's own rule for a finished row
                tokens, commit = canvas[k].tolist(), steps[k].tolist()
                if config.early_stop:  # its tail is dropped, as the sampler drops it
                    tokens = tokens[: stop + 1] + [config.eos_id] * (G - stop - 1)
                    commit = commit[: stop + 1] + [-1] * (G - stop - 1)
                answer = self.answerer.make_answer(tokens, commit, stop, job.forwards)
                job.future.set_result(self._reply(job, answer, len(batch)))

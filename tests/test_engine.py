"""mmdlm-serve's engine process: the answers of the in-process sampler, streaming, errors, a dead child."""

import base64
import io
import os
import signal
from concurrent.futures import wait

import numpy as np
import pytest
import test_infer as infer_tests
from PIL import Image

from mmdlm.infer.batching import Batcher, Unavailable
from mmdlm.infer.chat_request import request_config
from mmdlm.infer.engine import EngineProcess
from mmdlm.infer.infer import Answerer, InferError, load_model

QUESTIONS = ["What colour is it?", "Describe the image.", "Is there a circle in the picture, and where?", "Size?"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return infer_tests.saved_model(tmp_path_factory.mktemp("model"), "bidirectional", prefix_dlm=True)


@pytest.fixture(scope="module")
def answerer(folder):
    return Answerer(*load_model(folder))


@pytest.fixture(scope="module")
def engine(folder):
    engine = EngineProcess(folder, max_batch_size=8).start()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def requests(answerer):
    """Four ragged requests, each with its own image (seeded noise): (prompt, images)."""
    out = []
    for k, question in enumerate(QUESTIONS):
        pixels = np.random.default_rng(k).integers(0, 256, (32, 24 + 8 * k, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        out.append((answerer.prompt_ids([{"from": "user", "value": f"<image>\n{question}"}], [image]), [image]))
    return out


def answered_alone(answerer, request, config):
    """The sampler's Answer to one (prompt, images) request decoded by itself, in this process."""
    prompt, images = request
    return answerer.answer_prompts([prompt], [images], config)[0]


@pytest.mark.parametrize("options", [{"max_tokens": 16, "threshold": 0.5}, {"max_tokens": 16, "cache": "block",
                                                                             "block_length": 8}])
def test_the_engine_answers_each_request_as_the_sampler_does_alone(engine, answerer, requests, options):
    """Submitted together (a running batch, or one `generate` batch for the block cache), each gets its own answer."""
    config = request_config(options, answerer, 16)
    futures = [engine.submit(prompt, images, config) for prompt, images in requests]
    wait(futures, timeout=120)
    for future, (prompt, images) in zip(futures, requests):
        alone = answered_alone(answerer, (prompt, images), config)
        reply = future.result()
        assert (reply.answer.text, reply.answer.length, reply.answer.forward_passes, reply.answer.commit_step) == \
            (alone.text, alone.length, alone.forward_passes, alone.commit_step)
        assert reply.prompt_tokens == len(prompt)
    assert engine.waiting == 0 and engine.error is None


def test_the_engine_streams_growing_prefixes_of_the_answer(engine, answerer, requests):
    config = request_config({"max_tokens": 32, "block_length": 8, "threshold": 0}, answerer, 32)
    (prompt, images), reports = requests[1], []
    reply = engine.submit(prompt, images, config, on_progress=reports.append).result(timeout=120)
    assert len(reports) >= 2 and all(later[: len(earlier)] == earlier and len(later) > len(earlier)
                                     for earlier, later in zip(reports, reports[1:]))
    assert len(reports[-1]) == reply.answer.length and answerer.decode(reports[-1]) == reply.answer.text


@pytest.mark.parametrize("where,cache", [("in-process", "prefix"), ("in-process", "block"), ("engine", "prefix")])
def test_a_request_that_fails_fails_alone_not_the_requests_joining_with_it(engine, answerer, requests, where, cache):
    """A prompt whose image placeholder has no image, submitted between two good requests: they start in the
    same round (in process: certainly; through the engine's pipe: most likely), in a running batch (prefix
    cache) or one `generate` batch (block cache)."""
    config = request_config({"max_tokens": 16, "cache": cache, "block_length": 8}, answerer, 16)
    batcher = Batcher(answerer, 8) if where == "in-process" else engine
    futures = [batcher.submit(*requests[2], config), batcher.submit(requests[0][0], [], config),
               batcher.submit(*requests[3], config)]
    while where == "in-process" and batcher.busy:
        batcher.tick()
    with pytest.raises(ValueError, match="0 images"):
        futures[1].result(timeout=120)
    for future, (prompt, images) in zip(futures[::2], (requests[2], requests[3])):
        assert future.result(timeout=120).answer.text == answered_alone(answerer, (prompt, images), config).text


def test_a_model_folder_that_does_not_load_stops_the_start_with_its_reason(tmp_path):
    with pytest.raises(InferError, match="model folder not found"):
        EngineProcess(tmp_path / "missing").start()


def test_when_the_model_process_dies_requests_fail_and_health_says_so(folder, answerer, requests):
    from fastapi.testclient import TestClient

    from mmdlm.infer.chat_request import ImageRules
    from mmdlm.infer.serve import create_app

    engine = EngineProcess(folder).start()
    config = request_config({"max_tokens": 64, "block_length": 64, "steps": 64}, answerer, 64)  # 64 forwards
    pending = [engine.submit(*request, config) for request in requests]
    os.kill(engine._process.pid, signal.SIGKILL)
    for future in pending:  # answered before the kill, or failed with the reason
        assert future.exception(timeout=60) is None or "model process stopped" in str(future.exception())
    assert "model process stopped" in str(pending[-1].exception())
    with pytest.raises(RuntimeError, match="restart mmdlm-serve"):
        engine.submit(*requests[0], config)
    with TestClient(create_app(answerer, engine, "tiny", ImageRules())) as client:
        health = client.get("/health")
        asked = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hello?"}]})
    assert health.status_code == 503 and "model process stopped" in health.json()["error"]["message"]
    assert asked.status_code == 503 and "restart mmdlm-serve" in asked.json()["error"]["message"]


def test_mmdlm_serve_parses_with_no_weights_and_decodes_in_its_engine(folder, answerer, requests):
    from fastapi.testclient import TestClient

    from mmdlm.infer.chat_request import ImageRules, parse_chat
    from mmdlm.infer.serve import build_parser, serving

    app, name = serving(build_parser().parse_args(["--model", str(folder), "--max-batch-size", "4"]))
    buffer = io.BytesIO()
    requests[3][1][0].save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": QUESTIONS[3]}]}], "max_tokens": 16}
    parsed = parse_chat(body, answerer, ImageRules(), 64)  # what a server with the weights in-process decodes
    expected = answerer.answer_prompts([parsed.prompt], [parsed.images], parsed.config)[0]
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=body)
        assert client.get("/health").json()["status"] == "ok"
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == expected.text
    assert response.json()["mmdlm"]["forward_passes"] == expected.forward_passes


def test_a_closed_engine_refuses_requests_as_unavailable(folder, answerer, requests):
    """close() lets the child finish what it decodes; a request after it is a 503 in the server. Ctrl-C (SIGINT
    to the process group) leaves the child to the server's shutdown."""
    engine = EngineProcess(folder).start()
    config = request_config({"max_tokens": 16}, answerer, 16)
    os.kill(engine._process.pid, signal.SIGINT)
    first = engine.submit(*requests[0], config)
    assert first.result(timeout=60).answer.text == answered_alone(answerer, requests[0], config).text
    first = engine.submit(*requests[0], config)
    engine.close()
    assert first.exception(timeout=60) is None or isinstance(first.exception(), Unavailable)
    with pytest.raises(Unavailable, match="shutting down"):
        engine.submit(*requests[1], config)
    assert not engine._process.is_alive()


def test_what_cannot_cross_the_pipe_fails_its_own_request_only(engine, answerer, requests):
    config = request_config({"max_tokens": 16}, answerer, 16)
    with pytest.raises(TypeError, match="cannot go to the model process"):
        engine.submit(requests[0][0], [lambda: "not an image"], config).result(timeout=60)
    assert engine.submit(*requests[1], config).result(timeout=120).answer.text == \
        answered_alone(answerer, requests[1], config).text


class TwoArgumentError(Exception):
    def __init__(self, what, why):
        super().__init__(f"{what}: {why}")


def test_an_error_the_parent_could_not_unpickle_crosses_as_its_type_and_message():
    from mmdlm.infer.engine import portable

    plain = ValueError("0 images")
    assert portable(plain) is plain
    crossed = portable(TwoArgumentError("tower", "out of memory"))
    assert type(crossed) is RuntimeError and str(crossed) == "TwoArgumentError: tower: out of memory"


def test_threads_waiting_for_the_child_at_once_all_see_it_exit():
    """The reader thread and close() both wait for the child; unguarded, the one whose waitpid finds the child
    already reaped reads it as running (8 threads: ~1 in 6 waits, measured)."""
    import multiprocessing
    import threading
    import time

    for _ in range(10):
        engine = EngineProcess("unused")
        engine._process = multiprocessing.get_context("fork").Process(target=time.sleep, args=(0.05,))
        engine._process.start()
        codes = []
        threads = [threading.Thread(target=lambda e=engine, c=codes: c.append(e._reap(timeout=30))) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert codes == [0] * 8 and not engine._process.is_alive()

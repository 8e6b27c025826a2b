"""mmdlm-serve: OpenAI chat completions, streaming, answers independent of the batch, and bad requests."""

import base64
import copy
import io
import json
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import pytest
import test_infer as infer_tests
from PIL import Image

httpx = pytest.importorskip("httpx", reason="the serve extra: pip install -e '.[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra: pip install -e '.[serve]'")

from mmdlm.infer.batching import Batcher  # noqa: E402
from mmdlm.infer.chat_request import ImageRules, conversation, fetch_image, parse_chat, request_config  # noqa: E402
from mmdlm.infer.infer import Answerer, load_model  # noqa: E402
from mmdlm.infer.serve import create_app  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return infer_tests.saved_model(tmp_path_factory.mktemp("model"), "bidirectional")


@pytest.fixture(scope="module")
def answerer(model_dir):
    return Answerer(*load_model(model_dir))


def png_bytes(size=(40, 30), sigma=60) -> bytes:
    """A PNG of fresh random noise (effect_noise draws new pixels each call)."""
    buffer = io.BytesIO()
    Image.effect_noise(size, sigma).convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(question: str, url: str | None = None, **options) -> dict:
    content = [{"type": "text", "text": question}]
    if url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": url}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **options}


@contextmanager
def running(app):
    """Yield the base URL of `app` served by uvicorn on a free 127.0.0.1 port, in a thread."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(answerer, tmp_path_factory):
    allowed, outside = tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("outside")
    (allowed / "scene.png").write_bytes(png_bytes())
    (outside / "secret.png").write_bytes(png_bytes())
    (allowed / "link.png").symlink_to(outside / "secret.png")
    rules = ImageRules(allow_local=allowed, max_pixels=1 << 20)
    app = create_app(answerer, Batcher(answerer, max_batch_size=8), "tiny", rules, max_tokens=16,
                     max_request_bytes=200_000)
    with running(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield SimpleNamespace(client=client, allowed=allowed, outside=outside)


def test_a_chat_completion_is_infer_py_s_answer(server, answerer):
    image = png_bytes()
    response = server.client.post("/v1/chat/completions", json=chat("what colour is it?", data_url(image)))
    assert response.status_code == 200, response.text
    body = response.json()
    config = request_config({}, answerer, 16)
    turns = [[{"from": "human", "value": "<image>\nwhat colour is it?"}]]
    expected = answerer.answer(turns, [[Image.open(io.BytesIO(image)).convert("RGB")]], config)[0]
    assert body["object"] == "chat.completion" and body["choices"][0]["message"] == {"role": "assistant",
                                                                                     "content": expected.text}
    assert body["choices"][0]["finish_reason"] == ("stop" if expected.length < 16 else "length")
    assert body["usage"]["completion_tokens"] == expected.length
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + expected.length
    assert body["mmdlm"]["forward_passes"] == expected.forward_passes and body["mmdlm"]["canvas"] == 16
    assert server.client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    assert server.client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("position", ["before", "after"])
def test_an_image_goes_where_the_model_saw_it_in_training_unless_interleaved(answerer, position):
    """Image part first or last, the prompt is infer.py's: the image where the model's config says (the demo's:
    "after"). Only a message that interleaves text and images keeps the sender's order."""
    answerer = copy.copy(answerer)
    answerer.image_position = position
    png = png_bytes()
    image = Image.open(io.BytesIO(png)).convert("RGB")
    picture = {"type": "image_url", "image_url": {"url": data_url(png)}}
    question, more = {"type": "text", "text": "what colour is it?"}, {"type": "text", "text": "and the circle?"}

    def prompt(*parts):
        return parse_chat({"messages": [{"role": "user", "content": list(parts)}]}, answerer, ImageRules(), 16).prompt

    infer_py = answerer.prompt_ids([{"from": "human", "value": "what colour is it?"}], [image])
    assert prompt(picture, question) == prompt(question, picture) == infer_py
    interleaved = [{"from": "human", "value": "what colour is it?\n<image>\nand the circle?"}]
    assert prompt(question, picture, more) == answerer.prompt_ids(interleaved, [image])


def test_the_images_of_a_message_move_together_in_their_order():
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in ("a.png", "b.png")]
    parts.append({"type": "text", "text": "Which is larger?"})
    turns, urls = conversation([{"role": "user", "content": parts}], "after")
    assert turns == [{"from": "user", "value": "Which is larger?\n<image>\n<image>"}] and urls == ["a.png", "b.png"]


def test_base64_with_line_breaks_is_read():
    """What base64.encodebytes and the `base64` tool write: 76-character lines."""
    png = png_bytes()
    url = "data:image/png;base64," + base64.encodebytes(png).decode()
    assert "\n" in url.strip()
    expected = Image.open(io.BytesIO(png)).convert("RGB")
    assert fetch_image(url, "image 1", ImageRules()).tobytes() == expected.tobytes()


def test_the_server_refuses_a_default_canvas_the_context_cannot_hold(model_dir, capsys):
    """Else every request without max_tokens would get a 400 about a max_tokens it never sent."""
    from mmdlm.infer.serve import check_max_tokens, main

    assert main(["--model", str(model_dir), "--max-tokens", "96", "--engine", "thread"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max-tokens 96: the model's context is 96 tokens" in err
    check_max_tokens(95, 96)


def sse_events(response) -> list:
    events = [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_streaming_sends_the_answer_in_pieces_then_usage(server):
    request = chat("Describe the image.", data_url(png_bytes()), max_tokens=32, block_length=8, threshold=0)
    whole = server.client.post("/v1/chat/completions", json=request).json()
    with server.client.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"].get("content", "") for e in events[1:]]
    assert "".join(deltas) == whole["choices"][0]["message"]["content"] and sum(map(bool, deltas)) >= 2
    assert all(e["object"] == "chat.completion.chunk" and e["id"] == events[0]["id"] for e in events)
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert (last["usage"], last["mmdlm"]["forward_passes"]) == (whole["usage"], whole["mmdlm"]["forward_passes"])
    assert all(e["choices"][0]["finish_reason"] is None for e in events[:-1])


def test_progress_reports_growing_prefixes_of_the_final_answer(answerer):
    """on_progress sees committed tokens only: each report extends the last and ends with the answer itself."""
    config = request_config({"max_tokens": 32, "block_length": 8, "threshold": 0}, answerer, 32)
    image = Image.new("RGB", (32, 32))
    prompt = answerer.prompt_ids([{"from": "user", "value": "<image>\nDescribe the image."}], [image])
    reports = []
    batcher = Batcher(answerer).start()
    try:
        reply = batcher.submit(prompt, [image], config, on_progress=reports.append).result()
    finally:
        batcher.close()
    assert all(later[: len(earlier)] == earlier and len(later) > len(earlier)
               for earlier, later in zip(reports, reports[1:]))
    assert len(reports) >= 2  # one token per forward over four blocks: the answer arrives in pieces
    final = reports[-1]
    assert len(final) == reply.answer.length and answerer.decode(final) == reply.answer.text


def test_an_answer_does_not_depend_on_its_batch(answerer):
    """Four ragged requests decoded in one batch give the tokens each gives alone (temperature 0)."""
    config = request_config({"max_tokens": 32, "block_length": 16}, answerer, 32)
    questions = ["how many squares", "what colour is the circle on the left of the square?", "Describe the image.",
                 "what?"]
    images = [Image.effect_noise((30 + 9 * k, 40), 40 + 20 * k).convert("RGB") for k in range(4)]
    prompts = [answerer.prompt_ids([{"from": "user", "value": "<image>\n" + q}], [image])
               for q, image in zip(questions, images)]
    assert len({len(p) for p in prompts}) == 4  # ragged: every row left-padded differently
    batcher = Batcher(answerer, max_batch_size=8)
    together = [batcher.submit(p, [im], config) for p, im in zip(prompts, images)]  # queued before the worker starts
    batcher.start()
    try:
        together = [f.result() for f in together]
        alone = [batcher.submit(p, [im], config).result() for p, im in zip(prompts, images)]
    finally:
        batcher.close()
    assert [r.batch_size for r in together] == [4] * 4 and [r.batch_size for r in alone] == [1] * 4
    for a, b in zip(alone, together):
        assert (a.answer.text, a.answer.pieces, a.answer.length) == (b.answer.text, b.answer.pieces, b.answer.length)


@pytest.fixture(scope="module")
def prefix_answerer(tmp_path_factory):
    """A prefix-DLM model, as the demo trains it: the server decodes it with the prefix cache."""
    return Answerer(*load_model(infer_tests.saved_model(tmp_path_factory.mktemp("prefix"), "bidirectional", True)))


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_requests_that_join_a_running_batch_answer_as_alone(answerer, prefix_answerer, cache):
    """Requests queued after the running one's first forward join it mid-flight (continuous batching), a longer
    prompt among them re-padding it (and the prefix cache), and every answer is the one `generate` gives alone."""
    answerer = prefix_answerer if cache == "prefix" else answerer
    config = replace(request_config({"max_tokens": 16, "block_length": 1, "threshold": 0}, answerer, 16),
                     early_stop=False)  # one token per forward, left to right: the first report comes at forward 1
    assert config.cache == cache
    questions = ["what?", "how many squares are there on the left of the red circle?", "Describe the image."]
    images = [Image.effect_noise((30 + 9 * k, 40), 40 + 20 * k).convert("RGB") for k in range(3)]
    prompts = [answerer.prompt_ids([{"from": "user", "value": "<image>\n" + q}], [im])
               for q, im in zip(questions, images)]
    batcher, late = Batcher(answerer, max_batch_size=8).start(), []

    def first_report(tokens):  # on the worker thread, between forwards 1 and 2 of the first request
        if not late:
            late.extend(batcher.submit(p, [im], config) for p, im in zip(prompts[1:], images[1:]))

    try:
        first = batcher.submit(prompts[0], [images[0]], config, on_progress=first_report).result()
        replies = [first] + [f.result() for f in late]
    finally:
        batcher.close()
    assert first.batch_size == 3 and first.answer.forward_passes == 16  # it finished beside the two that joined
    for prompt, image, reply in zip(prompts, images, replies):
        expected = answerer.answer_prompts([prompt], [[image]], config)[0]
        assert (reply.answer.pieces, reply.answer.commit_step, reply.answer.forward_passes) == (
            expected.pieces, expected.commit_step, expected.forward_passes)


def test_concurrent_clients_get_their_own_answers(server):
    asked = [("how many squares", 10), ("what colour?", 20), ("Describe the image.", 30), ("where?", 40)]
    requests = [chat(q, data_url(png_bytes(sigma=sigma)), max_tokens=16) for q, sigma in asked]
    alone = [server.client.post("/v1/chat/completions", json=r).json()["choices"][0]["message"] for r in requests]
    results = [None] * (2 * len(requests))

    def ask(k):
        results[k] = server.client.post("/v1/chat/completions", json=requests[k % len(requests)])

    threads = [threading.Thread(target=ask, args=(k,)) for k in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results)
    assert [r.json()["choices"][0]["message"] for r in results] == alone * 2


GOOD = chat("what colour is it?", data_url(png_bytes()))


def bad_requests():
    """(name, body bytes or JSON, status, fragment of the error message)."""
    pixel = data_url(png_bytes())
    return [
        ("malformed JSON", b'{"messages": [', 400, "not valid JSON"),
        ("not an object", b"[1, 2]", 400, "must be a JSON object"),
        ("messages not a list", {"messages": "hi"}, 400, "'messages' must be a non-empty list"),
        ("no role", {"messages": [{"content": "hi"}]}, 400, "'role' must be one of"),
        ("unknown part", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "a part is"),
        ("answer last", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "the last message must be"),
        ("image only", {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": pixel}}]}]}, 400, "with text"),
        ("placeholder in text", chat("<image> what?"), 400, "'<image>' is reserved"),
        ("not an image", chat("what?", data_url(b"hello, world")), 400, "not an image Pillow can read"),
        ("truncated image", chat("what?", data_url(infer_tests.truncated_png())), 400, "truncated or corrupt"),
        ("over --max-image-pixels", chat("what?", data_url(infer_tests.png_header_only(2000, 2000))), 400,
         "is 2000x2000 pixels, over the limit of 1048576"),
        ("decompression bomb", chat("what?", data_url(infer_tests.png_header_only(30000, 30000))), 400,
         "is 900000000 pixels, over the limit of"),
        ("not base64", chat("what?", "data:image/png;base64,@@@"), 400, "not valid base64"),
        ("not base64 between line breaks", chat("what?", "data:image/png;base64,iVBO\nRw#K\n"), 400,
         "not valid base64"),
        ("not a data URL of an image", chat("what?", "data:text/plain;base64,aGk="), 400, "data:image/png;base64"),
        ("remote URL", chat("what?", "https://example.com/a.png"), 400, "URLs are not fetched"),
        ("over-long prompt", chat("what? " * 100, pixel), 400, "over the model's context of 96"),
        ("body over the limit", chat("what?", data_url(os.urandom(300_000))), 413, "over --max-request-mb"),
        ("bad threshold", {**GOOD, "threshold": 2}, 400, "'threshold'=2 must be in [0, 1]"),
        ("NaN temperature", json.dumps({**GOOD, "temperature": float("nan")}).encode(), 400,
         "'temperature' must be a finite number, got nan"),
        ("infinite factor", json.dumps({**GOOD, "factor": float("inf")}).encode(), 400,
         "'factor' must be a finite number, got inf"),
        ("more steps than tokens", {**GOOD, "max_tokens": 16, "threshold": 0, "steps": 10**9}, 400,
         "'steps'=1000000000 must be in [1, 16]"),
        ("bad max_tokens", {**GOOD, "max_tokens": "many"}, 400, "'max_tokens' must be an integer"),
        ("bad cache", {**GOOD, "cache": "disk"}, 400, "'cache' must be one of"),
        ("bad block", {**GOOD, "max_tokens": 16, "block_length": 7}, 400, "not divisible by block_length=7"),
        ("bad stream", {**GOOD, "stream": "yes"}, 400, "'stream' must be true or false"),
        ("two answers", {**GOOD, "n": 2}, 400, "'n' must be 1"),
    ]


@pytest.mark.parametrize("name, body, status, message", bad_requests(), ids=[b[0] for b in bad_requests()])
def test_a_bad_request_is_a_4xx_that_says_why_and_the_next_is_answered(server, name, body, status, message):
    if isinstance(body, bytes):
        headers = {"content-type": "application/json"}
        response = server.client.post("/v1/chat/completions", content=body, headers=headers)
    else:
        response = server.client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert message in error["message"] and error["code"] == status and error["type"] == "invalid_request_error"
    assert server.client.post("/v1/chat/completions", json=GOOD).status_code == 200


def test_local_images_only_from_the_allowed_folder(server, answerer):
    inside = chat("what?", f"file://{server.allowed / 'scene.png'}")
    assert server.client.post("/v1/chat/completions", json=inside).status_code == 200
    assert server.client.post("/v1/chat/completions", json=chat("what?", "scene.png")).status_code == 200
    for path in ["../" + server.outside.name + "/secret.png", str(server.outside / "secret.png"), "link.png",
                 f"file://{server.outside / 'secret.png'}", "/etc/passwd"]:
        response = server.client.post("/v1/chat/completions", json=chat("what?", path))
        assert response.status_code == 403 and "outside the folder" in response.json()["error"]["message"], path
    missing = server.client.post("/v1/chat/completions", json=chat("what?", "missing.png"))
    assert missing.status_code == 400 and "image not found" in missing.json()["error"]["message"]
    app = create_app(answerer, Batcher(answerer), "tiny", ImageRules())  # no --allow-local-images
    with running(app) as url:
        response = httpx.post(f"{url}/v1/chat/completions", json=chat("what?", "scene.png"), timeout=60)
    assert response.status_code == 403 and "--allow-local-images" in response.json()["error"]["message"]


def test_unknown_routes_and_methods_are_json_errors(server):
    assert server.client.get("/v1/nothing").json()["error"]["code"] == 404
    assert server.client.get("/v1/chat/completions").json()["error"]["code"] == 405


def test_the_load_test_reports_medians_and_the_median_of_each_round_s_speedup():
    from mmdlm.infer.loadtest import medians

    def measured(rps, errors=()):
        return {"requests": 8, "errors": list(errors), "rps": rps, "p50": 1 / rps, "p99": 2 / rps, "mean_batch": 1.0}

    rounds = [[measured(2), measured(8)], [measured(1), measured(5)], [measured(4), measured(9, ["HTTP 500"])]]
    alone, batched = medians(rounds)
    assert alone["speedup"] == 1 and batched["speedup"] == 4  # rounds 4x, 5x, 2.25x: not 8 / 2
    assert (batched["rps"], batched["requests"], batched["errors"]) == (8, 24, ["HTTP 500"])
    failed = {"requests": 8, "errors": ["HTTP 400"] * 8, "rps": 0.0, "p50": float("nan"), "p99": float("nan"),
              "mean_batch": 0.0}
    alone, batched = medians([[failed, measured(8)]])  # nothing answered: no speedup, and no ZeroDivisionError
    assert batched["speedup"] != batched["speedup"] and batched["rps"] == 8


def test_the_load_test_says_when_no_server_answers_at_the_url(capsys):
    from mmdlm.infer.loadtest import free_port
    from mmdlm.infer.loadtest import main as loadtest

    url = f"http://127.0.0.1:{free_port()}"
    assert loadtest(["--url", url, "--clients", "4", "--requests", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--url {url}: no server answered there" in err


def load_test_set(tmp_path) -> list[str]:
    """A prefix-DLM model folder and a three-question LLaVA file: the load test's --model and --input."""
    folder = infer_tests.saved_model(tmp_path / "model", "bidirectional", True)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes())
    entries = [{"image": "images/a.png", "conversations": [{"from": "human", "value": f"<image>\n{q}"}]}
               for q in ("how many squares", "what colour?", "where is the circle?")]
    (tmp_path / "qa.json").write_text(json.dumps(entries))
    return ["--model", str(folder), "--input", str(tmp_path / "qa.json"), "--max-tokens", "8", "--caption-every", "3"]


def table_rows(out: str, server: str) -> list[list[str]]:
    return [line.split(" | ") for line in out.splitlines() if line.startswith(f"| {server}")]


def test_the_in_process_load_test_measures_the_batcher_without_http(tmp_path, capsys):
    """--in-process: the same requests through the server's Batcher, one table row per batch size, no errors."""
    from mmdlm.infer.loadtest import main as loadtest

    assert loadtest([*load_test_set(tmp_path), "--in-process", "--clients", "4", "--requests", "6",
                     "--batch-sizes", "1", "4"]) == 0
    rows = table_rows(capsys.readouterr().out, "batcher")
    assert [row[0] for row in rows] == ["| batcher, max batch 1", "| batcher, max batch 4"]
    assert [(row[2], row[3]) for row in rows] == [("6", "0"), ("6", "0")]  # requests, errors
    assert float(rows[0][7]) == 1.0 and 1.0 <= float(rows[1][7]) <= 4.0  # mean batch


def test_the_load_test_starts_a_server_per_batch_size_and_measures_it_over_http(tmp_path, capsys):
    """Two mmdlm-serve processes (each with its engine process) on loopback ports, two rounds; then they are gone."""
    import psutil

    from mmdlm.infer.loadtest import main as loadtest

    before = {p.pid for p in psutil.process_iter()}
    assert loadtest([*load_test_set(tmp_path), "--clients", "3", "--requests", "5", "--warmup", "2",
                     "--repeats", "2", "--batch-sizes", "1", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if line.startswith("round ")]) == 2
    rows = table_rows(out, "max batch")
    assert [(row[0], row[2], row[3]) for row in rows] == [("| max batch 1", "10", "0"), ("| max batch 3", "10", "0")]
    assert float(rows[0][7]) == 1.0 and rows[0][8] == "1.00x |"
    assert not [p for p in psutil.process_iter(["cmdline"]) if p.pid not in before
                and "mmdlm.infer.serve" in " ".join(p.info["cmdline"] or [])]


def test_the_load_test_refuses_an_unbounded_run(tmp_path, capsys):
    from mmdlm.infer.loadtest import main as loadtest

    assert loadtest(["--url", "http://127.0.0.1:9", "--warmup", "5000"]) != 0
    assert "--warmup in [0, 4096]" in capsys.readouterr().err

"""mmdlm-web in a real browser: the system's headless Chromium, driven by Playwright, uploads an image,
asks, and reads the answer the model gives; the page is saved as a screenshot."""

import argparse
import os
import shutil

import pytest
import test_infer as infer_tests
from PIL import Image

gr = pytest.importorskip("gradio", reason="the serve extra: pip install -e '.[serve]'")

from mmdlm.infer.batching import Batcher  # noqa: E402
from mmdlm.infer.chat_request import request_config  # noqa: E402
from mmdlm.infer.infer import Answerer, load_model  # noqa: E402
from mmdlm.infer.loadtest import free_port  # noqa: E402
from mmdlm.infer.web import launch, responder  # noqa: E402


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "no system Chromium: apt-get install -y chromium (scripts/test.sh does it when run as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_a_bad_upload_is_one_line_for_the_visitor(tmp_path):
    """The page's handler gets the upload undecoded (preprocess=False) and decodes it itself: a file that is
    not an image, a truncated one or a huge one is the visitor's one line, not Gradio's generic error."""
    folder = infer_tests.saved_model(tmp_path / "model", "bidirectional")
    answerer = Answerer(*load_model(folder))
    batcher = Batcher(answerer, 2).start()
    respond = responder(answerer, batcher, tmp_path, max_pixels=1 << 20)
    try:
        for content, message in [(b"%PDF-1.4 not an image", "the uploaded file a.png is not an image Pillow can read"),
                                 (infer_tests.truncated_png(), "the uploaded file a.png is truncated or corrupt"),
                                 (infer_tests.png_header_only(9000, 9000), "the uploaded file a.png is 9000x9000 "
                                  "pixels, over the limit of 1048576: downscale it first")]:
            (tmp_path / "upload.png").write_bytes(content)
            with pytest.raises(gr.Error) as error:
                respond({"path": str(tmp_path / "upload.png"), "orig_name": "a.png"}, "what?", 0.9, "auto", 32)
            assert error.value.message.startswith(message), error.value.message
            assert not error.value.print_exception  # the visitor's mistake leaves no traceback in the log
        with pytest.raises(gr.Error, match="upload or drop an image first"):
            respond(None, "what?", 0.9, "auto", 32)
        Image.effect_noise((48, 40), 50).convert("RGB").save(tmp_path / "scene.png")
        text, stats, gif, _ = respond({"path": str(tmp_path / "scene.png")}, "what?", 0.9, "auto", 32)
        config = request_config({"threshold": 0.9, "cache": "auto", "max_tokens": 32}, answerer, 32)
        expected = answerer.answer([[{"from": "user", "value": "what?"}]],
                                   [[Image.open(tmp_path / "scene.png").convert("RGB")]], config)[0]
        assert text == expected.text and "forward(s)" in stats and gif.endswith(".gif")
    finally:
        batcher.close()


def test_the_page_answers_an_uploaded_image(tmp_path, chromium):
    playwright = pytest.importorskip("playwright.sync_api", reason="the dev extra: pip install -e '.[dev]'")
    folder = infer_tests.saved_model(tmp_path / "model", "bidirectional")
    image_path = tmp_path / "scene.png"
    Image.effect_noise((48, 40), 50).convert("RGB").save(image_path)
    answerer = Answerer(*load_model(folder))
    question = "what colour is the circle?"
    config = request_config({"threshold": 0.9, "cache": "auto", "max_tokens": 32}, answerer, 32)
    expected = answerer.answer([[{"from": "user", "value": question}]],
                               [[Image.open(image_path).convert("RGB")]], config)[0]

    args = argparse.Namespace(model=str(folder), host="127.0.0.1", port=free_port(), max_batch_size=4, device="cpu",
                              max_tokens=32, max_image_pixels=1 << 20)  # the tiny model's context is 96
    demo, batcher, url = launch(args, block=False)
    try:
        with playwright.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])  # root: no sandbox
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url)
            page.set_input_files("#image input[type=file]", str(image_path))
            page.wait_for_selector("#image img", timeout=30_000)  # uploaded and shown
            page.fill("#question textarea", question)
            page.click("#ask")
            page.wait_for_function("document.querySelector('#stats').innerText.includes('forward(s)')", timeout=60_000)
            assert page.input_value("#answer textarea") == expected.text
            stats = page.inner_text("#stats")
            assert f"{expected.forward_passes} forward(s) for {expected.length} answer tokens" in stats
            assert page.get_attribute("#steps img", "src").split("?")[0].endswith(".gif")  # the animation
            assert "forward   1:" in page.input_value("#order textarea")
            page.screenshot(path=tmp_path / "web.png", full_page=True)
            browser.close()
    finally:
        demo.close()
        batcher.close()
    assert Image.open(tmp_path / "web.png").size[0] == 1280

"""The web demo: drop an image, ask a question or ask for a caption, and watch how the answer was decoded.

    mmdlm-web --model DIR [--host 127.0.0.1] [--port 7860]

A Gradio page over the same batcher as mmdlm-serve (so visitors who ask at once are decoded
together): the answer, the forwards it took, and the order in which its tokens were unmasked,
animated one frame per forward (what `infer.py --show-steps` draws), with the sampler's knobs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

from mmdlm.data.synthetic import CAPTION_PROMPT
from mmdlm.errors import UserError, report_user_errors
from mmdlm.infer.batching import Batcher
from mmdlm.infer.chat_request import CACHES, ImageRules, request_config
from mmdlm.infer.infer import Answerer, load_model, read_image
from mmdlm.infer.steps_viz import order_text, save_steps


def answer(answerer: Answerer, batcher: Batcher, image, question: str, options: dict, frames: Path):
    """Return (answer text, stats line, GIF of the unmasking order, the order as text) for one visitor's request."""
    if image is None:
        raise UserError("upload or drop an image first")
    if not question.strip():
        raise UserError("type a question, or press Caption")
    config = request_config(options, answerer, options["max_tokens"])
    # The image goes where the model's training data put it (its config's image_position).
    prompt = answerer.prompt_ids([{"from": "user", "value": question.strip()}], [image])
    answerer.check_length(prompt, config.gen_length, option="the canvas length")
    reply = batcher.submit(prompt, [image], config).result()
    result = reply.answer
    gif = save_steps(frames / f"{uuid.uuid4().hex}.gif", result.pieces, result.commit_step)
    stats = (f"**{result.forward_passes}** forward(s) for {result.length} answer tokens "
             f"(**{result.tokens_per_forward:.2f}** tokens per forward), canvas {len(result.pieces)}, "
             f"decoded in a batch of {reply.batch_size}")
    return result.text, stats, str(gif), order_text(result.pieces, result.commit_step)


def uploaded_image(upload: dict | None, max_pixels: int):
    """Return the visitor's upload (Gradio's file payload: its path on the server, its name) decoded as RGB, None
    when there is none; UserError in one line for a file that is not an image, is truncated or is too large."""
    if not upload or not upload.get("path"):
        return None
    return read_image(upload["path"], f"the uploaded file {upload.get('orig_name') or ''}".rstrip(), max_pixels)


def responder(answerer: Answerer, batcher: Batcher, frames: Path, max_pixels: int = ImageRules.max_pixels):
    """Return the page's event handler: (upload payload, question, threshold, cache, canvas) -> answer outputs.

    Its events run with preprocess=False: gr.Image would decode the upload with Pillow before the handler
    runs, and a file that is not an image (or a truncated or huge one) would fail there with Gradio's generic
    error. Here it is decoded by infer.py's read_image, within `max_pixels`, and a bad file is one line."""
    import gradio as gr

    def respond(upload, question, threshold, cache, max_tokens):
        try:
            image = uploaded_image(upload, max_pixels)
            options = {"threshold": threshold, "cache": cache, "max_tokens": int(max_tokens)}
            return answer(answerer, batcher, image, question or "", options, frames)
        except UserError as error:
            raise gr.Error(str(error), print_exception=False) from error  # the visitor's mistake: no log traceback

    return respond


def build_demo(answerer: Answerer, batcher: Batcher, frames: Path, max_tokens: int = 64,
               max_pixels: int = ImageRules.max_pixels):
    """Return the Gradio Blocks of the page."""
    import gradio as gr

    respond = responder(answerer, batcher, frames, max_pixels)

    with gr.Blocks(title="mmdlm") as demo:
        gr.Markdown("## mmdlm: a masked-diffusion vision-language model\nDrop an image, then ask about it or "
                    "ask for a caption. Every answer is a canvas of masks that the model unmasks in parallel.")
        with gr.Row():
            with gr.Column():
                image = gr.Image(type="filepath", label="Image", elem_id="image", sources=["upload", "clipboard"])
                question = gr.Textbox(label="Question", elem_id="question", placeholder="What colour is the circle?")
                with gr.Row():
                    ask = gr.Button("Ask", variant="primary", elem_id="ask")
                    caption = gr.Button("Caption", elem_id="caption")
                threshold = gr.Slider(0, 1, value=0.9, step=0.05, elem_id="threshold",
                                      label="threshold: commit every token at least this sure (0: one per forward)")
                cache = gr.Radio(list(CACHES), value="auto", label="KV cache", elem_id="cache")
                canvas = gr.Slider(8, 128, value=max_tokens, step=8, label="answer canvas (tokens)",
                                   elem_id="max_tokens")
            with gr.Column():
                text = gr.Textbox(label="Answer", elem_id="answer", interactive=False)
                stats = gr.Markdown(elem_id="stats")
                steps = gr.Image(label="Unmasking order, one frame per forward", type="filepath", elem_id="steps",
                                 interactive=False, height=120)
                order = gr.Textbox(label="Tokens committed by each forward", lines=8, elem_id="order")
        knobs = [threshold, cache, canvas]
        outputs = [text, stats, steps, order]
        ask.click(respond, [image, question, *knobs], outputs, preprocess=False)
        question.submit(respond, [image, question, *knobs], outputs, preprocess=False)
        caption.click(lambda im, *k: respond(im, CAPTION_PROMPT, *k), [image, *knobs], outputs, preprocess=False)
    return demo


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder written by training (weights, config, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--max-batch-size", type=int, default=8, help="visitors' requests decoded together at most")
    p.add_argument("--max-tokens", type=int, default=64, help="the answer canvas the page starts with")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--max-image-pixels", type=int, default=ImageRules.max_pixels,
                   help="refuse larger uploads before decoding them")
    return p


def launch(args: argparse.Namespace, block: bool = True):
    """Load the model, start the batcher and the page; return (demo, batcher, url)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home; the page works offline
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    answerer = Answerer(*load_model(args.model, device))
    batcher = Batcher(answerer, args.max_batch_size).start()
    frames = Path(tempfile.mkdtemp(prefix="mmdlm-web-"))
    max_pixels = getattr(args, "max_image_pixels", ImageRules.max_pixels)  # scripts/web_screenshot.py's args lack it
    demo = build_demo(answerer, batcher, frames, args.max_tokens, max_pixels)
    demo.queue(default_concurrency_limit=args.max_batch_size)
    _, url, _ = demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=not block,
                            allowed_paths=[str(frames)], quiet=not block)
    return demo, batcher, url


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: launch(args) and 0)


if __name__ == "__main__":
    sys.exit(main())

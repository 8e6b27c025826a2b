"""An OpenAI chat-completions request, checked and turned into what the batcher decodes.

Every problem is a RequestError (HTTP 400 unless it says otherwise) whose message names the field
and the fix; nothing here touches the model beyond its tokenizer and its image-token counts.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import math
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmdlm.data.errors import DataError
from mmdlm.data.tokenizer import IMAGE_TOKEN
from mmdlm.infer.infer import Answerer, InferError, load_image, read_image, sampler_config
from mmdlm.sampling import SamplerConfig

ROLES = ("system", "user", "assistant")
CACHES = ("auto", "none", "prefix", "block")
CONFIDENCES = ("probability", "margin", "entropy")


class RequestError(InferError):
    """A request the server refuses; `status` is its HTTP status."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclass
class ChatRequest:
    prompt: list[int]  # chat-templated ids, images expanded to their placeholder runs
    images: list[Image.Image]
    config: SamplerConfig
    stream: bool


@dataclass
class ImageRules:
    allow_local: Path | None = None  # the one folder whose files a request may name (--allow-local-images)
    max_pixels: int = 4096 * 4096


def placed(pieces: list[str], image_position: str) -> list[str]:
    """Return a message's text and '<image>' pieces with the images where the model's training data put them
    (its config's image_position: "before" the text, LLaVA's rule, or "after" it), as infer.py does; a message
    that interleaves them (text, image, text) keeps the sender's order."""
    pieces = [p for p in pieces if p]
    is_image = [p == IMAGE_TOKEN for p in pieces]
    if sum(a != b for a, b in zip(is_image, is_image[1:])) > 1:
        return pieces
    images, text = [p for p in pieces if p == IMAGE_TOKEN], [p for p in pieces if p != IMAGE_TOKEN]
    return text + images if image_position == "after" else images + text


def conversation(messages: object, image_position: str = "before") -> tuple[list[dict], list[str]]:
    """Return (LLaVA turns with an '<image>' per image part, placed by `placed`; the image URLs in order)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {'role', 'content'} objects")
    turns, urls = [], []
    for k, message in enumerate(messages):
        where = f"messages[{k}]"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise RequestError(f"{where}: 'role' must be one of {ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise RequestError(f"{where}: 'content' must be a string or a list of content parts")
        pieces = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                if IMAGE_TOKEN in part["text"]:
                    raise RequestError(f"{where}.content[{j}]: '{IMAGE_TOKEN}' is reserved: send images as "
                                       "image_url parts")
                pieces.append(part["text"].strip())
            elif kind == "image_url" and role == "user":
                ref = part.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str):
                    raise RequestError(f"{where}.content[{j}]: an image part is {{'type': 'image_url', "
                                       "'image_url': {'url': 'data:image/png;base64,...'}}")
                urls.append(url)
                pieces.append(IMAGE_TOKEN)
            else:
                raise RequestError(f"{where}.content[{j}]: a part is {{'type': 'text', 'text': ...}} or, in a user "
                                   "message, {'type': 'image_url', 'image_url': {'url': ...}}")
        turns.append({"from": role, "value": "\n".join(placed(pieces, image_position))})
    if turns[-1]["from"] != "user" or not turns[-1]["value"].replace(IMAGE_TOKEN, "").strip():
        raise RequestError("the last message must be the user's question, with text (e.g. 'Describe the image.')")
    return turns, urls


def fetch_image(url: str, name: str, rules: ImageRules) -> Image.Image:
    """Return the image of a data: URL, or of a local path under rules.allow_local; never anything else."""
    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if not header.startswith("data:image/") or not header.endswith(";base64"):
            raise RequestError(f"{name}: a data URL must look like data:image/png;base64,<data>")
        try:
            # Line breaks are what base64.encodebytes and the `base64` tool write: whitespace goes, nothing else
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"{name}: the data URL is not valid base64 ({error})") from error
        if not data:
            raise RequestError(f"{name}: the data URL holds no bytes")
        return read_image(io.BytesIO(data), name, rules.max_pixels)
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("", "file") or (scheme == "" and "://" in url):
        raise RequestError(f"{name}: {scheme or 'this'} URLs are not fetched: send the image as "
                           "data:image/png;base64,<data>")
    if rules.allow_local is None:
        raise RequestError(f"{name}: local paths are off: send a data:image/...;base64 URL, or start the server "
                           "with --allow-local-images DIR", status=403)
    raw = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if scheme == "file" else url
    folder = rules.allow_local.resolve()
    path = (folder / raw).resolve()  # symbolic links resolved first, so none leads out of the folder
    if not path.is_relative_to(folder):
        raise RequestError(f"{name}: {raw} is outside the folder this server may read (--allow-local-images)",
                           status=403)
    return load_image(path, f"{name}: ", rules.max_pixels)


def _number(body: dict, key: str, integer: bool, low: float, high: float | None = None):
    value = body.get(key)
    if value is None:
        return None
    finite = not isinstance(value, float) or math.isfinite(value)  # json.loads reads NaN and Infinity too
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not finite:
        raise RequestError(f"'{key}' must be {'an integer' if integer else 'a finite number'}, got {value!r}")
    if value < low or (high is not None and value > high):
        raise RequestError(f"'{key}'={value} must be in [{low}, {high if high is not None else 'inf'}]")
    return value


def _choice(body: dict, key: str, choices: tuple[str, ...], default: str) -> str:
    value = body.get(key, default)
    if value not in choices:
        raise RequestError(f"'{key}' must be one of {choices}, got {value!r}")
    return value


def request_config(body: dict, answerer: Answerer, max_tokens: int) -> SamplerConfig:
    """Return the sampler options of a request: infer.py's caption defaults, then the request's fields.

    max_tokens is the answer canvas; threshold (0: LLaDA's fixed steps), factor, cache,
    block_length, steps, confidence and temperature are the sampler's own options.
    """
    gen_length = _number(body, "max_tokens", True, 1, answerer.context)
    gen_length = _number(body, "max_completion_tokens", True, 1, answerer.context) or gen_length or max_tokens
    options = argparse.Namespace(
        gen_length=gen_length, block_length=_number(body, "block_length", True, 1),
        steps=_number(body, "steps", True, 1, gen_length),  # more steps than tokens only add empty forwards
        threshold=_number(body, "threshold", False, 0, 1), factor=_number(body, "factor", False, 1e-6),
        temperature=_number(body, "temperature", False, 0, 10) or 0.0, cache=_choice(body, "cache", CACHES, "auto"),
        confidence=_choice(body, "confidence", CONFIDENCES, "probability"), no_early_stop=False,
    )
    if options.block_length is None and gen_length % min(32, gen_length):
        options.block_length = gen_length  # an odd canvas is one block rather than an error
    try:
        return sampler_config(options, "caption", answerer)
    except InferError as error:
        message = str(error).replace("sampling options: ", "sampler options: ").replace("gen_length", "max_tokens")
        raise RequestError(message) from error


def parse_chat(body: object, answerer: Answerer, rules: ImageRules, max_tokens: int) -> ChatRequest:
    """Return the request checked: its prompt ids, decoded images and sampler options."""
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object with 'messages'")
    if body.get("n", 1) != 1:
        raise RequestError("'n' must be 1: one answer per request")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}")
    turns, urls = conversation(body.get("messages"), answerer.image_position)
    config = request_config(body, answerer, max_tokens)
    images = [fetch_image(url, f"image {k + 1}", rules) for k, url in enumerate(urls)]
    try:
        prompt = answerer.prompt_ids(turns, images)
    except DataError as error:
        raise RequestError(str(error)) from error
    answerer.check_length(prompt, config.gen_length, option="max_tokens")
    return ChatRequest(prompt, images, config, stream)

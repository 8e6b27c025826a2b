"""An OpenAI-compatible HTTP server for a model folder, with dynamic batching and streaming.

    mmdlm-serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch-size 16] [--engine process]

POST /v1/chat/completions takes OpenAI's chat format (text and image_url parts; images as
data:image/...;base64 URLs, local paths only under --allow-local-images DIR), `max_tokens` as the
answer canvas, and mmdlm's sampler options as extra fields (threshold, factor, cache,
block_length, steps, confidence). `stream: true` answers in Server-Sent Events as tokens are
committed. GET /v1/models and GET /health. A bad request gets a 4xx JSON error that says what to
fix, and never stops the server. The model decodes in a process of its own (infer/engine.py);
this one reads HTTP and parses requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mmdlm.errors import UserError, report_user_errors
from mmdlm.infer.batching import Batcher, Reply, Unavailable
from mmdlm.infer.chat_request import ImageRules, RequestError, parse_chat
from mmdlm.infer.engine import EngineProcess
from mmdlm.infer.infer import DTYPES, Answerer, InferError, load_model


def error_body(message: str, status: int) -> dict:
    """Return OpenAI's error object."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "code": status}}


async def read_json(request, limit: int) -> object:
    """Return the request body parsed as JSON; RequestError (413) once it passes `limit` bytes, unread beyond."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError(f"the body is {int(declared)} bytes, over --max-request-mb ({limit} bytes): send a "
                           "smaller image", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(f"the body is over --max-request-mb ({limit} bytes): send a smaller image", status=413)
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(f"the body is not valid JSON ({error})") from error


def completion(reply: Reply, request_id: str, model: str, created: int) -> dict:
    """Return a chat.completion object (the `usage` and `mmdlm` fields are also the last stream chunk's)."""
    answer = reply.answer
    return {
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                     "finish_reason": "stop" if reply.stopped else "length"}],
        "usage": {"prompt_tokens": reply.prompt_tokens, "completion_tokens": answer.length,
                  "total_tokens": reply.prompt_tokens + answer.length},
        "mmdlm": {"forward_passes": answer.forward_passes, "tokens_per_forward": round(answer.tokens_per_forward, 3),
                  "batch_size": reply.batch_size, "canvas": len(answer.pieces)},
    }


def create_app(answerer: Answerer, batcher: Batcher | EngineProcess, model_name: str, rules: ImageRules,
               max_tokens: int = 64, max_request_bytes: int = 16 << 20):
    """Return the FastAPI app; it starts `batcher` when it starts and closes it when it stops.

    `answerer` parses requests (a weightless one will do when `batcher` is an EngineProcess)."""

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await run_in_threadpool(batcher.close)

    app = FastAPI(title="mmdlm", lifespan=lifespan)

    @app.exception_handler(UserError)
    async def user_error(request, error: UserError):
        status = getattr(error, "status", 400)
        return JSONResponse(error_body(str(error), status), status_code=status)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return JSONResponse(error_body(str(error.detail), error.status_code), status_code=error.status_code)

    @app.exception_handler(Unavailable)
    async def unavailable(request, error: Unavailable):
        return JSONResponse(error_body(str(error), 503), status_code=503)

    @app.exception_handler(Exception)
    async def server_error(request, error: Exception):
        return JSONResponse(error_body(f"internal error: {error}", 500), status_code=500)

    @app.get("/health")
    async def health():
        if batcher.error:  # the model process is gone (EngineProcess)
            return JSONResponse(error_body(batcher.error, 503), status_code=503)
        return {"status": "ok", "model": model_name, "waiting": batcher.waiting,
                "max_batch_size": batcher.max_batch_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "mmdlm"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_json(request, max_request_bytes)
        chat_request = await run_in_threadpool(parse_chat, body, answerer, rules, max_tokens)  # images decode here
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not chat_request.stream:
            reply = await asyncio.wrap_future(batcher.submit(chat_request.prompt, chat_request.images,
                                                             chat_request.config))
            return JSONResponse(completion(reply, request_id, model_name, created))  # plain JSON: FastAPI's encoder
            # would walk the dict again
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        future = batcher.submit(chat_request.prompt, chat_request.images, chat_request.config,
                                on_progress=lambda tokens: loop.call_soon_threadsafe(events.put_nowait, tokens))
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, None))
        return StreamingResponse(stream(events, future, answerer, request_id, model_name, created),
                                 media_type="text/event-stream")

    return app


async def stream(events: asyncio.Queue, future, answerer: Answerer, request_id: str, model: str, created: int):
    """Yield Server-Sent Events: text deltas as tokens are committed, then finish_reason, usage and [DONE]."""

    def chunk(delta: dict, finish_reason=None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        body = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [choice], **extra}
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    sent = ""
    while (tokens := await events.get()) is not None:
        text = answerer.decode(tokens)
        # A half-decoded character (U+FFFD) waits for its next bytes; sent text is never taken back.
        if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
            yield chunk({"content": text[len(sent) :]})
            sent = text
    try:
        reply = future.result()
    except Exception as error:  # noqa: BLE001 - the stream has begun: the error is its last event
        yield f"data: {json.dumps(error_body(f'internal error: {error}', 500))}\n\n"
    else:
        final = completion(reply, request_id, model, created)
        rest = reply.answer.text[len(sent) :] if reply.answer.text.startswith(sent) else ""
        yield chunk({"content": rest} if rest else {}, final["choices"][0]["finish_reason"], usage=final["usage"],
                    mmdlm=final["mmdlm"])
    yield "data: [DONE]\n\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder written by training (weights, config, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 opens it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=16, help="requests decoded together at most")
    p.add_argument("--max-tokens", type=int, default=64, help="answer canvas when a request sets no max_tokens")
    p.add_argument("--max-request-mb", type=float, default=16.0, help="refuse larger request bodies (HTTP 413)")
    p.add_argument("--max-image-pixels", type=int, default=4096 * 4096, help="refuse larger images before decoding")
    p.add_argument("--allow-local-images", metavar="DIR", help="let image_url name files under DIR (off: data URLs)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    p.add_argument("--engine", choices=("process", "thread"), default="process",
                   help="decode in a process of its own (default: HTTP never stalls it) or in a thread of the server's")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: the checkpoint's; bfloat16 "
                   "on GPUs and on CPUs with AMX)")
    return p


def check_max_tokens(max_tokens: int, context: int) -> None:
    """Raise InferError unless a canvas of `max_tokens` leaves room in the model's context for a prompt."""
    if max_tokens >= context:  # else every request without max_tokens would fail, blaming a field it never sent
        raise InferError(f"--max-tokens {max_tokens}: the model's context is {context} tokens, prompt and answer "
                         f"together: give less than {context}")


def serving(args: argparse.Namespace):
    """Return (app, model name) for the parsed arguments, the model loaded."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_batch_size < 1 or args.max_tokens < 1 or args.max_request_mb <= 0:
        raise InferError("--max-batch-size, --max-tokens and --max-request-mb must be positive")
    allow = Path(args.allow_local_images) if args.allow_local_images else None
    if allow is not None and not allow.is_dir():
        raise InferError(f"--allow-local-images {allow}: not a folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    in_child = args.engine == "process"  # the model loads in the child; requests are parsed here, with no weights
    answerer = Answerer(*load_model(args.model, device, args.dtype, weights=not in_child))
    check_max_tokens(args.max_tokens, answerer.context)
    if in_child:
        batcher = EngineProcess(args.model, args.max_batch_size, device, args.dtype, args.threads).start()
    else:
        batcher = Batcher(answerer, args.max_batch_size)
    name = Path(args.model).resolve().name
    app = create_app(answerer, batcher, name, ImageRules(allow, args.max_image_pixels), args.max_tokens,
                     int(args.max_request_mb * (1 << 20)))
    return app, name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> int:
        import uvicorn

        app, name = serving(args)
        print(f"serving {name} on http://{args.host}:{args.port}/v1 (max batch {args.max_batch_size})", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())

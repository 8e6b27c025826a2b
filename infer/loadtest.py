"""Load test of mmdlm-serve on this machine: requests/s, latency, errors and the speedup of batching.

    python infer/loadtest.py --model DIR [--clients 32] [--requests 128] [--batch-sizes 1 32]
    python infer/loadtest.py --url http://127.0.0.1:8000 [--clients 32] [--requests 128]

With --model it starts one server per --batch-sizes entry (mmdlm-serve --max-batch-size B, on a
free 127.0.0.1 port), sends each the same bounded list of requests from --clients concurrent
clients, and prints one table row per server with the speedup over the first row. Each server
first answers --warmup untimed requests (default: one round) from as many clients. With
--repeats N the servers take turns N times (A B A B ...: on a shared machine a change in the
neighbours' load hits both alike), and the table gives the medians and the median of each
round's speedup; every round is printed too.
With --url it measures a server already running; only loopback addresses are accepted. With
--in-process it measures the server's batcher in this process without HTTP, the requests parsed
beforehand: what batching gives when no HTTP server and client share the cores. The
requests are the questions of a LLaVA file (--input; default: 16 freshly drawn demo-world
scenes), every --caption-every-th one a caption; each client gives up on a request after --timeout s.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import ipaddress
import json
import math
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

from mmdlm.data.synthetic import CAPTION_PROMPT, WorldOptions, synthesize_split
from mmdlm.errors import report_user_errors
from mmdlm.infer.infer import DTYPES, InferError, llava_requests


def loopback(url: str) -> str:
    """Return `url` without a trailing slash; InferError unless its host is this machine's loopback."""
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    if not local:
        raise InferError(f"--url {url}: the load test only targets this machine (127.0.0.1, localhost, [::1])")
    return url.rstrip("/")


def answering(url: str) -> str:
    """Return `url`; InferError when no server answers its GET /health (any status: a server is there)."""
    import httpx

    try:
        httpx.get(f"{url}/health", timeout=10)
    except httpx.HTTPError as error:
        raise InferError(f"--url {url}: no server answered there ({error}): start mmdlm-serve first, or give --model "
                         "to let the load test start one") from error
    return url


def request_bodies(input_file: str | None, count: int, max_tokens: int, threshold: float,
                   caption_every: int = 4) -> list[dict]:
    """Return `count` chat requests cycling through the questions of a LLaVA file (its images as data URLs),
    every `caption_every`-th a caption request instead (0: none)."""
    if input_file is None:
        folder = Path(tempfile.mkdtemp(prefix="mmdlm-loadtest-"))
        synthesize_split(folder, "test", 16, seed=0, options=WorldOptions())
        input_file = folder / "qa.json"
    entries = [r for r in llava_requests(input_file, None) if len(r["images"]) == 1]
    if not entries:
        raise InferError(f"--input {input_file}: no entry with exactly one image")
    bodies = []
    for k in range(count):
        entry = entries[k % len(entries)]
        asked = entry["turns"][-1]["value"]
        caption = caption_every and k % caption_every == caption_every - 1
        question = CAPTION_PROMPT if caption else asked.replace("<image>", "").strip()
        url = "data:image/png;base64," + base64.b64encode(Path(entry["images"][0]).read_bytes()).decode()
        content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": url}}]
        if not asked.strip().endswith("<image>"):  # the image where the file puts it (LLaVA: before the text)
            content.reverse()
        bodies.append({"model": "mmdlm", "messages": [{"role": "user", "content": content}],
                       "max_tokens": max_tokens, "threshold": threshold})
    return bodies


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs JSON bodies serialized beforehand.

    A client this thin is the point: the load test shares the machine's cores with the server it
    measures, and httpx spent ~40% as much CPU per request as the server itself (its connection
    pool and per-call async-library lookups), more of it the faster the server answers.
    """

    def __init__(self, url: str):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        """Return (status, response body) of one POST; reconnects when the server closed the connection."""
        if self.streams is None:
            self.streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self.streams
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n")
        try:
            writer.write(head.encode() + body)
            await writer.drain()
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
            if "content-length" not in headers:
                raise ConnectionError(f"a response without Content-Length: {lines[0]}")
            content = await reader.readexactly(int(headers["content-length"]))
        except BaseException:
            self.close()
            raise
        if headers.get("connection") == "close":
            self.close()
        return int(lines[0].split(" ", 2)[1]), content

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


def measurements(requests: int, errors: list[str], seconds: float, latencies: list[float],
                 batch_sizes: list[int]) -> dict:
    """Return one run's measurements: requests/s, p50/p99 latency, mean batch, the errors."""
    latencies = sorted(latencies)
    return {"requests": requests, "errors": errors, "seconds": seconds, "rps": len(latencies) / seconds,
            "p50": statistics.median(latencies) if latencies else float("nan"),
            "p99": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
            "mean_batch": statistics.mean(batch_sizes) if batch_sizes else 0.0}


async def hammer(url: str, bodies: list[dict], clients: int, timeout: float) -> dict:
    """Send every body once from `clients` concurrent clients (one connection each); return the measurements."""
    latencies, batch_sizes, errors = [], [], []
    queue = [json.dumps(body).encode() for body in reversed(bodies)]  # serialized once, before the clock starts

    async def client():
        connection = Connection(url)
        while queue:
            body = queue.pop()
            began = time.perf_counter()
            try:
                status, content = await asyncio.wait_for(connection.post("/v1/chat/completions", body), timeout)
                if status != 200:
                    errors.append(f"HTTP {status}: {content[:200].decode(errors='replace')}")
                    continue
                batch_sizes.append(json.loads(content)["mmdlm"]["batch_size"])
                latencies.append(time.perf_counter() - began)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as error:
                errors.append(f"{type(error).__name__}: {error}")
        connection.close()

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    seconds = time.perf_counter() - began
    return measurements(len(bodies), errors, seconds, latencies, batch_sizes)


def batcher_alone(answerer, requests: list, batch_size: int, clients: int) -> dict:
    """Return hammer's measurements of the server's Batcher in this process, without HTTP: `requests` (parsed
    beforehand, ChatRequest) submitted from `clients` threads. What batching gives when nothing shares the cores."""
    import threading

    from mmdlm.infer.batching import Batcher

    batcher = Batcher(answerer, batch_size).start()
    latencies, batch_sizes, errors, queue = [], [], [], list(reversed(requests))

    def client():
        while True:
            try:
                request = queue.pop()
            except IndexError:
                return
            began = time.perf_counter()
            try:
                batch_sizes.append(batcher.submit(request.prompt, request.images, request.config).result().batch_size)
                latencies.append(time.perf_counter() - began)
            except Exception as error:  # noqa: BLE001 - counted, as the HTTP client counts a failed request
                errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    batcher.close()
    return measurements(len(requests), errors, seconds, latencies, batch_sizes)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, batch_size: int, threads: int | None, wait: float = 180.0, dtype: str | None = None,
                 engine: str = "process"):
    """Return (process, url) of an mmdlm-serve on a free loopback port, once /health answers."""
    import httpx

    port = free_port()
    command = [sys.executable, "-m", "mmdlm.infer.serve", "--model", str(Path(model).resolve()), "--port", str(port),
               "--max-batch-size", str(batch_size), "--engine", engine] \
        + (["--threads", str(threads)] if threads else []) + (["--dtype", dtype] if dtype else [])
    # Started outside the checkout, so the installed package is imported; its errors still reach stderr.
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, cwd=tempfile.gettempdir())
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + wait
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise InferError(f"the server for --max-batch-size {batch_size} exited with code {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.terminate()
    raise InferError(f"the server did not answer /health within {wait:.0f} s")


def table(rows: list[tuple[str, dict]], clients: int) -> str:
    lines = ["| server | clients | requests | errors | requests/s | p50 latency (s) | p99 latency (s) | mean batch "
             "| speedup |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in rows:
        lines.append(f"| {name} | {clients} | {m['requests']} | {len(m['errors'])} | {m['rps']:.2f} | {m['p50']:.2f} "
                     f"| {m['p99']:.2f} | {m['mean_batch']:.1f} | {m['speedup']:.2f}x |")
    return "\n".join(lines)


def medians(rounds: list[list[dict]]) -> list[dict]:
    """Return one row per server: the median of each measure over the rounds, the speedup the median of each
    round's ratio to the first server's requests/s; errors and requests summed."""
    rows = []
    for k in range(len(rounds[0])):
        runs = [r[k] for r in rounds]
        row = {key: statistics.median(m[key] for m in runs) for key in ("rps", "p50", "p99", "mean_batch")}
        # A first server that answered nothing has no speedup to give (its errors are reported)
        row["speedup"] = statistics.median(r[k]["rps"] / r[0]["rps"] if r[0]["rps"] else math.nan for r in rounds)
        row.update(requests=sum(m["requests"] for m in runs), errors=[e for m in runs for e in m["errors"]])
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="model folder: start a server per --batch-sizes entry on 127.0.0.1")
    target.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], help="--max-batch-size of each server")
    p.add_argument("--clients", type=int, default=32, help="concurrent clients (at most 256)")
    p.add_argument("--requests", type=int, default=128, help="requests per server and round (at most 4096)")
    p.add_argument("--warmup", type=int, help="untimed requests each server answers first, from --clients clients "
                   "(default: one round, --requests)")
    p.add_argument("--repeats", type=int, default=1, help="rounds, the servers taking turns (at most 20)")
    p.add_argument("--input", help="LLaVA JSON whose questions and images to send (default: 16 demo-world scenes)")
    p.add_argument("--caption-every", type=int, default=4, help="every N-th request asks for a caption (0: none)")
    p.add_argument("--max-tokens", type=int, default=32, help="answer canvas of every request")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, help="torch threads of each started server")
    p.add_argument("--dtype", choices=list(DTYPES), help="weights dtype of each started server (default: the "
                   "checkpoint's)")
    p.add_argument("--engine", choices=("process", "thread"), default="process", help="mmdlm-serve --engine of "
                   "each started server")
    p.add_argument("--in-process", action="store_true", help="with --model: measure the server's batcher in this "
                   "process, without HTTP (the requests parsed beforehand)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a client waits for one answer")
    p.add_argument("--start-timeout", type=float, default=180.0, help="seconds a started server has to answer /health")
    return p


def cycled(items: list, n: int) -> list:
    """The first `n` of `items` repeated."""
    return (items * (1 + n // len(items)))[:n]


def run(args: argparse.Namespace) -> int:
    args.warmup = args.requests if args.warmup is None else args.warmup
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 4096 or not 1 <= args.repeats <= 20 \
            or not 0 <= args.warmup <= 4096:
        raise InferError("--clients must be in [1, 256], --requests in [1, 4096], --repeats in [1, 20] and --warmup "
                         "in [0, 4096]: the load test is bounded")
    given = answering(loopback(args.url)) if args.url else None  # before the requests are drawn: fail fast
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` or kill still stops the servers below
    bodies = request_bodies(args.input, args.requests, args.max_tokens, args.threshold, args.caption_every)
    # Untimed, at the test's concurrency: the batch shapes it will run (oneDNN builds a kernel per new shape).
    warmup = cycled(bodies, args.warmup)
    if args.in_process:
        return in_process(args, bodies)
    names, urls, processes = [], [], []
    try:
        if args.url:
            names, urls = [args.url], [given]
        for batch_size in [] if args.url else args.batch_sizes:
            process, url = start_server(args.model, batch_size, args.threads, args.start_timeout, args.dtype,
                                        args.engine)
            processes.append(process)
            names.append(f"max batch {batch_size}")
            urls.append(url)
        for url in urls:
            if warmup:
                asyncio.run(hammer(url, warmup, args.clients, args.timeout))
        rounds = []
        for k in range(args.repeats):
            rounds.append([asyncio.run(hammer(url, bodies, args.clients, args.timeout)) for url in urls])
            if args.repeats > 1:
                print(f"round {k + 1}: " + ", ".join(f"{n} {m['rps']:.2f} req/s ({len(m['errors'])} errors)"
                                                     for n, m in zip(names, rounds[-1])), flush=True)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=60)
    return report(names, rounds, args.clients)


def in_process(args: argparse.Namespace, bodies: list[dict]) -> int:
    """--in-process: each --batch-sizes entry's Batcher in turn, --repeats rounds, the table as for servers."""
    import torch

    from mmdlm.infer.chat_request import ImageRules, parse_chat
    from mmdlm.infer.infer import Answerer, load_model

    if not args.model:
        raise InferError("--in-process measures a --model folder in this process, not a --url")
    if args.threads:
        torch.set_num_threads(args.threads)
    answerer = Answerer(*load_model(args.model, "cuda" if torch.cuda.is_available() else "cpu", args.dtype))
    requests = [parse_chat(body, answerer, ImageRules(), args.max_tokens) for body in bodies]
    names = [f"batcher, max batch {b}" for b in args.batch_sizes]
    for batch_size in args.batch_sizes if args.warmup else []:
        batcher_alone(answerer, cycled(requests, args.warmup), batch_size, args.clients)
    rounds = []
    for k in range(args.repeats):
        rounds.append([batcher_alone(answerer, requests, b, args.clients) for b in args.batch_sizes])
        if args.repeats > 1:
            print(f"round {k + 1}: " + ", ".join(f"{n} {m['rps']:.2f} req/s" for n, m in zip(names, rounds[-1])),
                  flush=True)
    return report(names, rounds, args.clients)


def report(names: list[str], rounds: list[list[dict]], clients: int) -> int:
    """Print the errors and the table of medians; return 1 when a request failed."""
    rows = medians(rounds)
    for row in rows:
        for error in row["errors"][:3]:
            print(f"error: {error}", file=sys.stderr)
    print(table(list(zip(names, rows)), clients))
    return 1 if any(row["errors"] for row in rows) else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

"""Speed and quality of the sampler's options on one model and one set of questions, in one run.

    python infer/benchmark.py --model DIR --data WORLD [--limit 50] [--plot frontier.png]
    python infer/benchmark.py --prefix-tokens 256       # prefix-cache speedup on a random-init LM
    python infer/benchmark.py --llada-v --model DIR --input qa.json   # a converted LLaDA-V (infer/llada_v_bench.py)
    python infer/benchmark.py --speed --shape 8b --dtype bfloat16   # ms/forward, VQA vs AR, answers/s, int8 (speed.py)

With a model: for VQA (WORLD/test/qa.json) and captions (WORLD/test/captions.json) it prints, per
setting, the score (VQA accuracy / CIDEr), forward passes and tokens per forward per sample, the
sampler's latency per sample (batch 1, fastest of --repeats runs, the image encoding excluded: it
is the same for all), and the share of answers identical to vanilla sampling (the block cache's
error); then sweeps tau, the factor rule and steps into a quality/speed frontier saved as a PNG.
Without a model it measures the caches alone on a random-init LM after `--prefix-tokens` image
embeddings, at equal steps (prefix-DLM attention in every row, so the prefix cache gives
identical tokens).
On a machine shared with other jobs, `--threads 1` keeps the ratios stable: with more threads,
every small kernel waits on descheduled worker threads.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from mmdlm.autoregressive import generate_autoregressive
from mmdlm.cache import KVCache
from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.sampling import SamplerConfig, generate

TAUS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
FACTORS = (1.0, 2.0, 4.0)  # Fast-dLLM's factor rule: the top n while (n + 1)(1 - c_n) <= factor
STEP_DIVISORS = (1, 2, 4)  # the steps curve: gen_length / d steps over the whole answer
TASKS = {"vqa": ("qa.json", 16, 16), "caption": ("captions.json", 64, 32)}  # file, gen_length, block_length


def ladder(base: SamplerConfig, tau: float, mask_tail: bool = False) -> list[tuple[str, SamplerConfig]]:
    """Return the settings from vanilla LLaDA (one token per forward, no cache) to all speedups at once.

    Both caches appear alone and combined with threshold decoding and early stop: the prefix
    cache is the exact one, the block cache the faster one when the prefix is short. With early
    stop, `mask_tail` is the model's own (infer.py's rule: models trained with mask padding).
    """
    fast = replace(base, threshold=tau)
    prefix = "prefix cache" if base.prefix_dlm else "prefix cache (prefix-DLM attention)"
    stop = replace(fast, early_stop=True, mask_tail=mask_tail)
    return [
        ("vanilla (1 token/step)", base),
        (f"+ {prefix}", base.with_cache("prefix")),
        ("+ block cache (DualCache)", base.with_cache("block")),
        (f"+ threshold {tau}", fast),
        (f"+ threshold {tau} + early stop", stop),
        ("+ prefix cache + threshold + early stop", stop.with_cache("prefix")),
        ("+ block cache + threshold + early stop", stop.with_cache("block")),
    ]


def diffusion(lm, embeds, mask, mask_id: int, config: SamplerConfig):
    return generate(lm, prefix_embeds=embeds, attention_mask=mask, mask_id=mask_id, config=config)


def autoregressive(lm, embeds, mask, mask_id: int, config: SamplerConfig):
    return generate_autoregressive(lm, prefix_embeds=embeds, attention_mask=mask, config=config)


def run_setting(lm, prefixes: list[tuple], mask_id: int, config: SamplerConfig, repeats: int = 1,
                decode=diffusion) -> dict:
    """Return the answers (token lists up to their stop token) and per-sample means of one setting.

    Each sample runs `repeats` times and keeps its fastest time: on a shared machine, other
    processes only ever add time, so the minimum is the least noisy estimate.
    """
    answers, forwards, committed, seconds = [], [], [], []
    for embeds, mask in prefixes:
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            out = decode(lm, embeds, mask, mask_id, config)
            best = min(best, time.perf_counter() - began)
        seconds.append(best)
        answers.append(out.tokens[0, : out.lengths[0]].tolist())
        forwards.append(out.forward_passes)
        committed.append(int((out.commit_step > 0).sum()))
    return dict(answers=answers, forwards=statistics.mean(forwards), tokens_per_forward=sum(committed) / sum(forwards),
                latency_ms=1000 * statistics.mean(seconds))


def table(title: str, rows: list[dict], score_name: str) -> str:
    """Return a Markdown table of the settings, latency ratios against the first row."""
    head = f"| {title} | {score_name} | forwards/sample | tokens/forward | ms/sample | speedup | same as row 1 |"
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        score = "" if r.get("score") is None else f"{r['score']:.2f}"
        speedup = rows[0]["latency_ms"] / r["latency_ms"]
        same = "" if r["same"] is None else f"{r['same']:.0%}"  # no canvas to compare for the AR twin
        lines.append(f"| {r['name']} | {score} | {r['forwards']:.1f} | {r['tokens_per_forward']:.2f} | "
                     f"{r['latency_ms']:.1f} | {speedup:.1f}x | {same} |")
    return "\n".join(lines)


def same_share(a: list[list[int]], b: list[list[int]]) -> float:
    """Return the share of samples whose answers are token for token identical."""
    return sum(x == y for x, y in zip(a, b)) / len(a)


def synthetic(args: argparse.Namespace) -> int:
    """Measure the prefix/block caches against no cache at equal steps on a random-init LM."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = DLMConfig(vocab_size=512, hidden_size=args.hidden_size, intermediate_size=4 * args.hidden_size,
                    num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden_size // 64),
                    mask_token_id=511)
    dtype = getattr(torch, args.dtype)
    lm = DiffusionLM(cfg).eval().to(args.device, dtype)
    prompt = 32
    prefixes = []
    for _ in range(args.limit):
        image = torch.randn(1, args.prefix_tokens, cfg.hidden_size) * 0.02
        text = lm.get_input_embeddings()(torch.randint(0, 500, (1, prompt), device=args.device)).detach()
        prefixes.append((torch.cat([image.to(args.device, dtype), text], 1), None))
    print(f"random-init LM: hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, {args.device} {args.dtype}, "
          f"{torch.get_num_threads()} threads, {args.limit} samples, prefix-DLM attention in every row")
    for gen_length, block_length in ((16, 16), (64, 32)):
        base = SamplerConfig(gen_length=gen_length, block_length=block_length, steps=gen_length, prefix_dlm=True)
        rows = []
        for name, config in [("no cache", base), ("prefix cache (exact)", base.with_cache("prefix")),
                             ("block cache (DualCache)", base.with_cache("block"))]:
            run_setting(lm, prefixes[:1], 511, config)  # warm-up
            result = run_setting(lm, prefixes, 511, config, args.repeats)
            result["same"] = same_share(result["answers"], (rows[0] if rows else result)["answers"])
            rows.append({"name": name, **result})
        title = f"{args.prefix_tokens}+{prompt} prefix, {gen_length} tokens"
        print(table(title, rows, "score"))
    cache = KVCache()
    with torch.no_grad():
        lm(inputs_embeds=prefixes[0][0], cache=cache, fill_cache=True)
    print(f"prefix cache of one request: {cache.nbytes / 2**20:.1f} MiB ({cfg.num_hidden_layers} layers x "
          f"{args.prefix_tokens + prompt} positions x {cfg.num_key_value_heads} kv heads x {cfg.head_dim} x 2)")
    return 0


def point(row: dict, label: str | None = None) -> tuple[float, float, str]:
    """Return a table row as a point of the frontier plot: (latency, score, label)."""
    return row["latency_ms"], row["score"], label or row["name"]


def frontier_plot(path: Path, curves: dict[str, dict[str, list[tuple[float, float, str]]]], score_names: dict) -> None:
    """Save score against latency per sample, one panel per task, one line per swept option."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5), squeeze=False)
    for ax, (task, lines) in zip(axes[0], curves.items()):
        for label, points in lines.items():
            xs, ys, names = zip(*sorted(points))
            ax.plot(xs, ys, marker="o", label=label)
            for x, y, n in zip(xs, ys, names):
                ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set(xscale="log", xlabel="latency per sample (ms, log)", ylabel=score_names[task], title=task)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def measure(name: str, config: SamplerConfig, task: dict, reference: dict | None = None, decode=diffusion) -> dict:
    """Return one table row: run `config` on the task's prefixes, score the answers, compare with `reference`."""
    from mmdlm.infer.evaluate import score

    answerer, mask_id = task["answerer"], task["answerer"].special.mask
    run_setting(answerer.model.lm, task["prefixes"][:1], mask_id, config, decode=decode)  # warm-up
    result = run_setting(answerer.model.lm, task["prefixes"], mask_id, config, task["repeats"], decode)
    texts = {r["id"]: answerer.decode(a) for r, a in zip(task["requests"], result["answers"])}
    result["score"] = next(iter(score(texts, task["references"], task["metric"]).values()))
    same = decode is diffusion
    result["same"] = same_share(result["answers"], (reference or result)["answers"]) if same else None
    print(f"  {task['name']}: {name}: done", file=sys.stderr)
    return {"name": name, **result}


def with_model(args: argparse.Namespace) -> int:
    from mmdlm.infer.infer import Answerer, InferError, llava_requests, load_image, load_model

    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    answerer = Answerer(*load_model(args.model, args.device))
    twin = Answerer(*load_model(args.baseline, args.device)) if args.baseline else None
    if twin is not None and not twin.autoregressive:
        raise InferError(f"--baseline {args.baseline} is not an autoregressive twin (lm.attention: causal)")
    special = answerer.special
    # The frontier's cache: the exact one where the model allows it, else the approximate one (not infer.py's --cache).
    cache = args.frontier_cache or ("prefix" if answerer.prefix_dlm else "block")
    curves, score_names = {}, {"vqa": "VQA accuracy", "caption": "CIDEr"}
    for name, (file, gen_length, block_length) in TASKS.items():
        requests = llava_requests(Path(args.data) / "test" / file, None)[: args.limit]
        began = time.perf_counter()
        prefixes, twin_prefixes = [], []
        for r in requests:
            images = [load_image(p) for p in r["images"]]
            prefixes.append(answerer.prefix([answerer.prompt_ids(r["turns"], images)], [images]))
            if twin is not None:  # its own tower and projector make its own prefix
                twin_prefixes.append(twin.prefix([twin.prompt_ids(r["turns"], images)], [images]))
        encode_ms = 1000 * (time.perf_counter() - began) / len(requests)
        task = dict(name=name, answerer=answerer, requests=requests, prefixes=prefixes, repeats=args.repeats,
                    references={r["id"]: [r["reference"]] for r in requests},
                    metric="cider" if name == "caption" else "vqa")
        base = SamplerConfig(gen_length=gen_length, block_length=block_length, steps=gen_length,
                             prefix_dlm=answerer.prefix_dlm, eos_id=special.eos, stop_ids=(special.eot,))
        mask_tail = bool(answerer.sampler_defaults.get("mask_tail"))
        rows = []
        for label, config in ladder(base, args.tau, mask_tail):
            rows.append(measure(label, config, task, rows[0] if rows else None))
        if twin is not None:  # same questions, same canvas length, left to right with its KV cache
            twin_task = dict(task, answerer=twin, prefixes=twin_prefixes)
            rows.append(measure("autoregressive twin (KV cache)", replace(base, early_stop=True), twin_task,
                                decode=autoregressive))
        print(f"\n{name}: {len(requests)} samples, image + prompt encoding {encode_ms:.1f} ms/sample (not included)")
        print(table(name, rows, score_names[name]), flush=True)
        fast = replace(base, early_stop=True, mask_tail=mask_tail).with_cache(cache)
        sweeps = {
            "threshold tau": [(f"tau {t}", replace(fast, threshold=t)) for t in TAUS],
            "factor rule": [(f"factor {f:g}", replace(fast, factor=f)) for f in FACTORS],
            "fixed steps": [(f"steps {gen_length // d}", replace(fast, steps=gen_length // d)) for d in STEP_DIVISORS],
        }
        swept = {line: [measure(n, c, task, rows[0]) for n, c in settings] for line, settings in sweeps.items()}
        curves[name] = {"vanilla (no cache, 1 token/step)": [point(rows[0], "vanilla")]}
        for line, results in swept.items():
            curves[name][f"{line} ({cache} cache, early stop)"] = [point(r) for r in results]
        if twin is not None:
            curves[name]["autoregressive twin"] = [point(rows[-1], "AR twin")]
        frontier = [rows[0], *(r for results in swept.values() for r in results)]
        print(table(f"{name} frontier", frontier, score_names[name]), flush=True)
    frontier_plot(Path(args.plot), curves, score_names)
    print(f"\nfrontier plot: {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="model folder written by training (omit for the synthetic prefix-cache run)")
    p.add_argument("--data", help="demo world folder (its test/qa.json and test/captions.json)")
    p.add_argument("--baseline", help="the autoregressive twin's model folder: one more row per task")
    p.add_argument("--limit", type=int, default=50, help="samples per task")
    p.add_argument("--frontier-cache", choices=["prefix", "block"],
                   help="the cache of the frontier's sweeps (default: prefix for a model trained with prefix-DLM "
                        "attention, else block)")
    p.add_argument("--repeats", type=int, default=3, help="runs per sample; its fastest counts (--speed: the median)")
    p.add_argument("--tau", type=float, default=0.9, help="threshold of the ladder's fast rows")
    p.add_argument("--plot", default="frontier.png", help="where to save the quality/speed frontier")
    p.add_argument("--prefix-tokens", type=int, default=256, help="synthetic run: image tokens before the prompt")
    p.add_argument("--hidden-size", type=int, default=256, help="synthetic run: width of the random-init LM")
    p.add_argument("--layers", type=int, default=4, help="synthetic run: depth of the random-init LM")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="synthetic run: weights dtype")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--llada-v", action="store_true", help="the LLaDA-V ladder: --model and --input, or --shape")
    p.add_argument("--input", help="--llada-v: LLaVA JSON of questions (image paths beside it)")
    p.add_argument("--shape", choices=["small", "8b"], help="--llada-v, --speed: random weights at this shape")
    p.add_argument("--gen-length", type=int, default=16, help="--llada-v, --speed: answer canvas (one block)")
    p.add_argument("--speed", action="store_true", help="ms/forward, answers/s, AR baseline, low-bit weights")
    p.add_argument("--max-batch", type=int, default=64, help="--speed: the largest of batches 1, 8, 64 to run")
    p.add_argument("--tables", help="--speed: which tables, in this order (default: forward,vqa,batch,quant; "
                                    "also tuned, the max-autotune compile: minutes, and fusion)")
    args = p.parse_args(argv)
    if args.speed:
        from mmdlm.infer.speed import run as speed

        args.shape = args.shape or "small"
        return speed(args)
    if args.llada_v:
        from mmdlm.infer.llada_v_bench import run

        if not args.shape and not (args.model and args.input):
            p.error("--llada-v needs --model DIR --input qa.json, or --shape")
        return run(args)
    if args.model is None:
        return synthetic(args)
    if args.data is None:
        p.error("--model needs --data (the demo world folder with test/qa.json and test/captions.json)")
    from mmdlm.errors import report_user_errors

    return report_user_errors(lambda: with_model(args))


if __name__ == "__main__":
    sys.exit(main())

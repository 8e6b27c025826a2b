"""The sampler's speed at a model shape, random weights (`benchmark.py --speed`): issue #19's tables.

    python infer/benchmark.py --speed --shape 8b        # on a GPU: LLaDA-8B's shape in bf16
    python infer/benchmark.py --speed --shape small     # the same tables at a toy width (a CPU smoke run)

Every answer follows 729 image + 32 prompt embeddings (LLaDA-V's SigLIP grid and a question) and
runs a fixed schedule, one token per forward (`--gen-length` forwards), so that milliseconds per
forward is time per answer over forwards. Four tables:
1. ms per forward at batch 1, uncached (every position) and with the prefix cache (the canvas only),
   eager against static (`SamplerConfig.static`: CUDA graphs on a GPU), beside the weight-read floor:
   the LM's weight bytes (the embedding table excepted: a forward reads only its rows) over the
   device's copy bandwidth, measured here;
2. answers/s at batch 1, 8 and 64 (static, prefix cache);
3. the autoregressive baseline: a Llama of the same shape from transformers, static KV cache
   (which transformers compiles on a GPU), the same prompt and answer length;
4. low-bit weights (`--quantize`): weight memory and ms per forward, int8 everywhere, fp8 on GPUs of
   compute capability 8.9+.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from mmdlm.infer.quantize import quantize_lm, weight_bytes
from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.sampling import SamplerConfig, generate

SHAPES = {  # LLaDA-8B's sizes, and a width a CPU runs in seconds; both with LLaDA's vocabulary
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=32),
}
VOCAB, MASK_ID, IMAGE_TOKENS, PROMPT_TOKENS = 126464, 126336, 729, 32
BATCHES = (1, 8, 64)


def random_lm(shape: str, dtype: torch.dtype, device: str) -> DiffusionLM:
    torch.manual_seed(0)
    config = DLMConfig(vocab_size=VOCAB, mask_token_id=MASK_ID, rope_theta=500000.0, max_position_embeddings=4096,
                       **SHAPES[shape])
    return DiffusionLM(config).eval().to(device, dtype)


def prefix(lm: DiffusionLM, batch: int) -> torch.Tensor:
    """Return [batch, 761, D]: image-like embeddings, then embedded prompt ids."""
    p = next(lm.parameters())
    image = torch.randn(batch, IMAGE_TOKENS, lm.config.hidden_size, device=p.device, dtype=p.dtype) * 0.02
    ids = torch.randint(0, MASK_ID, (batch, PROMPT_TOKENS), device=p.device)
    return torch.cat([image, lm.get_input_embeddings()(ids)], 1).detach()


def seconds(fn, repeats: int) -> float:
    """Return the fastest of `repeats` timed runs of fn() after one warm-up run (compilation, allocation)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync()
        began = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - began)
    return best


def copy_bandwidth(device: str) -> float:
    """Return bytes/s of a 1 GiB device-to-device copy (read + write): the rate a forward reads weights at best."""
    size = 2**30 if device == "cuda" else 2**28
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / seconds(lambda: dst.copy_(src), 5)


def per_forward_ms(lm, embeds: torch.Tensor, config: SamplerConfig, repeats: int) -> tuple[float, int]:
    """Return (ms per forward, forwards per answer) of sampling after `embeds`."""
    out = generate(lm, prefix_embeds=embeds, mask_id=MASK_ID, config=config)
    return 1000 * seconds(lambda: generate(lm, prefix_embeds=embeds, mask_id=MASK_ID, config=config),
                          repeats) / out.forward_passes, out.forward_passes


def forward_table(lm, base: SamplerConfig, device: str, repeats: int) -> str:
    floor_bytes = weight_bytes(lm) - weight_bytes(lm.get_input_embeddings())
    floor_ms = 1000 * floor_bytes / copy_bandwidth(device)
    embeds = prefix(lm, 1)
    lines = [f"weight-read floor: {floor_bytes / 2**30:.2f} GiB of weights per forward = {floor_ms:.2f} ms",
             "| batch 1 | forwards/answer | ms/forward | x floor |", "|---|---|---|---|"]
    for cache in ("none", "prefix"):
        for static in (False, True):
            ms, forwards = per_forward_ms(lm, embeds, replace(base.with_cache(cache), static=static), repeats)
            name = f"{'prefix cache' if cache == 'prefix' else 'no cache'}, {'static' if static else 'eager'}"
            lines.append(f"| {name} | {forwards} | {ms:.2f} | {ms / floor_ms:.1f}x |")
    return "\n".join(lines)


def batch_table(lm, base: SamplerConfig, batches: tuple[int, ...], repeats: int) -> str:
    config = replace(base.with_cache("prefix"), static=True)
    lines = ["| batch (static, prefix cache) | ms/answer batch | answers/s |", "|---|---|---|"]
    for batch in batches:
        embeds = prefix(lm, batch)
        s = seconds(lambda e=embeds: generate(lm, prefix_embeds=e, mask_id=MASK_ID, config=config), repeats)
        lines.append(f"| {batch} | {1000 * s:.1f} | {batch / s:.1f} |")
    return "\n".join(lines)


def ar_baseline(shape: str, dtype: torch.dtype, device: str, gen_length: int, repeats: int) -> str:
    """Return a table row of a transformers Llama of the same shape: greedy, static KV cache, `gen_length` tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[shape])
    model = LlamaForCausalLM(config).eval().to(device, dtype)
    ids = torch.randint(0, MASK_ID, (1, IMAGE_TOKENS + PROMPT_TOKENS), device=device)

    def answer():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_length,
                                  min_new_tokens=gen_length, do_sample=False, cache_implementation="static",
                                  pad_token_id=0)

    s = seconds(answer, repeats)
    return (f"| transformers Llama, static cache{' (compiled)' if device == 'cuda' else ''} | {gen_length} | "
            f"{1000 * s / gen_length:.2f} | {1000 * s:.1f} |")


def quant_table(lm, base: SamplerConfig, device: str, repeats: int) -> str:
    config = replace(base.with_cache("prefix"), static=True)
    embeds = prefix(lm, 1)
    kinds = ["none", "int8"]
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9):
        kinds.append("fp8")
    lines = ["| weights (static, prefix cache) | LM weight memory | ms/forward |", "|---|---|---|"]
    for kind in kinds:
        model = lm if kind == "none" else quantize_lm(copy.deepcopy(lm), kind)
        ms, _ = per_forward_ms(model, embeds, config, repeats)
        lines.append(f"| {kind if kind != 'none' else str(next(lm.parameters()).dtype)} | "
                     f"{weight_bytes(model) / 2**20:.1f} MiB | {ms:.2f} |")
        del model
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lm = random_lm(args.shape, dtype, args.device)
    base = SamplerConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                         prefix_dlm=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"random-init LM, shape {args.shape} ({lm.num_parameters() / 1e9:.2f} B parameters), {args.dtype}, "
          f"{where}; {IMAGE_TOKENS} + {PROMPT_TOKENS} prefix tokens, {args.gen_length}-token answers, one per forward")
    print(forward_table(lm, base, args.device, args.repeats), flush=True)
    print(batch_table(lm, base, tuple(b for b in BATCHES if b <= args.max_batch), args.repeats), flush=True)
    print("| autoregressive baseline | forwards/answer | ms/forward | ms/answer |\n|---|---|---|---|")
    print(ar_baseline(args.shape, dtype, args.device, args.gen_length, args.repeats), flush=True)
    print(quant_table(lm, base, args.device, args.repeats))
    return 0

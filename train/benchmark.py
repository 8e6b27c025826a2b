"""Forward+backward throughput of DiffusionLM against transformers' Llama of the same shape.

    python train/benchmark.py                       # CPU fp32, a small shape; prints tokens/s and the ratio
    python train/benchmark.py --preset 1b --bf16    # on a GPU: bf16 tokens/s and MFU of a ~1B config

Both models get the same sizes, the same batch and a bidirectional mask (Llama through an
all-True 4D mask, which transformers passes to SDPA unchanged), and run interleaved in one
process so machine noise hits both alike. MFU counts 6 * parameters + attention FLOPs per token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from mmdlm.model import DiffusionLM, DLMConfig

PRESETS = {
    "cpu": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
}


def step_time(fn, warmup: int, repeats: int, sync) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM bf16 dense: 989)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    shape = PRESETS[args.preset]
    torch.manual_seed(0)
    ours = DiffusionLM(DLMConfig(**shape)).to(device, dtype)
    llama = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa")).to(device, dtype)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device=device)
    full = torch.ones(args.batch, 1, args.seq, args.seq, dtype=torch.bool, device=device)

    def run_ours():
        ours(ids).float().logsumexp(-1).mean().backward()

    def run_llama():
        llama(ids, attention_mask=full).logits.float().logsumexp(-1).mean().backward()

    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in llama.parameters()), "the two models must have the same size"
    results = {"mmdlm DiffusionLM": [], "transformers Llama": []}
    for _ in range(2):  # interleave: A B A B
        results["mmdlm DiffusionLM"] += step_time(run_ours, 2, args.repeats, sync)
        results["transformers Llama"] += step_time(run_llama, 2, args.repeats, sync)
    tokens = args.batch * args.seq
    flops_per_token = 6 * n_params + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * args.seq
    print(f"{device} {str(dtype).removeprefix('torch.')}, {n_params / 1e6:.1f} M parameters, "
          f"batch {args.batch} x {args.seq} tokens, fwd+bwd, median of {2 * args.repeats}")
    print(f"{'model':<22}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}")
    speed = {}
    for name, times in results.items():
        t = statistics.median(times)
        speed[name] = tokens / t
        mfu = speed[name] * flops_per_token / (args.peak_tflops * 1e12) if device == "cuda" else float("nan")
        print(f"{name:<22}{t * 1e3:>10.1f}{speed[name]:>12.0f}{mfu:>8.1%}")
    print(f"ratio mmdlm / Llama: {speed['mmdlm DiffusionLM'] / speed['transformers Llama']:.2f}")
    if device == "cuda":
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()

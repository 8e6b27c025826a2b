"""Training throughput: our DiffusionLM against transformers' Llama of the same shape, and under ZeRO.

    python train/benchmark.py                                   # CPU fp32: fwd+bwd tokens/s of both, ratio
    python train/benchmark.py --preset 1b --bf16 --seq 2048     # one GPU: the same in bf16, plus MFU
    deepspeed --num_gpus 8 train/benchmark.py --preset 1b --zero 3 --seq 2048
                                                                # full steps under ZeRO-2/3: peak memory per rank

The comparison gives both models the same sizes, batch and attention: Llama's attention modules
are switched to non-causal with no mask (the same SDPA call as ours), and a check before timing
proves both are bidirectional (the first position's output changes with the last token). Steps
alternate between the models so that load on the machine hits both alike. MFU counts
6 x (parameters - embedding table) + 12 x layers x hidden x seq FLOPs per token (fwd + bwd).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from mmdlm.model import DiffusionLM, DLMConfig

PRESETS = {
    "cpu": dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
}


def flops_per_token(shape: dict, n_params: int, seq: int) -> float:
    dense = n_params - shape["vocab_size"] * shape["hidden_size"]  # the embedding lookup is not a matmul
    return 6 * dense + 12 * shape["num_hidden_layers"] * shape["hidden_size"] * seq


def bidirectional_llama(shape: dict) -> LlamaForCausalLM:
    model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa"))
    for layer in model.model.layers:
        layer.self_attn.is_causal = False  # with no mask, transformers' SDPA path then calls is_causal=False
    return model


def assert_bidirectional(name: str, forward, vocab: int, device: str) -> None:
    ids = torch.randint(0, vocab, (1, 16), device=device)
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % vocab
    with torch.no_grad():
        if torch.equal(forward(ids)[0, 0], forward(changed)[0, 0]):
            raise SystemExit(f"{name} is not bidirectional: its first position ignores the last token")


def compare(args, device: str, dtype: torch.dtype, sync) -> None:
    """Print fwd+bwd tokens/s of both models, interleaved step by step, and their ratio."""
    shape = PRESETS[args.preset]
    torch.manual_seed(0)
    ours = DiffusionLM(DLMConfig(**shape)).to(device, dtype)
    llama = bidirectional_llama(shape).to(device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    assert n_params == sum(p.numel() for p in llama.parameters()), "the two models must have the same size"
    if args.compile:  # both models, block by block, so the comparison stays like for like
        ours.compile_blocks()
        for layer in llama.model.layers:
            layer.compile()
    assert_bidirectional("DiffusionLM", ours, shape["vocab_size"], device)
    assert_bidirectional("Llama", lambda x: llama(x, use_cache=False).logits, shape["vocab_size"], device)
    ids = torch.randint(0, shape["vocab_size"], (args.batch, args.seq), device=device)
    steps = {
        "mmdlm DiffusionLM": lambda: ours(ids).float().logsumexp(-1).mean().backward(),
        "transformers Llama": lambda: llama(ids, use_cache=False).logits.float().logsumexp(-1).mean().backward(),
    }
    times = {name: [] for name in steps}
    for i in range(args.warmup + args.repeats):
        for name in list(steps)[:: 1 if i % 2 else -1]:  # alternate the order too
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    tokens = args.batch * args.seq
    gpu = device == "cuda"
    print(f"{device} {str(dtype).removeprefix('torch.')}, {n_params / 1e6:.1f} M parameters, batch {args.batch} x "
          f"{args.seq} tokens, fwd+bwd, median of {args.repeats}, {torch.get_num_threads()} threads, "
          f"compile {args.compile}")
    print(f"{'model':<22}{'ms/step':>10}{'tokens/s':>12}" + (f"{'MFU':>8}" if gpu else ""))
    speed = {}
    for name, ts in times.items():
        t = statistics.median(ts)
        speed[name] = tokens / t
        mfu = speed[name] * flops_per_token(shape, n_params, args.seq) / (args.peak_tflops * 1e12)
        print(f"{name:<22}{t * 1e3:>10.1f}{speed[name]:>12.0f}" + (f"{mfu:>8.1%}" if gpu else ""))
    print(f"ratio mmdlm / Llama: {speed['mmdlm DiffusionLM'] / speed['transformers Llama']:.2f}")


def zero_steps(args, device: str, sync) -> None:
    """Run full training steps (masked-diffusion loss, AdamW) under ZeRO; print throughput and peak memory."""
    import deepspeed

    from mmdlm.diffusion import masked_diffusion_loss
    from mmdlm.train.train import init_distributed

    init_distributed()  # the launcher's process group, or a world of one
    rank, world = dist.get_rank(), dist.get_world_size()
    if device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    shape = PRESETS[args.preset]
    torch.manual_seed(0)
    model = DiffusionLM(DLMConfig(**shape))
    if args.checkpointing:
        model.set_activation_checkpointing(True)
    if args.compile:
        model.compile_blocks()
    n_params = sum(p.numel() for p in model.parameters())
    bf16 = device == "cuda"
    ds = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
          "train_batch_size": args.batch * world, "gradient_clipping": 1.0, "bf16": {"enabled": bf16},
          "zero_optimization": {"stage": args.zero, "overlap_comm": True, "contiguous_gradients": True},
          "steps_per_print": 10**9}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")  # as train/build.py
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    ids = torch.randint(0, shape["vocab_size"] - 1, (args.batch, args.seq), device=engine.device)
    maskable = torch.ones_like(ids, dtype=torch.bool)
    times = []
    for i in range(args.warmup + args.repeats):
        sync()
        start = time.perf_counter()
        loss = masked_diffusion_loss(engine, ids, maskable, shape["vocab_size"] - 1).loss
        engine.backward(loss)
        engine.step()
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    t = torch.tensor([statistics.median(times)], device=engine.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if device == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:  # the process's peak resident memory (Linux reports KiB)
        import resource

        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peak = torch.tensor([peak_gib], device=engine.device)
    peaks = [torch.zeros_like(peak) for _ in range(world)]
    dist.all_gather(peaks, peak)
    if rank == 0:
        per_gpu = args.batch * args.seq / t.item()
        mfu = per_gpu * flops_per_token(shape, n_params, args.seq) / (args.peak_tflops * 1e12)
        print(f"ZeRO-{args.zero}, {world} ranks, {device} {'bf16' if bf16 else 'fp32'}, {n_params / 1e9:.2f} B "
              f"parameters, micro-batch {args.batch} x {args.seq}, checkpointing {args.checkpointing}, "
              f"compile {args.compile}")
        print(f"step {t.item() * 1e3:.0f} ms, {per_gpu:.0f} tokens/s per rank" + (f", MFU {mfu:.1%}" if bf16 else ""))
        what = "CUDA max allocated" if device == "cuda" else "max resident set"
        print(f"peak memory per rank ({what}, GiB): " + " ".join(f"{p.item():.2f}" for p in peaks))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bf16", action="store_true", help="compare in bf16 (GPU)")
    parser.add_argument("--zero", type=int, choices=(2, 3), help="full training steps under this ZeRO stage")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing (with --zero)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each block (both models)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="for MFU (H100 SXM bf16 dense: 989)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if args.zero:
        zero_steps(args, device, sync)
    else:
        compare(args, device, torch.bfloat16 if args.bf16 else torch.float32, sync)


if __name__ == "__main__":
    main()

"""Memory per GPU and tokens/s per GPU for a model config, computed on paper (no weights allocated).

    python train/estimate.py --model configs/model/llada-8b-siglip.yaml --gpus 8 --seq 2048 --micro-batch 1

Formulas (mixed-precision Adam, ZeRO, Rajbhandari et al. 2020; activations, Korthikanti et al. 2022):
- weights 2 bytes/param (bf16); gradients 2 bytes/trainable param; Adam fp32 master + m + v
  = 12 bytes/trainable param. ZeRO-2 shards gradients and optimizer states over the N ranks,
  ZeRO-3 also the weights; offload moves the optimizer states to CPU memory.
- activations with full activation checkpointing: each layer keeps its input (2*s*b*h bytes),
  plus one layer's working set while it is recomputed: s*b*h*(34 + 5*a*s/h) bytes without a
  fused attention kernel, s*b*h*34 with one (SDPA's flash/memory-efficient paths never store
  the s x s score matrix). Logits in fp32 add 4*s*b*V (the loss upcasts them).
- FLOPs per token: 6 * N_lm (forward + backward) + 2 * N_lm for recomputation under
  checkpointing, plus attention 12 * layers * h * s (fwd+bwd, with recompute: 16). The frozen
  vision tower costs its forward only (2 * N_vision per image token).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from mmdlm.errors import report_user_errors

GiB = 1024**3


@dataclass
class Shape:
    params_lm: int
    params_vision: int
    params_projector: int
    layers: int
    hidden: int
    heads: int
    vocab: int
    image_tokens: int


def shape_of(model_yaml: str) -> Shape:
    """Return the sizes of a model config, counting parameters on the meta device."""
    import torch

    from mmdlm.multimodal import build_model

    with torch.device("meta"):
        model = build_model(model_yaml)
    lm = model.lm.config

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters())

    return Shape(
        params_lm=count(model.lm),
        params_vision=count(model.vision),
        params_projector=count(model.projector),
        layers=lm.num_hidden_layers,
        hidden=lm.hidden_size,
        heads=lm.num_attention_heads,
        vocab=lm.vocab_size,
        image_tokens=model.num_image_tokens,
    )


def memory_per_gpu(s: Shape, gpus: int, seq: int, micro_batch: int, stage: int, offload: bool,
                   train_vision: bool) -> dict[str, float]:
    """Return GiB per GPU by component for the given ZeRO stage."""
    total = s.params_lm + s.params_vision + s.params_projector
    trainable = s.params_lm + s.params_projector + (s.params_vision if train_vision else 0)
    weights = 2 * total / (gpus if stage == 3 else 1)
    grads = 2 * trainable / (gpus if stage >= 2 else 1)
    optimizer = 0.0 if offload else 12 * trainable / (gpus if stage >= 1 else 1)
    sbh = seq * micro_batch * s.hidden
    activations = 2 * sbh * s.layers + 34 * sbh + 4 * seq * micro_batch * s.vocab
    parts = {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations}
    return {k: v / GiB for k, v in parts.items()}


def tokens_per_second(s: Shape, seq: int, peak_tflops: float, mfu: float, checkpointing: bool) -> float:
    """Return training tokens/s per GPU at the given model-FLOPs utilisation."""
    dense = (8 if checkpointing else 6) * (s.params_lm + s.params_projector)
    attention = (16 if checkpointing else 12) * s.layers * s.hidden * seq
    vision = 2 * s.params_vision * s.image_tokens / seq  # per text token, one image per sequence
    return peak_tflops * 1e12 * mfu / (dense + attention + vision)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="configs/model/llada-8b-siglip.yaml")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak (H100 SXM: 989)")
    parser.add_argument("--mfu", type=float, default=0.40)
    parser.add_argument("--train-vision", action="store_true")
    args = parser.parse_args(argv)
    return report_user_errors(lambda: report(args))


def report(args: argparse.Namespace) -> int:
    """Print the memory table and the expected throughput; return 0."""
    s = shape_of(args.model)
    total = s.params_lm + s.params_vision + s.params_projector
    print(f"{args.model}: {total / 1e9:.2f} B parameters (LM {s.params_lm / 1e9:.2f} B, vision "
          f"{s.params_vision / 1e6:.0f} M, projector {s.params_projector / 1e6:.0f} M)")
    print(f"{args.gpus} GPUs, sequence {args.seq}, micro-batch {args.micro_batch}, activation checkpointing on\n")
    print(f"{'setup':<16}{'weights':>9}{'grads':>9}{'optim':>9}{'activ':>9}{'total GiB':>11}")
    for name, stage, offload in [("ZeRO-2", 2, False), ("ZeRO-3", 3, False), ("ZeRO-3+offload", 3, True)]:
        m = memory_per_gpu(s, args.gpus, args.seq, args.micro_batch, stage, offload, args.train_vision)
        print(f"{name:<16}" + "".join(f"{v:>9.1f}" for v in m.values()) + f"{sum(m.values()):>11.1f}")
    tps = tokens_per_second(s, args.seq, args.peak_tflops, args.mfu, checkpointing=True)
    print(f"\nexpected throughput: {tps:,.0f} tokens/s per GPU at {args.mfu:.0%} MFU of {args.peak_tflops:.0f} TFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

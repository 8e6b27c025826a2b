#!/usr/bin/env bash
# The autoregressive twin beside the demo's diffusion model, and the inference benchmark of both.
# Run after scripts/demo.sh (it reuses runs/demo/world, runs/demo/tower and runs/demo/caption/model):
#   1. train the twin: the same model config with causal attention (and no logit shift), the same
#      pretrained tower, the same stages (SFT, caption), data, steps and learning rates, next-token
#      loss only
#   2. one table per task (VQA, captions): accuracy / CIDEr, forward passes, tokens per forward and
#      latency for each sampler setting of the diffusion model and for the twin, plus the
#      quality/speed frontier plot (runs/demo/frontier.png)
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=runs/demo
if [ ! -d "$out/caption/model" ]; then
    echo "run scripts/demo.sh first: it draws $out/world and trains $out/caption/model" >&2
    exit 2
fi
twin=(--set objective=autoregressive --set ar_warmup_steps=0 --set ar_loss_weight=0 --set first_token_weight=0)
rm -rf "$out/ar_sft" "$out/ar_caption"
# Two compute threads and the tower cache, as demo.sh trains the diffusion model: the same budget for both.
mmdlm-train --config configs/train/demo_sft.yaml "${twin[@]}" --set model.lm.attention=causal --set model.lm.shift_logits=false \
    --set output_dir="$out/ar_sft"
mmdlm-train --config configs/train/demo_caption.yaml "${twin[@]}" \
    --set init_from="$out/ar_sft/model" --set output_dir="$out/ar_caption"
python infer/benchmark.py --model "$out/caption/model" --baseline "$out/ar_caption/model" --data "$out/world" \
    --limit "${LIMIT:-100}" --repeats 1 --threads 1 --plot "$out/frontier.png" | tee "$out/benchmark.md"

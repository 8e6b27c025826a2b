"""The LLaDA-V ladder: its own sampler's settings, then mmdlm's speedups one at a time (`benchmark.py --llada-v`).

    python infer/benchmark.py --llada-v --model CONVERTED --input qa.json [--limit 8]
    python infer/benchmark.py --llada-v --shape small --limit 2     # random weights in LLaDA-V's layout

Row 1 is LLaDA-V's `generate`: one token per step, no cache, its suppressed ids and float64
confidence; tests/test_llada_v.py shows it gives LLaDA-V's own tokens. Early stop after it is
exact too (the answer up to its stop token is committed before the stop is, so nothing before it
can change); the threshold rule and the prefix cache (which needs prefix-DLM attention, not what
LLaDA-V was trained with) change answers, and the last column says how many stay identical.
`--shape` builds a random-init model with LLaDA-V's options (SigLIP so400m geometry at 384 px,
anyres_max_4 on 1x1..6x6 crops, spatial_unpad, LLaDA's 126,464-token vocabulary) at a width a
CPU can run, for speed ratios without a checkpoint; the real 8B needs a GPU for this table.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import torch
from PIL import Image

from mmdlm.sampling import SamplerConfig

# Random-init shapes in LLaDA-V's layout: (tower width, tower layers kept + 1, LM width, LM layers, heads)
SHAPES = {"small": (128, 3, 256, 4, 4), "8b": (1152, 27, 4096, 32, 32)}
PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]


def llada_v_ladder(base: SamplerConfig, tau: float) -> list[tuple[str, bool, SamplerConfig]]:
    """Return (name, exact, config): LLaDA-V's sampler, then early stop, threshold and prefix cache added."""
    stop = replace(base, early_stop=True)
    fast = replace(base, threshold=tau)
    cached = fast.with_cache("prefix")
    return [
        ("LLaDA-V generate (1 token/step, no cache)", True, base),
        ("+ early stop", True, stop),
        (f"+ threshold {tau}", False, fast),
        (f"+ threshold {tau} + prefix cache (prefix-DLM)", False, cached),
        (f"+ threshold {tau} + prefix cache + early stop", False, replace(cached, early_stop=True)),
        (f"+ threshold {tau} + block cache + early stop", False, replace(fast, early_stop=True).with_cache("block")),
    ]


def random_model(shape: str, vocab_size: int = 126464):
    """Return an MMDLM with random weights in LLaDA-V's layout at one of SHAPES."""
    from mmdlm.multimodal import MMDLM, MMDLMConfig

    tower_width, tower_layers, width, layers, heads = SHAPES[shape]
    siglip = dict(hidden_size=tower_width, intermediate_size=4 * tower_width, num_hidden_layers=tower_layers,
                  num_attention_heads=max(1, tower_width // 72), image_size=384, patch_size=14,
                  hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    vision = dict(backend="transformers", model="siglip", overrides=siglip, feature_layer=-2, anyres_max=4,
                  grid_pinpoints=PINPOINTS)
    lm = dict(vocab_size=vocab_size, hidden_size=width, intermediate_size=width * 3, num_hidden_layers=layers,
              num_attention_heads=heads, rope_theta=500000.0, mask_token_id=126336, max_position_embeddings=8192)
    config = MMDLMConfig(vision=vision, projector=dict(merge="spatial_unpad"), lm=lm, image_token_id=vocab_size - 1,
                         sampler=dict(suppress_ids=[126081, 126080, 126346, 126347], float64_confidence=True))
    torch.manual_seed(0)
    return MMDLM(config).eval()


@torch.no_grad()
def random_prefixes(model, limit: int) -> list[tuple[torch.Tensor, None]]:
    """Return `limit` prompts: a random 700x420 image's merged tokens inside a 40-token question."""
    transform, prefixes = model.image_transform(), []
    for k in range(limit):
        g = torch.Generator().manual_seed(k)
        image = Image.fromarray((torch.rand(420, 700, 3, generator=g) * 255).to(torch.uint8).numpy())
        run = model.image_tokens(image.size)
        ids = torch.randint(0, 1000, (1, 40 + run), generator=g)
        ids[0, 10 : 10 + run] = model.config.image_token_id
        prefixes.append((model.embed(ids, transform(image), image_sizes=torch.tensor([image.size])), None))
    return prefixes


def run(args: argparse.Namespace) -> int:
    from mmdlm.infer.benchmark import run_setting, same_share, table
    from mmdlm.infer.infer import Answerer, llava_requests, load_image, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.shape:
        model = random_model(args.shape)
        prefixes, mask_id = random_prefixes(model, args.limit), 126336
        stops = dict(eos_id=126081, stop_ids=(126348,))
        what = f"random-init LLaDA-V layout, shape {args.shape}"
    else:
        answerer = Answerer(*load_model(args.model, args.device))
        model, mask_id, s = answerer.model, answerer.special.mask, answerer.special
        stops = dict(eos_id=s.eos, stop_ids=(s.eot,))
        prefixes = []
        for r in llava_requests(args.input, None)[: args.limit]:
            images = [load_image(p) for p in r["images"]]
            prefixes.append(answerer.prefix([answerer.prompt_ids(r["turns"], images)], [images]))
        what = str(args.model)
    sampler = {k: tuple(v) if isinstance(v, list) else v for k, v in model.config.sampler.items()}
    base = SamplerConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                         **sampler, **stops)
    rows = []
    for name, exact, config in llada_v_ladder(base, args.tau):
        run_setting(model.lm, prefixes[:1], mask_id, config)  # warm-up
        began = time.perf_counter()
        result = run_setting(model.lm, prefixes, mask_id, config, args.repeats)
        result["same"] = same_share(result["answers"], (rows[0] if rows else result)["answers"])
        rows.append({"name": name + (" [exact]" if exact else ""), **result})
        print(f"  {name}: {time.perf_counter() - began:.1f} s", flush=True)
    n = model.lm.config
    print(f"\n{what}: LM {n.hidden_size} wide x {n.num_hidden_layers} layers, vocab {n.vocab_size}; "
          f"{len(prefixes)} prompts of {', '.join(str(p[0].shape[1]) for p in prefixes)} tokens; "
          f"{args.gen_length}-token answers; {torch.get_num_threads()} threads")
    print(table("setting", rows, "score"))
    return 0

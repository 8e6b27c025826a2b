"""The sampler's speed at a model shape, random weights (`benchmark.py --speed`): issue #19's tables.

    python infer/benchmark.py --speed --shape 8b --dtype bfloat16   # on a GPU: LLaDA-8B's shape
    python infer/benchmark.py --speed --shape small                 # the same tables at a toy width (CPU smoke run)
    python infer/benchmark.py --speed --shape 8b --dtype bfloat16 --tables forward,vqa   # some of them

Every answer follows 729 image + 32 prompt embeddings (LLaDA-V's SigLIP grid and a question). The
tables (`--tables`, in the order given; each prints as soon as it is measured, with its seconds):
- forward: ms per answer at batch 1 of a fixed schedule, one token per forward (`--gen-length`
  forwards), and of its first forward and each later one (`forward_ms`): uncached (every position)
  and with the prefix cache (the first forward fills it, the later ones run the canvas only), eager
  and static (`SamplerConfig.static`: CUDA graphs on a GPU), beside the weight-read floor: the LM's
  weight bytes (the embedding table excepted: a forward reads only its rows) over the device's copy
  bandwidth, measured here. Every table runs the LM as infer.py loads it, q/k/v and gate/up fused;
- vqa: one VQA request end to end: a 384 px image through a SigLIP-so400m-shaped tower and the
  projector, the prefix, then the answer (threshold 0.9, early stop, prefix cache, static); against
  the same tower followed by a Llama of the same shape from transformers (static KV cache, which
  transformers compiles on a GPU) writing the same number of tokens;
- batch: answers/s at batch 1, 8 and 64 (static, prefix cache);
- quant: low-bit weights (`--quantize`): weight memory and ms per later forward, int8 everywhere, fp8 on
  GPUs of compute capability 8.9+;
- tuned: bf16 and int8 as in quant, the step compiled with max-autotune (`--autotune`: Triton matmuls,
  which can convert int8 weights as they load them, where torchao's layer converts the whole weight
  per call); minutes of tuning on a GPU, so not in the default list;
- fusion: ms per later forward (batch 1, static, prefix cache) with q/k/v and gate/up fused (4 matmuls
  per block, as infer.py loads the LM) and as trained (7): what the fusion buys. Not in the default
  list: a second LM and its compile, for a diagnosis.
Times are medians of `--repeats` runs after a warm-up run (which compiles). Random weights are never
confident: every forward commits one token (a trained model commits several under the threshold
rule: the demo model answers in ~2 forwards), so the VQA row is its slowest case; its last row says
in how many forwards mmdlm must answer to come first.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import traceback
from dataclasses import replace

import torch
from PIL import Image

from mmdlm.infer.quantize import QuantizeError, quantize_lm, weight_bytes
from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.sampling import SamplerConfig, generate, release_graph_buffers

SHAPES = {  # LLaDA-8B's sizes, and a width a CPU runs in seconds; both with LLaDA's vocabulary
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
    "8b": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=32, num_attention_heads=32),
}
TOWERS = {  # SigLIP-so400m at 384 px (27 x 27 = 729 patches), as LLaDA-V has it, and a toy of it
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2),
    "8b": dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16),
}
VOCAB, MASK_ID, EOS_ID, IMAGE_TOKENS, PROMPT_TOKENS = 126464, 126336, 126081, 729, 32
BATCHES = (1, 8, 64)
TABLES = ("forward", "vqa", "batch", "quant", "tuned", "fusion")
DEFAULT_TABLES = ("forward", "vqa", "batch", "quant")  # tuned: minutes of tuning; fusion: a diagnosis


def random_lm(shape: str, dtype: torch.dtype, device: str, fused: bool = True) -> DiffusionLM:
    """Return a random-init LM at `shape`, initialised on `device` (8 B parameters: seconds on a GPU), its
    projections fused as infer.load_model has them (`fused=False`: the same weights, as trained)."""
    torch.manual_seed(0)
    config = DLMConfig(vocab_size=VOCAB, mask_token_id=MASK_ID, rope_theta=500000.0, max_position_embeddings=4096,
                       **SHAPES[shape])
    with torch.device(device):
        lm = DiffusionLM(config).eval().to(device, dtype)  # .to: whatever was made elsewhere, too
    return lm.fuse_projections() if fused else lm


def prefix(lm: DiffusionLM, batch: int) -> torch.Tensor:
    """Return [batch, 761, D]: image-like embeddings, then embedded prompt ids."""
    p = next(lm.parameters())
    image = torch.randn(batch, IMAGE_TOKENS, lm.config.hidden_size, device=p.device, dtype=p.dtype) * 0.02
    ids = torch.randint(0, MASK_ID, (batch, PROMPT_TOKENS), device=p.device)
    return torch.cat([image, lm.get_input_embeddings()(ids)], 1).detach()


def seconds(fn, repeats: int) -> float:
    """Return the median of `repeats` timed runs of fn() after one warm-up run (compilation, allocation)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()
    times = []
    for _ in range(repeats):
        sync()
        began = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def copy_bandwidth(device: str) -> float:
    """Return bytes/s of a 1 GiB device-to-device copy (read + write): the rate a forward reads weights at best."""
    size = 2**30 if device == "cuda" else 2**28
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * size / seconds(lambda: dst.copy_(src), 5)


def forward_ms(lm, embeds: torch.Tensor, config: SamplerConfig, repeats: int) -> tuple[int, float, float, float]:
    """Return (forwards, ms per answer, ms of the first forward, ms of each later one) of sampling after `embeds`.

    The first forward of a cached setting runs every position and fills the cache; the later ones run
    the canvas. The first forward is timed alone as an answer committed in one forward (a fixed
    schedule of one step: the same shapes), and each later one as the rest of a one-token-per-forward
    answer over its G - 1 later forwards; the answer's setup counts with the first.
    """
    G = config.gen_length
    full, single = replace(config, steps=G), replace(config, steps=1)
    forwards = generate(lm, prefix_embeds=embeds, mask_id=MASK_ID, config=full).forward_passes
    answer, first = (seconds(lambda c=c: generate(lm, prefix_embeds=embeds, mask_id=MASK_ID, config=c), repeats)
                     for c in (full, single))
    return forwards, 1000 * answer, 1000 * first, 1000 * (answer - first) / max(forwards - 1, 1)


def forward_table(lm, base: SamplerConfig, device: str, repeats: int) -> str:
    floor_bytes = weight_bytes(lm) - weight_bytes(lm.get_input_embeddings())
    floor_ms = 1000 * floor_bytes / copy_bandwidth(device)
    embeds = prefix(lm, 1)
    lines = [f"weight-read floor: {floor_bytes / 2**30:.2f} GiB of weights per forward = {floor_ms:.2f} ms",
             "| batch 1 | forwards/answer | ms/answer | first forward (ms) | each later forward (ms) | later / floor |",
             "|---|---|---|---|---|---|"]
    # Uncached, a forward runs all 777 positions: arithmetic, not launches, bounds it (no graph for it).
    for name, config in (("no cache, eager", base), ("prefix cache, eager", base.with_cache("prefix")),
                         ("prefix cache, static", replace(base.with_cache("prefix"), static=True))):
        try:
            forwards, answer, first, later = forward_ms(lm, embeds, config, repeats)
        except Exception as error:  # noqa: BLE001 (the static row's compile, say): the eager rows still count
            lines.append(f"| {name} | failed: {failure(error)} | | | | |")
            continue
        lines.append(f"| {name} | {forwards} | {answer:.1f} | {first:.2f} | {later:.2f} | {later / floor_ms:.1f}x |")
    return "\n".join(lines)


def fusion_table(lm, unfused, base: SamplerConfig, repeats: int) -> str:
    """ms per later forward (batch 1, static, prefix cache) of `lm` as inference loads it, q/k/v and gate/up fused,
    and of the same LM as trained (`unfused()` builds it): what the fusion buys."""
    config = replace(base.with_cache("prefix"), static=True)
    embeds = prefix(lm, 1)
    lines = ["| projections (batch 1, static, prefix cache) | matmuls per block | ms per later forward |",
             "|---|---|---|"]
    for name, matmuls, model in (("fused (as infer.py loads the LM)", 4, lambda: lm), ("as trained", 7, unfused)):
        try:
            later = forward_ms(model(), embeds, config, repeats)[3]
        except Exception as error:  # noqa: BLE001 (a compile that fails): the other row still counts
            lines.append(f"| {name} | {matmuls} | failed: {failure(error)} |")
            continue
        lines.append(f"| {name} | {matmuls} | {later:.2f} |")
    return "\n".join(lines)


def batch_table(lm, base: SamplerConfig, batches: tuple[int, ...], repeats: int) -> str:
    config = replace(base.with_cache("prefix"), static=True)
    lines = ["| batch (static, prefix cache) | ms/answer batch | answers/s |", "|---|---|---|"]
    for batch in batches:
        try:
            embeds = prefix(lm, batch)
            s = seconds(lambda e=embeds: generate(lm, prefix_embeds=e, mask_id=MASK_ID, config=config), repeats)
        except Exception as error:  # noqa: BLE001 (out of memory at batch 64 on a smaller card): keep the others
            lines.append(f"| {batch} | failed: {failure(error)} | |")
            break
        lines.append(f"| {batch} | {1000 * s:.1f} | {batch / s:.1f} |")
    release_graph_buffers(lm)  # batch 64's KV cache: 26 GiB at the 8B shape
    return "\n".join(lines)


def failure(error: Exception) -> str:
    """Return an error as a table cell (type, first line) after printing its traceback to stderr; on a GPU,
    the cached memory is freed for what follows. Call it in the `except` block."""
    traceback.print_exc()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".replace("|", "/")


def vqa_model(lm: DiffusionLM, shape: str):
    """Return an MMDLM around `lm`: a SigLIP-so400m-shaped tower (random weights) and its projector."""
    from mmdlm.multimodal import MMDLM, MMDLMConfig

    siglip = dict(TOWERS[shape], image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    config = MMDLMConfig(vision=dict(backend="transformers", model="siglip", overrides=siglip, feature_layer=-2),
                         image_token_id=MASK_ID - 1, prefix_dlm=True)
    p = next(lm.parameters())
    torch.manual_seed(0)
    with torch.device(p.device):
        return MMDLM(config, lm=lm).eval().to(p.device, p.dtype)


def vqa_table(lm: DiffusionLM, shape: str, gen_length: int, repeats: int) -> str:
    """Return one VQA request end to end (image to answer), mmdlm against the tower + an autoregressive LM."""
    model = vqa_model(lm, shape)
    p = next(lm.parameters())
    transform = model.image_transform()
    image = Image.fromarray((torch.rand(480, 640, 3, generator=torch.Generator().manual_seed(0)) * 255)
                            .to(torch.uint8).numpy())
    ids = torch.randint(0, MASK_ID - 1, (1, model.num_image_tokens + PROMPT_TOKENS), device=p.device)
    ids[:, : model.num_image_tokens] = model.config.image_token_id
    config = replace(SamplerConfig(gen_length=gen_length, block_length=gen_length, threshold=0.9, early_stop=True,
                                   eos_id=EOS_ID).with_cache("prefix"), static=True)

    def pixels():
        return transform(image)[None].to(p.device, p.dtype)  # [1, 3, 384, 384]

    def answer():
        return generate(lm, prefix_embeds=model.embed(ids, pixels()), mask_id=MASK_ID, config=config)

    forwards = answer().forward_passes
    total, tower = seconds(answer, repeats), seconds(lambda: model.encode_images(pixels()), repeats)
    # the cost of the first forward and of each later one, as in the forward table
    fixed = replace(config, threshold=None, early_stop=False)  # the forward table's static setting: no compile
    _, _, first, later = forward_ms(lm, model.embed(ids, pixels()), fixed, repeats)
    lines = [f"| one VQA request, batch 1, {ids.shape[1]} prefix tokens | forwards | ms |", "|---|---|---|",
             f"| mmdlm: image -> tower -> prefix -> {gen_length}-token answer (threshold 0.9, early stop, prefix "
             f"cache, static) | {forwards} | {1000 * total:.1f} |",
             f"| of which the image: processing, tower, projector | | {1000 * tower:.1f} |"]
    compiled = " (compiled)" if p.device.type == "cuda" else ""
    try:
        ar = ar_seconds(shape, p.dtype, p.device.type, ids.shape[1], gen_length, repeats)
    except Exception as error:  # noqa: BLE001 (transformers' compile on this torch): mmdlm's rows still count
        return "\n".join([*lines, f"| autoregressive: transformers Llama, static cache{compiled} | failed: "
                                  f"{failure(error)} | |"])
    if p.device.type == "cuda":
        torch.cuda.empty_cache()
    # mmdlm answers first while image + first + (F - 1) later forwards < image + AR: F < 1 + (AR - first) / later
    even = 1 + (1000 * ar - first) / later if later > 0 else float("inf")
    even_text = "never" if even < 1 else f"{min(even, gen_length):.1f}"
    return "\n".join([
        *lines,
        f"| autoregressive: the same image work, then transformers Llama, static cache{compiled} | "
        f"{gen_length} | {1000 * (tower + ar):.1f} |",
        f"| of which the Llama alone ({1000 * ar / gen_length:.2f} ms per token, prompt included) | | "
        f"{1000 * ar:.1f} |",
        f"| break-even: mmdlm answers first in up to this many forwards (first {first:.1f} ms, then "
        f"{later:.2f} ms each) | {even_text} | |",
    ])


def ar_seconds(shape: str, dtype: torch.dtype, device: str, prompt_tokens: int, gen_length: int,
               repeats: int) -> float:
    """Return seconds for a transformers Llama of the same shape to write `gen_length` tokens (greedy, static cache)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[shape])
    with torch.device(device):
        model = LlamaForCausalLM(config).eval().to(device, dtype)
        ids = torch.randint(0, MASK_ID, (1, prompt_tokens))

    def answer():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_length,
                                  min_new_tokens=gen_length, do_sample=False, cache_implementation="static",
                                  pad_token_id=0)

    return seconds(answer, repeats)


def quant_table(lm, base: SamplerConfig, device: str, repeats: int, autotune: bool = False) -> str:
    """Weight memory and ms per later forward of each weight format (static, prefix cache); `autotune`:
    the `tuned` table, the step compiled with max-autotune (`--autotune`), bf16 and int8 only."""
    config = replace(base.with_cache("prefix"), static=True, autotune=autotune)
    embeds = prefix(lm, 1)
    kinds = ["none", "int8"]
    if device == "cuda" and torch.cuda.get_device_capability() >= (8, 9) and not autotune:
        kinds.append("fp8")
    compiled = ", max-autotune" if autotune else ""
    lines = [f"| weights (static{compiled}, prefix cache) | LM weight memory | ms per later forward |", "|---|---|---|"]
    for kind in kinds:
        model = None
        try:
            model = lm if kind == "none" else quantize_lm(copy.deepcopy(lm), kind)
            *_, later = forward_ms(model, embeds, config, repeats)
        except QuantizeError as error:  # torchao missing: the other rows and tables still count
            lines.append(f"| {kind} | skipped: {error} | |")
            continue
        except Exception as error:  # noqa: BLE001 (a kernel this GPU or torch lacks): the next kind runs
            lines.append(f"| {kind} | failed: {failure(error)} | |")
            continue
        finally:
            if model is not None:
                release_graph_buffers(model)
        lines.append(f"| {kind if kind != 'none' else str(next(lm.parameters()).dtype)} | "
                     f"{weight_bytes(model) / 2**20:.1f} MiB | {later:.2f} |")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    names = args.tables.split(",") if args.tables else DEFAULT_TABLES
    if unknown := [name for name in names if name not in TABLES]:
        raise SystemExit(f"--tables: no table {', '.join(unknown)}; choose from {','.join(TABLES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    # One compiled step per sampler setting, model and shape bucket: more than torch's default of 8 in one run.
    torch._dynamo.config.recompile_limit = 64
    dtype = getattr(torch, args.dtype)
    began = time.perf_counter()
    lm = random_lm(args.shape, dtype, args.device)
    base = SamplerConfig(gen_length=args.gen_length, block_length=args.gen_length, steps=args.gen_length,
                         prefix_dlm=True)
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"random-init LM, shape {args.shape} ({lm.num_parameters() / 1e9:.2f} B parameters), {args.dtype}, "
          f"{where}, torch {torch.__version__}; {IMAGE_TOKENS} + {PROMPT_TOKENS} prefix tokens, "
          f"{args.gen_length}-token answers, one per forward (built in {time.perf_counter() - began:.0f} s)",
          flush=True)
    tables = {
        "forward": lambda: forward_table(lm, base, args.device, args.repeats),
        "vqa": lambda: vqa_table(lm, args.shape, args.gen_length, args.repeats),
        "batch": lambda: batch_table(lm, base, tuple(b for b in BATCHES if b <= args.max_batch), args.repeats),
        "quant": lambda: quant_table(lm, base, args.device, args.repeats),
        "tuned": lambda: quant_table(lm, base, args.device, args.repeats, autotune=True),
        "fusion": lambda: fusion_table(lm, lambda: random_lm(args.shape, dtype, args.device, fused=False), base,
                                       args.repeats),
    }
    failed = []
    for name in names:
        began = time.perf_counter()
        try:
            with torch.no_grad():  # the tower and the embeddings too: no autograd graph in any timing
                table = tables[name]()
        except Exception as error:  # noqa: BLE001 (one table's failure must not cost the others' device time)
            table, failed = f"{name} failed: {failure(error)}", [*failed, name]
        print(f"\n{table}\n({name}: {time.perf_counter() - began:.0f} s, compilation included)", flush=True)
    return 1 if failed else 0

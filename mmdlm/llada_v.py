"""LLaDA-V checkpoints -> MMDLM folders: one explicit table of names, and the `mmdlm-convert-llada-v` command.

LLaDA-V (ML-GSAI/LLaDA-V, model type `llava_llada`) is LLaVA-OneVision's layout around LLaDA: a
SigLIP tower with its last layer deleted (features = the kept layers' output, no post-layernorm,
no head), an `mlp2x_gelu` projector, `anyres_max_4` tiles merged by `spatial_unpad` with a learned
`image_newline`, and a LLaMA-named LLaDA. Each part maps onto a general mmdlm option; the names
map by the table below. Shards are converted one at a time, so converting the 8B checkpoint holds
one shard in memory, never the whole model.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from mmdlm.config import ConfigError
from mmdlm.files import readable
from mmdlm.llada import (
    ConversionError,
    check_destination,
    note_missing_tokenizer,
    read_config,
    run_converter,
    weight_files,
)

# LLaDA-V state-dict key -> MMDLM key; `{i}` is a layer index, None = read and deliberately dropped.
SIGLIP = "model.vision_tower.vision_tower.vision_model."
KEY_MAP = {
    "model.embed_tokens.weight": "lm.embed_tokens.weight",
    "model.norm.weight": "lm.norm.weight",
    "lm_head.weight": "lm.lm_head.weight",
    "model.layers.{i}.input_layernorm.weight": "lm.layers.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "lm.layers.{i}.attn.q_proj.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "lm.layers.{i}.attn.k_proj.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "lm.layers.{i}.attn.v_proj.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "lm.layers.{i}.attn.o_proj.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "lm.layers.{i}.mlp_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "lm.layers.{i}.mlp.gate_proj.weight",
    "model.layers.{i}.mlp.up_proj.weight": "lm.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight": "lm.layers.{i}.mlp.down_proj.weight",
    "model.mm_projector.0.{p}": "projector.proj.0.{p}",  # Linear(vision, lm)
    "model.mm_projector.2.{p}": "projector.proj.2.{p}",  # Linear(lm, lm) after GELU
    "model.image_newline": "projector.image_newline",
    # The tower keeps SiglipVisionModel's names under a prefix.
    SIGLIP + "embeddings.{name}": "vision.backbone.embeddings.{name}",
    SIGLIP + "encoder.layers.{i}.{name}": "vision.backbone.encoder.layers.{i}.{name}",
    SIGLIP + "post_layernorm.{p}": None,  # saved by upstream, never used for features
}
_PATTERNS = [
    (re.compile("^" + re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
                .replace(r"\{name\}", r"(?P<name>[\w.]+)") + "$"), dst)
    for src, dst in KEY_MAP.items()
]

# Upstream's SigLipVisionTower hard-codes SigLipVisionConfig() (siglip2-so400m-patch14-384) when
# the tower folder is not beside the checkpoint, which is the case for the released weights.
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SIGLIP_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                 "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
# conv_llava_llada's system turn (upstream llava/conversation.py), which LLaDA-V's prompts start with.
SYSTEM_PROMPT = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                 "that the user provides, and assist the user with a variety of tasks using natural language.")
LM_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
REAL_IDS = dict(mask=126336, suppress=(126081, 126080, 126346, 126347))  # MASK; EOS, BOS, <|start/end_header_id|>


def map_key(key: str) -> str | None:
    """Return the MMDLM name of a LLaDA-V key (None: dropped on purpose); KeyError if the table has no row."""
    for pattern, dst in _PATTERNS:
        m = pattern.match(key)
        if m:
            return None if dst is None else dst.format(**m.groupdict())
    raise KeyError(key)


def _check(cfg: dict, where: str) -> None:
    """Raise ConversionError for missing LM sizes and for LLaDA-V options that the MMDLM options do not express."""
    missing = [k for k in LM_SIZES if cfg.get(k) is None]
    if missing:
        raise ConversionError(f"{where}: no {', '.join(missing)}: LLaDA-V's config.json gives {', '.join(LM_SIZES)}")
    wanted = {
        "hidden_act": ("silu",), "attention_bias": (False, None), "rope_scaling": (None,),
        "mm_projector_type": ("mlp2x_gelu", "linear"), "mm_patch_merge_type": ("spatial_unpad", "flat"),
        "mm_vision_select_feature": ("patch", None), "mm_use_im_start_end": (False, None),
        "mm_newline_position": ("grid", None), "mm_resampler_type": (None,),
    }
    for name, allowed in wanted.items():
        if cfg.get(name) not in allowed:
            raise ConversionError(f"{where}: {name}={cfg.get(name)!r} is not supported (supported: {allowed})")
    aspect = cfg.get("image_aspect_ratio") or "square"
    if (aspect.startswith("anyres_max_")) != (cfg.get("mm_patch_merge_type") == "spatial_unpad"):
        raise ConversionError(f"{where}: image_aspect_ratio={aspect!r} with mm_patch_merge_type="
                              f"{cfg.get('mm_patch_merge_type')!r}: supported are anyres_max_N + spatial_unpad, "
                              "or square + flat")


def vision_config(src: Path, cfg: dict) -> dict:
    """Return the SiglipVisionConfig fields of the full tower (before upstream deletes its last layer)."""
    folder = src / str(cfg.get("mm_vision_tower", ""))
    found = folder / "config.json"
    if found.is_file() and str(cfg.get("mm_vision_tower", "")):
        tower = json.loads(found.read_text())
        return {k: tower[k] for k in SIGLIP_FIELDS if k in tower}
    return dict(SO400M)


def model_config(src: Path, cfg: dict, ids: dict) -> dict:
    """Return the MMDLMConfig fields (vision, projector, lm, ids, sampler, system prompt) for a config that passed
    `_check`."""
    where = str(src / "config.json")
    siglip = vision_config(src, cfg)
    aspect = cfg.get("image_aspect_ratio") or "square"
    anyres = int(aspect.removeprefix("anyres_max_")) if aspect.startswith("anyres_max_") else 0
    vision = dict(backend="transformers", model="siglip", overrides=siglip, feature_layer=-2, image_size=None,
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], anyres_max=anyres,
                  grid_pinpoints=[list(p) for p in cfg.get("image_grid_pinpoints") or []] if anyres else [])
    projector = dict(type=cfg["mm_projector_type"], pool=1, merge="spatial_unpad" if anyres else "flat")
    lm = dict(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
              num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=cfg["num_attention_heads"],
              num_key_value_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
              rope_theta=cfg.get("rope_theta", 10000.0), rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
              max_position_embeddings=cfg.get("max_position_embeddings", 4096),
              tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), mask_token_id=ids["mask"],
              eos_token_id=cfg.get("eos_token_id"), bos_token_id=cfg.get("bos_token_id"))
    for name in ("mask", "image", *(f"suppress {i}" for i in ids["suppress"])):
        value = ids[name] if name in ids else int(name.split()[1])
        if not 0 <= value < cfg["vocab_size"]:
            raise ConversionError(f"{where}: the {name.split()[0]} id {value} is outside vocab_size={cfg['vocab_size']}"
                                  ": give the ids of this checkpoint's tokenizer (--mask-id, --suppress-ids, "
                                  "--image-token-id) or put its tokenizer files in the folder")
    sampler = dict(suppress_ids=list(ids["suppress"]), float64_confidence=True)
    return dict(vision=vision, projector=projector, lm=lm, image_token_id=ids["image"], sampler=sampler,
                system_prompt=SYSTEM_PROMPT)


def token_ids(src: Path, args: argparse.Namespace, vocab_size: int):
    """Return ({mask, image, suppress}, tokenizer or None): from the folder's tokenizer, else the flags."""
    if any(src.glob("tokenizer*.json")):
        from mmdlm.data.tokenizer import load_tokenizer, special_ids

        tokenizer = load_tokenizer(src)  # adds <image> (LLaDA-V marks images with -200, outside the vocabulary)
        s = special_ids(tokenizer)
        return dict(mask=s.mask, image=s.image, suppress=(s.eos, s.bos, s.start_header, s.end_header)), tokenizer
    suppress = tuple(args.suppress_ids) if args.suppress_ids is not None else REAL_IDS["suppress"]
    image = args.image_token_id if args.image_token_id is not None else vocab_size - 1
    return dict(mask=args.mask_id if args.mask_id is not None else REAL_IDS["mask"], image=image,
                suppress=suppress), None


def expected_shapes(config) -> dict[str, torch.Size]:
    """Return name -> shape of every MMDLM weight for `config`, built on the meta device (no memory)."""
    from mmdlm.multimodal import MMDLM

    with torch.device("meta"):
        model = MMDLM(config)
    return {k: v.shape for k, v in model.state_dict().items()}


def check_keys(files: list[Path], expected: dict[str, torch.Size]) -> None:
    """Raise ConversionError naming every key the table does not map, every weight missing, every wrong shape."""
    unknown, found, wrong = [], {}, []
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                try:
                    name = map_key(key)
                except KeyError:
                    unknown.append(f"{path.name}: {key}")
                    continue
                if name is None:
                    continue
                shape = torch.Size(f.get_slice(key).get_shape())
                found[name] = shape
                if name in expected and shape != expected[name]:
                    wrong.append(f"{key} is {list(shape)}, config.json calls for {list(expected[name])}")
    problems = sorted(unknown) + [f"(missing) {n}" for n in sorted(set(expected) - set(found))]
    problems += [f"(not in the model) {n}" for n in sorted(set(found) - set(expected))] + wrong
    if problems:
        raise ConversionError(f"{len(problems)} key(s) that the table and config.json do not account for: "
                              f"{problems[:8]}{' ...' if len(problems) > 8 else ''}")


def convert(src: str | Path, dst: str | Path, args: argparse.Namespace) -> int:
    """Write the MMDLM folder `dst` for the LLaDA-V folder `src`; return the number of parameters written."""
    from mmdlm.multimodal import MMDLMConfig

    src, dst = Path(src), Path(dst)
    check_destination(src, dst)
    cfg = read_config(src, "llava_llada")
    _check(cfg, str(src / "config.json"))
    ids, tokenizer = token_ids(src, args, cfg["vocab_size"])
    fields = model_config(src, cfg, ids)
    try:
        config = MMDLMConfig(**fields)
        expected = expected_shapes(config)
    except ConfigError as error:  # the model's own size checks, e.g. key/value heads that do not divide the heads
        raise ConversionError(f"{src / 'config.json'}: {error}") from error
    files = weight_files(src)
    check_keys(files, expected)  # names and shapes from the headers, before any weight is read
    dtype = getattr(torch, args.dtype)
    dst.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for k, path in enumerate(tqdm(files, desc="converting shards", unit="shard", file=sys.stderr, leave=False)):
        with safe_open(str(path), framework="pt") as f:
            out = {name: f.get_tensor(key).to(dtype).contiguous()
                   for key in f.keys() if (name := map_key(key)) is not None}  # noqa: SIM118 (not a dict)
        file = "model.safetensors" if len(files) == 1 else f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(out, str(dst / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, file))
        total += sum(t.numel() for t in out.values())
        del out  # one shard in memory at a time
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=1))
    readable(dst)
    config.dtype = args.dtype
    config.save_pretrained(str(dst))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(dst))
    else:
        note_missing_tokenizer(src, dst, "LLaDA-V")
    return total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a local LLaDA-V checkpoint folder to an mmdlm model folder.")
    p.add_argument("src", help="LLaDA-V folder: config.json, model*.safetensors (+ index), tokenizer files")
    p.add_argument("dst", help="new or empty output folder (what infer.py, evaluate.py and training load)")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ids = p.add_argument_group("token ids, when the folder has no tokenizer files (default: LLaDA-V's)")
    ids.add_argument("--mask-id", type=int, help="<|mdm_mask|> (126336)")
    ids.add_argument("--suppress-ids", type=int, nargs="+", help="ids never chosen at a masked position "
                     "(EOS, BOS, <|start_header_id|>, <|end_header_id|>: 126081 126080 126346 126347)")
    ids.add_argument("--image-token-id", type=int, help="an unused id for the <image> run (default: vocab_size - 1)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def command() -> None:
        n = convert(args.src, args.dst, args)
        print(f"wrote {args.dst}: {n:,} parameters, {args.dtype}")

    return run_converter(command)


if __name__ == "__main__":
    raise SystemExit(main())

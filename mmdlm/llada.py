"""LLaDA checkpoints -> DiffusionLM: one explicit table of names, and the `mmdlm-convert-llada` command.

LLaDA's released checkpoints (GSAI-ML/LLaDA-8B-*) use OLMo-style names. Everything that maps them
lives here, so a reader can check the correspondence line by line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from mmdlm.config import ConfigError
from mmdlm.errors import report_user_errors
from mmdlm.model import DiffusionLM, DLMConfig

# LLaDA config field -> DLMConfig field.
CONFIG_FIELDS = {
    "vocab_size": "vocab_size",  # replaced by embedding_size when present (the padded table size)
    "d_model": "hidden_size",
    "mlp_hidden_size": "intermediate_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_sequence_length": "max_position_embeddings",
    "mask_token_id": "mask_token_id",
    "eos_token_id": "eos_token_id",
    "pad_token_id": "pad_token_id",
    "weight_tying": "tie_word_embeddings",
}

# LLaDA state-dict key -> DiffusionLM key; `{i}` is the block index.
KEY_MAP = {
    "model.transformer.wte.weight": "embed_tokens.weight",
    "model.transformer.ln_f.weight": "norm.weight",
    "model.transformer.ff_out.weight": "lm_head.weight",
    "model.transformer.blocks.{i}.attn_norm.weight": "layers.{i}.attn_norm.weight",
    "model.transformer.blocks.{i}.q_proj.weight": "layers.{i}.attn.q_proj.weight",
    "model.transformer.blocks.{i}.k_proj.weight": "layers.{i}.attn.k_proj.weight",
    "model.transformer.blocks.{i}.v_proj.weight": "layers.{i}.attn.v_proj.weight",
    "model.transformer.blocks.{i}.attn_out.weight": "layers.{i}.attn.o_proj.weight",
    "model.transformer.blocks.{i}.ff_norm.weight": "layers.{i}.mlp_norm.weight",
    "model.transformer.blocks.{i}.ff_proj.weight": "layers.{i}.mlp.gate_proj.weight",  # gated branch
    "model.transformer.blocks.{i}.up_proj.weight": "layers.{i}.mlp.up_proj.weight",
    "model.transformer.blocks.{i}.ff_out.weight": "layers.{i}.mlp.down_proj.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst) for src, dst in KEY_MAP.items()]


def llada_config(llada: dict) -> DLMConfig:
    """Return the DLMConfig for a LLaDA config dict; unsupported LLaDA options raise ConfigError."""
    unsupported = {
        "include_bias": True,
        "block_type": lambda v: v not in ("llama", None),
        "layer_norm_type": lambda v: v not in ("rms", None),
        "activation_type": lambda v: v not in ("silu", "swiglu", None),
    }
    for field, bad in unsupported.items():
        value = llada.get(field)
        if (bad(value) if callable(bad) else value == bad) and value is not None:
            raise ConfigError(f"LLaDA config {field}={value!r} is not supported by this model")
    kwargs = {dst: llada[src] for src, dst in CONFIG_FIELDS.items() if src in llada}
    if llada.get("embedding_size"):
        kwargs["vocab_size"] = llada["embedding_size"]
    return DLMConfig(**kwargs)


def llada_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Return `state` renamed to DiffusionLM keys; unknown or missing keys raise ConfigError listing them."""
    out, unknown = {}, []
    for key, tensor in state.items():
        for pattern, dst in _PATTERNS:
            m = pattern.match(key)
            if m:
                out[dst.replace("{i}", m.group(1)) if m.groups() else dst] = tensor
                break
        else:
            unknown.append(key)
    expected = {dst.replace("{i}", str(i)) for dst in KEY_MAP.values() for i in range(num_layers)}
    missing = sorted(expected - set(out))
    if unknown or missing:
        raise ConfigError(
            f"LLaDA checkpoint does not match the config: unexpected keys {unknown[:8]}, missing {missing[:8]}"
        )
    return out


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no model*.safetensors weights (LLaDA checkpoints ship safetensors shards)")
    state: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc="reading shards", unit="shard", file=sys.stderr, leave=False):
        state.update(load_file(str(f)))
    return state


def load_llada(folder: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionLM:
    """Return a DiffusionLM holding the weights of a local LLaDA checkpoint folder."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder}: no config.json; pass the folder of a LLaDA checkpoint")
    config = llada_config(json.loads(cfg_path.read_text()))
    state = llada_state_dict(_read_state_dict(folder), config.num_hidden_layers)
    with torch.device("meta"):
        model = DiffusionLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a local LLaDA checkpoint folder to an mmdlm model folder.")
    parser.add_argument("src", help="LLaDA checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("dst", help="output folder (save_pretrained format)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    return report_user_errors(lambda: convert(args.src, args.dst, args.dtype))


def convert(src: str, dst: str, dtype: str) -> int:
    """Write the mmdlm model folder `dst` converted from the LLaDA folder `src`; return 0."""
    model = load_llada(src, getattr(torch, dtype))
    model.save_pretrained(dst)
    for tok_file in Path(src).glob("tokenizer*"):  # keep the tokenizer beside the weights
        (Path(dst) / tok_file.name).write_bytes(tok_file.read_bytes())
    for name in ("special_tokens_map.json",):
        if (Path(src) / name).is_file():
            (Path(dst) / name).write_bytes((Path(src) / name).read_bytes())
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst}: {n / 1e9:.2f} B parameters, {dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""LLaDA checkpoints -> DiffusionLM: one explicit table of names, and the `mmdlm-convert-llada` command.

LLaDA's released checkpoints (GSAI-ML/LLaDA-8B-*) use OLMo-style names. Everything that maps them
lives here, so a reader can check the correspondence line by line. The folder checks both converters
share (this one and mmdlm/llada_v.py) live here too: config.json and its model_type, the shards an
index names, and an output folder that is new or empty, so no conversion overwrites a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
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

# The sizes a LLaDA config must give: DLMConfig's defaults are a toy model's, never a LLaDA's.
REQUIRED = ("d_model", "n_heads", "n_layers", "mlp_hidden_size", "vocab_size")
# LLaDA options whose other values change the computation -> the one this model computes (LLaDA-8B's value).
# An absent or null field counts as LLaDA-8B's: the fixtures' configs, like older exports, leave most out.
SUPPORTED = {
    "block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "layer_norm_with_affine": True,
    "include_bias": False, "include_qkv_bias": False, "rope": True, "alibi": False, "scale_logits": False,
    "input_emb_norm": False, "attention_layer_norm": False, "clip_qkv": None,
}
# config.json's model_type -> what the folder is, for a converter handed the wrong one.
MODEL_TYPES = {
    "llada": "an original LLaDA checkpoint: convert it with mmdlm-convert-llada",
    "llava_llada": "an original LLaDA-V checkpoint: convert it with mmdlm-convert-llada-v",
    "mmdlm_lm": "an mmdlm language model folder (already converted): nothing to convert, load it as it is",
    "mmdlm": "an mmdlm vision-language model folder (already converted): nothing to convert, load it as it is",
}


class ConversionError(ConfigError):
    """A checkpoint folder a converter cannot turn into an mmdlm folder, or an output folder it must not write."""


def llada_config(llada: dict, where: str = "LLaDA config") -> DLMConfig:
    """Return the DLMConfig for a LLaDA config dict; unsupported options or missing sizes raise ConversionError."""
    for field, supported in SUPPORTED.items():
        value = llada.get(field)
        if value is not None and value != supported:
            raise ConversionError(f"{where}: {field}={json.dumps(value)} is not supported (supported: "
                                  f"{json.dumps(supported)}, LLaDA-8B's value)")
    missing = [field for field in REQUIRED if llada.get(field) is None]
    if missing:
        raise ConversionError(f"{where}: no {', '.join(missing)}: not a LLaDA config (LLaDA's config.json gives "
                              f"{', '.join(REQUIRED)})")
    kwargs = {dst: llada[src] for src, dst in CONFIG_FIELDS.items() if src in llada}
    if llada.get("embedding_size"):
        kwargs["vocab_size"] = llada["embedding_size"]
    try:
        return DLMConfig(**kwargs)
    except ConfigError as error:  # the model's own size checks, e.g. key/value heads that do not divide the heads
        raise ConversionError(f"{where}: {error}") from error


def llada_state_dict(state: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Return `state` renamed to DiffusionLM keys; unknown or missing keys raise ConversionError listing them."""
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
        raise ConversionError(
            f"LLaDA checkpoint does not match the config: unexpected keys {unknown[:8]}, missing {missing[:8]}"
        )
    return out


def read_config(folder: Path, model_type: str) -> dict:
    """Return `folder`'s config.json; ConversionError when it is missing, not JSON, or another kind of folder's."""
    path = folder / "config.json"
    name = "LLaDA-V" if model_type == "llava_llada" else "LLaDA"
    if not path.is_file():
        raise ConversionError(f"{folder}: no config.json; pass the folder of a {name} checkpoint")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ConversionError(f"{path}: not valid JSON ({error}): the file is truncated or damaged") from error
    kind = cfg.get("model_type") if isinstance(cfg, dict) else None
    if kind != model_type and not (kind is None and model_type == "llada" and isinstance(cfg, dict)):
        raise ConversionError(f"{path}: model_type={kind!r} is "
                              f"{MODEL_TYPES.get(kind, f'not a {name} checkpoint (model_type {model_type!r})')}")
    return cfg


def check_destination(src: Path, dst: Path) -> None:
    """Raise ConversionError unless `dst` is a new or empty folder other than `src`: a converter never overwrites a
    checkpoint, nor leaves an earlier conversion's weights beside its own (from_pretrained would load those)."""
    if dst.resolve() == src.resolve():
        raise ConversionError(f"{dst} is the source folder: give a new output folder (the source is never overwritten)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"{dst} is a file: give a new or empty output folder")
    if dst.is_dir() and any(dst.iterdir()):
        held = sorted(p.name for p in dst.iterdir())
        raise ConversionError(f"{dst} is not empty (it holds {', '.join(held[:3])}{', ...' if len(held) > 3 else ''})"
                              ": give a new or empty output folder, or delete this one first")


def weight_files(folder: Path) -> list[Path]:
    """Return the weight files: the index's shards in order, else every model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise ConversionError(f"{index}: not a safetensors index with a weight_map ({error!r})") from error
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ConversionError(f"{index} lists shards that are not in the folder: {missing[:4]}")
        return [folder / n for n in names]
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ConversionError(f"{folder}: no model*.safetensors weights")
    return files


def note_missing_tokenizer(src: Path, dst: Path, name: str) -> None:
    """Print one stderr line: `dst` has no tokenizer, which infer.py and training need."""
    print(f"note: no tokenizer files in {src}: copy {name}'s tokenizer.json etc. into {dst} before infer.py/training",
          file=sys.stderr)


def run_converter(command: Callable[[], int | None]) -> int:
    """Return a converter's exit code: a UserError, or an OSError (a folder that cannot be read or written), is one
    stderr line and exit code 2."""

    def converting() -> int | None:
        try:
            return command()
        except OSError as error:
            raise ConversionError(str(error)) from error

    return report_user_errors(converting)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in tqdm(weight_files(folder), desc="reading shards", unit="shard", file=sys.stderr, leave=False):
        state.update(load_file(str(f)))
    return state


def load_llada(folder: str | Path, dtype: torch.dtype = torch.float32) -> DiffusionLM:
    """Return a DiffusionLM holding the weights of a local LLaDA checkpoint folder."""
    folder = Path(folder)
    config = llada_config(read_config(folder, "llada"), str(folder / "config.json"))
    state = llada_state_dict(_read_state_dict(folder), config.num_hidden_layers)
    with torch.device("meta"):
        model = DiffusionLM(config)
    expected = model.state_dict()
    wrong = [f"{k} is {list(t.shape)}, config.json calls for {list(expected[k].shape)}"
             for k, t in state.items() if t.shape != expected[k].shape]
    if wrong:
        raise ConversionError(f"{folder}: {len(wrong)} weight(s) do not fit config.json (d_model, n_heads, ...): "
                              f"{wrong[:4]}")
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(dtype).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Convert a local LLaDA checkpoint folder to an mmdlm model folder.")
    parser.add_argument("src", help="LLaDA checkpoint folder (config.json + *.safetensors)")
    parser.add_argument("dst", help="new or empty output folder (save_pretrained format)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    return run_converter(lambda: convert(args.src, args.dst, args.dtype))


def convert(src: str | Path, dst: str | Path, dtype: str) -> int:
    """Write the mmdlm model folder `dst` converted from the LLaDA folder `src`; return 0."""
    src, dst = Path(src), Path(dst)
    check_destination(src, dst)
    model = load_llada(src, getattr(torch, dtype))
    model.save_pretrained(dst)
    tokenizer_files = [f for f in src.iterdir()
                       if f.is_file() and (f.name.startswith("tokenizer") or f.name == "special_tokens_map.json")]
    for f in tokenizer_files:  # keep the tokenizer beside the weights
        (dst / f.name).write_bytes(f.read_bytes())
    if not any(f.name.startswith("tokenizer") for f in tokenizer_files):
        note_missing_tokenizer(src, dst, "LLaDA")
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {dst}: {n:,} parameters, {dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

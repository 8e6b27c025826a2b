"""Export to a plain model folder that infer.py loads: config.json, model*.safetensors and the tokenizer.

At the end of a run the weights come from the live engine (ZeRO-3 shards gathered one module
at a time onto rank 0's CPU). On demand, from any complete checkpoint, without GPUs or the
launcher (DeepSpeed's zero_to_fp32 consolidation):

    python -m mmdlm.train.export --run runs/sft [--checkpoint step_0000500] [--out runs/sft/model_500]

LoRA adapters are merged into the base weights (W + alpha/r * B @ A), so the folder is a plain
model either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from mmdlm.config import ConfigError
from mmdlm.errors import report_user_errors
from mmdlm.files import readable
from mmdlm.train.checkpoint import MARKER, complete_checkpoints

SHARD_BYTES = 5 * 2**30  # the usual Hugging Face shard size


def gather_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Return the full state dict on rank 0's CPU (None elsewhere); call it on every rank."""
    if engine.zero_optimization_partition_weights():
        return engine._zero3_consolidated_16bit_state_dict()  # module by module: never the whole model per GPU
    if dist.get_rank() != 0:
        return None
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def merge_lora(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Return `state` with every peft LoRA layer folded into its base weight and peft's key prefixes removed."""
    merged = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        name = key.replace("base_model.model.", "", 1)
        if ".base_layer." in key:
            layer, param = key.split(".base_layer.")
            if param == "weight":
                a = state[f"{layer}.lora_A.default.weight"]  # [r, in]
                b = state[f"{layer}.lora_B.default.weight"]  # [out, r]
                value = (value.float() + scale * (b.float() @ a.float())).to(value.dtype)
            name = name.replace(".base_layer.", ".")
        merged[name] = value
    return merged


def _fsync_folder(folder: Path) -> None:
    for path in folder.iterdir():
        with path.open("rb") as f:
            os.fsync(f.fileno())


def write_model_folder(config, state: dict[str, torch.Tensor], tokenizer, out_dir: Path) -> Path:
    """Write config + safetensors (+ tokenizer) into out_dir, which appears whole or not at all."""
    out_dir = Path(out_dir)
    if config.lm.get("tie_word_embeddings"):
        state.pop("lm.lm_head.weight", None)  # MMDLM.from_pretrained re-ties it; safetensors refuses shared storage
    state = {k: v.contiguous() for k, v in state.items()}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    config.dtype = str(max(dtypes, key=lambda d: torch.finfo(d).bits)).removeprefix("torch.") if dtypes else None
    config.save_pretrained(tmp)
    shards, size = [{}], 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for name, shard in zip(names, shards):
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
        index = {"metadata": {}, "weight_map": {k: n for n, s in zip(names, shards) for k in s}}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    readable(tmp)
    _fsync_folder(tmp)
    old = out_dir.with_name(out_dir.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def export(engine, out_dir: Path, tokenizer, lora_scale: float | None) -> None:
    """Write the engine's model as a plain folder from rank 0; every rank must call it."""
    state = gather_state_dict(engine)
    if dist.get_rank() == 0:
        if lora_scale is not None:
            state = merge_lora(state, lora_scale)
        write_model_folder(engine.module.config, state, tokenizer, out_dir)
    dist.barrier()


def export_checkpoint(run_dir: Path, checkpoint: str | None, out_dir: Path | None) -> Path:
    """Write the model of a complete checkpoint of `run_dir` as a plain folder; return the folder."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from mmdlm.data.tokenizer import load_tokenizer
    from mmdlm.multimodal import MMDLMConfig

    run_dir = Path(run_dir)
    found = complete_checkpoints(run_dir / "checkpoints")
    if checkpoint is not None:
        found = [p for p in found if p.name == checkpoint]
    if not found:
        what = f"checkpoint {checkpoint!r}" if checkpoint else "checkpoint"
        raise ConfigError(f"{run_dir / 'checkpoints'}: no complete {what} (a folder step_* with {MARKER})")
    path = found[-1]
    train_config = json.loads((run_dir / "train_config.json").read_text())
    lora = train_config["lora"]
    state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
    if lora["r"] > 0:
        state = merge_lora(state, lora["alpha"] / lora["r"])
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    out_dir = out_dir or run_dir / f"model_{path.name}"
    return write_model_folder(MMDLMConfig.from_pretrained(path), state, tokenizer, out_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a training checkpoint as a plain model folder.")
    parser.add_argument("--run", required=True, help="the run's output_dir (holds checkpoints/, tokenizer/)")
    parser.add_argument("--checkpoint", help="a step_* folder name; default: the newest complete one")
    parser.add_argument("--out", type=Path, help="default: <run>/model_<checkpoint>")
    args = parser.parse_args(argv)

    def run() -> int:
        print(f"exported {export_checkpoint(Path(args.run), args.checkpoint, args.out)}")
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    raise SystemExit(main())

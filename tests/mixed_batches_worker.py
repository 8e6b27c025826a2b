"""Worker of test_mixed_batches.py, launched on 2 ranks: rank 0 trains on text-only micro-batches only, rank 1 on
micro-batches that mix rows with no image, one image and two images; under ZeRO-2, then ZeRO-3.

    deepspeed --num_gpus 2 tests/mixed_batches_worker.py WORLD_DIR OUT_DIR

For every step, each rank writes its batch loss (the training path, train.py's `loss_of`) and the
same loss with every row computed on its own (one forward per row, the same masks), then trains
on the batch loss. A hang here is the ZeRO-3 failure LLaVA-style trainers meet with text-only data.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from mmdlm.config import load_config
from mmdlm.data.collate import Collator
from mmdlm.data.llava import LlavaDataset
from mmdlm.data.tokenizer import special_ids
from mmdlm.diffusion import masked_diffusion_loss
from mmdlm.train.build import build, deepspeed_config, make_optimizer
from mmdlm.train.config import TrainConfig
from mmdlm.train.train import init_distributed, loss_of

ROOT = Path(__file__).resolve().parents[1]
STEPS, ROWS = 3, 4
# A ViT tower (LayerNorm): a BatchNorm tower in training normalises over the batch, so its rows are not
# independent and "the batch's loss = its rows' losses" could not hold exactly.
SMALL = [f"model.{field}" for field in (
    "lm.hidden_size=32", "lm.intermediate_size=64", "lm.num_hidden_layers=2", "lm.num_attention_heads=2",
    "lm.num_key_value_heads=1", "vision.model=vit_tiny_patch16_224", "vision.image_size=32",
    "vision.overrides={depth: 2, embed_dim: 48, num_heads: 2}", "vision.feature_layer=-2", "projector.pool=1")]


def text_only(sample: dict) -> dict:
    turns = [{**t, "value": t["value"].replace("<image>\n", "").replace("<image>", "")}
             for t in sample["conversations"]]
    return {"id": sample["id"] + "-text", "images": [], "conversations": turns}


def two_images(a: dict, b: dict) -> dict:
    turns = [dict(t) for t in a["conversations"]]
    turns[0]["value"] = "<image>\n" + turns[0]["value"]  # the first already holds one placeholder
    return {"id": a["id"] + "-two", "images": a["images"] + b["images"], "conversations": turns}


def micro_batches(data: LlavaDataset, rank: int) -> list[list[dict]]:
    """Rank 0: text-only rows only. Rank 1: rows with one image, none, two, one."""
    batches = []
    for step in range(STEPS):
        first = (rank * STEPS + step) * (ROWS + 1)
        s = [data[first + i] for i in range(ROWS + 1)]
        batches.append([text_only(x) for x in s[:ROWS]] if rank == 0 else
                       [s[0], text_only(s[1]), two_images(s[2], s[3]), s[4]])
    return batches


def rows_one_by_one(engine, batch: dict, cfg: TrainConfig, mask_id: int, seed: int) -> torch.Tensor:
    """Return the masked-diffusion loss of `batch` with the masks of generator `seed`, one forward per row."""
    ids, attention, pixels = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    per_row = (ids == engine.module.config.image_token_id).sum(1) // engine.module.num_image_tokens  # images per row
    starts = [0, *per_row.cumsum(0).tolist()]

    prefix = batch["prompt_length"] if engine.module.config.prefix_dlm else None  # demo_sft: prefix-DLM

    def logits_fn(noisy: torch.Tensor) -> torch.Tensor:
        rows = [engine(noisy[r : r + 1], pixels[starts[r] : starts[r + 1]], attention_mask=attention[r : r + 1],
                       prefix_len=None if prefix is None else prefix[r : r + 1])
                for r in range(noisy.shape[0])]
        return torch.cat(rows)

    generator = torch.Generator().manual_seed(seed)
    return masked_diffusion_loss(logits_fn, ids, batch["maskable"], mask_id, eps=cfg.mask_eps,
                                 complementary=cfg.complementary_masking, generator=generator,
                                 schedule=cfg.mask_schedule).loss


def run(stage: int, world_dir: Path, out: Path) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    ds = out / f"zero{stage}.json"
    cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", [
        f"data.tokenizer={world_dir / 'tokenizer'}", f"data.json=[{world_dir / 'train' / 'qa.json'}]", "init_from=null",
        "init_vision_from=null",
        f"deepspeed={ds}", f"micro_batch_size={ROWS}", "trainable=[vision, projector, lm]",
        "tower_cache_gb=0",
        "ar_warmup_steps=0", "first_token_weight=0",  # every step masked diffusion alone, compared row by row
        "data.fractions=[]", *SMALL])
    if rank == 0:
        config = json.loads((ROOT / f"configs/deepspeed/zero{stage}.json").read_text())
        if stage == 3:  # partition every tensor, the tiny ones too: the tower's gathers are real collectives
            config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        ds.write_text(json.dumps(config))
    dist.barrier()
    torch.manual_seed(cfg.seed)
    tokenizer, model = build(cfg)
    mask_id = special_ids(tokenizer).mask
    optimizer, scheduler = make_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(cfg, world))
    collator = Collator(tokenizer, model.image_transform(), model.num_image_tokens, cfg.data.max_length)
    data = LlavaDataset(cfg.data.json[0])
    records = []
    for step, samples in enumerate(micro_batches(data, rank)):
        batch = collator(samples)
        seed = 1000 * stage + 10 * step + rank
        with torch.no_grad():
            reference = rows_one_by_one(engine, batch, cfg, mask_id, seed)
        loss, _, _ = loss_of(engine, batch, cfg, mask_id, torch.Generator().manual_seed(seed))
        engine.backward(loss)
        engine.step()
        records.append({"stage": stage, "step": step, "rank": rank, "images": batch["pixel_values"].shape[0],
                        "rows": batch["input_ids"].shape[0], "loss": loss.item(), "one_by_one": reference.item(),
                        "grad_norm": float(engine.get_global_grad_norm())})
    engine.destroy()
    return records


def main() -> None:
    world_dir, out = (Path(a) for a in sys.argv[1:] if not a.startswith("--local_rank"))  # the launcher adds it
    init_distributed()
    records = run(2, world_dir, out) + run(3, world_dir, out)
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(records, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Tower pretraining on per-cell labels: the demo's first stage, what SigLIP's pretraining is to the real model.

    mmdlm-pretrain-tower --config configs/train/demo_tower.yaml [--set key=value ...]

A tower trained from scratch through the LM's gradient alone does not learn to tell a 9 px
triangle from a circle in the demo's budget (README, The demo). Real VLMs start from a pretrained
tower. The demo world can label its own images: each templated caption names every object's size,
colour and shape and its cell of the 3x3 grid (`data/scenes.py: cell_labels`), so each cell gets
one class per attribute (class 0 = empty), and a linear head per attribute reads them from the
tower's features averaged over that cell. These labels exist only in the demo world; the general
recipe for your own image-caption pairs is captioning through a small decoder,
`configs/train/demo_tower_caption.yaml` (README, The demo).

Output: `<output_dir>/model/vision.safetensors` (the tower's `vision.*` tensors), which a training
config loads with `init_vision_from`, and `<output_dir>/eval.json` (held-out accuracy per attribute).
`probe: true` with `init_vision_from: DIR` trains only the heads on DIR's frozen tower: a linear
probe of how well any tower (e.g. one pretrained by captioning) sees the cells.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mmdlm.config import ConfigError, load_config
from mmdlm.data.llava import LlavaDataset
from mmdlm.data.scenes import CELL_ATTRIBUTES, GRID, cell_labels
from mmdlm.encoders.processor import image_transform
from mmdlm.encoders.tower import VisionTower
from mmdlm.errors import report_user_errors
from mmdlm.files import readable
from mmdlm.multimodal import ModelConfig
from mmdlm.train.build import load_vision


@dataclass
class TowerConfig:
    model: ModelConfig | None = None  # the model (a configs/model/*.yaml) whose `vision` part is pretrained here
    train: list[str] = field(default_factory=lambda: ["runs/demo/world/train/captions.json"])
    val: str | None = "runs/demo/world/val/captions.json"
    batch_size: int = 64
    max_steps: int = 250
    lr: float = 3e-3
    warmup_steps: int = 10
    seed: int = 0
    output_dir: str = "runs/demo/tower"
    # Start from another run's tower (a model folder: init_vision_from); with probe: true it stays
    # frozen and only the linear heads train, which measures how well that tower already sees.
    init_vision_from: str | None = None
    probe: bool = False

    def validate(self) -> None:
        if self.batch_size < 1 or self.max_steps < 1:
            raise ConfigError("batch_size and max_steps must be >= 1")
        if self.model is None:
            raise ConfigError("no model: set model to a configs/model/*.yaml, e.g. model: configs/model/tiny.yaml")


class CellHeads(nn.Module):
    """Tower features [N, T, C] of a square patch grid -> logits per attribute [N, GRID*GRID, classes]."""

    def __init__(self, width: int):
        super().__init__()
        classes = {name: len(values) + 1 for name, values in CELL_ATTRIBUTES.items()}  # + the empty cell
        self.heads = nn.ModuleDict({name: nn.Linear(width, n) for name, n in classes.items()})

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        N, T, C = features.shape
        side = math.isqrt(T)
        cells = F.adaptive_avg_pool2d(features.transpose(1, 2).reshape(N, C, side, side), GRID)  # [N, C, 3, 3]
        cells = cells.flatten(2).transpose(1, 2)  # [N, 9, C] in raster order, as cell_labels numbers them
        return {name: head(cells) for name, head in self.heads.items()}


def caption_of(sample: dict) -> str:
    return next(turn["value"] for turn in sample["conversations"] if turn["from"] in ("gpt", "assistant"))


class Batches:
    """Collate: samples -> (pixel_values [N, 3, H, W], labels [N, 9, 3])."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, samples: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels = torch.stack([self.transform(s["images"][0]) for s in samples])
        return pixels, torch.tensor([cell_labels(caption_of(s)) for s in samples])


def cell_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Return the summed cross-entropy of the attributes over all cells."""
    return sum(F.cross_entropy(out.flatten(0, 1), labels[..., k].flatten()) for k, out in enumerate(logits.values()))


@torch.no_grad()
def evaluate(tower: VisionTower, heads: CellHeads, loader: DataLoader) -> dict[str, float]:
    """Return held-out accuracy per attribute on occupied cells, and of telling occupied from empty."""
    mode = tower.training
    tower.eval()
    hits, occupied_hits, cells, total = torch.zeros(len(CELL_ATTRIBUTES)), 0, 0, 0
    for pixels, labels in loader:
        logits = heads(tower(pixels))
        occupied = labels[..., 0] > 0
        for k, out in enumerate(logits.values()):
            hits[k] += (out.argmax(-1) == labels[..., k])[occupied].sum()
        occupied_hits += ((logits["colour"].argmax(-1) > 0) == occupied).sum().item()
        cells, total = cells + int(occupied.sum()), total + occupied.numel()
    tower.train(mode)
    scores = {name: round(100 * float(h) / max(1, cells), 2) for name, h in zip(CELL_ATTRIBUTES, hits)}
    return scores | {"occupied": round(100 * occupied_hits / max(1, total), 2)}


def pretrain(cfg: TowerConfig) -> Path:
    """Train the tower and its cell heads; return the folder holding vision.safetensors."""
    torch.manual_seed(cfg.seed)
    tower = VisionTower(cfg.model.vision)
    if tower.cfg.frozen and not cfg.probe:
        raise ConfigError("model.vision.frozen is true; a tower that pretrains must train (or set probe)")
    if cfg.init_vision_from:
        load_vision(tower, Path(cfg.init_vision_from))
    heads = CellHeads(tower.hidden_size)
    batches = Batches(image_transform(tower))
    train = torch.utils.data.ConcatDataset([LlavaDataset(p) for p in cfg.train])
    loader = DataLoader(train, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=batches,
                        generator=torch.Generator().manual_seed(cfg.seed))
    params = [*heads.parameters()] + ([] if cfg.probe else [*tower.parameters()])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) * 0.5 * (
        1 + math.cos(math.pi * min(1.0, s / cfg.max_steps))))
    tower.train(not cfg.probe)  # a probed tower keeps its BatchNorm statistics
    step, bar = 0, tqdm(total=cfg.max_steps, desc="probe" if cfg.probe else "tower", dynamic_ncols=True)
    while step < cfg.max_steps:
        for pixels, labels in loader:
            with torch.set_grad_enabled(not cfg.probe):
                features = tower(pixels)
            loss = cell_loss(heads(features), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if step == cfg.max_steps:
                break
    bar.close()
    out = Path(cfg.output_dir)
    (out / "model").mkdir(parents=True, exist_ok=True)
    if not cfg.probe:  # a probe only measures
        save_file({f"vision.{k}": v.detach().contiguous() for k, v in tower.state_dict().items()},
                  str(out / "model" / "vision.safetensors"))
        readable(out / "model")
    if cfg.val:
        scores = evaluate(tower, heads, DataLoader(LlavaDataset(cfg.val), batch_size=256, collate_fn=batches))
        (out / "eval.json").write_text(json.dumps(scores, indent=1))
        print(f"held-out cell accuracy (%): {scores}", flush=True)
    return out / "model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pretrain the vision tower on the demo world's per-cell labels.")
    parser.add_argument("--config", required=True, help="configs/train/demo_tower.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    def run() -> int:
        cfg = load_config(TowerConfig, args.config, args.overrides)
        cfg.validate()
        print(f"wrote {pretrain(cfg)}", flush=True)
        return 0

    return report_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())

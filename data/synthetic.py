"""The demo world on disk: train / val / test splits of drawn scenes as LLaVA JSON, shards and a tokenizer.

    OUT/{train,val,test}/images/*.png   the scenes
    OUT/{split}/qa.json                 one question per entry, the image after the question
    OUT/{split}/captions.json           "Describe the image." -> caption, same images
    OUT/{split}/shards/docs-000000.tar  interleaved documents of 2-3 scenes with text between them
    OUT/tokenizer/                      byte-level BPE trained on all the text above
    OUT/world.json                      the options it was drawn with

Each split draws from its own seed derived from (seed, split name), so splits never share a scene.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from mmdlm.data.scenes import COLOURS, QUESTION_TYPES, SHAPES, QuestionSampler, build_scene, caption, draw_scene
from mmdlm.data.scenes import question_text as make_question
from mmdlm.data.tokenizer import train_demo_tokenizer

SPLITS = ("train", "val", "test")
CAPTION_PROMPT = "Describe the image."
ORDINALS = ("first", "second", "third")


@dataclass
class WorldOptions:
    image_size: int = 64
    noise: float = 0.03  # std of the pixel noise, as a fraction of 255
    occlusion: float = 0.0  # probability that a shape may overlap its neighbour
    vocab_size: int = 512
    docs_per_shard: int = 100


def split_seed(seed: int, split: str) -> int:
    """Return the seed of one split: a hash of (seed, split), stable across Python runs."""
    return random.Random(f"mmdlm-world-{seed}-{split}").getrandbits(63)


def _conversation(question: str, answer: str) -> list[dict]:
    # The image after the question (LLaVA's data has both orders): in a causal pass, as in the
    # autoregressive warm-up, the image's tokens then see the question. Measured on the demo: 94.6%
    # after 1,200 warm-up steps with the question first, 67% with the image first (README, The demo).
    return [{"from": "human", "value": question + "\n<image>"}, {"from": "gpt", "value": answer}]


def _document(key: str, scenes: list[tuple[Path, list]]) -> dict:
    """Return an interleaved document: each image followed by its description, then a comparison."""
    segments = []
    for k, (path, things) in enumerate(scenes):
        segments.append({"image": path})
        segments.append({"text": f"in the {ORDINALS[k]} picture there is {caption(things)}"})
    counts = [f"the {ORDINALS[k]} has {len(t)} object{'s' if len(t) > 1 else ''}" for k, (_, t) in enumerate(scenes)]
    segments.append({"text": ", ".join(counts[:-1]) + " and " + counts[-1] + "."})
    return {"id": key, "segments": segments}


def synthesize_split(split_dir: Path, split: str, n: int, seed: int, options: WorldOptions) -> list[str]:
    """Write one split and return all of its text (for the tokenizer)."""
    rng = random.Random(split_seed(seed, split))
    sampler = QuestionSampler(rng)
    (split_dir / "images").mkdir(parents=True, exist_ok=True)
    # A rerun into the same folder must not leave a bigger earlier run's shards to be read with the new ones.
    for stale in [*(split_dir / "images").glob("*.png"), *(split_dir / "shards").glob("docs-*.tar")]:
        stale.unlink()
    qa, captions, scenes, texts = [], [], [], []
    for index in range(n):
        kind, key, answer = sampler.draw()
        things = build_scene(rng, kind, key, answer)
        image = draw_scene(things, rng, options.image_size, options.noise, options.occlusion)
        relative = f"images/{index:06d}.png"
        image.save(split_dir / relative)
        question, described = make_question(kind, key), caption(things)
        qa.append({"id": f"{split}-qa-{index:06d}", "image": relative, "question_type": kind,
                   "conversations": _conversation(question, answer)})
        captions.append({"id": f"{split}-cap-{index:06d}", "image": relative,
                         "conversations": _conversation(CAPTION_PROMPT, described)})
        scenes.append((split_dir / relative, things))
        texts += [question, answer, described]
    (split_dir / "qa.json").write_text(json.dumps(qa, indent=1))
    (split_dir / "captions.json").write_text(json.dumps(captions, indent=1))
    docs, start = [], 0
    while start < len(scenes):
        size = min(rng.randint(2, 3), len(scenes) - start)
        docs.append(_document(f"{split}-doc-{len(docs):06d}", scenes[start : start + size]))
        start += size
    texts += [seg["text"] for doc in docs for seg in doc["segments"] if "text" in seg]
    if docs:
        from mmdlm.data.shards import write_interleaved_shards  # webdataset: not needed by infer.py (CAPTION_PROMPT)

        (split_dir / "shards").mkdir(exist_ok=True)
        write_interleaved_shards(docs, str(split_dir / "shards" / "docs-%06d.tar"), maxcount=options.docs_per_shard)
    return texts


def synthesize(
    out_dir: str | Path,
    n_train: int,
    n_val: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 64,
    options: WorldOptions | None = None,
) -> Path:
    """Return `out_dir` after writing the three splits, the shards and the demo tokenizer into it."""
    options = replace(options or WorldOptions(), image_size=image_size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(zip(SPLITS, (n_train, n_val, n_test)))
    texts = ["user", "assistant", "system", CAPTION_PROMPT]
    for split, n in sizes.items():
        texts += synthesize_split(out / split, split, n, seed, options)
    train_demo_tokenizer(texts, out / "tokenizer", vocab_size=options.vocab_size)
    world = {"seed": seed, "splits": sizes, "options": asdict(options), "colours": list(COLOURS),
             "shapes": list(SHAPES), "question_types": list(QUESTION_TYPES)}
    (out / "world.json").write_text(json.dumps(world, indent=1))
    return out

"""Answer questions about images, or describe them, with a trained model folder.

    python infer/infer.py --model DIR --image a.jpg --question "What colour is the circle?"
    python infer/infer.py --model DIR --image a.jpg --caption --show-steps steps.gif
    python infer/infer.py --model DIR --input qa.json --output answers.jsonl [--resume]  # --resume: after a kill
    python infer/infer.py --model DIR --image a.jpg --question "..." --template "It is <mask><mask>."
    python infer/infer.py --model DIR --input qa.json --static --quantize int8   # fixed shapes, int8 weights

Bad input (a missing, empty, non-image, truncated or decompression-bomb sized image, an empty
question, a prompt longer than the model's context, a model folder without weights or of another
kind of model, a device this machine lacks, a sampling flag out of range) ends with one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from mmdlm.autoregressive import generate_autoregressive
from mmdlm.data.errors import DataError
from mmdlm.data.llava import entry_id, entry_images, entry_name, read_json_list, repeated_id
from mmdlm.data.synthetic import CAPTION_PROMPT
from mmdlm.data.template import ChatEncoder, expand_image_runs, place_image_tokens, turn_role, with_system_turn
from mmdlm.data.tokenizer import load_tokenizer, special_ids
from mmdlm.errors import UserError, report_user_errors
from mmdlm.infer.quantize import QUANTIZE, quantize_lm
from mmdlm.sampling import SamplerConfig, generate

# Short answers fit one block; captions run in two semi-autoregressive blocks. Threshold decoding
# with early stop is the fast default; --threshold 0 --no-early-stop gives LLaDA's plain sampler.
TASK_DEFAULTS = {
    "vqa": dict(gen_length=16, block_length=16, steps=16, threshold=0.9),
    "caption": dict(gen_length=64, block_length=32, steps=64, threshold=0.9),
}


class InferError(UserError):
    """A request that cannot be answered; the message names the file or option and the fix."""


def load_image(path: str | Path, where: str = "", max_pixels: int | None = None) -> Image.Image:
    """Return the image at `path` as RGB, or InferError saying what is wrong with the file."""
    path = Path(path)
    if path.is_dir():
        raise InferError(f"{where}{path} is a folder: give an image file")
    if not path.is_file():
        raise InferError(f"{where}image not found: {path}")
    if path.stat().st_size == 0:
        raise InferError(f"{where}image file is empty: {path}")
    return read_image(path, f"{where}{path}", max_pixels)


def read_image(source, name: str, max_pixels: int | None = None) -> Image.Image:
    """Return the image in `source` (a path or a file object) as RGB, or InferError naming it as `name`.

    `max_pixels` refuses larger images before they are decoded. Pillow refuses images over twice its
    MAX_IMAGE_PIXELS (~179 million) as it opens them, before their size can be read: those get the same
    message, naming the smaller of the two limits.
    """
    try:
        with Image.open(source) as image:
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise over_the_limit(name, f"{image.width}x{image.height}", max_pixels)
            image.load()  # decodes now, so a truncated file fails here and not in the model
            return image.convert("RGB")
    except InferError:
        raise  # a ValueError too: not to be read as a corrupt file below
    except Image.DecompressionBombError as error:
        pillow_limit = 2 * Image.MAX_IMAGE_PIXELS
        pixels = re.search(r"\((\d+) pixels\)", str(error))  # Pillow says "Image size (N pixels) exceeds ..."
        raise over_the_limit(name, pixels[1] if pixels else f"more than {pillow_limit}",
                             min(max_pixels or pillow_limit, pillow_limit)) from None
    except Image.UnidentifiedImageError as error:
        raise InferError(f"{name} is not an image Pillow can read (PNG, JPEG, ...)") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise InferError(f"{name} is truncated or corrupt ({error})") from error


def over_the_limit(name: str, pixels: str, limit: int) -> InferError:
    """Return the error of an image of `pixels` ("WxH" or a count) over `limit` pixels."""
    return InferError(f"{name} is {pixels} pixels, over the limit of {limit}: downscale it first")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str | torch.device) -> None:
    """Raise InferError unless `device` names a device torch can use on this machine (cpu, cuda, cuda:1, mps)."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError):
        raise InferError(f"--device {device}: not a device (cpu, cuda, cuda:1, mps, ...)") from None
    if where.type == "cuda":  # counted, not touched: serve's parent process must not take a CUDA context
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            raise InferError(f"--device {device}: not available, torch sees no CUDA GPU on this machine: "
                             "use --device cpu")
        if (where.index or 0) >= count:
            raise InferError(f"--device {device}: not available, torch sees {count} CUDA GPU(s) here, numbered from "
                             "cuda:0")
        return
    try:
        torch.empty(0, device=where)  # every other kind (mps, xpu, ...): whether torch can use it here
    except (RuntimeError, AssertionError) as error:  # AssertionError: "Torch not compiled with ... enabled"
        raise InferError(f"--device {device}: not available on this machine ({str(error).splitlines()[0]})") from None


def load_model(path: str | Path, device: str = "cpu", dtype: str | None = None, weights: bool = True):
    """Return (MMDLM in eval mode on `device`, tokenizer) from a model folder written by training.

    `weights=False` builds the model on the meta device without reading its weights: what turning
    requests into prompts needs (its config, tokenizer and image processing), in no memory.

    `dtype` (a DTYPES name) casts the weights; None keeps the checkpoint's. The tower's weights are
    stored channels-last, so that its convolutions (and a CNN's pooling) take oneDNN's fast kernels
    on CPU: the demo's ResNet runs 1.4-1.6x faster in fp32 and 2.6x in bf16, at one row or 32. The LM's
    q/k/v and gate/up projections are fused (DiffusionLM.fuse_projections): the model is for inference.
    """
    if dtype is not None and dtype not in DTYPES:
        raise InferError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    folder = Path(path)
    if not folder.is_dir():
        raise InferError(f"model folder not found: {folder}")
    if not any(folder.glob("model*.safetensors")):
        raise InferError(f"{folder} holds no weights (model*.safetensors): pass the folder that training exported")
    if not (folder / "config.json").is_file():
        raise InferError(f"{folder} has weights but no config.json: pass the folder that training exported")
    from safetensors import SafetensorError
    from transformers.utils import logging as hf_logging

    from mmdlm.multimodal import MMDLM, check_model_type

    check_model_type(folder)  # a LLaDA-V checkpoint or an LM alone: say what it is, before its tokenizer is read
    check_device(device)

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a command line speaks in its own lines, not transformers' notices
    try:
        # AutoTokenizer reads the folder's config.json too, and warns that it is not a tokenizer's
        tokenizer = load_tokenizer(folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder)
        if not weights:
            with torch.device("meta"):
                return MMDLM(MMDLM.config_class.from_pretrained(folder)).eval(), tokenizer
        model = MMDLM.from_pretrained(folder)
    except UserError:
        raise  # the tokenizer's or config's own message already names the folder and the fix
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise InferError(f"{folder}: cannot load the model ({str(error).splitlines()[0]})") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    model = model.to(device, DTYPES.get(dtype)).eval()
    model.vision.to(memory_format=torch.channels_last)
    model.lm.fuse_projections()  # 4 matmuls per block, not 7
    return model, tokenizer


def llava_requests(json_path: str | Path, image_folder: str | Path | None) -> list[dict]:
    """Return one request per entry of a LLaVA JSON file: its images, the turns up to the last question and the
    reference answer (the last gpt turn, None when the file holds only questions)."""
    json_path = Path(json_path)
    folder = Path(image_folder) if image_folder is not None else json_path.parent
    requests, seen = [], {}
    for index, entry in enumerate(read_json_list(json_path)):
        name = entry_name(json_path, entry, index)
        repeated = repeated_id(seen, entry, index)
        if repeated:
            raise DataError(f"{name}: {repeated}")
        turns = entry.get("conversations") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or not all(isinstance(t, dict) and isinstance(t.get("value"), str)
                                                  for t in turns):
            raise DataError(f"{name}: 'conversations' must be a list of {{'from', 'value'}} turns")
        try:
            paths = entry_images(entry)
            turns = place_image_tokens(turns, len(paths))
            reference = None
            while turns and turn_role(turns[-1]) == "assistant":  # the answer to score, not part of the prompt
                reference, turns = reference or turns[-1]["value"], turns[:-1]
        except DataError as error:
            raise DataError(f"{name}: {error}") from error
        if not turns or not turns[-1]["value"].replace("<image>", "").strip():
            raise DataError(f"{name}: no question to answer (the last human turn is missing or empty)")
        missing = [p for p in paths if not (folder / p).is_file()]
        if missing:  # checked now, before the model loads; decoding waits for the entry's batch
            raise DataError(f"{name}: image not found: {folder / missing[0]} (set --image-folder?)")
        requests.append({"id": entry_id(entry, index), "images": [folder / p for p in paths], "turns": turns,
                         "reference": reference})
    return requests


@dataclass
class Answer:
    text: str  # the answer up to its first stop token, special tokens removed
    pieces: list[str]  # each canvas position's token as text
    commit_step: list[int]  # the forward that committed each position (0 given, -1 dropped)
    forward_passes: int
    tokens_per_forward: float
    length: int = 0  # answer tokens before the first stop token (the canvas length if none was committed)


class Answerer:
    """Turns questions and images into the sampler's prefix embeddings, and its tokens back into text."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer
        self.chat, self.special = ChatEncoder(tokenizer), special_ids(tokenizer)
        self.transform = model.image_transform()
        # What the model's makers prompt and sample with (a converted LLaDA-V: its system turn, its suppressed ids)
        self.system_prompt = getattr(model.config, "system_prompt", None)
        self.image_position = getattr(model.config, "image_position", "before")
        self.sampler_defaults = dict(getattr(model.config, "sampler", None) or {})
        # Trained with prefix-DLM attention (LaViDa): then the prefix cache is exact and on by default.
        self.prefix_dlm = bool(getattr(model.config, "prefix_dlm", False))
        self.context = model.lm.config.max_position_embeddings
        self.pad_to = 1  # prompts are left-padded to a multiple of this many tokens (prefix)
        self.autoregressive = model.lm.config.attention == "causal"
        self.device = next(model.parameters()).device

    def prompt_ids(self, turns: list[dict], images: list[Image.Image]) -> list[int]:
        """Return the chat-templated prompt (after the model's system turn, if any) with each image expanded to
        its run of placeholder ids."""
        turns = place_image_tokens(turns, len(images), self.image_position)
        turns = with_system_turn(turns, self.system_prompt)
        runs = [self.model.image_tokens(image.size) for image in images]
        return expand_image_runs(self.chat.encode_prompt(turns), self.special.image, runs)

    @torch.no_grad()
    def prefix(self, prompts: list[list[int]], images: list[list[Image.Image]]):
        """Return (prefix embeddings [B, P, D], attention mask [B, P]) with prompts left-padded to one length.

        That length is a multiple of `pad_to` (1 by default): with static shapes on a GPU, batches whose
        longest prompts differ a little then share one CUDA graph. Padding never changes a row's answer
        (masked keys, unpadded positions), but it adds a key mask to a batch that had none."""
        width = -(-max(len(p) for p in prompts) // self.pad_to) * self.pad_to
        ids = torch.full((len(prompts), width), self.special.pad, dtype=torch.long)  # [B, P]
        mask = torch.zeros(len(prompts), width, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = True
        flat = [self.transform(image) for row in images for image in row]  # [3, H, W] or, any resolution, [V, 3, H, W]
        pixels = (torch.cat if flat and flat[0].dim() == 4 else torch.stack)(flat).to(self.device) if flat else None
        sizes = torch.tensor([image.size for row in images for image in row]).reshape(-1, 2)  # [N_images, 2] (w, h)
        return self.model.embed(ids.to(self.device), pixels, image_sizes=sizes), mask.to(self.device)

    def prefix_rows(self, prompts: list[list[int]], images: list[list[Image.Image]]) -> list[torch.Tensor]:
        """Return each prompt's prefix embeddings [p, D], unpadded; the images go through the tower in one call."""
        embeds, _ = self.prefix(prompts, images)
        return [embeds[row, embeds.shape[1] - len(prompt) :] for row, prompt in enumerate(prompts)]

    def check_length(self, prompt: list[int], gen_length: int, option: str = "--gen-length") -> None:
        """Raise InferError when the prompt and the answer canvas do not fit the model's context."""
        if len(prompt) + gen_length > self.context:
            raise InferError(
                f"the prompt is {len(prompt)} tokens (images included) + {gen_length} to generate, over the "
                f"model's context of {self.context}: shorten the question or lower {option}"
            )

    def answer(self, turns: list[list[dict]], images: list[list[Image.Image]], config: SamplerConfig, canvas=None):
        """Return one Answer per request (turns and images of each)."""
        prompts = [self.prompt_ids(t, i) for t, i in zip(turns, images)]
        self.check_length(max(prompts, key=len), config.gen_length)
        return self.answer_prompts(prompts, images, config, canvas)

    def answer_prompts(self, prompts: list[list[int]], images: list[list[Image.Image]], config: SamplerConfig,
                       canvas=None, on_forward=None) -> list[Answer]:
        """Return one Answer per prompt (from prompt_ids); `on_forward` goes to the sampler (diffusion only)."""
        embeds, mask = self.prefix(prompts, images)
        if self.autoregressive:  # the AR twin: left to right, one token per forward
            if canvas is not None:
                raise InferError("--template needs a diffusion model: the autoregressive twin cannot fill holes")
            out = generate_autoregressive(self.model.lm, prefix_embeds=embeds, attention_mask=mask, config=config)
        else:
            out = generate(self.model.lm, prefix_embeds=embeds, attention_mask=mask, mask_id=self.special.mask,
                           config=config, canvas=None if canvas is None else canvas.to(self.device),
                           on_forward=on_forward)
        return [self.make_answer(out.tokens[row].tolist(), out.commit_step[row].tolist(), int(out.lengths[row]),
                                 int(out.row_forwards[row])) for row in range(len(prompts))]

    def make_answer(self, tokens: list[int], steps: list[int], length: int, forwards: int) -> Answer:
        """Return the Answer of one row: its canvas tokens, commit steps, answer length and forwards taken."""
        pieces = [self.tokenizer.decode([t]) for t in tokens]
        committed = sum(s > 0 for s in steps)
        return Answer(self.decode(tokens[:length]), pieces, steps, forwards, committed / max(forwards, 1), length)

    def decode(self, answer: list[int]) -> str:
        """Return the text of an answer's tokens (up to its stop token), special tokens removed."""
        return self.tokenizer.decode(answer, skip_special_tokens=True).strip()

    def template_canvas(self, template: str) -> torch.Tensor:
        """Return the canvas [1, G] of a template: its text's ids with a mask id per '<mask>', then end of turn."""
        pieces = template.split("<mask>")
        if len(pieces) == 1:
            raise InferError(f"--template {template!r} has no <mask> hole to fill")
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k:
                ids.append(self.special.mask)
            ids += self.chat.text_ids(piece)
        return torch.tensor([ids + [self.special.eot]])

    def template_config(self, config: SamplerConfig, canvas: torch.Tensor) -> SamplerConfig:
        """Return `config` for filling the holes of a template `canvas` [1, G]: one block, a step per hole, and
        stop tokens never chosen in a hole.

        A stop token in a hole would end the answer there, the template's text after it lost; suppressed
        (as LLaDA-V suppresses its own ids), every hole gets a token and the template's fixed end of turn
        ends the answer after all of its text. Early stop and the masked tail, which watch for the answer's
        end, have nothing to do: the template gives it."""
        stops = tuple(i for i in (config.eos_id, *config.stop_ids) if i is not None)
        return replace(config, gen_length=canvas.shape[1], block_length=canvas.shape[1],
                       steps=int((canvas == self.special.mask).sum()), early_stop=False, mask_tail=False,
                       suppress_ids=tuple(dict.fromkeys((*config.suppress_ids, *stops))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model folder written by training (weights, config, tokenizer)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--question", help="a question about --image (without --image: a text-only question)")
    what.add_argument("--caption", action="store_true", help="describe --image")
    what.add_argument("--input", help="LLaVA JSON file: answer the last human turn of every entry")
    p.add_argument("--image", help="image file for --question / --caption")
    p.add_argument("--image-folder", help="folder of the --input entries' image paths (default: the file's folder)")
    p.add_argument("--output", help="JSON-lines answers for --input (default: print them)")
    p.add_argument("--resume", action="store_true",
                   help="with --output: keep the answers already there and answer only the other entries "
                        "(after a crash or a kill; every batch's answers are flushed as it finishes)")
    p.add_argument("--task", choices=["vqa", "caption"], help="which defaults to use (default: from the request)")
    p.add_argument("--template", help="answer template: fixed text with <mask> holes to fill, e.g. 'It is <mask>.'")
    s = p.add_argument_group("sampling (defaults per task: vqa 16/16/threshold 0.9, caption 64/32/threshold 0.9)")
    s.add_argument("--gen-length", type=int, help="answer canvas length in tokens")
    s.add_argument("--block-length", type=int, help="semi-autoregressive block length (divides --gen-length)")
    s.add_argument("--steps", type=int, help="fixed schedule: steps over the whole answer (used with --threshold 0)")
    s.add_argument("--threshold", type=float, help="commit every token with confidence >= this (0: fixed steps)")
    s.add_argument("--factor", type=float, help="Fast-dLLM factor rule instead of the threshold")
    s.add_argument("--confidence", choices=["probability", "margin", "entropy"], default="probability")
    s.add_argument("--cache", choices=["auto", "none", "prefix", "block"], default="auto",
                   help="auto: prefix for models trained with prefix-DLM attention, none otherwise; prefix: "
                        "exact under prefix-DLM attention (which it switches on); block: Fast-dLLM DualCache, "
                        "approximate")
    s.add_argument("--no-early-stop", action="store_true", help="decode the whole canvas even after the answer ends")
    s.add_argument("--static", action="store_true",
                   help="static shapes: no host sync per step, CUDA graphs on a GPU (the same answers as "
                        "without, up to the compiled kernels' rounding on a GPU)")
    s.add_argument("--autotune", action="store_true",
                   help="with --static on a GPU: compile the step with torch.compile's max-autotune (Triton matmuls "
                        "tuned per shape, which convert int8 weights as they load them) instead of cuBLAS; minutes "
                        "of tuning per shape")
    s.add_argument("--pad-to", type=int, default=1, metavar="N",
                   help="left-pad each batch's prompts to a multiple of N tokens: with --static on a GPU, batches "
                        "of nearby lengths then share one CUDA graph instead of recording their own (same answers)")
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: the checkpoint's; bfloat16 "
                   "on GPUs and on CPUs with AMX)")
    p.add_argument("--quantize", choices=QUANTIZE, default="none",
                   help="the LM's Linear weights: int8 weight-only (torchao; CPU, GPU) or fp8 (GPU, compute 8.9+)")
    p.add_argument("--show-steps", nargs="?", const="-", metavar="PNG|GIF",
                   help="print the order in which tokens were unmasked, or save it as .png / .gif")
    return p


def sampler_config(args: argparse.Namespace, task: str, answerer: Answerer) -> SamplerConfig:
    """Return the sampler options: the task's defaults, overridden by the flags given."""
    check_sampling_flags(args)
    options = dict(TASK_DEFAULTS[task])
    for name in ("gen_length", "block_length", "steps", "threshold"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.factor is not None:
        options.update(factor=args.factor, threshold=None)
    if not options["threshold"]:
        options["threshold"] = None
    if args.gen_length is not None and args.block_length is None:
        options["block_length"] = min(options["block_length"], args.gen_length)
    if args.gen_length is not None and args.steps is None:
        options["steps"] = args.gen_length
    cache = ("prefix" if answerer.prefix_dlm else "none") if args.cache == "auto" else args.cache
    special = answerer.special
    options.update(suppress_ids=tuple(answerer.sampler_defaults.get("suppress_ids", ())),
                   float64_confidence=bool(answerer.sampler_defaults.get("float64_confidence", False)))
    config = SamplerConfig(**options, confidence=args.confidence, temperature=args.temperature,
                           prefix_dlm=answerer.prefix_dlm, early_stop=not args.no_early_stop, eos_id=special.eos,
                           mask_tail=bool(answerer.sampler_defaults.get("mask_tail")) and not args.no_early_stop,
                           stop_ids=(special.eot,), static=getattr(args, "static", False),
                           autotune=getattr(args, "autotune", False)).with_cache(cache)
    try:
        config.validate()
    except ValueError as error:
        raise InferError(f"sampling options: {error}") from error
    return config


def check_sampling_flags(args: argparse.Namespace) -> None:
    """Raise InferError naming the first sampling flag out of its range (NaN is out of every range)."""
    for name in ("gen_length", "block_length", "steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InferError(f"--{name.replace('_', '-')} {getattr(args, name)}: give at least 1")
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise InferError(f"--threshold {args.threshold}: give a confidence in (0, 1], or 0 for fixed steps")
    if args.factor is not None and not args.factor > 0:
        raise InferError(f"--factor {args.factor}: give a positive number")
    if not args.temperature >= 0:
        raise InferError(f"--temperature {args.temperature}: give 0 (the most likely token) or more")


def requests_from(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """Return (task, requests): each {"id", "images": [path or image], "turns": LLaVA turns up to the question}."""
    if args.input is None:
        if args.image is None and args.caption:
            raise InferError("--image is required with --caption")
        if args.question is not None and not args.question.strip():
            raise InferError("--question is empty: ask something about the image, or use --caption")
        text = CAPTION_PROMPT if args.caption else args.question
        turns = [{"from": "human", "value": text.strip()}]  # the image goes where the model's config says
        # Loaded before the model: a bad file fails fast. No --image: a text-only question, as --input allows.
        images = [load_image(args.image)] if args.image is not None else []
        return ("caption" if args.caption else "vqa"), [{"id": "0", "images": images, "turns": turns}]
    task = "caption" if "caption" in Path(args.input).name else "vqa"
    return task, llava_requests(args.input, args.image_folder)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    if args.batch_size < 1:
        raise InferError(f"--batch-size {args.batch_size}: give at least 1")
    task, requests = requests_from(args)
    task = args.task or task
    if args.show_steps not in (None, "-") and Path(args.show_steps).suffix.lower() not in (".png", ".gif"):
        raise InferError(f"--show-steps {args.show_steps}: give a .png or .gif path, or no path to print the steps")
    if args.pad_to < 1:
        raise InferError(f"--pad-to {args.pad_to}: give at least 1")
    if args.resume and not (args.input and args.output):
        raise InferError("--resume continues an --input run into its --output file: give both")
    done = answered_ids(Path(args.output)) if args.resume else set()
    if done:
        todo = [r for r in requests if r["id"] not in done]
        print(f"resuming: {len(requests) - len(todo)} of {len(requests)} entries already answered in {args.output}",
              file=sys.stderr)
        requests = todo
    model, tokenizer = load_model(args.model, args.device, args.dtype)
    quantize_lm(model.lm, args.quantize)
    answerer = Answerer(model, tokenizer)
    answerer.pad_to = args.pad_to
    config = sampler_config(args, task, answerer)
    if args.cache == "prefix" and not answerer.prefix_dlm:
        print("note: --cache prefix answers with prefix-DLM attention (the prompt does not see the answer), which "
              "this model was not trained with (prefix_dlm false): answers may differ from --cache none",
              file=sys.stderr)
    canvas = None
    if args.template is not None:
        canvas = answerer.template_canvas(args.template)
        config = answerer.template_config(config, canvas)
    try:
        out_file = open(args.output, "a" if args.resume else "w", encoding="utf-8") if args.output else None  # noqa: SIM115
    except OSError as error:
        raise InferError(f"--output {args.output}: cannot write ({error.strerror})") from error
    # leave=False: after an error, its one line is not left behind a half-drawn bar
    bar = tqdm(total=len(requests), desc="answering", disable=args.input is None, file=sys.stderr, leave=False)
    with bar, out_file or contextlib.nullcontext():
        for start in range(0, len(requests), args.batch_size):
            batch = requests[start : start + args.batch_size]
            results, seconds = answer_batch(answerer, batch, config, canvas)
            for request, result in zip(batch, results):
                if out_file is not None:
                    row = {"id": request["id"], "answer": result.text, "forward_passes": result.forward_passes,
                           "tokens_per_forward": round(result.tokens_per_forward, 3), "seconds": round(seconds, 4)}
                    out_file.write(json.dumps(row) + "\n")
                else:
                    print(result.text if args.input is None else f"{request['id']}\t{result.text}")
                if args.show_steps is not None and request is requests[0]:
                    show_steps(args.show_steps, result)
            if out_file is not None:
                out_file.flush()  # a crash or a kill loses at most the batch in progress (--resume)
            bar.update(len(batch))
    return 0


def answered_ids(path: Path) -> set[str]:
    """Return the ids an earlier run wrote to `path` (none if it does not exist), cutting off a last line that a
    kill left half-written; InferError for a line inside that is not one of infer.py's answers."""
    if not path.is_file():
        return set()
    data = path.read_bytes()
    ids, end = set(), 0
    for number, line in enumerate(data.splitlines(keepends=True), 1):
        if not line.endswith(b"\n"):
            break  # the line being written when the run stopped
        try:
            ids.add(str(json.loads(line)["id"]))
        except (ValueError, KeyError, TypeError):
            raise InferError(f"--resume: line {number} of {path} is not an answer written by infer.py") from None
        end += len(line)
    if end < len(data):
        with path.open("r+b") as file:
            file.truncate(end)
    return ids


def answer_batch(answerer: Answerer, batch: list[dict], config: SamplerConfig, canvas) -> tuple[list[Answer], float]:
    """Return the answers of a batch of requests and the seconds per request they took (images decoded first)."""
    images = [[im if isinstance(im, Image.Image) else load_image(im, where=f"entry id={r['id']}: ")
               for im in r["images"]] for r in batch]
    began = time.perf_counter()
    results = answerer.answer([r["turns"] for r in batch], images, config, canvas)
    return results, (time.perf_counter() - began) / len(batch)


def show_steps(target: str, result) -> None:
    from mmdlm.infer.steps_viz import order_text, save_steps

    if target == "-":
        print(order_text(result.pieces, result.commit_step), file=sys.stderr)
    else:
        print(f"unmasking order written to {save_steps(target, result.pieces, result.commit_step)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return report_user_errors(lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

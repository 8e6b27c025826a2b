"""The collator: plain samples in, the batch contract out.

    input_ids      [B, L] long   every image expanded to a run of `num_image_tokens` <image> ids
    pixel_values   [N, 3, H, W]  the kept images in order of appearance over the batch ([0, 3, H, W] if none)
    image_sizes    [N, 2] long   (width, height) of each kept image; only for any-resolution models, whose
                                 transform gives every image several views (pixel_values then holds all of them)
                                 and whose run length `num_image_tokens(size)` depends on the size
    attention_mask [B, L] bool   False on padding
    maskable       [B, L] bool   where the diffusion may mask: answers (SFT), all text (pretraining)
    prompt_length  [B] long      index of the first maskable token

A conversation sample ({"images", "conversations"}) is encoded with LLaDA's chat template, a
document ({"segments"}) as BOS + text and image runs + EOS. `mode` decides the padding: "sft" pads
with EOS that is attended and maskable (LLaDA's SFT: the model learns to end its answer with EOS
runs), "pretrain" pads with the pad id, unattended and never masked.

`sft_padding="mask"` changes the SFT padding: one EOS closes the answer (a target, so the sampler
learns where to stop), and the rest of the row is the mask token, attended but never a target.
Training then looks like the sampler's canvas (masks after the answer) without making a one-word
answer 1 of ~50 targets whose other 49 are EOS (LLaDA's padding: the word gets a 50th of the row's
loss when captions share the batch).

`system_prompt` (a converted LLaDA-V's `config.system_prompt`) opens every conversation that has no
system turn of its own, as LLaDA-V trains and as `infer.py` prompts.

`on_error` is `data.on_error` for conversations that cannot be encoded (a prompt too long to leave
room for an answer within max_length): "stop" raises, "skip" drops the sample with a warning and
counts it. A document that cannot be encoded is always skipped, as broken shard samples are.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from PIL import Image
from transformers import PreTrainedTokenizerFast

from mmdlm.data.errors import ON_ERROR, DataError, DataWarning, OnError
from mmdlm.data.template import ChatEncoder, expand_image_runs, with_system_turn

SftPadding = Literal["eos", "mask"]
SFT_PADDINGS = get_args(SftPadding)


@dataclass
class Encoded:
    ids: list[int]
    maskable: list[bool]
    num_images: int  # images whose runs survived truncation (the first ones of the sample)
    clean_end: bool  # False when truncation cut text: then EOS padding must not teach "the answer ends here"


class Collator:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerFast,
        image_transform: Callable[[Image.Image], torch.Tensor],
        num_image_tokens: int | Callable[[tuple[int, int]], int],
        max_length: int,
        mode: Literal["sft", "pretrain"] = "sft",
        pad_to_multiple_of: int | None = None,
        empty_image_size: int = 64,
        sft_padding: SftPadding = "eos",
        system_prompt: str | None = None,
        on_error: OnError = "skip",
    ):
        if mode not in ("sft", "pretrain"):
            raise ValueError(f"mode must be 'sft' or 'pretrain', got {mode!r}")
        if sft_padding not in SFT_PADDINGS:
            raise ValueError(f"sft_padding must be one of {SFT_PADDINGS}, got {sft_padding!r}")
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        self.sft_padding = sft_padding
        self.on_error = on_error
        self.system_prompt = system_prompt  # put before every conversation as its first turn (data/template.py)
        self.chat = ChatEncoder(tokenizer)
        self.special = self.chat.special
        self.image_transform = image_transform
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.mode = mode
        self.pad_to_multiple_of = pad_to_multiple_of
        self.empty_image_size = empty_image_size
        self.skipped = 0  # samples dropped from batches (None, or too long to keep a target)
        self._empty_shape: tuple[int, ...] | None = None

    # ------------------------------------------------------------------------------------ encoding
    def _cut(self, ids: list[int], n: int) -> int:
        """Return the largest cut <= n that does not split an image run."""
        image = self.special.image
        while 0 < n < len(ids) and ids[n] == image and ids[n - 1] == image:
            n -= 1
        return n

    def run_length(self, image: Image.Image | None) -> int:
        """Return the length of an image's `<image>` run."""
        if callable(self.num_image_tokens):
            return self.num_image_tokens(image.size)
        return self.num_image_tokens

    def encode_conversation(self, conversations: list[dict], runs: list[int] | None = None) -> Encoded:
        """Return the conversation's ids and answer flags, dropping whole trailing turn pairs to fit max_length.

        `runs` gives each image's run length in order (default: num_image_tokens each).
        """
        conv = self.chat.encode_conversation(conversations)
        if not conv.turn_ends:
            raise DataError("conversation has no answer turn")
        ids, flags, start, clean, used, kept = [], [], 0, True, 0, 0
        for end in conv.turn_ends:  # one chunk = the turns up to and including one answer
            placeholders = conv.ids[start:end].count(self.special.image)
            if runs is not None and used + placeholders > len(runs):
                raise DataError(f"more '<image>' placeholders than the {len(runs)} image(s) given")
            lengths = self.num_image_tokens if runs is None else runs[used : used + placeholders]
            used += placeholders
            chunk = expand_image_runs(conv.ids[start:end], self.special.image, lengths)
            chunk_flags = [False] * (len(chunk) - (end - start)) + conv.is_answer[start:end]
            start = end
            if len(ids) + len(chunk) <= self.max_length:
                ids, flags, kept = ids + chunk, flags + chunk_flags, used
                continue
            if not ids:  # even the first question and answer do not fit: keep the prompt and cut the answer
                prompt = chunk_flags.index(True)
                cut = self._cut(chunk, self.max_length)
                if cut <= prompt:
                    raise DataError(
                        f"the prompt with its image run(s) is {prompt} tokens, leaving no room for an answer "
                        f"within max_length={self.max_length}; raise max_length or shorten the question"
                    )
                ids, flags, clean, kept = chunk[:cut], chunk_flags[:cut], False, used
            break
        return Encoded(ids, flags, kept, clean)

    def encode_segments(self, segments: list[dict]) -> Encoded:
        """Return a document's ids (BOS, text, image runs, EOS) with all text maskable, cut to fit max_length."""
        s = self.special
        ids, flags, images, clean = [s.bos], [False], 0, True
        pieces = []
        for segment in segments:
            if "image" in segment:
                pieces.append(([s.image] * self.run_length(segment["image"]), False))
                continue
            text = self.chat.text_ids(segment["text"])
            if s.image in text:
                raise DataError("a text segment contains '<image>'; images are separate segments")
            pieces.append((text, True))
        pieces.append(([s.eos], True))
        for piece, is_text in pieces:
            room = self.max_length - len(ids)
            if len(piece) > room:  # text may be cut; an image run never is
                if is_text and room > 0:
                    ids, flags = ids + piece[:room], flags + [True] * room
                clean = False
                break
            ids, flags = ids + piece, flags + [is_text] * len(piece)
            images += not is_text
        if not any(flags):
            raise DataError(f"no text fits within max_length={self.max_length} after the first image run")
        return Encoded(ids, flags, images, clean)

    def encode(self, sample: dict) -> tuple[Encoded, list[Image.Image]]:
        """Return the encoding of one sample and the images it keeps, in order."""
        if "conversations" in sample:
            images = list(sample.get("images", []))
            runs = [self.run_length(image) for image in images] if callable(self.num_image_tokens) else None
            encoded = self.encode_conversation(with_system_turn(sample["conversations"], self.system_prompt), runs)
        elif "segments" in sample:
            encoded = self.encode_segments(sample["segments"])
            images = [segment["image"] for segment in sample["segments"] if "image" in segment]
        else:
            raise DataError(f"sample has neither 'conversations' nor 'segments' (keys {sorted(sample)})")
        if encoded.num_images > len(images):
            raise DataError(f"{encoded.num_images} image run(s) in the text but {len(images)} image(s) given")
        return encoded, images[: encoded.num_images]

    # ------------------------------------------------------------------------------------ batching
    def _pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """Return [N, 3, H, W] (any resolution: every image's views, [sum V, 3, H, W]); [0, 3, H, W] if no image."""
        tensors = [self.image_transform(image if image.mode == "RGB" else image.convert("RGB")) for image in images]
        views = [t if t.dim() == 4 else t[None] for t in tensors]  # [V, 3, H, W] each
        for tensor in views:
            if tensor.dim() != 4 or tensor.shape[1] != 3:
                raise DataError(f"image_transform must return [3, H, W] (or [views, 3, H, W]), got "
                                f"{tuple(tensor.shape)}")
        if tensors:
            return torch.cat(views).float()
        if self._empty_shape is None:
            blank = Image.new("RGB", (self.empty_image_size, self.empty_image_size))
            self._empty_shape = tuple(self.image_transform(blank).shape[-3:])
        return torch.zeros((0, *self._empty_shape))

    def __call__(self, samples: list[dict | None]) -> dict[str, torch.Tensor]:
        encoded, images = [], []
        for sample in samples:
            if sample is None:  # a dataset with on_error="skip" already warned
                self.skipped += 1
                continue
            try:
                item, kept = self.encode(sample)
            except DataError as error:
                if self.on_error == "stop" and "conversations" in sample:
                    raise DataError(f"sample id={sample.get('id', '?')}: {error}") from None
                self.skipped += 1
                warnings.warn(f"sample id={sample.get('id', '?')} skipped: {error}", DataWarning, 2)
                continue
            encoded.append(item)
            images += kept
        if not encoded:
            raise DataError(f"all {len(samples)} samples of the batch were skipped (see the warnings above)")
        length = max(len(e.ids) for e in encoded)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        sft = self.mode == "sft"
        pad = self.special.eos if sft else self.special.pad
        batch = len(encoded)
        input_ids = torch.full((batch, length), pad, dtype=torch.long)  # [B, L]
        attention_mask = torch.zeros((batch, length), dtype=torch.bool)  # [B, L]
        maskable = torch.zeros((batch, length), dtype=torch.bool)  # [B, L]
        prompt_length = torch.zeros(batch, dtype=torch.long)  # [B]
        for row, item in enumerate(encoded):
            n = len(item.ids)
            input_ids[row, :n] = torch.tensor(item.ids, dtype=torch.long)
            maskable[row, :n] = torch.tensor(item.maskable, dtype=torch.bool)
            attention_mask[row, : length if sft else n] = True
            if sft and self.sft_padding == "mask":
                input_ids[row, n + 1 :] = self.special.mask
                maskable[row, n : n + 1] = item.clean_end  # the one EOS that ends the answer (if there is room)
            else:
                maskable[row, n:] = sft and item.clean_end
            prompt_length[row] = item.maskable.index(True)
        batch = {
            "input_ids": input_ids,
            "pixel_values": self._pixels(images),
            "attention_mask": attention_mask,
            "maskable": maskable,
            "prompt_length": prompt_length,
        }
        if callable(self.num_image_tokens):  # any resolution: which views belong to which image
            batch["image_sizes"] = torch.tensor([image.size for image in images], dtype=torch.long).reshape(-1, 2)
        return batch

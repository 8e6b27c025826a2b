"""Tokenizers: load any local Hugging Face tokenizer with the tokens the model needs, or train the demo's.

The special tokens carry LLaDA's names so that a LLaDA checkpoint's tokenizer already has all of
them but `<image>`, and the demo tokenizer is a drop-in stand-in with a tiny vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from mmdlm.data.errors import DataError

IMAGE_TOKEN = "<image>"
MASK_TOKEN = "<|mdm_mask|>"
EOS_TOKEN = "<|endoftext|>"  # also the padding token, as in LLaDA
BOS_TOKEN = "<|startoftext|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, MASK_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, IMAGE_TOKEN)

# LLaDA-8B-Instruct's template (Llama-3 layout, BOS once, content trimmed, generation prompt always
# appended). Written out here so a tokenizer folder without one still formats prompts as LLaDA does.
LLADA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}"
    "{% endfor %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
)


@dataclass(frozen=True)
class SpecialIds:
    image: int
    mask: int
    eos: int
    pad: int
    bos: int
    eot: int
    start_header: int
    end_header: int


def special_ids(tokenizer: PreTrainedTokenizerFast) -> SpecialIds:
    """Return the ids of the special tokens; DataError if the tokenizer lacks one (load it with load_tokenizer)."""

    def token_id(token: str) -> int:
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or index == tokenizer.unk_token_id:
            raise DataError(f"tokenizer has no {token!r}; load it with mmdlm.data.tokenizer.load_tokenizer")
        return int(index)

    # BOS/EOS: the tokenizer's own where it names them (LLaDA's are these names), so that ids and
    # apply_chat_template agree for any tokenizer.
    bos = token_id(tokenizer.bos_token or BOS_TOKEN)
    eos = token_id(tokenizer.eos_token or EOS_TOKEN)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return SpecialIds(
        image=token_id(IMAGE_TOKEN),
        mask=token_id(MASK_TOKEN),
        eos=eos,
        pad=int(pad),
        bos=bos,
        eot=token_id(EOT_TOKEN),
        start_header=token_id(START_HEADER_TOKEN),
        end_header=token_id(END_HEADER_TOKEN),
    )


def add_special_tokens(tokenizer: PreTrainedTokenizerFast) -> int:
    """Return how many special tokens were missing and are now added (the model's embedding may need resizing)."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in SPECIAL_TOKENS if token not in vocab]
    added = tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    # LLaDA pads with EOS and has no separate pad token; keep a tokenizer's own choices where present.
    if tokenizer.bos_token is None:
        tokenizer.bos_token = BOS_TOKEN
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        tokenizer.chat_template = LLADA_CHAT_TEMPLATE
    return added


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Return the fast tokenizer saved in the local folder `path`, with the model's special tokens added if absent."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise DataError(
            f"{path}: no tokenizer.json or tokenizer_config.json; pass the folder of a saved Hugging Face tokenizer "
            "(e.g. the LLaDA checkpoint folder, or DIR/tokenizer written by `mmdlm-data synth`)"
        )
    verbosity = hf_logging.get_verbosity()
    # In an exported model folder AutoTokenizer also reads the model's config.json and warns that
    # it is not a tokenizer's: noise to a user, since the tokenizer files beside it are what loads.
    hf_logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: cannot load the tokenizer: {error}") from error
    finally:
        hf_logging.set_verbosity(verbosity)
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise DataError(f"{path}: {type(tokenizer).__name__} is not a fast tokenizer; save it with tokenizer.json")
    add_special_tokens(tokenizer)
    return tokenizer


def train_demo_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 512
) -> PreTrainedTokenizerFast:
    """Return a byte-level BPE tokenizer trained on `texts`, saved to `out_dir` as a PreTrainedTokenizerFast folder.

    Byte-level means no unknown token ever: any text a user types still encodes.
    """
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    add_special_tokens(tokenizer)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer

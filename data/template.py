"""LLaDA's chat template as token ids: a conversation becomes ids plus a per-token "is answer" flag.

Layout per turn (BOS once at the start):
    <|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>
The answer targets are an assistant turn's content and its closing <|eot_id|>; the header and the
"\\n\\n" after it belong to the prompt, so that a training sequence starts with exactly the ids
`encode_prompt` gives at inference. Pieces are tokenized separately, which equals tokenizing the
whole text because special tokens and the newlines already split the text into pre-tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerFast

from mmdlm.data.errors import DataError
from mmdlm.data.tokenizer import IMAGE_TOKEN, special_ids

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def turn_role(turn: dict) -> str:
    """Return the chat role ('user', 'assistant', 'system') of one LLaVA turn; DataError if unknown."""
    role = ROLES.get(str(turn.get("from", "")).lower())
    if role is None:
        raise DataError(f"turn 'from' must be one of {sorted(ROLES)}, got {turn.get('from')!r}")
    return role


def conversation_problems(conversations: object) -> list[str]:
    """Return what is wrong with a LLaVA `conversations` list (empty when it can train)."""
    if not isinstance(conversations, list) or not conversations:
        return ["'conversations' must be a non-empty list of {'from', 'value'} turns"]
    problems, has_answer = [], False
    for k, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            problems.append(f"turn {k} must be a dict with a string 'value'")
            continue
        try:
            role = turn_role(turn)
        except DataError as error:
            problems.append(f"turn {k}: {error}")
            continue
        text = turn["value"].replace(IMAGE_TOKEN, "").strip()
        if role == "assistant":
            if IMAGE_TOKEN in turn["value"]:
                problems.append(f"turn {k}: '<image>' in an answer turn (images belong to human turns)")
            if text:
                has_answer = True
            else:
                problems.append(f"turn {k}: empty answer")
        elif not text and IMAGE_TOKEN not in turn["value"]:
            problems.append(f"turn {k}: empty {role} turn")
    if not has_answer:
        problems.append("conversation has no answer (no non-empty 'gpt' turn)")
    return problems


def with_system_turn(conversations: list[dict], system_prompt: str | None) -> list[dict]:
    """Return the turns after a system turn of `system_prompt` (a converted LLaDA-V's), unless there is none or
    the conversation opens with its own system turn: LLaDA-V's rule, in training and at inference alike."""
    if not system_prompt or (conversations and turn_role(conversations[0]) == "system"):
        return conversations
    return [{"from": "system", "value": system_prompt}, *conversations]


IMAGE_POSITIONS = ("before", "after")


def image_position_of(conversations: list[list[dict]]) -> str:
    """Return "after" when most conversations' first '<image>' ends their first human turn, else "before"."""
    after = before = 0
    for turns in conversations:
        text = next((str(t.get("value")) for t in turns if isinstance(t, dict) and ROLES.get(t.get("from")) == "user"
                     and IMAGE_TOKEN in str(t.get("value"))), "").strip()
        after += text.endswith(IMAGE_TOKEN) and not text.startswith(IMAGE_TOKEN)
        before += text.startswith(IMAGE_TOKEN)
    return "after" if after > before else "before"


def place_image_tokens(conversations: list[dict], num_images: int, position: str = "before") -> list[dict]:
    """Return the turns with exactly `num_images` '<image>' placeholders, put in the first human turn if none.

    LLaVA prepends '<image>\\n' when an entry has an image but no placeholder (position "before"); a
    model trained with its images after the question (the demo's: see data/synthetic.py) says
    "after" in its config. A placeholder count that neither matches nor is zero is ambiguous: an error.
    """
    found = sum(turn["value"].count(IMAGE_TOKEN) for turn in conversations)
    if found == num_images:
        return conversations
    if found == 0:
        turns = [dict(turn) for turn in conversations]
        first_user = next((t for t in turns if turn_role(t) == "user"), None)
        if first_user is None:
            raise DataError(f"{num_images} image(s) but no human turn to put '<image>' in")
        if position == "after":
            first_user["value"] = first_user["value"] + ("\n" + IMAGE_TOKEN) * num_images
        else:
            first_user["value"] = (IMAGE_TOKEN + "\n") * num_images + first_user["value"]
        return turns
    raise DataError(f"{found} '<image>' placeholder(s) in the text but {num_images} image(s) in the entry")


@dataclass
class EncodedConversation:
    ids: list[int] = field(default_factory=list)  # one <image> id per image (not yet expanded)
    is_answer: list[bool] = field(default_factory=list)
    # Index just after each assistant turn's <|eot_id|>: the places where truncation may cut.
    turn_ends: list[int] = field(default_factory=list)

    def extend(self, ids: list[int], answer: bool) -> None:
        self.ids.extend(ids)
        self.is_answer.extend([answer] * len(ids))


class ChatEncoder:
    """Encodes conversations and prompts with LLaDA's template, caching the ids of the fixed pieces."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast):
        self.tokenizer = tokenizer
        self.special = special_ids(tokenizer)
        self._cache: dict[str, list[int]] = {}

    def text_ids(self, text: str) -> list[int]:
        """Return the ids of `text` with no BOS/EOS added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def header(self, role: str) -> list[int]:
        """Return the ids of `<|start_header_id|>{role}<|end_header_id|>\\n\\n`."""
        if role not in self._cache:
            s = self.special
            self._cache[role] = [s.start_header, *self.text_ids(role), s.end_header, *self.text_ids("\n\n")]
        return self._cache[role]

    def encode_conversation(self, conversations: list[dict]) -> EncodedConversation:
        """Return ids and answer flags of a whole conversation (turns as LLaVA dicts, placeholders in place)."""
        out = EncodedConversation()
        out.extend([self.special.bos], False)
        for turn in conversations:
            role = turn_role(turn)
            out.extend(self.header(role), False)
            answer = role == "assistant"
            out.extend(self.text_ids(turn["value"].strip()), answer)
            out.extend([self.special.eot], answer)
            if answer:
                out.turn_ends.append(len(out.ids))
        return out

    def encode_prompt(self, question: str | list[dict]) -> list[int]:
        """Return the inference prompt: the turns so far, then `<|start_header_id|>assistant<|end_header_id|>\\n\\n`.

        `question` is the user's text or the LLaVA turns up to (and including) the last question.
        """
        turns = [{"from": "human", "value": question}] if isinstance(question, str) else question
        if turns and turn_role(turns[-1]) == "assistant":
            raise DataError("the prompt's last turn is an answer; drop it or add the next question")
        ids = self.encode_conversation(turns).ids
        return ids + self.header("assistant")


def expand_image_runs(ids: list[int], image_id: int, num_image_tokens: int | list[int]) -> list[int]:
    """Return `ids` with each image placeholder id repeated into the model's image run.

    `num_image_tokens` is the run length of every image, or one length per placeholder in order
    (any-resolution images, whose runs depend on their sizes).
    """
    lengths = iter(num_image_tokens) if isinstance(num_image_tokens, list) else None
    out: list[int] = []
    for token in ids:
        if token == image_id:
            n = num_image_tokens if lengths is None else next(lengths, None)
            if n is None:
                raise DataError("more '<image>' placeholders than images")
            out.extend([image_id] * n)
        else:
            out.append(token)
    return out

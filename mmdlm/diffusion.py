"""The masked-diffusion objective (LLaDA, eq. 3; SFT convention of its section 2.3).

Per sequence draw t ~ U(eps, 1], replace each maskable token by the mask token with probability
t, and score the model's prediction of the masked tokens with cross-entropy weighted by 1/t. The
sum is divided by the number of maskable tokens of the sequence (SFT: the answer length), which
makes the loss an unbiased estimate of the per-token negative ELBO bound. Prompt, image and
padding tokens are never masked and never scored.

`schedule="count"` is the same bound in LLaDA's lower-variance form (its eq. 6, used there for
likelihood evaluation): draw the number of masked tokens l ~ U{1..L} of the L maskable ones,
mask exactly l, weight L/l. Divided by L, a sequence's loss is the plain mean cross-entropy of
its masked tokens: never a 1/t of 1000 on a lone masked token, and never a sequence with nothing
masked. That matters for short answers: with L = 2 ("red<|eot_id|>") the ratio schedule masks the
answer word only a fraction t of the time and then weights it 1/t, so a few rows carry most of a
batch's gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F


@dataclass
class DiffusionLoss:
    loss: torch.Tensor  # scalar: mean over sequences of per_sequence
    t: torch.Tensor  # [B] masking ratio of each sequence (first mask when complementary)
    per_sequence: torch.Tensor  # [B] weighted, normalised loss of each sequence (detached)
    num_masked: int  # masked tokens scored in this batch


Schedule = Literal["ratio", "count"]  # t ~ U(eps, 1] per sequence (LLaDA's training), or l ~ U{1..L} tokens (eq. 6)
SCHEDULES = get_args(Schedule)


def sample_masks(
    maskable: torch.Tensor, eps: float, complementary: bool, generator: torch.Generator | None,
    schedule: Schedule = "ratio",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (masks [k, B, L] bool, t [k, B]); k = 2 with complementary masking.

    `t` is the weight's ratio: the masking probability (ratio schedule) or the masked fraction l/L
    (count schedule). Complementary masking (LaViDa) pairs each mask with its complement over the
    maskable tokens, so every maskable token is scored exactly once per pair; the second mask's
    ratio is 1 - t.
    """
    B, L = maskable.shape
    if schedule == "count":
        u = torch.rand(B, L, device=maskable.device, generator=generator)  # [B, L]
        total = maskable.sum(1)  # [B]
        count = (torch.rand(B, device=maskable.device, generator=generator) * total).floor() + 1  # U{1..total}
        # The `count` maskable positions with the smallest draws: a uniformly random subset of that size.
        rank = torch.where(maskable, u, 2.0).argsort(1).argsort(1)  # [B, L]
        first = (rank < count[:, None]) & maskable
        t = (count / total.clamp_min(1)).clamp_max(1.0)
    elif schedule == "ratio":
        t = eps + (1 - eps) * torch.rand(B, device=maskable.device, generator=generator)  # [B] in (eps, 1]
        u = torch.rand(B, L, device=maskable.device, generator=generator)  # [B, L]
        first = (u < t[:, None]) & maskable
    else:
        raise ValueError(f"schedule={schedule!r} must be one of {SCHEDULES}")
    if not complementary:
        return first[None], t[None]
    second = ~first & maskable
    t2 = (1 - t).clamp_min(eps)
    return torch.stack([first, second]), torch.stack([t, t2])


def masked_diffusion_loss(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    input_ids: torch.Tensor,
    maskable: torch.Tensor,
    mask_id: int,
    *,
    eps: float = 1e-3,
    complementary: bool = False,
    generator: torch.Generator | None = None,
    schedule: Schedule = "ratio",
) -> DiffusionLoss:
    """Return the 1/t-weighted masked cross-entropy of `logits_fn` on a freshly masked batch.

    logits_fn maps noisy ids [k*B, L] (rows stacked mask by mask) to logits [k*B, L, V].
    """
    B = input_ids.shape[0]
    masks, t = sample_masks(maskable, eps, complementary, generator, schedule)  # [k, B, L], [k, B]
    k = masks.shape[0]
    masks, t = masks.reshape(k * B, -1), t.reshape(k * B)
    targets = input_ids.repeat(k, 1)  # [k*B, L]
    noisy = torch.where(masks, mask_id, targets)
    logits = logits_fn(noisy)  # [k*B, L, V]
    token_loss = F.cross_entropy(logits[masks].float(), targets[masks], reduction="none")  # [M]
    row = torch.nonzero(masks, as_tuple=True)[0]
    per_row = torch.zeros(k * B, device=logits.device).index_add(0, row, token_loss / t[row])
    # Rows without maskable tokens contribute 0 (clamp avoids 0/0), never NaN.
    num_maskable = maskable.sum(1).repeat(k).clamp_min(1)
    per_row = per_row / num_maskable
    # Each mask of a complementary pair is an unbiased estimate on its own; average the pair.
    per_sequence = per_row.view(k, B).mean(0)
    return DiffusionLoss(
        loss=per_sequence.mean(),
        t=t.view(k, B)[0],
        per_sequence=per_sequence.detach(),
        num_masked=int(masks.sum()),
    )


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, maskable: torch.Tensor,
                    shifted: bool = False) -> torch.Tensor:
    """Return the autoregressive twin's loss: mean cross-entropy of token i+1 from position i.

    Only targets that are maskable (answers in SFT, text in pretraining) are scored, so the two
    objectives learn from the same tokens. `shifted`: the model shifted its logits already
    (`shift_logits`: logits[:, i] is position i - 1's prediction of token i).
    """
    targets = input_ids[:, 1:]
    scored = maskable[:, 1:]
    if not scored.any():
        return logits.sum() * 0.0
    predictions = logits[:, 1:] if shifted else logits[:, :-1]  # [B, L-1, V]: the predictions of tokens 1..L-1
    return F.cross_entropy(predictions[scored].float(), targets[scored])


def first_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, prompt_length: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy of each row's first answer token, from logits [B, L, V] of a
    `shift_logits` model under prefix-DLM attention.

    There logits[:, P] is the prompt's last position's prediction, which never sees the answer, so it
    is a next-token prediction whether the answer was masked or not: this scores it in every row,
    where the diffusion loss scores it only in the rows that masked it (`first_token_weight`).
    """
    rows = (prompt_length < input_ids.shape[1]).nonzero().squeeze(1)  # rows with an answer token
    positions = prompt_length[rows]
    if len(rows) == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits[rows, positions].float(), input_ids[rows, positions])

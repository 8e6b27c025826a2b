"""Log-likelihood of an answer under a masked-diffusion model: LLaDA's Monte-Carlo estimate of the bound.

A diffusion LM has no left-to-right factorisation, so log p(answer | prompt) is estimated from
the same bound the model is trained on, in LLaDA's low-variance form (its eq. 6, the `count`
schedule of mmdlm/diffusion.py): draw l ~ U{1..L} of the answer's L tokens, mask a uniformly
random l of them, and score the masked tokens' log-probabilities given the rest, weighted L/l:

    log p(answer | prompt)  >=  E_l,mask [ (L / l) * sum over masked i of log p(answer_i | prompt, unmasked) ]

The estimate averages a fixed number of draws from a generator seeded per request, so the same
request always gives the same number, whatever else is in the batch. For a one-token answer the
bound is exact: the token masked alone, log p(token | prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmdlm.diffusion import sample_masks


@dataclass
class LikelihoodConfig:
    draws: int = 64  # Monte-Carlo mask draws per request (more: lower variance, linearly slower)
    batch_size: int = 32  # draws per forward
    seed: int = 0  # the generator of every request starts here: reproducible, order-independent

    def validate(self) -> None:
        """Raise ValueError naming the bad option."""
        if self.draws < 1 or self.batch_size < 1:
            raise ValueError(f"draws={self.draws} and batch_size={self.batch_size} must be at least 1")


@torch.no_grad()
def answer_loglikelihood(lm, prefix_embeds: torch.Tensor, answer: torch.Tensor, mask_id: int,
                         config: LikelihoodConfig, prefix_dlm: bool = False) -> tuple[float, bool]:
    """Return (estimate of log p(answer | prefix), whether the greedy fill of the fully masked answer is it).

    `lm` is a DiffusionLM, prefix_embeds [1, P, D] the prompt (images spliced in), answer [L] token
    ids. is_greedy: one forward with every answer position masked; its argmax at each position is
    the answer (lmms-eval's "would greedy decoding produce it").
    """
    config.validate()
    L, P = answer.shape[0], prefix_embeds.shape[1]
    if L == 0:
        return 0.0, True
    device = prefix_embeds.device
    answer = answer.to(device)
    embed = lm.get_input_embeddings()
    extra = {"prefix_len": P} if prefix_dlm else {}

    def answer_logprobs(noisy: torch.Tensor) -> torch.Tensor:  # [b, L] ids -> [b, L] log p(answer_i)
        b = noisy.shape[0]
        inputs = torch.cat([prefix_embeds.expand(b, -1, -1), embed(noisy)], dim=1)  # [b, P+L, D]
        logits = lm(inputs_embeds=inputs, logits_from=P, **extra).float()  # [b, L, V]
        return logits.log_softmax(-1).gather(-1, answer.expand(b, L)[..., None]).squeeze(-1)

    all_masked = torch.full((1, L), mask_id, device=device)
    greedy = lm(inputs_embeds=torch.cat([prefix_embeds, embed(all_masked)], dim=1), logits_from=P, **extra)
    is_greedy = bool((greedy.argmax(-1)[0] == answer).all())

    draws = 1 if L == 1 else config.draws  # a one-token answer is masked alone in every draw: one is exact
    generator = torch.Generator().manual_seed(config.seed)  # on the CPU: the same draws on any device
    masks, ratio = sample_masks(torch.ones(draws, L, dtype=torch.bool), eps=0.0, complementary=False,
                                generator=generator, schedule="count")  # [1, n, L], [1, n]: ratio = l / L
    masks, ratio = masks[0].to(device), ratio[0].to(device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, draws, config.batch_size):
        mask, r = masks[start : start + config.batch_size], ratio[start : start + config.batch_size]
        logp = answer_logprobs(torch.where(mask, mask_id, answer))  # [b, L]
        total += ((logp * mask).sum(1) / r).double().sum()  # (L / l) * sum over the masked tokens
    return float(total / draws), is_greedy

"""Decoding for the autoregressive twin (`attention: causal`): one token per forward, left to right.

The baseline the diffusion sampler is measured against: the same backbone trained with causal
attention and next-token loss. Keys/values of everything already read are cached, so each forward
runs one new position (the prefix once). It takes the diffusion sampler's SamplerConfig and returns
the same SampleOutput (mmdlm/decoding.py), so infer.py and the benchmarks treat both models alike;
the options that only a diffusion canvas has (blocks, steps, threshold, cache kind) are ignored.
"""

from __future__ import annotations

import torch

from mmdlm.cache import KVCache
from mmdlm.decoding import SampleOutput, add_gumbel_noise, answer_lengths, read_prompt
from mmdlm.sampling import SamplerConfig


@torch.no_grad()
def generate_autoregressive(
    model,
    prefix_ids: torch.Tensor | None = None,
    *,
    config: SamplerConfig,
    prefix_embeds: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> SampleOutput:
    """Return up to `gen_length` tokens [B, gen_length] after the prefix, each row stopping at its own stop token.

    attention_mask [B, P] marks real prefix tokens (False = left padding). With `early_stop`, the
    batch stops once every row has produced a stop token, and tails after it hold `eos_id`.
    """
    if model.config.attention != "causal":
        raise ValueError("generate_autoregressive needs a model with attention='causal' (the AR twin)")
    if getattr(model.config, "shift_logits", False):
        raise ValueError("generate_autoregressive reads the last position's logits as the next token's: "
                         "a shift_logits model returns them one position later")
    prompt = read_prompt(prefix_ids, prefix_embeds, attention_mask, config.gen_length,
                         (config.eos_id, *config.stop_ids))
    B, P, G, device = prompt.batch_size, prompt.length, config.gen_length, prompt.device
    fill = config.eos_id if config.eos_id is not None else 0
    tokens = torch.full((B, G), fill, dtype=torch.long, device=device)  # [B, G]
    commit_step = torch.full((B, G), -1, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache()
    inputs = {"input_ids": prefix_ids} if prefix_ids is not None else {"inputs_embeds": prefix_embeds}
    start, forwards = 0, 0
    for i in range(G):
        end = start + (P if i == 0 else 1)
        padding = {} if prompt.key_mask is None else {  # a left-padded row keeps its unpadded RoPE
            "attention_mask": prompt.key_mask[:, :end], "position_ids": prompt.position_ids[:, start:end]}
        logits = model(**inputs, **padding, cache=cache, start=start, fill_cache=True)
        forwards += 1
        next_token = add_gumbel_noise(logits[:, -1], config.temperature).argmax(-1)  # [B]
        live = ~done
        tokens[live, i] = next_token[live]
        commit_step[live, i] = forwards
        if len(prompt.stop_ids):
            done |= torch.isin(next_token, prompt.stop_ids)
        if config.early_stop and bool(done.all()):
            break
        start = end
        inputs = {"input_ids": next_token[:, None]}
    row_forwards = (commit_step > 0).sum(1)
    return SampleOutput(tokens, forwards, commit_step, row_forwards, answer_lengths(tokens, prompt.stop_ids))

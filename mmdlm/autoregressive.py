"""Decoding for the autoregressive twin (`attention: causal`): one token per forward, left to right.

The baseline the diffusion sampler is measured against: the same backbone trained with causal
attention and next-token loss. Keys/values of everything already read are cached, so each forward
runs one new position (the prefix once). It takes the diffusion sampler's SamplerConfig and returns
its SampleOutput, so infer.py and the benchmarks treat both models alike; the options that only a
diffusion canvas has (blocks, steps, threshold, cache kind) are ignored.
"""

from __future__ import annotations

import torch

from mmdlm.cache import KVCache
from mmdlm.sampling import SampleOutput, SamplerConfig, add_gumbel_noise, stopped


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
    if (prefix_ids is None) == (prefix_embeds is None):
        raise ValueError("pass exactly one of prefix_ids or prefix_embeds")
    prefix = prefix_ids if prefix_ids is not None else prefix_embeds
    B, P = prefix.shape[:2]
    G, device = config.gen_length, prefix.device
    key_mask = torch.ones(B, P + G, dtype=torch.bool, device=device)  # [B, P+G]
    if attention_mask is not None:
        key_mask[:, :P] = attention_mask.bool()
    positions = (key_mask.long().cumsum(1) - 1).clamp(min=0)  # a left-padded row keeps its unpadded RoPE
    stop_ids = torch.tensor([i for i in (config.eos_id, *config.stop_ids) if i is not None], device=device)
    fill = config.eos_id if config.eos_id is not None else 0
    tokens = torch.full((B, G), fill, dtype=torch.long, device=device)  # [B, G]
    commit_step = torch.full((B, G), -1, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    cache = KVCache()
    inputs = {"input_ids": prefix_ids} if prefix_ids is not None else {"inputs_embeds": prefix_embeds}
    start, forwards = 0, 0
    for i in range(G):
        length = P if i == 0 else 1
        logits = model(**inputs, attention_mask=key_mask[:, : start + length],
                       position_ids=positions[:, start : start + length], cache=cache, start=start, fill_cache=True)
        forwards += 1
        next_token = add_gumbel_noise(logits[:, -1], config.temperature).argmax(-1)  # [B]
        live = ~done
        tokens[live, i] = next_token[live]
        commit_step[live, i] = forwards
        if len(stop_ids):
            done |= torch.isin(next_token, stop_ids)
        if config.early_stop and bool(done.all()):
            break
        start += length
        inputs = {"input_ids": next_token[:, None]}
    # The canvas holds no mask id (-1 matches nothing), so `stopped` gives each row's first stop token.
    lengths = stopped(tokens, -1, stop_ids)[1] if len(stop_ids) else torch.full((B,), G, device=device)
    row_forwards = (commit_step > 0).sum(1)
    return SampleOutput(tokens, forwards, commit_step, row_forwards, lengths)

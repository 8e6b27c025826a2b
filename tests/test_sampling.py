"""Sampler behaviour beyond the reference fixtures: validation, batching, statistics."""

import pytest
import torch

from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.sampling import SamplerConfig, generate, tokens_per_step


@pytest.mark.parametrize(
    "cfg, message",
    [
        (SamplerConfig(gen_length=10, block_length=4), "gen_length=10 is not divisible by block_length=4"),
        (SamplerConfig(gen_length=8, block_length=4, steps=3), "steps=3 is not divisible by the number of blocks"),
        (SamplerConfig(remasking="best"), "remasking='best'"),
    ],
)
def test_bad_options_are_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        cfg.validate()


def test_schedule_spreads_the_remainder_over_the_first_steps():
    assert tokens_per_step(torch.tensor([10, 3]), 4).tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_every_position_is_filled_and_stats_count_forwards():
    torch.manual_seed(0)
    model = DiffusionLM(DLMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, mask_token_id=39)).eval()
    prompt = torch.randint(0, 39, (3, 5))
    out = generate(model, prompt, mask_id=39, config=SamplerConfig(gen_length=12, block_length=4, steps=6))
    assert out.tokens.shape == (3, 12) and not (out.tokens == 39).any()
    assert out.forward_passes == 6 and out.tokens_per_forward == 2.0


def test_left_padded_batch_matches_rows_run_alone():
    torch.manual_seed(0)
    model = DiffusionLM(DLMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, mask_token_id=39)).eval()
    short, long = torch.randint(0, 39, (1, 3)), torch.randint(0, 39, (1, 6))
    cfg = SamplerConfig(gen_length=8, block_length=8, steps=8)
    alone = generate(model, long, mask_id=39, config=cfg).tokens
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6]).bool()
    together = generate(model, batch, mask_id=39, config=cfg, attention_mask=mask).tokens
    assert torch.equal(together[1:], alone)

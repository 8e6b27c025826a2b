"""The autoregressive twin's decoder: cached decoding equals recomputing everything, row by row."""

import pytest
import torch

from mmdlm.autoregressive import generate_autoregressive
from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.sampling import SamplerConfig


def causal_lm(attention: str = "causal") -> DiffusionLM:
    torch.manual_seed(0)
    cfg = DLMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, attention=attention)
    return DiffusionLM(cfg).eval()


def greedy_without_cache(lm: DiffusionLM, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            ids.append(int(lm(input_ids=torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_decoding_equals_recomputing_everything():
    lm = causal_lm()
    prompt = [5, 9, 11, 7, 20]
    out = generate_autoregressive(lm, torch.tensor([prompt]), config=SamplerConfig(gen_length=12, block_length=12))
    assert out.tokens[0].tolist() == greedy_without_cache(lm, prompt, 12)
    assert out.forward_passes == 12 and out.commit_step[0].tolist() == list(range(1, 13))


def test_left_padded_rows_equal_rows_run_alone_and_stop_on_their_own():
    lm = causal_lm()
    prompts = [[5, 9, 11, 7, 20], [12, 4]]
    # Stop tokens chosen among what this seed's model writes: row 0 stops at its 4th token, row 1 at its 3rd.
    config = SamplerConfig(gen_length=10, block_length=10, early_stop=True, eos_id=2, stop_ids=(4,))
    alone = [generate_autoregressive(lm, torch.tensor([p]), config=config) for p in prompts]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    for row, p in enumerate(prompts):
        ids[row, 5 - len(p):], mask[row, 5 - len(p):] = torch.tensor(p), True
    both = generate_autoregressive(lm, ids, config=config, attention_mask=mask)
    for row, single in enumerate(alone):
        n = int(single.lengths[0])
        assert both.tokens[row, : n + 1].tolist() == single.tokens[0, : n + 1].tolist()
        assert int(both.lengths[row]) == n
        assert (both.tokens[row, n + 1:] == 2).all()  # the tail after the stop token holds eos_id
        assert int(both.row_forwards[row]) == n + 1
    assert both.lengths.tolist() == [3, 2] and both.forward_passes == 4  # the batch ends with its last row


def test_a_bidirectional_model_is_refused():
    with pytest.raises(ValueError, match="causal"):
        generate_autoregressive(causal_lm("bidirectional"), torch.tensor([[1, 2]]), config=SamplerConfig())

"""The LM: config validation, attention modes, KV cache, checkpointing, save/load."""

import pytest
import torch

from mmdlm.cache import KVCache
from mmdlm.model import DiffusionLM, DLMConfig


def tiny(**kw) -> DiffusionLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, mask_token_id=63)
    cfg.update(kw)
    return DiffusionLM(DLMConfig(**cfg)).eval()


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(hidden_size=30), "hidden_size=30 is not divisible by num_attention_heads=4"),
        (dict(num_key_value_heads=3), "num_attention_heads=4 is not divisible by num_key_value_heads=3"),
        (dict(attention="sideways"), "attention='sideways'"),
        (dict(mask_token_id=64), "mask_token_id=64 is outside vocab_size=64"),
    ],
)
def test_inconsistent_config_names_the_problem(kw, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny(**kw)


def test_bidirectional_attention_sees_the_future_and_causal_does_not():
    ids = torch.randint(0, 60, (1, 10))
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 60
    for attention, first_changes in [("bidirectional", True), ("causal", False)]:
        model = tiny(attention=attention)
        with torch.no_grad():
            diff = (model(ids)[0, 0] - model(changed)[0, 0]).abs().max()
        assert (diff > 0) == first_changes, attention


def test_causal_override_runs_a_bidirectional_model_as_its_causal_twin():
    """forward(causal=True) is what the AR warm-up and the joint loss use: the same weights, causal attention."""
    bidirectional, causal = tiny(), tiny(attention="causal")
    causal.load_state_dict(bidirectional.state_dict())
    ids = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(bidirectional(ids, causal=True), causal(ids), rtol=0, atol=0)
        assert not torch.equal(bidirectional(ids), causal(ids))


def test_prefix_dlm_prefix_logits_ignore_the_answer():
    model = tiny()
    ids = torch.randint(0, 60, (2, 12))
    other = ids.clone()
    other[:, 7:] = torch.randint(0, 60, (2, 5))
    with torch.no_grad():
        a, b = model(ids, prefix_len=7), model(other, prefix_len=7)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.equal(a[:, 7:], b[:, 7:])


def test_causal_prefix_encodes_the_prompt_as_the_causal_twin_and_the_answer_sees_all():
    """prefix_attention=causal (the demo: after an AR warm-up the prompt keeps its left-to-right encoding)."""
    model, causal = tiny(prefix_attention="causal"), tiny(attention="causal")
    ids = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        out = model(ids, prefix_len=7)
        torch.testing.assert_close(out[:, :7], causal(ids)[:, :7], rtol=0, atol=1e-6)
        torch.testing.assert_close(model(ids), tiny()(ids), rtol=0, atol=0)  # no prefix_len: bidirectional
        changed = ids.clone()
        changed[:, 11] = (changed[:, 11] + 1) % 60
        assert not torch.equal(model(changed, prefix_len=7)[:, 7], out[:, 7])  # an answer query sees the end
        cache = KVCache()  # the sampler's prefix cache stays exact
        model(ids[:, :7], cache=cache, fill_cache=True, prefix_len=7)
        torch.testing.assert_close(model(ids[:, 7:], cache=cache, start=7), out[:, 7:], atol=1e-5, rtol=0)


def test_shifted_logits_predict_each_token_from_the_position_before_it():
    """shift_logits (Dream): with a causal prompt, a masked answer's first token is predicted exactly as a
    next-token model predicts it, from the prompt's last position, whatever the answer region holds."""
    model, plain = tiny(shift_logits=True, prefix_attention="causal"), tiny(prefix_attention="causal")
    ids = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        out = model(ids, prefix_len=7)
        torch.testing.assert_close(out[:, 1:], plain(ids, prefix_len=7)[:, :-1], rtol=0, atol=0)
        torch.testing.assert_close(model(ids, prefix_len=7, logits_from=5), out[:, 5:], rtol=0, atol=0)
        masked = ids.clone()
        masked[:, 7:] = 63
        first_answer = model(masked, prefix_len=7)[:, 7]
        torch.testing.assert_close(first_answer, out[:, 7], rtol=0, atol=1e-6)  # the answer region is unseen
        next_token = model(ids, causal=True)[:, 7]  # the warm-up's prediction of token 7
        torch.testing.assert_close(first_answer, next_token, rtol=0, atol=1e-5)


def test_padding_keys_are_never_attended():
    model = tiny()
    ids = torch.randint(0, 60, (1, 8))
    padded = torch.cat([torch.randint(0, 60, (1, 3)), ids], dim=1)  # 3 junk tokens in front
    mask = torch.tensor([[False] * 3 + [True] * 8])
    positions = torch.arange(-3, 8)[None].clamp_min(0)
    with torch.no_grad():
        plain = model(ids)
        left_padded = model(padded, attention_mask=mask, position_ids=positions)
    torch.testing.assert_close(left_padded[:, 3:], plain, atol=1e-5, rtol=0)


def test_prefix_cache_equals_full_forward():
    model = tiny()
    ids = torch.randint(0, 60, (2, 12))
    with torch.no_grad():
        full = model(ids, prefix_len=7)
        cache = KVCache()
        model(ids[:, :7], cache=cache, fill_cache=True)
        assert cache.length == 7
        tail = model(ids[:, 7:], cache=cache, start=7)
    torch.testing.assert_close(tail, full[:, 7:], atol=1e-5, rtol=0)
    assert cache.length == 7  # reading does not grow the cache


def test_block_cache_with_fresh_keys_equals_full_forward():
    model = tiny()
    ids = torch.randint(0, 60, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache()
        model(ids, cache=cache, fill_cache=True)
        block = model(ids[:, 4:8], cache=cache, start=4)
    torch.testing.assert_close(block, full[:, 4:8], atol=1e-5, rtol=0)


def test_cache_gap_is_an_error():
    model = tiny()
    cache = KVCache()
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache, fill_cache=True)
        with pytest.raises(ValueError, match="cannot continue at 5"):
            model(torch.zeros(1, 2, dtype=torch.long), cache=cache, start=5)


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = torch.randint(0, 60, (2, 8))
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        if ckpt:
            model.set_activation_checkpointing()
            assert model.gradient_checkpointing
        model(ids).logsumexp(-1).mean().backward()
        grads.append(model.layers[0].attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=0)
    model.set_activation_checkpointing(False)
    assert not model.gradient_checkpointing


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded = DiffusionLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 60, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.config.num_key_value_heads == 2 and loaded.config.tie_word_embeddings


def test_fused_projections_give_the_same_logits_uncached_and_cached():
    """q/k/v (grouped: 4 query heads, 2 key/value heads) and gate/up as one matmul each: the same logits, with the
    same parameters; the fused model refuses to be saved in a layout no checkpoint has."""
    model = tiny()
    ids = torch.randint(0, 60, (2, 12))
    fused = tiny().fuse_projections()
    assert fused.fuse_projections() is fused and fused.num_parameters() == model.num_parameters()
    assert [name for name, _ in fused.layers[0].named_parameters()] == [
        "attn_norm.weight", "attn.o_proj.weight", "attn.qkv_proj.weight", "mlp_norm.weight",
        "mlp.down_proj.weight", "mlp.gate_up_proj.weight"]
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), model(ids), atol=1e-6, rtol=0)
        tails = []
        for lm in (model, fused):
            cache = KVCache()
            lm(ids[:, :7], cache=cache, fill_cache=True)
            tails.append(lm(ids[:, 7:], cache=cache, start=7))
    torch.testing.assert_close(tails[1], tails[0], atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="fused for inference .*load the model again to train or save it"):
        fused.state_dict()

"""Fast sampling: threshold/factor decoding, confidences, early stop, KV caches, batching, templates."""

import math

import pytest
import torch
from torch import nn

from mmdlm.cache import KVCache
from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.sampling import SamplerConfig, before_stop, confidence_of, generate, parallel_count

MASK, EOS, EOT = 39, 38, 37


def tiny(seed: int = 0) -> DiffusionLM:
    torch.manual_seed(seed)
    cfg = DLMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, mask_token_id=MASK,
                    initializer_range=0.5)  # wide init: confidences spread over (0, 1)
    return DiffusionLM(cfg).eval()


class Recorder(nn.Module):
    """Wraps a DiffusionLM: records each call's query length and logits; optionally favours EOS.

    `eos_bias` is added to the EOS logit of rows whose first prompt token is `trigger` (any row
    when trigger is None): a hand-set preference that makes answers end early.
    """

    def __init__(self, lm: DiffusionLM, eos_bias: float = 0.0, trigger: int | None = None):
        super().__init__()
        self.lm, self.eos_bias, self.trigger = lm, eos_bias, trigger
        self.calls: list[tuple[int, torch.Tensor]] = []

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, logits_from=0, **kwargs):
        # Records the whole window's logits (the positions the forward computed), returns what was asked for.
        logits = self.lm(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
        if self.eos_bias:
            rows = torch.ones(logits.shape[0], dtype=torch.bool)
            if self.trigger is not None:
                rows = input_ids[:, 0] == self.trigger
            logits[rows, :, EOS] += self.eos_bias
        self.calls.append((logits.shape[1], logits.clone()))
        return logits[:, logits_from:]


def prompts(n: int = 2, length: int = 6, seed: int = 1) -> torch.Tensor:
    torch.manual_seed(seed)
    return torch.randint(0, 36, (n, length))


def test_parallel_rules_count_exactly():
    inf = -math.inf
    conf = torch.tensor([[0.95, 0.5, 0.92, inf], [0.3, 0.2, inf, inf], [inf, inf, inf, inf]])
    assert parallel_count(conf, threshold=0.9, factor=None).tolist() == [2, 1, 1]
    # factor 1: the n-th largest must reach 1 - 1/(n+1): 0.5 (always), 0.667, 0.75, 0.8
    conf = torch.tensor([[0.9, 0.7, 0.6, 0.1], [0.99, 0.98, 0.97, 0.96]])
    assert parallel_count(conf, threshold=None, factor=1.0).tolist() == [2, 4]


def test_confidences_have_their_closed_forms():
    p = torch.tensor([[[0.7, 0.2, 0.1]]])
    logits = p.log()
    chosen = torch.tensor([[1]])
    torch.testing.assert_close(confidence_of(logits, chosen, "probability"), torch.tensor([[0.2]]))
    torch.testing.assert_close(confidence_of(logits, chosen, "margin"), torch.tensor([[0.5]]))
    entropy = -(p * p.log()).sum()
    torch.testing.assert_close(confidence_of(logits, chosen, "entropy"), (-entropy).exp()[None, None])


@pytest.mark.parametrize("rule", [dict(threshold=0.5), dict(factor=1.0)])
@pytest.mark.parametrize("kind", ["probability", "margin", "entropy"])
def test_each_forward_commits_what_the_rule_allows_and_at_least_one(rule, kind):
    model = Recorder(tiny())
    prompt = prompts(1)
    cfg = SamplerConfig(gen_length=16, block_length=8, confidence=kind, **rule)
    out = generate(model, prompt, mask_id=MASK, config=cfg)
    assert not (out.tokens == MASK).any() and out.forward_passes == len(model.calls)
    step = out.commit_step[0]
    x = torch.cat([prompt[0], torch.full((16,), MASK)])
    for k, (_, logits) in enumerate(model.calls, start=1):
        block = (step == k).nonzero()[0].item() // 8  # all of a forward's commits lie in one block
        lo, hi = 6 + 8 * block, 14 + 8 * block
        masked = x[lo:hi] == MASK
        conf = confidence_of(logits[:, lo:hi], logits[:, lo:hi].argmax(-1), kind)[0]
        conf = torch.where(masked, conf, -math.inf)
        committed = step[lo - 6 : hi - 6] == k
        assert committed.sum() >= 1 and not (committed & ~masked).any()
        ranked = conf.sort(descending=True).values
        if "threshold" in rule:
            expected = (conf >= rule["threshold"]) & masked
            expected[conf.argmax()] = True
        else:
            n = torch.arange(1, 9)
            passes = ranked >= 1 - rule["factor"] / (n + 1)
            passes[0] = True
            expected = conf >= ranked[passes.long().cumprod(0).sum() - 1]
        assert torch.equal(committed, expected)
        x[lo:hi] = torch.where(committed, logits[0, lo:hi].argmax(-1), x[lo:hi])
    assert torch.equal(x[6:], out.tokens[0])
    assert out.tokens_per_forward == 16 / out.forward_passes


@pytest.mark.parametrize("embeds", [False, True])
@pytest.mark.parametrize(
    "extra",
    [
        dict(steps=8),
        dict(threshold=0.5),
        dict(steps=16, cfg_scale=1.5),
        dict(threshold=0.5, early_stop=True, eos_id=EOS),
    ],
)
def test_prefix_cache_gives_identical_tokens(embeds, extra):
    lm = tiny()
    prompt = prompts(2, 9)
    cfg = dict(gen_length=16, block_length=8, prefix_dlm=True, **extra)
    arg = dict(prefix_embeds=lm.get_input_embeddings()(prompt)) if embeds else dict(prefix_ids=prompt)
    plain = generate(lm, mask_id=MASK, config=SamplerConfig(**cfg), **arg)
    model = Recorder(lm)
    cached = generate(model, mask_id=MASK, config=SamplerConfig(cache="prefix", **cfg), **arg)
    assert torch.equal(plain.tokens, cached.tokens)
    assert plain.forward_passes == cached.forward_passes
    # the prompt is computed once: every later forward sees only the 16-token canvas
    assert [n for n, _ in model.calls] == [9 + 16] + [16] * (cached.forward_passes - 1)


@pytest.mark.parametrize("embeds", [False, True])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("extra", [dict(steps=8), dict(threshold=0.5, early_stop=True, eos_id=EOS),
                                   dict(steps=16, cfg_scale=1.5)])
def test_a_shift_logits_model_decodes_the_same_with_the_prefix_cache(embeds, static, extra):
    """Its canvas's first logits come from the prompt's last position: each cached forward recomputes it."""
    torch.manual_seed(0)
    lm = DiffusionLM(DLMConfig(**{**tiny().config.to_diff_dict(), "shift_logits": True,
                                  "prefix_attention": "causal"})).eval()
    prompt = prompts(2, 9)
    cfg = dict(gen_length=16, block_length=8, prefix_dlm=True, **extra)
    arg = dict(prefix_embeds=lm.get_input_embeddings()(prompt)) if embeds else dict(prefix_ids=prompt)
    plain = generate(lm, mask_id=MASK, config=SamplerConfig(**cfg), **arg)
    model = Recorder(lm)
    cached = generate(model, mask_id=MASK, config=SamplerConfig(cache="prefix", static=static, **cfg), **arg)
    assert torch.equal(plain.tokens, cached.tokens) and plain.forward_passes == cached.forward_passes
    assert [n for n, _ in model.calls] == [9 + 16] + [1 + 16] * (cached.forward_passes - 1)


def test_block_cache_recomputes_only_the_block_and_is_exact_at_block_starts():
    lm = tiny()
    prompt = prompts(1, 5)
    model = Recorder(lm)
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, cache="block")
    out = generate(model, prompt, mask_id=MASK, config=cfg)
    assert [n for n, _ in model.calls] == [21, 8, 8, 8, 21, 8, 8, 8]
    # a refreshed forward is an ordinary full forward, so it matches the uncached one exactly
    first = torch.cat([prompt, torch.full((1, 16), MASK)], 1)
    torch.testing.assert_close(model.calls[0][1], lm(first).detach(), atol=1e-6, rtol=0)
    assert not (out.tokens == MASK).any()
    # with one step per block every forward is a refresh, so nothing is approximated
    one = dict(gen_length=16, block_length=4, steps=4)
    plain = generate(lm, prompt, mask_id=MASK, config=SamplerConfig(**one)).tokens
    assert torch.equal(plain, generate(lm, prompt, mask_id=MASK, config=SamplerConfig(cache="block", **one)).tokens)


def test_block_cache_with_prefix_dlm_refreshes_only_the_canvas():
    model = Recorder(tiny())
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=4, cache="block", prefix_dlm=True)
    generate(model, prompts(1, 5), mask_id=MASK, config=cfg)
    assert [n for n, _ in model.calls] == [21, 8, 16, 8]


def test_early_stop_keeps_the_answer_and_skips_the_rest():
    lm = tiny()
    prompt = prompts(1, seed=3)
    cfg = dict(gen_length=32, block_length=8, steps=32, eos_id=EOS)
    vanilla = generate(Recorder(lm, eos_bias=2.0), prompt, mask_id=MASK, config=SamplerConfig(**cfg))
    early = generate(Recorder(lm, eos_bias=2.0), prompt, mask_id=MASK, config=SamplerConfig(early_stop=True, **cfg))
    n = early.lengths.item()
    assert 0 < n < 8 and early.forward_passes <= 8 < vanilla.forward_passes == 32
    assert vanilla.lengths.item() == n
    assert torch.equal(early.tokens[0, : n + 1], vanilla.tokens[0, : n + 1])  # same decisions until the stop
    assert (early.tokens[0, n:] == EOS).all() and (early.commit_step[0, n + 1 :] == -1).all()
    assert (early.commit_step[0, : n + 1] > 0).all()
    assert early.tokens_per_forward == (n + 1) / early.forward_passes


def test_before_stop_keeps_the_holes_up_to_the_first_stop():
    holes = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], dtype=torch.bool)
    chosen = torch.tensor([[5, EOS, 5, EOT, 5], [0, 5, 5, 5, 5], [5, 5, 5, 5, 5], [0, 5, EOS, 5, 5]])
    tokens = torch.tensor([[MASK] * 5, [EOT, MASK, MASK, MASK, MASK], [MASK] * 5, [EOT, MASK, MASK, MASK, MASK]])
    # row 0: a predicted stop at 1 (kept); row 1: a committed stop at 0 leaves nothing; row 2: no stop;
    # row 3: the same committed EOT, but in the prompt (canvas_from=1), so the predicted EOS at 2 counts
    expected = [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]]
    stops = torch.tensor([EOS, EOT])
    assert before_stop(holes[:3], chosen[:3], tokens[:3], stops).long().tolist() == expected[:3]
    assert before_stop(holes[3:], chosen[3:], tokens[3:], stops, canvas_from=1).long().tolist() == expected[3:]


@pytest.mark.parametrize("rule", [dict(threshold=0.5), dict(steps=32)])
def test_mask_tail_never_commits_after_the_stop(rule):
    lm, prompt = tiny(), prompts(2, seed=3)
    cfg = dict(gen_length=32, block_length=8, eos_id=EOS, early_stop=True, **rule)
    seen = []

    def after_stop_committed(index, canvas, commit_step):  # positions after the row's first stop, not masks
        stops = (canvas == EOS).long().cumsum(1) - (canvas == EOS).long() > 0
        seen.append(int((stops & (canvas != MASK)).sum()))

    generate(Recorder(lm, eos_bias=2.0), prompt, mask_id=MASK, config=SamplerConfig(**cfg),
             on_forward=after_stop_committed)
    assert sum(seen) > 0  # the case is exercised: without the option, tokens after a stop get committed
    seen.clear()
    tail = generate(Recorder(lm, eos_bias=2.0), prompt, mask_id=MASK, config=SamplerConfig(mask_tail=True, **cfg),
                    on_forward=after_stop_committed)
    assert seen and sum(seen) == 0
    assert (tail.lengths < 32).any()
    for row, n in enumerate(tail.lengths.tolist()):  # everything up to the stop committed; the tail never was
        assert (tail.commit_step[row, : n + 1] > 0).all() and (tail.commit_step[row, n + 1 :] == -1).all()
        assert (tail.tokens[row, n:] == EOS).all()
    with pytest.raises(ValueError, match="needs early_stop"):
        SamplerConfig(gen_length=8, block_length=8, steps=8, eos_id=EOS, mask_tail=True).validate()


def test_end_of_turn_is_a_stop_token_too():
    model = tiny()
    cfg = SamplerConfig(gen_length=16, block_length=4, threshold=0.5, early_stop=True, eos_id=EOS, stop_ids=(EOT,))
    canvas = torch.full((1, 16), MASK)
    canvas[0, 3] = EOT  # a fixed end of turn: the answer is three tokens long at most
    out = generate(model, prompts(1), mask_id=MASK, config=cfg, canvas=canvas)
    assert out.lengths.item() <= 3 and out.forward_passes <= 3
    assert (out.tokens[0, out.lengths.item() + 1 :] == EOS).all()


def test_each_row_stops_on_its_own_and_leaves_the_batch():
    lm = tiny()
    batch = prompts(3)
    batch[1, 0] = 7  # only this row is pushed towards EOS
    batch[[0, 2], 0] = 8
    cfg = SamplerConfig(gen_length=32, block_length=8, threshold=0.5, early_stop=True, eos_id=EOS)
    model = Recorder(lm, eos_bias=5.0, trigger=7)
    together = generate(model, batch, mask_id=MASK, config=cfg)
    assert together.row_forwards[1] < together.row_forwards[0] and together.lengths[1] < together.lengths[0]
    assert model.calls[-1][1].shape[0] == 2  # the stopped row is no longer computed
    for r in range(3):
        alone = generate(Recorder(lm, eos_bias=5.0, trigger=7), batch[r : r + 1], mask_id=MASK, config=cfg)
        assert torch.equal(alone.tokens[0], together.tokens[r])
        # blocks advance in lockstep: a row that filled its block waits for the others
        assert alone.forward_passes <= together.row_forwards[r]


@pytest.mark.parametrize("cache", ["none", "prefix", "block"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_left_padded_rows_equal_rows_run_alone(cache, cfg_scale):
    lm = tiny()
    short, long = prompts(1, 3, seed=2), prompts(1, 7, seed=3)
    cfg = SamplerConfig(gen_length=16, block_length=8, threshold=0.2, early_stop=True, eos_id=EOS,
                        cache=cache, prefix_dlm=cache == "prefix", cfg_scale=cfg_scale)
    batch = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.tensor([[0, 0, 0, 0, 1, 1, 1], [1] * 7]).bool()
    together = generate(lm, batch, mask_id=MASK, config=cfg, attention_mask=mask).tokens
    for row, prompt in enumerate([short, long]):
        assert torch.equal(together[row], generate(lm, prompt, mask_id=MASK, config=cfg).tokens[0])


def test_template_fills_holes_and_keeps_fixed_tokens():
    lm = tiny()
    canvas = torch.tensor([[5, 6, MASK, MASK, 9, MASK, 11, EOS]])
    holes = canvas == MASK
    for cfg in [SamplerConfig(gen_length=8, block_length=8, steps=3), SamplerConfig(gen_length=8, block_length=8,
                                                                                  threshold=0.9, cache="prefix",
                                                                                  prefix_dlm=True)]:
        out = generate(lm, prompts(2), mask_id=MASK, config=cfg, canvas=canvas)
        assert torch.equal(out.tokens[:, ~holes[0]], canvas[:, ~holes[0]].expand(2, -1))
        assert not (out.tokens == MASK).any()
        assert (out.commit_step[:, ~holes[0]] == 0).all() and (out.commit_step[:, holes[0]] > 0).all()
    assert out.forward_passes <= 3


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(threshold=0.9, factor=1.0), "not both"),
        (dict(threshold=1.5), r"threshold=1.5 must be in \(0, 1\]"),
        (dict(threshold=0.9, remasking="random"), "use remasking='low_confidence'"),
        (dict(confidence="logit"), "confidence='logit'"),
        (dict(early_stop=True), "early_stop needs eos_id"),
        (dict(cache="prefix"), "set prefix_dlm=True"),
        (dict(cache="kv"), "cache='kv'"),
    ],
)
def test_bad_fast_options_are_named(kw, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kw).validate()


def test_prompt_masks_and_cache_and_wrong_canvas_are_refused():
    lm = tiny()
    prompt = prompts(1)
    prompt[0, 2] = MASK
    cfg = SamplerConfig(gen_length=8, block_length=8, steps=8, cache="prefix", prefix_dlm=True)
    with pytest.raises(ValueError, match="cannot refill"):
        generate(lm, prompt, mask_id=MASK, config=cfg)
    with pytest.raises(ValueError, match="canvas has 4 positions, gen_length is 8"):
        generate(lm, prompts(1), mask_id=MASK, config=SamplerConfig(gen_length=8, block_length=8, steps=8),
                 canvas=torch.full((1, 4), MASK))


def test_cache_reports_its_size_and_keeps_selected_rows():
    cache = KVCache()
    k = torch.arange(2 * 2 * 5 * 4, dtype=torch.float32).reshape(2, 2, 5, 4)  # [B, H_kv, T, d]
    cache.splice(0, k, -k, start=0, store=True)
    assert cache.nbytes == 2 * k.numel() * 4
    kept = cache.select(torch.tensor([1]))
    assert torch.equal(kept.keys[0], k[1:]) and torch.equal(kept.values[0], -k[1:]) and kept.length == 5

"""Continuous batching: rows that join a running batch mid-flight, or leave it early, get the tokens, commit
steps and forward counts that `generate` gives each of them alone (temperature 0)."""

from dataclasses import replace

import pytest
import test_infer as infer_tests
import torch
from PIL import Image

from mmdlm.infer.chat_request import request_config
from mmdlm.infer.continuous import RunningBatch
from mmdlm.infer.infer import Answerer, load_model
from mmdlm.sampling import generate

QUESTIONS = ["what?", "how many squares are there on the left of the red circle?", "Describe the image.",
             "what colour is the circle?"]


@pytest.fixture(scope="module")
def answerer(tmp_path_factory):
    return Answerer(*load_model(infer_tests.saved_model(tmp_path_factory.mktemp("model"), "bidirectional")))


@pytest.fixture(scope="module")
def prefix_answerer(tmp_path_factory):
    """A prefix-DLM model (the demo's recipe): its requests decode with the exact prefix cache."""
    folder = infer_tests.saved_model(tmp_path_factory.mktemp("prefix"), "bidirectional", prefix_dlm=True)
    return Answerer(*load_model(folder))


@pytest.fixture(scope="module")
def requests(answerer):
    """(prompt ids, image) of four requests whose prompts all differ in length."""
    images = [Image.effect_noise((30 + 9 * k, 40), 40 + 20 * k).convert("RGB") for k in range(len(QUESTIONS))]
    prompts = [answerer.prompt_ids([{"from": "user", "value": q}], [im]) for q, im in zip(QUESTIONS, images)]
    assert len({len(p) for p in prompts}) == len(prompts)
    return list(zip(prompts, images))


def alone(answerer, prompt, image, config) -> tuple:
    embeds, mask = answerer.prefix([prompt], [[image]])
    out = generate(answerer.model.lm, prefix_embeds=embeds, attention_mask=mask, mask_id=answerer.special.mask,
                   config=config)
    return out.tokens[0].tolist(), out.commit_step[0].tolist(), int(out.lengths[0]), int(out.row_forwards[0])


# The random model commits a stop token at random places when half its vocabulary stops an answer.
HALF_STOPS = tuple(range(20, 150))
CONFIGS = {
    "fixed steps, 4 blocks": dict(options={"max_tokens": 32, "block_length": 8, "threshold": 0}),
    "threshold, 2 blocks": dict(options={"max_tokens": 32, "block_length": 16, "threshold": 0.02}),
    "fixed steps, early stop": dict(options={"max_tokens": 32, "block_length": 8, "threshold": 0},
                                    stop_ids=HALF_STOPS),
    "threshold, early stop": dict(options={"max_tokens": 24, "block_length": 8, "threshold": 0.02},
                                  stop_ids=HALF_STOPS),
    "threshold, early stop, mask tail": dict(options={"max_tokens": 24, "block_length": 8, "threshold": 0.02},
                                             stop_ids=HALF_STOPS, mask_tail=True),
    "cfg, margin": dict(options={"max_tokens": 16, "block_length": 8, "threshold": 0.02, "confidence": "margin"},
                        cfg_scale=1.0),
}


CASES = [(name, "none") for name in CONFIGS] + [(name, "prefix") for name in CONFIGS if "cfg" not in name]


@pytest.mark.parametrize("name,cache", CASES)
def test_rows_that_join_mid_flight_get_the_tokens_they_get_alone(answerer, prefix_answerer, requests, name, cache):
    """Without a cache, and with the prefix cache of a prefix-DLM model (each row's prefix keys and values
    computed as it joins, re-padded as longer prompts join and shorter ones are left)."""
    if cache == "prefix":
        answerer = prefix_answerer
    options = dict(CONFIGS[name])
    config = replace(request_config({**options.pop("options"), "cache": cache}, answerer, 32), **options)
    assert config.cache == cache and config.prefix_dlm == (cache == "prefix")
    expected = [alone(answerer, p, im, config) for p, im in requests]
    batch = RunningBatch(answerer.model.lm, config, answerer.special.mask)
    joins = {0: [0], 1: [2], 3: [1, 3]}  # forward -> rows joining before it; row 1 has the longest prompt
    got, prefix_lens, mixed_blocks, forward = {}, set(), False, 0
    while joins or len(batch):
        if forward in joins:
            rows = joins.pop(forward)
            batch.join(rows, answerer.prefix_rows([requests[r][0] for r in rows], [[requests[r][1]] for r in rows]))
        if len(batch):  # rows that finished early may leave it empty before the last join
            prefix_lens.add(batch.prefix_len)
            mixed_blocks |= len(batch.block.unique()) > 1
            for row in batch.step_all():
                got[row.key] = (row.tokens, row.commit_step, row.length, row.forwards)
        forward += 1
    assert sorted(got) == [0, 1, 2, 3]
    for row in range(4):
        assert got[row] == expected[row], f"row {row}"
    assert len(prefix_lens) >= 2  # rows were re-padded as a longer prompt joined (or trimmed as it left)
    if config.gen_length > config.block_length and "early stop" not in name:
        assert mixed_blocks  # one forward served rows at different blocks
    if "early stop" in name:
        assert any(length < config.gen_length for _, _, length, _ in expected)  # some row stopped early
    if cache == "prefix":
        assert batch.cache is None  # the last row took its keys and values with it


def test_a_running_batch_refuses_the_caches_it_cannot_keep(answerer, prefix_answerer):
    config = request_config({"max_tokens": 16, "cache": "block"}, answerer, 16)  # refreshed per block: approximate
    with pytest.raises(ValueError, match="without a cache"):
        RunningBatch(answerer.model.lm, config, answerer.special.mask)
    config = replace(request_config({"max_tokens": 16}, prefix_answerer, 16), cfg_scale=1.0)
    assert config.cache == "prefix"
    with pytest.raises(ValueError, match="no classifier-free guidance"):
        RunningBatch(prefix_answerer.model.lm, config, prefix_answerer.special.mask)


def test_the_last_row_leaving_empties_the_batch(answerer, requests):
    config = request_config({"max_tokens": 8, "block_length": 8, "threshold": 0}, answerer, 8)
    batch = RunningBatch(answerer.model.lm, config, answerer.special.mask)
    batch.join(["only"], answerer.prefix_rows([requests[0][0]], [[requests[0][1]]]))
    finished = []
    while len(batch):
        finished += batch.step_all()
    assert [row.key for row in finished] == ["only"] and batch.prefix_len == 0
    assert batch.canvas.shape == (0, 8) and torch.equal(batch.forwards, torch.zeros(0, dtype=torch.long))

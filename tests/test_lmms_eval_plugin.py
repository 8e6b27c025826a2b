"""The lmms-eval model `mmdlm`: the Monte-Carlo log-likelihood, generate_until, and lmms-eval's own evaluator.

Everything but the last tests runs without lmms-eval: the plugin class answers request objects
that carry lmms-eval's `args` tuples. With lmms-eval installed (the `lmms-eval` extra), its
evaluator runs the repository's task YAML offline on a generated split.
"""

import json
import math
from collections import namedtuple
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdlm.data.tokenizer import special_ids, train_demo_tokenizer
from mmdlm.diffusion import masked_diffusion_loss
from mmdlm.infer.evaluate import load_references, score
from mmdlm.infer.infer import Answerer, load_model
from mmdlm.infer.likelihood import LikelihoodConfig, answer_loglikelihood
from mmdlm.infer.lmms_eval_plugin import MMDLMEval, cut_at_stops
from mmdlm.multimodal import build_model

REPO = Path(__file__).resolve().parents[1]
VISION = dict(backend="timm", model="vit_tiny_patch16_224", image_size=32, overrides=dict(depth=2))
LM = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=96)
# What the fitted model learns: the answer depends on the question alone.
FACTS = {"what colour is the circle?": "red", "how many squares are there?": "2",
         "is the triangle on the left or the right?": "left", "what shape is the blue object?": "square"}
Request = namedtuple("Request", "args")  # lmms-eval's Instance, as far as a model reads it


def make_folder(folder: Path, fit_steps: int) -> Path:
    """Return `folder` holding a tiny model and its tokenizer, fitted for `fit_steps` steps to FACTS."""
    texts = [*FACTS, *FACTS.values(), "blue", "right", "circle", "3", "Describe the image."] * 10
    tokenizer = train_demo_tokenizer(texts, folder, vocab_size=300)
    special = special_ids(tokenizer)
    torch.manual_seed(0)
    model = build_model(dict(vision=VISION, lm=LM), vocab_size=len(tokenizer), image_token_id=special.image,
                        mask_token_id=special.mask)
    answerer = Answerer(model.eval(), tokenizer)
    rows = []  # (prefix embeddings, canvas) in the SFT layout: answer, end of turn, EOS padding of the canvas
    for question, answer in FACTS.items():
        canvas = answerer.chat.text_ids(answer) + [special.eot]
        canvas = torch.tensor([canvas + [special.eos] * (16 - len(canvas))])
        for colour in ((0, 0, 0), (250, 250, 250), (200, 30, 90)):  # the answer depends on the question alone
            image = Image.new("RGB", (32, 32), colour)
            prompt = answerer.prompt_ids([{"from": "human", "value": question}], [image])
            rows.append((answerer.prefix([prompt], [[image]])[0], canvas))
    optimizer = torch.optim.Adam(model.lm.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for step in range(fit_steps):
        optimizer.zero_grad()
        for prefix, canvas in rows[step % 3 :: 3]:  # each fact, with one of its images

            def logits_fn(noisy, prefix=prefix):
                embeds = torch.cat([prefix, model.lm.get_input_embeddings()(noisy)], dim=1)
                return model.lm(inputs_embeds=embeds, logits_from=prefix.shape[1])

            masked_diffusion_loss(logits_fn, canvas, torch.ones_like(canvas, dtype=torch.bool), special.mask,
                                  generator=generator, schedule="count").loss.backward()
        optimizer.step()
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("random"), fit_steps=0)


@pytest.fixture(scope="module")
def fitted_dir(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("fitted"), fit_steps=600)


def prefix_of(answerer: Answerer, question: str, image: Image.Image | None = None) -> torch.Tensor:
    images = [image] if image is not None else []
    return answerer.prefix([answerer.prompt_ids([{"from": "human", "value": question}], images)], [images])[0]


def test_one_token_answer_is_the_exact_log_probability(random_dir):
    model, tokenizer = load_model(random_dir)
    answerer = Answerer(model, tokenizer)
    prefix = prefix_of(answerer, "what colour is the circle?", Image.new("RGB", (40, 30), (200, 10, 10)))
    mask = answerer.special.mask
    with torch.no_grad():  # by hand: the prompt, then the one answer position masked
        canvas = model.lm.get_input_embeddings()(torch.tensor([[mask]]))
        logp = model.lm(inputs_embeds=torch.cat([prefix, canvas], dim=1))[0, -1].float().log_softmax(-1)
    token = int(logp.argsort()[-2])  # the second most likely: log p < 0, and not the greedy choice
    estimate, greedy = answer_loglikelihood(model.lm, prefix, torch.tensor([token]), mask, LikelihoodConfig(draws=8))
    assert estimate == pytest.approx(float(logp[token]), abs=1e-5) and not greedy
    top = int(logp.argmax())
    estimate, greedy = answer_loglikelihood(model.lm, prefix, torch.tensor([top]), mask, LikelihoodConfig(draws=3))
    assert estimate == pytest.approx(float(logp[top]), abs=1e-5) and greedy


def test_two_token_estimate_converges_to_the_enumerated_bound(random_dir):
    model, tokenizer = load_model(random_dir)
    answerer = Answerer(model, tokenizer)
    prefix, mask, answer = prefix_of(answerer, "how many squares are there?"), answerer.special.mask, [40, 41]

    def logp(canvas: list[int]) -> torch.Tensor:  # [2] log p(answer_i | the canvas)
        with torch.no_grad():
            embeds = torch.cat([prefix, model.lm.get_input_embeddings()(torch.tensor([canvas]))], dim=1)
            out = model.lm(inputs_embeds=embeds, logits_from=prefix.shape[1])[0].float().log_softmax(-1)
        return out[torch.arange(2), torch.tensor(answer)]

    # l = 1 (probability 1/2, weight 2): either token masked alone; l = 2 (weight 1): both masked.
    first_alone, second_alone, both = 2 * logp([mask, answer[1]])[0], 2 * logp([answer[0], mask])[1], logp([mask, mask])
    outcomes = torch.stack([first_alone, second_alone, both.sum()])
    probabilities = torch.tensor([0.25, 0.25, 0.5])
    bound = float((probabilities * outcomes).sum())
    spread = float((probabilities * (outcomes - bound) ** 2).sum().sqrt())
    draws = 400
    estimate, _ = answer_loglikelihood(model.lm, prefix, torch.tensor(answer), mask,
                                       LikelihoodConfig(draws=draws, batch_size=64))
    assert spread > 0.05  # the draws disagree, so agreement below is not a coincidence of equal values
    assert abs(estimate - bound) < 4 * spread / math.sqrt(draws)


def test_estimate_is_reproducible_per_request(random_dir):
    plugin = MMDLMEval(pretrained=str(random_dir), mc_draws=16, mc_batch_size=5)
    plugin.task_dict = {"t": {"test": [{"image": Image.new("RGB", (32, 32), (0, 90, 200))}]}}
    visual = (lambda doc: [doc["image"]], 0, "t", "test")
    one = Request(("what colour is the circle?", "red square", *visual))
    other = Request(("how many squares are there?", "2", *visual))
    alone = plugin.loglikelihood([one])
    assert plugin.loglikelihood([other, one, one]) == [plugin.loglikelihood([other])[0], alone[0], alone[0]]
    reseeded = MMDLMEval(pretrained=str(random_dir), mc_draws=16, mc_batch_size=5, seed=1)
    reseeded.task_dict = plugin.task_dict
    assert reseeded.loglikelihood([one])[0][0] != alone[0][0]  # another seed, other masks, another estimate


def test_fitted_model_prefers_its_answer(fitted_dir):
    plugin = MMDLMEval(pretrained=str(fitted_dir), mc_draws=32)
    plugin.task_dict = {"t": {"test": [{"image": Image.new("RGB", (32, 32))}]}}
    visual = (lambda doc: [doc["image"]], 0, "t", "test")
    for question, answer in FACTS.items():
        wrong = "right" if answer == "left" else "blue" if answer == "red" else "3" if answer == "2" else "circle"
        right, other = plugin.loglikelihood([Request((question, " " + answer, *visual)),
                                             Request((question, wrong, *visual))])
        assert right[0] > other[0] and right[1] and not other[1], (question, right, other)
    # lmms-eval's ("", choice) requests of acc_mutual_info: no document, no image
    (unconditional, _), = plugin.loglikelihood([Request(("", "red"))])
    assert unconditional < 0


def test_generate_until_answers_with_the_sampler_options(fitted_dir):
    plugin = MMDLMEval(pretrained=str(fitted_dir), batch_size=3)
    docs = [{"image": Image.new("RGB", (32, 32), (k * 60, 0, 0))} for k in range(len(FACTS))]
    plugin.task_dict = {"t": {"test": docs}}
    requests = [Request((q, {"max_new_tokens": 16, "until": ["\n"]}, lambda doc: [doc["image"]], k, "t", "test"))
                for k, q in enumerate(FACTS)]
    assert plugin.generate_until(requests) == list(FACTS.values())  # two batches of one group, order kept
    cut = Request((next(iter(FACTS)), {"max_new_tokens": 16, "until": ["e"]}, lambda doc: [doc["image"]], 0, "t",
                   "test"))
    assert plugin.generate_until([cut, requests[1]]) == ["r", "2"]  # its own stop string, the other untouched
    config = plugin.sampler_config({"max_new_tokens": 64, "block_length": 32, "threshold": 0})
    assert (config.gen_length, config.block_length, config.steps, config.threshold) == (64, 32, 64, None)
    assert plugin.sampler_config({}).gen_length == 16 and plugin.sampler_config({"max_new_tokens": 8}).block_length == 8
    with pytest.raises(Exception, match="divisor"):
        plugin.sampler_config({"max_new_tokens": 24, "block_length": 16})


def test_stop_strings_cut_at_the_first():
    assert cut_at_stops("red\nblue. green", ["\n", "."]) == "red"
    assert cut_at_stops("red", ["", "x"]) == "red"


def test_the_package_declares_the_lmms_eval_entry_point():
    (point,) = [p for p in entry_points(group="lmms_eval.models") if p.name == "mmdlm"]
    assert point.value == "mmdlm.infer.lmms_eval_plugin:manifest"


# ---- with lmms-eval installed: its registry and its evaluator, offline ----

QUESTIONS = [  # (question, references): the fitted answer in other surface forms, and wrong ones
    ("what colour is the circle?", ["Red."]), ("how many squares are there?", ["two"]),
    ("is the triangle on the left or the right?", ["LEFT"]), ("what shape is the blue object?", ["circle"]),
    ("what colour is the circle?", ["blue"]),
    ("how many squares are there?", ["2", "two", "2", "3", "3", "1", "3", "1", "3", "4"]),
]


def write_split(folder: Path) -> Path:
    """Return a LLaVA JSON VQA split of QUESTIONS with one noise image each."""
    (folder / "images").mkdir(parents=True)
    entries = []
    for k, (question, refs) in enumerate(QUESTIONS):
        Image.effect_noise((32, 32), 30 + k).convert("RGB").save(folder / "images" / f"{k}.png")
        entry = {"id": f"q{k}", "image": f"images/{k}.png",
                 "conversations": [{"from": "human", "value": "<image>\n" + question},
                                   {"from": "gpt", "value": refs[0]}]}
        if len(refs) > 1:
            entry["answers"] = refs
        entries.append(entry)
    (folder / "qa.json").write_text(json.dumps(entries))
    return folder / "qa.json"


def test_lmms_eval_registry_finds_the_model():
    pytest.importorskip("lmms_eval")
    from lmms_eval.models import get_model

    assert get_model("mmdlm") is MMDLMEval


def test_lmms_eval_evaluator_scores_as_evaluate_py(fitted_dir, tmp_path, monkeypatch):
    pytest.importorskip("lmms_eval")
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    qa = write_split(tmp_path / "split")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "local_vqa.yaml").write_text(
        f"include: {REPO / 'configs/lmms_eval/_default_template_mmdlm_vqa_yaml'}\ntask: local_vqa\n"
        f"dataset_kwargs:\n  data_files:\n    test: {qa}\n"
        f"lmms_eval_specific_kwargs:\n  default:\n    image_folder: {qa.parent}\n"
    )
    out = simple_evaluate(model="mmdlm", model_args=f"pretrained={fitted_dir},device=cpu", tasks=["local_vqa"],
                          batch_size=4, task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                          log_samples=True)
    samples = out["samples"]["local_vqa"]
    predictions = {f"q{s['doc_id']}": s["filtered_resps"][0] for s in samples}
    assert sorted(predictions.values()) == sorted(["red", "2", "left", "square", "red", "2"])
    lmms_score = out["results"]["local_vqa"]["vqa_accuracy,none"]
    ours = score(predictions, load_references(qa), "vqa")["vqa"]
    # red, 2, left right; square vs circle and red vs blue wrong; 2 given by 3 of 10 people: 2/3 when one of
    # them is left out, 1 otherwise, 0.9 on average
    assert 100 * lmms_score == pytest.approx(ours) == pytest.approx(100 * 3.9 / 6)

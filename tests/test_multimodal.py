"""The multimodal model: image splicing, gradients, save/load, prefix-DLM attention, model configs."""

import pytest
import torch
from PIL import Image
from transformers import AutoModel

from mmdlm.config import ConfigError
from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.multimodal import MMDLM, build_model

IMG = 400  # <image> id used in these tests
LM = dict(vocab_size=420, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, mask_token_id=401)
TIMM_VIT = dict(backend="timm", model="vit_tiny_patch16_224", image_size=32, overrides=dict(depth=2))
OPEN_CLIP = dict(backend="open_clip", model="ViT-B-16", image_size=32,
                 overrides=dict(vision_cfg=dict(layers=2, width=64, patch_size=8, head_width=32)))
CNN = dict(model="resnet18", image_size=32, feature_layer=2)


def tiny_model(vision=TIMM_VIT, projector=None, lm=LM, seed=0) -> MMDLM:
    torch.manual_seed(seed)
    return build_model(dict(vision=vision, projector=projector or {}, lm=lm), image_token_id=IMG).eval()


def with_images(text: list[int], n_tokens: int, positions: list[int]) -> list[int]:
    """Insert an image run before each index in `positions` (indices into text; repeats = adjacent images)."""
    out = []
    for i, tok in enumerate(text):
        out += [IMG] * n_tokens * positions.count(i)
        out.append(tok)
    return out


@pytest.mark.parametrize("vision", [TIMM_VIT, OPEN_CLIP], ids=["timm", "open_clip"])
def test_splicing_multi_image_interleaved_batch_with_padding(vision):
    model = tiny_model(vision)
    T = model.num_image_tokens
    pixels = torch.randn(4, 3, 32, 32)
    row0 = with_images([5, 6, 7, 8], T, [1, 3, 3])  # interleaved, and two adjacent images (one run of 2T)
    row1 = with_images([9, 10], T, [0]) + [0] * (len(row0) - 2 - T)  # one image before the text, right padding
    ids = torch.tensor([row0, row1])
    embeds = model.embed(ids, pixels)
    feats = model.encode_images(pixels)
    starts = [(0, 1), (0, 3 + T), (0, 3 + 2 * T), (1, 0)]  # (row, first position) of each image, in order
    for image, (row, pos) in enumerate(starts):
        assert torch.equal(embeds[row, pos:pos + T], feats[image])
    text = ids != IMG
    assert torch.equal(embeds[text], model.lm.get_input_embeddings()(ids)[text])
    mask = torch.tensor([[True] * len(row0), [True] * (2 + T) + [False] * (len(row0) - 2 - T)])
    logits = model(ids, pixels, attention_mask=mask)
    assert logits.shape == (2, len(row0), LM["vocab_size"])
    assert torch.equal(logits, model(ids, attention_mask=mask, image_features=feats))  # the LM-only path


def test_image_count_mismatch_is_a_clear_error():
    model = tiny_model()
    T = model.num_image_tokens
    ids = torch.tensor([with_images([5, 6], T, [0, 1])])
    with pytest.raises(ValueError, match=r"2 <image> runs of lengths \[4, 4\] \(8 tokens\), but 1 images x 4"):
        model.embed(ids, torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"but 0 images"):
        model.embed(ids)
    # Right total, wrong split: a run of 3 and a run of 5 must not be read as two images of 4.
    uneven = torch.tensor([[IMG] * 3 + [5] + [IMG] * 5 + [6]])
    with pytest.raises(ValueError, match=r"lengths \[3, 5\]"):
        model.embed(uneven, torch.randn(2, 3, 32, 32))


def test_gradient_reaches_projector_not_frozen_tower():
    model = tiny_model(dict(TIMM_VIT, frozen=True)).train()
    assert not model.vision.training  # a frozen tower stays in eval mode (dropout, BatchNorm statistics)
    ids = torch.tensor([with_images([5, 6, 7], model.num_image_tokens, [0])])
    model(ids, torch.randn(1, 3, 32, 32)).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_text_only_batch_still_runs_the_tower_in_training():
    model = tiny_model().train()
    logits = model(torch.tensor([[5, 6, 7]]))
    logits.sum().backward()  # every tower parameter takes part (with a zero gradient): ZeRO-3 / DDP stay in step
    assert all(p.grad is not None and not p.grad.any() for p in model.vision.parameters())
    assert torch.equal(logits, model.eval()(torch.tensor([[5, 6, 7]])))
    cnn = tiny_model(CNN).train()  # a trainable BatchNorm tower: the blank image leaves its statistics alone
    before = {k: v.clone() for k, v in cnn.vision.state_dict().items()}
    cnn(torch.tensor([[5, 6, 7]])).sum().backward()
    assert cnn.vision.training and all(torch.equal(v, before[k]) for k, v in cnn.vision.state_dict().items())
    assert all(p.grad is not None and not p.grad.any() for p in cnn.vision.parameters())


@pytest.mark.parametrize("vision,lm", [(TIMM_VIT, LM), (OPEN_CLIP, LM), (CNN, dict(LM, tie_word_embeddings=True))],
                         ids=["timm-vit", "open_clip", "timm-cnn-tied"])
def test_save_load_round_trip_reproduces_logits(tmp_path, vision, lm):
    model = tiny_model(vision, lm=lm)
    model.save_pretrained(tmp_path)
    loaded = MMDLM.from_pretrained(tmp_path)
    ids = torch.tensor([with_images([5, 6, 7], model.num_image_tokens, [0])])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels), loaded(ids, pixels))
    assert (loaded.lm.lm_head.weight is loaded.lm.embed_tokens.weight) == bool(lm.get("tie_word_embeddings"))
    image = Image.new("RGB", (50, 40), (10, 200, 30))
    assert torch.equal(model.image_transform()(image), loaded.image_transform()(image))
    auto = AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert type(auto) is MMDLM and {p.dtype for p in auto.parameters()} == {torch.bfloat16}


def test_prefix_dlm_prefix_hidden_states_ignore_the_answer():
    model = tiny_model()
    prefix = with_images([5, 6], model.num_image_tokens, [0])
    P = len(prefix)
    pixels = torch.randn(1, 3, 32, 32)
    hidden: list[torch.Tensor] = []
    for block in model.lm.layers:
        block.register_forward_hook(lambda module, args, out: hidden.append(out))

    def states(answer: list[int], prefix_len) -> list[torch.Tensor]:
        hidden.clear()
        with torch.no_grad():
            model(torch.tensor([prefix + answer]), pixels, prefix_len=prefix_len)
        return list(hidden)  # one [1, L, D] per block

    a, b = states([20, 21, 22], P), states([30, 31, 32], P)
    assert all(torch.equal(x[:, :P], y[:, :P]) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[-1][:, P:], b[-1][:, P:])
    full_a, full_b = states([20, 21, 22], None), states([30, 31, 32], None)
    assert not torch.equal(full_a[-1][:, :P], full_b[-1][:, :P])  # full bidirectional attention looks ahead


def test_demo_config_builds_with_the_tokenizer_size():
    model = build_model("configs/model/tiny.yaml", vocab_size=300, image_token_id=299, mask_token_id=298)
    assert (model.lm.config.vocab_size, model.lm.config.mask_token_id, model.config.image_token_id) == (300, 298, 299)
    assert model.num_image_tokens == 9  # resnet18's stride-8 map of a 64 px image, pooled to the 3x3 cells
    assert model.image_transform()(Image.new("RGB", (80, 80))).shape == (3, 64, 64)


def test_lm_path_loads_the_language_model(tmp_path):
    torch.manual_seed(0)
    DiffusionLM(DLMConfig(**LM)).save_pretrained(tmp_path / "lm")
    saved = DiffusionLM.from_pretrained(tmp_path / "lm")
    model = build_model(dict(vision=TIMM_VIT, lm_path=str(tmp_path / "lm"), lm=dict(hidden_size=32)),
                        vocab_size=430, image_token_id=IMG)
    assert torch.equal(model.lm.layers[0].attn.q_proj.weight, saved.layers[0].attn.q_proj.weight)
    assert model.lm.config.vocab_size == 430 == model.config.lm["vocab_size"]  # grown for a larger tokenizer
    assert torch.equal(model.lm.embed_tokens.weight[:420], saved.embed_tokens.weight)
    with pytest.raises(ConfigError, match=r"lm sizes disagree .*'hidden_size': \(64, 32\)"):
        build_model(dict(vision=TIMM_VIT, lm_path=str(tmp_path / "lm"), lm=dict(hidden_size=64)))
    with pytest.raises(ConfigError, match="lm_path='/nowhere'"):
        build_model(dict(vision=TIMM_VIT, lm_path="/nowhere"))


def test_config_errors_name_the_entry():
    with pytest.raises(ConfigError, match=r"lm: unknown key\(s\) \['hiden_size'\] for LMConfig"):
        build_model(dict(vision=TIMM_VIT, lm=dict(LM, hiden_size=8)))
    with pytest.raises(ConfigError, match="image_token_id=420 is outside the LM vocabulary of 420"):
        build_model(dict(vision=TIMM_VIT, lm=LM), image_token_id=420)
    with pytest.raises(ConfigError, match="vision: unknown key"):
        build_model(dict(vision=dict(TIMM_VIT, layer=3), lm=LM))


def test_real_scale_config_on_meta_device():
    with torch.device("meta"):
        model = build_model("configs/model/llada-8b-siglip.yaml")
    n = {name: sum(p.numel() for p in part.parameters()) for name, part in
         [("vision", model.vision), ("projector", model.projector), ("lm", model.lm)]}
    # LLaDA-8B: embeddings + head 2*126464*4096, 32 blocks of 4*4096^2 + 3*4096*12288 + 2*4096, final norm.
    assert n["lm"] == 2 * 126464 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 4096
    # SigLIP-so400m up to its penultimate block: patch embedding, 729 positions, 26 of 27 blocks
    # (2 norms, qkv, out, fc1 1152->4304, fc2), no final norm, no attention-pool head.
    D, F = 1152, 4304
    block = 4 * D + (3 * D * D + 3 * D) + (D * D + D) + (D * F + F) + (F * D + D)
    assert n["vision"] == 14 * 14 * 3 * D + D + 729 * D + 26 * block
    assert n["projector"] == 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert sum(n.values()) == 8_434_830_624
    assert 8.3e9 < sum(n.values()) < 8.5e9
    assert model.num_image_tokens == 729 and model.vision.hidden_size == 1152
    assert model.config.lm["eos_token_id"] == 126081 and model.lm.config.mask_token_id == 126336

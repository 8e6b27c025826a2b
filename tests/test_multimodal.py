"""Vision towers, projector and the multimodal model."""

import pytest
import torch
from PIL import Image

from mmdlm.encoders.projector import Projector, ProjectorConfig
from mmdlm.encoders.tower import VisionConfig, VisionTower
from mmdlm.multimodal import MMDLM, build_model

IMG = 400  # <image> id used in these tests
LM = dict(vocab_size=420, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, mask_token_id=401)
TIMM_VIT = dict(backend="timm", model="vit_tiny_patch16_224", image_size=32, overrides=dict(depth=2))
OPEN_CLIP = dict(backend="open_clip", model="ViT-B-16", image_size=32, overrides=dict(
    embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
    text_cfg=dict(context_length=8, vocab_size=100, width=32, heads=2, layers=1)))


def tiny_model(vision=TIMM_VIT, projector=None, seed=0) -> MMDLM:
    torch.manual_seed(seed)
    return build_model(dict(vision=vision, projector=projector or {}, lm=LM), image_token_id=IMG).eval()


def with_images(text: list[int], n_tokens: int, positions: list[int]) -> list[int]:
    """Insert an image run before each index in `positions` (indices into text)."""
    out = []
    for i, tok in enumerate(text):
        if i in positions:
            out += [IMG] * n_tokens
        out.append(tok)
    return out


def test_penultimate_layer_and_pruning():
    tower = VisionTower(VisionConfig(**TIMM_VIT))
    assert len(tower.backbone.blocks) == 1  # the last block is pruned: it would never get a gradient
    assert (tower.num_tokens, tower.hidden_size) == (4, 192)
    cls = VisionTower(VisionConfig(**TIMM_VIT, use_cls=True))
    assert cls.num_tokens == 5


def test_cnn_feature_map_becomes_raster_tokens():
    tower = VisionTower(VisionConfig(model="resnet18", image_size=64, feature_layer=2))
    assert (tower.num_tokens, tower.hidden_size) == (64, 128)
    assert len(tower.backbone.layer3) == 0 and len(tower.backbone.layer4) == 0  # pruned after the s8 map


def test_missing_local_weights_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="vision.weights"):
        VisionTower(VisionConfig(**TIMM_VIT, weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ValueError, match="vision.backend"):
        VisionTower(VisionConfig(backend="hub", model="x"))


def test_projector_pooling_quarters_the_tokens():
    proj = Projector(ProjectorConfig(pool=2), vision_width=8, lm_width=16)
    feats = torch.arange(16.0).reshape(1, 16, 1).repeat(1, 1, 8)  # 4x4 grid, value = raster index
    assert proj.num_tokens(16) == 4
    pooled = torch.tensor([2.5, 4.5, 10.5, 12.5])[None, :, None].repeat(1, 1, 8)  # 2x2 means, raster order
    torch.testing.assert_close(proj(feats), proj.proj(pooled))
    with pytest.raises(ValueError, match="square grid"):
        proj.num_tokens(15)


@pytest.mark.parametrize("vision", [TIMM_VIT, OPEN_CLIP], ids=["timm", "open_clip"])
def test_splicing_multi_image_interleaved_batch_with_padding(vision):
    model = tiny_model(vision)
    T = model.num_image_tokens
    pixels = torch.randn(3, 3, 32, 32)
    row0 = with_images([5, 6, 7, 8], T, [1, 3])  # two images, interleaved with text
    row1 = with_images([9, 10], T, [0]) + [0] * (len(row0) - len([9, 10]) - T)  # one image, right padding
    ids = torch.tensor([row0, row1])
    embeds = model.embed(ids, pixels)
    feats = model.encode_images(pixels)
    starts = [(0, 1), (0, 3 + T), (1, 0)]  # (row, first position) of each image run, in order
    for image, (row, pos) in enumerate(starts):
        assert torch.equal(embeds[row, pos:pos + T], feats[image])
    text = ids != IMG
    assert torch.equal(embeds[text], model.lm.get_input_embeddings()(ids)[text])
    mask = torch.tensor([[True] * len(row0), [True] * (2 + T) + [False] * (len(row0) - 2 - T)])
    assert model(ids, pixels, attention_mask=mask).shape == (2, len(row0), LM["vocab_size"])


def test_image_count_mismatch_is_a_clear_error():
    model = tiny_model()
    ids = torch.tensor([with_images([5, 6], model.num_image_tokens, [0, 1])])
    with pytest.raises(ValueError, match=r"8 <image> tokens in 2 runs, but 1 images x 4 tokens"):
        model.embed(ids, torch.randn(1, 3, 32, 32))


def test_gradient_reaches_projector_not_frozen_tower():
    model = tiny_model(dict(TIMM_VIT, frozen=True)).train()
    ids = torch.tensor([with_images([5, 6, 7], model.num_image_tokens, [0])])
    model(ids, torch.randn(1, 3, 32, 32)).logsumexp(-1).mean().backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())


def test_text_only_batch_still_runs_the_tower_in_training():
    model = tiny_model().train()
    model(torch.tensor([[5, 6, 7]])).sum().backward()
    assert all(p.grad is not None for p in model.vision.parameters() if p.requires_grad)


@pytest.mark.parametrize("vision", [TIMM_VIT, OPEN_CLIP, dict(model="resnet18", image_size=32, feature_layer=2)],
                         ids=["timm-vit", "open_clip", "timm-cnn"])
def test_save_load_round_trip_reproduces_logits(tmp_path, vision):
    model = tiny_model(vision)
    model.save_pretrained(tmp_path)
    loaded = MMDLM.from_pretrained(tmp_path)
    ids = torch.tensor([with_images([5, 6, 7], model.num_image_tokens, [0])])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(ids, pixels), loaded(ids, pixels))
    assert type(loaded.image_transform()(Image.new("RGB", (50, 40)))) is torch.Tensor


def test_image_transform_comes_from_the_tower_config():
    model = tiny_model()
    x = model.image_transform()(Image.new("RGB", (100, 60), (255, 255, 255)))
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(x, torch.ones(3, 32, 32))  # timm ViT mean/std 0.5: white -> 1.0


def test_prefix_dlm_prefix_hidden_states_ignore_the_answer():
    model = tiny_model()
    prefix = with_images([5, 6], model.num_image_tokens, [0])
    P = len(prefix)
    pixels = torch.randn(1, 3, 32, 32)
    a = torch.tensor([prefix + [20, 21, 22]])
    b = torch.tensor([prefix + [30, 31, 32]])
    with torch.no_grad():
        la, lb = model(a, pixels, prefix_len=P), model(b, pixels, prefix_len=P)
        full_a, full_b = model(a, pixels), model(b, pixels)
    assert torch.equal(la[:, :P], lb[:, :P])
    assert not torch.equal(full_a[:, :P], full_b[:, :P])  # full bidirectional attention does look ahead


def test_real_scale_config_on_meta_device():
    with torch.device("meta"):
        model = build_model("configs/model/llada-8b-siglip.yaml")
    n = {name: sum(p.numel() for p in part.parameters()) for name, part in
         [("vision", model.vision), ("projector", model.projector), ("lm", model.lm)]}
    # LLaDA-8B: embeddings + head 2*126464*4096, 32 blocks of 4*4096^2 + 3*4096*12288 + 2*4096, final norm.
    assert n["lm"] == 2 * 126464 * 4096 + 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 4096
    assert n["projector"] == 1152 * 4096 + 4096 + 4096 * 4096 + 4096
    assert model.num_image_tokens == 729 and model.vision.hidden_size == 1152
    assert 8.3e9 < sum(n.values()) < 8.5e9

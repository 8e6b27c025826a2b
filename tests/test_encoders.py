"""Vision towers (timm | open_clip), their preprocessing, and the projector."""

import open_clip
import pytest
import timm
import torch
from PIL import Image

from mmdlm.config import ConfigError
from mmdlm.encoders.processor import image_transform
from mmdlm.encoders.projector import Projector, ProjectorConfig
from mmdlm.encoders.tower import VisionConfig, VisionTower

TIMM_VIT = dict(backend="timm", model="vit_tiny_patch16_224", image_size=32, overrides=dict(depth=3))
# Only the entries to change: open_clip's own ViT-B-16 config fills in the rest.
OPEN_CLIP_VIT = dict(vision_cfg=dict(layers=3, width=64, patch_size=8, head_width=32))


def striped(width: int, height: int) -> Image.Image:
    """Return a red image with a blue stripe (an eighth of the width) at its left edge."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, width // 8, height))
    return image


def test_timm_vit_takes_the_penultimate_block_and_prunes_the_rest():
    torch.manual_seed(0)
    tower = VisionTower(VisionConfig(**TIMM_VIT, use_cls=True)).eval()
    torch.manual_seed(0)
    full = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = full.norm_pre(full._pos_embed(full.patch_embed(x)))  # [2, 1 + 4, 192]
        for block in full.blocks[:-1]:  # LLaVA's hidden_states[-2]: the output of the second-to-last block
            h = block(h)
        out = tower(x)
    assert len(tower.backbone.blocks) == 2 and isinstance(tower.backbone.norm, torch.nn.Identity)
    assert (tower.num_tokens, tower.hidden_size) == (5, 192)  # class token + 2x2 patches
    torch.testing.assert_close(out, h, rtol=0, atol=0)
    tower.cfg.use_cls = False
    with torch.no_grad():
        torch.testing.assert_close(tower(x), h[:, 1:], rtol=0, atol=0)


def test_cnn_feature_map_becomes_raster_tokens_and_the_probe_leaves_batchnorm_alone():
    tower = VisionTower(VisionConfig(model="resnet18", image_size=64, feature_layer=2))
    net = tower.backbone
    assert (tower.num_tokens, tower.hidden_size) == (64, 128)  # stride 8: an 8x8 grid of 128 channels
    assert len(net.layer3) == 0 and len(net.layer4) == 0  # pruned after the stride-8 map
    assert int(net.bn1.num_batches_tracked) == 0 and torch.equal(net.bn1.running_mean, torch.zeros(64))
    x = torch.randn(2, 3, 64, 64)
    tower.eval()
    with torch.no_grad():
        grid = net.layer2(net.layer1(net.maxpool(net.act1(net.bn1(net.conv1(x))))))  # [2, 128, 8, 8]
        tokens = tower(x)  # [2, 64, 128]
    assert torch.equal(tokens[:, 3 * 8 + 5], grid[:, :, 3, 5])
    with pytest.raises(ValueError, match="vision.use_cls=true, but resnet18 has no class token"):
        VisionTower(VisionConfig(model="resnet18", image_size=64, use_cls=True))


def test_open_clip_tower_from_overrides_and_a_local_checkpoint(tmp_path):
    overrides = dict(OPEN_CLIP_VIT, embed_dim=32, text_cfg=dict(context_length=8, vocab_size=100, width=32,
                                                                 heads=2, layers=1))
    # open_clip itself replaces vision_cfg whole (the tower merges it), so the reference spells it out.
    full_cfg = dict(overrides, vision_cfg=dict(OPEN_CLIP_VIT["vision_cfg"], image_size=32))
    reference = open_clip.create_model("ViT-B-16", **full_cfg).eval()
    torch.save(reference.state_dict(), tmp_path / "clip.pt")
    cfg = VisionConfig(backend="open_clip", model="ViT-B-16", image_size=32, overrides=overrides, use_cls=True,
                       weights=str(tmp_path / "clip.pt"))
    tower = VisionTower(cfg).eval()
    assert len(tower.backbone.transformer.resblocks) == 2 and tower.backbone.proj is None
    assert (tower.num_tokens, tower.hidden_size) == (17, 64)  # class token + 4x4 patches of 8 px
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = reference.visual.forward_intermediates(x, indices=[1], intermediates_only=True, output_fmt="NLC",
                                                     output_extra_tokens=True)
        expected = torch.cat([ref["image_intermediates_prefix"][0], ref["image_intermediates"][0]], 1)
        torch.testing.assert_close(tower(x), expected, rtol=0, atol=0)
    random_init = VisionTower(VisionConfig(backend="open_clip", model="ViT-B-16", image_size=32,
                                           overrides=dict(vision_cfg=dict(layers=2, width=64, patch_size=8))))
    assert (random_init.num_tokens, random_init.hidden_size) == (16, 64)


def test_timm_weights_come_from_a_local_file(tmp_path):
    torch.manual_seed(1)
    reference = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=3)  # with its classifier head
    torch.save(reference.state_dict(), tmp_path / "vit.pth")
    tower = VisionTower(VisionConfig(**TIMM_VIT, weights=str(tmp_path / "vit.pth")))
    for name, param in tower.backbone.named_parameters():
        assert torch.equal(param, reference.get_parameter(name)), name


def test_errors_name_the_config_key(tmp_path):
    with pytest.raises(ConfigError, match="vision.weights"):
        VisionTower(VisionConfig(**TIMM_VIT, weights=str(tmp_path / "nope.safetensors")))
    with pytest.raises(ValueError, match="vision.backend"):
        VisionTower(VisionConfig(backend="hub", model="x"))
    with pytest.raises(ValueError, match="vision.model.*never downloads"):
        VisionTower(VisionConfig(backend="open_clip", model="hf-hub:timm/ViT-B-16-SigLIP"))
    with pytest.raises(ValueError, match="vision.model='resnet18' is not an open_clip model"):
        VisionTower(VisionConfig(backend="open_clip", model="resnet18"))


@pytest.mark.parametrize("backend,model", [("timm", "vit_so400m_patch14_siglip_384"),
                                           ("open_clip", "ViT-SO400M-14-SigLIP-384")])
def test_real_siglip_gets_its_own_preprocessing(backend, model):
    with torch.device("meta"):  # the real tower's shape and config, nothing allocated
        tower = VisionTower(VisionConfig(backend=backend, model=model))
    assert (tower.num_tokens, tower.hidden_size, tower.input_size) == (729, 1152, (384, 384))
    x = image_transform(tower)(striped(600, 300))
    assert x.shape == (3, 384, 384)
    # SigLIP: mean = std = 0.5, so red -> (1, -1, -1) and blue -> (-1, -1, 1); the whole image is
    # resized (no crop), so the stripe at the left edge survives in column 0.
    torch.testing.assert_close(x[:, 100, 0], torch.tensor([-1.0, -1.0, 1.0]))
    torch.testing.assert_close(x[:, 100, -1], torch.tensor([1.0, -1.0, -1.0]))


def test_center_crop_option_keeps_the_tower_configs_crop():
    tower = VisionTower(VisionConfig(**TIMM_VIT, center_crop=True))
    x = image_transform(tower)(striped(64, 32))  # resized to 64x32, then the centre 32x32 crop: no stripe
    torch.testing.assert_close(x[:, 16, 0], torch.tensor([1.0, -1.0, -1.0]))
    squash = image_transform(VisionTower(VisionConfig(**TIMM_VIT)))(striped(64, 32))
    torch.testing.assert_close(squash[:, 16, 0], torch.tensor([-1.0, -1.0, 1.0]))


def test_projector_types_and_pooling():
    proj = Projector(ProjectorConfig(pool=2), vision_width=8, lm_width=16)
    feats = torch.arange(16.0).reshape(1, 16, 1).repeat(1, 1, 8)  # 4x4 grid, value = raster index
    assert proj.num_tokens(16) == 4
    pooled = torch.tensor([2.5, 4.5, 10.5, 12.5])[None, :, None].repeat(1, 1, 8)  # 2x2 means, raster order
    torch.testing.assert_close(proj(feats), proj.proj(pooled))
    assert [type(m).__name__ for m in proj.proj] == ["Linear", "GELU", "Linear"]  # LLaVA-1.5's mlp2x_gelu
    linear = Projector(ProjectorConfig(type="linear"), vision_width=8, lm_width=16)
    assert linear(torch.randn(2, 5, 8)).shape == (2, 5, 16) and linear.num_tokens(5) == 5
    odd = torch.arange(9.0).reshape(1, 9, 1).repeat(1, 1, 8)  # 3x3 grid: edge windows average what they cover
    assert proj.num_tokens(9) == 4 and proj.num_tokens(729) == 196  # SigLIP-384's 27x27 -> 14x14 (LaViDa)
    torch.testing.assert_close(proj(odd), proj.proj(torch.tensor([2.0, 3.5, 6.5, 8.0])[None, :, None].repeat(1, 1, 8)))
    with pytest.raises(ValueError, match="square grid"):
        proj.num_tokens(15)
    with pytest.raises(ValueError, match="projector.type='mlp3x'"):
        Projector(ProjectorConfig(type="mlp3x"), 8, 16)


def test_projector_grid_pools_to_cells_and_adds_a_learned_position_per_token():
    proj = Projector(ProjectorConfig(grid=3, pos_embed=True), vision_width=4, lm_width=6, vision_tokens=64)
    assert proj.num_tokens(64) == 9 and proj.pos_embed.shape == (1, 9, 6)
    feats = torch.randn(2, 64, 4)
    cells = torch.nn.functional.adaptive_avg_pool2d(feats.transpose(1, 2).reshape(2, 4, 8, 8), 3)
    expected = proj.proj(cells.flatten(2).transpose(1, 2))
    torch.testing.assert_close(proj(feats), expected)  # the embedding starts at zero
    with torch.no_grad():
        proj.pos_embed.copy_(torch.arange(54.0).reshape(1, 9, 6))
    torch.testing.assert_close(proj(feats) - expected, proj.pos_embed.expand(2, 9, 6))
    with pytest.raises(ValueError, match="not both"):
        Projector(ProjectorConfig(grid=3, pool=2), 4, 6)

"""The training layer's parts in one process: configs, data order, schedule, optimizer groups, guard, files."""

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import torch

from mmdlm.config import ConfigError, load_config, load_yaml
from mmdlm.data.errors import DataError
from mmdlm.encoders.cache import TowerCache, fingerprint
from mmdlm.model import DiffusionLM, DLMConfig, LMConfig
from mmdlm.multimodal import MMDLM, build_model
from mmdlm.train import export as export_mod
from mmdlm.train.build import deepspeed_config, lr_lambda, param_groups
from mmdlm.train.checkpoint import MARKER, TrainState, _prune, check_fresh_start, complete_checkpoints
from mmdlm.train.config import DataConfig, TrainConfig, load_train_config
from mmdlm.train.export import merge_lora, write_model_folder
from mmdlm.train.loader import ResumableBatchSampler, advance, start_position, take_fractions
from mmdlm.train.metrics import MetricsLog, NonFiniteGuard, TrainingDiverged

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["align", "pretrain", "sft", "finetune", "finetune_llada_v", "demo_sft", "demo_caption", "demo_tower_caption"]


def tiny_model() -> MMDLM:
    torch.manual_seed(0)
    return build_model(ROOT / "configs/model/tiny.yaml", vocab_size=64, image_token_id=6, mask_token_id=2)


def take(sampler, n: int) -> list[list[int]]:
    return [batch for _, batch in zip(range(n), iter(sampler))]


def test_batches_are_disjoint_across_ranks_and_resume_where_they_stopped():
    a = ResumableBatchSampler(40, 4, rank=0, world=2, seed=3)
    b = ResumableBatchSampler(40, 4, rank=1, world=2, seed=3)
    first_a, first_b = next(iter(a)), next(iter(b))
    assert not set(first_a) & set(first_b)
    straight = take(a, 12)  # crosses an epoch boundary (5 batches per epoch)
    assert sorted(sum(straight[:5], []) + sum(take(b, 5), [])) == list(range(40))
    assert advance(40, 8, 0, 0, 7) == (1, 16)  # 7 rounds of 8: the whole of epoch 0 (5), 2 into epoch 1
    resumed = take(ResumableBatchSampler(40, 4, 0, 2, 3, *advance(40, 8, 0, 0, 7)), 5)
    assert resumed == straight[7:12]
    with pytest.raises(ConfigError, match="cannot fill a batch"):
        ResumableBatchSampler(6, 4, 0, 2, 0)


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3), (4, 2)])
def test_resume_on_another_world_size_sees_each_sample_of_the_epoch_once(before, after):
    """World `before` takes 3 rounds of 3 per rank, world `after` goes on: epoch 0 is one permutation, no repeats."""
    size, batch, seed = 50, 3, 5
    state = TrainState(batches_consumed=3, data_round=batch * before)  # saved after 3 micro-batches per rank
    epoch, offset = start_position(state, size, batch * after)
    assert (epoch, offset) == (0, 9 * before)

    def seen_by(world: int, rounds: int, *position: int) -> list[int]:
        samplers = [ResumableBatchSampler(size, batch, rank, world, seed, *position) for rank in range(world)]
        return [i for sampler in samplers for b in take(sampler, rounds) for i in b]

    rounds_left = (size - offset) // (batch * after)
    seen = seen_by(before, 3) + seen_by(after, rounds_left, epoch, offset)
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    assert len(seen) == len(set(seen)) and set(seen) == set(order[: len(seen)])  # a prefix of the epoch's order
    assert size - len(seen) < batch * after  # only the ragged tail is left out
    # The next batch after that is the first of epoch 1 on the new world.
    nxt = take(ResumableBatchSampler(size, batch, 0, after, seed, epoch, offset), rounds_left + 1)[-1]
    order1 = torch.randperm(size, generator=torch.Generator().manual_seed(seed + 1)).tolist()
    assert nxt == order1[0 : batch * after : after]


@pytest.mark.parametrize("before, after", [(2, 1), (1, 3)])
def test_group_by_file_batches_one_file_in_random_order_and_resumes_on_another_world_size(before, after):
    size, batch, seed, group = 96, 4, 7, 24
    sources = [0] * 72 + [1] * 24  # 3/4 short VQA rows (file 0), 1/4 long captions (file 1)
    plain = ResumableBatchSampler(size, batch, 0, 1, seed)
    grouped = ResumableBatchSampler(size, batch, 0, 1, seed, sources=sources, group=group)
    for epoch in (0, 1):  # each group of the epoch's permutation: file 0's rows, then file 1's, each in their order
        order, base = grouped.order(epoch), plain.order(epoch)
        for k in range(0, size, group):
            assert order[k : k + group] == [i for f in (0, 1) for i in base[k : k + group] if sources[i] == f]
    mixed = lambda sampler: sum(len({sources[i] for i in b}) > 1 for b in take(sampler, 24))  # noqa: E731
    assert mixed(grouped) <= 4 < mixed(plain)  # at most the batch that straddles the two files, per group
    # Resume on another world size: epoch 0 is still one pass over the grouped order, no repeats.
    state = TrainState(batches_consumed=2, data_round=batch * before)
    epoch, offset = start_position(state, size, batch * after)
    first = [ResumableBatchSampler(size, batch, r, before, seed, sources=sources, group=group) for r in range(before)]
    seen = [i for sampler in first for b in take(sampler, 2) for i in b]
    rounds = (size - offset) // (batch * after)
    resumed = [ResumableBatchSampler(size, batch, r, after, seed, epoch, offset, sources, group) for r in range(after)]
    seen += [i for sampler in resumed for b in take(sampler, rounds) for i in b]
    assert sorted(seen) == sorted(grouped.order(0)[: len(seen)]) and len(seen) == len(set(seen))
    assert size - len(seen) < batch * after


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(max_steps=100)
    cfg.optim.warmup_steps, cfg.optim.min_lr_ratio = 10, 0.1
    f = lr_lambda(cfg)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(100) == pytest.approx(0.1) and f(55) == pytest.approx(0.55) and f(500) == pytest.approx(0.1)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_configs_load_and_differ_only_in_data_and_modules(stage):
    cfg = load_train_config(ROOT / f"configs/train/{stage}.yaml")
    cfg.validate()
    expected = {"align": ["projector"], "demo_sft": ["projector", "lm"], "demo_caption": ["projector", "lm"],
                "pretrain": ["projector", "lm"], "sft": ["vision", "projector", "lm"],
                "finetune": ["vision", "projector", "lm"], "finetune_llada_v": ["projector", "lm"]}
    if stage in expected:
        assert cfg.trainable == expected[stage]
    assert bool(cfg.data.shards) == (stage == "pretrain")
    if stage == "sft":
        assert cfg.optim.lr_multipliers["vision"] == 0.2  # LLaDA-V: the tower at a fifth of the LM's rate


def test_deepspeed_files_hold_only_zero_settings_and_get_concrete_numbers():
    stages = {}
    for name in ["zero2", "zero3", "zero3_offload"]:
        cfg = TrainConfig(deepspeed=str(ROOT / f"configs/deepspeed/{name}.json"), micro_batch_size=3, grad_accum=5,
                          precision="fp32")
        ds = deepspeed_config(cfg, world=4)
        assert "auto" not in json.dumps(ds)
        assert ds["train_batch_size"] == 60 and ds["gradient_accumulation_steps"] == 5
        assert ds["gradient_clipping"] == cfg.optim.grad_clip and ds["bf16"] == {"enabled": False}
        stages[name] = ds["zero_optimization"]
    assert stages["zero2"]["stage"] == 2 and stages["zero3"]["stage"] == 3
    assert stages["zero3"]["stage3_gather_16bit_weights_on_model_save"]
    assert stages["zero3_offload"]["offload_optimizer"]["device"] == "cpu"
    assert "slots=" in (ROOT / "configs/deepspeed/hostfile.example").read_text()


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", ["optim.learning_rate=1"])
    for override, message in [("grad_accum=0", "grad_accum"),
                              ("deepspeed=nope.json", "nope.json"), ("data.shards=x.tar", "exactly one"),
                              ("optim.lr_multipliers={tower: 0.1}", "lr_multipliers"),
                              ("ar_warmup_steps=-1", "ar_warmup_steps"),
                              ("first_token_weight=-1", "first_token_weight"),
                              ("data.group_by_file=-5", "group_by_file"),
                              ("trainable=[vision,lm]", "tower_cache_gb"),  # demo_sft caches its frozen tower
                              ("tower_cache_gb=-1", "tower_cache_gb"),
                              ("objective=autoregressive", "need objective=diffusion")]:  # demo_sft warms up with AR
        cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", [override])
        with pytest.raises(ConfigError, match=message):
            cfg.validate()
    # Choices (Literal fields) are refused by the loader, and by validate() for a config built in code.
    for override, message in [("trainable=[decoder]", r"trainable='decoder' must be one of \('vision', "),
                              ("mask_schedule=cosine", r"mask_schedule='cosine' must be one of \('ratio', 'count'\)"),
                              ("data.sft_padding=pad", r"data.sft_padding='pad' must be one of"),
                              ("model.lm.attention=sideways", r"model.lm.attention='sideways' must be one of")]:
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", [override])
    with pytest.raises(ConfigError, match=r"precision='fp8' must be one of \('auto', 'fp32', 'bf16'\)"):
        TrainConfig(precision="fp8").validate()
    # The model section: finetune starts from the demo's saved folder, so a model change there is
    # refused; the old model_overrides form names the new one.
    with pytest.raises(ConfigError, match="init_from='runs/demo/sft/model' builds the model from its own"):
        load_train_config(ROOT / "configs/train/finetune.yaml", ["model.lm.attention=causal"])
    with pytest.raises(ConfigError, match=r"model_overrides is gone: .*--set model.lm.hidden_size=32"):
        load_train_config(ROOT / "configs/train/demo_sft.yaml", ["model_overrides=[lm.attention=causal]"])
    old = tmp_path / "old.yaml"
    old.write_text("model: configs/model/tiny.yaml\nmodel_overrides: [lm.num_hidden_layers=1]\n")
    with pytest.raises(ConfigError, match="model_overrides is gone"):
        load_train_config(old)
    with pytest.raises(ConfigError, match="no model: set model"):
        TrainConfig(data=DataConfig(json=["x.json"]), deepspeed=str(ROOT / "configs/deepspeed/zero2.json")).validate()
    auto = tmp_path / "auto.json"
    auto.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto"}))
    with pytest.raises(ConfigError, match="auto"):
        deepspeed_config(TrainConfig(deepspeed=str(auto)), 1)
    zero3 = TrainConfig(deepspeed=str(ROOT / "configs/deepspeed/zero3.json"), tower_cache_gb=1.0)
    deepspeed_config(zero3, 1)  # one rank: nothing to mismatch
    with pytest.raises(ConfigError, match="tower_cache_gb needs ZeRO stage < 3"):
        deepspeed_config(zero3, 2)


def test_tower_cache_returns_the_towers_output_and_computes_each_image_once():
    model = tiny_model()
    model.vision.requires_grad_(False)
    model.train()  # a frozen tower stays in eval mode
    calls = []
    model.vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    torch.manual_seed(1)
    images = torch.randn(5, 3, 64, 64)
    expected = model.encode_images(images).detach()
    model.tower_cache = TowerCache(max_bytes=3 * 64 * 128 * 4)  # room for three images' features
    first = model.encode_images(images[[0, 1, 2, 3]])
    again = model.encode_images(images[[3, 2, 4, 1, 0]])
    torch.testing.assert_close(first, expected[[0, 1, 2, 3]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, expected[[3, 2, 4, 1, 0]], rtol=1e-5, atol=1e-5)
    # Only the first three fit: the second call recomputes images 3 and 4, in one tower call.
    assert calls == [5, 4, 2] and len(model.tower_cache.entries) == 3
    assert (model.tower_cache.hits, model.tower_cache.misses) == (3, 6)
    assert first.requires_grad  # the projector still trains on cached features


def test_a_saved_tower_cache_serves_the_next_run_and_is_named_by_the_towers_weights(tmp_path):
    from mmdlm.train.train import load_tower_cache, tower_cache_file

    model = tiny_model()
    model.vision.requires_grad_(False)
    torch.manual_seed(1)
    images = torch.randn(4, 3, 64, 64)
    model.tower_cache = TowerCache(max_bytes=2**30)
    expected = model.encode_images(images).detach()
    path = tower_cache_file(model, tmp_path, 0)
    model.tower_cache.save(path)
    # A later run on the same tower: every image is a hit, and the features are the saved ones.
    model.tower_cache = TowerCache(max_bytes=2**30)
    load_tower_cache(model, tmp_path, rank=0)
    calls = []
    model.vision.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    torch.testing.assert_close(model.encode_images(images[[2, 0]]), expected[[2, 0]], rtol=0, atol=0)
    assert calls == [] and (model.tower_cache.hits, model.tower_cache.misses) == (2, 0)
    # A changed tower has another fingerprint, so it never reads those features.
    before = fingerprint(model.vision)
    with torch.no_grad():
        next(model.vision.parameters())[0].add_(1e-3)
    assert fingerprint(model.vision) != before and tower_cache_file(model, tmp_path, 0) != path
    model.tower_cache = TowerCache(max_bytes=2**30)
    load_tower_cache(model, tmp_path, rank=0)
    assert model.tower_cache.entries == {}
    # The memory cap holds for loaded entries too.
    small = TowerCache(max_bytes=2 * 64 * 128 * 4)
    assert small.load(path) == 2 and len(small.entries) == 2


def test_model_section_is_a_file_a_mapping_or_both():
    """`model:` names a model YAML; `--set model.lm.x=v` changes one field of it; `base:` + changes in YAML."""
    tiny = load_yaml(ROOT / "configs/model/tiny.yaml")
    cfg = load_train_config(ROOT / "configs/train/demo_sft.yaml", ["model.lm.hidden_size=32"])
    assert cfg.model.lm.hidden_size == 32 and cfg.model.lm.num_hidden_layers == tiny["lm"]["num_hidden_layers"]
    assert cfg.model.vision.model == tiny["vision"]["model"] and cfg.model.projector.grid == tiny["projector"]["grid"]
    assert cfg.model.lm.rms_norm_eps is None  # not in the YAML: DLMConfig's default applies
    caption = load_train_config(ROOT / "configs/train/demo_tower_caption.yaml")
    assert (caption.model.lm.num_hidden_layers, caption.model.lm.attention) == (1, "causal")
    assert caption.model.lm.hidden_size == tiny["lm"]["hidden_size"] and caption.model.vision == cfg.model.vision
    swapped = load_train_config(ROOT / "configs/train/demo_sft.yaml",
                                ["model=configs/model/llada-8b-siglip.yaml", "model.lm.num_hidden_layers=2"])
    assert (swapped.model.lm.hidden_size, swapped.model.lm.num_hidden_layers) == (4096, 2)
    # The LM section names DLMConfig's fields exactly (plus the token ids transformers keeps).
    params = set(inspect.signature(DLMConfig.__init__).parameters) - {"self", "kwargs"}
    assert {f.name for f in dataclasses.fields(LMConfig)} == params | {"eos_token_id", "pad_token_id", "bos_token_id"}


def test_overrides_take_numbers_as_people_write_them():
    # YAML 1.1 reads `5e-4` (no dot) as a string; the README's own example must still be a float.
    cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml",
                      ["optim.lr=5e-4", "optim.grad_clip=1", "max_steps=7"])
    assert (cfg.optim.lr, cfg.optim.grad_clip, cfg.max_steps) == (5e-4, 1.0, 7)
    assert type(cfg.optim.grad_clip) is float
    with pytest.raises(ConfigError, match=r"optim\.lr: expected float, got 'fast'"):
        load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", ["optim.lr=fast"])
    with pytest.raises(ConfigError, match="max_steps: expected int, got 1.5"):
        load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", ["max_steps=1.5"])


def test_param_groups_hold_only_trainable_modules_at_their_rates():
    model = tiny_model()
    cfg = TrainConfig(trainable=["vision", "projector"])
    cfg.optim.lr, cfg.optim.lr_multipliers = 1e-3, {"vision": 0.2}
    for name in ("vision", "projector", "lm"):
        getattr(model, name).requires_grad_(name in cfg.trainable)
    groups = param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["vision", "projector"]
    assert [g["lr"] for g in groups] == pytest.approx([2e-4, 1e-3])
    assert sum(len(g["params"]) for g in groups) == len(list(model.vision.parameters())) + len(
        list(model.projector.parameters()))
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        param_groups(model, cfg)


def test_lora_merge_matches_peft():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lm = DiffusionLM(DLMConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1))
    peft_lm = get_peft_model(lm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in peft_lm.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make the merge do something
            p.data.normal_()
    wrapped = {f"lm.{k}": v.clone() for k, v in peft_lm.state_dict().items()}
    merged = merge_lora(wrapped, scale=8 / 4)
    reference = {f"lm.{k}": v for k, v in peft_lm.merge_and_unload().state_dict().items()}
    assert merged.keys() == reference.keys()
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in reference)
    base = wrapped["lm.base_model.model.layers.0.attn.q_proj.base_layer.weight"]
    assert not torch.allclose(merged["lm.layers.0.attn.q_proj.weight"], base, atol=1e-3)  # the merge did something


def test_nonfinite_guard_skips_counts_and_stops():
    guard = NonFiniteGuard(limit=3)
    assert guard.check(True, "step 1") and not guard.check(False, "step 2") and not guard.check(False, "step 2")
    assert guard.check(True, "step 2") and guard.total == 2 and guard.in_a_row == 0
    guard.check(False, "step 3")
    guard.check(False, "step 3")
    with pytest.raises(TrainingDiverged, match="3 non-finite losses in a row at step 3 \\(5 in all\\)"):
        guard.check(False, "step 3")


def test_only_complete_checkpoints_count_and_pruning_keeps_the_newest(tmp_path):
    for step, complete in [(2, True), (3, False), (4, True), (6, True), (8, False)]:
        folder = tmp_path / f"step_{step:07d}"
        folder.mkdir()
        if complete:
            (folder / MARKER).write_text(str(step))
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_0000002", "step_0000004", "step_0000006"]
    with pytest.raises(ConfigError, match="--resume"):  # a fresh run must not write over (or under) these
        check_fresh_start(tmp_path)
    check_fresh_start(tmp_path / "elsewhere")
    _prune(tmp_path, keep=2)
    # the unfinished step 3 is stale; step 8 may be a save in progress of a later run: it stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000004", "step_0000006", "step_0000008"]


def test_resumed_metrics_drop_the_lines_of_the_killed_run(tmp_path):
    lines = [{"step": s, "loss": float(s)} for s in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    log = MetricsLog(tmp_path, enabled=True, start_step=2, max_steps=4)
    log.step({"step": 3, "loss": 9.0, "tokens": 10}, write=True)
    log.close()
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in steps] == [(1, 1.0), (2, 2.0), (3, 9.0)]
    assert steps[-1]["tokens_per_s"] > 0


def test_model_folder_is_sharded_when_large_and_loads(tmp_path, monkeypatch):
    model = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(export_mod, "SHARD_BYTES", 2**20)  # 1 MiB: several shards
    out = write_model_folder(model.config, dict(state), None, tmp_path / "model")
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.tmp").exists()
    loaded = MMDLM.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_tensorboard_gets_the_scalars_when_installed(tmp_path, monkeypatch):
    import sys
    import types

    written = []

    class FakeWriter:  # stands in for torch.utils.tensorboard.SummaryWriter (tensorboard is optional)
        def __init__(self, log_dir, purge_step):
            written.append(("open", Path(log_dir).name, purge_step))

        def add_scalar(self, tag, value, step):
            written.append((tag, value, step))

        def close(self):
            written.append(("close",))

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = MetricsLog(tmp_path, enabled=True, start_step=0, max_steps=2)
    log.step({"step": 1, "loss": 2.5, "lr": 0.1, "tokens": 8, "loss_by_t": [None, 1.5, None, None]}, write=True)
    log.close()
    assert written[0] == ("open", "tensorboard", 1) and written[-1] == ("close",)
    assert ("train/loss", 2.5, 1) in written and ("loss_by_t/1", 1.5, 1) in written


def test_data_fractions_take_a_seeded_subset_of_each_file():
    qa, captions = list(range(100)), list(range(1000, 1040))
    kept = take_fractions([qa, captions], [1.0, 0.25], seed=3)
    assert kept[0] is qa and len(kept[1]) == 10 and set(kept[1]) <= set(captions)
    assert list(kept[1]) == list(take_fractions([qa, captions], [1.0, 0.25], seed=3)[1])  # the same every run
    assert take_fractions([qa], [], seed=0) == [qa]
    cfg = load_config(TrainConfig, ROOT / "configs/train/demo_sft.yaml", ["data.fractions=[0.5, 0.5]"])  # one file
    with pytest.raises(ConfigError, match="one number in"):
        cfg.validate()


def test_loader_skips_broken_entries_and_counts_them(tmp_path):
    from PIL import Image

    from mmdlm.data.collate import Collator
    from mmdlm.data.errors import DataWarning
    from mmdlm.data.tokenizer import train_demo_tokenizer
    from mmdlm.train.loader import build_loader

    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"corrupt")
    turns = [{"from": "human", "value": "What colour?"}, {"from": "gpt", "value": "red"}]
    entries = [{"id": f"ok{i}", "image": "a.png", "conversations": turns} for i in range(4)]
    entries += [{"id": "corrupt", "image": "bad.png", "conversations": turns},  # found when its batch is read
                {"id": "missing", "image": "nope.png", "conversations": turns}]  # found when the set is loaded
    (tmp_path / "qa.json").write_text(json.dumps(entries))
    tokenizer = train_demo_tokenizer(["What colour?", "red"] * 20, tmp_path / "tok", vocab_size=280)
    collator = Collator(tokenizer, lambda image: torch.zeros(3, 4, 4), 2, max_length=64)
    cfg = TrainConfig(micro_batch_size=5)
    cfg.data.json = [str(tmp_path / "qa.json")]
    with pytest.raises(DataError, match="entry id=missing: image 'nope.png' not found"):
        build_loader(cfg, collator, 0, 1, TrainState())
    cfg.data.on_error, state = "skip", TrainState()
    with pytest.warns(DataWarning) as caught:
        batch = next(iter(build_loader(cfg, collator, 0, 1, state)))
    assert state.skipped_at_load == 1 and batch["skipped"] == 1 and batch["input_ids"].shape[0] == 4
    assert sorted(batch["sample_ids"]) == ["ok0", "ok1", "ok2", "ok3"]
    lines = sorted(str(w.message).split(" (")[0] for w in caught)
    assert lines == ["skipped qa.json entry id=corrupt: image 'bad.png' unreadable",
                     "skipped qa.json entry id=missing: image 'nope.png' not found under " + str(tmp_path)]

"""Shared test helpers: where the LLaDA conformance fixtures live (../shared beside the checkout); no test may
leave DeepSpeed's shared-memory buffers behind."""

import os
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"


def deepspeed_buffers() -> set[str]:
    """This user's /dev/shm files from DeepSpeed's CPU all-reduce (66 MB per rank of each run)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")} if shm.is_dir() else set()


@pytest.fixture(autouse=True)
def no_shared_memory_left():
    """Every multi-rank run a test launches (train/train.py, killed or not) must remove its ranks' buffers: left
    there, they fill a machine's RAM run after run. Checked around every test; fails the test that left one."""
    before = deepspeed_buffers()
    yield
    left = deepspeed_buffers() - before
    assert not left, f"DeepSpeed shared memory left in /dev/shm: {sorted(left)}"


@pytest.fixture(scope="session")
def llada_fixtures() -> Path:
    if not FIXTURES.is_dir():
        pytest.fail(f"LLaDA fixtures not found at {FIXTURES}: the shared/ folder must sit beside the checkout")
    return FIXTURES


def byte_level_tokenizer(vocab_size: int, special: dict[str, int]):
    """Return a fast tokenizer whose ids are UTF-8 bytes (0..255) plus `special` tokens at the given ids.

    The llada-v-tiny fixture's toy tokenizer, rebuilt here: a real LLaDA-V folder ships its
    tokenizer files, the fixture only states the id map.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]  # GPT-2's byte -> printable character map
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    vocab = {chars[b]: b for b in range(256)}
    first_special = min(special.values())
    vocab.update({f"<unused{i}>": i for i in range(256, first_special)})
    model = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    for token, index in sorted(special.items(), key=lambda kv: kv[1]):
        model.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        assert model.token_to_id(token) == index, (token, index)
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=vocab_size)


@pytest.fixture(scope="session")
def llada_v_folder(llada_fixtures, tmp_path_factory) -> Path:
    """Return a copy of llada-v-tiny with its toy tokenizer's files beside the weights, as a real folder has."""
    import json
    import shutil

    src = llada_fixtures / "llada-v-tiny"
    folder = tmp_path_factory.mktemp("llada-v-src") / "llada-v-tiny"
    shutil.copytree(src, folder)
    special = json.loads((src / "samples.json").read_text())["ids"]["tiny_special_ids"]
    byte_level_tokenizer(300, special).save_pretrained(str(folder))
    return folder


@pytest.fixture
def graph_path(monkeypatch) -> list[str]:
    """The static path's GPU code on a CPU (kept buffers, pinned tensors), each step run eagerly instead of
    compiled; returns the torch.compile modes the sampler asked for, one per step."""
    from mmdlm import sampling

    modes = []
    monkeypatch.setattr(sampling, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sampling, "_step_graph", lambda mode: modes.append(mode) or sampling._step)
    return modes

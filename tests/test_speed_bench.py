"""benchmark.py --speed prints issue #19's four tables; here at a toy shape, vocabulary and prefix."""

import pytest

from mmdlm.infer import benchmark, speed


@pytest.fixture
def toy_shape(monkeypatch):
    monkeypatch.setitem(speed.SHAPES, "small", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2))
    monkeypatch.setattr(speed, "VOCAB", 64)
    monkeypatch.setattr(speed, "MASK_ID", 63)
    monkeypatch.setattr(speed, "IMAGE_TOKENS", 8)
    monkeypatch.setattr(speed, "PROMPT_TOKENS", 4)


def test_speed_tables_at_a_toy_shape(toy_shape, capsys):
    pytest.importorskip("torchao")
    import torch

    threads = torch.get_num_threads()
    try:
        assert benchmark.main(["--speed", "--gen-length", "4", "--repeats", "1", "--max-batch", "8",
                               "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "weight-read floor:" in out and "8 + 4 prefix tokens, 4-token answers" in out
    for row in ("| no cache, eager | 4 |", "| prefix cache, static | 4 |", "| 1 |", "| 8 |",
                "| transformers Llama, static cache | 4 |", "| int8 |"):
        assert row in out, row
    assert "| 64 |" not in out  # --max-batch 8

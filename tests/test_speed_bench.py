"""benchmark.py --speed prints issue #19's tables; here at a toy shape, vocabulary and prefix."""

import pytest

from mmdlm.infer import benchmark, speed


@pytest.fixture
def toy_shape(monkeypatch):
    monkeypatch.setitem(speed.SHAPES, "small", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                    num_attention_heads=2))
    monkeypatch.setattr(speed, "VOCAB", 64)
    monkeypatch.setattr(speed, "MASK_ID", 63)
    monkeypatch.setattr(speed, "EOS_ID", 61)
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
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    rows = {name: values for name, *values in cells}
    assert rows["no cache, eager"][0] == rows["prefix cache, static"][0] == "4"  # one token per forward
    assert set(rows) >= {"1", "8", "int8"} and "64" not in rows  # --max-batch 8
    vqa = [values for name, values in rows.items() if name.startswith("mmdlm: image -> tower")]
    ar = [values for name, values in rows.items() if name.startswith("autoregressive: the same image work")]
    assert vqa[0][0] == "4" and ar[0][0] == "4"  # random weights are never confident: 4 forwards, 4 tokens
    tower = next(float(v[1]) for name, v in rows.items() if name.startswith("of which the image"))
    assert 0 < tower < float(vqa[0][1]) and tower < float(ar[0][1])
    even = next(v[0] for name, v in rows.items() if name.startswith("break-even: mmdlm answers first"))
    assert even == "never" or 1 <= float(even) <= 4
    tables = [line for line in out.splitlines() if line.startswith("(")]
    assert [t.split(":")[0] for t in tables] == ["(forward", "(vqa", "(batch", "(quant"]


def test_speed_tables_run_as_chosen(toy_shape, capsys):
    assert benchmark.main(["--speed", "--gen-length", "4", "--repeats", "1", "--tables", "batch,forward",
                           "--max-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if line.startswith("(")] == ["(batch", "(forward"]
    assert "VQA" not in out and "int8" not in out
    with pytest.raises(SystemExit, match="no table vqa2; choose from forward,vqa,batch,quant,tuned,fusion"):
        benchmark.main(["--speed", "--tables", "forward,vqa2"])


def test_the_tuned_table_compiles_with_max_autotune(toy_shape, capsys, graph_path):
    pytest.importorskip("torchao")
    assert benchmark.main(["--speed", "--gen-length", "4", "--repeats", "1", "--tables", "tuned"]) == 0
    out = capsys.readouterr().out
    assert "| weights (static, max-autotune, prefix cache) | LM weight memory | ms per later forward |" in out
    rows = [line.split(" | ")[0].strip("| ") for line in out.splitlines() if line.startswith("| torch.") or
            line.startswith("| int8")]
    assert rows == ["torch.float32", "int8"] and set(graph_path) == {"max-autotune"}


def test_the_fusion_table_runs_the_static_step_fused_and_as_trained(toy_shape, capsys, graph_path, monkeypatch):
    fused = []
    real_forward_ms = speed.forward_ms
    monkeypatch.setattr(speed, "forward_ms", lambda lm, *a: fused.append(lm.fused) or real_forward_ms(lm, *a))
    assert benchmark.main(["--speed", "--gen-length", "4", "--repeats", "1", "--tables", "fusion"]) == 0
    out = capsys.readouterr().out
    assert "| projections (batch 1, static, prefix cache) | matmuls per block | ms per later forward |" in out
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1] for line in out.splitlines()
            if line.startswith("| fused") or line.startswith("| as trained")}
    assert rows == {"fused (as infer.py loads the LM)": "4", "as trained": "7"}
    assert fused == [True, False] and set(graph_path) == {"reduce-overhead"}


def test_a_failing_row_or_table_costs_only_itself(toy_shape, capsys, monkeypatch):
    """On a lent GPU each minute counts: an error (a kernel torch lacks, out of memory) fails its row or table."""

    def broken_quantize(lm, kind):
        raise RuntimeError("no kernel for this\nsecond line")

    def broken_batch(*args):
        raise MemoryError("out of memory")

    real_forward_ms = speed.forward_ms

    def static_broken(lm, embeds, config, repeats):
        if config.static:
            raise RuntimeError("inductor failed")
        return real_forward_ms(lm, embeds, config, repeats)

    monkeypatch.setattr(speed, "quantize_lm", broken_quantize)
    monkeypatch.setattr(speed, "batch_table", broken_batch)
    monkeypatch.setattr(speed, "forward_ms", static_broken)
    assert benchmark.main(["--speed", "--gen-length", "4", "--repeats", "1", "--tables", "quant,batch,forward"]) == 1
    captured = capsys.readouterr()
    assert "| int8 | failed: RuntimeError: no kernel for this | |" in captured.out
    assert "batch failed: MemoryError: out of memory\n(batch:" in captured.out
    assert "| no cache, eager | 4 |" in captured.out  # the table after the failed one ran, bar its failed row
    assert "| prefix cache, static | failed: RuntimeError: inductor failed | | | | |" in captured.out
    assert "Traceback" in captured.err


def test_the_vqa_rows_stand_without_the_autoregressive_baseline(toy_shape, capsys, monkeypatch):
    def broken_ar(*args):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(speed, "ar_seconds", broken_ar)
    assert benchmark.main(["--speed", "--gen-length", "4", "--repeats", "1", "--tables", "vqa"]) == 0
    out = capsys.readouterr().out
    assert "| mmdlm: image -> tower -> prefix -> 4-token answer" in out
    assert "| autoregressive: transformers Llama, static cache | failed: RuntimeError: compile failed | |" in out
    assert "break-even" not in out

"""--quantize: int8 weight-only LM weights (torchao) stay close to fp32; fp8 is refused where it cannot run.

Tolerance, on LLaDA's tiny fixture models (logits of scale ~0.7): int8 weight-only moves no logit by
more than 0.02 (measured 0.006 and 0.010) and keeps the argmax at >= 95% of positions (measured
97.9% and 100%).
"""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from test_infer import images, model_dir, saved_model  # noqa: F401 (fixtures)
from torch import nn

from mmdlm.infer.infer import main
from mmdlm.infer.quantize import QuantizeError, quantize_lm, tensor_bytes, weight_bytes
from mmdlm.llada import load_llada

pytest.importorskip("torchao")


@pytest.mark.parametrize("name", ["llada-tiny-mha", "llada-tiny-gqa"])
def test_int8_logits_stay_within_tolerance_of_fp32(llada_fixtures, name):
    model = load_llada(llada_fixtures / name)
    ids = load_file(str(llada_fixtures / name / "expected.safetensors"))["ids"]
    quantised = quantize_lm(copy.deepcopy(model), "int8")
    with torch.no_grad():
        reference, logits = model(ids), quantised(ids)
    assert (logits - reference).abs().max() <= 0.02
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.95
    assert not torch.equal(logits, reference)  # the weights did change


def test_int8_of_fused_projections_is_int8_of_each_projection(llada_fixtures):
    """One scale per output row: q/k/v (and gate/up) quantised stacked, as inference loads them, keep the scales
    and the logits they have quantised one by one."""
    model = load_llada(llada_fixtures / "llada-tiny-gqa")
    ids = load_file(str(llada_fixtures / "llada-tiny-gqa" / "expected.safetensors"))["ids"]
    separate = quantize_lm(copy.deepcopy(model), "int8")
    fused = quantize_lm(copy.deepcopy(model).fuse_projections(), "int8")
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), separate(ids), atol=1e-5, rtol=0)


def test_int8_stores_a_byte_per_weight_and_a_scale_per_row(llada_fixtures):
    model = load_llada(llada_fixtures / "llada-tiny-gqa")
    before = {name: m.weight.numel() for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    total = weight_bytes(model)
    quantize_lm(model, "int8")
    linears = dict(model.named_modules())
    for name, count in before.items():
        rows = linears[name].weight.shape[0]
        assert tensor_bytes(linears[name].weight) == count + 5 * rows  # int8 data; per row an fp32 scale, int8 zero
    assert weight_bytes(model) < 0.4 * total  # the embedding stays fp32


def test_fp8_is_refused_off_a_recent_gpu(llada_fixtures):
    model = load_llada(llada_fixtures / "llada-tiny-mha")
    with pytest.raises(QuantizeError, match="fp8 needs a GPU of compute capability 8.9.*use --quantize int8"):
        quantize_lm(model, "fp8")


def test_infer_static_gives_the_same_answers_and_int8_answers_too(model_dir, images, tmp_path):  # noqa: F811
    entries = [{"id": f"q{k}", "image": f"{k}.png", "conversations": [
        {"from": "human", "value": "<image>\n" + "what colour is the circle? " * (k + 1)}]} for k in range(3)]
    qa = images / "qa_static.json"
    qa.write_text(json.dumps(entries))
    answers = {}
    for name, flags in {"eager": [], "static": ["--static"], "int8": ["--quantize", "int8"]}.items():
        out = tmp_path / f"{name}.jsonl"
        assert main(["--model", str(model_dir), "--input", str(qa), "--output", str(out), "--batch-size", "3",
                     *flags]) == 0
        answers[name] = [json.loads(line) for line in out.read_text().splitlines()]
    strip = [[{k: v for k, v in row.items() if k != "seconds"} for row in rows] for rows in answers.values()]
    assert strip[0] == strip[1]
    assert [r["id"] for r in answers["int8"]] == ["q0", "q1", "q2"]

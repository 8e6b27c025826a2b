"""The static-shape sampler (SamplerConfig.static) returns exactly what the eager one returns."""

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mmdlm import sampling
from mmdlm.decoding import finished
from mmdlm.llada import load_llada
from mmdlm.model import DiffusionLM, DLMConfig
from mmdlm.sampling import SamplerConfig, generate

MASK, EOS, EOT = 39, 38, 37


def tiny() -> DiffusionLM:
    torch.manual_seed(0)
    cfg = DLMConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, mask_token_id=MASK, initializer_range=0.5)
    return DiffusionLM(cfg).eval()


class EosBias(nn.Module):
    """A tiny LM that favours EOS by `bias`: answers end early, each row at its own position."""

    def __init__(self, lm: DiffusionLM, bias: float):
        super().__init__()
        self.lm, self.bias = lm, bias

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def forward(self, **kwargs):
        logits = self.lm(**kwargs)
        logits[..., EOS] += self.bias
        return logits


def ragged_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Return three left-padded prompts (ids [3, 7], attention mask [3, 7]) of 7, 4 and 2 tokens."""
    torch.manual_seed(1)
    ids = torch.randint(0, 36, (3, 7))
    mask = torch.arange(7)[None, :] >= torch.tensor([[0], [3], [5]])
    return ids * mask, mask


def same_output(a, b) -> None:
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.commit_step, b.commit_step)
    assert torch.equal(a.row_forwards, b.row_forwards) and torch.equal(a.lengths, b.lengths)
    assert a.forward_passes == b.forward_passes


STOP = dict(early_stop=True, eos_id=EOS, stop_ids=(EOT,))
OPTIONS = {
    "steps": dict(steps=16),
    "steps-short-blocks": dict(steps=8, block_length=4),
    "steps-early-stop": dict(steps=16, **STOP),
    "threshold": dict(threshold=0.3),
    "threshold-early-stop": dict(threshold=0.3, **STOP),
    "factor-early-stop": dict(factor=2.0, **STOP),
    "margin": dict(threshold=0.2, confidence="margin", **STOP),
    "entropy": dict(threshold=0.2, confidence="entropy", **STOP),
    "cfg": dict(steps=16, cfg_scale=1.0, **STOP),
    "suppress-float64": dict(threshold=0.3, suppress_ids=(5, 6), float64_confidence=True, **STOP),
    "threshold-mask-tail": dict(threshold=0.3, mask_tail=True, **STOP),
    "steps-mask-tail": dict(steps=16, mask_tail=True, **STOP),
}


@pytest.mark.parametrize("cache", ["none", "prefix", "block"])
@pytest.mark.parametrize("option", OPTIONS)
def test_static_path_gives_the_eager_output(option, cache):
    model = EosBias(tiny(), bias=0.6)
    ids, mask = ragged_batch()
    config = SamplerConfig(**{"gen_length": 16, "block_length": 8, **OPTIONS[option]}).with_cache(cache)
    eager = generate(model, ids, mask_id=MASK, config=config, attention_mask=mask)
    for check_every in (1, 3):
        same_output(eager, generate(model, ids, mask_id=MASK, config=replace(config, static=True,
                                                                            check_every=check_every),
                                    attention_mask=mask))
    if "early_stop" in OPTIONS[option]:
        assert (eager.lengths < 16).any()  # the case is exercised: some row stopped early


@pytest.mark.parametrize("embeds", [False, True])
def test_static_path_with_embeddings_templates_and_prompt_holes(embeds):
    lm = tiny()
    torch.manual_seed(2)
    prompt = torch.randint(0, 36, (2, 6))
    canvas = torch.full((1, 16), MASK)
    canvas[0, [2, 9]] = torch.tensor([5, EOT])
    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.4, **STOP)
    arg = dict(prefix_embeds=lm.get_input_embeddings()(prompt)) if embeds else dict(prefix_ids=prompt)
    for c in (config, config.with_cache("prefix")):
        eager = generate(lm, mask_id=MASK, config=c, canvas=canvas, **arg)
        same_output(eager, generate(lm, mask_id=MASK, config=replace(c, static=True), canvas=canvas, **arg))
    holes = prompt.clone()
    holes[:, 2] = MASK  # LLaDA fills mask ids inside the prompt too
    config = SamplerConfig(gen_length=16, block_length=8, steps=8)
    same_output(generate(lm, holes, mask_id=MASK, config=config),
                generate(lm, holes, mask_id=MASK, config=replace(config, static=True)))


@pytest.mark.parametrize("name", ["llada-tiny-mha", "llada-tiny-gqa"])
def test_static_path_reproduces_llada_reference_samples(llada_fixtures, name):
    """Every sampling case of the fixtures (greedy, temperature 1, random remasking, CFG) on the static path."""
    model = load_llada(llada_fixtures / name)
    prompt = load_file(str(llada_fixtures / name / "expected.safetensors"))["prompt"]
    spec = json.loads((llada_fixtures / name / "samples.json").read_text())
    for case, c in spec["cases"].items():
        args = dict(c["args"])
        seed = args.pop("seed")
        if seed is not None:
            torch.manual_seed(seed)
        config = SamplerConfig(**args, static=True)
        out = generate(model, prompt, mask_id=spec["mask_id"], config=config)
        assert out.tokens[0].tolist() == c["expected_generated"], case


class HostReads(TorchDispatchMode):
    """Counts the operations that make the host wait for the device: a scalar read, or a data-dependent shape."""

    SYNCING = {"_local_scalar_dense", "nonzero", "masked_select"}

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        bool_index = name in ("index", "index_put", "index_put_") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
        if name in self.SYNCING or bool_index:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_a_static_step_never_waits_for_the_device_and_the_loop_rarely_does(monkeypatch):
    model = EosBias(tiny(), bias=0.6)
    ids, mask = ragged_batch()
    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.3, **STOP).with_cache("prefix")
    in_steps = []

    def watched_step(*args):
        with HostReads() as reads:
            sampling._step.__wrapped__(*args)
        in_steps.extend(reads.reads)

    watched_step.__wrapped__ = sampling._step
    for static in (False, True):
        monkeypatch.setattr(sampling, "_step", sampling._step.__wrapped__ if static else watched_step)
        with HostReads() as everything:
            out = generate(model, ids, mask_id=MASK, config=replace(config, static=static, check_every=4),
                           attention_mask=mask)
        if static:
            static_reads = len(everything.reads)
        else:
            eager_reads, forwards = len(everything.reads), out.forward_passes
    assert in_steps == []  # the eager path runs the same step: no host read inside it either
    assert forwards >= 4 and static_reads < eager_reads / 2


def test_a_frozen_row_never_changes_after_it_finished():
    model = EosBias(tiny(), bias=0.6)
    ids, mask = ragged_batch()
    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.3, static=True, check_every=8, **STOP)
    seen = []
    out = generate(model, ids, mask_id=MASK, config=config, attention_mask=mask,
                   on_forward=lambda rows, canvas, steps: seen.append(canvas.clone()))
    done = [finished(canvas, MASK, torch.tensor([EOS, EOT])) for canvas in seen]
    stopped = out.lengths < 16
    assert stopped.any() and len(seen) > out.forward_passes  # checks every 8 steps: steps ran after a row finished
    for row in stopped.nonzero()[:, 0]:
        first = next(k for k, d in enumerate(done) if d[row])
        assert all(torch.equal(seen[first][row], later[row]) for later in seen[first:])


def test_the_graph_path_traces_each_step_as_one_graph(monkeypatch):
    """The GPU's control flow on a CPU: steps compiled whole (fullgraph, the eager backend), cache fills eager."""
    model = EosBias(tiny(), bias=0.6)
    ids, mask = ragged_batch()
    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.3, static=True, **STOP)
    expected = {c: generate(model, ids, mask_id=MASK, config=config.with_cache(c), attention_mask=mask)
                for c in ("prefix", "block")}
    torch._dynamo.reset()
    monkeypatch.setattr(sampling, "GRAPH_DEVICES", ("cuda", "cpu"))
    eager_backend = sampling._step_graph("eager", None)
    monkeypatch.setattr(sampling, "_step_graph", lambda **_: eager_backend)
    try:
        for cache, eager in expected.items():
            same_output(eager, generate(model, ids, mask_id=MASK, config=config.with_cache(cache),
                                        attention_mask=mask))
    finally:
        torch._dynamo.reset()


INDUCTOR_CONFIGS = {  # Fast-dLLM's threshold with the prefix cache; LLaDA-V's rules (schedule, banned ids, float64)
    "threshold": SamplerConfig(gen_length=16, block_length=8, threshold=0.3, static=True, **STOP).with_cache("prefix"),
    "llada-v": SamplerConfig(gen_length=16, block_length=8, steps=16, static=True, suppress_ids=(1, 2, 5),
                             float64_confidence=True, **STOP).with_cache("block"),
}


@pytest.mark.parametrize("name", INDUCTOR_CONFIGS)
def test_inductor_compiles_the_step_whole(monkeypatch, name):
    """What a GPU runs, bar the CUDA graphs: inductor lowers the whole step (fullgraph) of the model as inference
    loads it (projections fused) and gives the eager tokens of the model as trained."""
    ids, mask = ragged_batch()
    config = INDUCTOR_CONFIGS[name]
    expected = generate(EosBias(tiny(), bias=0.6), ids, mask_id=MASK, config=config, attention_mask=mask)
    model = EosBias(tiny().fuse_projections(), bias=0.6)
    torch._dynamo.reset()
    monkeypatch.setattr(sampling, "GRAPH_DEVICES", ("cuda", "cpu"))
    compiled = sampling._step_graph("inductor", None)
    monkeypatch.setattr(sampling, "_step_graph", lambda **_: compiled)
    try:
        for _ in range(2):  # compiled, then run again from the compiled code
            same_output(expected, generate(model, ids, mask_id=MASK, config=config, attention_mask=mask))
    finally:
        torch._dynamo.reset()


def compiled_graphs(monkeypatch, model, configs, look) -> list:
    """Sample the ragged batch under each config with the step compiled whole by AOT autograd; return
    look(metadata, example inputs) of each functionalised graph, as inductor would receive it."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    seen = []

    def inspect(gm, example_inputs):
        seen.append(look(TracingContext.get().fw_metadata, example_inputs))
        return gm

    ids, mask = ragged_batch()
    torch._dynamo.reset()
    monkeypatch.setattr(sampling, "GRAPH_DEVICES", ("cuda", "cpu"))
    compiled = torch.compile(sampling._step, backend=aot_autograd(fw_compiler=inspect), fullgraph=True)
    monkeypatch.setattr(sampling, "_step_graph", lambda **_: compiled)
    try:
        for config in configs:
            generate(model, ids, mask_id=MASK, config=config, attention_mask=mask)
    finally:
        torch._dynamo.reset()
    return seen


@pytest.mark.parametrize("cache", ["none", "prefix", "block"])
def test_every_tensor_the_step_writes_is_a_static_input(monkeypatch, cache):
    """torch runs a compiled step without CUDA graphs when it mutates an input not marked static: none is here."""

    def written_and_static(meta, example_inputs):
        written = {i for i, info in enumerate(meta.input_info) if info.mutates_data or info.mutates_metadata}
        return written, set(meta.static_input_indices)

    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.3, static=True, **STOP).with_cache(cache)
    scheduled = replace(config, threshold=None, steps=16, early_stop=False)  # LLaDA's schedule: another input
    graphs = compiled_graphs(monkeypatch, EosBias(tiny(), bias=0.6), [config, scheduled], written_and_static)
    assert graphs and all(written and written <= static for written, static in graphs)


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_no_weight_is_copied_into_the_graph_per_replay(monkeypatch, quantize):
    """A CUDA graph copies each input not marked static into its own memory at every replay: the weights (int8's
    data and scales too) must be static, so that only the request's small tensors are copied."""
    if quantize != "none":
        pytest.importorskip("torchao")
    from mmdlm.infer.quantize import quantize_lm

    def copied(meta, example_inputs):
        static = set(meta.static_input_indices)
        return [tuple(t.shape) for i, t in enumerate(example_inputs) if torch.is_tensor(t) and i not in static]

    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.3, static=True, **STOP).with_cache("prefix")
    model = EosBias(quantize_lm(tiny().fuse_projections(), quantize), bias=0.6)  # as infer.load_model gives it
    graphs = compiled_graphs(monkeypatch, model, [config], copied)
    B, L = 3, 7 + config.gen_length  # ragged_batch's rows and prompt length, then the canvas
    request = [(B, L), (B, L), (B,), (B, L), (2,)]  # key mask, position ids, row index, is_prompt, stop ids
    assert graphs == [request, request]  # one graph per block, each copying only these: no weight


def test_one_graph_serves_every_schedule_and_batch_size(monkeypatch):
    """Each compile of the step costs tens of seconds on a GPU: a schedule of other steps per block, or another
    batch size after the first, must not cost another (the second batch size marks the batch dynamic)."""
    compiles = []

    def count(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    model = tiny()
    torch._dynamo.reset()
    monkeypatch.setattr(sampling, "GRAPH_DEVICES", ("cuda", "cpu"))
    compiled = torch.compile(sampling._step, backend=count, fullgraph=True)
    monkeypatch.setattr(sampling, "_step_graph", lambda **_: compiled)
    config = SamplerConfig(gen_length=16, block_length=16, steps=16, static=True).with_cache("prefix")
    try:
        for steps in (16, 8, 4):
            generate(model, torch.ones(1, 5, dtype=torch.long), mask_id=MASK, config=replace(config, steps=steps))
        assert len(compiles) == 1
        for batch in (2, 8, 3):
            generate(model, torch.ones(batch, 5, dtype=torch.long), mask_id=MASK, config=config)
        assert len(compiles) == 2
    finally:
        torch._dynamo.reset()


def test_the_graph_path_keeps_its_buffers_from_request_to_request(monkeypatch):
    """A CUDA graph replays on the addresses it was recorded with: the next request of a shape writes the same memory.

    Without that, torch records every request's step graph again. Outputs returned earlier stay as they were.
    """
    model = EosBias(tiny(), bias=0.6)
    ids, mask = ragged_batch()
    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.3, static=True, **STOP).with_cache("block")
    other_ids = torch.randint(0, 36, ids.shape, generator=torch.Generator().manual_seed(5)) * mask
    expected = [generate(model, i, mask_id=MASK, config=config, attention_mask=mask) for i in (ids, other_ids)]
    monkeypatch.setattr(sampling, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sampling, "_step_graph", lambda **_: sampling._step)  # the graph path's code, run eagerly

    def request(prompt):
        canvases = set()
        out = generate(model, prompt, mask_id=MASK, config=config, attention_mask=mask,
                       on_forward=lambda rows, canvas, steps: canvases.add(canvas.data_ptr()))
        (buffers,) = sampling._GRAPH_BUFFERS[model].values()
        return out, canvases, {name: t.data_ptr() for name, t in buffers.items()}

    first, canvases, addresses = request(ids)
    kept = first.tokens.clone(), first.row_forwards.clone()
    second, canvases_2, addresses_2 = request(other_ids)
    assert len(canvases) == 1 and canvases == canvases_2
    assert {"k0", "v1", "tokens", "active", "forward_passes"} <= addresses.keys() and addresses == addresses_2
    assert torch.equal(first.tokens, kept[0]) and torch.equal(first.row_forwards, kept[1])
    same_output(expected[0], first)
    same_output(expected[1], second)
    assert not torch.equal(first.tokens, second.tokens)


def test_the_graph_path_keeps_buffers_for_its_most_recent_shapes(graph_path):
    model = tiny()
    config = SamplerConfig(gen_length=8, block_length=8, steps=8, static=True).with_cache("prefix")
    for batch in range(1, sampling.GRAPH_SHAPES + 3):
        generate(model, torch.ones(batch, 3, dtype=torch.long), mask_id=MASK, config=config)
    kept = [shape[0][0] for shape in sampling._GRAPH_BUFFERS[model]]
    assert kept == list(range(3, sampling.GRAPH_SHAPES + 3))
    sampling.release_graph_buffers(model)
    assert model not in sampling._GRAPH_BUFFERS


def test_check_every_must_be_positive():
    with pytest.raises(ValueError, match="check_every=0 must be at least 1"):
        SamplerConfig(static=True, check_every=0).validate()


def test_autotune_compiles_the_step_with_max_autotune(monkeypatch):
    """--autotune: the same step, its CUDA graphs too, compiled with tuned Triton matmuls instead of cuBLAS."""
    model = EosBias(tiny(), bias=0.6)
    ids, mask = ragged_batch()
    config = SamplerConfig(gen_length=16, block_length=8, threshold=0.3, static=True, **STOP).with_cache("prefix")
    expected = generate(model, ids, mask_id=MASK, config=config, attention_mask=mask)
    modes = []
    monkeypatch.setattr(sampling, "GRAPH_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sampling, "_step_graph", lambda mode: modes.append(mode) or sampling._step)
    for autotune in (False, True):
        same_output(expected, generate(model, ids, mask_id=MASK, config=replace(config, autotune=autotune),
                                       attention_mask=mask))
        assert modes and set(modes) == {"max-autotune" if autotune else "reduce-overhead"}
        modes.clear()
    with pytest.raises(ValueError, match="autotune compiles the static path's step: it needs static"):
        replace(config, static=False, autotune=True).validate()

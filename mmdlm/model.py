"""The bidirectional diffusion Transformer, in LLaDA's layout.

Pre-norm blocks of RMSNorm -> attention (RoPE, grouped-query) -> RMSNorm -> SwiGLU MLP, no biases.
Attention is fully bidirectional by default (a masked diffusion LM sees the whole canvas); the
same weights also run with prefix-DLM attention (prefix queries see only the prefix, so the
prefix K/V can be cached exactly) or causally (the autoregressive twin baseline).

Numerics follow LLaDA's reference so its checkpoints reproduce bit for bit on CPU fp32: RMSNorm
and RoPE computed in fp32 then cast back; RoPE rotates halves (`cat(-x2, x1)`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from mmdlm.cache import KVCache
from mmdlm.config import ConfigError
from mmdlm.files import ReadableWeights

AttentionKind = Literal["bidirectional", "causal"]


@dataclasses.dataclass
class LMConfig:
    """The `lm` section of a model YAML: DLMConfig's fields. None keeps DLMConfig's default (with
    `lm_path`: the folder's value, which a value given here must equal)."""

    vocab_size: int | None = None  # filled from the tokenizer at build time
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None  # None: one K/V head per query head
    rope_theta: float | None = None
    rms_norm_eps: float | None = None
    max_position_embeddings: int | None = None
    initializer_range: float | None = None
    attention: AttentionKind | None = None  # bidirectional (diffusion) or causal (the autoregressive twin)
    prefix_attention: AttentionKind | None = None  # with prefix-DLM attention: how prefix queries see the prefix
    shift_logits: bool | None = None  # Dream's shift: position i's output predicts token i + 1
    mask_token_id: int | None = None
    tie_word_embeddings: bool | None = None
    eos_token_id: int | None = None  # kept by transformers as generic config attributes
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def given(self) -> dict:
        """Return the fields set (not None), as DLMConfig keyword arguments."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


class DLMConfig(PretrainedConfig):
    """Sizes of the language model; field names follow transformers' Llama conventions."""

    model_type = "mmdlm_lm"

    def __init__(
        self,
        vocab_size: int = 512,
        hidden_size: int = 128,
        intermediate_size: int = 256,
        num_hidden_layers: int = 2,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        attention: AttentionKind = "bidirectional",
        prefix_attention: AttentionKind = "bidirectional",
        shift_logits: bool = False,
        mask_token_id: int | None = None,
        tie_word_embeddings: bool = False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.attention = attention
        # Only where a call passes prefix_len (prefix-DLM): "causal" encodes the prompt left to right,
        # as an autoregressive warm-up trained it, while the answer still sees every position.
        self.prefix_attention = prefix_attention
        # Dream's layout: the prediction for token i is read from position i - 1's output, where an
        # autoregressive model (or warm-up) keeps it; with a causal prompt, a one-word answer is then
        # predicted exactly where the next-token steps taught it. forward() shifts before returning,
        # so logits[:, i] still belongs to token i and losses and samplers index as before.
        self.shift_logits = shift_logits
        self.mask_token_id = mask_token_id
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        self.validate_sizes()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate_sizes(self) -> None:
        """Raise ValueError naming the inconsistent fields."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        elif self.head_dim % 2:
            problems.append(f"head_dim={self.head_dim} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.attention not in get_args(AttentionKind):
            problems.append(f"attention={self.attention!r} must be one of {get_args(AttentionKind)}")
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id={self.mask_token_id} is outside vocab_size={self.vocab_size}")
        if problems:
            raise ConfigError("inconsistent DLMConfig: " + "; ".join(problems))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics, cast back before the weight: LLaDA's order of operations.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (cos, sin) [B, 1, L, head_dim] in fp32 for integer positions [B, L]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # [B, L, head_dim/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, L, head_dim]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [B, H, L, d] by half rotation (`cat(-x2, x1)`), in fp32."""
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


def fused_linear(*layers: nn.Linear) -> nn.Linear:
    """Return one bias-free Linear whose output is the given layers' outputs side by side (their weights stacked)."""
    weight = torch.cat([layer.weight.detach() for layer in layers])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


class Attention(nn.Module):
    def __init__(self, cfg: DLMConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, d, bias=False)
        self.qkv_proj: nn.Linear | None = None  # fuse(): q, k and v in one matmul, for inference

    def fuse(self) -> None:
        self.qkv_proj = fused_linear(self.q_proj, self.k_proj, self.v_proj)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int, fill_cache: bool):
        B, L, _ = x.shape
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.qkv_proj(x).split([self.n_heads * self.head_dim, *2 * [self.n_kv * self.head_dim]], -1)
        q = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, L, d]
        k = k.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, L, d]
        v = v.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.splice(layer, k, v, start, store=fill_cache)  # [B, Hkv, Lk, d]
        # Each K/V head serves n_heads / n_kv consecutive query heads (enable_gqa's convention).
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: DLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj: nn.Linear | None = None  # fuse(): gate and up in one matmul, for inference

    def fuse(self) -> None:
        self.gate_up_proj = fused_linear(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: DLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0, fill_cache=False):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer, start, fill_cache)
        return x + self.mlp(self.mlp_norm(x))


def attention_mask_4d(
    batch: int,
    q_len: int,
    k_len: int,
    start: int,
    device: torch.device,
    causal: bool,
    key_padding: torch.Tensor | None,
    prefix_len: torch.Tensor | int | None,
    causal_prefix: bool = False,
) -> torch.Tensor | None:
    """Return the boolean SDPA mask [B, 1, Lq, Lk] (True = may attend), or None when nothing is masked.

    Queries sit at absolute positions start..start+Lq-1, keys at 0..Lk-1. Prefix-DLM: a query
    inside the prefix attends only prefix keys (with `causal_prefix`, only those up to its own
    position); a query after it attends everything.
    """
    if not causal and key_padding is None and prefix_len is None:
        return None
    q_pos = torch.arange(start, start + q_len, device=device)[:, None]  # [Lq, 1]
    k_pos = torch.arange(k_len, device=device)[None, :]  # [1, Lk]
    allowed = torch.ones(batch, 1, q_len, k_len, dtype=torch.bool, device=device)
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    if prefix_len is not None:
        p = torch.as_tensor(prefix_len, device=device).reshape(-1, 1, 1, 1)  # [B or 1, 1, 1, 1]
        allowed = allowed & ((q_pos >= p) | ((k_pos <= q_pos) if causal_prefix else (k_pos < p)))
    if key_padding is not None:
        if key_padding.shape[-1] != k_len:
            raise ValueError(f"attention_mask covers {key_padding.shape[-1]} keys, the attention sees {k_len}")
        allowed = allowed & key_padding.bool()[:, None, None, :]
    return allowed


class DiffusionLM(ReadableWeights, PreTrainedModel):
    """LLaDA-layout Transformer returning logits [B, L, V]; attention per `config.attention`."""

    config_class = DLMConfig
    base_model_prefix = "lm"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "embed_tokens.weight"}

    def __init__(self, config: DLMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.fused = False  # fuse_projections()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_activation_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (memory for compute), in training mode.

        The one switch (config `activation_checkpointing`; for an MMDLM, `model.lm.set_activation_checkpointing`).
        transformers' own (activation|gradient)_checkpointing_enable() set the same `gradient_checkpointing` flag.
        """
        self.gradient_checkpointing = enable

    def compile_blocks(self) -> None:
        """Compile every block with torch.compile, in place (one graph serves all of them).

        On a GPU this fuses the elementwise work around the matmuls (RMSNorm, RoPE, SwiGLU), which
        eager mode runs as separate memory-bound kernels. For training: sampling calls blocks with
        varying cache arguments, which would recompile.
        """
        for block in self.layers:
            block.compile()

    def fuse_projections(self) -> DiffusionLM:
        """Stack each block's q, k, v weights into one matrix and its gate, up weights into another; in place.

        For inference (`infer.load_model` does it): a forward then runs 4 matmuls per block instead of 7.
        Each output is the same dot product; the matmul kernel chosen for the wider matrix may round it
        differently (bit-identical in this project's CPU tests and on the demo model; bf16 logits at the 8B
        width moved by up to 0.035). At batch 1 a GPU forward is bound by reading the weights: fewer, larger
        matmuls mean fewer kernels and their tails (issue #19; speed.py's fusion table measures it). A fused
        model has no q_proj ... up_proj: it is not for training, LoRA or saving (its state_dict refuses).
        """
        if not self.fused:
            for block in self.layers:
                block.attn.fuse()
                block.mlp.fuse()
            self.register_state_dict_pre_hook(_refuse_fused)
            self.fused = True
        return self

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        prefix_len: torch.Tensor | int | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
        fill_cache: bool = False,
        causal: bool | None = None,
        logits_from: int = 0,
    ) -> torch.Tensor:
        """Return logits [B, L, V] for tokens (or embeddings) at positions start..start+L-1.

        `logits_from` > 0 returns only the last L - logits_from positions' logits: a sampler that
        reads only the canvas skips the vocabulary projection of a long prompt (LLaDA-V's 126k
        vocabulary times a few thousand image tokens is most of a forward's memory).

        attention_mask [B, Lk] marks real keys (False = padding) over every key the queries see:
        the whole sequence, cached part included. With `cache`, keys/values outside
        [start, start+L) come from the cache; `fill_cache` stores this call's keys/values in it.
        `causal` overrides `config.attention` for this call (an autoregressive loss on a
        bidirectional model: Dimple's warm-up, the joint AR + diffusion loss).
        With `config.shift_logits`, logits[:, i] comes from position i - 1's output (the window's first
        row, which has no position before it in the window, repeats its own): a caller that reads
        logits from position j must start the window at j - 1 or before.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [B, L, D]
        B, L, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(start, start + L, device=x.device).expand(B, L)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        k_len = max(start + L, cache.length if cache is not None else 0)
        if cache is None and start != 0:
            raise ValueError("start > 0 needs a cache holding the keys before it")
        mask = attention_mask_4d(
            B, L, k_len, start, x.device, self.config.attention == "causal" if causal is None else causal,
            attention_mask, prefix_len, self.config.prefix_attention == "causal",
        )
        for i, block in enumerate(self.layers):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, start, fill_cache)
        if self.config.shift_logits:
            x = torch.cat([x[:, :1], x[:, :-1]], dim=1)[:, logits_from:]
        else:
            x = x[:, logits_from:]
        return self.lm_head(self.norm(x))


def _refuse_fused(module, prefix, keep_vars) -> None:
    raise RuntimeError("this model's projections are fused for inference (fuse_projections): its weights have no "
                       "checkpoint layout; load the model again to train or save it")


AutoConfig.register(DLMConfig.model_type, DLMConfig)
AutoModel.register(DLMConfig, DiffusionLM)

"""Hand-written models (pure torch, no transformers) for the attention finder's tests.

* ``HandwrittenDecoder``: a decoder that spells attention its own way (explicit
  ``q @ k.transpose(-2, -1) * scale``, additive or ``masked_fill`` causal mask, softmax, ``@ v``),
  its own RoPE (interleaved pairs by even/odd slicing + ``stack``, or a half-split rotation
  written as ``x1*cos - x2*sin``), its own static KV cache (registered buffers written with
  ``index_copy_`` or advanced-index assignment), GQA by ``repeat_interleave``. Same call
  convention as ``palu_fx.export.export_decoder``'s programs:
  ``forward(input_ids [B, S], cache_position [S]) -> logits [B, S, vocab]``.
* ``CrossAttentionToy``: keys/values are projections of an extra INPUT tensor (``memory``), not of
  the hidden state; no cache. A counter-example: it must not be matched as a self-attention
  block with a cache.
* ``MLPOnly``: no attention at all, optionally with a ``softmax(x @ W1) @ W2`` gate (softmax
  between two matmuls that is not attention). A counter-example.

``export_handwritten(model)`` exports any of them with ``strict=True`` and a dynamic sequence dim.
"""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F

VOCAB = 256
HIDDEN = 128
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 32
LAYERS = 2
INTERMEDIATE = 256
MAX_CACHE = 64


def _init_(module: nn.Module, seed: int, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or name.endswith("_norm_w"):
                p.fill_(1.0)
            elif p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 if "embed" in name else std))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2i, 2i+1). x: [B, H, S, D]; cos/sin: [S, D/2]."""
    x_even = x[..., 0::2]
    x_odd = x[..., 1::2]
    out_even = x_even * cos - x_odd * sin
    out_odd = x_even * sin + x_odd * cos
    return torch.stack((out_even, out_odd), dim=-1).flatten(-2)


def rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2), written without rotate_half. x: [B, H, S, D]; cos/sin: [S, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class HandwrittenAttention(nn.Module):
    def __init__(self, layer: int, *, rope: str, mask: str, cache_write: str, batch_size: int, max_cache_len: int,
                 heads: int, kv_heads: int, head_dim: int, hidden: int, qkv_bias: bool):
        super().__init__()
        self.layer, self.rope, self.mask, self.cache_write = layer, rope, mask, cache_write
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.wq = nn.Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.wk = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.wv = nn.Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.wo = nn.Linear(heads * head_dim, hidden, bias=False)
        shape = (batch_size, kv_heads, max_cache_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape), persistent=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).reshape(b, s, self.heads, self.head_dim).permute(0, 2, 1, 3)
        k = self.wk(x).reshape(b, s, self.kv_heads, self.head_dim).permute(0, 2, 1, 3)
        v = self.wv(x).reshape(b, s, self.kv_heads, self.head_dim).permute(0, 2, 1, 3)
        if self.rope == "interleaved":
            q, k = rope_interleaved(q, cos, sin), rope_interleaved(k, cos, sin)
        elif self.rope == "half":
            q, k = rope_half(q, cos, sin), rope_half(k, cos, sin)
        # static cache write
        if self.cache_write == "index_copy":
            self.k_cache.index_copy_(2, cache_position, k)
            self.v_cache.index_copy_(2, cache_position, v)
        else:  # advanced-index assignment (aten.index_put_)
            self.k_cache[:, :, cache_position] = k
            self.v_cache[:, :, cache_position] = v
        keys, values = self.k_cache, self.v_cache
        rep = self.heads // self.kv_heads
        if rep > 1:
            keys = keys.repeat_interleave(rep, dim=1)
            values = values.repeat_interleave(rep, dim=1)
        scale = 1.0 / math.sqrt(self.head_dim)
        scores = q @ keys.transpose(-2, -1) * scale  # [B, H, S, L]
        kv_pos = torch.arange(keys.shape[2], device=x.device)
        allowed = kv_pos[None, :] <= cache_position[:, None]  # [S, L]
        if self.mask == "additive":
            bias = torch.zeros(allowed.shape, dtype=scores.dtype, device=x.device)
            bias = bias.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            scores = scores + bias
        else:
            scores = scores.masked_fill(~allowed, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = probs @ values  # [B, H, S, D]
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.wo(out)


class HandwrittenDecoder(nn.Module):
    """A small decoder with a static cache. Variants (keyword arguments):

    rope: "interleaved" (default), "half" or "none".
    mask: "additive" (default: zeros.masked_fill(min) added to scores) or "masked_fill" (-inf in place).
    cache_write: "index_copy" (default) or "index_put" (``cache[:, :, pos] = k``).
    """

    def __init__(self, *, rope: str = "interleaved", mask: str = "additive", cache_write: str = "index_copy",
                 batch_size: int = 1, max_cache_len: int = MAX_CACHE, vocab: int = VOCAB, hidden: int = HIDDEN,
                 heads: int = HEADS, kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, layers: int = LAYERS,
                 intermediate: int = INTERMEDIATE, theta: float = 10000.0, qkv_bias: bool = False, seed: int = 0):
        super().__init__()
        assert rope in ("interleaved", "half", "none") and mask in ("additive", "masked_fill")
        assert cache_write in ("index_copy", "index_put") and heads % kv_heads == 0
        self.rope, self.heads, self.kv_heads, self.head_dim = rope, heads, kv_heads, head_dim
        self.max_cache_len = max_cache_len
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList()
        for i in range(layers):
            blk = nn.Module()
            blk.attn_norm = RMSNorm(hidden)
            blk.attn = HandwrittenAttention(i, rope=rope, mask=mask, cache_write=cache_write, batch_size=batch_size,
                                            max_cache_len=max_cache_len, heads=heads, kv_heads=kv_heads,
                                            head_dim=head_dim, hidden=hidden, qkv_bias=qkv_bias)
            blk.mlp_norm = RMSNorm(hidden)
            blk.up = nn.Linear(hidden, 2 * intermediate, bias=False)
            blk.down = nn.Linear(intermediate, hidden, bias=False)
            self.layers.append(blk)
        self.norm = RMSNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        # its own frequency table: theta ** (-2i / D), as a buffer
        freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("freqs", freqs, persistent=False)
        _init_(self, seed)
        self.eval()

    def reset_cache(self) -> None:
        for blk in self.layers:
            blk.attn.k_cache.zero_()
            blk.attn.v_cache.zero_()

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        angles = torch.outer(cache_position.to(torch.float32), self.freqs)  # [S, D/2]
        cos, sin = angles.cos(), angles.sin()
        for blk in self.layers:
            h = h + blk.attn(blk.attn_norm(h), cos, sin, cache_position)
            gate, up = blk.up(blk.mlp_norm(h)).chunk(2, dim=-1)
            h = h + blk.down(F.silu(gate) * up)
        return self.head(self.norm(h))


class CrossAttentionToy(nn.Module):
    """Counter-example: K/V are projections of an extra input ``memory`` [B, M, mem_dim]."""

    def __init__(self, *, vocab: int = VOCAB, hidden: int = HIDDEN, mem_dim: int = 64, heads: int = HEADS,
                 head_dim: int = HEAD_DIM, seed: int = 0):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.embed = nn.Embedding(vocab, hidden)
        self.norm = RMSNorm(hidden)
        self.wq = nn.Linear(hidden, heads * head_dim, bias=False)
        self.wk = nn.Linear(mem_dim, heads * head_dim, bias=False)
        self.wv = nn.Linear(mem_dim, heads * head_dim, bias=False)
        self.wo = nn.Linear(heads * head_dim, hidden, bias=False)
        self.head = nn.Linear(hidden, vocab, bias=False)
        _init_(self, seed)
        self.eval()

    def forward(self, input_ids: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, s = input_ids.shape
        m = memory.shape[1]
        h = self.embed(input_ids)
        x = self.norm(h)
        q = self.wq(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(memory).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        v = self.wv(memory).view(b, m, self.heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v)
        h = h + self.wo(out.transpose(1, 2).reshape(b, s, -1))
        return self.head(h)


class MLPOnly(nn.Module):
    """Counter-example without attention. ``gated=True`` adds ``softmax(x @ W1^T) @ W2``: a softmax
    between two matmuls whose operands are weights, not keys/values."""

    def __init__(self, *, vocab: int = VOCAB, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE,
                 layers: int = LAYERS, gated: bool = True, slots: int = 16, seed: int = 0):
        super().__init__()
        self.gated = gated
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            blk = nn.Module()
            blk.norm = RMSNorm(hidden)
            blk.up = nn.Linear(hidden, intermediate)
            blk.down = nn.Linear(intermediate, hidden)
            if gated:
                blk.keys = nn.Parameter(torch.empty(slots, hidden))
                blk.values = nn.Parameter(torch.empty(slots, hidden))
            self.blocks.append(blk)
        self.head = nn.Linear(hidden, vocab, bias=False)
        _init_(self, seed)
        self.eval()

    def forward(self, input_ids: torch.Tensor, cache_position: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + cache_position.to(torch.float32)[None, :, None] * 0.01
        for blk in self.blocks:
            x = blk.norm(h)
            h = h + blk.down(F.gelu(blk.up(x)))
            if self.gated:
                h = h + torch.softmax(x @ blk.keys.t() / math.sqrt(x.shape[-1]), dim=-1) @ blk.values
        return self.head(h)


def export_handwritten(model: nn.Module, example_seq_len: int = 4, max_seq_len: int = MAX_CACHE - 1,
                       memory_len: int = 6, strict: bool = True) -> torch.export.ExportedProgram:
    """Export a hand-written model with a dynamic sequence dimension (strict)."""
    ids = torch.randint(0, VOCAB, (1, example_seq_len), generator=torch.Generator().manual_seed(0))
    seq = torch.export.Dim("seq_len", min=1, max=max_seq_len)
    if isinstance(model, CrossAttentionToy):
        mem = torch.randn(1, memory_len, model.wk.in_features, generator=torch.Generator().manual_seed(1))
        mlen = torch.export.Dim("mem_len", min=1, max=max_seq_len)
        return torch.export.export(model, (), {"input_ids": ids, "memory": mem},
                                   dynamic_shapes={"input_ids": {1: seq}, "memory": {1: mlen}}, strict=strict)
    pos = torch.arange(example_seq_len)
    return torch.export.export(model, (), {"input_ids": ids, "cache_position": pos},
                               dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=strict)

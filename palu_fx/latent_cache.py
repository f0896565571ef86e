"""``LatentCache``: a transformers ``Cache`` whose memory is the latent cache.

Under ``torch.compile`` the KV cache belongs to the caller: Dynamo passes its tensors into
the graph, so a backend alone cannot shrink them. This cache allocates, per layer, only
the latents ``[B, S_max, G*r]`` (sized from the compression config or plan; quantized
configs get packed rows of codes, scales and zeros), a slot-indexed position buffer
(rotated keys are rebuilt at their own positions, which differ from the slot under left
padding), and routes ``update()`` through the opaque
``palu::cache_update`` op. ``palu_backend`` finds that op in the graph, follows the keys
and values back to their projections like the export pass does, and rewrites the block
into latent writes and ``palu::latent_attention``.

Example::

    model.forward = torch.compile(model.forward, backend=palu_fx.backend(cfg))
    cache = palu_fx.LatentCache(model.config, max_cache_len=1024, compression=cfg)
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=64)
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from transformers.cache_utils import Cache, StaticCache, StaticLayer

from palu_fx import ops  # noqa: F401  (registers palu::cache_update)
from palu_fx.config import PaluConfig
from palu_fx.plan import CompressionPlan
from palu_fx.quant.rows import row_layout

__all__ = ["LatentCache", "LatentLayer"]

RankFn = Callable[[int, int, int], tuple[int, int, int]]  # (kv_heads, D, Dv) -> (groups, rank_k, rank_v)


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class SlotPositions:
    """The position of the token in every slot, ``[B, S_max]`` int64, shared by all layers.

    All layers of a static cache advance together (every forward appends the same tokens to
    each of them), so their slot positions are equal. With one shared buffer the rewritten
    graph writes the new positions and gathers the rotary coefficients of the cached slots
    once per step (the first layer's), not once per layer, and the cache holds one buffer.
    """

    def __init__(self):
        self.tensor: torch.Tensor | None = None

    def get(self, batch_size: int, max_cache_len: int, device: torch.device) -> torch.Tensor:
        t = self.tensor
        if t is None or t.shape != (batch_size, max_cache_len) or t.device != device:
            t = self.tensor = torch.zeros(batch_size, max_cache_len, dtype=torch.int64, device=device)
            if not _is_compiling():
                torch._dynamo.mark_static_address(t)
        return t


class LatentLayer(StaticLayer):
    """One layer's latent keys/values ``[B, S_max, G*r]`` (with ``bits``: ``uint8`` rows of
    packed codes, fp16 scales and zeros, ``palu_fx.quant.rows``); slot positions
    ``[B, S_max]`` are shared with the other layers of the cache (``SlotPositions``)."""

    def __init__(self, max_cache_len: int, ranks: RankFn, slots: SlotPositions | None = None,
                 quant: tuple[int, int | None] | None = None):
        super().__init__(max_cache_len=max_cache_len)
        self._ranks = ranks
        self._slots = slots if slots is not None else SlotPositions()
        self._quant = quant  # (bits, quantization group size or None = one per Palu group)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        groups, rk, rv = self._ranks(self.num_heads, self.k_head_dim, self.v_head_dim)
        shape = (self.batch_size, self.max_cache_len)
        if self._quant is None:
            self.keys = torch.zeros(*shape, groups * rk, dtype=key_states.dtype, device=self.device)
            self.values = torch.zeros(*shape, groups * rv, dtype=value_states.dtype, device=self.device)
        else:  # packed codes + fp16 scales and zeros, one uint8 row per slot (palu_fx.quant.rows)
            bits, qgs = self._quant
            k_row = row_layout(groups * rk, bits, qgs or rk).row_bytes
            v_row = row_layout(groups * rv, bits, qgs or rv).row_bytes
            self.keys = torch.zeros(*shape, k_row, dtype=torch.uint8, device=self.device)
            self.values = torch.zeros(*shape, v_row, dtype=torch.uint8, device=self.device)
        self.positions = self._slots.get(self.batch_size, self.max_cache_len, self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not _is_compiling():
            for t in (self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        kv_length = key_states.shape[-2]
        cache_position = torch.arange(kv_length, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(kv_length)
        return torch.ops.palu.cache_update(self.keys, self.values, self.positions, key_states, value_states,
                                           cache_position)

    def reset(self) -> None:
        if self.is_initialized:
            self.keys.zero_()
            self.values.zero_()
            self.positions.zero_()
        self.cumulative_length.zero_()

    @property
    def nbytes(self) -> int:
        """Bytes of this layer's latents (the shared slot positions are counted by the cache)."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values))


def _rank_fn(compression: Union[PaluConfig, CompressionPlan], layer: int) -> RankFn:
    if isinstance(compression, CompressionPlan):
        if layer >= len(compression.sites):
            raise ValueError(f"the plan has {len(compression.sites)} sites; layer {layer} has none")
        sp = compression.sites[layer]
        return lambda h, d, dv: (sp.key.groups, sp.key.rank, sp.value.rank)

    def ranks(h: int, d: int, dv: int):
        gs = compression.group_size_for(h)
        return h // gs, compression.rank_for(gs * d), compression.rank_for(gs * dv)

    return ranks


class LatentCache(StaticCache):
    """A static cache that stores Palu latents instead of keys and values.

    Args:
        config: the model's config (its text config gives the number of layers).
        max_cache_len: slots per sequence (prompt + generated tokens).
        compression: the ``PaluConfig`` or ``CompressionPlan`` the model is compiled with
            (``palu_fx.backend(...)``); it sizes the latents.
    """

    def __init__(self, config, max_cache_len: int, compression: Union[PaluConfig, CompressionPlan, None] = None):
        compression = compression if compression is not None else PaluConfig()
        if not isinstance(compression, (PaluConfig, CompressionPlan)):
            raise TypeError(f"compression must be a PaluConfig or CompressionPlan, got {type(compression).__name__}")
        cfg = compression.config if isinstance(compression, CompressionPlan) else compression
        quant = (cfg.bits, cfg.quant_group_size) if cfg.bits is not None else None
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        n_layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError("LatentCache needs config.num_hidden_layers")
        self.compression = compression
        self._slots = SlotPositions()
        Cache.__init__(self, layers=[LatentLayer(max_cache_len, _rank_fn(compression, i), self._slots, quant)
                                     for i in range(n_layers)])

    @property
    def nbytes(self) -> int:
        """Bytes this cache has allocated (latents of all layers and the shared slot positions)."""
        slots = self._slots.tensor
        return sum(layer.nbytes for layer in self.layers) + (slots.nbytes if slots is not None else 0)

"""`PaluConfig`: every knob of the compression, validated when it is built.

One place documents every field. Model-dependent checks (does the group size divide the
KV heads of *this* model?) happen in the pass, which knows the model; everything that can
be checked without a model fails here, at construction, naming the field.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Optional, Union

__all__ = ["PaluConfig", "GROUP_ALL"]

# J-LRD: one group holding every KV head of a layer.
GROUP_ALL = "all"

_METHODS = ("svd", "whitened", "kfac")
_BITS = (2, 3, 4)
_ALLOCATORS = ("uniform", "fisher", "energy")


def _fail(field: str, value: Any, expected: str) -> None:
    raise ValueError(f"PaluConfig.{field}={value!r} is invalid: expected {expected}")


@dataclass(frozen=True)
class PaluConfig:
    """How palu-fx compresses the KV cache.

    Fields:
        rank_ratio: kept fraction of each K/V projection's rank, in (0, 1]. ``1.0`` is
            lossless (the correctness anchor); ``0.5`` halves the cache.
        group_size: KV heads factored together. ``1`` is M-LRD (per head), an integer
            ``g`` is G-LRD (``g`` heads per group; must divide the model's KV heads),
            ``"all"`` is J-LRD (one group per layer). ``None`` (default) picks Palu's G-LRD
            default per layer: the largest divisor of the KV heads that is at most 4.
            Larger groups are more accurate at a given cache size but, with RoPE, rebuild
            each cached key from a wider latent: a 7B-shaped model decodes at 0.49x
            Inductor's speed at group size 4 and 1.46x at group size 1 (H200, README).
        rank_multiple: ranks are rounded to a multiple of this (kernels like 16), never
            above the full rank of a group.
        method: ``"svd"`` (data-free truncated SVD), ``"whitened"`` (truncation-aware SVD
            on calibration activations, Palu's) or ``"kfac"`` (whitened on both sides: inputs
            by their Gram, outputs by the loss-gradient Gram, so truncation minimizes a
            Kronecker-factored Fisher estimate of the loss increase). The last two need
            calibration data.
        allocator: how ranks are spread: ``"uniform"`` (every matrix keeps
            ``rank_ratio``), ``"fisher"`` (Palu's Fisher-information allocation) or
            ``"energy"`` (whitened singular-value water-filling). Non-uniform allocators
            need calibration data.
        fold_values: fold the value reconstruction into the output projection when the
            graph allows it and the value rank is at most the head dim; elsewhere (or with
            ``False``) the attention op rebuilds the values itself, since a fold would widen
            ``o_proj`` and ``P @ hv`` by ``rank / head_dim``.
        bits: quantize the cached latents to ``2``, ``3`` or ``4`` bits per channel
            (per-token asymmetric, fp16 scale and zero per channel group; see
            ``palu_fx.quant``). ``None`` (default) keeps them in the model's dtype.
        hadamard: rotate every latent by an orthonormal Hadamard-type matrix folded into
            the factors offline (``palu_fx.compress.hadamard``): exact at full precision,
            it spreads outlier channels so quantization loses less. Mostly useful with
            ``bits``; allowed without (a lossless check of the rotation).
        quant_group_size: latent channels sharing one scale and zero within a token;
            ``None`` (default) is one group per Palu group's latent (the rank ``r``). Must
            divide each latent rank (checked by the pass); only meaningful with ``bits``.
    """

    rank_ratio: float = 0.5
    group_size: Union[int, str, None] = None
    rank_multiple: int = 16
    method: str = "svd"
    allocator: str = "uniform"
    fold_values: bool = True
    bits: Optional[int] = None
    hadamard: bool = False
    quant_group_size: Optional[int] = None

    def __post_init__(self) -> None:
        r = self.rank_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or not 0 < r <= 1:
            _fail("rank_ratio", r, "a number in (0, 1]")
        g = self.group_size
        if g is not None and g != GROUP_ALL and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            _fail("group_size", g, f"a positive integer (1 = M-LRD), {GROUP_ALL!r} (J-LRD) or None (auto)")
        m = self.rank_multiple
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            _fail("rank_multiple", m, "a positive integer")
        if self.method not in _METHODS:
            _fail("method", self.method, f"one of {_METHODS}")
        if self.allocator not in _ALLOCATORS:
            _fail("allocator", self.allocator, f"one of {_ALLOCATORS}")
        if not isinstance(self.fold_values, bool):
            _fail("fold_values", self.fold_values, "a bool")
        b = self.bits
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b not in _BITS):
            _fail("bits", b, f"one of {_BITS} or None (no quantization)")
        if not isinstance(self.hadamard, bool):
            _fail("hadamard", self.hadamard, "a bool")
        q = self.quant_group_size
        if q is not None and (isinstance(q, bool) or not isinstance(q, int) or q < 1):
            _fail("quant_group_size", q, "a positive integer or None (one group per Palu group's latent)")
        if q is not None and b is None:
            _fail("quant_group_size", q, "None when bits is None (nothing is quantized)")

    def group_size_for(self, num_kv_heads: int) -> int:
        """Heads per group for a layer with ``num_kv_heads`` KV heads.

        Raises ValueError listing the valid sizes when the group size does not divide.
        """
        if self.group_size == GROUP_ALL:
            return num_kv_heads
        if self.group_size is None:
            return max(d for d in range(1, min(4, num_kv_heads) + 1) if num_kv_heads % d == 0)
        if num_kv_heads % self.group_size:
            valid = [d for d in range(1, num_kv_heads + 1) if num_kv_heads % d == 0]
            raise ValueError(
                f"PaluConfig.group_size={self.group_size} does not divide the {num_kv_heads} KV heads "
                f"of this attention; valid sizes: {valid} or {GROUP_ALL!r}"
            )
        return self.group_size

    def rank_for(self, full_rank: int, ratio: float | None = None) -> int:
        """Rank kept for a group of full rank ``full_rank`` (= heads_per_group * head_dim)."""
        ratio = self.rank_ratio if ratio is None else ratio
        if ratio >= 1.0:
            return full_rank
        # nearest of the multiples of rank_multiple below the full rank, or the full rank itself
        m, target = self.rank_multiple, ratio * full_rank
        candidates = [k * m for k in range(1, full_rank // m + 1)] + [full_rank]
        return min(candidates, key=lambda c: (abs(c - target), c))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PaluConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"PaluConfig: unknown fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)

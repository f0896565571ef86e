"""One ``uint8`` row per token holding a latent's packed codes, then its fp16 scales, then
its fp16 zeros: how a ``LatentCache`` stores a quantized latent.

The caller owns a ``LatentCache`` and ``palu::cache_update`` hands the graph one buffer per
layer and role, so codes, scales and zeros share one buffer ``[B, S_max, row_bytes]``. The
rewritten graph writes whole rows (one ``index_copy_``) and reads three strided views of
them (``[:code_bytes]``, ``[scale_start:zero_start]`` and ``[zero_start:]``, the last two
viewed as fp16), which the kernels and the reference take as they take separate tensors
(``Latent``: scale and zero share strides).
"""
from __future__ import annotations

from typing import NamedTuple

from palu_fx.quant.pack import SCALE_BYTES, packed_shape

__all__ = ["RowLayout", "row_layout"]


class RowLayout(NamedTuple):
    code_bytes: int
    groups: int

    @property
    def scale_start(self) -> int:
        return self.code_bytes

    @property
    def zero_start(self) -> int:
        return self.code_bytes + SCALE_BYTES * self.groups

    @property
    def row_bytes(self) -> int:
        return self.code_bytes + 2 * SCALE_BYTES * self.groups


def row_layout(channels: int, bits: int, group_size: int | None = None) -> RowLayout:
    ps = packed_shape(channels, bits, group_size)
    if ps.code_bytes % SCALE_BYTES:  # the fp16 scales must start on a 2-byte boundary
        raise ValueError(f"{channels} channels at {bits} bits pack into {ps.code_bytes} bytes, an odd number: "
                         "a LatentCache row cannot hold fp16 scales after them")
    return RowLayout(ps.code_bytes, ps.groups)

"""``Latent``: a latent cache as the fused kernels read it, plain or packed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from triton import next_power_of_2


@dataclass(frozen=True)
class Latent:
    """A latent cache as the fused kernels read it: plain ``data`` [B, S, C] (``bits`` 0), or
    packed codes ``data`` uint8 [B, S, code_bytes] with fp16 ``scale``/``zero`` [B, S, C // group_size]
    (layouts: ``palu_fx.quant``; scale and zero share strides)."""

    data: torch.Tensor
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    bits: int = 0
    group_size: int = 1

    @property
    def channels(self) -> int:
        return self.data.shape[-1] if self.bits == 0 else self.scale.shape[-1] * self.group_size

    def words(self, dtype: torch.dtype, interpret: bool) -> bool:
        """Whether the kernels can read the codes as 32-bit words and dequantize them two
        channels per instruction (``common._dequant4_asm``): 4 bits with fp16 or bf16 operands,
        quantization groups of whole words, word-aligned rows, and a compiled kernel (the
        interpreter runs no PTX)."""
        t = self.data
        return (self.bits == 4 and dtype in (torch.float16, torch.bfloat16) and not interpret
                and self.group_size % 8 == 0
                and t.stride(0) % 4 == 0 and t.stride(1) % 4 == 0 and t.data_ptr() % 4 == 0)

    def kernel_args(self, rank: int, rank_p: int):
        """(pointers, strides + per-group width, constexprs) of one Palu group of ``rank`` channels."""
        t = self.data
        if self.bits == 0:
            return (t, t, t), (t.stride(0), t.stride(1), 0, 0, rank), (0, 1, 1, 1, 1)
        n = rank // self.group_size
        qg_p = rank_p if n == 1 else self.group_size
        return ((t, self.scale, self.zero), (t.stride(0), t.stride(1), self.scale.stride(0), self.scale.stride(1),
                                             rank * self.bits // 8),
                (self.bits, self.group_size, qg_p, n, next_power_of_2(n)))

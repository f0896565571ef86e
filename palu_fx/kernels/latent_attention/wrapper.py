"""Host side of the latent-attention kernels: argument checks, path choice, launch.

Paths (same semantics as ``naive.latent_attention_ref``):

* fused (``decode.py`` / ``absorbed.py``): few query tokens per sequence. The query heads of
  a group and the query positions share one program, so every latent tile is read once
  per group; the cached sequence is split over programs (flash-decoding) and merged by
  ``combine_splits_kernel``. When every query head has its own group and one query token
  (``KernelConfig.group_heads``), ``per_head.py``'s kernel takes several groups per
  program instead. The fused kernels read plain latents or packed quantized ones
  (``Latent``; the quantized op's host side is ``quant.py``).
* prefill (``prefill.py``): many query tokens and no softcap: keys rebuilt once, then SDPA.
  With a softcap (which SDPA lacks) the fused kernel also serves prefill, tiling the
  query positions over a third grid axis.
* float64 has no Triton tensor-core path: it runs the reference.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
from triton.runtime.errors import OutOfResources

from palu_fx.kernels.latent_attention import gluon_gqa, gluon_host, gluon_q4, gluon_rope, gluon_wide
from palu_fx.kernels.latent_attention.absorbed import absorbed_attention_kernel
from palu_fx.kernels.latent_attention.common import (
    MASK_ADD, MASK_ADD_SHARED, MASK_BOOL, MASK_BOOL_SHARED, MASK_NONE, combine_splits_kernel,
)
from palu_fx.kernels.latent_attention.decode import rebuild_attention_kernel
from palu_fx.kernels.latent_attention.latent import Latent
from palu_fx.kernels.latent_attention.naive import (
    ROPE_HALF, ROPE_INTERLEAVED, ROPE_NONE, in_op_layout, latent_attention_ref, new_output, up_values,
)
from palu_fx.kernels.latent_attention.prefill import (rebuild_keys, rebuild_values, sdpa_latent, sdpa_values,
                                                      unpadded_values)
from palu_fx.kernels.latent_attention.per_head import per_head_applies, per_head_launch

__all__ = ["KernelConfig", "Latent", "latent_attention_triton", "fused_attention", "fused_fits", "choose_config"]

# Fused kernel when (query heads per group, padded) x (query tokens, padded) fits one block.
MAX_FUSED_ROWS = 64
# Split chunks are multiples of this many tokens (every BLOCK_S divides it).
CHUNK_QUANTUM = 256


@dataclass(frozen=True)
class KernelConfig:
    """Launch knobs of the fused kernels.

    block_s: cached tokens per loop step. num_warps / num_stages: Triton's. programs_per_sm:
    how many programs the split heuristic aims for per multiprocessor (more splits balance
    the waves better but add partial outputs to merge). num_splits forces the split count.
    chunk: widest column chunk of a rebuilt key head (rotary pairs or pass-through dims).
    heads_per_program: KV heads of a group one rebuild program handles (0: all of them).
    dynamic_heads: loop over those heads at run time instead of unrolling (fewer live
    registers for large groups). group_heads: when every query head has its own latent
    group (M-LRD, no GQA sharing, one query token), run ``per_head.py``'s kernel with this
    many heads (groups) per program (0: the group kernels ``decode.py`` / ``absorbed.py``).
    prefetch: load the small per-tile vectors (the shared decode-mask row, a packed cache's
    per-token scales and zeros) one token tile ahead (``common.py``). word_dequant: read a
    4-bit cache with fp16 or bf16 operands as 32-bit words and dequantize them two channels per
    instruction (inline PTX, so GPU only: ``Latent.words``); off, Triton's own unpack.
    fill_waves: pick the split count from the compiled kernel's occupancy instead of
    programs_per_sm: the fewest splits whose programs fill whole waves of what the SMs hold at
    once (registers, shared memory, threads: ``_resident_programs``); programs_per_sm still
    bounds how many splits are tried. merge_heads: per-head programs of several heads read
    them as one latent tile when their groups are unpadded (rank a power of two): the values
    of all heads take one product (``MERGE_V``), and so do the absorbed scores, against a
    block-diagonal query (``MERGE_K``); one layout round trip, barrier and wait per tile
    instead of one per head. gluon: calls ``gluon_q4.applies`` to (4-bit absorbed decode, at
    most 8 query heads per group, fp16 or bf16, on a GPU) run the Gluon kernel instead, with
    about gluon_heads query heads per one-warp program, gluon_block_s tokens per tile and
    gluon_stages copy stages (H200, B=8 x 32k: 0.162-0.169 ms against 0.416 for the Triton
    kernel; RESULTS.md, issue 5); and calls ``gluon_rope.applies`` to (RoPE decode in
    multi-head attention at any group size, ranks up to 128, plain or 4-bit latents, fp16 or
    bf16, on a GPU) run the Gluon RoPE kernel (B=8 x 32k at gs1: fp16 0.50-0.52 ms against
    0.63-0.69 for the Triton kernel, 4-bit 0.52 against 0.69; at gs2 0.82 and 0.77-0.81 against
    1.69 and 2.03; RESULTS.md, issues 3 and 5), with gluon_rope_heads heads per
    program (1 or 2; 0: ``gluon_rope.default_knobs``), gluon_rope_stages copy stages,
    gluon_rope_tables for where its cos/sin rows go (-1: the default; 0: registers, loaded a
    tile ahead; 1: copied with each stage; 2: one copy buffer) and gluon_rope_regs as ptxas's
    register cap (0: none); and calls ``gluon_gqa.applies`` to (RoPE decode where 2-16 query heads
    share each KV head, any group size, ranks up to 128, plain or 4-bit latents) run the Gluon
    GQA kernel, which rebuilds a KV head's keys once for all its query heads, with
    gluon_rope_stages copy stages (B=8 x 32k, 32 query / 8 KV heads of 128: gs1 0.17 ms against 0.21 for the
    Triton kernels, gs2 0.27 against 0.45; 4-bit 0.20 and 0.27 against 0.26 and 0.53); and calls
    ``gluon_wide.applies`` first to (RoPE decode in multi-head attention at key rank 128 or 256
    per group, plain latents) run the Gluon kernel for wide groups, with gluon_wide_pairs summing
    a tile's two-row value products in pairs of the latents' dtype before the fp32 accumulators
    and gluon_wide_min_rank its smallest key rank (256 leaves rank 128 to ``gluon_rope``; B=8 x
    32k: gs4 1.48-1.58 ms against 2.56 for the Triton kernels, 3.14 without pairs; rank 128 at
    gs1 1.03 against 1.24 for ``gluon_rope``, at gs2 0.83 against 0.91).
    """

    block_s: int = 64
    num_warps: int = 4
    num_stages: int = 2
    programs_per_sm: int = 4
    num_splits: Optional[int] = None
    chunk: int = 64
    heads_per_program: int = 0
    dynamic_heads: bool = False
    group_heads: int = 0
    prefetch: bool = True
    word_dequant: bool = True
    fill_waves: bool = False
    merge_heads: bool = True
    gluon: bool = True
    gluon_heads: int = 4
    gluon_block_s: int = 32
    gluon_stages: int = 2
    gluon_rope_heads: int = 0
    gluon_rope_stages: int = 2
    gluon_rope_tables: int = -1
    gluon_rope_regs: int = 0
    gluon_wide_pairs: bool = True
    gluon_wide_min_rank: int = 128

    def __post_init__(self):
        checks = {"gluon_rope_heads": self.gluon_rope_heads in (0, 1, 2),
                  "gluon_rope_stages": self.gluon_rope_stages >= 2,
                  "gluon_rope_tables": self.gluon_rope_tables in (-1, 0, 1, 2),
                  "gluon_rope_regs": self.gluon_rope_regs == 0 or 24 <= self.gluon_rope_regs <= 255,
                  "gluon_wide_min_rank": self.gluon_wide_min_rank in (128, 256)}
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"KernelConfig.{bad[0]}={getattr(self, bad[0])!r} is out of range "
                             "(heads 0/1/2, stages >= 2, tables -1/0/1/2, regs 0 or 24-255, wide min rank 128/256)")


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv: that is a jit function, ~6 us per call from Python, and a decode call
    # made six of them (host time is what a decode step without CUDA graphs is bound by)
    return -(-a // b)


def _p2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _interpreting(t: torch.Tensor) -> bool:
    """Kernels on CPU tensors run under Triton's interpreter (``TRITON_INTERPRET=1``)."""
    return t.device.type != "cuda"


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def choose_config(rebuild: bool, gs: int, rk: int, rv: int, head_dim: int, rows: int, interpret: bool,
                  quantized: bool = False) -> KernelConfig:
    """Default launch knobs for a shape: the fastest configs of a sweep on an H200 at batch
    8, 32k context, head dim 128 (see benchmarks/RESULTS.md).

    Where every query head owns its latent group (MHA at group size 1), RoPE calls run
    ``per_head.py``'s kernel: one head per program for fp16 latents, two at 4 bits. It is
    also the faster one inside a compiled model (4.79 against 5.39 ms per 8-layer step), since
    it builds its rotated queries in-kernel and reads the decode mask a tile ahead. Absorbed
    calls take two heads per program, read as one tile (the fastest candidates on the H200,
    RESULTS.md; not yet measured inside a model without RoPE).
    Under the interpreter: big blocks, few programs (each program costs Python time).
    """
    if interpret:
        return KernelConfig(block_s=64, num_warps=4, num_stages=1, programs_per_sm=1)
    if rebuild and gs == 1:
        # per-head programs where every query head owns its group (MHA); otherwise (GQA) the
        # group kernel with the same knobs: 183 registers, 104 KB shared memory, no spills
        # (benchmarks/kernel_resources.py). H200, B=8 x 32k: per-head x1 0.761 ms against
        # 0.913 for the group kernel; at 4 bits x2 0.855 (x1 1.02). Splits that fill whole
        # waves (two programs per SM): with the decode mask 0.779 ms against 0.846-0.861 for 8
        # programs per SM, 0.109 against 0.124 at B=1 (benchmarks/split_counts.py)
        return KernelConfig(block_s=64, num_warps=4, num_stages=3, chunk=64, programs_per_sm=8,
                            group_heads=2 if quantized else 1, fill_waves=True)
    if not rebuild:
        # bandwidth bound: long tiles keep bytes in flight; shared memory caps the stages
        if rk + rv <= 128:
            if quantized:  # 4-bit fp16 calls take the Gluon kernel (``gluon``: 0.162-0.169 ms); these
                # knobs serve the rest. H200, 4 bits, B=8 x 32k, heads merged into one tile (merge_heads):
                # per-head x2 at 3 stages 0.421 ms (128 registers, four programs per SM); x4 0.438
                # (194 registers, two per SM); before the merge x4 at 2 stages 0.441; group kernel 0.74
                return KernelConfig(block_s=64, num_warps=4, num_stages=3, programs_per_sm=16, group_heads=2)
            # MHA: per-head x2 0.492 ms against 0.576 for the group kernel (GQA keeps the latter);
            # splits that fill whole waves: 0.468 against 0.483 at B=8, 0.071 against 0.082 at B=1
            return KernelConfig(block_s=128, num_warps=4, num_stages=3, programs_per_sm=4, group_heads=2,
                                fill_waves=True)
        if rk + rv <= 256:
            return KernelConfig(block_s=128, num_warps=8, num_stages=3, programs_per_sm=4)
        return KernelConfig(block_s=64, num_warps=4, num_stages=3, programs_per_sm=4)
    # rebuild: the fastest configs of the H200 sweep for head dim 128 (2 heads: one program
    # per KV head; 4 heads: a runtime loop over the heads)
    if gs == 2:
        return KernelConfig(block_s=128, num_warps=8, num_stages=2, chunk=64, heads_per_program=1,
                            programs_per_sm=8)
    return KernelConfig(block_s=128, num_warps=8, num_stages=2, chunk=32, dynamic_heads=True, programs_per_sm=4)


def _parts(q, lk, k_bias, cos, sin, k_norm_weight, rope_style, B, Skv, interpret, dtype):
    """Constants and prepared tensors of the key pipeline (rebuild mode)."""
    G, gsD, RK = lk.shape
    D = q.shape[-1]
    if gsD % D:
        raise ValueError(f"lk rows ({gsD}) are not a multiple of the head dim ({D})")
    if rope_style not in (ROPE_NONE, ROPE_HALF, ROPE_INTERLEAVED):
        raise ValueError(f"unknown rope style {rope_style}")
    rope = rope_style != ROPE_NONE
    rot = cos.shape[-1] if rope else 0
    if rope and (rot % 2 or rot > D or sin.shape[-1] != rot):
        raise ValueError(f"rotary width {rot} must be even and at most the head dim {D}")
    half, pas = rot // 2, D - rot
    dummy = q
    p = dict(
        D=D, RK_P=max(16, _p2(RK)), ROPE=rope, ROT=rot, HALF=half, HALF_P=max(16, _p2(half)),
        STEP=2 if rope_style == ROPE_INTERLEAVED else 1,
        HI_OFF=1 if rope_style == ROPE_INTERLEAVED else half,
        PASS=pas, PASS_P=max(16, _p2(pas)), HAS_PASS=pas > 0,
        HAS_BIAS=k_bias is not None, HAS_NORM=k_norm_weight is not None,
        UPCAST=interpret and dtype == torch.bfloat16, IEEE=dtype == torch.float32,
        bias=k_bias.reshape(-1).contiguous() if k_bias is not None else dummy,
        w=k_norm_weight.contiguous() if k_norm_weight is not None else dummy,
    )
    if rope:
        cos = cos.expand(B, Skv, rot)
        sin = sin.expand(B, Skv, rot)
        p.update(cos=cos, sin=sin, cos_strides=cos.stride(), sin_strides=sin.stride())
    else:
        p.update(cos=dummy, sin=dummy, cos_strides=(0, 0, 0), sin_strides=(0, 0, 0))
    return p


def _mask_args(attn_mask, B, Hq, Sq, Skv, dummy):
    if attn_mask is None:
        return MASK_NONE, dummy, (0, 0, 0, 0)
    m = attn_mask.expand(B, Hq, Sq, Skv)
    _, sh, sq, _ = m.stride()
    # one mask row per sequence (broadcast over heads and query positions)
    shared = (sh == 0 or Hq == 1) and (sq == 0 or Sq == 1)
    if m.dtype == torch.bool:
        return (MASK_BOOL_SHARED if shared else MASK_BOOL), m.view(torch.uint8), m.stride()
    return (MASK_ADD_SHARED if shared else MASK_ADD), m, m.stride()


def _split_plan(cfg, n_base, Skv, sms, resident=0):
    """(splits, chunk) of ``Skv`` cached tokens over ``n_base`` programs per split, on ``sms``
    multiprocessors.

    ``resident``: programs of the compiled kernel one SM runs at once (0: unknown). Known (and
    ``cfg.fill_waves``), the plan takes the fewest splits whose programs fill at least 90% of
    their last wave of ``resident x SMs`` slots: a wave with a few programs costs a whole
    wave's time, and every split adds a prologue and partial outputs to merge (B=8 x 32k on
    the H200: 1 split 0.78 ms, 5 splits 0.86, 9 splits 0.89; B=1: 8 splits or more).
    """
    if cfg.num_splits is not None:
        splits = max(1, min(cfg.num_splits, Skv))
        return _cdiv(Skv, _cdiv(Skv, splits)), _cdiv(Skv, splits)
    most = max(1, min(_cdiv(cfg.programs_per_sm * sms, n_base), _cdiv(Skv, CHUNK_QUANTUM)))

    def plan(want):
        chunk = _cdiv(_cdiv(Skv, want), CHUNK_QUANTUM) * CHUNK_QUANTUM
        return _cdiv(Skv, chunk), chunk

    if not (cfg.fill_waves and resident > 0):
        return plan(most)
    slots = resident * sms
    best, best_fill = plan(1), 0.0
    for want in range(1, most + 1):
        splits, chunk = plan(want)
        programs = n_base * splits
        fill = programs / (_cdiv(programs, slots) * slots)
        if fill >= 0.9:
            return splits, chunk
        if fill > best_fill + 1e-9:
            best, best_fill = (splits, chunk), fill
    return best


_RESIDENT: dict = {}


def _resident_programs(kernel, grid, args, consts) -> int:
    """How many programs of this launch one SM runs at once, from the compiled kernel's
    registers, shared memory and warps and the device's per-SM limits (0 when unknown).

    Compiles without launching (``warmup``); the caller caches the answer.
    """
    dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if dev is None or dev.type != "cuda" or not hasattr(kernel, "warmup"):
        return 0
    try:
        compiled = kernel.warmup(*args, grid=grid, **consts)
        compiled._init_handles()  # loads the binary: its register count (and shared-memory check)
        warps = consts.get("num_warps", 4)
        prop = torch.cuda.get_device_properties(dev)
        by_regs = programs_by_registers(compiled.n_regs, warps, prop.regs_per_multiprocessor)
        by_smem = prop.shared_memory_per_multiprocessor // (compiled.metadata.shared + 1024)  # 1 KB reserved
        by_threads = prop.max_threads_per_multi_processor // (32 * warps)
        return max(1, min(by_regs, by_smem, by_threads, 32))
    except Exception:  # noqa: BLE001 (an older Triton, a kernel that needs fewer stages: the plain plan)
        return 0


def programs_by_registers(n_regs: int, warps: int, regs_per_sm: int = 65536) -> int:
    """Programs of ``warps`` warps at ``n_regs`` registers per thread that one SM's register file
    holds. Registers go out in units of 256 per warp, and a warp lives on one of the SM's 4
    partitions, taking them from that partition's quarter of the file: one-warp programs of 208
    registers fit 2 per partition, 8 per SM, not 65536 // 6656 = 9 (a split plan for 10 per SM
    ran a second wave on the H200: 0.226 ms against 0.161; RESULTS.md, issue 5)."""
    per_warp = _cdiv(_cdiv(max(n_regs, 1), 8) * 8 * 32, 256) * 256
    return 4 * (regs_per_sm // 4 // per_warp) // warps


def _launch(kernel, grid, args, consts):
    """Launch; while the compiled kernel needs more shared memory than the device has (odd
    head dims, full rank), retry with fewer pipeline stages, then shorter token tiles.
    Triton knows the exact size only once compiled, so this is checked, not estimated."""
    while True:
        try:
            kernel[grid](*args, **consts)
            return
        except OutOfResources:
            if consts["num_stages"] > 1:
                consts = dict(consts, num_stages=consts["num_stages"] - 1)
            elif consts["BLOCK_S"] > 16:
                consts = dict(consts, BLOCK_S=consts["BLOCK_S"] // 2)
            else:
                raise


def latent_attention_triton(
    q: torch.Tensor,
    hk: torch.Tensor,
    hv: torch.Tensor,
    lk: Optional[torch.Tensor],
    k_bias: Optional[torch.Tensor],
    cos: Optional[torch.Tensor],
    sin: Optional[torch.Tensor],
    k_norm_weight: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    scale: float,
    softcap: float = 0.0,
    is_causal: bool = False,
    rope_style: int = ROPE_NONE,
    k_norm_eps: float = 1e-6,
    lv: Optional[torch.Tensor] = None,
    *,
    config: Optional[KernelConfig] = None,
    path: Optional[str] = None,
) -> torch.Tensor:
    """Triton latent attention; same arguments and result as ``latent_attention_ref``.

    ``config`` overrides the launch knobs; ``path`` forces ``"fused"`` or ``"prefill"``
    (benchmarks and tests). With ``lv`` the fused kernels still accumulate ``P @ hv`` in
    latent space and one batched matmul applies ``lv`` after them (decode reads each latent
    once either way); prefill rebuilds the values instead where they are narrower than
    their latents (``_prefill``).
    """
    if q.dtype == torch.float64:
        return latent_attention_ref(q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale,
                                    softcap, is_causal, rope_style, k_norm_eps, lv)
    hk = hk if hk.stride(-1) == 1 else hk.contiguous()
    hv = hv if hv.stride(-1) == 1 else hv.contiguous()
    if path is None:
        path = "fused" if fused_fits(q, lk, hk.shape[-1], softcap) else "prefill"
    if path == "prefill":
        return _prefill(q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap, is_causal,
                        rope_style, k_norm_eps, lv)
    out = fused_attention(q, Latent(hk), Latent(hv), lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap,
                          is_causal, rope_style, k_norm_eps, config, hk.dtype)
    return out if lv is None else up_values(out, lv)


def fused_fits(q: torch.Tensor, lk: Optional[torch.Tensor], k_channels: int, softcap: float) -> bool:
    """Whether a call is decode-shaped: its (query heads per group) x (query tokens) fit one
    fused block. With a softcap (which SDPA lacks) the fused kernel serves prefill too."""
    G = lk.shape[0] if lk is not None else k_channels // q.shape[-1]
    return _p2(q.shape[1] // max(G, 1)) * _p2(q.shape[2]) <= MAX_FUSED_ROWS or softcap > 0


def _prefill(q, hk, hv, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap, is_causal, rope_style,
             k_norm_eps, lv=None):
    """Prefill path: keys rebuilt once (rebuild mode), then SDPA. At group size > 1 every KV
    head reads its group's latent values, which the key launch copies per KV head.

    With ``lv`` wider latents than values (``rv > Dv``) the values are rebuilt too
    (``prefill.rebuild_values``), so SDPA runs at the head dims of the uncompressed model
    instead of ``P @ hv`` at ``rv``; otherwise attention stays latent and ``lv`` is applied
    after it.
    """
    if softcap > 0:
        raise ValueError("the prefill path (SDPA) has no softcap")
    B, Hq, Sq, Dq = q.shape
    Skv = hk.shape[1]
    dtype = hk.dtype
    interpret = _interpreting(q)
    G, RK, RV, GS = _groups(q, hk.shape[-1], hv.shape[-1], lk)
    rebuild_v = lk is not None and lv is not None and RV > lv.shape[1]
    vals = None
    if lk is not None:
        lk = lk.to(dtype).contiguous()
        p = _parts(q, lk, k_bias, cos, sin, k_norm_weight, rope_style, B, Skv, interpret, dtype)
        width = prefill_key_width(q, lv.shape[1] if rebuild_v else RV, attn_mask, is_causal, Hq != G * GS, dtype)
        rk = (hk, lk, k_bias, p["cos"], p["sin"], k_norm_weight, k_norm_eps, p, width, dtype)
        if GS > 1 and not rebuild_v:  # each KV head reads its group's latent values: copied in the same launch
            keys, vals = rebuild_keys(*rk, values=hv.to(dtype))
        else:
            keys = rebuild_keys(*rk)
    else:
        keys = hk.view(B, Skv, G, RK).transpose(1, 2)
    if rebuild_v:
        Hkv, Dv, _ = lv.shape
        if Hkv != G * GS:
            raise ValueError(f"lv has {Hkv} KV heads, the keys {G * GS}")
        vals = rebuild_values(hv, lv, G)
        return in_op_layout(sdpa_values(q.to(dtype), keys, vals, attn_mask, scale, is_causal).to(q.dtype))
    # SDPA answers a query of [B, S, H, D] memory (as models pass it) in that layout: no copy
    if vals is not None:
        out = sdpa_values(q.to(dtype), keys, vals, attn_mask, scale, is_causal).to(q.dtype)
    else:
        out = sdpa_latent(q.to(dtype), keys, hv, G, attn_mask, scale, is_causal).to(q.dtype)
    return in_op_layout(out) if lv is None else up_values(out, lv)


def prefill_key_width(q, rv, attn_mask, is_causal, gqa, dtype) -> int:
    """Width of the keys the prefill path rebuilds: the query's head dim where SDPA will be
    asked for unpadded values (``prefill.unpadded_values``), else as wide as the values, so
    the rebuild writes the zero columns instead of a pad copying the keys."""
    D = q.shape[-1]
    return D if unpadded_values(q, rv, attn_mask, is_causal, gqa, dtype) else max(D, rv)


def _groups(q, k_channels, v_channels, lk):
    """(groups, key rank, value rank, KV heads per group), checked against the query heads."""
    Hq, Dq = q.shape[1], q.shape[-1]
    G = lk.shape[0] if lk is not None else k_channels // Dq
    RK = lk.shape[-1] if lk is not None else Dq
    if k_channels != G * RK or v_channels % G or Hq % G:
        raise ValueError(f"latent shapes do not match: {k_channels} key and {v_channels} value latent channels, "
                         f"{G} groups of rank {RK}, {Hq} query heads")
    GS = lk.shape[1] // Dq if lk is not None else 1
    if (Hq // G) % GS:
        raise ValueError(f"{Hq} query heads do not split over {G * GS} KV heads")
    return G, RK, v_channels // G, GS


def fused_attention(q, kl: Latent, vl: Latent, lk, k_bias, cos, sin, k_norm_weight, attn_mask, scale, softcap,
                    is_causal, rope_style, k_norm_eps, config, dtype):
    """The fused (flash-decoding) kernels over plain or packed latents; operands in ``dtype``."""
    interpret = _interpreting(q)
    B, Hq, Sq, Dq = q.shape
    Skv = kl.data.shape[1]
    rebuild = lk is not None
    G, RK, RV, GS = _groups(q, kl.channels, vl.channels, lk)
    HPG = Hq // G
    NREP = HPG // GS
    p = None
    if rebuild:
        lk = lk.to(dtype).contiguous()
        p = _parts(q, lk, k_bias, cos, sin, k_norm_weight, rope_style, B, Skv, interpret, dtype)
    qc = q.to(dtype)

    cfg = config or choose_config(rebuild, GS, RK, RV, Dq, _p2(HPG) * _p2(Sq), interpret, quantized=kl.bits > 0)
    if not interpret and cfg.block_s < 64 and dtype in (torch.float16, torch.bfloat16) and any(
            lat.bits and not (cfg.word_dequant and lat.words(dtype, interpret)) and _p2(rank) <= 16
            for lat, rank in ((kl, RK), (vl, RV))):
        # Triton 3.6 on the H200 computed wrong scores from bytes unpacked into 16-channel tiles of
        # 32 tokens (fp16; 2, 3 and 4 bits; right under the interpreter, and at 64 tokens):
        # benchmarks/quant_diag.py, RESULTS.md
        cfg = dataclasses.replace(cfg, block_s=64)
    per_head = per_head_applies(q, lk, k_bias, k_norm_weight, rope_style, G, cfg.group_heads)
    if per_head:  # one query head per latent group: programs of group_heads heads
        VG, VHPG = Hq // cfg.group_heads, cfg.group_heads
    else:
        # a rebuild program may take a subset of its group's KV heads ("virtual groups")
        HPP = GS if not rebuild or cfg.heads_per_program <= 0 else math.gcd(GS, cfg.heads_per_program)
        NHS = GS // HPP
        VG, VHPG = G * NHS, HPG // NHS  # virtual groups and their query heads
    HPG_P = _p2(VHPG)
    fused_rows = HPG_P * _p2(Sq)
    M_BLOCK = max(16, min(fused_rows, max(MAX_FUSED_ROWS, HPG_P)))
    NQB = _cdiv(Sq, M_BLOCK // HPG_P)
    out = new_output(B, Hq, Sq, RV, like=q)  # (kernels take its strides; Gluon's decode rows are the same memory)
    RK_P, RV_P = max(16, _p2(RK)), max(16, _p2(RV))
    mask_kind, mask, mstr = _mask_args(attn_mask, B, Hq, Sq, Skv, q)
    if cfg.gluon and gluon_q4.applies(qc, kl, vl, lk, softcap, is_causal, mask_kind, G, interpret):
        return gluon_host.run_q4(qc, kl, vl, mask_kind, mask, mstr, scale, cfg, out)
    if cfg.gluon and rebuild and gluon_wide.applies(qc, kl, vl, lk, k_bias, k_norm_weight, p["cos"], p["sin"],
                                                    rope_style, softcap, is_causal, mask_kind, G, interpret,
                                                    cfg.gluon_wide_min_rank):
        return gluon_host.run_wide(qc, lk, kl, vl, p["cos"], p["sin"], mask_kind, mask, mstr, scale, cfg, out)
    if cfg.gluon and rebuild and gluon_rope.applies(qc, kl, vl, lk, k_bias, k_norm_weight, p["cos"], p["sin"],
                                                    rope_style, softcap, is_causal, mask_kind, G, interpret):
        return gluon_host.run_rope(qc, lk, kl, vl, p["cos"], p["sin"], mask_kind, mask, mstr, scale, cfg, out)
    if cfg.gluon and rebuild and gluon_gqa.applies(qc, kl, vl, lk, k_bias, k_norm_weight, p["cos"], p["sin"],
                                                   rope_style, softcap, is_causal, mask_kind, G, interpret):
        return gluon_host.run_gqa(qc, lk, kl, vl, p["cos"], p["sin"], mask_kind, mask, mstr, scale, cfg, out)
    (hk, hks, hkz), k_strides, k_q = kl.kernel_args(RK, RK_P)
    (hv, hvs, hvz), v_strides, v_q = vl.kernel_args(RV, RV_P)
    latent_strides = (*k_strides[:2], *v_strides[:2], *k_strides[2:4], *v_strides[2:4], k_strides[4], v_strides[4])

    def launch(nsplit, chunk, part, lse, probe=False):
        """Launch with ``nsplit`` sequence splits; ``probe``: return (kernel, grid, args,
        constexprs) of that launch instead (``_resident_programs`` compiles it)."""
        common_args = dict(
            RK_P=RK_P, RV_P=RV_P, HPG=VHPG, HPG_P=HPG_P, M_BLOCK=M_BLOCK, BLOCK_S=cfg.block_s,
            MASK_KIND=mask_kind, IS_CAUSAL=bool(is_causal), USE_SOFTCAP=softcap > 0, DIRECT=nsplit == 1,
            UPCAST=interpret and dtype == torch.bfloat16, IEEE=dtype == torch.float32,
            **dict(zip(("K_BITS", "K_QG", "K_QG_P", "K_NQG", "K_NQG_P"), k_q)),
            **dict(zip(("V_BITS", "V_QG", "V_QG_P", "V_NQG", "V_NQG_P"), v_q)),
            PREFETCH=cfg.prefetch,
            K_WORDS=cfg.word_dequant and kl.words(dtype, interpret),
            V_WORDS=cfg.word_dequant and vl.words(dtype, interpret),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        grid = (nsplit, B * VG, NQB)
        runtime = (G, Hq, Sq, Skv, chunk, nsplit, RK, RV, float(scale), float(softcap))
        if per_head:
            merge = cfg.merge_heads and VHPG > 1  # unpadded groups only: the heads' latents are one row segment
            common_args.update(MERGE_K=merge and not rebuild and RK == RK_P, MERGE_V=merge and RV == RV_P)
            return per_head_launch(grid, qc, lk, p, (hk, hv, hks, hkz, hvs, hvz), latent_strides, mask, mstr, out,
                                   part, lse, runtime, common_args, dtype, probe=probe)
        if rebuild:
            half_p, pass_p = p["HALF_P"], p["PASS_P"]
            ch, pch = min(half_p, cfg.chunk), min(pass_p, cfg.chunk)
            nch, npc = (half_p // ch if p["ROPE"] else 0), (pass_p // pch if p["HAS_PASS"] else 0)
            hoist = HPP == 1 and nch <= 1 and npc <= 1
            args = (qc, hk, hv, hks, hkz, hvs, hvz, lk, p["bias"], p["cos"], p["sin"], p["w"], mask, out, part, lse,
                    *qc.stride(), *latent_strides,
                    lk.stride(0), lk.stride(1), *p["cos_strides"], *p["sin_strides"], *mstr,
                    out.stride(0), out.stride(1), out.stride(2),
                    *runtime, float(k_norm_eps))
            consts = dict(D=Dq, GS=GS, HPP=HPP, NREP=NREP, ROPE=p["ROPE"], ROT=p["ROT"], HALF=p["HALF"],
                          CH=ch, NCH=nch, STEP=p["STEP"], HI_OFF=p["HI_OFF"], PASS=p["PASS"], PCH=pch, NPC=npc,
                          HAS_BIAS=p["HAS_BIAS"], HAS_NORM=p["HAS_NORM"], HOIST=hoist,
                          DYN_HEADS=cfg.dynamic_heads and HPP > 1, **common_args)
            kernel = rebuild_attention_kernel
        else:
            args = (qc, hk, hv, hks, hkz, hvs, hvz, mask, out, part, lse,
                    *qc.stride(), *latent_strides, *mstr,
                    out.stride(0), out.stride(1), out.stride(2),
                    *runtime)
            kernel, consts = absorbed_attention_kernel, common_args
        if probe:
            return kernel, grid, args, consts
        _launch(kernel, grid, args, consts)

    n_base = B * VG * NQB
    resident = 0
    if cfg.fill_waves and cfg.num_splits is None and not interpret:
        # what decides the compiled code, short of the split count (cheap to hash per call)
        key = (cfg, dtype, q.dtype, per_head, rebuild, k_q, v_q, mask_kind, bool(is_causal), softcap > 0, M_BLOCK,
               VHPG, RK, RV, RK_P, RV_P, Dq, GS, tuple(v for v in (p or {}).values() if isinstance(v, (bool, int))),
               q.device.index)
        resident = _resident_cached(key, launch, q.device)
    sms = 1 if interpret else _num_sms(q.device.index if q.device.index is not None else 0)
    NSPLIT, chunk = _split_plan(cfg, n_base, Skv, sms, resident)
    direct = NSPLIT == 1
    if direct:
        part = lse = out
    else:
        part = torch.empty(n_base * NSPLIT * M_BLOCK * RV_P, dtype=torch.float32, device=q.device)
        lse = torch.empty(n_base * NSPLIT * M_BLOCK, dtype=torch.float32, device=q.device)
    launch(NSPLIT, chunk, part, lse)
    if not direct:
        _merge_splits(part, lse, out, VG, Sq, NQB, NSPLIT, VHPG, HPG_P, M_BLOCK, RV, RV_P, interpret)
    return out


def _resident_cached(key, launch, device) -> int:
    """``_resident_programs`` of a launch (``launch(nsplit, chunk, part, lse, probe=True)``),
    compiled once per ``key``: what decides the compiled code short of the split count."""
    resident = _RESIDENT.get(key)
    if resident is None:
        scratch = torch.empty(1, dtype=torch.float32, device=device)
        resident = _RESIDENT[key] = _resident_programs(*launch(2, CHUNK_QUANTUM, scratch, scratch, probe=True))
    return resident


def _merge_splits(part, lse, out, groups, Sq, NQB, NSPLIT, HPG, HPG_P, M_BLOCK, RV, RV_P, interpret):
    """``combine_splits_kernel`` over the partial rows of ``groups x NQB`` programs per sequence."""
    cols = min(RV_P, 64)
    combine_splits_kernel[(out.shape[0] * groups * NQB, M_BLOCK, RV_P // cols)](
        part, lse, out, groups, Sq, NQB, NSPLIT, out.stride(0), out.stride(1), out.stride(2),
        HPG=HPG, HPG_P=HPG_P, M_BLOCK=M_BLOCK, RV=RV, RV_P=RV_P,
        SPLIT_BLOCK=16 if interpret else 32, COLS=cols, num_warps=4,
    )

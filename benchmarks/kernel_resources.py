"""Compile the decode kernels for an H100/H200 (sm_90) without a GPU and print their
resources: registers, spill stack, shared memory, SASS size.

The wrapper runs on CPU tensors with its kernels replaced by recorders, so the launch it
would make (arguments, constexprs, warps, stages) is exactly what a GPU call of that shape
and config would make; each recorded launch is then compiled with ``triton.compile`` for
``GPUTarget("cuda", 90, 64)`` and inspected with the ``cuobjdump`` Triton ships. Use it to
screen configs before spending device time (a config at the 255-register cap or with a
spill stack is suspect), and to compare what a change does to the code:

    PYTHONPATH=. python benchmarks/kernel_resources.py                       # Llama-2-7B shape, gs1 RoPE
    PYTHONPATH=. python benchmarks/kernel_resources.py --gs 2 --block-s 128 --warps 8 --stages 2
    PYTHONPATH=. python benchmarks/kernel_resources.py --absorbed --bits 4 --group-heads 4
    PYTHONPATH=. python benchmarks/kernel_resources.py --no-gluon                        # the Triton kernels
    PYTHONPATH=. python benchmarks/kernel_resources.py --kv-heads 8 --loop   # GQA; the tile loop's SASS

Use the Triton the GPU has (its SASS differs between versions). ``loads`` counts the global
load instructions by width: ``LDG.U8`` one byte, ``LDG.128`` sixteen.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import palu_fx.kernels.latent_attention.gluon_gqa as gluon_gqa
import palu_fx.kernels.latent_attention.gluon_q4 as gluon_q4
import palu_fx.kernels.latent_attention.gluon_rope as gluon_rope
import palu_fx.kernels.latent_attention.gluon_wide as gluon_wide
import palu_fx.kernels.latent_attention.per_head as per_head
import palu_fx.kernels.latent_attention.wrapper as wrapper

_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.uint8: "u8",
          torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](...)`` records the launch."""

    def __init__(self, fn, log):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        return lambda *args, **kw: self.log.append((self.fn, args, kw))


def _arg_type(x) -> str:
    if isinstance(x, torch.Tensor):
        return "*" + _TYPES[x.dtype]
    if isinstance(x, bool):
        return "i1"
    if isinstance(x, int):
        return "i64" if abs(x) >= 2**31 else "i32"
    if isinstance(x, float):
        return "fp32"
    raise TypeError(f"cannot type a kernel argument of type {type(x).__name__}")


def record(call) -> list:
    """The kernel launches ``call()`` makes, as (jit function, args, kwargs)."""
    log: list = []
    # (module, name) of every kernel a call may launch, and the host hooks that pick GPU configs
    kernels = [(wrapper, "rebuild_attention_kernel"), (wrapper, "absorbed_attention_kernel"),
               (wrapper, "combine_splits_kernel"), (per_head, "per_head_attention_kernel")]
    gluon_kernels = ((gluon_q4, "q4_absorbed_kernel"), (gluon_rope, "rope_decode_kernel"),
                     (gluon_gqa, "gqa_rope_decode_kernel"), (gluon_wide, "wide_rope_decode_kernel"))
    kernels += [(m, n) for m, n in gluon_kernels if hasattr(m, n)]  # Gluon kernels exist where Triton has Gluon
    saved = [getattr(m, n) for m, n in kernels] + [wrapper._interpreting, wrapper._num_sms]
    try:
        for (m, n), fn in zip(kernels, saved):
            setattr(m, n, _Recorder(fn, log))
        wrapper._interpreting = lambda t: False  # pick the GPU configs, not the interpreter's
        wrapper._num_sms = lambda index: 132  # H100 SXM / H200
        call()
    finally:
        for (m, n), fn in zip(kernels, saved):
            setattr(m, n, fn)
        wrapper._interpreting, wrapper._num_sms = saved[-2:]
    return log


def compile_sm90(fn, args, kw, maxnreg: int = 0):
    """Compile one recorded launch for sm_90, specialized as the JIT would on a GPU: an int
    argument equal to 1 becomes a constant, and ints and pointers divisible by 16 are marked
    so (``tt.divisibility``): without that, no load of the kernel is known to be aligned and
    the SASS would show scalar loads that a real launch does not make."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    kw = dict(kw)
    options = {"num_warps": kw.pop("num_warps", 4), "num_stages": kw.pop("num_stages", 3)}
    if maxnreg:  # ptxas's register cap (Triton's ``maxnreg`` option): what a tighter budget spills
        options["maxnreg"] = maxnreg
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if i >= len(args):
            signature[name] = "constexpr"
            constexprs[name] = kw[name] if name in kw else fn.params[i].default
            continue
        a = args[i]
        if isinstance(a, (bool, float)):
            signature[name] = _arg_type(a)
            continue
        ty, spec = native_specialize_impl(BaseBackend, a, False, True, True)
        if ty == "constexpr":
            signature[name], constexprs[name] = "constexpr", spec
            continue
        signature[name] = _arg_type(a)
        if spec == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():  # a Gluon kernel (gluon_q4.py) has its own front end
        from triton.experimental.gluon._runtime import GluonASTSource as source
    return triton.compile(source(fn, signature, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 64), options=options)


def main_loop(sass: str) -> dict:
    """The longest loop of a SASS listing (a backward branch's span; in the decode kernels, the
    token-tile loop): instructions per warp and trip, the most frequent opcodes, and the local
    loads and stores inside it (spills that cost every tile, unlike the prologue's)."""
    lines = [x for x in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", x)]
    at = {int(re.match(r"\s+/\*([0-9a-f]{4})\*/", x).group(1), 16): i for i, x in enumerate(lines)}
    best = (0, 0)
    for i, x in enumerate(lines):
        m = re.search(r"BRA (?:`\(\.L_x_\d+\) )?(0x[0-9a-f]+)", x) or re.search(r"BRA (0x[0-9a-f]+)", x)
        if m and at.get(int(m.group(1), 16), i) < i and i - at[int(m.group(1), 16)] > best[1] - best[0]:
            best = (at[int(m.group(1), 16)], i)
    body = lines[best[0]:best[1] + 1] if best[1] else []
    ops: dict = {}
    for x in body:
        op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", x).group(1)
        ops[op] = ops.get(op, 0) + 1
    return {"instructions": len(body), "ops": dict(sorted(ops.items(), key=lambda t: -t[1])[:12]),
            "spills": ops.get("LDL", 0) + ops.get("STL", 0)}


def resources(kernel, loop: bool = False) -> dict:
    """Registers, spill stack, shared memory, SASS size and global loads by width of a compiled
    kernel; ``loop``: also its main loop (``main_loop``)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True).stdout
    field = lambda name: int(m.group(1)) if (m := re.search(rf"{name}:(\d+)", usage)) else -1  # noqa: E731
    loads: dict = {}  # global loads by width (LDG.E.U8, LDG.E.128, ...): how well loads vectorize
    for op in re.findall(r"\b(LDG[.A-Z0-9_]*)", sass):
        key = ".".join(t for t in op.split(".") if t not in ("E", "EL", "LU", "EF", "CONSTANT", "STRONG", "GPU", "SYS"))
        loads[key] = loads.get(key, 0) + 1
    out = {"regs": field("REG"), "stack": field("STACK"), "shared": kernel.metadata.shared,
           "sass": sum(1 for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)),
           "loads": dict(sorted(loads.items()))}
    if loop:
        out["loop"] = main_loop(sass)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--rank-ratio", type=float, default=0.5)
    ap.add_argument("--gs", type=int, default=1, help="KV heads per latent group")
    ap.add_argument("--absorbed", action="store_true", help="no RoPE: the absorbed kernel")
    ap.add_argument("--block-s", type=int, default=64)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--group-heads", type=int, default=0, help="per-head kernel with this many heads per program")
    ap.add_argument("--bits", type=int, default=0, help="a packed cache of this many bits (one group per latent)")
    ap.add_argument("--no-gluon", action="store_true", help="the Triton kernels where a Gluon kernel would run")
    ap.add_argument("--maxnreg", type=int, default=0,
                    help="cap registers per thread (e.g. 168 for three 4-warp programs per SM) and show the spills")
    ap.add_argument("--loop", action="store_true",
                    help="also the main loop's instructions per warp and trip, top opcodes and spills (main_loop)")
    args = ap.parse_args()
    H, Hkv, D, gs = args.heads, args.kv_heads, args.head_dim, args.gs
    G, rank = Hkv // gs, int(args.rank_ratio * gs * D)
    B, S, dt = 8, 4096, torch.float16
    q = torch.randn(B, H, 1, rank if args.absorbed else D, dtype=dt)
    hk, hv = torch.randn(B, S, G * rank, dtype=dt), torch.randn(B, S, G * rank, dtype=dt)
    lk = None if args.absorbed else torch.randn(G, gs * D, rank, dtype=dt)
    cos = sin = None if args.absorbed else torch.randn(1, S, D, dtype=dt)
    cfg = wrapper.KernelConfig(block_s=args.block_s, num_warps=args.warps, num_stages=args.stages,
                               group_heads=args.group_heads, gluon=not args.no_gluon)
    print(f"{H}q/{Hkv}kv d{D} gs{gs} rank {rank} {'absorbed' if args.absorbed else 'RoPE'} "
          f"{f'{args.bits}-bit' if args.bits else 'fp16'}, {cfg}; sm_90, "
          f"triton {triton.__version__}")
    rope = 0 if args.absorbed else 1
    if args.bits:
        from palu_fx.kernels.latent_attention.quant import quant_latent_attention_triton
        from palu_fx.quant.pack import packed_shape
        nbytes = G * packed_shape(rank, args.bits).code_bytes
        codes = torch.randint(0, 255, (B, S, nbytes), dtype=torch.uint8)
        sz = torch.rand(B, S, G, dtype=dt)

        def call(mask):
            return quant_latent_attention_triton(q, codes, sz, sz, codes, sz, sz, lk, None, cos, sin, None, mask, 0.1,
                                                 args.bits, rank, args.bits, rank, 0.0, False, rope, 1e-6, config=cfg)
    else:
        def call(mask):
            return wrapper.latent_attention_triton(q, hk, hv, lk, None, cos, sin, None, mask, 0.1, 0.0, False, rope,
                                                   1e-6, config=cfg)
    for label, mask in (("no mask", None), ("[B,1,1,S] mask", torch.zeros(B, 1, 1, S, dtype=dt))):
        launches = record(lambda: call(mask))
        for fn, a, kw in launches:
            print(f"  {label:<15} {fn.__name__:<28} {resources(compile_sm90(fn, a, kw, args.maxnreg), args.loop)}")


if __name__ == "__main__":
    main()

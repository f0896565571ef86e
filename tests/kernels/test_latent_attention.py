"""Triton latent-attention kernels against the PyTorch reference.

On a machine without a GPU the kernels run under Triton's interpreter: ``TRITON_INTERPRET=1``
must be set before Triton is first imported (Triton decides at definition time whether its
own library functions are interpreted). When this module is imported first it sets it; when
another test already imported Triton (``torch._dynamo`` does), the whole module reruns in a
fresh interpreter process from ``test_kernels_in_fresh_process``. With a GPU the same tests
run the compiled kernels. Every case draws fresh random inputs and compares by relative RMS
error to the reference evaluated in float64. Shapes are small and blocks big: fast.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreter_ready() -> bool:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return DEVICE == "cuda" or isinstance(tl.zeros, InterpretedFunction) or not hasattr(tl.zeros, "fn")


IN_PROCESS = _interpreter_ready()

from palu_fx.kernels.latent_attention.naive import latent_attention_ref, op_strides  # noqa: E402

TOL = {torch.float32: 2e-5 if DEVICE == "cpu" else 1e-4, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
_MODULES = ["common", "decode", "absorbed", "prefill", "per_head", "wrapper", "quant"]


def run_in_fresh_process(test_file: str) -> None:
    """Run ``test_file``'s kernel tests in a new interpreter with ``TRITON_INTERPRET=1``."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "not fresh_process",
           os.path.abspath(test_file)]
    r = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and " passed" in r.stdout, r.stdout[-6000:] + r.stderr[-3000:]


@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_kernels_in_fresh_process():
    run_in_fresh_process(__file__)


def kernel_modules() -> dict:
    """The kernel modules by short name, with interpreted kernels when there is no GPU."""
    if not IN_PROCESS:
        pytest.skip("Triton was imported without the interpreter: see the *_in_fresh_process tests")
    mods = [importlib.import_module(f"palu_fx.kernels.latent_attention.{m}") for m in _MODULES]
    from triton.runtime.interpreter import InterpretedFunction

    if DEVICE == "cpu" and not isinstance(mods[1].rebuild_attention_kernel, InterpretedFunction):
        # defined earlier without the interpreter in this process: define them again
        mods = [importlib.reload(sys.modules[m.__name__]) for m in mods]
    return dict(zip(_MODULES, mods))


@pytest.fixture(scope="module")
def kern():
    """The wrapper module."""
    return kernel_modules()["wrapper"]


def _rope_tables(B, Skv, rot, style, dtype, per_batch=False):
    ang = torch.rand(B if per_batch else 1, Skv, rot // 2, dtype=torch.float64) * 6.3
    ang = torch.cat([ang, ang], -1) if style == 1 else ang.repeat_interleave(2, -1)
    return ang.cos().to(dtype).to(DEVICE), ang.sin().to(dtype).to(DEVICE)


def make_inputs(B=2, Hq=4, Hkv=2, gs=2, D=32, rk=32, rv=32, Sq=1, Skv=100, rope=1, rot=None, bias=False,
                norm=False, mask=None, dtype=torch.float32, absorbed=False, softcap=0.0, causal=False,
                per_batch_rope=False, values=False):
    """Positional args of the op for one random case (``mask``: None/'bool'/'add'/a shape tag;
    ``values``: pass each KV head's value reconstruction ``lv`` too)."""
    G = Hkv // gs
    dev = DEVICE

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, dtype=torch.float64) * s).to(dtype).to(dev)

    q = rnd(B, Hq, Sq, rk if absorbed else D)
    hk, hv = rnd(B, Skv, G * rk), rnd(B, Skv, G * rv)
    lk = None if absorbed else rnd(G, gs * D, rk, s=rk ** -0.5)
    cos = sin = None
    if rope and not absorbed:
        cos, sin = _rope_tables(B, Skv, rot or D, rope, dtype, per_batch_rope)
    kb = rnd(Hkv * D) if bias and not absorbed else None
    w = (torch.rand(D, dtype=torch.float64) + 0.5).to(dtype).to(dev) if norm and not absorbed else None
    m = None
    if mask == "bool":  # per-sequence padding-like masks, HF's materialized [B, 1, Sq, Skv]
        m = torch.rand(B, 1, Sq, Skv, device=dev) > 0.3
    elif mask == "add":
        m = torch.randn(B, 1, Sq, Skv, device=dev, dtype=dtype)
    elif mask == "bool-full":
        m = torch.rand(B, Hq, Sq, Skv, device=dev) > 0.5
    elif mask == "bool-1d":
        m = torch.rand(Skv, device=dev) > 0.2
    scale = (rk if absorbed else D) ** -0.5
    args = (q, hk, hv, lk, kb, cos, sin, w, m, scale, softcap, causal, 0 if absorbed else rope, 1e-6)
    return args + (rnd(Hkv, D, rv, s=rv ** -0.5),) if values else args


def reference(args):
    up = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    return latent_attention_ref(*up)


def check(out, args):
    ref = reference(args)
    assert out.shape == ref.shape and out.dtype == args[0].dtype
    assert out.stride() == op_strides(*out.shape), f"strides {out.stride()}: not the op's declared layout"
    assert torch.isfinite(out).all()
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err < TOL[args[0].dtype], f"relative RMS error {err:.2e}"


def cfg(kern, splits):
    return kern.KernelConfig(block_s=64 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=splits)


# ------------------------------------------------------------------ decode, rebuild mode
REBUILD_CASES = [
    pytest.param(dict(Hq=2, Hkv=2, gs=1), id="mha-gs1-half"),
    pytest.param(dict(Hq=4, Hkv=4, gs=2, rk=48, Skv=131), id="mha-gs2-rk48-S131"),
    pytest.param(dict(Hq=8, Hkv=4, gs=4, rk=64, rv=64, rope=2), id="gqa-gs4-interleaved"),
    pytest.param(dict(Hq=8, Hkv=4, gs=2, Skv=37), id="gqa-gs2-S37"),
    pytest.param(dict(Hq=4, Hkv=1, gs=1, rk=16, rv=16), id="mqa-gs1-rk16"),
    pytest.param(dict(Hq=6, Hkv=3, gs=3, rk=48, rv=48), id="jlrd-gs3"),
    pytest.param(dict(rot=16), id="partial-half-rot16"),
    pytest.param(dict(rot=8, rope=2, per_batch_rope=True), id="partial-interleaved-rot8-per-batch"),
    pytest.param(dict(D=24, rk=40, rv=24, rot=12), id="d24-rot12-rk40-rv24"),
    pytest.param(dict(bias=True, norm=True), id="bias-knorm"),
    pytest.param(dict(rope=0, bias=True), id="norope-bias"),
    pytest.param(dict(gs=1, Hq=8, rv=48, Skv=200), id="gqa-gs1-rv48-S200"),
]


@pytest.mark.parametrize("splits", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", REBUILD_CASES)
def test_decode_rebuild(kern, case, dtype, splits):
    args = make_inputs(dtype=dtype, **case)
    check(kern.latent_attention_triton(*args, config=cfg(kern, splits)), args)


@pytest.mark.parametrize("case", [
    pytest.param(dict(D=64, rk=64, rot=64), id="d64-full-rot"),
    pytest.param(dict(D=64, rk=64, rot=32, rope=2, bias=True, norm=True), id="d64-rot32-interleaved-bias-knorm"),
    pytest.param(dict(Hq=2, Hkv=2, gs=1, D=64, rot=16, norm=True), id="gs1-d64-rot16-knorm"),
])
def test_decode_rebuild_column_chunks(kern, case):
    # keys rebuilt in 16-wide column chunks (several rotary and pass-through chunks per head)
    args = make_inputs(**case)
    c = kern.KernelConfig(block_s=64 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=2, chunk=16)
    check(kern.latent_attention_triton(*args, config=c), args)


@pytest.mark.parametrize("hpp,dyn", [(1, False), (2, False), (0, True)],
                         ids=["1-head-per-program", "2-heads-per-program", "all-heads-runtime-loop"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(Hq=8, Hkv=4, gs=4, rk=64, rv=48, mask="bool"), id="mha-gs4-masked"),
    pytest.param(dict(Hq=8, Hkv=4, gs=4, rk=64, rot=16, rope=2, bias=True, norm=True), id="gs4-partial-knorm"),
    pytest.param(dict(Hq=8, Hkv=2, gs=2, rk=48, Skv=130), id="gqa-gs2"),
])
def test_decode_rebuild_head_subsets(kern, case, hpp, dyn):
    # a group's KV heads spread over several programs that share its latent tiles
    args = make_inputs(**case)
    c = kern.KernelConfig(block_s=64 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=2,
                          heads_per_program=hpp, dynamic_heads=dyn)
    check(kern.latent_attention_triton(*args, config=c), args)


@pytest.mark.parametrize("hpp,merge", [(1, True), (2, True), (4, True), (2, False), (4, False)],
                         ids=["1-head", "2-heads", "4-heads", "2-heads-unmerged", "4-heads-unmerged"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(Skv=100), id="rope-half"),
    pytest.param(dict(rope=2, Skv=131, dtype=torch.float16), id="rope-interleaved-fp16-S131"),
    pytest.param(dict(rot=16, mask="bool", rk=48, rv=16), id="rope-partial-rot16-masked-rk48"),
    pytest.param(dict(softcap=2.0, mask="add", Skv=37), id="rope-softcap-add-mask-S37"),
    pytest.param(dict(dtype=torch.bfloat16, Skv=70), id="rope-bf16"),
    pytest.param(dict(absorbed=True, Skv=100), id="absorbed"),
    pytest.param(dict(absorbed=True, rk=48, rv=64, mask="bool", dtype=torch.float16, Skv=77),
                 id="absorbed-rk48-rv64-masked-fp16"),
])
def test_decode_per_head(kern, case, hpp, merge):
    # one query head per latent group: per_head.py's kernel, hpp heads per program (merged:
    # read as one latent tile where the ranks are powers of two, KernelConfig.merge_heads)
    args = make_inputs(Hq=4, Hkv=4, gs=1, **case)
    G = args[3].shape[0] if args[3] is not None else args[1].shape[-1] // args[0].shape[-1]
    # RoPE programs take at most two heads (their rotated queries stay resident); four fall
    # back to the group kernel
    rope = args[3] is not None
    assert kern.per_head_applies(args[0], args[3], args[4], args[7], args[12], G, hpp) == (hpp <= 2 or not rope)
    c = kern.KernelConfig(block_s=64 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=3,
                          group_heads=hpp, merge_heads=merge)
    check(kern.latent_attention_triton(*args, config=c), args)


def test_per_head_only_where_it_applies(kern):
    q, hk, hv, lk, kb, cos, sin, w, *_ = make_inputs(Hq=8, Hkv=4, gs=1)
    assert not kern.per_head_applies(q, lk, None, None, 1, 4, 2)  # GQA: two query heads share a group
    q, hk, hv, lk, kb, cos, sin, w, *_ = make_inputs(Hq=4, Hkv=4, gs=1, bias=True, norm=True)
    assert kern.per_head_applies(q, lk, None, None, 1, 4, 2)
    assert not kern.per_head_applies(q, lk, None, None, 1, 4, 4)  # RoPE: at most two heads per program
    assert not kern.per_head_applies(q, lk, kb, None, 1, 4, 2) and not kern.per_head_applies(q, lk, None, w, 1, 4, 2)
    assert not kern.per_head_applies(q, lk, None, None, 1, 4, 3)  # not a power of two
    assert not kern.per_head_applies(q, lk, None, None, 1, 4, 0)  # off
    assert not kern.per_head_applies(torch.cat([q, q], 2), lk, None, None, 1, 4, 2)  # two query tokens
    q2, hk2, *_ = make_inputs(Hq=8, Hkv=4, gs=2, absorbed=True)
    assert not kern.per_head_applies(q2, None, None, None, 0, 2, 2)  # absorbed, 4 query heads per group


@pytest.mark.parametrize("mask", ["bool", "add", "bool-full", "bool-1d"])
@pytest.mark.parametrize("absorbed", [False, True], ids=["rebuild", "absorbed"])
def test_decode_masks(kern, mask, absorbed):
    args = make_inputs(mask=mask, absorbed=absorbed, Hq=8, Hkv=4, gs=2, Skv=90)
    check(kern.latent_attention_triton(*args, config=cfg(kern, 2)), args)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "in-loop-loads"])
@pytest.mark.parametrize("kernel", ["rebuild", "per-head", "absorbed"])
@pytest.mark.parametrize("mask", ["bool", "add"])
def test_mask_row_loaded_a_tile_ahead(kern, kernel, mask, prefetch):
    # the shared mask row is loaded one tile ahead (KernelConfig.prefetch): several tiles
    # per split, a ragged last one, and a split whose next tile is past its end
    args = make_inputs(Hq=4, Hkv=4, gs=1, rk=32, rv=32, Skv=150, mask=mask, absorbed=kernel == "absorbed")
    c = kern.KernelConfig(block_s=16 if DEVICE == "cpu" else 32, num_warps=4, num_stages=1, num_splits=2,
                          group_heads=2 if kernel == "per-head" else 0, prefetch=prefetch)
    check(kern.latent_attention_triton(*args, config=c), args)


@pytest.mark.parametrize("absorbed", [False, True], ids=["rebuild", "absorbed"])
def test_many_splits(kern, absorbed):
    # more splits than one combine step reduces at once, several of them empty (masked)
    args = make_inputs(mask="bool", absorbed=absorbed, Skv=90, Hq=8, Hkv=4, gs=2)
    check(kern.latent_attention_triton(*args, config=cfg(kern, 37)), args)


@pytest.mark.parametrize("absorbed", [False, True], ids=["rebuild", "absorbed"])
def test_fully_masked_row_gives_zeros(kern, absorbed):
    args = list(make_inputs(mask="bool", absorbed=absorbed, Skv=70))
    args[8][1] = False  # sequence 1 sees nothing
    out = kern.latent_attention_triton(*args, config=cfg(kern, 2))
    assert (out[1] == 0).all()
    check(out, args)


# ------------------------------------------------------------------ absorbed (no RoPE)
ABSORBED_CASES = [
    pytest.param(dict(Hq=4, Hkv=4, gs=1), id="mha-gs1"),
    pytest.param(dict(Hq=8, Hkv=4, gs=2, rk=48, rv=64, Skv=129), id="gqa-gs2-rk48-rv64-S129"),
    pytest.param(dict(Hq=8, Hkv=8, gs=4, rk=64, rv=32), id="mha-gs4"),
    pytest.param(dict(Hq=8, Hkv=1, gs=1, rk=16, rv=16), id="mqa"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ABSORBED_CASES)
def test_decode_absorbed(kern, case, dtype):
    args = make_inputs(dtype=dtype, absorbed=True, **case)
    check(kern.latent_attention_triton(*args, config=cfg(kern, 2)), args)


def test_bf16_rebuild(kern):
    args = make_inputs(dtype=torch.bfloat16, bias=True, Hq=8, Hkv=4, gs=2)
    check(kern.latent_attention_triton(*args, config=cfg(kern, 2)), args)


# ------------------------------------------------------------------ several query tokens
@pytest.mark.parametrize("absorbed", [False, True], ids=["rebuild", "absorbed"])
@pytest.mark.parametrize("variant", ["causal", "softcap", "mask"])
def test_few_queries_fused(kern, variant, absorbed):
    kw = dict(causal=True) if variant == "causal" else dict(softcap=2.0) if variant == "softcap" else dict(mask="bool")
    args = make_inputs(Sq=5, Skv=77, absorbed=absorbed, **kw)
    check(kern.latent_attention_triton(*args, config=cfg(kern, 2), path="fused"), args)


def test_softcap_prefill_tiles_queries(kern):
    # softcap has no SDPA path: the fused kernel tiles query positions (several blocks)
    args = make_inputs(Sq=40, Skv=60, Hq=4, Hkv=2, gs=2, softcap=3.0, causal=True, rot=16)
    check(kern.latent_attention_triton(*args, config=cfg(kern, 1)), args)


PREFILL_CASES = [
    pytest.param(dict(), id="rebuild-rv-eq-d"),
    pytest.param(dict(rv=16, bias=True, norm=True), id="rebuild-rv-lt-d-knorm"),
    pytest.param(dict(rv=48, Hq=8, Hkv=4, gs=4, rk=64, rope=2), id="rebuild-rv-gt-d-gqa"),
    pytest.param(dict(absorbed=True, rk=16, rv=48), id="absorbed-rv-gt-rk"),
]


@pytest.mark.parametrize("mask", [None, "causal", "bool"])
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_prefill_path(kern, case, mask):
    kw = dict(causal=True) if mask == "causal" else dict(mask=mask)
    args = make_inputs(Sq=48, Skv=48, dtype=torch.float32, **case, **kw)
    out = kern.latent_attention_triton(*args)  # Sq * heads per group > the fused limit
    check(out, args)


@pytest.mark.parametrize("mask", [None, "causal", "bool"])
@pytest.mark.parametrize("case", [
    pytest.param(dict(D=64, rk=32, rv=32, Hq=4, Hkv=4, gs=1), id="rv-lt-d-mha"),
    pytest.param(dict(D=64, rk=64, rv=128, Hq=8, Hkv=4, gs=4), id="rv-gt-d-gqa"),
    pytest.param(dict(D=64, rk=64, rv=64, Hq=8, Hkv=4, gs=2, dtype=torch.bfloat16), id="rv-eq-d-gs2-bf16"),
])
def test_prefill_half_precision(kern, case, mask):
    # on a GPU, values narrower or wider than the head dim go to cuDNN's SDPA unpadded
    # (prefill.unpadded_values); elsewhere, or where cuDNN refuses a call, padded
    case = dict(dict(dtype=torch.float16), **case)
    kw = dict(causal=True) if mask == "causal" else dict(mask=mask)
    args = make_inputs(Sq=80, Skv=80, **case, **kw)
    check(kern.latent_attention_triton(*args), args)
    if DEVICE == "cuda" and mask is None and case["rv"] != case["D"] and torch.backends.cuda.cudnn_sdp_enabled():
        from palu_fx.kernels.latent_attention.prefill import _UNPADDED

        assert any(_UNPADDED.values()), _UNPADDED  # cuDNN took at least one kind unpadded


@pytest.mark.parametrize("skv,gs,rk", [(70, 2, 32), (150, 4, 160)])  # 64-token tiles; 128 (rank x heads > 512)
def test_prefill_rebuilt_keys_match_reference(kern, skv, gs, rk):
    # the last tile ends past the sequence; with the latent values, the same launch copies them
    # once per KV head of their group and the keys stay the same
    from palu_fx.kernels.latent_attention.naive import reconstruct_keys

    q, hk, hv, lk, kb, cos, sin, w, *_ = make_inputs(Skv=skv, bias=True, norm=True, rot=16, rope=2, Hq=4, Hkv=4,
                                                     gs=gs, rk=rk, rv=24)
    p = kern._parts(q, lk, kb, cos, sin, w, 2, 2, skv, DEVICE == "cpu", q.dtype)
    rk_args = (hk, lk, kb, p["cos"], p["sin"], w, 1e-6, p, 40, q.dtype)
    keys = kern.rebuild_keys(*rk_args)
    ref = reconstruct_keys(hk.double(), lk.double(), kb.double(), cos.double(), sin.double(), w.double(), 32, 2,
                           dtype=torch.float64)
    assert (keys[..., 32:] == 0).all()
    torch.testing.assert_close(keys[..., :32].double(), ref, rtol=1e-5, atol=1e-5)
    keys_too, vals = kern.rebuild_keys(*rk_args, values=hv)
    B, G = hv.shape[0], lk.shape[0]
    assert torch.equal(keys_too, keys)
    assert torch.equal(vals, hv.view(B, skv, G, 24).transpose(1, 2).repeat_interleave(gs, dim=1))


# ------------------------------------------------------------------ values rebuilt by the op (lv)
def test_lv_is_the_unfolded_value_projection():
    # the reference's lv output is its latent output times L_v of each query head's KV head
    args = make_inputs(Hq=8, Hkv=4, gs=2, rv=48, Sq=3, Skv=20, dtype=torch.float64, values=True)
    z = latent_attention_ref(*args[:14])
    lv = args[14]
    want = torch.einsum("bhsr,hdr->bhsd", z, lv.repeat_interleave(2, dim=0))
    out = latent_attention_ref(*args)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert out.stride() == op_strides(*out.shape)  # the op's declared layout (Inductor trusts the fake's strides)


@pytest.mark.parametrize("case", [dict(Sq=1, Skv=20, mask="bool"), dict(Sq=7, Skv=7, causal=True, rope=2),
                                  dict(Hq=4, Hkv=4, gs=4, rk=64, rv=64, values=True), dict(absorbed=True, Sq=3, Skv=9)])
def test_op_passes_opcheck(case):
    # torch.library's checks of a custom op: schema, registrations, and the fake against the
    # real implementation (shapes, dtypes, strides: Inductor trusts the fake's) under export's
    # and compile's dispatch; on the CPU, so the reference answers
    import palu_fx.ops  # noqa: F401  (registers torch.ops.palu)

    torch.library.opcheck(torch.ops.palu.latent_attention.default, make_inputs(**case))


def test_mismatched_lv_is_refused():
    import palu_fx.ops  # noqa: F401  (registers torch.ops.palu)
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = make_inputs(Hq=4, Hkv=2, gs=1, rv=16, values=True)
    bad = args[:14] + (args[14][..., :15],)  # rank 15 against latents of rank 16
    with pytest.raises(ValueError, match="lv"):
        latent_attention_ref(*bad)
    with FakeTensorMode(allow_non_fake_inputs=True), pytest.raises(RuntimeError, match="lv must be"):
        torch.ops.palu.latent_attention(*bad)  # what export and compile see


LV_CASES = [
    pytest.param(dict(Hq=4, Hkv=4, gs=4, rk=64, rv=64, D=32), id="mha-gs4-rv-gt-d"),
    pytest.param(dict(Hq=8, Hkv=4, gs=2, rk=48, rv=48, rope=2, bias=True, norm=True), id="gqa-gs2-rv-gt-d"),
    pytest.param(dict(Hq=4, Hkv=2, gs=1, rk=16, rv=16), id="gqa-gs1-rv-lt-d"),
    pytest.param(dict(Hq=4, Hkv=4, gs=2, absorbed=True, rk=16, rv=48), id="absorbed-gs2"),
]


@pytest.mark.parametrize("shape", ["decode", "prefill"])
@pytest.mark.parametrize("case", LV_CASES)
def test_values_rebuilt_in_the_op(kern, case, shape):
    # prefill rebuilds the values where rv > Dv (SDPA at the head dim), else attends in
    # latent space and applies lv after, as decode always does
    kw = dict(Sq=1, Skv=70, mask="bool") if shape == "decode" else dict(Sq=40, Skv=40, causal=True)
    args = make_inputs(values=True, **case, **kw)
    out = kern.latent_attention_triton(*args, config=cfg(kern, 2) if shape == "decode" else None)
    assert out.shape[-1] == args[14].shape[1] and out.stride() == op_strides(*out.shape)
    check(out, args)


@pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA graph")
def test_values_rebuilt_in_prefill_replay_from_a_cuda_graph(kern):
    # prefill with lv rebuilds the values with a cuBLAS product written into a strided view
    # (SDPA's [B, S, H, D] memory): a captured call replays to the eager result
    args = make_inputs(values=True, Hq=4, Hkv=4, gs=4, rk=64, rv=64, D=32, Sq=40, Skv=40, causal=True,
                       dtype=torch.float16)
    want = kern.latent_attention_triton(*args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (compilation, cuBLAS workspaces)
        kern.latent_attention_triton(*args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kern.latent_attention_triton(*args)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    check(out, args)


@pytest.mark.parametrize("B,S,G,rep,rv", [(2, 70, 3, 2, 48), (1, 33, 2, 4, 32)])
def test_values_replicated_per_kv_head(kern, B, S, G, rep, rv):
    from palu_fx.kernels.latent_attention.prefill import replicate_values

    hv = torch.randn(B, S, G * rv, device=DEVICE)
    want = hv.view(B, S, G, rv).transpose(1, 2).repeat_interleave(rep, dim=1)
    assert torch.equal(replicate_values(hv, G, G * rep), want)


# ------------------------------------------------------------------ dispatch and plan
def test_op_runs_triton_when_forced(kern, monkeypatch):
    import palu_fx.ops  # noqa: F401  (registers torch.ops.palu)

    monkeypatch.setenv("PALU_FX_KERNEL", "triton")
    args = make_inputs(Hq=8, Hkv=4, gs=2, mask="bool")
    out = torch.ops.palu.latent_attention(*args)
    torch.testing.assert_close(out, kern.latent_attention_triton(*args), rtol=0, atol=0)
    check(out, args)


def test_split_plan_covers_sequence(kern):
    for skv in (1, 255, 256, 4097, 131072):
        for n_base in (1, 8, 256, 4096):
            c = kern.KernelConfig(programs_per_sm=4)
            splits, chunk = kern._split_plan(c, n_base, skv, 1)
            assert splits >= 1 and (splits - 1) * chunk < skv <= splits * chunk


def test_mask_rows_shared_only_when_broadcast(kern):
    """A [B, 1, 1, S] decode mask is read as one row per sequence; per-head or per-query
    masks keep their per-row loads."""
    wrapper = common = kern
    q = torch.zeros(1)
    pad = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    assert wrapper._mask_args(pad, 2, 8, 1, 40, q)[0] == common.MASK_BOOL_SHARED
    assert wrapper._mask_args(pad.float(), 2, 8, 1, 40, q)[0] == common.MASK_ADD_SHARED
    assert wrapper._mask_args(torch.ones(2, 8, 1, 40), 2, 8, 1, 40, q)[0] == common.MASK_ADD
    assert wrapper._mask_args(torch.ones(2, 1, 3, 40), 2, 8, 3, 40, q)[0] == common.MASK_ADD

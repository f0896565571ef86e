"""Time of applying lv after the decode kernels (palu_fx.kernels.latent_attention.naive.up_values)
against a broadcast matmul, B=8, 32 heads, gs4 (rank 256 -> head dim 128)."""
import sys, torch
sys.path.insert(0, "benchmarks")
from attention import gpu_time
from palu_fx.kernels.latent_attention.naive import up_values
B, Hq, Hkv, rv, Dv = 8, 32, 32, 256, 128
z = torch.randn(B, Hq, 1, rv, device="cuda", dtype=torch.float16)
lv = torch.randn(Hkv, Dv, rv, device="cuda", dtype=torch.float16)
old = lambda: torch.matmul(z.reshape(B, Hkv, 1, rv), lv.transpose(1, 2)).view(B, Hq, 1, Dv)
print(f"up_values B={B} gs4 decode: broadcast matmul {gpu_time(old, [()]) * 1e3:.1f} us, per-KV-head bmm "
      f"{gpu_time(lambda: up_values(z, lv), [()]) * 1e3:.1f} us")

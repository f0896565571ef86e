"""Probe: the absorbed gs1 kernel (B=8, 32k) timed before and after the naive reference of a RoPE case.

Why ``attention.py`` times the naive column after all kernel rows. H200, 2026-11-29 14:40 UTC:
clean 0.488 / 0.486 ms; naive RoPE reference 31.2 ms; right after it 0.549, then 0.479; after
5 s 0.479; after freeing it 0.479; new tensors 0.481. Only the first timing after the
reference is slow, whatever the memory:

    PYTHONPATH=. python benchmarks/naive_after_probe.py
"""
import sys, os, time, torch
sys.path.insert(0, os.path.dirname(__file__))
from attention import gpu_time, latent_case, run_ours, eager_time
from palu_fx.kernels.latent_attention.naive import latent_attention_ref
B, S = 8, 32768
ab = latent_case(32, 32, 128, 1, B, S, False)
t = lambda: gpu_time(run_ours, [(ab, None)])
print("clean", round(t(), 3), round(t(), 3), flush=True)
rp = latent_case(32, 32, 128, 1, B, S, True)
print("naive rope ms", round(eager_time(latent_attention_ref, rp), 1), flush=True)
print("after naive", round(t(), 3), round(t(), 3), flush=True)
time.sleep(5)
print("after 5 s", round(t(), 3), flush=True)
del rp
torch.cuda.empty_cache()
print("after free", round(t(), 3), flush=True)
ab2 = latent_case(32, 32, 128, 1, B, S, False)
print("new tensors", round(gpu_time(run_ours, [(ab2, None)]), 3), flush=True)

"""GPU smoke check: a compressed exported decoder runs the Triton kernels on CUDA and agrees
with the PyTorch reference (PALU_FX_KERNEL=reference), prefill and decode, fp16.

Every config runs on its own and reports its error (Python traceback first), so one failure
does not hide the others. Group size "all" at rank ratio 0.5 has value rank 128 for head dim
64: the op rebuilds those values itself (``lv``) instead of a folded o_proj. ``--mha``: 8 KV
heads (no GQA sharing), gs1 and gs2 with and without 4-bit latents, and "all" (rank 256). Each
config counts the launches of the Gluon RoPE kernels its decode calls take on a GPU:
``gluon_rope.py`` and ``gluon_wide.py`` (MHA; rank 256 the latter) or ``gluon_gqa.py`` (the
default model's two query heads per KV head, at group sizes 1, 2 and
"all" up to rank 128). Without CUDA it runs the same check on the CPU in fp32 with the Triton
interpreter (set TRITON_INTERPRET=1; small sizes), to check the script itself.
"""
import os
import sys
import time
import traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import palu_fx

cuda = torch.cuda.is_available()
dev, dtype = ("cuda", torch.float16) if cuda else ("cpu", torch.float32)
prompt, total, max_len = (256, 300, 1024) if cuda else (40, 44, 64)
MHA = "--mha" in sys.argv
cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=8 if MHA else 4, max_position_embeddings=4096)
launches = [0]
from palu_fx.kernels.latent_attention import gluon_gqa, gluon_rope, gluon_wide  # noqa: E402

_gluon = (gluon_rope, gluon_wide) if MHA else (gluon_gqa,)  # the Gluon RoPE kernels these heads take


def _counted(launch):
    return lambda *a, **k: launches.__setitem__(0, launches[0] + 1) or launch(*a, **k)


for _m in _gluon:
    _m.launch = _counted(_m.launch)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to(dev, dtype).eval()
t0 = time.time()
ep = palu_fx.export_decoder(model, batch_size=2, max_cache_len=max_len)
print(f"exported in {time.time() - t0:.0f}s", flush=True)
ids = torch.randint(3, 512, (2, total), device=dev)
rows, failed = [], []
configs = ((1.0, 1, None), (0.5, 1, None), (0.5, 1, 4), (0.5, 2, None), (0.5, 2, 4),
           (0.5, "all", None)) if MHA else (
    (1.0, 1, None), (0.5, 1, None), (0.5, 2, None), (0.5, "all", None), (0.5, "all", 4))
for ratio, group, bits in configs:
    try:
        ep2 = palu_fx.compress_exported(ep, palu_fx.PaluConfig(rank_ratio=ratio, group_size=group, bits=bits))
        launches[0] = 0
        outs = {}
        for kernel in ("triton", "reference"):
            os.environ["PALU_FX_KERNEL"] = kernel
            mod = ep2.module()
            with torch.no_grad():
                o = [mod(input_ids=ids[:, :prompt], cache_position=torch.arange(prompt, device=dev))]
                for t in range(prompt, total):
                    o.append(mod(input_ids=ids[:, t:t + 1], cache_position=torch.tensor([t], device=dev)))
            outs[kernel] = torch.cat(o, 1).float()
        err = ((outs["triton"] - outs["reference"]).norm() / outs["reference"].norm()).item()
        rows.append((ratio, group, err))
        print(f"ratio {ratio} group {group} bits {bits}: triton vs reference rel err {err:.2e}"
              + f", {'/'.join(m.__name__.rsplit('.', 1)[-1] for m in _gluon)} launches {launches[0]}", flush=True)
    except Exception as e:  # report and go on: the point is to see every failure in one run
        failed.append((ratio, group))
        print(f"ratio {ratio} group {group}: FAILED {type(e).__name__}: {str(e)[:1500]}", flush=True)
        print("".join(traceback.format_exception(e)[-12:])[-4000:], file=sys.stderr, flush=True)
os.environ.pop("PALU_FX_KERNEL", None)
bad = [r for r in rows if not r[2] < 2e-2]
print("GPU smoke", "OK" if not (bad or failed) else f"FAILED {failed + bad}", torch.__version__,
      torch.cuda.get_device_name() if cuda else "cpu")
sys.exit(1 if bad or failed else 0)

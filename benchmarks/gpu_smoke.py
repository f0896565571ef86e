"""GPU smoke check: a compressed exported decoder runs the Triton kernels on CUDA and agrees
with the PyTorch reference (PALU_FX_KERNEL=reference), prefill and decode, fp16."""
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import palu_fx

cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).to("cuda", torch.float16).eval()
ep = palu_fx.export_decoder(model, batch_size=2, max_cache_len=1024)
ids = torch.randint(3, 512, (2, 300), device="cuda")
rows = []
for ratio, group in ((1.0, 1), (0.5, 1), (0.5, 2), (0.5, "all")):
    ep2 = palu_fx.compress_exported(ep, palu_fx.PaluConfig(rank_ratio=ratio, group_size=group))
    outs = {}
    for kernel in ("triton", "reference"):
        os.environ["PALU_FX_KERNEL"] = kernel
        mod = ep2.module()
        with torch.no_grad():
            o = [mod(input_ids=ids[:, :256], cache_position=torch.arange(256, device="cuda"))]
            for t in range(256, 300):
                o.append(mod(input_ids=ids[:, t:t + 1], cache_position=torch.tensor([t], device="cuda")))
        outs[kernel] = torch.cat(o, 1).float()
    err = ((outs["triton"] - outs["reference"]).norm() / outs["reference"].norm()).item()
    rows.append((ratio, group, err))
    print(f"ratio {ratio} group {group}: triton vs reference rel err {err:.2e}")
os.environ.pop("PALU_FX_KERNEL")
assert all(e < 2e-2 for *_, e in rows), rows
print("GPU smoke OK", torch.__version__, torch.cuda.get_device_name())

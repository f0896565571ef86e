"""Shared helpers: export once per model, run prefill + decode, compare logits."""
from __future__ import annotations

import functools

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import palu_fx.ops  # noqa: F401  (torch.ops.palu)
from palu_fx.export import export_decoder
from tests.handwritten import HandwrittenDecoder
from tests.zoo import build

BATCH, MAX_CACHE, PREFILL, DECODE = 2, 32, 5, 8


@functools.lru_cache(maxsize=None)
def exported(name: str) -> torch.export.ExportedProgram:
    if name.startswith("handwritten"):
        kw = dict(p.split("=") for p in name.split(":")[1:])
        kw = {k: (v == "True" if v in ("True", "False") else v) for k, v in kw.items()}
        model = HandwrittenDecoder(batch_size=BATCH, max_cache_len=MAX_CACHE, **kw)
        seq = torch.export.Dim("seq_len", min=1, max=MAX_CACHE - 1)
        ids = torch.randint(0, 256, (BATCH, 4))
        return torch.export.export(model, (), {"input_ids": ids, "cache_position": torch.arange(4)},
                                   dynamic_shapes={"input_ids": {1: seq}, "cache_position": {0: seq}}, strict=True)
    return export_decoder(perturbed(build(name)), batch_size=BATCH, max_cache_len=MAX_CACHE)


def perturbed(model: torch.nn.Module, scale: float = 0.1) -> torch.nn.Module:
    """Randomize the 1-D parameters (norm weights, biases) that initialization leaves at 0/1:
    a pass that applies a k-norm at the wrong place, or drops a bias, stays lossless on
    all-ones weights and would go unnoticed."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def tokens(seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (BATCH, PREFILL + DECODE), generator=torch.Generator().manual_seed(seed))


def run(ep: torch.export.ExportedProgram, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a prefill of PREFILL tokens, then DECODE single-token steps: [B, P+D, V]."""
    mod = ep.module()
    outs = [mod(input_ids=ids[:, :PREFILL], cache_position=torch.arange(PREFILL))]
    for t in range(PREFILL, PREFILL + DECODE):
        outs.append(mod(input_ids=ids[:, t:t + 1], cache_position=torch.tensor([t])))
    return torch.cat(outs, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def cache_buffers(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every buffer the program writes in place with an index (its KV caches), by target."""
    from palu_fx.passes.find import WRITE_OPS

    specs = {s.arg.name: s for s in ep.graph_signature.input_specs if s.kind.name == "BUFFER"}
    written = {n.args[0].name for n in ep.graph.nodes if n.op == "call_function" and n.target in WRITE_OPS}
    return {specs[n].target: ep.constants.get(specs[n].target, ep.state_dict.get(specs[n].target))
            for n in written & set(specs)}


def cache_bytes(ep: torch.export.ExportedProgram) -> int:
    return sum(t.numel() * t.element_size() for t in cache_buffers(ep).values())


def attention_output_copies(ep: torch.export.ExportedProgram, ids: torch.Tensor) -> tuple[int, int]:
    """(latent-attention calls, bytes copied out of their outputs) over a prefill of ``ids``
    (``OutputCopies``)."""
    with torch.no_grad(), OutputCopies() as seen:
        ep.module()(input_ids=ids, cache_position=torch.arange(ids.shape[1]))
    return seen.calls, seen.copied


class OutputCopies(TorchDispatchMode):
    """Counts the latent-attention calls it sees, and the bytes copied out of their outputs: a
    clone, ``copy_`` or same-dtype ``_to_copy`` whose source is an op output, a view of one or
    one plus a bias (reshape's copy is a clone at this level). Outputs are kept alive, so no
    later tensor reuses their storage."""

    OPS = {torch.ops.palu.latent_attention.default, torch.ops.palu.quant_latent_attention.default}

    def __init__(self):
        super().__init__()
        self.outputs, self.calls, self.copied = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        aten = torch.ops.aten
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ptrs = {o.untyped_storage().data_ptr() for o in self.outputs}
        self.calls += func in self.OPS
        if func in self.OPS or (func is aten.add.Tensor and args[0].untyped_storage().data_ptr() in ptrs):
            self.outputs.append(out)
        elif func in (aten.clone.default, aten.copy_.default, aten._to_copy.default):
            src = args[1] if func is aten.copy_.default else args[0]
            same_dtype = func is not aten._to_copy.default or kwargs.get("dtype", src.dtype) == src.dtype
            if same_dtype and src.untyped_storage().data_ptr() in ptrs:
                self.copied += src.numel() * src.element_size()
        return out

"""Export helpers: Hugging Face decoder -> ``torch.export.ExportedProgram``.

``export_decoder`` uses transformers' own export wrapper
(``transformers.integrations.executorch.TorchExportableModuleForDecoderOnlyLM``), which holds a
static KV cache as module buffers (``key_cache_{i}``/``value_cache_{i}``, plus one
``cumulative_length_{i}`` counter per layer) mutated in place by ``index_copy_``. With a dynamic
sequence dimension one program serves prefill (S tokens) and decode (1 token):

    ep = export_decoder(model)                     # max_cache_len=64 -> S in [1, 63]
    m = ep.module()
    logits = m(input_ids=ids[:, :5], cache_position=torch.arange(0, 5))     # prefill
    logits = m(input_ids=ids[:, 5:6], cache_position=torch.arange(5, 6))   # decode

The wrapper resets each layer's ``cumulative_length`` to ``cache_position[0]`` on every call,
and the cache slots written are ``arange(S) + cumulative_length``: only ``cache_position[0]``
matters. transformers 5.17 calls the model with ``past_key_values=``, 5.24 with ``cache=``; the
wrapper hides that difference, so this module only needs the wrapper's public ``export``.

Notes on the result (seen with torch 2.13): ``torch.export.export`` returns the *training* IR
(``ep.verifier.dialect == "TRAINING"``): cache writes are in-place ``aten.index_copy_`` nodes on
buffer placeholders and ``graph_signature.buffers_to_mutate`` is empty. After
``ep.run_decompositions()`` the writes become functional ``aten.index_put`` nodes listed in
``buffers_to_mutate``, and (with the default table) SDPA is decomposed into matmul/softmax;
``ep.run_decompositions({})`` keeps SDPA and gives a functional ``index_copy``. Placeholder names of
the caches depend on the wrapper (``b_static_cache_layers_{i}_keys`` or ``b_cache_layers_{i}_keys``);
the signature targets ``key_cache_{i}`` / ``value_cache_{i}`` are stable. ``ep.module()`` shares buffer
storage with the exported module. With transformers 5.17 the rotary cos/sin computation sits inside a
``torch.ops.higher_order.wrap_with_set_grad_enabled`` node (its body is a ``submod_*`` GraphModule).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

__all__ = ["ExportError", "export_decoder", "export_prefill_only"]


class ExportError(RuntimeError):
    """A model could not be exported; the message names the model class and gives a hint."""


def _model_label(model: torch.nn.Module) -> str:
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    return f"{type(model).__name__}" + (f" (model_type={mt!r})" if mt else "")


def _hint(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "item()" in low or "data-dependent" in low or "guardondatadependent" in low:
        return ("the model code reads a tensor value in Python (e.g. `.item()` or a data-dependent branch); "
                "torch.export cannot trace that. A model whose forward does not depend on tensor values is needed.")
    if "index_copy" in low and "slice shape" in low:
        return ("the static cache allocated from the config ([batch, num_key_value_heads, max_cache_len, head_dim]) "
                "does not match the keys/values the model writes (e.g. MLA head dims, or a multi-query flag the "
                "config's num_key_value_heads does not reflect).")
    if "constraint" in low or "specializ" in low or "dim" in low and "dynamic" in low:
        return ("the sequence dimension could not stay dynamic (the model branches on the sequence length); "
                "try dynamic_seq=False to export one fixed length.")
    if "cache_implementation" in low or "static" in low and "cach" in low:
        return "the model does not support a static cache; transformers' export wrapper needs one."
    if "use_cache" in low or "caching enabled" in low:
        return "the model's config has use_cache=False or the model has no KV cache."
    if "unsupported" in low or "dynamo" in low or "graph break" in low:
        return ("Dynamo (strict export) could not trace part of the forward; "
                "try strict=False (note: non-strict export turns static caches into constants).")
    return "see the chained exception above; try strict=False or a different attention implementation."


def _wrap_error(model: torch.nn.Module, what: str, exc: BaseException) -> ExportError:
    msg = (f"{what} failed for {_model_label(model)}: {type(exc).__name__}: "
           f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}\n"
           f"Hint: {_hint(exc)}")
    return ExportError(msg)


def _text_config(model: torch.nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return None
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def _device_of(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _example_ids(model: torch.nn.Module, batch_size: int, seq_len: int, device: torch.device) -> torch.Tensor:
    cfg = _text_config(model)
    vocab = int(getattr(cfg, "vocab_size", 2) or 2)
    # Deterministic, nonzero tokens (avoid pad/bos special casing); values do not matter for tracing.
    ids = (torch.arange(batch_size * seq_len, device=device) % max(vocab - 3, 1)) + min(3, vocab - 1)
    return ids.reshape(batch_size, seq_len).to(torch.long)


class _Patched:
    """Temporarily set ``generation_config.cache_implementation='static'`` (and ``use_cache``)
    on a model, restoring the caller's objects afterwards."""

    def __init__(self, model: torch.nn.Module, batch_size: int, max_cache_len: int):
        self.model = model
        self.batch_size = batch_size
        self.max_cache_len = max_cache_len

    def __enter__(self):
        m = self.model
        self._had_gc = "generation_config" in m.__dict__
        self._old_gc = getattr(m, "generation_config", None)
        if self._old_gc is None:
            from transformers import GenerationConfig

            gc = GenerationConfig()
        else:
            gc = copy.deepcopy(self._old_gc)
        gc.use_cache = True
        gc.cache_implementation = "static"
        gc.cache_config = {"batch_size": self.batch_size, "max_cache_len": self.max_cache_len}
        m.generation_config = gc
        cfg = _text_config(m)
        self._cfg = cfg
        self._old_use_cache = getattr(cfg, "use_cache", None) if cfg is not None else None
        if cfg is not None and not self._old_use_cache:
            cfg.use_cache = True
        return self

    def __exit__(self, *exc):
        m = self.model
        if self._had_gc:
            m.generation_config = self._old_gc
        else:
            m.__dict__.pop("generation_config", None)
        if self._cfg is not None and self._old_use_cache is not None and self._cfg.use_cache != self._old_use_cache:
            self._cfg.use_cache = self._old_use_cache
        return False


def export_decoder(
    model: torch.nn.Module,
    batch_size: int = 1,
    max_cache_len: int = 64,
    dynamic_seq: bool = True,
    strict: bool = True,
    example_seq_len: int | None = None,
) -> torch.export.ExportedProgram:
    """Export a Hugging Face causal LM with a static KV cache.

    Args:
        model: a ``PreTrainedModel`` causal LM (left unchanged: its generation config is patched
            only for the duration of the call).
        batch_size: static batch size of the cache and of ``input_ids``.
        max_cache_len: cache length; with ``dynamic_seq`` the program takes 1..max_cache_len-1
            tokens per call.
        dynamic_seq: export the sequence dimension as dynamic (one program for prefill and decode).
        strict: ``torch.export`` strict mode (Dynamo). Keep True: non-strict export turns the
            static cache into constants.
        example_seq_len: tokens in the tracing example. Default: 4 when dynamic (>= 2 so the
            dimension is not specialized), 1 (a decode program) when static.

    Returns:
        ``ExportedProgram`` called as ``ep.module()(input_ids=ids, cache_position=pos)`` where
        ``ids`` is ``[batch_size, S]`` and ``pos = torch.arange(p, p + S)``; returns logits
        ``[batch_size, S, vocab]``.

    Raises:
        ExportError: naming the model class, with a hint; the original exception is chained.
    """
    if max_cache_len < 2:
        raise ValueError(f"max_cache_len must be >= 2, got {max_cache_len}")
    try:
        from transformers.integrations.executorch import TorchExportableModuleForDecoderOnlyLM
    except ImportError as e:  # pragma: no cover - transformers without the executorch integration
        raise ExportError(f"transformers' export wrapper is unavailable: {e}") from e

    max_seq = max_cache_len - 1
    if example_seq_len is None:
        example_seq_len = min(4, max_seq) if dynamic_seq else 1
    if not 1 <= example_seq_len <= max_seq:
        raise ValueError(f"example_seq_len must be in [1, {max_seq}], got {example_seq_len}")
    if dynamic_seq and example_seq_len < 2:
        if max_seq < 2:
            raise ValueError("dynamic_seq needs max_cache_len >= 3")
        example_seq_len = 2  # a size-1 example would be specialized by export

    device = _device_of(model)
    ids = _example_ids(model, batch_size, example_seq_len, device)
    pos = torch.arange(example_seq_len, dtype=torch.long, device=device)
    dynamic_shapes = None
    if dynamic_seq:
        seq = torch.export.Dim("seq_len", min=1, max=max_seq)
        dynamic_shapes = {"input_ids": {1: seq}, "cache_position": {0: seq}}

    try:
        with _Patched(model, batch_size, max_cache_len):
            wrapper = TorchExportableModuleForDecoderOnlyLM(
                model, batch_size=batch_size, max_cache_len=max_cache_len, device=device
            )
            ep = wrapper.export(input_ids=ids, cache_position=pos, dynamic_shapes=dynamic_shapes, strict=strict)
    except ExportError:
        raise
    except Exception as e:
        raise _wrap_error(model, "export_decoder", e) from e
    return ep


class _PrefillOnly(torch.nn.Module):
    """``forward(input_ids) -> logits`` with no cache."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=None, use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]


def export_prefill_only(
    model: torch.nn.Module,
    seq_len: int = 8,
    dynamic_seq: bool = True,
    strict: bool = True,
    batch_size: int = 1,
    max_seq_len: int | None = None,
) -> torch.export.ExportedProgram:
    """Plain ``torch.export.export`` of ``model(input_ids, use_cache=False).logits``.

    The example has ``seq_len`` tokens; with ``dynamic_seq`` the sequence dimension is dynamic in
    ``[1, max_seq_len]`` (default: the config's ``max_position_embeddings`` / ``n_positions``).
    Call as ``ep.module()(input_ids=ids)`` (or positionally).
    """
    device = _device_of(model)
    cfg = _text_config(model)
    if max_seq_len is None:
        max_seq_len = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    if dynamic_seq and seq_len < 2:
        raise ValueError("dynamic_seq needs an example seq_len >= 2 (size-1 dims are specialized)")
    ids = _example_ids(model, batch_size, seq_len, device)
    dynamic_shapes = None
    if dynamic_seq:
        seq = (torch.export.Dim("seq_len", min=1, max=int(max_seq_len)) if max_seq_len
               else torch.export.Dim("seq_len", min=1))
        dynamic_shapes = {"input_ids": {1: seq}}
    try:
        ep = torch.export.export(
            _PrefillOnly(model), args=(), kwargs={"input_ids": ids}, dynamic_shapes=dynamic_shapes, strict=strict
        )
    except Exception as e:
        raise _wrap_error(model, "export_prefill_only", e) from e
    return ep

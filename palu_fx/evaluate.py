"""Perplexity over non-overlapping token windows, generic over how logits are produced.

The callable may be an eager Hugging Face model, an exported program or a compiled module:
:func:`perplexity` only needs ``logits_fn(ids [1, T]) -> logits [1, T, V]``.

Example::

    ppl = perplexity(hf_logits_fn(model), split.evaluation)
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

__all__ = ["perplexity", "window_nll", "hf_logits_fn", "program_logits_fn"]

LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of one window and the number of predicted tokens.

    ``logits [1, T, V]`` for ``ids [1, T]``: position t predicts token t+1, so a window of T
    tokens contributes T-1 predictions (with BOS first, every text token is predicted).
    Computed in float32 (or wider) so half-precision logits don't bias the mean.
    """
    logits = logits.reshape(-1, logits.shape[-1])[:-1]
    target = ids.reshape(-1)[1:].to(logits.device)
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    nll = torch.nn.functional.cross_entropy(logits.to(dtype), target, reduction="sum")
    return float(nll), int(target.numel())


@torch.no_grad()
def perplexity(
    logits_fn: LogitsFn,
    token_windows: torch.Tensor | Iterable[torch.Tensor],
    progress: bool = True,
    desc: str = "perplexity",
) -> float:
    """exp(mean NLL) over all predicted tokens of all windows.

    Args:
        logits_fn: ``ids [1, T] -> logits [1, T, V]``; called once per window, so windows
            are independent (no state may leak between calls).
        token_windows: ``[N, T]`` tensor (see :func:`palu_fx.data.token_windows`) or an
            iterable of ``[T]`` / ``[1, T]`` windows (ragged lengths are fine).
        progress: show a tqdm bar (on stderr) with the running perplexity.
    """
    windows = list(token_windows)  # rows of a [N, T] tensor or the given windows
    if not windows:
        raise ValueError("perplexity: no token windows given")
    bar: Any = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(windows), desc=desc, unit="win", leave=False)
        except ImportError:  # tqdm ships with transformers; the bar is only cosmetic
            bar = None
    total_nll, total_tokens = 0.0, 0
    for w in windows:
        ids = w.reshape(1, -1)
        if ids.shape[1] < 2:
            raise ValueError("perplexity: every window needs at least 2 tokens")
        nll, n = window_nll(logits_fn(ids), ids)
        total_nll += nll
        total_tokens += n
        if bar is not None:
            bar.update(1)
            bar.set_postfix(ppl=f"{math.exp(total_nll / total_tokens):.3f}")
    if bar is not None:
        bar.close()
    return math.exp(total_nll / total_tokens)


def hf_logits_fn(model: torch.nn.Module) -> LogitsFn:
    """Adapter for a Hugging Face causal LM: no KV cache, inputs moved to the model's device."""
    device = next(model.parameters()).device

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(device), use_cache=False).logits

    return logits_fn


def program_logits_fn(ep) -> LogitsFn:
    """Adapter for an exported program (``export_prefill_only`` / ``compress_exported``)."""
    mod = ep.module()

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        out = mod(input_ids=ids)
        return getattr(out, "logits", out)

    return logits_fn

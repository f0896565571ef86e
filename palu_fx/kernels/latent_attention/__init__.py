"""Latent attention: Triton kernels (CUDA, or the interpreter) and the reference.

The Triton modules are imported on first use, not here: ``palu_fx.ops`` imports this
package on every machine, and Triton decides at kernel-definition time whether kernels are
compiled or interpreted (``TRITON_INTERPRET=1``), so tests must be able to set that first.
"""
from palu_fx.kernels.latent_attention.naive import latent_attention_ref, reconstruct_keys

__all__ = ["latent_attention_ref", "reconstruct_keys", "triton_latent_attention", "triton_quant_latent_attention"]


def triton_latent_attention(*args, **kwargs):
    """Triton latent attention (same arguments as ``latent_attention_ref``).

    Keyword-only extras (``config``, ``path``): see ``wrapper.latent_attention_triton``.
    """
    from palu_fx.kernels.latent_attention.wrapper import latent_attention_triton

    return latent_attention_triton(*args, **kwargs)


def triton_quant_latent_attention(*args, **kwargs):
    """Triton latent attention over a packed quantized cache (arguments of ``quant_latent_attention_ref``).

    Keyword-only extras (``config``, ``path``): see ``quant.quant_latent_attention_triton``.
    """
    from palu_fx.kernels.latent_attention.quant import quant_latent_attention_triton

    return quant_latent_attention_triton(*args, **kwargs)

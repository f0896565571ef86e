"""Latent attention: Triton kernels (CUDA, or the interpreter) and the reference."""
from palu_fx.kernels.latent_attention.naive import latent_attention_ref, reconstruct_keys

__all__ = ["latent_attention_ref", "reconstruct_keys", "triton_latent_attention"]


def triton_latent_attention(*args, **kwargs):
    raise NotImplementedError("the Triton latent-attention kernel has not landed yet")

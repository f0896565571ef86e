"""palu-fx: low-rank (Palu) KV-cache compression as a PyTorch graph transformation.

Entry points:
    palu_fx.compress_exported(ep, cfg)   ExportedProgram -> ExportedProgram with a latent cache
    palu_fx.report(ep2)                  what matched, ranks, cache bytes, what was left alone
    torch.compile(model.forward, backend=palu_fx.backend(cfg)) with palu_fx.LatentCache in generate()
"""
from palu_fx import ops  # noqa: F401  (registers torch.ops.palu.*)
from palu_fx.config import GROUP_ALL, PaluConfig
from palu_fx.compiled import backend, palu_backend
from palu_fx.exported import compress_exported
from palu_fx.plan import CompressionPlan
from palu_fx.report import CompressionReport, report

__all__ = ["PaluConfig", "GROUP_ALL", "CompressionPlan", "CompressionReport", "compress_exported", "report",
           "export_decoder", "export_prefill_only", "backend", "palu_backend", "LatentCache"]
__version__ = "0.1.0"


def __getattr__(name):
    # export helpers pull in transformers; load them on first use
    if name in ("export_decoder", "export_prefill_only"):
        from palu_fx import export

        return getattr(export, name)
    if name == "LatentCache":
        from palu_fx.latent_cache import LatentCache

        return LatentCache
    raise AttributeError(f"module 'palu_fx' has no attribute {name!r}")

"""palu-fx: low-rank (Palu) KV-cache compression as a PyTorch graph transformation."""
from palu_fx.config import GROUP_ALL, PaluConfig
from palu_fx import ops  # noqa: F401  registers torch.ops.palu.*

__all__ = ["PaluConfig", "GROUP_ALL"]
__version__ = "0.1.0"

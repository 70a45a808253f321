"""Lightning strategies (registered with Lightning's StrategyRegistry on import)."""

from lightning_gd.strategies.compressed_ddp import CompressedDDPStrategy

__all__ = ["CompressedDDPStrategy"]

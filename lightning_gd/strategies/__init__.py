"""Lightning strategies (registered with Lightning's StrategyRegistry on import)."""

from lightning_gd.strategies.compressed_ddp import CompressedDDPStrategy
from lightning_gd.strategies.conadv import ConAdvStrategy

__all__ = ["CompressedDDPStrategy", "ConAdvStrategy"]

"""Lightning plugins: checkpoint input/output."""

from lightning_gd.plugins.checkpoint_io import AtomicCheckpointIO

__all__ = ["AtomicCheckpointIO"]

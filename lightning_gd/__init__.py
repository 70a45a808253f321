"""lightning-gd: gradient-descent research tools as PyTorch Lightning plugins."""

__version__ = "0.1.0"

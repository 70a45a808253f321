"""``lightning-gd analyze``: a curvature report of any checkpoint (see :mod:`lightning_gd.analysis.run`).

The measurement is the curvature callbacks' engine (:mod:`lightning_gd.curvature`) on a checkpoint; the loss
landscapes are :mod:`lightning_gd.curvature.landscape`.
"""

from lightning_gd.analysis.run import AnalysisSettings, analyze, main

__all__ = ["AnalysisSettings", "analyze", "main"]

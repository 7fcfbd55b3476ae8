"""The brain-age network, its data handling, training and inference.

Nothing here imports nipype or pybids, so the model can be used (and trained) on its own.
"""

from brainage_bids.model.blocks import SpatialAttention3d
from brainage_bids.model.net import BrainAgeNet

__all__ = ["BrainAgeNet", "SpatialAttention3d"]

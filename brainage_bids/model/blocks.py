"""Building blocks of the brain-age network."""

from __future__ import annotations

import torch
from torch import nn


class SpatialAttention3d(nn.Module):
    """CBAM spatial attention for volumes (Woo et al. 2018, extended to 3D).

    Channel-wise max and mean are concatenated into a 2-channel map, a single ``Conv3d(2, 1)``
    and a sigmoid turn it into a voxel-wise weight that rescales every channel. The module has
    no channel-dependent parameters, which is what lets Kancharla & Sinha share ONE instance
    across blocks with 12 to 1024 channels.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd so that the map keeps its size")
        self.conv = nn.Conv3d(2, 1, kernel_size, padding=kernel_size // 2)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid weight map, shape ``(N, 1, D, H, W)``."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class ConvBlock3d(nn.Module):
    """``Conv3d(k=2, s=1, p=1) -> ReLU -> MaxPool3d(2)``, the paper's feature block.

    The attention that follows each block is applied by the network, not here, because in
    the shared variant one attention instance serves all seven blocks.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size=2, stride=1, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool3d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.conv(x)))

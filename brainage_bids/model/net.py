"""The weight-shared spatial-attention 3D CNN of Kancharla & Sinha (2024)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import torch
from torch import nn

from brainage_bids.model.blocks import ConvBlock3d, SpatialAttention3d

CHANNELS: tuple[int, ...] = (12, 16, 32, 64, 128, 512, 1024)
DENSE: tuple[int, ...] = (512, 128, 64, 12, 1)
ATTENTION_VARIANTS = ("shared", "separate", "none")
INPUT_SHAPE = (91, 109, 91)


class BrainAgeNet(nn.Module):
    """Seven conv blocks, each followed by spatial attention, then five dense layers.

    Parameters
    ----------
    attention:
        ``"shared"`` (the paper: ONE :class:`SpatialAttention3d` used after all seven blocks,
        so its gradient is the sum over the seven uses, eq. 4), ``"separate"`` (one module
        per block) or ``"none"`` (the ablation without attention).
    attention_kernel:
        Kernel of the attention convolution; 7 gives the paper's 5,408,228 parameters.
    dropout:
        Probability of the two dropout layers (after the last conv block and after the first
        dense layer). They also give the Monte-Carlo-dropout uncertainty at inference.

    The input grid 91x109x91 (FSL's MNI152 2 mm) reaches 1x1x1 after the seven blocks, so the
    flattened vector has 1024 values. Other inputs work as long as they also reach 1x1x1
    (a 32^3 cube does), which keeps quick tests cheap.
    """

    def __init__(self, attention: str = "shared", attention_kernel: int = 7,
                 dropout: float = 0.5, in_channels: int = 1,
                 channels: Sequence[int] = CHANNELS) -> None:
        super().__init__()
        if attention not in ATTENTION_VARIANTS:
            raise ValueError(f"attention must be one of {ATTENTION_VARIANTS}, got {attention!r}")
        self.attention = attention
        widths = (in_channels, *channels)
        self.blocks = nn.ModuleList(ConvBlock3d(a, b) for a, b in pairwise(widths))
        if attention == "shared":
            self.sa: nn.Module | None = SpatialAttention3d(attention_kernel)
            self.sas = None
        elif attention == "separate":
            self.sa = None
            self.sas: nn.ModuleList | None = nn.ModuleList(
                SpatialAttention3d(attention_kernel) for _ in channels)
        else:
            self.sa = None
            self.sas = None
        self.dropout_conv = nn.Dropout(dropout)
        self.dense = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise((channels[-1], *DENSE)))
        self.dropout_dense = nn.Dropout(dropout)
        self.act = nn.ReLU(inplace=True)

    def attention_module(self, index: int) -> nn.Module | None:
        """The attention module applied after block ``index`` (the same object if shared)."""
        if self.sa is not None:
            return self.sa
        if self.sas is not None:
            return self.sas[index]
        return None

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk without dropout: ``(N, C, D, H, W) -> (N, 1024)``.

        Deterministic in train and eval mode alike, so Monte-Carlo dropout can run it once
        and draw its samples through :meth:`from_trunk` (see
        :func:`~brainage_bids.model.predict.predict_age`).
        """
        for index, block in enumerate(self.blocks):
            x = block(x)
            attention = self.attention_module(index)
            if attention is not None:
                x = attention(x)
        if x.shape[2:] != (1, 1, 1):
            raise ValueError(
                f"input of spatial size {tuple(x.shape[2:])} after the conv blocks; the network "
                f"needs inputs that reach 1x1x1, such as {INPUT_SHAPE}")
        return torch.flatten(x, 1)

    def from_trunk(self, features: torch.Tensor) -> torch.Tensor:
        """Everything after :meth:`trunk`: the first dropout and the dense head."""
        return self.head(self.dropout_conv(features))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """The five dense layers, ReLU between them, dropout after the first."""
        last = len(self.dense) - 1
        for index, layer in enumerate(self.dense):
            x = layer(x)
            if index < last:
                x = self.act(x)
            if index == 0:
                x = self.dropout_dense(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_trunk(self.trunk(x))

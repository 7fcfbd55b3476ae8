"""The Simple Fully Convolutional Network of Peng et al. (2021), the peer in the ablation.

Peng, Gong, Beckmann, Vedaldi & Smith, "Accurate brain age prediction with lightweight deep
neural networks", Medical Image Analysis 68, 101871. The network classifies age into bins
and is trained with the KL divergence to a Gaussian soft label; the age is the expectation
over the bin centres. Following the reference implementation (UKBiobank_deep_pretrain,
``dp_model/model_files/sfcn.py``) the pooling is written as a global average, so it runs on
our 91x109x91 2 mm grid as well as on the original 160x192x160 1 mm crop.

``forward`` returns ``(N, 1)`` ages, so prediction, evaluation and MC-dropout treat it exactly
like :class:`~brainage_bids.model.net.BrainAgeNet`; training uses :meth:`SFCN.log_probs`
and :func:`soft_label_loss`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

SFCN_CHANNELS: tuple[int, ...] = (32, 64, 128, 256, 256, 64)


def sfcn_block(in_channels: int, out_channels: int, *, pool: bool) -> nn.Sequential:
    """``Conv3d(3, p=1) -> BN -> MaxPool(2) -> ReLU``, or ``Conv3d(1) -> BN -> ReLU`` (last).

    Pooling before the ReLU is the paper's order; max-pooling and ReLU commute, and pooling
    first makes the ReLU 8x cheaper.
    """
    if pool:
        return nn.Sequential(nn.Conv3d(in_channels, out_channels, 3, padding=1),
                             nn.BatchNorm3d(out_channels), nn.MaxPool3d(2), nn.ReLU())
    return nn.Sequential(nn.Conv3d(in_channels, out_channels, 1),
                         nn.BatchNorm3d(out_channels), nn.ReLU())


def gaussian_soft_labels(ages: torch.Tensor, bin_centers: torch.Tensor,
                         sigma: float = 1.0) -> torch.Tensor:
    """``(N, n_bins)`` probability of each bin under N(age, sigma^2), renormalised to sum 1.

    The mass of each bin is the difference of the Gaussian CDF at its edges, as in the
    reference ``num2vect``. Renormalising puts the mass that falls outside the range back
    into it, so an age near the edge of the range is still a proper distribution; ages are
    clamped to the range first, because the model cannot predict beyond it anyway.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    centers = bin_centers.to(torch.float64)
    width = float(centers[1] - centers[0]) if centers.numel() > 1 else 1.0
    low, high = float(centers[0]) - width / 2, float(centers[-1]) + width / 2
    ages = ages.reshape(-1, 1).to(torch.float64).clamp(low, high)
    upper = torch.special.ndtr((centers + width / 2 - ages) / sigma)
    lower = torch.special.ndtr((centers - width / 2 - ages) / sigma)
    mass = (upper - lower).clamp_min(0.0)
    return mass / mass.sum(dim=1, keepdim=True)


def soft_label_loss(log_probs: torch.Tensor, ages: torch.Tensor, bin_centers: torch.Tensor,
                    *, sigma: float = 1.0) -> torch.Tensor:
    """KL(soft label || predicted distribution), summed over bins, averaged over the batch.

    This is the reference ``my_KLDivLoss`` (``KLDivLoss(reduction='sum') / N``), with
    ``xlogy`` instead of adding 1e-16 to the labels: empty bins contribute exactly 0.
    """
    target = gaussian_soft_labels(ages, bin_centers, sigma).to(log_probs.dtype)
    if target.shape != log_probs.shape:
        raise ValueError(f"log_probs {tuple(log_probs.shape)} do not match "
                         f"{target.shape[0]} ages over {target.shape[1]} bins")
    kl = torch.xlogy(target, target) - target * log_probs
    return kl.sum() / log_probs.shape[0]


class SFCN(nn.Module):
    """Peng et al.'s SFCN: six conv blocks, global average pooling, a 1x1x1 conv over bins.

    Parameters
    ----------
    age_range:
        ``(low, high)`` in years; the bins tile it exactly. The default covers adulthood
        (14 to 94) with 2-year bins (40 bins, as many as the original's 42-82 with 1-year
        bins).
    bin_width:
        Width of an age bin in years; must divide the range.
    dropout:
        Dropout on the pooled 64 features (also the MC-dropout of :func:`predict_age`).
    channels, in_channels:
        The paper's widths by default.

    The default network has 2,952,936 parameters (40 bins), whatever the input size.
    """

    def __init__(self, age_range: Sequence[float] = (14.0, 94.0), bin_width: float = 2.0,
                 dropout: float = 0.5, channels: Sequence[int] = SFCN_CHANNELS,
                 in_channels: int = 1) -> None:
        super().__init__()
        low, high = (float(v) for v in age_range)
        n_bins = round((high - low) / bin_width)
        if high <= low or bin_width <= 0 or not math.isclose(n_bins * bin_width, high - low):
            raise ValueError(f"bin_width {bin_width} must tile the age range {age_range}")
        self.age_range = (low, high)
        self.bin_width = float(bin_width)
        widths = (in_channels, *channels)
        last = len(channels) - 1
        self.feature_extractor = nn.Sequential(
            *(sfcn_block(a, b, pool=i < last)
              for i, (a, b) in enumerate(pairwise(widths))))
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Dropout(dropout),
                                        nn.Conv3d(channels[-1], n_bins, 1))
        centers = low + bin_width / 2 + bin_width * torch.arange(n_bins, dtype=torch.float32)
        self.register_buffer("bin_centers", centers)

    @property
    def n_bins(self) -> int:
        return int(self.bin_centers.numel())

    def log_probs(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, n_bins)`` log-probabilities over the age bins (what the loss needs)."""
        logits = self.classifier(self.feature_extractor(x))
        return F.log_softmax(torch.flatten(logits, 1), dim=1)

    def forward(self, x: torch.Tensor, log_probs: bool = False) -> torch.Tensor:
        """``(N, 1)`` expected ages: the mean of the bin distribution, as in the paper.

        ``log_probs=True`` returns :meth:`log_probs` instead: training calls it through
        ``forward`` so that a ``DistributedDataParallel`` wrapper sees the call.
        """
        if log_probs:
            return self.log_probs(x)
        return (self.log_probs(x).exp() @ self.bin_centers).unsqueeze(1)

    def soft_label_loss(self, log_probs: torch.Tensor, ages: torch.Tensor,
                        sigma: float = 1.0) -> torch.Tensor:
        """:func:`soft_label_loss` on this model's bins."""
        return soft_label_loss(log_probs, ages, self.bin_centers, sigma=sigma)

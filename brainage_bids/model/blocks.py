"""Building blocks of the brain-age network."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Conv outputs larger than this are computed depth slab by depth slab at inference, so that
#: each slab's convolution, pooling and ReLU run while it is still in the CPU cache.
SLAB_BYTES = 8 * 2**20


class DepthTapConv3d(nn.Conv3d):
    """A same-size ``Conv3d`` (odd cubic kernel, stride 1) for very few output channels.

    oneDNN is slow at convolving into one output channel: on 2 CPU cores the attention's
    ``Conv3d(2, 1, 7)`` took 45 ms on four volumes' block-1 maps, against 11 ms for the same
    sums done this way. On CPU, each of the k depth slices of the kernel becomes its own
    output channel of a ``(1, k, k)`` convolution, and the k results are summed with their
    depth shifts. The sum is the same; only the order of the float
    additions changes (differences of about 1e-6). Parameters, state-dict keys and autograd
    are those of ``nn.Conv3d``, so training uses it too and old weights load unchanged.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        if kernel_size % 2 != 1:
            raise ValueError("kernel_size must be odd so that the output keeps its size")
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":  # measured on CPU only; cuDNN keeps its own convolution
            return super().forward(x)
        k, c_out = self.kernel_size[0], self.out_channels
        centre = k // 2
        # weight (c_out, c_in, k, k, k) -> (k * c_out, c_in, 1, k, k), tap-major
        taps = self.weight.permute(2, 0, 1, 3, 4).reshape(k * c_out, self.in_channels, 1, k, k)
        per_tap = F.conv3d(x, taps, padding=(0, centre, centre))  # (N, k * c_out, D, H, W)
        depth = x.shape[2]
        out = per_tap[:, centre * c_out:(centre + 1) * c_out] + self.bias.view(1, -1, 1, 1, 1)
        for tap in range(k):
            shift = tap - centre  # output row d reads input row d + shift
            if tap == centre or abs(shift) >= depth:
                continue
            lo, hi = max(0, -shift), depth - max(0, shift)
            out[:, :, lo:hi] += per_tap[:, tap * c_out:(tap + 1) * c_out, lo + shift:hi + shift]
        return out


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
        self.conv = DepthTapConv3d(2, 1, kernel_size)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """The sigmoid weight map, shape ``(N, 1, D, H, W)``."""
        pooled = torch.cat([x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    return (torch.channels_last_3d if x.is_contiguous(memory_format=torch.channels_last_3d)
            and not x.is_contiguous() else torch.contiguous_format)


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
        if torch.is_grad_enabled():
            return self.pool(self.act(self.conv(x)))
        if x.device.type != "cpu":  # slabs are for CPU caches; a GPU wants few, large kernels
            return self.act(self.pool(self.conv(x)))
        return self._forward_slabs(x)

    def _forward_slabs(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: the same values, in depth slabs, pooling before the ReLU.

        Max-pooling commutes with ReLU (both are monotone), so the ReLU can run on the pooled
        eighth; and a slab of the conv output small enough to stay in cache is pooled before
        the next slab is computed, instead of writing and re-reading the whole conv output
        (180 MB for four volumes in block 1). Both are exact. Grad-CAM hooks ``act`` and
        needs the conv output before pooling, so it runs with autograd on: the plain path.
        """
        conv = self.conv
        n, _, depth, height, width = x.shape
        pooled_depth = (depth + 1) // 2  # conv output depth is depth + 1, pooled by 2
        row_bytes = 2 * n * conv.out_channels * (height + 1) * (width + 1) * x.element_size()
        rows = max(1, SLAB_BYTES // row_bytes)  # pooled depth rows per slab
        if rows >= pooled_depth:
            return self.act(self.pool(conv(x)))
        result = None
        for start in range(0, pooled_depth, rows):
            stop = min(pooled_depth, start + rows)
            # pooled rows [start, stop) need conv rows [2 start, 2 stop), which read input
            # rows [2 start - 1, 2 stop - 1] (kernel depth 2, padding 1): zeros outside
            first, last = 2 * start - 1, 2 * stop - 1
            piece = x[:, :, max(0, first):min(depth, last + 1)]
            if first < 0 or last >= depth:
                piece = F.pad(piece, (0, 0, 0, 0, max(0, -first), max(0, last + 1 - depth)))
            pooled = self.pool(F.conv3d(piece, conv.weight, conv.bias, padding=(0, 1, 1)))
            if result is None:
                result = torch.empty((n, conv.out_channels, pooled_depth, *pooled.shape[3:]),
                                     dtype=pooled.dtype, device=pooled.device,
                                     memory_format=_memory_format(x))
            result[:, :, start:stop] = pooled
        return self.act(result)

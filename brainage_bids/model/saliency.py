"""What the network looks at: Grad-CAM per convolution block and the spatial-attention maps.

Both are read from the unmodified network through forward hooks (removed before returning),
so :mod:`brainage_bids.model.net` stays free of explanation code and a trained model is
explained exactly as it predicts.

Every map is brought back to the input grid with the network's true geometry: a feature voxel
of a ``Conv3d(k=2, p=1)`` sits half an input voxel before the voxels it sees, and a pooled one
between the two it pools. :func:`feature_geometry` tracks this through the blocks, so the
coarse maps of the deep blocks (3x4x3 voxels for block 7) land where their receptive fields
are rather than being stretched over the image, as a plain resize would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.modules.utils import _triple

from brainage_bids.model.predict import as_batch, preserved_modes, resolve_device

#: Where a feature grid sits on the input grid: voxel ``j`` of the feature map is centred on
#: input voxel ``scale * j + offset`` along each of the three axes.
Geometry = tuple[tuple[float, float, float], tuple[float, float, float]]
IDENTITY: Geometry = ((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))


def through(layer: nn.Module, geometry: Geometry) -> Geometry:
    """The geometry after a convolution or pooling layer (kernel, stride, padding, dilation).

    Output voxel ``j`` covers input voxels ``j*s - p + d*i`` for ``i < k``, so its centre is
    ``j*s - p + d*(k - 1)/2`` in the layer's input coordinates.
    """
    padding = getattr(layer, "padding", 0)
    if isinstance(padding, str):
        raise ValueError(f"string padding {padding!r} is not supported by the saliency geometry")
    kernel, stride = _triple(layer.kernel_size), _triple(layer.stride or layer.kernel_size)
    dilation, padding = _triple(getattr(layer, "dilation", 1)), _triple(padding)
    scales, offsets = geometry
    new_scales = tuple(a * s for a, s in zip(scales, stride, strict=True))
    new_offsets = tuple(b + a * (d * (k - 1) / 2 - p)
                        for a, b, k, d, p in zip(scales, offsets, kernel, dilation, padding,
                                                 strict=True))
    return new_scales, new_offsets


def feature_geometry(model: nn.Module) -> tuple[list[Geometry], list[Geometry]]:
    """Per block: the geometry of the conv activation (before pooling) and of the block output.

    The block output is where the spatial attention acts.
    """
    before, after = [], []
    geometry = IDENTITY
    for block in model.blocks:
        geometry = through(block.conv, geometry)
        before.append(geometry)
        geometry = through(block.pool, geometry)
        after.append(geometry)
    return before, after


def interpolation_matrix(size: int, n_features: int, scale: float, offset: float) -> np.ndarray:
    """``(size, n_features)`` weights of linear interpolation at every input voxel.

    Input voxels beyond the outermost feature centres take the edge value (border clamp), as
    a receptive field does not end at its centre.
    """
    position = np.clip((np.arange(size) - offset) / scale, 0.0, n_features - 1)
    low = np.floor(position).astype(int)
    high = np.minimum(low + 1, n_features - 1)
    frac = position - low
    weights = np.zeros((size, n_features))
    rows = np.arange(size)
    np.add.at(weights, (rows, low), 1.0 - frac)
    np.add.at(weights, (rows, high), frac)
    return weights


def to_input_grid(feature: np.ndarray, geometry: Geometry, shape: Sequence[int]) -> np.ndarray:
    """Trilinear interpolation of a ``(d, h, w)`` feature map onto the ``shape`` input grid.

    Trilinear interpolation is separable, so it is three small matrix products, one per axis.
    """
    out = np.asarray(feature, dtype=np.float64)
    for axis, (size, scale, offset) in enumerate(zip(shape, *geometry, strict=True)):
        weights = interpolation_matrix(size, out.shape[axis], scale, offset)
        out = np.moveaxis(np.tensordot(weights, out, axes=([1], [axis])), 0, axis)
    return out.astype(np.float32)


@contextlib.contextmanager
def _forward_hooks(modules: Iterable[nn.Module], hook: Callable[..., None]) -> Iterator[None]:
    """``hook`` on every module's forward for the duration of the block, then removed."""
    handles = [module.register_forward_hook(hook) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_blocks(model: nn.Module) -> None:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(hasattr(b, name) for b in blocks
                                 for name in ("conv", "act", "pool")):
        raise TypeError(f"{type(model).__name__} has no conv/act/pool blocks to explain; "
                        "saliency maps are defined for BrainAgeNet")


def gradcam_maps(model: nn.Module, volume: torch.Tensor | np.ndarray, *,
                 device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """Grad-CAM of the predicted age for each of the seven conv blocks (the paper's Fig. 4).

    The activation is each block's conv output after its ReLU and *before* pooling: after
    pooling block 7 is a single voxel, so its map would be constant; before, it is 3x4x3 on
    the 91x109x91 grid. The channel weights are the spatial means of d(age)/d(activation),
    the map is ``ReLU(sum_c w_c A_c)``: for a regression this keeps the regions that push the
    predicted age *up*. Each map is interpolated to the input grid and divided by its maximum
    (all zeros when no region pushes the age up).

    The model runs in eval mode (dropout off); its modes, parameter ``requires_grad`` flags and
    ``.grad`` are left as they were, and no hook stays registered.

    Returns
    -------
    dict
        ``block1`` .. ``block7``: float32 arrays of the input's ``(D, H, W)``, in [0, 1].
    """
    _check_blocks(model)
    device = resolve_device(device)
    batch = as_batch(volume).to(device)
    model.to(device)
    activations: list[torch.Tensor] = []

    def record(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        activations.append(out)

    with (_forward_hooks([block.act for block in model.blocks], record), preserved_modes(model),
          torch.inference_mode(False), torch.enable_grad()):
        model.eval()
        # The input, not the parameters, anchors the graph: frozen weights still work.
        age = model(batch.clone().requires_grad_(True)).sum()
        grads = torch.autograd.grad(age, activations)

    before, _ = feature_geometry(model)
    shape = tuple(batch.shape[2:])
    maps = {}
    layers = zip(activations, grads, before, strict=True)
    for index, (act, grad, geometry) in enumerate(layers, start=1):
        weights = grad.mean(dim=(2, 3, 4), keepdim=True)
        cam = torch.relu((weights * act).sum(dim=1))[0].detach().cpu().numpy()
        cam = to_input_grid(cam, geometry, shape)
        peak = float(cam.max())
        maps[f"block{index}"] = cam / peak if peak > 0 else np.zeros_like(cam)
    return maps


def attention_maps(model: nn.Module, volume: torch.Tensor | np.ndarray, *,
                   device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """The spatial-attention weight map of each of the seven uses, on the input grid.

    Each use sees the output of one block, so the same shared module gives seven different
    maps; their ``mean`` (shared variant only) summarises where the one shared module
    attends. Values are the attention's sigmoid weights in (0, 1), not rescaled, so maps of
    different participants stay comparable. Block 7 acts on a single voxel, so its map is
    constant.

    Raises
    ------
    ValueError
        for ``attention="none"``, which has no attention to show.
    """
    _check_blocks(model)
    modules = [model.attention_module(i) for i in range(len(model.blocks))]
    if any(module is None for module in modules):
        raise ValueError("this model has no spatial attention (attention='none'); "
                         "use gradcam_maps instead")
    device = resolve_device(device)
    batch = as_batch(volume).to(device)
    model.to(device)
    weights: list[torch.Tensor] = []

    def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        weights.append(module.attention_map(inputs[0]))

    unique = {id(module): module for module in modules}.values()
    with _forward_hooks(unique, record), preserved_modes(model), torch.inference_mode():
        model.eval()
        model(batch)

    _, after = feature_geometry(model)
    shape = tuple(batch.shape[2:])
    maps = {f"block{index}": to_input_grid(w[0, 0].cpu().numpy(), geometry, shape)
            for index, (w, geometry) in enumerate(zip(weights, after, strict=True), start=1)}
    if len(unique) == 1:
        maps["mean"] = np.mean(list(maps.values()), axis=0).astype(np.float32)
    return maps

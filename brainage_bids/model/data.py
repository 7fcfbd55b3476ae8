"""Training data: a volume cache read from NIfTI once, and seeded MONAI augmentation.

Why a cache: decoding a gzipped NIfTI and normalising it costs far more than a training step
on a GPU, and an epoch touches every volume. Each preprocessed image is therefore read and
normalised (:func:`brainage_bids.model.intensity.normalise_intensity`) exactly once into one
``.npy`` file in the work directory, then memory-mapped: the OS page cache keeps it in RAM,
every DistributedDataParallel rank on a node shares the same pages, and a resumed run reuses
it. Float16 halves the memory (z-scores need no more than its 3 significant digits).

Why pure per-sample seeds: the augmentation of item ``i`` in epoch ``e`` depends only on
``(seed, e, i)``, never on the batch it lands in, the rank that draws it, or what ran before,
so that a resumed or distributed run augments exactly like an uninterrupted single process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from brainage_bids.io import atomic_path, atomic_write_json
from brainage_bids.model.intensity import NORMALISATION, normalise_intensity

LOGGER = logging.getLogger(__name__)

CACHE_DTYPES = ("float16", "float32")


# The pieces both augmentation versions are built from, each written once; functions, so
# that the two dicts share no mutable objects.
def _affine(prob: float, rotate_range_deg: float, scale_range: float) -> dict[str, Any]:
    return {"transform": "monai.transforms.RandAffine", "prob": prob,
            "rotate_range_deg": rotate_range_deg, "scale_range": scale_range,
            "mode": "bilinear", "padding_mode": "zeros"}


def _shift() -> dict[str, Any]:
    return {"transform": "monai.transforms.BorderPad + RandSpatialCrop", "max_voxels": 3,
            "padding": "zeros"}


def _flip() -> dict[str, Any]:
    return {"transform": "monai.transforms.RandFlip", "prob": 0.5, "spatial_axis": 0,
            "note": "left-right"}


_SEEDING = "numpy SeedSequence([seed, epoch, item index]) per sample and transform"

#: The first model's augmentation (``ixi-2mm-v1``), kept so that its card still describes
#: something this code can run.
AUGMENTATION_V1: dict[str, Any] = {
    "order": ["affine", "shift", "flip", "intensity_scale"],
    "affine": _affine(0.3, 3.0, 0.03),
    "shift": _shift(),
    "flip": _flip(),
    "intensity_scale": {"transform": "monai.transforms.RandScaleIntensity", "prob": 1.0,
                        "factors": 0.1, "note": "v * (1 + f), f ~ U(-0.1, 0.1)"},
    "seeding": _SEEDING,
}

#: The default augmentation, recorded verbatim in model cards. It targets what differs
#: between sites and storage but not between brains of one age (measured on a real head:
#: resampling the same brain along a 15-degree rotated grid moved v1's prediction by 7 years,
#: an intensity rescale by 1-2): resampling blur and small misregistration (affine, shift,
#: low resolution, blur), scanner contrast (bias field, gamma, histogram shift), noise, and
#: the left-right flip. Spatial transforms run first; the brain mask is taken after them
#: (the non-zero voxels), intensity transforms follow, and the result is masked and
#: renormalised exactly as the model input is at prediction time
#: (:func:`~brainage_bids.model.intensity.normalise_intensity`), so contrast changes alter
#: the shape of the histogram, never its location or scale.
AUGMENTATION: dict[str, Any] = {
    "version": 2,
    "order": ["affine", "shift", "flip", "mask", "low_resolution", "blur", "bias_field",
              "gamma", "histogram_shift", "noise", "renormalise"],
    "affine": _affine(0.5, 8.0, 0.05),
    "shift": _shift(),
    "flip": _flip(),
    "mask": {"note": "the brain mask is the non-zero voxels after the spatial transforms"},
    "low_resolution": {"transform": "monai.transforms.RandSimulateLowResolution", "prob": 0.15,
                       "zoom_range": [0.6, 1.0]},
    "blur": {"transform": "monai.transforms.RandGaussianSmooth", "prob": 0.2,
             "sigma_range_voxels": [0.25, 1.0]},
    "bias_field": {"transform": "monai.transforms.RandBiasField", "prob": 0.3, "degree": 3,
                   "coeff_range": [0.0, 0.3]},
    "gamma": {"transform": "monai.transforms.RandAdjustContrast", "prob": 0.3,
              "gamma_range": [0.7, 1.5]},
    "histogram_shift": {"transform": "monai.transforms.RandHistogramShift", "prob": 0.2,
                        "num_control_points": [5, 10]},
    "noise": {"transform": "monai.transforms.RandGaussianNoise", "prob": 0.2,
              "std": 0.1, "note": "in units of the within-brain SD"},
    "renormalise": {"note": "mask, then the prediction-time robust z-score inside the mask"},
    "seeding": _SEEDING,
}


# --------------------------------------------------------------------------- reading

def read_volume(image: str | os.PathLike[str], mask: str | os.PathLike[str],
                shape: Sequence[int] | None = None) -> np.ndarray:
    """Load a preprocessed brain and its mask, normalised exactly as at prediction time.

    Raises ``ValueError`` naming the file when it cannot be read, is not 3D, does not have
    ``shape``, or cannot be normalised (empty mask, constant image).
    """
    import nibabel as nib

    arrays = []
    for path in (image, mask):
        try:
            img = nib.load(os.fspath(path))
            data = np.asanyarray(img.dataobj)
        except Exception as exc:  # nibabel raises many types for corrupt files
            raise ValueError(f"cannot read {path}: {exc}") from exc
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        if data.ndim != 3:
            raise ValueError(f"{path} is not a 3D volume (shape {data.shape})")
        if shape is not None and tuple(data.shape) != tuple(shape):
            raise ValueError(f"{path} has shape {data.shape}; the model grid is {tuple(shape)}")
        arrays.append(data)
    try:
        return normalise_intensity(np.asarray(arrays[0], dtype=np.float32), arrays[1])
    except ValueError as exc:
        raise ValueError(f"cannot normalise {image}: {exc}") from exc


# --------------------------------------------------------------------------- cache

def _source_fingerprint(path: str | os.PathLike[str]) -> list[Any]:
    stat = Path(path).stat()
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(sources: Sequence[tuple[str, str]], shape: Sequence[int], dtype: str) -> str:
    """A digest that changes whenever an input file, the grid, dtype or normalisation does."""
    payload = {
        "sources": [[_source_fingerprint(i), _source_fingerprint(m)] for i, m in sources],
        "shape": list(shape), "dtype": dtype, "normalisation": NORMALISATION,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def build_cache(sources: Sequence[tuple[str, str]], cache_dir: str | os.PathLike[str], *,
                shape: Sequence[int], dtype: str = "float16",
                ids: Sequence[str] | None = None) -> Path:
    """Normalise every ``(image, mask)`` once into ``cache_dir/<key>.npy``; return its path.

    An existing cache with the same key is reused. The file is written under a temporary
    name and renamed, so a killed run leaves no half-filled cache behind and concurrent
    builders (ranks on different nodes sharing a file system) are harmless.
    """
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {CACHE_DTYPES}, got {dtype!r}")
    cache_dir = Path(cache_dir)
    key = cache_key(sources, shape, dtype)
    target = cache_dir / f"volumes-{key}.npy"
    if target.is_file():
        LOGGER.info("reusing the volume cache %s", target)
        return target
    LOGGER.info("caching %d normalised volumes in %s", len(sources), target)
    with atomic_path(target) as tmp:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.dtype(dtype),
                                          shape=(len(sources), *shape))
        for index, (image, mask) in enumerate(sources):
            array[index] = read_volume(image, mask, shape)
        array.flush()
        del array
    atomic_write_json(target.with_suffix(".json"),
                      {"ids": list(ids) if ids is not None else None,
                       "sources": [list(s) for s in sources], "shape": list(shape),
                       "dtype": dtype, "normalisation": NORMALISATION})
    return target


class VolumeCache:
    """Memory-mapped normalised volumes; :meth:`batch` gives float32 ``(B, 1, D, H, W)``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.array = np.load(self.path, mmap_mode="r")

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape[1:])

    def volume(self, index: int) -> torch.Tensor:
        """One volume as a float32 ``(1, D, H, W)`` tensor (a fresh copy, safe to modify)."""
        return torch.from_numpy(np.asarray(self.array[index], dtype=np.float32))[None]

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.stack([self.volume(int(i)) for i in indices])


# --------------------------------------------------------------------------- augmentation

def sample_seeds(seed: int, epoch: int, index: int, n: int) -> list[int]:
    """``n`` independent 32-bit seeds that depend only on ``(seed, epoch, index)``."""
    return [int(s) for s in np.random.SeedSequence([seed, epoch, index]).generate_state(n)]


class Augmenter:
    """The training augmentation as MONAI transforms, reseeded for every sample.

    Each transform gets its own seed (one draw per transform from ``SeedSequence``), so for
    example whether a volume is flipped is independent of whether it is rotated.
    """

    def __init__(self, params: dict[str, Any] | None = None,
                 device: torch.device | str | None = None) -> None:
        self.params = json.loads(json.dumps(params if params is not None else AUGMENTATION))
        # On a GPU the resampling runs there (give it volumes on that device): one CPU
        # thread resampling ~10 volumes/s cannot feed a GPU.
        self.device = torch.device(device) if device is not None else None
        self._by_shape: dict[tuple[int, ...], list[Any]] = {}

    def _transforms(self, shape: tuple[int, ...]) -> list[Any]:
        if shape not in self._by_shape:
            self._by_shape[shape] = [(name, self._build(name, shape))
                                     for name in self.params["order"]]
        return self._by_shape[shape]

    def _build(self, name: str, shape: tuple[int, ...]) -> Any:
        """The MONAI transform of one step (``mask`` and ``renormalise`` are this class's)."""
        from monai import transforms as mt

        if name in ("mask", "renormalise"):
            return None
        p = self.params[name]
        if name == "affine":
            return mt.RandAffine(prob=p["prob"],
                                 rotate_range=(math.radians(p["rotate_range_deg"]),) * 3,
                                 scale_range=(p["scale_range"],) * 3, mode=p["mode"],
                                 padding_mode=p["padding_mode"], device=self.device)
        if name == "shift":
            return mt.Compose([mt.BorderPad(spatial_border=p["max_voxels"]),
                               mt.RandSpatialCrop(roi_size=shape, random_size=False)])
        if name == "flip":
            return mt.RandFlip(prob=p["prob"], spatial_axis=p["spatial_axis"])
        if name == "intensity_scale":
            return mt.RandScaleIntensity(factors=p["factors"], prob=p["prob"])
        if name == "low_resolution":
            return mt.RandSimulateLowResolution(prob=p["prob"], zoom_range=p["zoom_range"],
                                                device=self.device)
        if name == "blur":
            sigma = tuple(p["sigma_range_voxels"])
            return mt.RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma,
                                         prob=p["prob"])
        if name == "bias_field":
            return mt.RandBiasField(degree=p["degree"], coeff_range=tuple(p["coeff_range"]),
                                    prob=p["prob"])
        if name == "gamma":
            return mt.RandAdjustContrast(prob=p["prob"], gamma=tuple(p["gamma_range"]))
        if name == "histogram_shift":
            return mt.RandHistogramShift(num_control_points=tuple(p["num_control_points"]),
                                         prob=p["prob"])
        if name == "noise":
            return mt.RandGaussianNoise(prob=p["prob"], std=p["std"])
        raise ValueError(f"unknown augmentation step {name!r}")

    def __call__(self, volume: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
        """Augment one ``(C, D, H, W)`` volume; a pure function of its arguments."""
        from monai.utils import convert_to_tensor

        transforms = self._transforms(tuple(volume.shape[1:]))
        seeds = sample_seeds(seed, epoch, index, len(transforms))
        mask = None
        for (name, transform), sub_seed in zip(transforms, seeds, strict=True):
            if name == "mask":
                mask = convert_to_tensor(volume, track_meta=False) != 0
                continue
            if name == "renormalise":
                volume = _renormalise(convert_to_tensor(volume, track_meta=False), mask)
                continue
            transform.set_random_state(seed=sub_seed)
            volume = transform(volume)
        return convert_to_tensor(volume, track_meta=False).contiguous()


def _renormalise(volume: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero outside the mask, then the prediction-time normalisation inside it (in torch)."""
    volume = volume.float()
    if mask is None:
        mask = volume != 0
    values = volume[mask]
    if values.numel() < 100:
        return volume * mask
    low, high = NORMALISATION["clip_percentiles"]
    # torch.quantile refuses large inputs; kthvalue gives the same order statistics
    n = values.numel()
    lo = values.kthvalue(max(1, round(low / 100 * (n - 1)) + 1)).values
    hi = values.kthvalue(max(1, round(high / 100 * (n - 1)) + 1)).values
    values = values.clamp(lo, hi)
    std = values.std(unbiased=False)
    out = torch.zeros_like(volume)
    if float(std) > 0:
        out[mask] = (values - values.mean()) / std
    return out

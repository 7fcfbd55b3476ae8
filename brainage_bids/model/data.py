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

#: The default augmentation, recorded verbatim in model cards. Chosen to be cheap on a CPU:
#: integer shifts cost a copy, whereas a resampling affine costs about 150 ms per 2 mm volume
#: on one core, so it runs on only some of the samples.
AUGMENTATION: dict[str, Any] = {
    "order": ["affine", "shift", "flip", "intensity_scale"],
    "affine": {"transform": "monai.transforms.RandAffine", "prob": 0.3,
               "rotate_range_deg": 3.0, "scale_range": 0.03, "mode": "bilinear",
               "padding_mode": "zeros"},
    "shift": {"transform": "monai.transforms.BorderPad + RandSpatialCrop",
              "max_voxels": 3, "padding": "zeros"},
    "flip": {"transform": "monai.transforms.RandFlip", "prob": 0.5, "spatial_axis": 0,
             "note": "left-right"},
    "intensity_scale": {"transform": "monai.transforms.RandScaleIntensity", "prob": 1.0,
                        "factors": 0.1, "note": "v * (1 + f), f ~ U(-0.1, 0.1)"},
    "seeding": "numpy SeedSequence([seed, epoch, item index]) per sample and transform",
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
            from monai.transforms import (
                BorderPad,
                Compose,
                RandAffine,
                RandFlip,
                RandScaleIntensity,
                RandSpatialCrop,
            )

            p = self.params
            built = {
                "affine": RandAffine(
                    prob=p["affine"]["prob"],
                    rotate_range=(math.radians(p["affine"]["rotate_range_deg"]),) * 3,
                    scale_range=(p["affine"]["scale_range"],) * 3,
                    mode=p["affine"]["mode"], padding_mode=p["affine"]["padding_mode"],
                    device=self.device),
                "shift": Compose([BorderPad(spatial_border=p["shift"]["max_voxels"]),
                                  RandSpatialCrop(roi_size=shape, random_size=False)]),
                "flip": RandFlip(prob=p["flip"]["prob"],
                                 spatial_axis=p["flip"]["spatial_axis"]),
                "intensity_scale": RandScaleIntensity(
                    factors=p["intensity_scale"]["factors"],
                    prob=p["intensity_scale"]["prob"]),
            }
            self._by_shape[shape] = [built[name] for name in p["order"]]
        return self._by_shape[shape]

    def __call__(self, volume: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
        """Augment one ``(C, D, H, W)`` volume; a pure function of its arguments."""
        from monai.utils import convert_to_tensor

        transforms = self._transforms(tuple(volume.shape[1:]))
        seeds = sample_seeds(seed, epoch, index, len(transforms))
        for transform, sub_seed in zip(transforms, seeds, strict=True):
            transform.set_random_state(seed=sub_seed)
            volume = transform(volume)
        return convert_to_tensor(volume, track_meta=False).contiguous()

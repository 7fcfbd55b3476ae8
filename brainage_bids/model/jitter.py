"""Grid-jitter test-time augmentation: the brain resampled onto the template grid N more times.

Why: a network of this size reads sub-voxel detail of the 2 mm input. Measured on IXI012 of
the shipped sample with ``ixi-2mm-v2``: moving the registered brain by 0.25-1 mm moves single
members by 2-7 years and the five-member ensemble by about 1.3 years (SD over shifts), and the
same head stored with a 15-degree rotation in its header lands 0.5 mm (mean) away after
registration and is interpolated along other grid phases, which moved the ensemble by 1.6-2.7
years. Averaging the predictions over a few resamplings whose grid is shifted by a random
sub-voxel offset integrates that phase out.

Each view is a *first* linear resampling from the native brain (never a resampling of the
already resampled MNI image, which blurs: jittering the MNI image with the training
augmentation raised the out-of-fold MAE from 6.85 to 7.3-7.8 years), so every view is an
image like those the model was trained on. The offsets are a fixed, seeded draw, so the same
file gives the same age.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

#: Recorded in a model card's ``inference`` block to switch the jitter on for that model.
GRID_JITTER_KEY = "grid_jitter"
#: What the train level uses for the models it trains (ensembles and single models): 8
#: views, offsets up to half a 2 mm voxel per axis (measured with ixi-2mm-v2, see
#: docs/model-card.md).
DEFAULT_GRID_JITTER: dict[str, Any] = {"n": 8, "max_mm": 1.0, "seed": 0}


def jitter_offsets(n: int, max_mm: float, seed: int) -> np.ndarray:
    """``(n, 3)`` offsets in mm, uniform in ``[-max_mm, max_mm]`` per axis, from ``seed``."""
    if n < 0 or max_mm < 0:
        raise ValueError(f"grid jitter needs n >= 0 and max_mm >= 0, got {n}, {max_mm}")
    return np.random.default_rng(seed).uniform(-max_mm, max_mm, (n, 3))


def resample_views(native: np.ndarray, native_mask: np.ndarray, native_affine: np.ndarray,
                   native_to_ref: np.ndarray, ref_affine: np.ndarray,
                   ref_shape: tuple[int, int, int], offsets: np.ndarray,
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The native brain and mask on the reference grid shifted by each offset (mm, RAS).

    View ``i`` samples the native image at ``native_to_ref^-1 (x + offsets[i])`` for every
    reference voxel centre ``x``, with trilinear interpolation and zeros outside, as
    antsApplyTransforms' linear interpolator does (an offset of zero reproduces the ANTs
    backend's ``brain_mni``); the mask is interpolated the same way and kept where it is above
    one half, and the brain is zero outside it.

    Returns ``(brains, masks)``, each ``(n, *ref_shape)`` (float32 and bool).
    """
    offsets = np.atleast_2d(np.asarray(offsets, dtype=np.float64))
    ijk = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in ref_shape],
                               indexing="ij"), axis=-1).reshape(-1, 3)
    world = ijk @ ref_affine[:3, :3].T + ref_affine[:3, 3]
    to_native = np.linalg.inv(native_affine) @ np.linalg.inv(native_to_ref)
    size = np.asarray(native.shape[:3], dtype=np.float64)
    source = torch.from_numpy(np.stack([np.asarray(native, dtype=np.float32),
                                        np.asarray(native_mask, dtype=np.float32)]))[None]
    views = []
    for offset in offsets:  # one view at a time: a 1 mm head is 2 x 67 MB, copies add up
        points = (world + offset) @ to_native[:3, :3].T + to_native[:3, 3]
        # grid_sample's last axis is (W, H, D) = (k, j, i), normalised so -1 and 1 are the
        # centres of the first and last voxels (align_corners=True)
        normalised = 2.0 * points / np.maximum(size - 1, 1) - 1.0
        grid = torch.from_numpy(np.ascontiguousarray(
            normalised[:, ::-1].reshape(1, *ref_shape, 3), dtype=np.float32))
        with torch.inference_mode():
            views.append(F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros",
                                       align_corners=True)[0].numpy())
    out = np.stack(views) if views else np.zeros((0, 2, *ref_shape), np.float32)
    masks = out[:, 1] > 0.5
    return np.where(masks, out[:, 0], 0.0).astype(np.float32), masks


def jitter_settings(card: dict[str, Any]) -> dict[str, Any] | None:
    """The card's grid-jitter settings (``n``, ``max_mm``, ``seed``), or None when it has none."""
    settings = (card.get("inference") or {}).get(GRID_JITTER_KEY)
    if not isinstance(settings, dict) or int(settings.get("n", 0)) <= 0:
        return None
    return {"n": int(settings["n"]), "max_mm": float(settings["max_mm"]),
            "seed": int(settings.get("seed", 0))}


def jitter_views(brain_native: str | os.PathLike[str], mask_native: str | os.PathLike[str],
                 transform: str | os.PathLike[str], backend: str,
                 settings: dict[str, Any]) -> list[np.ndarray]:
    """The normalised grid-jitter views of one image, from the backend's native outputs.

    ``brain_native`` is the skull-stripped (bias-corrected) brain on the input grid,
    ``mask_native`` its mask, ``transform`` the backend's saved native -> MNI affine; each
    view is normalised with its own mask exactly as the model input is.

    Raises ``ValueError`` naming the file when the inputs cannot be read or do not match.
    """
    import nibabel as nib

    from brainage_bids.model.intensity import normalise_intensity
    from brainage_bids.preproc.transforms import itk_grid_affine, native_to_mni_ras
    from brainage_bids.templates import template_path

    reference = template_path("brain")
    try:
        brain = nib.load(os.fspath(brain_native))
        mask = nib.load(os.fspath(mask_native))
        to_mni = native_to_mni_ras(transform, backend, brain_native, reference)
    except (OSError, ValueError) as err:
        raise ValueError(f"grid jitter: cannot read the native brain, mask or transform "
                         f"({Path(brain_native).name}): {err}") from None
    if brain.shape[:3] != mask.shape[:3]:
        raise ValueError(f"grid jitter: {Path(brain_native).name} {brain.shape} and its mask "
                         f"{mask.shape} differ in shape")
    ref = nib.load(str(reference))
    offsets = jitter_offsets(settings["n"], settings["max_mm"], settings["seed"])
    # the ANTs transform maps points of the frame ANTs gave the image: for a sheared header
    # not the file's own affine (itk_grid_affine); FLIRT's matrix is read against the file
    grid = itk_grid_affine(brain.affine) if backend == "ants" else brain.affine
    brains, masks = resample_views(np.asanyarray(brain.dataobj, dtype=np.float32).reshape(
                                       brain.shape[:3]),
                                   np.asanyarray(mask.dataobj).reshape(mask.shape[:3]) > 0,
                                   grid, to_mni, ref.affine, ref.shape[:3], offsets)
    return [normalise_intensity(b, m) for b, m in zip(brains, masks, strict=True)]

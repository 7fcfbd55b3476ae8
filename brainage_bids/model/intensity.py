"""The intensity normalisation shared by training and prediction.

Training and inference must see identically normalised inputs, so this is the only place it
is defined; the model card records its name and parameters (:data:`NORMALISATION`).
"""

from __future__ import annotations

import numpy as np

#: Recorded in every model card so a model is never fed differently normalised data.
NORMALISATION = {
    "name": "robust-zscore-in-mask",
    "clip_percentiles": [0.5, 99.5],
    "outside_mask": 0.0,
}


def normalise_intensity(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles inside the brain, z-score there, zero elsewhere.

    Scanner intensities are arbitrary (IXI ships uint8, other sites int16 or float), so only
    the within-brain distribution is meaningful; clipping keeps a few hot voxels from setting
    the scale.
    """
    volume = np.asarray(volume, dtype=np.float32)
    inside = np.asarray(mask) > 0
    if volume.shape != inside.shape:
        raise ValueError(f"volume {volume.shape} and mask {inside.shape} differ in shape")
    values = volume[inside]
    if values.size < 100 or not np.isfinite(values).all():
        raise ValueError("the brain mask is (nearly) empty or the image has non-finite values")
    low, high = np.percentile(values, NORMALISATION["clip_percentiles"])
    values = np.clip(values, low, high)
    std = float(values.std())
    if std == 0.0:
        raise ValueError("the image is constant inside the brain mask")
    out = np.zeros(volume.shape, dtype=np.float32)
    out[inside] = (values - float(values.mean())) / std
    return out

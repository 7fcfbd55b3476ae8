"""Input intensity standardisation: the same head gets the same numbers however it is stored.

Scanners and converters store a T1w image as uint8, int16 or float, with any offset and
scale (a background of -100, values multiplied by a rescale slope, ...). The preprocessing
after this step (N4's log-domain fit, the foreground and skull-stripped detectors that rely
on exact zeros, registration histograms) is not invariant to those choices, and measured on a
real IXI head an offset of -100 moved the predicted age by 16 years. So the validated input
is mapped once, before anything else looks at its values, to a fixed scale:

    standardised = 1000 * max(x - p_low, 0) / p_high

where ``p_low`` is a low percentile of all voxels (the background of a head, or the zeros
around a skull-stripped brain) and ``p_high`` a high percentile of what is above it. Both
are equivariant under ``x -> a * x + b`` (``a > 0``), so the result is the same for every such
storage of the same values, up to float rounding, and background stays exactly zero. A
background value above ``p_low`` (a brain z-scored inside its mask, background 0) is set to
exactly zero as well.
"""

from __future__ import annotations

import numpy as np

#: Recorded with the preprocessing (QC JSON and model card) so a reader knows the scale.
INPUT_STANDARDISATION = {
    "name": "percentile-affine",
    "low_percentile": 0.1,
    "high_percentile": 99.5,
    "scale": 1000.0,
}


def standardise_intensity(data: np.ndarray) -> np.ndarray:
    """Map intensities to ``[0, ~1000]``, invariant to a positive affine change of storage.

    Raises ``ValueError`` when nothing is left above the low percentile (a constant image).
    """
    values = np.asarray(data, dtype=np.float64)
    low = float(np.percentile(values, INPUT_STANDARDISATION["low_percentile"]))
    shifted = np.clip(values - low, 0.0, None)
    above = shifted[shifted > 0]
    if above.size == 0:
        raise ValueError("no intensity above the background: the image is constant")
    high = float(np.percentile(above, INPUT_STANDARDISATION["high_percentile"]))
    out = (shifted * (INPUT_STANDARDISATION["scale"] / high)).astype(np.float32)
    background = _constant_background(values)
    if background is not None and background > low:
        # a skull-stripped brain with values below its background (z-scored inside the
        # mask, background 0): the background would become a positive plateau, and the
        # steps that recognise a stripped brain by its exact zeros would take it for a head
        out[values == background] = 0.0
    return out


#: The share of voxels of one exact value that makes it the background (a stripped brain's
#: zeros fill 60-80 % of its grid; a head with a noisy background has no such value).
BACKGROUND_MIN_FRACTION = 0.3


def _constant_background(values: np.ndarray) -> float | None:
    """The value that at least :data:`BACKGROUND_MIN_FRACTION` of the voxels share, if any.

    Found on every 7th voxel, then counted on all: the same voxels whatever the storage, so
    the answer is equivariant like the percentiles.
    """
    candidates, counts = np.unique(values.ravel()[::7], return_counts=True)
    value = float(candidates[counts.argmax()])
    return value if float(np.mean(values == value)) >= BACKGROUND_MIN_FRACTION else None

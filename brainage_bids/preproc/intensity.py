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
storage of the same values, up to float rounding, and background stays exactly zero.
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
    return (shifted * (INPUT_STANDARDISATION["scale"] / high)).astype(np.float32)

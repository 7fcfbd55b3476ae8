"""How far an input's intensities lie from what the model was trained on (a QC measure).

The network reads normalised intensities, and the normalisation (a robust z-score inside
the brain, :mod:`brainage_bids.model.intensity`) removes an offset and a scale, nothing
more. A scan whose within-brain intensity *distribution* differs from the training inputs
has a shape the model has never seen. Measured on the four heads of the shipped sample with
``ixi-2mm-v2``, a head's predicted age moved by up to 9 years when its contrast was changed so
that white matter is brighter relative to grey matter, up to 6 when its grey levels were
posterised to 8, and up to 6 when 1 % of its voxels were bright speckle
(``docs/model-card.md``). The registration QC passes all of them.

So the model card keeps the training inputs' intensity distribution (``input_reference``):
the mean over the training images of the 99 percentiles (1-99) of their normalised
intensities inside the brain mask. An image's ``intensity_distance`` is the mean absolute
difference between its percentiles and the reference's: a 1-Wasserstein distance between
the two distributions on the percentile grid, in units of the within-brain SD. The reference
also keeps every training image's leave-one-out distance. An image fails the check when its
distance exceeds ``THRESHOLD_FACTOR`` times the largest of them. The threshold is set
from the training images alone, never from the failures it is meant to catch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

#: The percentiles compared (as fractions).
LEVELS = np.round(np.linspace(0.01, 0.99, 99), 2)
#: An image fails when its distance exceeds this many times the largest training image's
#: leave-one-out distance.
THRESHOLD_FACTOR = 1.5
#: Fewest training images for a reference (a leave-one-out maximum needs a few).
MIN_IMAGES = 5


def input_quantiles(volume: np.ndarray, mask: np.ndarray,
                    levels: Sequence[float] = LEVELS) -> np.ndarray:
    """The percentiles (``levels``, fractions) of a normalised volume inside its brain mask."""
    inside = np.asarray(mask) > 0
    values = np.asarray(volume, dtype=np.float64)[inside]
    if values.size == 0:
        raise ValueError("the brain mask is empty")
    return np.quantile(values, np.asarray(levels, dtype=np.float64))


def distance(quantiles: Sequence[float], reference: Sequence[float]) -> float:
    """Mean absolute difference of two percentile vectors (a 1-Wasserstein distance)."""
    a, b = np.asarray(quantiles, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"percentile vectors differ in length ({a.size} and {b.size})")
    return float(np.mean(np.abs(a - b)))


def fit_reference(quantiles: Iterable[Sequence[float]]) -> dict[str, Any]:
    """The card's ``input_reference`` from the training images' percentiles."""
    stack = np.asarray(list(quantiles), dtype=float)
    n = len(stack)
    if n < MIN_IMAGES:
        raise ValueError(f"an input reference needs at least {MIN_IMAGES} images, got {n}")
    mean = stack.mean(axis=0)
    loo = np.array([distance(stack[i], (mean * n - stack[i]) / (n - 1)) for i in range(n)])
    return {
        "measure": "intensity_distance",
        "levels": [float(v) for v in LEVELS],
        "quantiles": [round(float(v), 5) for v in mean],
        "n_images": n,
        "distance_leave_one_out": {"median": round(float(np.median(loo)), 4),
                                   "p95": round(float(np.percentile(loo, 95)), 4),
                                   "max": round(float(loo.max()), 4)},
        "threshold": round(THRESHOLD_FACTOR * float(loo.max()), 4),
        "threshold_rule": f"{THRESHOLD_FACTOR} x the largest leave-one-out distance of the "
                          "training images",
    }


def intensity_check(volume: np.ndarray, mask: np.ndarray,
                    reference: dict[str, Any] | None) -> dict[str, Any]:
    """QC entries for a normalised input: ``intensity_distance`` and whether it is within the
    card's threshold (``intensity_distance_ok``); empty when the card has no reference."""
    if not reference:
        return {}
    try:  # the card's own percentile levels: a card stays readable if LEVELS ever changes
        levels = np.asarray(reference["levels"], dtype=np.float64)
        quantiles = np.asarray(reference["quantiles"], dtype=np.float64)
        threshold = float(reference["threshold"])
        if levels.shape != quantiles.shape or levels.ndim != 1 or not (
                np.all((levels >= 0) & (levels <= 1)) and np.isfinite(quantiles).all()):
            raise ValueError("levels and quantiles must be equally long lists, levels in 0-1")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the model card's input_reference is malformed: {exc}") from exc
    value = distance(input_quantiles(volume, mask, levels), quantiles)
    return {"intensity_distance": round(value, 4),
            "intensity_distance_ok": bool(value <= threshold)}

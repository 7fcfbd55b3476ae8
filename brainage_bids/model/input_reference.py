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
also keeps every training image's leave-one-out distance (each image against the mean of the
other participants' images, so a participant's other sessions do not stand in for it). An
image fails the check when its distance exceeds ``THRESHOLD_FACTOR`` times the largest of
them. The threshold is set from the training images alone, never from the failures it is
meant to catch.
"""

from __future__ import annotations

import os
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


def image_quantiles(image: str | os.PathLike[str], mask: str | os.PathLike[str],
                    levels: Sequence[float] = LEVELS) -> np.ndarray:
    """An input file's percentiles, normalised exactly as training and prediction read it.

    Raises ``ValueError`` naming the file when either cannot be read or used.
    """
    import nibabel as nib

    from brainage_bids.model.data import read_volume

    volume = read_volume(image, mask)  # reads and checks both files
    inside = np.squeeze(np.asanyarray(nib.load(os.fspath(mask)).dataobj))
    return input_quantiles(volume, inside, levels)


def distance(quantiles: Sequence[float], reference: Sequence[float]) -> float:
    """Mean absolute difference of two percentile vectors (a 1-Wasserstein distance)."""
    a, b = np.asarray(quantiles, dtype=float), np.asarray(reference, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"percentile vectors differ in length ({a.size} and {b.size})")
    return float(np.mean(np.abs(a - b)))


def fit_reference(quantiles: Iterable[Sequence[float]],
                  groups: Sequence[str] | None = None) -> dict[str, Any]:
    """The card's ``input_reference`` from the training images' percentiles.

    ``groups`` names each image's participant (default: one participant per image): an
    image's leave-one-out distance leaves out every image of its participant.
    """
    stack = np.asarray(list(quantiles), dtype=float)
    n = len(stack)
    groups = np.asarray(list(groups) if groups is not None else range(n)).astype(str)
    if len(groups) != n:
        raise ValueError(f"{len(groups)} participant labels for {n} images")
    if len(set(groups)) < MIN_IMAGES:
        raise ValueError(f"an input reference needs at least {MIN_IMAGES} participants, "
                         f"got {len(set(groups))}")
    mean = stack.mean(axis=0)
    loo = np.array([distance(stack[i], stack[groups != groups[i]].mean(axis=0))
                    for i in range(n)])
    return {
        "measure": "intensity_distance",
        "levels": [float(v) for v in LEVELS],
        "quantiles": [round(float(v), 5) for v in mean],
        "n_images": n,
        "n_participants": len(set(groups)),
        "distance_leave_one_out": {"median": round(float(np.median(loo)), 4),
                                   "p95": round(float(np.percentile(loo, 95)), 4),
                                   "max": round(float(loo.max()), 4)},
        "threshold": round(THRESHOLD_FACTOR * float(loo.max()), 4),
        "threshold_rule": f"{THRESHOLD_FACTOR} x the largest leave-one-out distance of the "
                          "training images",
    }


def check_reference(reference: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """A card's ``input_reference`` as ``(levels, quantiles, threshold)``; ``ValueError``
    saying what is wrong when it is malformed (:func:`~brainage_bids.model.weights.read_card`
    checks it when the model is loaded, before any image is preprocessed). The card's own
    levels are used, so a card stays readable if :data:`LEVELS` ever changes."""
    try:
        levels = np.asarray(reference["levels"], dtype=np.float64)
        quantiles = np.asarray(reference["quantiles"], dtype=np.float64)
        threshold = float(reference["threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the model card's input_reference is malformed: {exc!r}") from exc
    problems = []
    if levels.ndim != 1 or levels.size == 0 or levels.shape != quantiles.shape:
        problems.append("levels and quantiles must be non-empty lists of one length")
    elif not (np.all((levels >= 0) & (levels <= 1)) and np.isfinite(quantiles).all()):
        problems.append("levels must lie in 0-1 and quantiles be finite")
    if not (np.isfinite(threshold) and threshold > 0):
        problems.append(f"the threshold must be a positive number, not {threshold}")
    if problems:
        raise ValueError(f"the model card's input_reference is malformed: {'; '.join(problems)}")
    return levels, quantiles, threshold


def intensity_check(volume: np.ndarray, mask: np.ndarray,
                    reference: dict[str, Any] | None) -> dict[str, Any]:
    """QC entries for a normalised input: ``intensity_distance`` and whether it is within the
    card's threshold (``intensity_distance_ok``); empty when the card has no reference."""
    if not reference:
        return {}
    levels, quantiles, threshold = check_reference(reference)
    value = distance(input_quantiles(volume, mask, levels), quantiles)
    return {"intensity_distance": round(value, 4),
            "intensity_distance_ok": bool(value <= threshold)}

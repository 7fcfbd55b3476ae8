"""Registration QC for any backend: compares the model's input with the template.

Only NIfTI files on the template grid are read (no ANTs, no FSL), so the same numbers come out
of the ``ants`` and ``fsl`` backends and a failed registration is flagged the same way.

Measures
--------
``dice_template``
    Dice of the registered brain mask with the template brain mask (ventricle holes filled,
    as every skull strip includes the ventricles). An affine cannot make two brains identical,
    so good registrations sit around 0.96-0.98; a flipped or displaced brain falls lower.
``correlation``
    Pearson correlation of the registered brain with the template brain inside the template
    mask: it sees misalignment of the internal anatomy (ventricles, grey/white boundaries)
    that a mask overlap cannot.
``mask_volume_ml``
    Volume of the brain mask in the input's space, when given: a skull strip that kept the
    skull or lost part of the brain shows here.

Thresholds (``QC_MIN_DICE``, ``QC_MIN_CORRELATION``, ``QC_NATIVE_VOLUME_ML``) come from
measurements on real data (``benchmarks/preproc_accuracy.py``, ``ants`` backend with N4):

==========================================  ============  ===========
case                                         Dice          correlation
==========================================  ============  ===========
40 IXI heads (2 mm, 3T)                      0.962-0.978   0.525-0.652
Colin27 head / ch2bet (a BET mask)           0.971 / 0.961 0.651 / 0.576
IXI head without bias correction             0.965         0.50
good result moved 4 mm / rotated 5 degrees   0.94-0.95     0.43-0.58
moved 8 mm                                   0.90-0.91     0.30-0.40
moved 10 mm / rotated 15 degrees             0.88 / 0.90   0.29 / 0.36
upside down / upside-down input registered   0.79 / 0.94   0.25 / 0.20
==========================================  ============  ===========

so a registration passes with Dice >= 0.90 and correlation >= 0.40: every real result passes,
and gross failures (10 mm or 15 degrees or more, a flip) are flagged, as are most 8 mm shifts.
Smaller errors (4 mm, 10 degrees) pass: the thresholds catch failures, they do not grade
accuracy. The correlation is lower without bias correction (the ``fsl`` backend has none),
hence the margin below the lowest real value.
"""

from __future__ import annotations

import os
from functools import lru_cache

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brainage_bids.templates import GRID_SHAPE, template_path

#: Smallest Dice of the registered mask with the template mask for a passing registration.
QC_MIN_DICE = 0.90
#: Smallest correlation of the registered brain with the template brain.
QC_MIN_CORRELATION = 0.40
#: Plausible adult brain-mask volume in native space (ml); outside means a failed strip.
QC_NATIVE_VOLUME_ML = (700.0, 2600.0)

PathLike = str | os.PathLike[str]


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Template affine, brain, brain mask and hole-filled brain mask (read once)."""
    mask_img = nib.load(str(template_path("brain", "mask")))
    mask = np.asarray(mask_img.dataobj) > 0
    brain = np.asarray(nib.load(str(template_path("brain"))).dataobj, dtype=np.float64)
    return mask_img.affine, brain, mask, ndi.binary_fill_holes(mask)


def _load_on_grid(path: PathLike, affine: np.ndarray) -> np.ndarray:
    img = nib.load(str(path))
    data = np.squeeze(np.asanyarray(img.dataobj)).astype(np.float64)
    if data.shape != GRID_SHAPE or not np.allclose(img.affine, affine, atol=1e-3):
        raise ValueError(f"{os.path.basename(path)}: not on the template grid "
                         f"(shape {data.shape}, expected {GRID_SHAPE} with the template affine)")
    return data


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two boolean masks (0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * float(np.logical_and(a, b).sum()) / total if total else 0.0


def registration_qc(brain_mni: PathLike, mask_mni: PathLike,
                    mask_native: PathLike | None = None) -> dict[str, float | bool]:
    """Measure how well a skull-stripped brain sits on the template; see the module notes.

    Returns floats (``dice_template``, ``correlation``, ``mask_mni_volume_ml`` and, with
    ``mask_native``, ``mask_volume_ml``), one boolean per check (``*_ok``) and ``qc_pass``,
    which is true only when every check passes.
    """
    affine, tpl_brain, tpl_mask, tpl_mask_filled = _template()
    brain = _load_on_grid(brain_mni, affine)
    mask = _load_on_grid(mask_mni, affine) > 0.5
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0

    inside = brain[tpl_mask]
    flat = np.ptp(inside) == 0  # an empty or constant brain has no correlation
    corr = 0.0 if flat else float(np.corrcoef(inside, tpl_brain[tpl_mask])[0, 1])
    qc: dict[str, float | bool] = {
        "dice_template": round(dice(mask, tpl_mask_filled), 4),
        "correlation": round(corr, 4),
        "mask_mni_volume_ml": round(float(mask.sum()) * voxel_ml, 1),
    }
    qc["dice_template_ok"] = bool(qc["dice_template"] >= QC_MIN_DICE)
    qc["correlation_ok"] = bool(qc["correlation"] >= QC_MIN_CORRELATION)
    checks = [qc["dice_template_ok"], qc["correlation_ok"]]
    if mask_native is not None:
        native = nib.load(str(mask_native))
        native_ml = float((np.asanyarray(native.dataobj) > 0).sum()) * float(
            np.prod(native.header.get_zooms()[:3])) / 1000.0
        qc["mask_volume_ml"] = round(native_ml, 1)
        qc["mask_volume_ok"] = bool(QC_NATIVE_VOLUME_ML[0] <= native_ml <= QC_NATIVE_VOLUME_ML[1])
        checks.append(qc["mask_volume_ok"])
    qc["qc_pass"] = bool(all(checks))
    return qc

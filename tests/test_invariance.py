"""The same head stored differently gets the same age (issue: invariance), on a real head.

One real IXI head (the shipped sample's IXI012) is written four ways into a small BIDS
dataset: as shipped (scaled uint8), int16 with every stored value minus 100 (a negative
background), float32 times 0.37, and with a 15-degree rotation about the head's centre
written into its header (voxels untouched). The participant level runs on all four with the
default model; a second run of the original with a fresh work directory and other thread
counts must repeat its prediction. The four storages must also get the same intensity QC,
and a fifth copy whose contrast really differs (white matter brighter relative to grey
matter, as on another scanner) must fail it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.cli.run import main
from tests.conftest import SAMPLE

SOURCE = SAMPLE / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
#: Largest move of the predicted age allowed between storages of the same head (years).
TOLERANCE_Y = 1.0


def rotated_about_centre(img: nib.Nifti1Image, degrees: float) -> np.ndarray:
    """The affine of ``img`` rotated about the head's centre (left-right axis)."""
    a = np.deg2rad(degrees)
    rotation = np.eye(4)
    rotation[1:3, 1:3] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    centre = img.affine @ np.r_[(np.array(img.shape[:3]) - 1) / 2, 1]
    shift = np.eye(4)
    shift[:3, 3] = centre[:3]
    return shift @ rotation @ np.linalg.inv(shift) @ img.affine


def _variants(img: nib.Nifti1Image) -> dict[str, nib.Nifti1Image]:
    raw = np.asanyarray(img.dataobj.get_unscaled())
    offset = nib.Nifti1Image(raw.astype(np.int16) - 100, img.affine)
    offset.header.set_slope_inter(img.dataobj.slope, 0)  # the same values, minus 100 stored
    scaled = nib.Nifti1Image((np.asanyarray(img.dataobj) * 0.37).astype(np.float32),
                             img.affine)
    rotated = nib.Nifti1Image(raw, rotated_about_centre(img, 15.0), img.header)
    values = np.asanyarray(img.dataobj, dtype=np.float64)
    contrast = nib.Nifti1Image(np.round(255 * (values / values.max()) ** 2).astype(np.uint8),
                               img.affine)  # gamma 2: another contrast, not another storage
    return {"orig": img, "offset": offset, "scale": scaled, "rot": rotated, "gamma": contrast}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """Predicted age of every storage (and of the rerun), and every variant's QC (``qc``)."""
    root = tmp_path_factory.mktemp("inv")
    bids = root / "bids"
    bids.mkdir()
    shutil.copy(SAMPLE / "dataset_description.json", bids)
    img = nib.load(SOURCE)
    rows = ["participant_id\tage"]
    for name, variant in _variants(img).items():
        anat = bids / f"sub-{name}" / "anat"
        anat.mkdir(parents=True)
        nib.save(variant, anat / f"sub-{name}_T1w.nii.gz")
        rows.append(f"sub-{name}\t38.78")
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    out = root / "out"
    assert main([str(bids), str(out), "participant", "-w", str(root / "work"), "--nprocs", "2",
                 "--omp-nthreads", "1", "--no-reports", "--no-saliency"]) == 0
    ages = {name: _age(out, name) for name in ("orig", "offset", "scale", "rot")}
    ages["qc"] = {name: _record(out, name)["qc"] for name in _variants(img)}
    again = root / "again"  # fresh work dir, other thread counts
    assert main([str(bids), str(again), "participant", "--participant-label", "orig",
                 "-w", str(root / "work2"), "--nprocs", "1", "--omp-nthreads", "2",
                 "--no-reports", "--no-saliency"]) == 0
    ages["rerun"] = _age(again, "orig")
    (root / "ages.json").write_text(json.dumps(ages))
    return ages


def _record(out: Path, name: str) -> dict:
    return json.loads((out / f"sub-{name}" / "anat" / f"sub-{name}_brainage.json").read_text())


def _age(out: Path, name: str) -> float:
    return float(_record(out, name)["predicted_age"])


@pytest.mark.slow
def test_fresh_rerun_repeats_the_prediction(runs):
    assert abs(runs["rerun"] - runs["orig"]) <= 0.01, runs


@pytest.mark.slow
def test_intensity_scale_does_not_change_the_age(runs):
    assert abs(runs["scale"] - runs["orig"]) < TOLERANCE_Y, runs


#: Measured with ixi-2mm-v2 and its grid jitter (8 views): offset -0.44, scale -0.43, rotation
#: -0.36 years on this head; without the jitter the offset moved it 1.03 years and the
#: rotation 2.66 (docs/model-card.md).
@pytest.mark.slow
def test_intensity_offset_does_not_change_the_age(runs):
    assert abs(runs["offset"] - runs["orig"]) < TOLERANCE_Y, runs


@pytest.mark.slow
def test_header_rotation_does_not_change_the_age(runs):
    assert abs(runs["rot"] - runs["orig"]) < TOLERANCE_Y, runs


#: Measured with ixi-2mm-v2's reference (threshold 0.162): IXI012 0.0443, offset 0.0445,
#: scale 0.0444, rotation 0.0558 (registered and interpolated along another grid phase), its
#: gamma-2 copy 0.244 (docs/evaluation/input-reference-v2.json). A storage may move the
#: distance by an eighth of the threshold at most.
@pytest.mark.slow
def test_storage_keeps_the_intensity_qc_and_another_contrast_fails_it(runs):
    qc = runs["qc"]
    distances = {name: qc[name]["intensity_distance"] for name in ("orig", "offset", "scale",
                                                                   "rot")}
    assert max(distances.values()) - min(distances.values()) < 0.02, distances
    assert all(qc[name]["intensity_distance_ok"] and qc[name]["qc_pass"] for name in distances)
    assert not qc["gamma"]["intensity_distance_ok"], qc["gamma"]
    assert qc["gamma"]["qc_pass"] is False
    assert qc["gamma"]["dice_template_ok"]  # the registration is fine: only the intensities

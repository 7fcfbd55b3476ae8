"""Grid-jitter test-time augmentation: resampling, offsets, settings, FLIRT matrices, averaging.

The resampling against antsApplyTransforms on a real registration is in
tests/test_preproc_ants.py; the invariance it buys is in tests/test_invariance.py.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from torch import nn

from brainage_bids.model.jitter import (
    jitter_offsets,
    jitter_settings,
    jitter_views,
    resample_views,
)
from brainage_bids.model.predict import predict_age, predict_brain_age
from brainage_bids.preproc.transforms import flirt_to_ras, fsl_coordinates
from brainage_bids.templates import template_path


def _oblique(rng: np.random.Generator) -> np.ndarray:
    """A voxel-to-world affine with 1.2 x 0.9 x 1.5 mm voxels, rotated, shifted."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    affine = np.eye(4)
    affine[:3, :3] = q @ np.diag([1.2, 0.9, 1.5])
    affine[:3, 3] = [-20.0, -25.0, -15.0]
    return affine


def test_views_are_trilinear_samples_at_the_shifted_points() -> None:
    rng = np.random.default_rng(3)
    native = rng.random((30, 34, 28)).astype(np.float32)
    mask = np.zeros(native.shape, bool)
    mask[4:26, 5:29, 4:24] = True
    native_affine = _oblique(rng)
    to_ref = np.eye(4)
    to_ref[:3, :3] = np.eye(3) + rng.normal(scale=0.05, size=(3, 3))
    to_ref[:3, 3] = rng.normal(scale=2.0, size=3)
    shape = (14, 16, 12)
    centre = to_ref @ native_affine @ np.r_[(np.array(native.shape) - 1) / 2, 1.0]
    ref_affine = np.diag([2.0, 2.0, 2.0, 1.0])
    ref_affine[:3, 3] = centre[:3] - (np.array(shape) - 1)
    offsets = np.array([[0.0, 0.0, 0.0], [0.7, -0.4, 0.9]])
    brains, masks = resample_views(native, mask, native_affine, to_ref, ref_affine, shape,
                                   offsets)
    assert brains.shape == masks.shape == (2, *shape)
    ijk = np.argwhere(np.ones(shape, bool))
    for view, offset in enumerate(offsets):
        world = nib.affines.apply_affine(ref_affine, ijk) + offset
        points = nib.affines.apply_affine(np.linalg.inv(native_affine) @ np.linalg.inv(to_ref),
                                          world).T
        expected = ndi.map_coordinates(native, points, order=1, cval=0.0).reshape(shape)
        expected_mask = ndi.map_coordinates(mask.astype(np.float32), points, order=1,
                                            cval=0.0).reshape(shape) > 0.5
        agree = masks[view] == expected_mask
        assert expected_mask.mean() > 0.3  # the grids overlap on the brain
        assert agree.mean() > 0.995  # only voxels at exactly one half may differ
        both = masks[view] & expected_mask
        assert np.allclose(brains[view][both], expected[both], atol=1e-4)
        assert not brains[view][~masks[view]].any()
    assert not np.allclose(brains[0], brains[1])


def test_offsets_are_seeded_and_bounded() -> None:
    a = jitter_offsets(8, 1.0, 0)
    assert a.shape == (8, 3)
    assert np.abs(a).max() <= 1.0
    assert np.array_equal(a, jitter_offsets(8, 1.0, 0))
    assert not np.array_equal(a, jitter_offsets(8, 1.0, 1))
    assert jitter_offsets(0, 1.0, 0).shape == (0, 3)
    with pytest.raises(ValueError, match="grid jitter"):
        jitter_offsets(-1, 1.0, 0)


def test_jitter_settings_come_from_the_card() -> None:
    assert jitter_settings({}) is None
    assert jitter_settings({"inference": {"flip_tta": True}}) is None
    assert jitter_settings({"inference": {"grid_jitter": {"n": 0, "max_mm": 1.0}}}) is None
    card = {"inference": {"grid_jitter": {"n": 8, "max_mm": 1.0, "seed": 0, "note": "x"}}}
    assert jitter_settings(card) == {"n": 8, "max_mm": 1.0, "seed": 0}


def _mirrored(img: nib.Nifti1Image) -> nib.Nifti1Image:
    """The same world image with its voxels stored in the opposite x order."""
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, img.shape[0] - 1
    return nib.Nifti1Image(np.asanyarray(img.dataobj)[::-1], img.affine @ flip)


def test_flirt_identity_between_mirrored_storages_is_the_identity() -> None:
    """FSL coordinates mirror x for a positive-determinant affine: the same brain stored
    RAS (det > 0) and LAS (det < 0, FSL's own MNI152 files) has the identity FLIRT matrix,
    and the converted world map is the identity too."""
    ras = nib.load(template_path("brain"))
    assert np.linalg.det(ras.affine[:3, :3]) > 0
    template = _mirrored(ras)  # the same world, voxels stored right to left
    assert np.linalg.det(template.affine[:3, :3]) < 0
    data = np.asanyarray(template.dataobj)
    assert np.array_equal(np.asanyarray(ras.dataobj), data[::-1])
    # a voxel's FSL coordinates are the same in both storages
    voxel = np.array([10.0, 20.0, 30.0, 1.0])
    mirrored = np.array([data.shape[0] - 1 - 10.0, 20.0, 30.0, 1.0])
    assert np.allclose(fsl_coordinates(template) @ voxel, fsl_coordinates(ras) @ mirrored)
    assert np.allclose(flirt_to_ras(np.eye(4), ras, template), np.eye(4), atol=1e-9)


def test_flirt_matrix_maps_world_points_like_flirt() -> None:
    """A FLIRT matrix that scales FSL coordinates by 1.1 about the origin maps world points
    through the same scaling expressed in each image's FSL frame."""
    ras = nib.load(template_path("brain"))
    template = _mirrored(ras)
    flirt = np.diag([1.1, 1.1, 1.1, 1.0])
    world = flirt_to_ras(flirt, ras, template)
    voxel = np.array([12.0, 50.0, 40.0, 1.0])
    fsl_in = fsl_coordinates(ras) @ voxel
    ref_voxel = np.linalg.inv(fsl_coordinates(template)) @ (flirt @ fsl_in)
    assert np.allclose(world @ (ras.affine @ voxel), template.affine @ ref_voxel)


@pytest.mark.parametrize(("backend", "content"), [("ants", b"garbage"),
                                                  ("fsl", b"1 2 3\n"), ("fsl", b"a b\n")])
def test_a_damaged_transform_is_one_clear_error(tmp_path, backend: str, content: bytes) -> None:
    """The grid jitter of one image fails with the file's name and the reason, no traceback."""
    brain = tmp_path / "sub-01_desc-preproc_T1w.nii.gz"
    mask = tmp_path / "sub-01_desc-brain_mask.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), brain)
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.uint8), np.eye(4)), mask)
    transform = tmp_path / "sub-01_xfm.mat"
    transform.write_bytes(content)
    with pytest.raises(ValueError, match=r"grid jitter: cannot read .*sub-01_xfm\.mat"):
        jitter_views(brain, mask, transform, backend, {"n": 2, "max_mm": 1.0, "seed": 0})


class _MeanAge(nn.Module):
    """Age = 40 + 10 * mean intensity, with a dropout the MC samples can switch on."""

    def __init__(self) -> None:
        super().__init__()
        self.dropout = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 40.0 + 10.0 * self.dropout(x).mean(dim=(1, 2, 3, 4))[:, None]


def test_views_are_averaged_into_the_prediction() -> None:
    model = _MeanAge()
    base = np.zeros((8, 8, 8), np.float32)
    views = [base + 1.0, base + 2.0]
    alone = predict_age(model, base, mc_samples=4)
    assert alone["predicted_age"] == pytest.approx(40.0)
    assert alone["n_views"] == 1 and alone["view_sd"] == 0.0
    with_views = predict_age(model, base, mc_samples=4, views=views, flip_tta=True,
                             mc_batch_size=1)
    assert with_views["predicted_age"] == pytest.approx(np.mean([40.0, 50.0, 60.0]))
    assert with_views["n_views"] == 3
    assert with_views["view_sd"] == pytest.approx(10.0)
    assert with_views["mc_mean"] == pytest.approx(alone["mc_mean"])  # MC on the volume only
    ensemble = predict_brain_age(model, base, mc_samples=2, views=views)
    assert ensemble["n_views"] == 3 and ensemble["view_sd"] == pytest.approx(10.0)

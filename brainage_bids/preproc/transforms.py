"""Each backend's native -> MNI affine as one 4x4 matrix in world (RAS mm) coordinates.

The ANTs backend stores an ITK ``.mat`` (template LPS point -> input LPS point), the FSL one a
FLIRT matrix (input FSL coordinates -> template FSL coordinates). Grid-jitter inference
(:mod:`brainage_bids.model.jitter`) needs the map from input points to template points in mm,
whichever backend made it; this module reads both without importing antspyx or FSL.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _nearest_rotation(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An affine's voxel sizes, its direction (columns of length 1) and the rotation nearest
    that direction (as nibabel finds it for the qform)."""
    linear = np.asarray(affine, dtype=float)[:3, :3]
    zooms = np.linalg.norm(linear, axis=0)
    direction = linear / zooms
    u, _, vt = np.linalg.svd(direction)
    return zooms, direction, u @ vt


def has_shear(affine: np.ndarray, atol: float = 1e-4) -> bool:
    """Whether a voxel-to-world affine's columns are not orthogonal (a rotation cannot hold it)."""
    _, direction, rotation = _nearest_rotation(affine)
    return not np.allclose(direction, rotation, atol=atol)


def itk_grid_affine(affine: np.ndarray) -> np.ndarray:
    """The RAS voxel-to-world affine that ITK, and so ANTs, gives an image with ``affine``.

    ITK stores spacing, origin and a direction that must be a rotation, so it cannot hold a
    shear: its direction is then the nearest rotation (as nibabel does for the qform). Without
    a shear (:func:`has_shear`) this is ``affine`` itself. Points mapped by an ANTs transform
    of the image live in this frame, so anything that composes with that transform must use
    it too.
    """
    affine = np.asarray(affine, dtype=float)
    if not has_shear(affine):
        return affine
    zooms, _, rotation = _nearest_rotation(affine)
    out = affine.copy()
    out[:3, :3] = rotation * zooms
    return out


def read_itk_affine(path: str | os.PathLike[str]) -> np.ndarray:
    """4x4 of an ITK affine ``.mat`` (MATLAB v4, as antsRegistration writes it), in LPS:
    fixed-space point -> moving-space point."""
    from scipy.io import loadmat

    try:
        data = loadmat(os.fspath(path))
    except Exception as err:  # scipy raises MatReadError, ValueError, ... for damaged files
        raise ValueError(f"{Path(path).name}: cannot be read as an ITK transform: {err}") from None
    key = next((k for k in data if k.startswith(("AffineTransform_", "MatrixOffsetTransform"))),
               None)
    if key is None or "fixed" not in data:
        raise ValueError(f"{Path(path).name}: not an ITK affine transform file")
    return itk_matrix(np.asarray(data[key], dtype=float).ravel(),
                      np.asarray(data["fixed"], dtype=float).ravel())


def itk_matrix(params: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """4x4 of an ITK affine's 12 parameters (matrix, translation) about its fixed centre."""
    matrix = np.asarray(params[:9], dtype=float).reshape(3, 3)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = np.asarray(params[9:12]) + centre - matrix @ centre
    return out


def itk_to_ras(fixed_to_moving_lps: np.ndarray) -> np.ndarray:
    """ANTs' template -> input (LPS) affine as the input -> template map in RAS mm."""
    return np.linalg.inv(_RAS_TO_LPS @ fixed_to_moving_lps @ _RAS_TO_LPS)


def fsl_coordinates(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """Voxel -> FSL coordinates: voxels scaled by their size, x mirrored when the voxel-to-world
    affine has a positive determinant (FSL's radiological convention; Jenkinson's
    FLIRT coordinate notes, as in Ridgway's flirtmat2worldmat)."""
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=float)
    out = np.diag([*zooms, 1.0])
    if np.linalg.det(img.affine[:3, :3]) > 0:
        out[0, 0] = -zooms[0]
        out[0, 3] = (img.shape[0] - 1) * zooms[0]
    return out


def flirt_to_ras(flirt: np.ndarray, in_img: nib.spatialimages.SpatialImage,
                 ref_img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """A FLIRT matrix (``-in`` -> ``-ref``) as the input -> reference map in world mm."""
    return (ref_img.affine @ np.linalg.inv(fsl_coordinates(ref_img)) @ np.asarray(flirt)
            @ fsl_coordinates(in_img) @ np.linalg.inv(in_img.affine))


def native_to_mni_ras(transform: str | os.PathLike[str], backend: str,
                      native: str | os.PathLike[str], reference: str | os.PathLike[str],
                      ) -> np.ndarray:
    """The ``backend``'s saved transform as input -> template world mm (4x4).

    ``native`` is the image the backend registered (its grid defines FLIRT's coordinates),
    ``reference`` the template it registered to.
    """
    if backend == "ants":
        return itk_to_ras(read_itk_affine(transform))
    if backend == "fsl":
        try:
            flirt = np.loadtxt(os.fspath(transform), ndmin=2)
        except ValueError as err:
            raise ValueError(f"{Path(transform).name}: not a FLIRT matrix: {err}") from None
        if flirt.shape != (4, 4) or not np.isfinite(flirt).all():
            raise ValueError(f"{Path(transform).name}: not a FLIRT matrix (a 4x4 of numbers)")
        return flirt_to_ras(flirt, nib.load(os.fspath(native)), nib.load(os.fspath(reference)))
    raise ValueError(f"unknown preprocessing backend {backend!r}")

"""The pure-pip preprocessing backend: N4, template-based skull strip, 12-dof affine to MNI.

Everything here is a pure function from files to files, built on antspyx, nibabel, numpy and
scipy, so that the app runs on a fresh machine without FSL. The target is the model's input
grid, MNI152NLin6Asym 2 mm (FSL's MNI152 2 mm grid, 91 x 109 x 91).

Why the pipeline looks the way it does:

* Like is matched with like. An affine of a head to the *brain* template fails (the skull
  pulls the brain outwards), so a head is first registered to the head template, the template
  brain mask is brought back to the head through a short, low-resolution SyN (an affine alone
  leaves the mask a few millimetres off where skull and brain meet), and only then is the
  stripped brain registered to the brain template, starting from the head affine.
* Registration runs on a 2 mm copy of the input. The template is 2 mm, so finer input voxels
  add no information to the metric, while ANTs computes the moving image's gradient at full
  resolution on every level: a 1 mm input costs five times more for the same answer. The final
  resampling onto the template grid uses the input at its own resolution.
* Intensities are winsorised (0.5-99.5 %) for registration only, as antsRegistration's ``-w``
  does, so a few very bright voxels (vessels, fat) do not squeeze the mutual-information
  histogram.
* Seeds and thread counts are fixed per call so that runs repeat (bit for bit with one
  thread; with more, ITK sums in a varying order and results move by about 0.1 mm); both are
  restored after the call (no global side effects).

ANTs' transforms map points of the fixed image (here the template) to the moving image (the
input), in ITK's LPS world; nibabel's affines are RAS. :func:`ants_affine_to_ras` converts one
into the other, and ``extract_and_register`` writes both forms.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from brainage_bids.io import atomic_path
from brainage_bids.preproc.qc import registration_qc
from brainage_bids.preproc.transforms import itk_matrix, itk_to_ras
from brainage_bids.templates import template_path

LOGGER = logging.getLogger(__name__)

#: ITK reads this environment variable to size its thread pool.
ITK_THREADS_ENV = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
#: Voxel size (mm) of the copy of the input that registration works on (the template's).
WORK_RES_MM = 2.0
#: N4 runs on a coarse copy: the bias field is smooth, and ITK's N4 costs about 3 µs per voxel
#: per iteration, so the working resolution sets the run time.
N4_RES_MM = 8.0
#: B-spline mesh (spans per axis) of the first fitting level; each level doubles it (2, 4, 8).
N4_MESH = (2, 2, 2)
#: Iterations per fitting level. N4 converges slowly: on an IXI head (log-field SD 0.19), the
#: RMS log-field error against a full N4 (4 mm, 4 x 50 iterations) is 0.047 with 50 per level
#: and 0.08 with 20.
N4_ITERATIONS = (50, 50, 50)
#: Head -> head template affine, from a centre-of-mass start (coarse levels do the work).
HEAD_AFFINE: dict[str, Any] = {
    "aff_iterations": (1000, 500, 250, 0),
    "aff_shrink_factors": (6, 4, 2, 1),
    "aff_smoothing_sigmas": (3, 2, 1, 0),
    "aff_random_sampling_rate": 1.0,
}
#: Short SyN (8 and 4 mm only) that only serves to carry the template brain mask to the head.
MASK_SYN: dict[str, Any] = {
    "reg_iterations": (40, 5, 0),
    "syn_metric": "mattes",
    "syn_sampling": 32,
}
#: Brain -> brain template affine: the transform that is kept.
BRAIN_AFFINE: dict[str, Any] = {
    "aff_iterations": (1000, 500, 250, 0),
    "aff_shrink_factors": (6, 4, 2, 1),
    "aff_smoothing_sigmas": (3, 2, 1, 0),
    "aff_random_sampling_rate": 1.0,
}
#: Interpolation of the brain onto the template grid (antsApplyTransforms' name).
FINAL_INTERPOLATOR = "linear"
#: Winsorising percentiles applied to the registration copies.
WINSOR_PERCENTILES = (0.5, 99.5)
#: Skull-stripped detector: at least this fraction of exact zeros ...
STRIPPED_MIN_ZERO_FRACTION = 0.3
#: ... and a non-zero support of brain size (ml): a head with skull and scalp is > 3 litres.
STRIPPED_VOLUME_ML = (300.0, 2800.0)

#: Smallest extent (voxels) of an axis: fewer is a slice or slab, not a head.
MIN_VOXELS_PER_AXIS = 16

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
OUTPUT_NAMES = {
    "brain_mni": "brain_mni.nii.gz",
    "mask_mni": "mask_mni.nii.gz",
    "mask_native": "mask_native.nii.gz",
    "brain_native": "brain_native.nii.gz",
    "transform": "native_to_mni_affine.mat",
    "transform_txt": "native_to_mni_affine_ras.txt",
}


def _ants() -> Any:
    """Import antspyx on first use (a two-second import that QC and detection do not need)."""
    import ants

    return ants


# --------------------------------------------------------------------------- scoped settings
@contextlib.contextmanager
def itk_threads(threads: int) -> Iterator[None]:
    """Set ITK's thread count for the duration of a call, then restore the environment.

    ITK reads the variable when its thread pool is first used in a process and keeps that size
    afterwards, so the setting is effective for the first ANTs call of a process (a nipype
    worker running one node, a fresh CLI run); later changes in the same process are ignored
    by ITK. Callers should therefore pass the same value to every call.
    """
    old = os.environ.get(ITK_THREADS_ENV)
    os.environ[ITK_THREADS_ENV] = str(max(1, int(threads)))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(ITK_THREADS_ENV, None)
        else:
            os.environ[ITK_THREADS_ENV] = old


@contextlib.contextmanager
def _ants_seed(seed: int) -> Iterator[None]:
    """Fix antsRegistration's ``--random-seed`` (antspyx reads it from ``ants.config``)."""
    config = _ants().config
    old = config._random_seed
    config._random_seed = int(seed)
    try:
        yield
    finally:
        config._random_seed = old


# --------------------------------------------------------------------------- image helpers
def load_image(in_file: str | os.PathLike[str]) -> tuple[nib.Nifti1Image, np.ndarray]:
    """Load a T1w image as float32 data, refusing what cannot be registered.

    Raises
    ------
    ValueError
        With a one-line reason: unreadable, not 3D, too small, complex, non-finite values,
        all zero or constant.
    """
    name = Path(in_file).name
    try:
        img = nib.load(str(in_file))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for damaged or foreign files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{name}: cannot be read as NIfTI: {reason}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{name}: expected a 3D image, got shape {tuple(data.shape)}")
    if min(data.shape) < MIN_VOXELS_PER_AXIS:
        raise ValueError(f"{name}: shape {tuple(data.shape)} is too small for a brain image")
    if np.iscomplexobj(data):
        raise ValueError(f"{name}: complex-valued data cannot be a T1w image")
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        raise ValueError(f"{name}: contains NaN or infinite values")
    if not data.any():
        raise ValueError(f"{name}: the image is all zero")
    if float(data.max()) == float(data.min()):
        raise ValueError(f"{name}: the image is constant")
    return img, data


def to_ants(data: np.ndarray, affine: np.ndarray) -> Any:
    """Wrap an array and its RAS affine as an ANTs image (LPS origin and direction).

    ITK cannot store a shear; the nearest rotation is used then (a warning says so), exactly
    as nibabel does for the qform.
    """
    from brainage_bids.preproc.transforms import has_shear, itk_grid_affine

    if has_shear(affine):
        LOGGER.warning("the image affine has a shear; ANTs uses the nearest rotation")
    lps = _RAS_TO_LPS @ itk_grid_affine(affine)
    zooms = np.linalg.norm(lps[:3, :3], axis=0)
    direction = lps[:3, :3] / zooms
    return _ants().from_numpy(np.ascontiguousarray(data, dtype=np.float32),
                              origin=tuple(float(x) for x in lps[:3, 3]),
                              spacing=tuple(float(z) for z in zooms), direction=direction)


def ants_image_affine(image: Any) -> np.ndarray:
    """The RAS voxel-to-world affine of an ANTs image (nibabel's convention)."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.direction) * np.asarray(image.spacing)
    lps[:3, 3] = image.origin
    return _RAS_TO_LPS @ lps


def _save(data: np.ndarray, affine: np.ndarray, out_file: Path, *, dtype: type,
          header: nib.Nifti1Header | None = None) -> str:
    """Write a NIfTI atomically.

    Without ``header`` the file is on the template grid (sform/qform code MNI); with the
    input's header, its xform codes are kept so native-space outputs overlay the input.
    """
    img = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    if header is None:
        codes = (4, 4)  # NIFTI_XFORM_MNI_152
    else:
        sform, qform = int(header["sform_code"]), int(header["qform_code"])
        code = sform or qform or 1  # the code of the affine nibabel used, else scanner
        codes = (code, code)
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine, code=codes[1])
    with atomic_path(out_file) as tmp:
        nib.save(img, str(tmp))
    return str(out_file)


def _template(desc: str | None = None, suffix: str = "T1w") -> tuple[nib.Nifti1Image, Any]:
    img = nib.load(str(template_path(desc, suffix)))
    data = np.asarray(img.dataobj, dtype=np.float32)
    return img, to_ants(data, img.affine)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndi.label(mask)
    if count <= 1:
        return mask.astype(bool)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def _clean_mask(mask: np.ndarray) -> np.ndarray:
    """One connected, hole-free mask: ventricles inside, stray islands outside."""
    return ndi.binary_fill_holes(_largest_component(mask))


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(float)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def foreground_mask(data: np.ndarray) -> np.ndarray:
    """Head (or brain) versus background: half the Otsu threshold, closed and filled.

    Half of Otsu keeps dark tissue (CSF, skull marrow) that Otsu alone cuts; exact zeros
    (outside a skull-stripped brain or a defaced region) are never foreground.
    """
    nonzero = data[data != 0]
    hi = np.percentile(nonzero, 99.5)
    mask = data > 0.5 * _otsu(np.clip(nonzero, None, hi))
    mask = ndi.binary_closing(mask, iterations=2)
    return _clean_mask(mask) & (data != 0)


def _winsorised(image: Any) -> Any:
    data = image.numpy()
    nonzero = data[data != 0]
    lo, hi = np.percentile(nonzero, WINSOR_PERCENTILES)
    return image.new_image_like(np.clip(data, min(float(lo), 0.0), float(hi)))


def _working_copy(image: Any) -> Any:
    """The input at WORK_RES_MM isotropic, Gaussian pre-smoothed where it is finer."""
    ants = _ants()
    spacing = np.asarray(image.spacing, dtype=float)
    if np.allclose(spacing, WORK_RES_MM, atol=0.05):
        return image
    sigma = np.sqrt(np.clip(WORK_RES_MM**2 - spacing**2, 0, None)) / 2.3548
    if np.any(sigma > 0.05):
        image = ants.smooth_image(image, [float(s) for s in sigma],
                                  sigma_in_physical_coordinates=True)
    return ants.resample_image(image, (WORK_RES_MM,) * 3, use_voxels=False, interp_type=0)


# --------------------------------------------------------------------------- transforms
def read_ants_affine(path: str | os.PathLike[str]) -> np.ndarray:
    """4x4 matrix of an ANTs/ITK affine file: fixed-space LPS point -> moving-space LPS point.

    Read through antspyx; :func:`brainage_bids.preproc.transforms.read_itk_affine` reads the
    same file without it (the tests check that the two agree).
    """
    transform = _ants().read_transform(str(path))
    return itk_matrix(np.asarray(transform.parameters, dtype=float),
                      np.asarray(transform.fixed_parameters, dtype=float))


def ants_affine_to_ras(fixed_to_moving_lps: np.ndarray) -> np.ndarray:
    """Turn ANTs' template->input (LPS) affine into the input->template map in RAS mm."""
    return itk_to_ras(fixed_to_moving_lps)


def _register(fixed: Any, moving: Any, kind: str, workdir: Path, **kwargs: Any) -> dict:
    prefix = tempfile.mkdtemp(prefix=f"{kind.lower()}_", dir=workdir) + os.sep
    start = time.perf_counter()
    result = _ants().registration(fixed, moving, type_of_transform=kind, outprefix=prefix,
                                  **kwargs)
    LOGGER.debug("%s registration: %.1f s", kind, time.perf_counter() - start)
    return result


# --------------------------------------------------------------------------- public API
def n4_bias_correct(in_file: str, out_file: str, *, threads: int = 1) -> str:
    """N4 bias-field correction, estimated on a coarse copy and applied at full resolution.

    The field is smooth (at most an 8-span B-spline here), so estimating it on a
    ``N4_RES_MM`` grid loses nothing that matters while keeping N4 to a few seconds; its log is
    then interpolated back onto the input grid, edge values extended, and divided out. The
    field is scaled to mean 1 inside the foreground so intensities keep their range, and exact
    zeros stay zero (the skull-stripped detector relies on that).
    """
    ants = _ants()
    img, data = load_image(in_file)
    with itk_threads(threads):
        native = to_ants(data, img.affine)
        coarse = ants.resample_image(native, (N4_RES_MM,) * 3, use_voxels=False, interp_type=0)
        small = coarse.numpy()
        mask = foreground_mask(small)
        if mask.sum() < 64:
            raise ValueError(f"{Path(in_file).name}: no foreground found for bias correction")
        field = ants.n4_bias_field_correction(
            coarse, mask=coarse.new_image_like(mask.astype(np.float32)), shrink_factor=1,
            convergence={"iters": list(N4_ITERATIONS), "tol": 1e-7},
            spline_param=list(N4_MESH), return_bias_field=True)
        log_field = np.log(np.clip(field.numpy(), 1e-3, None))
        log_field -= log_field[mask].mean()
        # pad by edge values so the full-resolution grid never samples outside the field
        padded = np.pad(log_field, 2, mode="edge")
        pad_affine = ants_image_affine(coarse) @ nib.affines.from_matvec(np.eye(3), [-2] * 3)
        full = ants.resample_image_to_target(to_ants(padded, pad_affine), native,
                                             interp_type="linear").numpy()
    corrected = data / np.exp(full)
    LOGGER.debug("N4: field range %.2f-%.2f", np.exp(full).min(), np.exp(full).max())
    return _save(corrected, img.affine, Path(out_file), dtype=np.float32, header=img.header)


def looks_skull_stripped(img: nib.spatialimages.SpatialImage | str | os.PathLike[str]) -> bool:
    """Guess whether an image is already skull-stripped.

    Heuristic: brain extraction tools set everything outside the brain to exactly zero, so a
    stripped image has (1) at least ``STRIPPED_MIN_ZERO_FRACTION`` exact-zero voxels and (2) a
    non-zero support (largest connected part, holes filled) of brain size,
    ``STRIPPED_VOLUME_ML`` (0.3-2.8 l). A head with skull and scalp is over 3 l even when its
    background is exactly zero, and a head with a noisy background fails (1) as well.
    Measured: Colin27 ch2 head 4.1 l (False), ch2bet 1.7 l (True); IXI heads 5-7 l (False).
    """
    if not isinstance(img, nib.spatialimages.SpatialImage):
        img = nib.load(str(img))
    data = np.squeeze(np.asanyarray(img.dataobj))
    if data.ndim != 3:
        return False
    support = np.isfinite(data) & (data != 0)
    if 1.0 - support.mean() < STRIPPED_MIN_ZERO_FRACTION:
        return False
    voxel_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000.0
    volume = float(_clean_mask(support).sum()) * voxel_ml
    LOGGER.debug("skull-strip check: zero fraction %.2f, support %.0f ml",
                 1.0 - support.mean(), volume)
    return STRIPPED_VOLUME_ML[0] <= volume <= STRIPPED_VOLUME_ML[1]


def extract_and_register(in_file: str, out_dir: str, *, threads: int = 1,
                         skull_stripped: bool | None = None,
                         seed: int = 42) -> dict[str, str | dict]:
    """Skull-strip a T1w image and register it (12 dof) to MNI152NLin6Asym 2 mm.

    Parameters
    ----------
    in_file
        A 3D T1w image, any orientation and voxel size, head or already skull-stripped
        (ideally bias-corrected by :func:`n4_bias_correct`).
    out_dir
        Where the outputs go (created if needed); intermediate files are removed.
    threads
        ITK threads for this call (see :func:`itk_threads` for ITK's caveat).
    skull_stripped
        ``None`` decides with :func:`looks_skull_stripped`.
    seed
        antsRegistration's random seed: the same input and thread count give the same output.

    Returns
    -------
    dict
        Paths ``brain_mni``, ``mask_mni``, ``mask_native``, ``brain_native``, ``transform``
        (ANTs ``.mat``, for antsApplyTransforms with the template as reference) and
        ``transform_txt`` (4x4 RAS matrix mapping input points in mm to MNI points), plus
        ``qc`` (:func:`~brainage_bids.preproc.qc.registration_qc`) and ``info`` (whether the
        skull-stripped path was taken, threads, seed).
    """
    ants = _ants()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    img, data = load_image(in_file)
    if skull_stripped is None:
        skull_stripped = looks_skull_stripped(nib.Nifti1Image(data, img.affine))
    LOGGER.info("%s: %s input", Path(in_file).name, "skull-stripped" if skull_stripped
                else "head")
    paths = {key: str(out / name) for key, name in OUTPUT_NAMES.items()}
    workdir = Path(tempfile.mkdtemp(prefix=".ants_", dir=out))
    try:
        with itk_threads(threads), _ants_seed(seed):
            native = to_ants(data, img.affine)
            work = _winsorised(_working_copy(native))
            tpl_img, tpl_brain = _template("brain")
            if skull_stripped:
                mask = _clean_mask(data != 0)
                init = None
                brain_work = work
            else:
                mask, init = _strip_head(native, work, workdir)
                mask_work = ants.resample_image_to_target(
                    native.new_image_like(mask.astype(np.float32)), work,
                    interp_type="linear").numpy() > 0.5
                brain_work = work.new_image_like(work.numpy() * mask_work)
            reg = _register(tpl_brain, brain_work, "Affine", workdir, initial_transform=init,
                            **BRAIN_AFFINE)
            affine_file = reg["fwdtransforms"][0]
            brain = native.new_image_like(data * mask)
            brain_mni = ants.apply_transforms(tpl_brain, brain, [affine_file],
                                              interpolator=FINAL_INTERPOLATOR).numpy()
            mask_mni = ants.apply_transforms(
                tpl_brain, native.new_image_like(mask.astype(np.float32)), [affine_file],
                interpolator="linear").numpy() > 0.5
            shutil.copyfile(affine_file, paths["transform"])
            to_mni = ants_affine_to_ras(read_ants_affine(affine_file))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    _save(np.where(mask_mni, brain_mni, 0), tpl_img.affine, Path(paths["brain_mni"]),
          dtype=np.float32)
    _save(mask_mni, tpl_img.affine, Path(paths["mask_mni"]), dtype=np.uint8)
    _save(mask, img.affine, Path(paths["mask_native"]), dtype=np.uint8, header=img.header)
    _save(data * mask, img.affine, Path(paths["brain_native"]), dtype=np.float32,
          header=img.header)
    with atomic_path(paths["transform_txt"]) as tmp:
        np.savetxt(tmp, to_mni, fmt="%.8f",
                   header="native (RAS mm) -> MNI152NLin6Asym (RAS mm), 4x4 affine")
    result: dict[str, str | dict] = dict(paths)
    result["qc"] = registration_qc(paths["brain_mni"], paths["mask_mni"], paths["mask_native"])
    result["info"] = {"skull_stripped_input": bool(skull_stripped), "threads": int(threads),
                      "seed": int(seed)}
    return result


def _strip_head(native: Any, work: Any, workdir: Path) -> tuple[np.ndarray, list[str]]:
    """Brain mask of a head: head affine, short SyN, template mask warped back.

    Returns the mask on the input grid and the head affine (the brain affine's start).
    """
    ants = _ants()
    _, tpl_head = _template()
    mask_img, _ = _template("brain", "mask")
    tpl_mask = ndi.binary_fill_holes(np.asarray(mask_img.dataobj) > 0)  # ventricles are holes
    head = _register(tpl_head, work, "Affine", workdir, **HEAD_AFFINE)
    head_affine = head["fwdtransforms"][0]
    syn = _register(tpl_head, work, "SyNOnly", workdir, initial_transform=[head_affine],
                    **MASK_SYN)
    to_native = ants.apply_transforms(
        native, to_ants(tpl_mask.astype(np.float32), mask_img.affine), syn["invtransforms"],
        whichtoinvert=[True, False], interpolator="linear").numpy()
    mask = _clean_mask(to_native > 0.5)
    return mask, [head_affine]

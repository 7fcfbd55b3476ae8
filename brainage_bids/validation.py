"""Is this T1w usable? File checks, header checks, then voxel checks, each with its own reason.

The checks run from cheapest to dearest, so that a bad input costs next to nothing:

1. :func:`path_problem`: the path itself (missing, a dangling symbolic link, a FIFO, a device,
   a directory, empty, unreadable). Only ``stat`` and ``open`` are called, never ``read`` on
   something that is not a regular file: reading a FIFO blocks forever and ``/dev/zero``
   never ends. :func:`screen_images` runs it on every selected image before any workflow is
   built, so a bad path fails that image alone.
2. :func:`check_header`: what the NIfTI header claims (dimensions, voxel size, field of view,
   data type, affine), from the header only. A header that claims 2700 x 2700 x 2700 voxels
   in a 0.4 kB file is rejected here in milliseconds instead of allocating 20 GB.
3. :func:`load_valid_t1w`: the voxels (a truncated gzip, NaN or infinite values, all zero).

Every message starts with the file's name, so the one line a user sees says which file.
The limits are generous for a human head scanned on an MRI scanner (neonates to adults,
0.2 mm ex-vivo to 6 mm scout-like resolution), and reject what cannot be one.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from brainage_bids.bids import T1wImage
from brainage_bids.preproc.intensity import standardise_intensity

#: Voxels along each spatial axis: fewer is a slice or a slab, more no scanner writes.
MIN_VOXELS_PER_AXIS, MAX_VOXELS_PER_AXIS = 16, 1024
#: Voxels in the volume: 2**28 (1 GiB as float32), e.g. 640 x 640 x 640.
MAX_VOXELS = 2**28
#: Voxel size (mm) along each axis.
MIN_VOXEL_MM, MAX_VOXEL_MM = 0.2, 6.0
#: Field of view (voxels x voxel size, mm) along each axis: a neonate's head to a whole
#: head and neck.
MIN_FOV_MM, MAX_FOV_MM = 80.0, 500.0


class ImageError(ValueError):
    """The image cannot be used; the message (naming the file) is shown to the user as is."""


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words; ``None`` for a regular file."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def path_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as an image file (``None`` when it can be).

    The reason starts with the file's name; for a symbolic link it names the target too.
    """
    path = Path(path)
    name = path.name
    try:
        link = path.lstat()
    except FileNotFoundError:
        return f"{name} does not exist"
    except OSError as err:
        return f"{name} cannot be examined: {err.strerror or err}"
    target = ""
    if stat.S_ISLNK(link.st_mode):
        target = f" (a symbolic link to {os.readlink(path)})"
    try:
        info = path.stat()
    except FileNotFoundError:
        return f"{name} is a symbolic link to {os.readlink(path)}, which does not exist"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"{name} is a symbolic link that loops back on itself"
        return f"{name}{target} cannot be examined: {err.strerror or err}"
    kind = _kind(info.st_mode)
    if kind is not None:
        return f"{name}{target} is {kind}, not a NIfTI file"
    if info.st_size == 0:
        return f"{name}{target} is empty (0 bytes)"
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as err:
        return f"{name}{target} cannot be read: {(err.strerror or str(err)).lower()}"
    return None


def screen_images(images: Sequence[T1wImage]) -> tuple[list[T1wImage], list[tuple[T1wImage, str]]]:
    """Split images into those whose file can be opened and ``(image, reason)`` for the rest.

    Run before any workflow is built: a dangling link or a FIFO must fail its own image with
    its reason, not the nipype graph of every image.
    """
    usable, rejected = [], []
    for image in images:
        problem = path_problem(image.path)
        if problem is None:
            usable.append(image)
        else:
            rejected.append((image, problem))
    return usable, rejected


def _shape(shape: Sequence[int]) -> str:
    return " x ".join(str(int(s)) for s in shape)


def check_header(img: nib.spatialimages.SpatialImage, name: str) -> tuple[int, int, int]:
    """Check what the header claims, reading no voxel; return the 3D shape.

    Raises :class:`ImageError` naming ``name`` and the first limit the header breaks.
    """
    shape = tuple(int(s) for s in img.shape)
    if len(shape) > 3 and all(s == 1 for s in shape[3:]):
        shape = shape[:3]  # a 4D (or 5D) file with a single volume is a 3D image
    if len(shape) != 3:
        extra = (f" ({shape[3]} volumes: a time series or several images in one file?)"
                 if len(shape) == 4 else "")
        raise ImageError(f"{name}: expected a 3D image, got {len(shape)}D with shape "
                         f"{_shape(shape)}{extra}")
    if min(shape) < MIN_VOXELS_PER_AXIS:
        raise ImageError(f"{name}: shape {_shape(shape)} is too small for a brain image (a 2D "
                         f"slice or a thin slab?): at least {MIN_VOXELS_PER_AXIS} voxels per "
                         "axis are needed")
    if max(shape) > MAX_VOXELS_PER_AXIS or int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise ImageError(f"{name}: the header claims {_shape(shape)} voxels, more than any "
                         f"head image has (at most {MAX_VOXELS_PER_AXIS} per axis and "
                         f"{MAX_VOXELS:,} in all): a corrupt header?")
    dtype = img.get_data_dtype()
    if dtype.kind not in "uif" or dtype.fields is not None:
        raise ImageError(f"{name}: unsupported data type {dtype} (expected integers or "
                         "floating point: not complex, RGB or a structured type)")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise ImageError(f"{name}: the affine (sform/qform) contains NaN or infinite values")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-6:
        raise ImageError(f"{name}: the affine (sform/qform) is singular (not invertible)")
    # the voxel sizes of the affine that every step uses, not pixdim: the two can disagree
    zooms = tuple(float(z) for z in nib.affines.voxel_sizes(affine))
    if not all(np.isfinite(z) and MIN_VOXEL_MM <= z <= MAX_VOXEL_MM for z in zooms):
        sizes = " x ".join(f"{z:.3g}" for z in zooms)
        raise ImageError(f"{name}: implausible voxel size {sizes} mm in its affine "
                         f"(sform/qform; expected {MIN_VOXEL_MM:g} to {MAX_VOXEL_MM:g} mm per "
                         "axis)")
    fov = [s * z for s, z in zip(shape, zooms, strict=True)]
    if not all(MIN_FOV_MM <= f <= MAX_FOV_MM for f in fov):
        sizes = " x ".join(f"{f:.0f}" for f in fov)
        raise ImageError(f"{name}: field of view {sizes} mm ({_shape(shape)} voxels of "
                         f"{' x '.join(f'{z:.3g}' for z in zooms)} mm) does not fit a human head "
                         f"(expected {MIN_FOV_MM:.0f} to {MAX_FOV_MM:.0f} mm per axis): "
                         "wrong voxel sizes in the header?")
    return shape  # type: ignore[return-value]


def _check_size(path: Path, img: nib.spatialimages.SpatialImage, name: str) -> None:
    """An uncompressed ``.nii`` must hold the bytes its header promises (cheap: one stat)."""
    if not isinstance(img, nib.Nifti1Image) or path.name.endswith(".gz"):
        return
    header = img.header
    needed = int(header["vox_offset"]) + int(np.prod(img.shape, dtype=np.int64)) * int(
        header.get_data_dtype().itemsize)
    size = path.stat().st_size
    if size < needed:
        raise ImageError(f"{name}: truncated: the header needs {needed:,} bytes, the file "
                         f"has {size:,}")


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def load_valid_t1w(path: str | Path) -> nib.Nifti1Image:
    """Load a T1w image and check it can be processed; return it reoriented to RAS.

    The path, then the header, then the voxels are checked (see the module's docstring), each
    failure with its own message. Intensities are standardised (:func:`standardise_intensity`)
    so that the data type, offset and scale of the stored values do not matter. Only the
    in-memory image is changed; the input file is never written.
    """
    path = Path(path)
    name = path.name
    problem = path_problem(path)
    if problem is not None:
        raise ImageError(problem)
    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises many types for damaged files
        raise ImageError(f"{name}: cannot be read as NIfTI (corrupt, or not an image?): "
                         f"{_first_line(err)}") from None
    shape = check_header(img, name)
    _check_size(path, img, name)
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as err:
        raise ImageError(f"{name}: cannot be read (truncated or corrupt?): "
                         f"{_first_line(err)}") from None
    stored = data.reshape(shape)
    # float32, as the shipped models' evaluations read their inputs: float64 would round
    # differently in the last bit, and the registration turns that into ~0.5 years
    with np.errstate(over="ignore"):  # a float64 beyond float32's range is named below
        data = stored.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        lost = stored[~finite]  # only here, on the way to an error: no second pass otherwise
        if lost.dtype != data.dtype and np.isfinite(lost).all():
            raise ImageError(f"{name}: values up to {float(np.abs(lost).max()):.3g}, beyond "
                             "what float32 holds (3.4e38): rescale the image (its scale does "
                             "not matter here)")
        raise ImageError(f"{name}: contains {int((~finite).sum()):,} NaN or infinite values")
    if float(data.max()) == float(data.min()):
        kind = "all zero" if float(data.max()) == 0 else "constant"
        raise ImageError(f"{name}: the image is {kind}")
    # the same head gets the same numbers whatever its data type, offset or scale
    out = nib.Nifti1Image(standardise_intensity(data), img.affine)
    out.header.set_xyzt_units("mm")
    return nib.as_closest_canonical(out)

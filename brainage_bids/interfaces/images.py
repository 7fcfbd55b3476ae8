"""Input validation: catch unusable T1w images early with a message a user understands."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from brainage_bids.preproc.intensity import standardise_intensity

#: Smallest extent (voxels) of each axis for something that can be a brain image.
MIN_VOXELS_PER_AXIS = 16


class ImageError(ValueError):
    """The image cannot be used; the message is shown to the user as is."""


def load_valid_t1w(path: str | Path) -> nib.Nifti1Image:
    """Load a T1w image and check it can be processed; return it reoriented to RAS.

    Checks, each with its own message: readable (a truncated ``.nii.gz`` fails here), 3D
    (a 4D image with one volume is accepted), a plausible size, finite values, and not
    constant. Intensities are standardised (:func:`standardise_intensity`) so that the data
    type, offset and scale of the stored values do not matter. Only the in-memory image is
    changed; the input file is never written.
    """
    name = Path(path).name
    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for damaged files
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ImageError(f"{name}: cannot be read (truncated or corrupt?): {reason}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ImageError(f"{name}: expected a 3D image, got {data.ndim}D with shape "
                         f"{tuple(data.shape)}")
    if min(data.shape) < MIN_VOXELS_PER_AXIS:
        raise ImageError(f"{name}: shape {tuple(data.shape)} is too small for a brain image "
                         f"(a 2D slice or a thin slab?)")
    zooms = img.header.get_zooms()[:3]
    if not all(0 < z < 10 for z in zooms):
        raise ImageError(f"{name}: implausible voxel size {tuple(float(z) for z in zooms)} mm")
    data = data.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        raise ImageError(f"{name}: contains {int((~finite).sum())} NaN or infinite values")
    if float(data.max()) == float(data.min()):
        kind = "all zero" if float(data.max()) == 0 else "constant"
        raise ImageError(f"{name}: the image is {kind}")
    # the same head gets the same numbers whatever its data type, offset or scale
    out = nib.Nifti1Image(standardise_intensity(data), img.affine)
    out.header.set_xyzt_units("mm")
    return nib.as_closest_canonical(out)


class _ValidateT1wInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="the T1w image from the BIDS dataset")


class _ValidateT1wOutputSpec(TraitedSpec):
    out_file = File(desc="the validated image, float32, reoriented to RAS")
    info = traits.Dict(desc="shape, voxel size and orientation of the input")


class ValidateT1w(SimpleInterface):
    """Validate and reorient the input (a copy in the work directory)."""

    input_spec = _ValidateT1wInputSpec
    output_spec = _ValidateT1wOutputSpec

    def _run_interface(self, runtime):
        src = nib.load(self.inputs.in_file)
        img = load_valid_t1w(self.inputs.in_file)
        out_file = Path(runtime.cwd) / "t1w_ras.nii.gz"
        nib.save(img, out_file)
        self._results["out_file"] = str(out_file)
        self._results["info"] = {
            "shape": [int(s) for s in src.shape[:3]],
            "voxel_size_mm": [round(float(z), 4) for z in src.header.get_zooms()[:3]],
            "orientation": "".join(nib.aff2axcodes(src.affine)),
        }
        return runtime

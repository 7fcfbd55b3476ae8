"""The validation node: :mod:`brainage_bids.validation` as the first step of preprocessing."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    traits,
)

from brainage_bids.validation import ImageError, load_valid_t1w

__all__ = ["ImageError", "ValidateT1w", "load_valid_t1w"]


class _ValidateT1wInputSpec(BaseInterfaceInputSpec):
    # not exists=True: a missing or dangling file must reach load_valid_t1w, which says why
    in_file = File(mandatory=True, desc="the T1w image from the BIDS dataset")


class _ValidateT1wOutputSpec(TraitedSpec):
    out_file = File(desc="the validated image, float32, reoriented to RAS")
    info = traits.Dict(desc="shape, voxel size and orientation of the input")


class ValidateT1w(SimpleInterface):
    """Validate and reorient the input (a copy in the work directory)."""

    input_spec = _ValidateT1wInputSpec
    output_spec = _ValidateT1wOutputSpec

    def _run_interface(self, runtime):
        img = load_valid_t1w(self.inputs.in_file)
        src = nib.load(self.inputs.in_file)
        out_file = Path(runtime.cwd) / "t1w_ras.nii.gz"
        nib.save(img, out_file)
        self._results["out_file"] = str(out_file)
        self._results["info"] = {
            "shape": [int(s) for s in src.shape[:3]],
            "voxel_size_mm": [round(float(z), 4) for z in src.header.get_zooms()[:3]],
            "orientation": "".join(nib.aff2axcodes(src.affine)),
        }
        return runtime

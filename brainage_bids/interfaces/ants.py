"""nipype interfaces around the pure-pip preprocessing backend and the registration QC.

The work is done by :mod:`brainage_bids.preproc.ants_backend` (imported inside
``_run_interface``, so building a workflow never loads antspyx); these classes only map
inputs and outputs and write into the node's working directory.
"""

from __future__ import annotations

from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from brainage_bids.io import atomic_write_json


class _N4BiasCorrectInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w image (any orientation)")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")


class _N4BiasCorrectOutputSpec(TraitedSpec):
    out_file = File(exists=True, desc="bias-corrected T1w, float32, on the input grid")


class N4BiasCorrect(SimpleInterface):
    """N4 bias-field correction (estimated on a coarse copy, applied at full resolution)."""

    input_spec = _N4BiasCorrectInputSpec
    output_spec = _N4BiasCorrectOutputSpec

    def _run_interface(self, runtime):
        from brainage_bids.preproc.ants_backend import n4_bias_correct

        out_file = Path(runtime.cwd) / "t1w_n4.nii.gz"
        self._results["out_file"] = n4_bias_correct(self.inputs.in_file, str(out_file),
                                                    threads=self.inputs.num_threads)
        return runtime


class _AntsExtractRegisterInputSpec(BaseInterfaceInputSpec):
    in_file = File(exists=True, mandatory=True, desc="T1w head or skull-stripped brain")
    num_threads = traits.Int(1, usedefault=True, desc="ITK threads")
    skull_stripped = traits.Bool(desc="whether the input is already skull-stripped "
                                      "(default: detected from the image)")
    seed = traits.Int(42, usedefault=True, desc="antsRegistration random seed")


class _AntsExtractRegisterOutputSpec(TraitedSpec):
    out_brain_mni = File(exists=True, desc="skull-stripped T1w on the MNI 2 mm grid")
    out_mask_mni = File(exists=True, desc="brain mask on the MNI 2 mm grid")
    out_mask_native = File(exists=True, desc="brain mask in the input's space")
    out_brain_native = File(exists=True, desc="skull-stripped T1w in the input's space")
    out_transform = File(exists=True, desc="native -> MNI affine (ANTs/ITK .mat)")
    out_transform_txt = File(exists=True, desc="native -> MNI affine, 4x4 RAS mm (text)")
    out_qc = File(exists=True, desc="registration QC (JSON)")
    qc = traits.Dict(desc="registration QC measures")


class AntsExtractRegister(SimpleInterface):
    """Skull strip (template mask through a short SyN) and 12-dof affine to MNI 2 mm."""

    input_spec = _AntsExtractRegisterInputSpec
    output_spec = _AntsExtractRegisterOutputSpec

    def _run_interface(self, runtime):
        from brainage_bids.preproc.ants_backend import extract_and_register

        stripped = self.inputs.skull_stripped if isdefined(self.inputs.skull_stripped) else None
        result = extract_and_register(self.inputs.in_file, runtime.cwd,
                                      threads=self.inputs.num_threads,
                                      skull_stripped=stripped, seed=self.inputs.seed)
        for key in ("brain_mni", "mask_mni", "mask_native", "brain_native", "transform",
                    "transform_txt"):
            self._results[f"out_{key}"] = result[key]
        self._results["qc"] = result["qc"]
        self._results["out_qc"] = str(atomic_write_json(Path(runtime.cwd) / "qc.json",
                                                        result["qc"]))
        return runtime


class _RegistrationQCInputSpec(BaseInterfaceInputSpec):
    brain_mni = File(exists=True, mandatory=True, desc="registered brain on the MNI grid")
    mask_mni = File(exists=True, mandatory=True, desc="registered brain mask on the MNI grid")
    mask_native = File(exists=True, desc="brain mask in the input's space (for its volume)")


class _RegistrationQCOutputSpec(TraitedSpec):
    out_qc = File(exists=True, desc="registration QC (JSON)")
    qc = traits.Dict(desc="registration QC measures, with qc_pass")


class RegistrationQC(SimpleInterface):
    """Registration QC for any backend (reads only the NIfTI outputs)."""

    input_spec = _RegistrationQCInputSpec
    output_spec = _RegistrationQCOutputSpec

    def _run_interface(self, runtime):
        from brainage_bids.preproc.qc import registration_qc

        native = self.inputs.mask_native if isdefined(self.inputs.mask_native) else None
        qc = registration_qc(self.inputs.brain_mni, self.inputs.mask_mni, native)
        self._results["qc"] = qc
        self._results["out_qc"] = str(atomic_write_json(Path(runtime.cwd) /
                                                        "registration_qc.json", qc))
        return runtime

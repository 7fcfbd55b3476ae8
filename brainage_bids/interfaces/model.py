"""The nipype interface that runs the model on one preprocessed image.

torch and the model code are imported inside ``_run_interface`` so that building a
workflow (and ``brainage-bids --help``) stays fast.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

from nipype.interfaces.base import (
    BaseInterfaceInputSpec,
    File,
    SimpleInterface,
    TraitedSpec,
    isdefined,
    traits,
)

from brainage_bids import __version__
from brainage_bids.io import atomic_write_json


class _PredictInputSpec(BaseInterfaceInputSpec):
    brain_mni = File(exists=True, mandatory=True, desc="skull-stripped T1w, MNI 2 mm grid")
    mask_mni = File(exists=True, mandatory=True, desc="brain mask on the same grid")
    qc_file = File(exists=True, desc="registration QC (JSON)")
    brain_native = File(exists=True, desc="skull-stripped T1w on the input grid (grid jitter)")
    mask_native = File(exists=True, desc="its brain mask (grid jitter)")
    transform = File(exists=True, desc="the backend's native -> MNI affine (grid jitter)")
    model = traits.Str("default", usedefault=True, desc="model name or path")
    device = traits.Enum("auto", "cpu", "cuda", usedefault=True)
    mc_samples = traits.Int(20, usedefault=True, desc="Monte-Carlo dropout samples")
    seed = traits.Int(42, usedefault=True)
    num_threads = traits.Int(1, usedefault=True)
    saliency = traits.Bool(True, usedefault=True, desc="write Grad-CAM and attention maps")
    source = traits.Dict(mandatory=True, desc="participant/session/run ids, source file, "
                                              "chronological age, preprocessing backend")


class _PredictOutputSpec(TraitedSpec):
    out_record = File(desc="the brain-age record (JSON)")
    out_gradcam = File(desc="Grad-CAM per conv block, 4D (one volume per block)")
    out_attention = File(desc="spatial-attention map (mean over the seven uses)")
    predicted_age = traits.Float()


def _uncertainty(pred: dict, card: dict) -> dict:
    """The record's uncertainty: members' spread and MC dropout, in years when the card can.

    The calibration (``card["uncertainty"]``) was fitted on held-out predictions (out-of-fold
    for an ensemble, the validation set for a single model); see
    :mod:`brainage_bids.model.uncertainty`. Without it ``sd`` is the raw spread and
    ``calibrated`` is false.
    """
    from brainage_bids.model.uncertainty import calibrated_sd

    result = calibrated_sd(pred, card.get("uncertainty"))
    return {
        "method": pred["uncertainty_method"],
        "samples": pred["mc_samples"],
        "n_members": pred.get("n_members", 1),
        "flip_tta": pred.get("flip_tta", False),
        "grid_jitter_views": pred.get("n_views", 1) - 1,
        "view_sd": round(float(pred.get("view_sd", 0.0)), 3),
        "mc_mean": round(float(pred["mc_mean"]), 3),
        "mc_sd": round(float(pred["mc_sd"]), 3),
        "member_sd": round(float(pred.get("member_sd", 0.0)), 3),
        "calibrated": result["calibrated"],
        "calibration_scale": result["calibration_scale"],
        "scaled": result["scaled"],
        "sd": round(result["sd"], 3),
    }


class PredictBrainAge(SimpleInterface):
    """Normalise as in training, predict, estimate uncertainty, explain, record."""

    input_spec = _PredictInputSpec
    output_spec = _PredictOutputSpec

    def _run_interface(self, runtime):
        import nibabel as nib
        import numpy as np
        import torch

        from brainage_bids.metrics import apply_bias
        from brainage_bids.model.ensemble import members_of
        from brainage_bids.model.input_reference import intensity_check
        from brainage_bids.model.intensity import normalise_intensity
        from brainage_bids.model.jitter import jitter_settings, jitter_views
        from brainage_bids.model.predict import predict_brain_age, resolve_device
        from brainage_bids.model.weights import load_model

        torch.set_num_threads(max(1, self.inputs.num_threads))
        device = resolve_device(self.inputs.device)
        model, card = load_model(self.inputs.model, device=device)
        brain = nib.load(self.inputs.brain_mni)
        mask = np.asanyarray(nib.load(self.inputs.mask_mni).dataobj) > 0
        volume = normalise_intensity(np.asanyarray(brain.dataobj), mask)
        source = dict(self.inputs.source)
        jitter = jitter_settings(card)
        natives = (self.inputs.brain_native, self.inputs.mask_native, self.inputs.transform)
        views = []
        if jitter is not None and all(isdefined(x) for x in natives):
            views = jitter_views(*natives, source.get("backend"), jitter)
        pred = predict_brain_age(model, volume, mc_samples=self.inputs.mc_samples,
                                 seed=self.inputs.seed, device=device,
                                 flip_tta=bool((card.get("inference") or {}).get("flip_tta")),
                                 views=views)

        age = source.get("age")
        predicted = float(pred["predicted_age"])
        record = {
            "participant_id": f"sub-{source['subject']}",
            "session_id": f"ses-{source['session']}" if source.get("session") else None,
            "run": source.get("run"),
            "source_file": source.get("source_file"),
            "chronological_age": age,
            "predicted_age": round(predicted, 3),
            "member_predictions": [round(p, 3) for p in pred["member_predictions"]],
            "brain_age_gap": None if age is None else round(predicted - float(age), 3),
            "uncertainty": _uncertainty(pred, card),
            "corrected_brain_age_gap": {},
            "qc": {},
            "preprocessing": {
                "backend": source.get("backend"),
                "template": "MNI152NLin6Asym",
                "resolution_mm": 2,
            },
            "model": {
                "name": card.get("name"),
                "sha256": card.get("sha256"),
                "architecture": card.get("architecture", {}),
                "n_members": pred["n_members"],
                "parent": (card.get("lineage") or {}).get("parent"),
                "training_data": (card.get("training_data") or {}).get("name"),
                "age_range": (card.get("training") or {}).get("age_range"),
            },
            "software": {
                "brainage_bids": __version__,
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        bias = card.get("bias_correction") or {}
        if age is not None:
            for method, coefs in bias.items():
                if not isinstance(coefs, dict) or "error" in coefs:
                    continue  # not fitted (e.g. too few validation images)
                corrected = apply_bias(method, coefs, np.array([float(age)]),
                                       np.array([predicted]))
                record["corrected_brain_age_gap"][method] = round(float(corrected[0]), 3)
        if isdefined(self.inputs.qc_file):
            record["qc"] = json.loads(Path(self.inputs.qc_file).read_text())
        intensity = intensity_check(volume, mask, card.get("input_reference"))
        if intensity:  # the card knows its training inputs: is this one like them?
            passed = record["qc"].get("qc_pass", True) and intensity["intensity_distance_ok"]
            record["qc"] = {**record["qc"], **intensity, "qc_pass": bool(passed)}

        out_dir = Path(runtime.cwd)
        if self.inputs.saliency and all(hasattr(m, "blocks") for m in members_of(model)):
            self._write_saliency(members_of(model), volume, brain, out_dir, device)
        out_record = atomic_write_json(out_dir / "brainage.json", record)
        self._results["out_record"] = str(out_record)
        self._results["predicted_age"] = predicted
        return runtime

    def _write_saliency(self, members, volume, brain, out_dir: Path, device) -> None:
        """Grad-CAM and attention maps, averaged over an ensemble's members."""
        import nibabel as nib
        import numpy as np

        from brainage_bids.model.saliency import attention_maps, gradcam_maps

        affine = brain.affine
        cams = [gradcam_maps(member, volume, device=device) for member in members]
        stack = np.stack([np.mean([c[f"block{i}"] for c in cams], axis=0) for i in range(1, 8)],
                         axis=-1).astype(np.float32)
        gradcam = out_dir / "gradcam.nii.gz"
        nib.save(nib.Nifti1Image(stack, affine), gradcam)
        self._results["out_gradcam"] = str(gradcam)
        if getattr(members[0], "attention", "none") != "none":
            maps = [attention_maps(member, volume, device=device) for member in members]
            key = "mean" if "mean" in maps[0] else sorted(maps[0])[0]
            attention = out_dir / "attention.nii.gz"
            mean = np.mean([m[key] for m in maps], axis=0).astype(np.float32)
            nib.save(nib.Nifti1Image(mean, affine), attention)
            self._results["out_attention"] = str(attention)

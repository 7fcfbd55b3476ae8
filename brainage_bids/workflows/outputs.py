"""Every derivative sink of the participant level lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from brainage_bids.interfaces.bids import DerivativesSink
from brainage_bids.templates import TEMPLATE
from brainage_bids.workflows.preproc import TRANSFORM_FORMATS

MNI = {"space": TEMPLATE, "res": "2"}
#: (input field, sink name, suffix, entities, sidecar) for each derivative.
PREPROC_OUTPUTS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("brain_mni", "ds_preproc", "T1w", {**MNI, "desc": "preproc"}),
    ("mask_mni", "ds_mask_mni", "mask", {**MNI, "desc": "brain"}),
    ("mask_native", "ds_mask_native", "mask", {"desc": "brain"}),
    ("transform", "ds_transform", "xfm",
     {"from": "T1w", "to": TEMPLATE, "mode": "image"}),
)
PREDICT_OUTPUTS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("record", "ds_record", "brainage", {}),
)
GRADCAM_OUTPUTS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("gradcam", "ds_gradcam", "saliency", {**MNI, "desc": "gradcam"}),
)
ATTENTION_OUTPUTS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("attention", "ds_attention", "saliency", {**MNI, "desc": "attention"}),
)


def init_derivatives_wf(*, output_dir: Path, source_entities: dict[str, Any], backend: str,
                        predict: bool, gradcam: bool, attention: bool,
                        name: str = "derivatives_wf") -> pe.Workflow:
    """Sinks for one T1w: preprocessed image, masks, transform, record, saliency maps.

    ``attention`` is false for models without attention (the ablation's ``none``).
    """
    specs = PREPROC_OUTPUTS
    if predict:
        specs += PREDICT_OUTPUTS
        specs += GRADCAM_OUTPUTS if gradcam else ()
        specs += ATTENTION_OUTPUTS if attention else ()
    workflow = pe.Workflow(name=name)
    inputnode = pe.Node(niu.IdentityInterface(fields=[spec[0] for spec in specs]),
                        name="inputnode")
    edges = []
    for field, sink_name, suffix, entities in specs:
        sink = DerivativesSink(base_directory=str(output_dir), source_entities=source_entities,
                               suffix=suffix, entities=entities)
        if field == "transform":
            sink.inputs.sidecar = {**TRANSFORM_FORMATS[backend], "FromSpace": "T1w (native)",
                                   "ToSpace": f"{TEMPLATE} 2 mm"}
        node = pe.Node(sink, name=sink_name, run_without_submitting=True)
        edges.append((inputnode, node, [(field, "in_file")]))
    workflow.connect(edges)
    return workflow

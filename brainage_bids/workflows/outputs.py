"""Every derivative sink of the participant level lives here, and what an image leaves.

The brain-age record is the mark of a finished image (the group level and the run summary
read it), so its sink runs last, after every other derivative is in place. When an image
fails or is interrupted, :func:`remove_image_outputs` takes away whatever it had written, so
that nothing is left that looks complete.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from nipype.interfaces import utility as niu
from nipype.pipeline import engine as pe

from brainage_bids.derivatives import FIGURES, derivative_path, figure_path
from brainage_bids.interfaces.bids import DerivativesSink
from brainage_bids.templates import TEMPLATE
from brainage_bids.workflows.preproc import TRANSFORM_FORMATS

LOG = logging.getLogger(__name__)

MNI = {"space": TEMPLATE, "res": "2"}
#: (input field, sink name, suffix, entities, sidecar) for each derivative.
PREPROC_OUTPUTS: tuple[tuple[str, str, str, dict[str, str]], ...] = (
    ("brain_mni", "ds_preproc", "T1w", {**MNI, "desc": "preproc"}),
    ("mask_mni", "ds_mask_mni", "mask", {**MNI, "desc": "brain"}),
    ("mask_native", "ds_mask_native", "mask", {"desc": "brain"}),
    ("brain_native", "ds_preproc_native", "T1w", {"desc": "preproc"}),
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
    nodes = {}
    for field, sink_name, suffix, entities in specs:
        sink = DerivativesSink(base_directory=str(output_dir), source_entities=source_entities,
                               suffix=suffix, entities=entities)
        if field == "transform":
            sink.inputs.sidecar = {**TRANSFORM_FORMATS[backend], "FromSpace": "T1w (native)",
                                   "ToSpace": f"{TEMPLATE} 2 mm"}
        nodes[field] = pe.Node(sink, name=sink_name, run_without_submitting=True)
        edges.append((inputnode, nodes[field], [(field, "in_file")]))
    if "record" in nodes:  # the record is written last: its sink waits for every other one
        others = [field for field in nodes if field != "record"]
        written = pe.Node(niu.Merge(len(others)), name="written", run_without_submitting=True)
        edges += [(nodes[field], written, [("out_file", f"in{i}")])
                  for i, field in enumerate(others, start=1)]
        edges.append((written, nodes["record"], [("out", "after")]))
    workflow.connect(edges)
    return workflow


def image_outputs(output_dir: Path, source_entities: dict[str, Any]) -> list[Path]:
    """Every file the participant level may write for one image (record last in the list)."""
    specs = PREPROC_OUTPUTS + GRADCAM_OUTPUTS + ATTENTION_OUTPUTS + PREDICT_OUTPUTS
    paths = []
    for field, _, suffix, entities in specs:
        extension = {"transform": ".mat", "record": ".json"}.get(field, ".nii.gz")
        paths.append(derivative_path(output_dir, source_entities, suffix=suffix,
                                     extension=extension, **entities))
        if field == "transform":
            paths.append(paths[-1].with_suffix(".json"))
    figures = [figure_path(output_dir, source_entities, desc=desc, **(MNI if mni else {}))
               for desc, mni in FIGURES]
    return [*figures, *paths]


def temporaries(paths: Iterable[Path]) -> list[Path]:
    """Half-written temporaries of ``paths`` (``.NAME.XXXX.tmp...``, see brainage_bids.io)."""
    found = []
    for path in paths:
        with contextlib.suppress(OSError):
            found += path.parent.glob(f".{path.name}.*.tmp*")
    return found


def remove_image_outputs(output_dir: Path, source_entities: dict[str, Any], *,
                         since: float | None = None) -> list[Path]:
    """Remove one image's derivatives and half-written temporaries; return what went.

    With ``since`` (a time stamp), only when one of them was written at or after it: an image
    interrupted before it wrote anything keeps the complete outputs of an earlier run.
    """
    paths = image_outputs(output_dir, source_entities)
    present = [p for p in [*paths, *temporaries(paths)] if p.is_file() or p.is_symlink()]
    if since is not None and not any(p.lstat().st_mtime >= since - 1 for p in present):
        return []
    removed = []
    for path in present:
        try:
            path.unlink()
        except OSError as err:  # a partial file that cannot go is named in the log
            LOG.warning("could not remove the partial output %s: %s", path, err)
        else:
            removed.append(path)
    return removed


def remove_report_temporaries(output_dir: Path, subject: str,
                              images: Iterable[Any]) -> None:
    """Half-written files of a participant's report (and its figures) that was interrupted."""
    from brainage_bids.derivatives import report_path

    paths = [report_path(output_dir, subject)]
    for image in images:
        paths += image_outputs(output_dir, image.entities)
    for path in temporaries(paths):
        with contextlib.suppress(OSError):
            path.unlink()

"""BIDS-derivative names, built from the source image's entities in one place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from brainage_bids.bids import ENTITY_KEYS, ENTITY_ORDER, OUTPUT_ENTITIES
from brainage_bids.templates import TEMPLATE

#: ``qc_pass`` values in the group table (TSV has no boolean type); the group level writes
#: them and the reports read them, so they live here rather than in either.
QC_TRUE, QC_FALSE = "true", "false"


def derivative_name(source: dict[str, Any], *, suffix: str, extension: str,
                    **entities: Any) -> str:
    """``sub-01_ses-A_run-1_space-X_res-2_desc-preproc_T1w.nii.gz`` from source entities.

    Source entities are kept (except space/res/desc, which describe the derivative); the
    keyword entities add or override them. Order follows the BIDS specification.
    """
    merged = {k: v for k, v in source.items() if k in ENTITY_KEYS and k not in OUTPUT_ENTITIES}
    merged.update({k: v for k, v in entities.items() if v is not None})
    unknown = set(merged) - set(ENTITY_KEYS)
    if unknown:
        raise ValueError(f"unknown BIDS entities: {sorted(unknown)}")
    if "subject" not in merged:
        raise ValueError("a derivative needs the subject entity")
    parts = [f"{ENTITY_KEYS[k]}-{merged[k]}" for k in ENTITY_ORDER if k in merged]
    if not extension.startswith("."):
        extension = f".{extension}"
    return "_".join([*parts, suffix]) + extension


def derivative_path(output_dir: Path, source: dict[str, Any], *, suffix: str, extension: str,
                    datatype: str = "anat", **entities: Any) -> Path:
    """The full path: ``OUTPUT_DIR/sub-X[/ses-Y]/<datatype>/<name>``."""
    folder = Path(output_dir) / f"sub-{source['subject']}"
    if source.get("session"):
        folder = folder / f"ses-{source['session']}"
    return folder / datatype / derivative_name(source, suffix=suffix, extension=extension,
                                               **entities)


def report_path(output_dir: Path, subject: str) -> Path:
    """Per-participant HTML report, at the top of the derivatives like fMRIPrep's."""
    return Path(output_dir) / f"sub-{subject}.html"


#: The figures of one image's report section: ``(desc, extra entities)``; the registration
#: and saliency figures are on the template grid (space and res entities).
FIGURES: tuple[tuple[str, bool], ...] = (
    ("registration", True), ("brainmask", False), ("gradcam", True), ("gradcamblocks", True),
    ("attention", True),
)


def figure_path(output_dir: Path, source: dict[str, Any], *, desc: str,
                **entities: Any) -> Path:
    """``OUTPUT_DIR/sub-X/figures/<name>_desc-<desc>_T1w.png``, beside the report."""
    folder = report_path(output_dir, str(source["subject"])).with_suffix("") / "figures"
    return folder / derivative_name(source, suffix="T1w", extension=".png", desc=desc,
                                    **entities)


XFM_ENTITIES = {"suffix": "xfm", "from": "T1w", "to": TEMPLATE, "mode": "image"}


def transform_backend(output_dir: Path, entities: dict[str, Any]) -> str:
    """The preprocessing backend (``ants`` or ``fsl``) recorded in an image's transform
    sidecar (its ``Software``, see ``workflows.preproc.TRANSFORM_FORMATS``), else
    ``unknown``."""
    sidecar = derivative_path(output_dir, entities, extension=".json", **XFM_ENTITIES)
    try:
        software = json.loads(sidecar.read_text()).get("Software", "")
    except (OSError, json.JSONDecodeError, AttributeError):
        return "unknown"
    if not isinstance(software, str) or not software:
        return "unknown"
    return "fsl" if "FSL" in software else "ants"


def native_outputs(output_dir: Path,
                   entities: dict[str, Any]) -> tuple[str, str, str, str] | None:
    """``(brain, mask, transform, backend)`` the participant level wrote on the input grid for
    one image, or None when any is missing (derivatives of an older version)."""
    brain = derivative_path(output_dir, entities, suffix="T1w", extension=".nii.gz",
                            desc="preproc")
    mask = derivative_path(output_dir, entities, suffix="mask", extension=".nii.gz",
                           desc="brain")
    transform = derivative_path(output_dir, entities, extension=".mat", **XFM_ENTITIES)
    backend = transform_backend(output_dir, entities)
    if backend == "unknown" or not all(p.is_file() for p in (brain, mask, transform)):
        return None
    return str(brain), str(mask), str(transform), backend

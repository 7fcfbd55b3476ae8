"""BIDS-derivative names, built from the source image's entities in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from brainage_bids.bids import ENTITY_KEYS, ENTITY_ORDER, OUTPUT_ENTITIES

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

"""Paths to the MNI152NLin6Asym templates that ship inside the package (no downloads)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TEMPLATE = "MNI152NLin6Asym"
#: The model's input grid: FSL's MNI152 2 mm grid.
GRID_SHAPE = (91, 109, 91)
RESOLUTION_MM = 2


def template_path(desc: str | None = None, suffix: str = "T1w") -> Path:
    """Return a shipped template file.

    ``template_path()`` is the 2 mm head, ``template_path("brain")`` the 2 mm brain (FSL's
    MNI152_T1_2mm_brain), ``template_path("brain", "mask")`` the 2 mm brain mask.
    """
    name = f"tpl-{TEMPLATE}_res-0{RESOLUTION_MM}"
    if desc:
        name += f"_desc-{desc}"
    name += f"_{suffix}.nii.gz"
    path = Path(str(resources.files("brainage_bids") / "data" / "templates" / name))
    if not path.is_file():
        raise FileNotFoundError(f"template {name} is not installed with brainage_bids")
    return path

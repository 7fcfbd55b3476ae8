"""Shared fixtures: small real data that ships in the repo, and ../shared/data when present."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "examples" / "ixi-sample"
SHARED_DATA = REPO.parent / "shared" / "data"

os.environ.setdefault("NIPYPE_NO_ET", "1")


def shared_or_skip(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test (a fresh clone does not have it)."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/data/{'/'.join(parts)} (absent from this checkout)")
    return path


@pytest.fixture
def sample_bids() -> Path:
    """The shipped four-participant IXI sample (read only: tests must never write it)."""
    return SAMPLE


@pytest.fixture
def tiny_bids(tmp_path: Path) -> Path:
    """A writable BIDS copy of two real IXI heads, with sessions and runs for naming tests."""
    root = tmp_path / "bids"
    root.mkdir()
    shutil.copy(SAMPLE / "dataset_description.json", root)
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\nsub-IXI012\t38.78\tM\nsub-IXI013\tn/a\tM\n")
    src12 = SAMPLE / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
    src13 = SAMPLE / "sub-IXI013" / "anat" / "sub-IXI013_T1w.nii.gz"
    for ses in ("A", "B"):
        anat = root / "sub-IXI012" / f"ses-{ses}" / "anat"
        anat.mkdir(parents=True)
        shutil.copy(src12, anat / f"sub-IXI012_ses-{ses}_run-1_T1w.nii.gz")
    (root / "sub-IXI012" / "sub-IXI012_sessions.tsv").write_text(
        "session_id\tage\nses-A\t38.78\nses-B\t40.10\n")
    anat = root / "sub-IXI013" / "anat"
    anat.mkdir(parents=True)
    shutil.copy(src13, anat / "sub-IXI013_T1w.nii.gz")
    return root


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())

"""Shared fixtures: small real data that ships in the repo, and ../shared/data when present."""

from __future__ import annotations

import hashlib
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


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``: the input dataset must never change."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory) -> Path:
    """A clearly named, UNTRAINED checkpoint (random weights, the normal save path)."""
    import torch

    from brainage_bids.model import BrainAgeNet
    from brainage_bids.model.weights import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "test-untrained.safetensors"
    save_model(BrainAgeNet(), path, {"name": "test-untrained",
                                     "description": "UNTRAINED random weights (tests only)"})
    return path


@pytest.fixture(scope="session")
def participant_run(tmp_path_factory):
    """participant then group on one shipped real head, with the shipped model.

    Returns ``(output dir, work dir, participant arguments, exit code, group exit code)``.
    Shared by the smoke and reliability tests, so the head is preprocessed once per session;
    tests that rerun in its work directory use other output directories.
    """
    from brainage_bids.cli.run import main

    root = tmp_path_factory.mktemp("smoke")
    out, work = root / "out", root / "work"
    before = tree_digest(SAMPLE)
    args = [str(SAMPLE), str(out), "participant", "--participant-label", "IXI012",
            "-w", str(work), "--nprocs", "1", "--omp-nthreads", "2", "--mc-samples", "4"]
    code = main(args)
    group_code = main([str(SAMPLE), str(out), "group"])
    assert tree_digest(SAMPLE) == before, "the input dataset was modified"
    return out, work, args, code, group_code

"""End-to-end runs of the real app on real IXI heads (slow: real preprocessing).

The participant run uses the shipped default model (no ``--model``), as a user would; the
bad-input and training tests use a clearly named, UNTRAINED checkpoint made by a fixture
(random weights saved through the normal safetensors + card path). The accuracy is measured
by ``evaluation/evaluate.py``, not here.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.cli.run import main

from .conftest import REPO, SAMPLE, read_json, shared_or_skip

pytestmark = pytest.mark.slow

HEAD = SAMPLE / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory) -> Path:
    import torch

    from brainage_bids.model import BrainAgeNet
    from brainage_bids.model.weights import save_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "test-untrained.safetensors"
    save_model(BrainAgeNet(), path, {"name": "test-untrained",
                                     "description": "UNTRAINED random weights (tests only)"})
    return path


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def participant_run(tmp_path_factory):
    """participant then group on one shipped real head; returns (output dir, exit codes)."""
    root = tmp_path_factory.mktemp("smoke")
    out, work = root / "out", root / "work"
    before = _tree_digest(SAMPLE)
    args = [str(SAMPLE), str(out), "participant", "--participant-label", "IXI012",
            "-w", str(work), "--nprocs", "1", "--omp-nthreads", "2", "--mc-samples", "4"]
    code = main(args)
    group_code = main([str(SAMPLE), str(out), "group"])
    assert _tree_digest(SAMPLE) == before, "the input dataset was modified"
    return out, work, args, code, group_code


def test_participant_writes_every_derivative(participant_run):
    out, _, _, code, _ = participant_run
    assert code == 0
    anat = out / "sub-IXI012" / "anat"
    expected = [
        "sub-IXI012_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz",
        "sub-IXI012_space-MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz",
        "sub-IXI012_desc-brain_mask.nii.gz",
        "sub-IXI012_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.mat",
        "sub-IXI012_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.json",
        "sub-IXI012_space-MNI152NLin6Asym_res-2_desc-gradcam_saliency.nii.gz",
        "sub-IXI012_space-MNI152NLin6Asym_res-2_desc-attention_saliency.nii.gz",
        "sub-IXI012_brainage.json",
    ]
    assert sorted(p.name for p in anat.iterdir()) == sorted(expected)
    preproc = nib.load(anat / expected[0])
    assert preproc.shape == (91, 109, 91)
    assert np.allclose(np.diag(preproc.affine)[:3], [2, 2, 2])
    gradcam = nib.load(anat / expected[5])
    assert gradcam.shape == (91, 109, 91, 7)
    assert not list(out.rglob(".*.tmp*")), "temporary files left behind"
    description = read_json(out / "dataset_description.json")
    assert description["DatasetType"] == "derivative"


def test_record_contents(participant_run):
    out = participant_run[0]
    record = read_json(out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json")
    assert record["participant_id"] == "sub-IXI012"
    assert record["chronological_age"] == pytest.approx(38.78)
    assert record["brain_age_gap"] == pytest.approx(
        record["predicted_age"] - 38.78, abs=1e-2)
    assert record["uncertainty"]["method"] == "mc-dropout"
    assert record["uncertainty"]["samples"] == 4
    from brainage_bids.model.weights import registry

    shipped = registry()
    assert record["model"]["name"] == shipped["default"]
    assert record["model"]["sha256"] == next(
        m["sha256"] for m in shipped["models"] if m["name"] == shipped["default"])
    # the participant level predicts what the held-out evaluation does for this participant
    # (docs/evaluation/ixi-2mm-v1_test_preproc-v2.json: evaluate.py on the same preprocessing)
    evaluated = read_json(REPO / "docs" / "evaluation" / "ixi-2mm-v1_test_preproc-v2.json")
    expected = next(p["predicted_age"] for p in evaluated["predictions"]
                    if p["participant_id"] == "sub-IXI012")
    assert record["predicted_age"] == pytest.approx(expected, abs=0.05)
    assert record["uncertainty"]["calibrated"] is True
    assert record["preprocessing"]["backend"] in ("ants", "fsl")
    assert 0.9 < record["qc"]["dice_template"] <= 1.0
    assert record["qc"]["qc_pass"] is True


def test_logs_and_reports(participant_run):
    out = participant_run[0]
    logs = out / "logs"
    assert len(list(logs.glob("config-*.toml"))) == 2  # participant and group
    summary = read_json(next(logs.glob("summary-*.json")))
    assert summary["failed"] == 0 and summary["images"][0]["status"] == "ok"
    html = (out / "sub-IXI012.html").read_text()
    assert "sub-IXI012" in html and "data:image/png;base64," in html
    assert 'id="methods"' in html and "No errors: every image was processed." in html
    log = "".join(p.read_text() for p in logs.glob("brainage-*.log"))
    record = read_json(out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json")
    assert re.search(rf"\[1/1\] sub-IXI012: predicted age {record['predicted_age']:.1f} "
                     r"\(age 38\.8\), \d+ s", log), log[-2000:]
    citation = (logs / "CITATION.md").read_text()
    assert record["model"]["sha256"] in citation  # the group level wrote it last:
    assert "corrected for its dependence on age (Beheshti et al., 2019)" in citation


def test_group_level_table(participant_run):
    out, _, _, _, group_code = participant_run
    assert group_code == 0
    lines = (out / "group_brainage.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert {"participant_id", "age", "predicted_age", "brain_age_gap", "sex"} <= set(header)
    assert len(lines) == 2 and lines[1].startswith("sub-IXI012\t")
    sidecar = read_json(out / "group_brainage.json")
    assert set(header) <= set(sidecar)
    assert (out / "group_brainage.html").is_file()


def test_rerun_reuses_finished_steps(participant_run):
    _, work, args, _, _ = participant_run
    result = next(work.rglob("extract_register/result_extract_register.pklz"))
    stamp = result.stat().st_mtime_ns
    assert main(args) == 0
    assert result.stat().st_mtime_ns == stamp, "registration was recomputed"


def _write(path: Path, data: np.ndarray, affine=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)


def test_bad_inputs_fail_clearly_and_others_finish(tmp_path, untrained_model, capsys):
    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(SAMPLE / "dataset_description.json", bids)
    rows = ["participant_id\tage", "sub-good\t38.78"]
    good = bids / "sub-good" / "anat" / "sub-good_T1w.nii.gz"
    good.parent.mkdir(parents=True)
    shutil.copy(HEAD, good)
    head = nib.load(HEAD)
    data = np.asarray(head.dataobj).astype(np.float32)
    bad = {
        "truncated": "cannot be read",
        "fourd": "expected a 3D image",
        "flat": "too small",
        "zeros": "all zero",
        "nans": "NaN",
    }
    for name in bad:
        rows.append(f"sub-{name}\t50")
    anat = lambda s: bids / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz"  # noqa: E731
    raw = gzip.decompress(HEAD.read_bytes())
    anat("truncated").parent.mkdir(parents=True)
    anat("truncated").write_bytes(gzip.compress(raw)[: len(raw) // 8])
    _write(anat("fourd"), np.stack([data] * 3, axis=-1), head.affine)
    _write(anat("flat"), data[:, :, 60:61], head.affine)
    _write(anat("zeros"), np.zeros_like(data), head.affine)
    with_nans = data.copy()
    with_nans[40:45, 40:45, 40:45] = np.nan
    _write(anat("nans"), with_nans, head.affine)
    (bids / "participants.tsv").write_text("\n".join(rows) + "\n")
    before = _tree_digest(bids)

    out = tmp_path / "out"
    code = main([str(bids), str(out), "participant", "-w", str(tmp_path / "work"),
                 "--model", str(untrained_model), "--nprocs", "2", "--omp-nthreads", "1",
                 "--mc-samples", "2", "--no-saliency"])
    assert code == 1
    assert _tree_digest(bids) == before
    summary = read_json(next((out / "logs").glob("summary-*.json")))
    status = {row["image"]: row for row in summary["images"]}
    assert status["sub-good"]["status"] == "ok"
    assert (out / "sub-good" / "anat" / "sub-good_brainage.json").is_file()
    for name, reason in bad.items():
        row = status[f"sub-{name}"]
        assert row["status"] == "failed", row
        assert reason in row["error"], (name, row["error"])
        assert not (out / f"sub-{name}" / "anat" / f"sub-{name}_brainage.json").exists()
    err = capsys.readouterr().err
    # one progress line per image as it finished, failures with their crash file
    assert sorted(re.findall(r"\[(\d)/6\] sub-", err)) == list("123456")
    assert len(re.findall(r"\[\d/6\] sub-\w+: FAILED: .*\(crash file \S+crash-", err)) == 5
    assert "FAILED" in err and "Traceback" not in err.split("FAILED")[-1]


def test_train_level_two_epochs_on_real_heads(tmp_path):
    ixi = shared_or_skip("ixi-hh-t1w-2mm")
    labels = ["IXI012", "IXI013", "IXI014", "IXI033", "IXI252", "IXI254"]
    out = tmp_path / "out"
    code = main([str(ixi), str(out), "train", "--participant-label", *labels,
                 "-w", str(tmp_path / "work"), "--epochs", "2", "--batch-size", "2",
                 "--nprocs", "2", "--omp-nthreads", "1", "--val-fraction", "0.34",
                 "--model-name", "smoke"])
    assert code == 0
    models = out / "models"
    names = sorted(p.name for p in models.iterdir())
    assert names == ["smoke.json", "smoke.safetensors", "smoke_curve.svg", "smoke_metrics.tsv"]
    card = read_json(models / "smoke.json")
    assert card["training_data"]["name"].startswith("IXI")
    assert card["training"]["n_train"] + card["training"]["n_val"] == 6
    assert card["training"]["epochs_run"] == 2
    assert card["preprocessing"]["backend"] in ("ants", "fsl")
    assert len(card["sha256"]) == 64
    metrics = (models / "smoke_metrics.tsv").read_text().splitlines()
    assert len(metrics) == 3  # header + two epochs
    # the trained model is accepted by the participant level
    assert main([str(ixi), str(out), "participant", "--participant-label", "IXI012",
                 "-w", str(tmp_path / "work"), "--model", str(models), "--mc-samples", "2",
                 "--no-reports"]) == 0
    record = json.loads((out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json").read_text())
    assert record["model"]["name"] == "smoke"
    assert record["model"]["age_range"] == card["training"]["age_range"]


def test_train_level_folds_on_real_heads(tmp_path):
    """``train --folds 3``: members, out-of-fold table and card; the participant level uses it."""
    ixi = shared_or_skip("ixi-hh-t1w-2mm")
    labels = ["IXI012", "IXI013", "IXI014", "IXI033", "IXI252", "IXI254"]
    out, work = tmp_path / "out", str(tmp_path / "work")
    assert main([str(ixi), str(out), "train", "--participant-label", *labels, "-w", work,
                 "--epochs", "1", "--batch-size", "2", "--folds", "3", "--nprocs", "2",
                 "--omp-nthreads", "1", "--model-name", "ens", "--mc-samples", "2"]) == 0
    models = out / "models"
    assert sorted(p.name for p in models.glob("*.safetensors")) == ["ens.safetensors"]
    card = read_json(models / "ens.json")
    assert card["ensemble"]["n_members"] == 3 and card["training"]["folds"] == 3
    oof = (models / "ens_oof.tsv").read_text().splitlines()
    assert len(oof) == 1 + 6
    assert sorted(r.split("\t")[1] for r in oof[1:]) == sorted(labels)
    assert all((models / f"ens-m{i}_metrics.tsv").is_file() for i in range(3))
    assert main([str(ixi), str(out), "participant", "--participant-label", "IXI012",
                 "-w", work, "--model", str(models), "--mc-samples", "2",
                 "--no-reports"]) == 0
    record = json.loads((out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json").read_text())
    assert record["model"]["n_members"] == 3 and len(record["member_predictions"]) == 3
    assert record["predicted_age"] == pytest.approx(
        sum(record["member_predictions"]) / 3, abs=2e-3)
    assert record["uncertainty"]["method"] == "ensemble+mc-dropout"

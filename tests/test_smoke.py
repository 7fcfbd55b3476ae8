"""End-to-end runs of the real app on real IXI heads (slow: real preprocessing).

The participant run uses the shipped default model (no ``--model``), as a user would; the
bad-input and training tests use a clearly named, UNTRAINED checkpoint made by a fixture
(random weights saved through the normal safetensors + card path). The accuracy is measured
by ``evaluation/evaluate.py``, not here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from html import escape

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.cli.run import main

from .conftest import REPO, SAMPLE, read_json, shared_or_skip
from .conftest import tree_digest as _tree_digest

pytestmark = pytest.mark.slow

HEAD = SAMPLE / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"


def test_participant_writes_every_derivative(participant_run):
    out, _, _, code, _ = participant_run
    assert code == 0
    anat = out / "sub-IXI012" / "anat"
    expected = [
        "sub-IXI012_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz",
        "sub-IXI012_space-MNI152NLin6Asym_res-2_desc-brain_mask.nii.gz",
        "sub-IXI012_desc-brain_mask.nii.gz",
        "sub-IXI012_desc-preproc_T1w.nii.gz",
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
    gradcam = nib.load(anat / expected[6])
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
    assert record["uncertainty"]["method"] == "ensemble+mc-dropout"
    assert record["uncertainty"]["grid_jitter_views"] == 8
    assert record["uncertainty"]["samples"] == 4
    assert record["model"]["n_members"] == 5 and len(record["member_predictions"]) == 5
    from brainage_bids.model.weights import registry

    shipped = registry()
    assert record["model"]["name"] == shipped["default"]
    assert record["model"]["sha256"] == next(
        m["sha256"] for m in shipped["models"] if m["name"] == shipped["default"])
    # the participant level predicts what the held-out evaluation does for this participant
    # (docs/evaluation/ixi-test.json: evaluate.py with the default model on this preprocessing)
    evaluated = read_json(REPO / "docs" / "evaluation" / "ixi-test.json")
    expected = next(p["predicted_age"] for p in evaluated["predictions"]
                    if p["participant_id"] == "sub-IXI012")
    assert record["predicted_age"] == pytest.approx(expected, abs=0.05)
    assert record["uncertainty"]["calibrated"] is True
    assert record["preprocessing"]["backend"] in ("ants", "fsl")
    assert 0.9 < record["qc"]["dice_template"] <= 1.0
    assert record["qc"]["intensity_distance_ok"] is True  # the card's input_reference
    assert 0 < record["qc"]["intensity_distance"] < 0.1  # 0.044 measured; threshold 0.162
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
                     r"\(age 38\.8\), (\d+ h )?\d+ (s|min)", log), log[-2000:]
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


def test_bad_inputs_fail_clearly_and_others_finish(tmp_path, untrained_model, capsys):
    """Every kind of bad image in one run: each fails alone, in one line naming its file; the
    good head (whose age in participants.tsv is malformed) is predicted with age n/a."""
    from .test_validation import damaged_heads, special_files

    bids = tmp_path / "bids"
    bids.mkdir()
    shutil.copy(SAMPLE / "dataset_description.json", bids)
    anat = lambda s: bids / f"sub-{s}" / "anat" / f"sub-{s}_T1w.nii.gz"  # noqa: E731
    anat("good").parent.mkdir(parents=True)
    shutil.copy(HEAD, anat("good"))
    bad: dict[str, str] = {}
    for case, (path, reason) in damaged_heads(tmp_path / "damaged").items():
        anat(case).parent.mkdir(parents=True)
        path.rename(anat(case))
        bad[case] = reason
    specials = special_files(tmp_path / "special")
    for case, (path, reason) in specials.items():
        if case in ("missing", "loop"):  # no such entry in a dataset / pybids cannot list it
            continue
        anat(case).parent.mkdir(parents=True)
        if path.is_symlink():
            anat(case).symlink_to(os.readlink(path))
        elif path.is_dir():
            anat(case).mkdir()
        elif case == "fifo":
            os.mkfifo(anat(case))
        else:
            shutil.copy(path, anat(case))
        bad[case] = reason.split(" ", 1)[1]  # without the file name of the original
    rows = ["participant_id\tage", "sub-good\t45,5"] + [f"sub-{case}\t50" for case in bad]
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
    assert set(status) == {"sub-good", *(f"sub-{case}" for case in bad)}
    assert status["sub-good"]["status"] == "ok"
    assert status["sub-good"]["chronological_age"] is None
    assert "age '45,5' is not a number" in status["sub-good"]["age_problem"]
    assert (out / "sub-good" / "anat" / "sub-good_brainage.json").is_file()
    for name, reason in bad.items():
        row = status[f"sub-{name}"]
        assert row["status"] == "failed", row
        assert row["error"].startswith(f"sub-{name}_T1w.nii.gz"), row["error"]
        assert reason in row["error"], (name, row["error"])
        assert not list((out / f"sub-{name}").rglob("*_brainage.json"))
        html = (out / f"sub-{name}.html").read_text()
        assert "(1 failed)" in html and escape(reason, quote=True) in html  # the report: why
    err = capsys.readouterr().err
    total = len(bad) + 1
    # one progress line per image as it finished; node failures name their crash file
    done = re.findall(rf"\[(\d+)/{total}\] sub-(\w+): ", err)
    assert sorted(int(n) for n, _ in done) == list(range(1, total + 1))
    for name, reason in bad.items():
        lines = [line for line in err.splitlines() if f"] sub-{name}: FAILED: " in line]
        assert len(lines) == 1 and reason in lines[0], (name, lines)
        if name in damaged_cases():
            assert re.search(r"\(crash file: \S+/logs/crashes/crash-\S+\.txt\)", lines[0])
    assert "Traceback" not in err and "nipype.workflow" not in err, err[-3000:]
    assert re.search(r"sub-good: .*line 2: age '45,5' is not a number .*; predicting without "
                     r"a chronological age", err)
    assert re.search(rf"1 of {total} image\(s\) done; {len(bad)} failed: sub-\w+", err)
    log = "".join(p.read_text() for p in (out / "logs").glob("brainage-*.log"))
    assert "Traceback" in log  # nipype's dump is kept, in the log file


def damaged_cases() -> set[str]:
    """The damaged heads that reach the validation node (and so get a crash file)."""
    return {"truncated", "notnifti", "fourd", "twod", "slab", "zeros", "nans", "inf",
            "nanaffine", "tenmm", "tinyfov", "huge"}


def test_train_level_two_epochs_on_real_heads(tmp_path):
    ixi = shared_or_skip("ixi-hh-t1w-2mm")
    labels = ["IXI012", "IXI013", "IXI014", "IXI033", "IXI034", "IXI252", "IXI254"]
    out = tmp_path / "out"
    code = main([str(ixi), str(out), "train", "--participant-label", *labels,
                 "-w", str(tmp_path / "work"), "--epochs", "2", "--batch-size", "2",
                 "--nprocs", "2", "--omp-nthreads", "1", "--val-fraction", "0.43",
                 "--mc-samples", "4", "--model-name", "smoke"])
    assert code == 0
    models = out / "models"
    names = sorted(p.name for p in models.iterdir())
    assert names == ["smoke.json", "smoke.safetensors", "smoke_curve.svg", "smoke_metrics.tsv"]
    card = read_json(models / "smoke.json")
    assert card["training_data"]["name"].startswith("IXI")
    assert (card["training"]["n_train"], card["training"]["n_val"]) == (4, 3)
    assert card["training"]["epochs_run"] == 2
    assert card["preprocessing"]["backend"] in ("ants", "fsl")
    assert len(card["sha256"]) == 64
    reference = card["input_reference"]  # the training inputs, for the intensity QC
    assert reference["n_images"] == 7 and len(reference["quantiles"]) == 99
    # the validation split, predicted as the participant level will predict (grid jitter:
    # the derivatives hold the native brains), chooses the flip and fits the bias correction
    # and the uncertainty scale, as the out-of-fold predictions do for an ensemble
    jitter = card["inference"]["grid_jitter"]
    assert jitter["n"] == 8 and isinstance(card["inference"]["flip_tta"], bool)
    validation = card["validation"]
    assert validation["kind"] == "validation split" and validation["n"] == 3
    assert validation["mae"] == pytest.approx(jitter["validation_mae_with"])
    assert validation["at_epoch"] in (1, 2) and validation["mae_during_training"] > 0
    uncertainty = card["uncertainty"]
    assert uncertainty["method"] == "mc-dropout" and uncertainty["samples"] == 4
    assert uncertainty["calibration_scale"] > 0 and uncertainty["scaled"] == "mc_sd"
    assert uncertainty["fitted_on"].startswith("validation-split predictions")
    assert card["bias_correction"]["fitted_on"] == uncertainty["fitted_on"]
    assert card["bias_correction"]["beheshti"]["n"] == 3
    assert reference["threshold"] == pytest.approx(
        1.5 * reference["distance_leave_one_out"]["max"], abs=1e-3)
    metrics = (models / "smoke_metrics.tsv").read_text().splitlines()
    assert len(metrics) == 3  # header + two epochs
    # the trained model is accepted by the participant level
    assert main([str(ixi), str(out), "participant", "--participant-label", "IXI012",
                 "-w", str(tmp_path / "work"), "--model", str(models), "--mc-samples", "2",
                 "--no-reports"]) == 0
    record = json.loads((out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json").read_text())
    assert record["model"]["name"] == "smoke"
    assert record["model"]["age_range"] == card["training"]["age_range"]
    assert record["qc"]["intensity_distance_ok"] is True  # a training image passes
    assert record["uncertainty"]["calibrated"] is True
    assert record["uncertainty"]["grid_jitter_views"] == 8
    assert record["uncertainty"]["flip_tta"] is card["inference"]["flip_tta"]
    k = uncertainty["calibration_scale"]  # the record rounds mc_sd to 0.001 years
    assert record["uncertainty"]["sd"] == pytest.approx(k * record["uncertainty"]["mc_sd"],
                                                        abs=k * 6e-4)


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
    assert card["input_reference"]["n_images"] == 6
    oof = (models / "ens_oof.tsv").read_text().splitlines()
    assert len(oof) == 1 + 6
    assert sorted(r.split("\t")[1] for r in oof[1:]) == sorted(labels)
    assert all((models / f"ens-m{i}_metrics.tsv").is_file() for i in range(3))
    # preprocessing ran image by image, as the participant level's queue: a line as each ends
    log = "".join(p.read_text() for p in (out / "logs").glob("brainage-*.log"))
    assert all(f"sub-{label}: preprocessed" in log for label in labels)
    assert "[6/6]" in log and not list(out.glob("*.html"))  # and no participant reports
    # the derivatives hold the native brain, so the OOF predictions and the card use grid jitter
    jitter = card["inference"]["grid_jitter"]
    assert jitter["n"] == 8 and {"oof_mae_with", "oof_mae_without"} <= set(jitter)
    assert card["validation"]["mae"] == pytest.approx(jitter["oof_mae_with"])
    assert main([str(ixi), str(out), "participant", "--participant-label", "IXI012",
                 "-w", work, "--model", str(models), "--mc-samples", "2",
                 "--no-reports"]) == 0
    record = json.loads((out / "sub-IXI012" / "anat" / "sub-IXI012_brainage.json").read_text())
    assert record["model"]["n_members"] == 3 and len(record["member_predictions"]) == 3
    assert record["predicted_age"] == pytest.approx(
        sum(record["member_predictions"]) / 3, abs=2e-3)
    assert record["uncertainty"]["method"] == "ensemble+mc-dropout"
    assert record["uncertainty"]["grid_jitter_views"] == 8

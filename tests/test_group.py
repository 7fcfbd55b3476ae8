"""Group level: gathering records, the table and its sidecar, bias correction, metrics.

The derivatives are built the way the participant level writes them (records through
``derivative_path``, the real MNI template copied as the preprocessed brain), so the group
level is tested against the same names and record structure it meets in a real run.
:func:`build_study` is shared with the report and browser tests.
"""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainage_bids.config import Settings
from brainage_bids.derivatives import QC_FALSE, QC_TRUE, derivative_path
from brainage_bids.group.level import build_group, run_group
from brainage_bids.group.records import GroupError, load_card
from brainage_bids.templates import template_path

REPO = Path(__file__).resolve().parents[1]
IXI_T1W = REPO / "examples" / "ixi-sample" / "sub-IXI012" / "anat" / "sub-IXI012_T1w.nii.gz"
MNI = {"space": "MNI152NLin6Asym", "res": "2"}
SHA = "5e" * 32
MODEL = "brainage-test-v1"
XSS = "<script>alert(1)</script>"

#: participant, age (None: n/a), sex, group, sessions (None: no session level).
PEOPLE = [
    ("01", 23.4, "F", "control", None), ("02", 31.0, "M", "control", None),
    ("03", 38.2, "F", "patient", None), ("04", 45.9, "M", "control", None),
    ("05", 52.5, "F", "patient", None), ("06", 60.1, "M", "control", None),
    ("07", 67.7, "F", "patient", None), ("08", 74.3, "M", "control", None),
    ("09", None, "F", "patient", None), ("10", 29.8, "M", "patient", None),
    ("11", 55.0, "F", "control", ("1", "2")),
]
#: Session ages of the longitudinal participant (sessions.tsv overrides participants.tsv).
SESSION_AGES = {"1": 55.0, "2": 57.5}


def predicted_for(age: float | None, index: int) -> float:
    """Regression to the mean, as real brain-age models show: slope 0.7, noise."""
    base = 50.0 if age is None else 0.7 * age + 15.0
    return round(base + [1.8, -2.1, 0.6, 2.9, -1.2, -0.4, 1.1, -2.6, 0.9, -1.7, 2.2, 0.3][index],
                 3)


def write_record(output_dir: Path, entities: dict, *, age: float | None, predicted: float,
                 qc_pass: bool = True, dice: float = 0.95) -> Path:
    """A brain-age record with the structure of ``interfaces/model.py``'s."""
    record = {
        "participant_id": f"sub-{entities['subject']}",
        "session_id": f"ses-{entities['session']}" if entities.get("session") else None,
        "run": entities.get("run"),
        "source_file": "anat/" + derivative_path(Path("."), entities, suffix="T1w",
                                                 extension=".nii.gz").name,
        "chronological_age": age,
        "predicted_age": predicted,
        "brain_age_gap": None if age is None else round(predicted - age, 3),
        "uncertainty": {"method": "mc-dropout", "samples": 20, "mc_mean": predicted,
                        "sd": 2.5},
        "corrected_brain_age_gap": {},
        "qc": {"dice_template": dice, "correlation": 0.91, "mask_volume_ml": 1402.5,
               "qc_pass": qc_pass, "reasons": [] if qc_pass else ["dice_template < 0.85"]},
        "preprocessing": {"backend": "ants", "template": "MNI152NLin6Asym", "resolution_mm": 2},
        "model": {"name": MODEL, "sha256": SHA,
                  "architecture": {"name": "BrainAgeNet", "attention": "shared"},
                  "training_data": "IXI (test)", "age_range": [20, 82]},
        "software": {"brainage_bids": "0.0.0", "torch": "2.x", "python": "3.11"},
    }
    path = derivative_path(output_dir, entities, suffix="brainage", extension=".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))
    return path


def write_image_derivatives(output_dir: Path, entities: dict, *, saliency: bool = True) -> None:
    """Preprocessed brain, masks and saliency maps: the real MNI template stands in for a
    registered brain; the native mask is a threshold of the real IXI head."""
    def path(suffix: str, **ents: str) -> Path:
        p = derivative_path(output_dir, entities, suffix=suffix, extension=".nii.gz", **ents)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    shutil.copy(template_path("brain"), path("T1w", **MNI, desc="preproc"))
    shutil.copy(template_path("brain", "mask"), path("mask", **MNI, desc="brain"))
    head = nib.load(IXI_T1W)
    data = np.asanyarray(head.dataobj)
    mask = (data > np.percentile(data, 60)).astype(np.uint8)
    nib.save(nib.Nifti1Image(mask, head.affine), path("mask", desc="brain"))
    if saliency:
        tpl = nib.load(template_path("brain", "mask"))
        grid = np.indices(tpl.shape, dtype=np.float32)
        maps = []
        for block in range(7):  # smooth blobs, finer in early blocks, like real Grad-CAM
            centre = np.array([45 - 8 + 3 * block, 60 - block * 2, 40 + block])[:, None, None,
                                                                                None]
            width = 6.0 + 4 * block
            maps.append(np.exp(-((grid - centre) ** 2).sum(0) / (2 * width ** 2)))
        gradcam = np.stack(maps, axis=-1).astype(np.float32)
        nib.save(nib.Nifti1Image(gradcam, tpl.affine),
                 path("saliency", **MNI, desc="gradcam"))
        nib.save(nib.Nifti1Image(gradcam[..., 2], tpl.affine),
                 path("saliency", **MNI, desc="attention"))


def build_study(root: Path, *, images: bool | set[str] = False, people=PEOPLE) -> Settings:
    """A BIDS dataset and its participant-level derivatives; returns group ``Settings``.

    ``images``: write real images (T1w and image derivatives) for all or these subjects.

    Participant 09 has no age, participant 06 failed QC, participant 11 has two sessions;
    a ``note`` column carries a script tag that reports must show as text.
    """
    bids, out = root / "bids", root / "out"
    (bids).mkdir(parents=True)
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "group test", "BIDSVersion": "1.9.0"}))
    rows = [["participant_id", "age", "sex", "group", "note"]]
    for sub, age, sex, group, _ in people:
        rows.append([f"sub-{sub}", "n/a" if age is None else str(age), sex, group,
                     XSS if sub == "10" else "ok"])
    with open(bids / "participants.tsv", "w", newline="") as fh:
        csv.writer(fh, delimiter="\t", lineterminator="\n").writerows(rows)
    (bids / "participants.json").write_text(json.dumps({
        "age": {"Description": "age at scan", "Units": "year"},
        "sex": {"Description": "sex", "Levels": {"M": "male", "F": "female"}},
        "group": {"Description": "diagnostic group",
                  "Levels": {"control": "healthy control", "patient": "patient"}}}))
    out.mkdir()
    (out / "dataset_description.json").write_text(json.dumps(
        {"Name": "brainage-bids derivatives", "BIDSVersion": "1.9.0",
         "DatasetType": "derivative"}))
    tiny = nib.Nifti1Image(np.zeros((4, 4, 4), np.uint8), np.eye(4))
    for index, (sub, age, _, _, sessions) in enumerate(people):
        for ses in sessions or (None,):
            entities = {"subject": sub, **({"session": ses} if ses else {})}
            t1w = derivative_path(bids, entities, suffix="T1w", extension=".nii.gz")
            t1w.parent.mkdir(parents=True, exist_ok=True)
            real = images is True or (bool(images) and sub in images)
            if real:
                shutil.copy(IXI_T1W, t1w)
            else:
                nib.save(tiny, t1w)
            image_age = SESSION_AGES[ses] if ses else age
            write_record(out, entities, age=image_age,
                         predicted=predicted_for(image_age, index) + (1.0 if ses == "2" else 0),
                         qc_pass=sub != "06", dice=0.71 if sub == "06" else 0.95)
            if real:
                write_image_derivatives(out, entities)
        if sessions:
            (bids / f"sub-{sub}" / f"sub-{sub}_sessions.tsv").write_text(
                "session_id\tage\n" + "".join(f"ses-{s}\t{SESSION_AGES[s]}\n"
                                              for s in sessions))
    return Settings(bids_dir=bids, output_dir=out, analysis_level="group",
                    skip_bids_validation=True, reports=False)


VALIDATION_AGE = np.array([20.0, 30, 40, 50, 60, 70, 80])
VALIDATION_PRED = np.array([31.0, 35, 44, 50, 57, 63, 70])


def write_card(path: Path) -> Path:
    """A model card whose coefficients are fitted on a known 'validation set'."""
    from brainage_bids.metrics import fit_bias

    card = {"name": MODEL, "sha256": SHA,
            "bias_correction": {"fitted_on": "validation set, predictions of the best epoch",
                                **{m: fit_bias(m, VALIDATION_AGE, VALIDATION_PRED)
                                   for m in ("beheshti", "cole")}}}
    path.write_text(json.dumps(card))
    return path


def read_tsv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def numbers(rows: list[dict[str, str]], column: str) -> np.ndarray:
    return np.array([np.nan if r[column] == "n/a" else float(r[column]) for r in rows])


@pytest.fixture
def study(tmp_path: Path) -> Settings:
    settings = build_study(tmp_path)
    return replace(settings, model=str(write_card(tmp_path / "card.json")))


def test_table_columns_na_and_sidecar(study):
    assert run_group(study) == 0
    rows = read_tsv(study.output_dir / "group_brainage.tsv")
    assert len(rows) == 12  # 10 single-session participants + 2 sessions of sub-11
    columns = list(rows[0])
    assert columns[:14] == [
        "participant_id", "session_id", "run", "age", "predicted_age", "brain_age_gap",
        "brain_age_gap_beheshti", "brain_age_gap_cole", "brain_age_gap_smith",
        "predicted_age_cole", "uncertainty_sd", "qc_pass", "qc_dice_template",
        "qc_correlation"]
    assert {"qc_mask_volume_ml", "model_name", "model_sha256", "participants_age", "sex",
            "group", "note"} <= set(columns)
    assert "qc_reasons" not in columns  # only numeric QC measures become columns

    by_id = {(r["participant_id"], r["session_id"]): r for r in rows}
    no_age = by_id[("sub-09", "n/a")]
    assert no_age["age"] == no_age["brain_age_gap"] == no_age["brain_age_gap_smith"] == "n/a"
    assert no_age["predicted_age_cole"] != "n/a"  # de Lange & Cole's corrected P needs no age
    assert no_age["run"] == "n/a" and no_age["participants_age"] == "n/a"
    assert by_id[("sub-06", "n/a")]["qc_pass"] == QC_FALSE
    assert by_id[("sub-01", "n/a")]["qc_pass"] == QC_TRUE
    assert by_id[("sub-10", "n/a")]["note"] == XSS  # the TSV keeps the value as written
    # sessions.tsv ages override participants.tsv for the longitudinal participant
    assert float(by_id[("sub-11", "ses-2")]["age"]) == SESSION_AGES["2"]
    assert not any(v in ("", "nan", "None", "NaN") for r in rows for v in r.values())

    sidecar = json.loads((study.output_dir / "group_brainage.json").read_text())
    for column in columns:
        assert sidecar[column].get("Description"), column
    assert sidecar["age"]["Units"] == "year" and sidecar["brain_age_gap_cole"]["Units"] == "year"
    assert set(sidecar["qc_pass"]["Levels"]) == {"true", "false"}
    assert sidecar["sex"]["Levels"] == {"M": "male", "F": "female"}  # from participants.json
    assert "participants.tsv" in sidecar["note"]["Description"]
    assert sidecar["qc_mask_volume_ml"]["Units"] == "mL"


def test_a_rescanned_participant_beside_single_runs(study):
    """One participant with run-1 and run-2 among participants without a run entity."""
    anat = study.bids_dir / "sub-04" / "anat"
    for run in (1, 2):
        shutil.copy(anat / "sub-04_T1w.nii.gz", anat / f"sub-04_run-{run}_T1w.nii.gz")
        write_record(study.output_dir, {"subject": "04", "run": run}, age=45.9,
                     predicted=46.0 + run)
    (anat / "sub-04_T1w.nii.gz").unlink()
    (study.output_dir / "sub-04" / "anat" / "sub-04_brainage.json").unlink()
    assert run_group(study) == 0
    rows = read_tsv(study.output_dir / "group_brainage.tsv")
    runs = [(r["predicted_age"], r["run"]) for r in rows if r["participant_id"] == "sub-04"]
    assert runs == [("47.0", "1"), ("48.0", "2")]
    assert {r["run"] for r in rows if r["participant_id"] != "sub-04"} == {"n/a"}


def test_a_record_with_a_malformed_run_or_session_is_named(study):
    from brainage_bids.group.records import record_problem

    good = json.loads(next(study.output_dir.glob("sub-01/anat/*_brainage.json")).read_text())
    assert record_problem(good) is None
    assert "run 'x'" in record_problem({**good, "run": "x"})
    assert "session_id 3" in record_problem({**good, "session_id": 3})


def test_participants_columns_never_clash(study):
    """participants.tsv holding both 'age' and 'participants_age' (the clash's renamed name)."""
    tsv = study.bids_dir / "participants.tsv"
    lines = tsv.read_text().splitlines()
    tsv.write_text("\n".join([lines[0] + "\tparticipants_age",
                              *(line + "\tx" for line in lines[1:])]) + "\n")
    assert run_group(study) == 0
    with open(study.output_dir / "group_brainage.tsv") as fh:
        header = fh.readline().rstrip("\n").split("\t")
    assert len(header) == len(set(header))
    assert {"age", "participants_age", "participants_participants_age"} <= set(header)
    sidecar = json.loads((study.output_dir / "group_brainage.json").read_text())
    assert set(header) <= set(sidecar)


def test_images_without_a_record_are_named(study):
    from brainage_bids.group.level import group_errors

    (study.output_dir / "sub-02" / "anat" / "sub-02_brainage.json").unlink()
    _, sidecar = build_group(study)
    assert sidecar["BrainAge"]["WithoutRecord"] == ["sub-02"]
    assert sidecar["BrainAge"]["N"]["images_without_record"] == 1
    (error,) = group_errors(study, sidecar["BrainAge"]["WithoutRecord"])
    assert error["image"] == "sub-02" and "not processed yet" in error["error"]
    for record in study.output_dir.rglob("sub-02*_brainage.json"):
        record.unlink()
    with pytest.raises(GroupError, match="no brain-age records for sub-02 in"):
        build_group(replace(study, participant_label=("02",)))


def test_corrections_match_hand_computed_values(study):
    table, sidecar = build_group(study)
    age = table["age"].to_numpy(float)
    pred = table["predicted_age"].to_numpy(float)
    known = np.isfinite(age)
    gap = pred - age
    # Beheshti with the card's coefficients: gap - (a*age + b), (a, b) fitted on validation
    a, b = np.polyfit(VALIDATION_AGE, VALIDATION_PRED - VALIDATION_AGE, 1)
    np.testing.assert_allclose(table["brain_age_gap_beheshti"][known],
                               (gap - (a * age + b))[known], atol=1e-6)
    # de Lange & Cole: corrected P = (P - b)/a with P = a*age + b fitted on validation
    a, b = np.polyfit(VALIDATION_AGE, VALIDATION_PRED, 1)
    np.testing.assert_allclose(table["predicted_age_cole"], (pred - b) / a, atol=1e-6)
    np.testing.assert_allclose(table["brain_age_gap_cole"][known],
                               ((pred - b) / a - age)[known], atol=1e-6)
    # Smith: residual of gap ~ age, fitted on this group's images with ages that pass QC
    fit = known & (table["qc_pass"] != QC_FALSE).to_numpy()
    a, b = np.polyfit(age[fit], gap[fit], 1)
    np.testing.assert_allclose(table["brain_age_gap_smith"][known],
                               (gap - (a * age + b))[known], atol=1e-6)

    bias = sidecar["BrainAge"]["BiasCorrection"]
    for method in ("beheshti", "cole"):  # the card says where it fitted them
        assert bias[method]["Source"] == ("model card, fitted on validation set, predictions "
                                          "of the best epoch")
    assert bias["beheshti"]["N"] == VALIDATION_AGE.size
    assert bias["smith"]["N"] == int(fit.sum()) == 10
    metrics = sidecar["BrainAge"]["Metrics"]
    assert set(metrics) == {"uncorrected", "beheshti", "cole", "smith"}
    n = int(known.sum())
    assert metrics["uncorrected"]["N"] == n == 11
    assert metrics["uncorrected"]["MAE"] == pytest.approx(np.abs(gap[known]).mean(), abs=1e-3)
    assert metrics["uncorrected"]["r_gap_age"] < -0.5  # the simulated regression to the mean
    assert abs(metrics["smith"]["r_gap_age"]) < 0.15  # removed by the residualisation
    for values in metrics.values():
        assert {"N", "MAE", "RMSE", "r", "R2", "r_gap_age"} <= set(values)


def test_reference_group_fitting(study):
    settings = replace(study, bias_reference="group=control", model="no-such-model")
    table, sidecar = build_group(settings)  # the card is not needed with a reference
    controls = {"sub-01", "sub-02", "sub-04", "sub-08", "sub-11"}  # sub-06 failed QC
    fit = table["participant_id"].isin(controls).to_numpy()
    age = table["age"].to_numpy(float)
    gap = (table["predicted_age"] - table["age"]).to_numpy(float)
    a, b = np.polyfit(age[fit], gap[fit], 1)
    np.testing.assert_allclose(table["brain_age_gap_beheshti"][fit], (gap - (a * age + b))[fit],
                               atol=1e-6)
    # the reference group's corrected gaps average zero, the patients' need not
    assert table["brain_age_gap_beheshti"][fit].mean() == pytest.approx(0, abs=1e-6)
    bias = sidecar["BrainAge"]["BiasCorrection"]
    assert all("group=control" in bias[m]["Source"] for m in ("beheshti", "cole", "smith"))
    assert bias["beheshti"]["N"] == 6  # sub-11 has two sessions
    assert sidecar["BrainAge"]["BiasReference"] == "group=control"


def test_methods_text_names_the_records_model_with_a_reference(study, tmp_path):
    """--bias-reference needs no card for the fits, but the methods must still name the model
    that made the records: --model's card when it matches them, else what the records say."""
    from brainage_bids.group.level import group_methods_text

    settings = replace(study, bias_reference="group=control")
    _, sidecar = build_group(settings)
    text = group_methods_text(settings, sidecar).markdown()
    assert MODEL in text and SHA[:12] in text
    assert "Grad-CAM" not in text  # no saliency maps among these derivatives
    unknown = group_methods_text(replace(settings, model="no-such-model"),
                                 sidecar).markdown()
    assert MODEL in unknown and "unnamed" not in unknown
    # saliency maps found by each image's own derivative names, acquisition included
    anat = study.bids_dir / "sub-04" / "anat"
    (anat / "sub-04_T1w.nii.gz").rename(anat / "sub-04_acq-mprage_T1w.nii.gz")
    (study.output_dir / "sub-04" / "anat" / "sub-04_brainage.json").unlink()
    entities = {"subject": "04", "acquisition": "mprage"}
    write_record(study.output_dir, entities, age=45.9, predicted=47.0)
    write_image_derivatives(study.output_dir, entities)
    _, sidecar = build_group(settings)
    assert sidecar["BrainAge"]["SaliencyMaps"] is True
    assert "Grad-CAM" in group_methods_text(settings, sidecar).markdown()


@pytest.mark.parametrize(("reference", "message"), [
    ("group=astronaut", "matches no participant"),
    ("cohort=control", "no column 'cohort'"),
    ("group", "COLUMN=VALUE"),
])
def test_bad_reference_fails_clearly(study, reference, message):
    with pytest.raises(GroupError, match=message) as err:
        run_group(replace(study, bias_reference=reference))
    assert "\n" not in str(err.value)
    assert not (study.output_dir / "group_brainage.tsv").exists()


def test_no_records_and_model_mismatch(study, tmp_path):
    for record in study.output_dir.rglob("*_brainage.json"):
        record.unlink()
    with pytest.raises(GroupError, match=r"no brain-age records in .*run the participant level"):
        run_group(study)

    other = build_study(tmp_path / "other")
    card = json.loads(Path(study.model).read_text())
    card.update(name="another-model", sha256="00" * 32)
    (tmp_path / "other.json").write_text(json.dumps(card))
    with pytest.raises(GroupError, match=f"made with model.*{MODEL}"):
        run_group(replace(other, model=str(tmp_path / "other.json")))


def test_labels_select_records(study):
    table, sidecar = build_group(replace(study, participant_label=("01", "02", "03", "11"),
                                         session_label=()))
    assert sorted(set(table["participant_id"])) == ["sub-01", "sub-02", "sub-03", "sub-11"]
    assert sidecar["BrainAge"]["N"]["images"] == 5
    # Smith needs three images with ages: four here, so it is fitted
    assert sidecar["BrainAge"]["BiasCorrection"]["smith"]["N"] == 5


def test_load_card_reads_json_cards(tmp_path):
    card = write_card(tmp_path / "card.json")
    assert load_card(str(card))["sha256"] == SHA
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GroupError, match="cannot read model card"):
        load_card(str(tmp_path / "bad.json"))
    (tmp_path / "bad.json").write_text(json.dumps(
        {"bias_correction": {"beheshti": {"slope": "x", "intercept": 1}}}))
    with pytest.raises(GroupError, match=r"bad\.json: 'bias_correction.beheshti' has no"):
        load_card(str(tmp_path / "bad.json"))
    with pytest.raises(GroupError, match="model card of --model no-such-model"):
        load_card("no-such-model")  # names go through the model registry


@pytest.fixture
def restore_logging():
    """``main`` configures the package's and nipype's loggers (handlers, no propagation):
    undo it after."""
    import logging

    loggers = [logging.getLogger(name) for name in ("brainage_bids", "nipype")]
    saved = [(logger.handlers[:], logger.level, logger.propagate) for logger in loggers]
    yield
    for logger, (handlers, level, propagate) in zip(loggers, saved, strict=True):
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_cli_group_level_writes_report(study, restore_logging):
    from brainage_bids.cli.run import main

    code = main([str(study.bids_dir), str(study.output_dir), "group", "--model", study.model,
                 "--bias-method", "smith", "--skip-bids-validation"])
    assert code == 0
    html = (study.output_dir / "group_brainage.html").read_text()
    assert "Smith 2019 (main)" in html
    assert XSS not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_unfitted_card_coefficients_fall_back_to_this_group(study, tmp_path):
    """A card from a run with too few validation images stores errors, not coefficients."""
    card = {"name": MODEL, "sha256": SHA,
            "bias_correction": {m: {"error": "need at least 3 points"}
                                for m in ("beheshti", "cole")}}
    (tmp_path / "unfitted.json").write_text(json.dumps(card))
    table, sidecar = build_group(replace(study, model=str(tmp_path / "unfitted.json")))
    age = table["age"].to_numpy(float)
    pred = table["predicted_age"].to_numpy(float)
    known = np.isfinite(age)
    fit_on = known & (table["qc_pass"] != QC_FALSE).to_numpy()  # QC failures are not fitted
    a, b = np.polyfit(age[fit_on], (pred - age)[fit_on], 1)
    np.testing.assert_allclose(table["brain_age_gap_beheshti"][known],
                               ((pred - age) - (a * age + b))[known], atol=1e-6)
    assert "this group" in json.dumps(sidecar)
    from brainage_bids.reports.render import write_group_report

    html = write_group_report(tmp_path, table, sidecar).read_text()
    sources = html.split("Coefficients from</dt><dd>")[1].split("</dd>")[0]
    assert "the model card has no coefficients" in sources and "from the model card" not in html


def test_small_reference_groups_and_flat_cole_slopes_are_warned_about(caplog):
    import pandas as pd

    from brainage_bids.group.correction import bias_coefficients
    from brainage_bids.metrics import ADVISED_FIT

    age = np.linspace(20, 80, 10)
    table = pd.DataFrame({"age": age, "predicted_age": 0.3 * age + 35.0, "qc_pass": QC_TRUE})
    reference = np.ones(len(age), bool)
    with caplog.at_level("WARNING", logger="brainage_bids"):
        out = bias_coefficients(table, card=None, reference=reference,
                                reference_spec="group=control", model_spec=MODEL)
    text = caplog.text
    assert "the reference group group=control use only 10 image(s)" in text
    assert f"fewer than about {ADVISED_FIT}" in text
    assert "fitted slope 0.30" in text and "multiplied by 3.3" in text
    assert out["cole"]["Coefficients"]["slope"] == pytest.approx(0.3)
    caplog.clear()
    big = pd.DataFrame({"age": np.linspace(20, 80, ADVISED_FIT), "qc_pass": QC_TRUE})
    big["predicted_age"] = 0.9 * big["age"] + 5.0
    with caplog.at_level("WARNING", logger="brainage_bids"):
        bias_coefficients(big, card=None, reference=np.ones(len(big), bool),
                          reference_spec="group=control", model_spec=MODEL)
    assert "use only" not in caplog.text and "fitted slope" not in caplog.text


def test_card_coefficients_fitted_on_few_images_are_warned_about(caplog):
    """v1's card (24 validation images) gets the warning; v2's (120 out of fold) does not;
    a reference group replaces the card's fit, so then there is nothing to warn about."""
    import pandas as pd

    from brainage_bids.group.correction import bias_coefficients
    from brainage_bids.model.weights import read_card

    models = Path(__file__).resolve().parents[1] / "brainage_bids" / "data" / "models"
    v1, v2 = (read_card(models / f"ixi-2mm-{v}.json") for v in ("v1", "v2"))
    age = np.linspace(20, 80, 50)
    table = pd.DataFrame({"age": age, "predicted_age": 0.8 * age + 10.0, "qc_pass": QC_TRUE})
    with caplog.at_level("WARNING", logger="brainage_bids"):
        out = bias_coefficients(table, card=v1, reference=None, reference_spec=None,
                                model_spec="ixi-2mm-v1")
    assert ("model ixi-2mm-v1: its bias correction was fitted on validation set, predictions "
            "of the best epoch, only 24 image(s)") in caplog.text
    assert out["beheshti"]["Source"].startswith("model card")  # still used, with the warning
    for card, reference in ((v2, None), (v1, np.ones(len(age), bool))):
        caplog.clear()
        with caplog.at_level("WARNING", logger="brainage_bids"):
            bias_coefficients(table, card=card, reference=reference,
                              reference_spec=None if reference is None else "group=control",
                              model_spec=card["name"])
        assert "its bias correction was fitted on" not in caplog.text

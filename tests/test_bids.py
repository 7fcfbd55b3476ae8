"""pybids queries, ages from participants.tsv/sessions.tsv, derivative names."""

from __future__ import annotations

import pytest

from brainage_bids.bids import (
    BIDSError,
    collect_t1w,
    load_layout,
    parse_age,
    read_ages,
    write_dataset_description,
)
from brainage_bids.derivatives import derivative_name, derivative_path

from .conftest import read_json


def test_collects_sample_with_ages(sample_bids):
    images = collect_t1w(load_layout(sample_bids))
    assert [i.subject for i in images] == ["IXI012", "IXI013", "IXI252", "IXI254"]
    assert images[0].age == pytest.approx(38.78)
    assert images[0].name == "sub-IXI012"


def test_sessions_runs_and_session_ages(tiny_bids):
    images = collect_t1w(load_layout(tiny_bids), participant_label=("IXI012",))
    assert [i.name for i in images] == ["sub-IXI012_ses-A_run-1", "sub-IXI012_ses-B_run-1"]
    assert [i.age for i in images] == [pytest.approx(38.78), pytest.approx(40.10)]
    only_b = collect_t1w(load_layout(tiny_bids), session_label=("B",))
    assert [i.session for i in only_b] == ["B"]


def test_missing_age_is_none(tiny_bids):
    images = collect_t1w(load_layout(tiny_bids), participant_label=("IXI013",))
    assert images[0].age is None


def test_unknown_labels_and_no_t1w(tiny_bids):
    layout = load_layout(tiny_bids)
    with pytest.raises(BIDSError, match="sub-XYZ"):
        collect_t1w(layout, participant_label=("XYZ",))
    with pytest.raises(BIDSError, match="ses-C"):
        collect_t1w(layout, session_label=("C",))
    with pytest.raises(BIDSError, match="no T1w"):
        collect_t1w(layout, filters={"t1w": {"acquisition": "none"}})


def test_non_numeric_and_negative_ages_fail(tiny_bids):
    (tiny_bids / "participants.tsv").write_text("participant_id\tage\nsub-IXI012\tforty\n")
    with pytest.raises(BIDSError, match="forty"):
        read_ages(tiny_bids)
    with pytest.raises(BIDSError, match="not a valid age"):
        parse_age("-3", where="x")
    assert parse_age("n/a", where="x") is None and parse_age("", where="x") is None


def test_derivative_names_follow_entity_order():
    src = {"subject": "01", "session": "A", "run": 2, "acquisition": "mprage"}
    name = derivative_name(src, suffix="T1w", extension=".nii.gz", space="MNI152NLin6Asym",
                           res="2", desc="preproc")
    assert name == ("sub-01_ses-A_acq-mprage_run-2_space-MNI152NLin6Asym_res-2_desc-preproc"
                    "_T1w.nii.gz")
    xfm = derivative_name({"subject": "01"}, suffix="xfm", extension="mat",
                          **{"from": "T1w", "to": "MNI152NLin6Asym", "mode": "image"})
    assert xfm == "sub-01_from-T1w_to-MNI152NLin6Asym_mode-image_xfm.mat"
    path = derivative_path("/out", src, suffix="brainage", extension=".json")
    assert str(path) == "/out/sub-01/ses-A/anat/sub-01_ses-A_acq-mprage_run-2_brainage.json"
    with pytest.raises(ValueError, match="unknown"):
        derivative_name(src, suffix="T1w", extension=".nii", bogus="x")


def test_dataset_description(sample_bids, tmp_path):
    desc = read_json(write_dataset_description(tmp_path, sample_bids))
    assert desc["DatasetType"] == "derivative"
    assert desc["GeneratedBy"][0]["Name"] == "brainage-bids"
    assert desc["SourceDatasets"][0]["URL"].startswith("file://")
    assert desc["SourceDatasets"][0]["License"] == "CC BY-SA 3.0"

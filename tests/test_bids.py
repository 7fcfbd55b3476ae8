"""pybids queries, ages from participants.tsv/sessions.tsv, derivative names."""

from __future__ import annotations

import shutil

import pytest

from brainage_bids.bids import (
    BIDSError,
    collect_t1w,
    load_layout,
    parse_age,
    read_age_table,
    read_ages,
    read_tsv,
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


def test_non_numeric_and_negative_ages_are_recorded_not_raised(tiny_bids):
    (tiny_bids / "participants.tsv").write_text("participant_id\tage\nsub-IXI012\tforty\n")
    table = read_age_table(tiny_bids)
    assert table.ages[("IXI012", None)] is None
    assert "participants.tsv line 2: age 'forty' is not a number" in table.problems[
        ("IXI012", None)]
    with pytest.raises(BIDSError, match="not a valid age"):
        parse_age("-3", where="x")
    assert parse_age("n/a", where="x") is None and parse_age("", where="x") is None


@pytest.mark.parametrize(("value", "reason"), [
    ("abc", "age 'abc' is not a number"),
    ("-5", "age '-5' is not a valid age in years (expected 0 to 120"),
    ("45,5", "age '45,5' is not a number (write decimals with a point: 45.5)"),
    ("250", "age '250' is not a valid age in years"),
    ("1_000", "is not a number"),
    ("inf", "is not a number"),
])
def test_bad_age_belongs_to_its_participant_only(tiny_bids, value, reason):
    tsv = tiny_bids / "participants.tsv"
    tsv.write_text(f"participant_id\tage\nsub-IXI012\t38.78\nsub-IXI013\t{value}\n")
    layout = load_layout(tiny_bids)
    # a participant that is not selected never sees the other's bad age
    chosen = collect_t1w(layout, participant_label=("IXI012",), session_label=("A",))
    assert chosen[0].age_problem is None
    bad = collect_t1w(layout, participant_label=("IXI013",))[0]
    assert bad.age is None
    assert bad.age_problem.startswith(f"{tsv} line 3: ") and reason in bad.age_problem


def test_ages_at_the_limits_are_valid():
    assert parse_age("0", where="x") == 0 and parse_age("120", where="x") == 120
    assert parse_age(" 45.5 ", where="x") == 45.5 and parse_age("4.5e1", where="x") == 45


def test_a_quote_is_an_ordinary_character(tiny_bids):
    """BIDS TSV has no quoting: a cell starting with a quote must not swallow the next row."""
    (tiny_bids / "participants.tsv").write_text(
        'participant_id\tage\tnote\nsub-IXI012\t38.78\t"unclosed\nsub-IXI013\t50\tx\n')
    table = read_tsv(tiny_bids / "participants.tsv", id_column="participant_id")
    assert [row["participant_id"] for row in table.rows] == ["sub-IXI012", "sub-IXI013"]
    assert table.rows[0]["note"] == '"unclosed' and table.lines == [2, 3]
    assert read_age_table(tiny_bids).ages[("IXI013", None)] == 50


@pytest.mark.parametrize(("text", "message"), [
    ("subject\tage\nsub-IXI012\t40\n", "has no 'participant_id' column"),
    ("participant_id\tage\nsub-IXI012\t40\nsub-IXI013\t41\nsub-IXI012\t42\n",
     "lines 2 and 4: participant_id sub-IXI012 appears twice"),
    ("participant_id\tage\nsub-IXI012\t40\nIXI012\t42\n",
     "lines 2 and 3: participant_id sub-IXI012 appears twice"),
    ("participant_id\tage\nsub-IXI012\t40\nsub-IXI013 41\n",
     "line 3: 1 cell(s), but line 1 names 2 column(s)"),
    ("participant_id\tage\tage\nsub-IXI012\t40\t40\n", "column 'age' appears twice"),
    ("", "line 1: empty"),
])
def test_malformed_participants_tsv_names_file_and_line(tiny_bids, text, message):
    tsv = tiny_bids / "participants.tsv"
    tsv.write_text(text)
    with pytest.raises(BIDSError) as exc:
        collect_t1w(load_layout(tiny_bids), participant_label=("IXI013",))
    assert str(exc.value).startswith(str(tsv)) and message in str(exc.value), exc.value


def test_not_utf8_names_file_and_line(tiny_bids):
    tsv = tiny_bids / "participants.tsv"
    tsv.write_bytes(b"participant_id\tage\nsub-IXI012\t40\nsub-IXI013\t\xff\n")
    with pytest.raises(BIDSError, match=r"line 3: not UTF-8"):
        read_age_table(tiny_bids)


def test_bad_session_age_belongs_to_its_session(tiny_bids):
    sessions = tiny_bids / "sub-IXI012" / "sub-IXI012_sessions.tsv"
    sessions.write_text("session_id\tage\nses-A\t38.78\nses-B\t4O.1\n")
    images = collect_t1w(load_layout(tiny_bids), participant_label=("IXI012",))
    assert images[0].age == pytest.approx(38.78) and images[0].age_problem is None
    # no fallback to participants.tsv: the session's own age is wrong, not unknown
    assert images[1].age is None
    assert images[1].age_problem == f"{sessions} line 3: age '4O.1' is not a number"


def test_a_session_age_of_na_is_unknown_not_the_participants(tiny_bids):
    """participants.tsv's age may be the first session's: a follow-up that sessions.tsv marks
    n/a must not silently get it."""
    sessions = tiny_bids / "sub-IXI012" / "sub-IXI012_sessions.tsv"
    sessions.write_text("session_id\tage\nses-A\tn/a\n")  # ses-B has no row
    images = collect_t1w(load_layout(tiny_bids), participant_label=("IXI012",))
    assert [(i.session, i.age, i.age_problem) for i in images] == [
        ("A", None, None), ("B", pytest.approx(38.78), None)]


def test_an_unreadable_sessions_tsv_belongs_to_its_participant(tiny_bids):
    sessions = tiny_bids / "sub-IXI012" / "sub-IXI012_sessions.tsv"
    sessions.write_text("session_id\tage\nses-A\t38.78\nses-A\t40\n")
    images = collect_t1w(load_layout(tiny_bids))
    problem = (f"{sessions} lines 2 and 3: session_id ses-A appears twice "
               "(one row per session_id only)")
    assert [(i.name, i.age, i.age_problem) for i in images] == [
        ("sub-IXI012_ses-A_run-1", None, problem), ("sub-IXI012_ses-B_run-1", None, problem),
        ("sub-IXI013", None, None)]
    sessions.write_text("session_id\tage\nses-A\t38.78\t1\n")
    assert "line 2: 3 cell(s)" in collect_t1w(load_layout(tiny_bids))[0].age_problem
    with pytest.raises(BIDSError, match="line 2: 3 cell"):  # evaluations need every age
        read_ages(tiny_bids)


def test_no_age_column_is_said(tiny_bids, caplog):
    (tiny_bids / "participants.tsv").write_text("participant_id\tage \nsub-IXI012\t38\n")
    images = collect_t1w(load_layout(tiny_bids), participant_label=("IXI013",))
    assert images[0].age is None
    assert "participants.tsv has no age column" in caplog.text and "'age '" in caplog.text


def test_chunks_get_their_own_names_and_clashing_names_are_refused(tiny_bids):
    anat = tiny_bids / "sub-IXI013" / "anat"
    for chunk in (1, 2):
        shutil.copy(anat / "sub-IXI013_T1w.nii.gz", anat / f"sub-IXI013_chunk-{chunk}_T1w.nii.gz")
    (anat / "sub-IXI013_T1w.nii.gz").unlink()
    images = collect_t1w(load_layout(tiny_bids), participant_label=("IXI013",))
    assert [i.name for i in images] == ["sub-IXI013_chunk-1", "sub-IXI013_chunk-2"]
    assert derivative_name(images[0].entities, suffix="T1w", extension=".nii.gz",
                           space="MNI152NLin6Asym", res="2", desc="preproc") == (
        "sub-IXI013_space-MNI152NLin6Asym_chunk-1_res-2_desc-preproc_T1w.nii.gz")
    # a desc in an unvalidated dataset is not carried into derivative names: two images
    # that differ only in it would overwrite each other's outputs
    shutil.copy(anat / "sub-IXI013_chunk-1_T1w.nii.gz",
                anat / "sub-IXI013_chunk-1_desc-x_T1w.nii.gz")
    with pytest.raises(BIDSError, match=r"sub-IXI013_chunk-1_T1w.nii.gz, "
                                        r"sub-IXI013_chunk-1_desc-x_T1w.nii.gz would all write "
                                        r"the derivatives of sub-IXI013_chunk-1"):
        collect_t1w(load_layout(tiny_bids, validate=False), participant_label=("IXI013",))


def test_a_directory_named_like_a_t1w_is_collected_not_skipped(tiny_bids):
    folder = tiny_bids / "sub-IXI099" / "anat" / "sub-IXI099_T1w.nii.gz"
    folder.mkdir(parents=True)
    layout = load_layout(tiny_bids)
    images = collect_t1w(layout)
    assert "sub-IXI099" in [im.name for im in images]
    only = collect_t1w(layout, participant_label=("IXI099",))
    assert [im.path for im in only] == [folder]
    assert collect_t1w(layout, participant_label=("IXI013",))[0].subject == "IXI013"


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

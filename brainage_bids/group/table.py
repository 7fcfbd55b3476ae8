"""The group table: one row per record, every column described, written as BIDS TSV."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from brainage_bids.derivatives import QC_FALSE, QC_TRUE
from brainage_bids.io import atomic_path

TABLE_NAME = "group_brainage"
NA = "n/a"
#: Prefix of participants.tsv columns whose names clash with the table's own columns.
CLASH_PREFIX = "participants_"

YEARS = {"Units": "year"}
CORE_COLUMNS: dict[str, dict[str, Any]] = {
    "participant_id": {"Description": "Participant label (sub-<label>), as in participants.tsv"},
    "session_id": {"Description": "Session label (ses-<label>) of the T1w image; n/a for a "
                                  "dataset without sessions"},
    "run": {"Description": "Run index of the T1w image; n/a when the image has no run entity"},
    "age": {"Description": "Chronological age at the scan (sessions.tsv when it gives one for "
                           "the session, else participants.tsv)", **YEARS},
    "predicted_age": {"Description": "Brain age predicted by the model with dropout off "
                                     "(for an ensemble the mean of its members' predictions;"
                                     " averaged over the test-time views the model card asks"
                                     " for; the Monte-Carlo dropout samples give only "
                                     "uncertainty_sd)", **YEARS},
    "brain_age_gap": {"Description": "Uncorrected brain-age gap: predicted_age - age", **YEARS},
    "brain_age_gap_beheshti": {"Description": "Brain-age gap corrected as in Beheshti et al. "
                                              "2019: gap - (a*age + b), with a, b fitted on "
                                              "gap = a*age + b", **YEARS},
    "brain_age_gap_cole": {"Description": "Brain-age gap corrected as in de Lange & Cole 2020:"
                                          " predicted_age_cole - age", **YEARS},
    "brain_age_gap_smith": {"Description": "Brain-age gap corrected as in Smith et al. 2019: "
                                           "residual of the gap regressed on age, always "
                                           "fitted on this group (or the reference group)",
                            **YEARS},
    "predicted_age_cole": {"Description": "Bias-corrected predicted age of de Lange & Cole "
                                          "2020: (predicted_age - b)/a, with a, b fitted on "
                                          "predicted_age = a*age + b (needs no age)", **YEARS},
    "uncertainty_sd": {"Description": "Prediction uncertainty in years (the record's "
                                      "uncertainty.sd). A single model: k x the SD of its "
                                      "Monte-Carlo dropout predictions. An ensemble: "
                                      "sqrt((k x MC-dropout SD)^2 + SD of the members' "
                                      "predictions^2), or k x their combined spread when "
                                      "the card's uncertainty.scaled is raw_sd. k is the "
                                      "model card's scale, fitted on predictions the model "
                                      "was not trained on; without one, the raw spread. "
                                      "The records' uncertainty entry has each part",
                       **YEARS},
    "qc_pass": {"Description": "Whether the image passed the participant level's "
                               "quality control (registration, and the input intensities "
                               "against the model's training inputs when its card has "
                               "them)",
                "Levels": {QC_TRUE: "passed", QC_FALSE: "failed: check the participant report "
                                                      "before using this prediction"}},
}
MODEL_COLUMNS: dict[str, dict[str, Any]] = {
    "model_name": {"Description": "Name of the brain-age model (model card) that made the "
                                  "prediction"},
    "model_sha256": {"Description": "SHA-256 checksum of the model's weights file"},
}
#: Descriptions of QC measures we know; others are described generically.
QC_DESCRIPTIONS: dict[str, dict[str, Any]] = {
    "dice_template": {"Description": "Dice overlap of the registered brain mask with the "
                                     "MNI152NLin6Asym brain mask (1 = identical)"},
    "correlation": {"Description": "Pearson correlation of the registered brain with the "
                                   "template brain inside the template mask"},
    "mask_volume_ml": {"Description": "Volume of the native-space brain mask", "Units": "mL"},
    "mask_mni_volume_ml": {"Description": "Volume of the brain mask in MNI152NLin6Asym space "
                                          "(after the 12-dof affine)", "Units": "mL"},
    "intensity_distance": {"Description": "Mean absolute difference between the percentiles "
                                          "of the normalised intensities inside the brain "
                                          "and those of the model's training inputs (model "
                                          "card input_reference), in within-brain SDs; "
                                          "above the card's threshold the image fails QC"},
}

def _number(value: Any) -> float:
    if value is None or isinstance(value, bool):
        return math.nan
    try:
        out = float(value)
    except (TypeError, ValueError):
        return math.nan
    return out if math.isfinite(out) else math.nan


def _flatten_numeric(qc: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric QC measures, nested dictionaries flattened with underscores."""
    out: dict[str, float] = {}
    for key, value in qc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_numeric(value, f"{name}_"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = _number(value)
    return out


def records_table(records: list[dict[str, Any]]) -> tuple[pd.DataFrame, list[str]]:
    """One row per record with the core columns and the numeric QC measures.

    Returns the table and the QC measure names (``qc_<name>`` columns).
    """
    rows, qc_names = [], []
    for record in records:
        qc = record.get("qc") or {}
        measures = _flatten_numeric({k: v for k, v in qc.items() if k != "qc_pass"})
        for name in measures:
            if name not in qc_names:
                qc_names.append(name)
        passed = qc.get("qc_pass")
        model = record.get("model") or {}
        rows.append({
            "participant_id": record.get("participant_id"),
            "session_id": record.get("session_id"),
            "run": record.get("run"),
            "age": _number(record.get("chronological_age")),
            "predicted_age": _number(record.get("predicted_age")),
            "uncertainty_sd": _number((record.get("uncertainty") or {}).get("sd")),
            "qc_pass": None if passed is None else (QC_TRUE if passed else QC_FALSE),
            **{f"qc_{name}": value for name, value in measures.items()},
            "model_name": model.get("name"),
            "model_sha256": model.get("sha256"),
        })
    table = pd.DataFrame(rows)
    # records without a run beside records with one: pandas reads the column as floats
    # with NaN, so every missing value is tested with isna, not `is None`
    table["run"] = pd.array([None if pd.isna(r) else int(r) for r in table["run"]],
                            dtype="Int64")
    table["brain_age_gap"] = table["predicted_age"] - table["age"]
    table = table.sort_values(["participant_id", "session_id", "run"], na_position="first",
                              kind="stable").reset_index(drop=True)
    return table, qc_names


def merge_participants(table: pd.DataFrame, participants: pd.DataFrame,
                       described: dict[str, Any]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Append every participants.tsv column (renamed on a clash) and describe each one."""
    extra = participants.copy()
    taken = set(table.columns) | set(extra.columns)
    renames = {}
    for c in extra.columns:
        if c != "participant_id" and c in table.columns:
            new = f"{CLASH_PREFIX}{c}"
            while new in taken:  # participants.tsv may hold 'age' and 'participants_age'
                new = f"{CLASH_PREFIX}{new}"
            renames[c] = new
            taken.add(new)
    extra = extra.rename(columns=renames)
    merged = table.merge(extra, on="participant_id", how="left")
    descriptions: dict[str, Any] = {}
    for original in participants.columns:
        if original == "participant_id":
            continue
        column = renames.get(original, original)
        entry = described.get(original)
        entry = dict(entry) if isinstance(entry, dict) else {}
        note = f"participants.tsv column {original!r}"
        if original in renames:
            note += " (renamed: the table has its own column of that name)"
        entry["Description"] = (f"{entry['Description']} [{note}]" if entry.get("Description")
                                else f"From {note}; not described in participants.json")
        descriptions[column] = entry
    for column in extra.columns:
        if column != "participant_id":
            merged[column] = merged[column].replace("", None)
    return merged, descriptions


def describe_columns(columns: list[str], qc_names: list[str],
                     participant_columns: dict[str, Any]) -> dict[str, Any]:
    """A BIDS sidecar entry for every column of the table, in table order."""
    known = {**CORE_COLUMNS, **MODEL_COLUMNS, **participant_columns}
    for name in qc_names:
        known[f"qc_{name}"] = QC_DESCRIPTIONS.get(name) or {
            "Description": f"Quality-control measure {name!r} of the participant level "
                           "(the 'qc' section of the image's brain-age record)"}
    missing = [c for c in columns if c not in known]
    if missing:  # a programming error: every column must be described
        raise RuntimeError(f"undescribed group-table columns: {missing}")
    return {column: known[column] for column in columns}


def write_table(table: pd.DataFrame, target: Path) -> Path:
    """TSV with BIDS ``n/a`` for missing values, numbers rounded for reading, atomically."""
    out = table.copy()
    for column in out.columns:
        if pd.api.types.is_float_dtype(out[column]):
            out[column] = out[column].round(4)
    with atomic_path(target) as tmp:
        out.to_csv(tmp, sep="\t", index=False, na_rep=NA, lineterminator="\n")
    return target

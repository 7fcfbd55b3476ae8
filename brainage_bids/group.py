"""Group level: gather the per-image brain-age records, correct the gap's age bias, tabulate.

Records are found from the BIDS dataset's T1w images through
:func:`brainage_bids.derivatives.derivative_path`, the same naming the participant level
used, so the selection (labels, filters) means the same at both levels and no file name is
guessed. Outputs, each written atomically: ``group_brainage.tsv`` (one row per image, BIDS
``n/a`` for missing values), its sidecar ``group_brainage.json`` (every column described,
plus the metrics and the bias-correction coefficients with their origin) and
``group_brainage.html``.

Bias correction (DESIGN.md §4): Beheshti and de Lange & Cole use the model card's
coefficients (fitted on the training run's held-out predictions: out of fold for an
ensemble, the validation set for a single model) unless a reference group
is given (``--bias-reference group=control``), in which case every method is fitted on the
reference participants. Smith's correction is a residualisation of the gap on age, so it is
always fitted on this data set (the reference group, or every image with a known age).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from brainage_bids import __version__
from brainage_bids.config import BIAS_METHODS, Settings, parse_reference
from brainage_bids.derivatives import QC_FALSE, QC_TRUE, derivative_path
from brainage_bids.io import atomic_path, atomic_write_json
from brainage_bids.metrics import ADVISED_FIT, card_fit_warning

LOG = logging.getLogger(__name__)

TABLE_NAME = "group_brainage"
NA = "n/a"
#: Smallest number of images with ages for fitting a bias correction on the data.
MIN_FIT = 3
#: A de Lange & Cole slope below this multiplies the errors by more than 2.
LOW_COLE_SLOPE = 0.5
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
METRIC_NAMES = {"n": "N", "mae": "MAE", "rmse": "RMSE", "r": "r", "r2": "R2",
                "r_gap_age": "r_gap_age", "mean_gap": "mean_gap"}


class GroupError(Exception):
    """A group-level request that cannot be served; the message is shown as one line."""


# --- inputs ---------------------------------------------------------------------------------


def load_card(spec: str) -> dict[str, Any]:
    """The model card for ``spec``: a ``.json`` card read directly, else via ``load_model``.

    Only the card is needed at group level (its bias-correction coefficients, name and
    checksum); reading a card file directly avoids loading the weights.
    """
    path = Path(spec).expanduser()
    from brainage_bids.model.weights import ModelError, load_model, parse_card

    if path.suffix == ".json" and path.is_file():
        try:
            return parse_card(path)
        except ModelError as err:
            raise GroupError(str(err)) from None

    try:
        return load_model(str(path.resolve()) if path.exists() else spec, device="cpu")[1]
    except Exception as err:  # the loader raises several types for a bad spec
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise GroupError(f"cannot load the model card of --model {spec}: {message}") from None


def record_path(output_dir: Path, image: Any) -> Path:
    """Where the participant level writes an image's brain-age record."""
    return derivative_path(output_dir, image.entities, suffix="brainage", extension=".json")


def find_records(settings: Settings) -> tuple[list[Any], list[str]]:
    """The selected T1w images that have a brain-age record (:func:`record_path`), and the
    names of the selected images that have none."""
    from brainage_bids.bids import collect_t1w, load_layout

    layout = load_layout(settings.bids_dir, validate=not settings.skip_bids_validation,
                         index_metadata=bool(settings.bids_filters))
    images = collect_t1w(layout, participant_label=settings.participant_label,
                         session_label=settings.session_label, filters=settings.bids_filters)
    has_record = [record_path(settings.output_dir, image).is_file() for image in images]
    found = [image for image, has in zip(images, has_record, strict=True) if has]
    missing = [image.name for image, has in zip(images, has_record, strict=True) if not has]
    if missing:
        LOG.info("%d of %d selected T1w image(s) have no brain-age record (not processed, "
                 "or failed)", len(missing), len(images))
    return found, missing


def record_problem(record: Any) -> str | None:
    """What makes a parsed record unusable for the table (``None`` when it is usable)."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    participant = record.get("participant_id")
    if not isinstance(participant, str) or not participant.startswith("sub-"):
        return f"participant_id {participant!r} is not a 'sub-<label>' string"
    predicted = record.get("predicted_age")
    if isinstance(predicted, bool) or not isinstance(predicted, (int, float)) or not (
            math.isfinite(predicted)):
        return f"predicted_age {predicted!r} is not a number"
    age = record.get("chronological_age")
    if age is not None and (isinstance(age, bool) or not isinstance(age, (int, float))):
        return f"chronological_age {age!r} is neither a number nor null"
    run = record.get("run")
    if run is not None and (isinstance(run, bool) or not isinstance(run, int)):
        return f"run {run!r} is neither an integer nor null"
    session = record.get("session_id")
    if session is not None and not isinstance(session, str):
        return f"session_id {session!r} is neither a string nor null"
    for section in ("qc", "model", "uncertainty"):
        if record.get(section) is not None and not isinstance(record[section], dict):
            return f"{section!r} is not a JSON object"
    return None


def read_records(paths: list[Path], *, skip_unreadable: bool = False) -> list[dict[str, Any]]:
    """Parse every record; each one that cannot be read is named.

    A record that cannot be read (truncated JSON, the wrong schema) would leave its image out
    of the table without a word, so it is an error (:class:`GroupError`) after every such
    record has been named in the log; with ``skip_unreadable`` the table is written without
    them (each still named as a warning).
    """
    records: list[dict[str, Any]] = []
    problems: list[tuple[Path, str]] = []
    for path in paths:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            problems.append((path, f"not valid JSON (truncated?): {err}"))
            continue
        except (OSError, UnicodeDecodeError) as err:
            problems.append((path, f"cannot be read: {err}"))
            continue
        problem = record_problem(record)
        if problem is not None:
            problems.append((path, f"not a brain-age record: {problem}"))
            continue
        records.append(record)
    for path, problem in problems:
        LOG.log(logging.WARNING if skip_unreadable else logging.ERROR, "%s: %s", path, problem)
    if problems and not skip_unreadable:
        raise GroupError(f"{len(problems)} brain-age record(s) cannot be read (each named "
                         f"above; the first: {problems[0][0]}); rerun the participant level "
                         "for them, or pass --skip-unreadable to write the table without "
                         "them")
    if problems:
        LOG.warning("the group table leaves out %d unreadable record(s) (--skip-unreadable)",
                    len(problems))
    return records


def read_participants(bids_dir: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """participants.tsv as strings (kept exactly as written) and participants.json.

    Read by the BIDS TSV rules (:func:`brainage_bids.bids.read_tsv`: tabs, no quoting), so a
    malformed file is an error naming the file and the line, never a silently shifted row.
    """
    from brainage_bids.bids import BIDSError, read_tsv

    tsv, sidecar = bids_dir / "participants.tsv", bids_dir / "participants.json"
    table = pd.DataFrame(columns=["participant_id"], dtype=object)
    if tsv.exists():
        try:
            parsed = read_tsv(tsv, id_column="participant_id")
        except BIDSError as err:
            raise GroupError(str(err)) from None
        table = pd.DataFrame(parsed.rows, columns=parsed.columns, dtype=object)
    described: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            described = json.loads(sidecar.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            LOG.warning("ignoring unreadable %s", sidecar)
    table["participant_id"] = [p if p.startswith("sub-") else f"sub-{p}"
                               for p in table["participant_id"].str.strip()]
    duplicated = table["participant_id"].duplicated(keep=False)
    if duplicated.any():  # "sub-01" and "01" in one file
        raise GroupError(f"{tsv}: participant_id {table['participant_id'][duplicated].iloc[0]} "
                         "appears twice")
    return table, described if isinstance(described, dict) else {}


# --- the table ------------------------------------------------------------------------------


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


def reference_rows(table: pd.DataFrame, participants: pd.DataFrame, spec: str) -> np.ndarray:
    """Boolean selection of the images of the reference participants."""
    try:
        column, value = parse_reference(spec)
    except ValueError as err:
        raise GroupError(str(err)) from None
    if column not in participants.columns:
        known = ", ".join(c for c in participants.columns if c != "participant_id") or "none"
        raise GroupError(f"--bias-reference {spec}: participants.tsv has no column {column!r} "
                         f"(its columns: {known})")
    members = set(participants.loc[participants[column].str.strip() == value,
                                   "participant_id"])
    selected = table["participant_id"].isin(members).to_numpy()
    if not selected.any():
        raise GroupError(f"--bias-reference {spec} matches no participant with a brain-age "
                         "record")
    return selected


def _fit_mask(table: pd.DataFrame, subset: np.ndarray | None) -> np.ndarray:
    """Images usable for fitting: known age, a prediction, and not failing QC."""
    ok = np.isfinite(table["age"].to_numpy(float)) & np.isfinite(
        table["predicted_age"].to_numpy(float))
    ok &= (table["qc_pass"] != QC_FALSE).to_numpy()
    return ok if subset is None else ok & subset


def bias_coefficients(table: pd.DataFrame, *, card: dict[str, Any] | None,
                      reference: np.ndarray | None, reference_spec: str | None,
                      model_spec: str) -> dict[str, dict[str, Any]]:
    """Coefficients of each method and where they come from (for the sidecar)."""
    from brainage_bids.metrics import fit_bias

    age = table["age"].to_numpy(float)
    pred = table["predicted_age"].to_numpy(float)
    fit_on = _fit_mask(table, reference)
    card_bias = (card or {}).get("bias_correction") or {}
    out: dict[str, dict[str, Any]] = {}
    n_fit = int(fit_on.sum())
    if MIN_FIT <= n_fit < ADVISED_FIT:
        where = (f"the reference group {reference_spec}" if reference is not None
                 else "this group")
        LOG.warning("bias corrections fitted on %s use only %d image(s): with fewer than about "
                    "%d the fitted slope is unstable and corrected gaps can be further off than "
                    "uncorrected ones (docs/fine-tuning.md)", where, n_fit, ADVISED_FIT)
    if reference is None and card and (warning := card_fit_warning(card)):
        LOG.warning("%s", warning)
    fitted_on = card_bias.get("fitted_on") or "the training run's held-out images"
    for method in BIAS_METHODS:
        fitted = card_bias.get(method)
        if (reference is None and method != "smith" and isinstance(fitted, dict)
                and "error" not in fitted):  # an "error" entry: too few validation images
            out[method] = {"Source": f"model card, fitted on {fitted_on}",
                           "Model": (card or {}).get("name"),
                           "ModelSpec": model_spec, "N": card_bias[method].get("n"),
                           "Coefficients": card_bias[method]}
            continue
        if reference is not None:
            source = f"fitted on the reference group {reference_spec}"
        elif method == "smith":
            source = "fitted on this group's images (Smith's correction is a residualisation)"
        else:
            source = "fitted on this group's images (the model card has no coefficients)"
            LOG.warning("model card has no %s coefficients: fitting them on this group", method)
        if n_fit < MIN_FIT:
            if reference is not None:
                raise GroupError(f"--bias-reference {reference_spec}: only {n_fit} image(s) with"
                                 f" a known age and passing QC; at least {MIN_FIT} are needed")
            LOG.warning("%s correction skipped: only %d image(s) with a known age", method,
                        n_fit)
            out[method] = {"Source": f"not available: fewer than {MIN_FIT} images with a "
                                     "known age", "N": n_fit, "Coefficients": None}
            continue
        try:
            coefs = fit_bias(method, age[fit_on], pred[fit_on])
        except ValueError as err:  # e.g. every reference age equal
            if reference is not None:
                raise GroupError(f"--bias-reference {reference_spec}: {err}") from None
            LOG.warning("%s correction skipped: %s", method, err)
            out[method] = {"Source": f"not available: {err}", "N": n_fit,
                           "Coefficients": None}
            continue
        if method == "cole" and coefs["slope"] < LOW_COLE_SLOPE:
            LOG.warning("cole correction: fitted slope %.2f; the corrected age divides by it, "
                        "so prediction errors are multiplied by %.1f", coefs["slope"],
                        abs(1 / coefs["slope"]))
        out[method] = {"Source": source, "N": n_fit, "ExcludesQCFailures": True,
                       "Coefficients": coefs}
    return out


def apply_corrections(table: pd.DataFrame,
                      coefficients: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """Add ``brain_age_gap_<method>`` and ``predicted_age_cole`` columns."""
    from brainage_bids.metrics import apply_bias

    age = table["age"].to_numpy(float)
    pred = table["predicted_age"].to_numpy(float)
    known = np.isfinite(age) & np.isfinite(pred)
    table = table.copy()
    for method in BIAS_METHODS:
        column = np.full(len(table), np.nan)
        coefs = coefficients.get(method, {}).get("Coefficients")
        if coefs is not None and known.any():
            column[known] = apply_bias(method, coefs, age[known], pred[known])
        table[f"brain_age_gap_{method}"] = column
    cole = coefficients.get("cole", {}).get("Coefficients")
    corrected = np.full(len(table), np.nan)
    has_pred = np.isfinite(pred)
    if cole is not None and has_pred.any():
        # the corrected gap is corrected P - Y, so Y = 0 gives corrected P, age or not
        corrected[has_pred] = apply_bias("cole", cole, np.zeros(int(has_pred.sum())),
                                         pred[has_pred])
    table["predicted_age_cole"] = corrected
    return table


def group_metrics(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Accuracy and age-bias of the uncorrected and each corrected prediction."""
    from brainage_bids.metrics import regression_metrics

    age = table["age"].to_numpy(float)
    out: dict[str, dict[str, Any]] = {}
    for name, gap_column in [("uncorrected", "brain_age_gap"),
                             *[(m, f"brain_age_gap_{m}") for m in BIAS_METHODS]]:
        gap = table[gap_column].to_numpy(float)
        ok = np.isfinite(age) & np.isfinite(gap)
        if ok.sum() < 2:
            continue
        metrics = regression_metrics(age[ok], age[ok] + gap[ok])
        out[name] = {METRIC_NAMES.get(k, k): _plain(v) for k, v in metrics.items()}
    return out


def _plain(value: Any) -> Any:
    """JSON-safe plain value: rounded floats, ``None`` for NaN."""
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else round(float(value), 4)
    return value


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


# --- the level ------------------------------------------------------------------------------


def build_group(settings: Settings, *, card: dict[str, Any] | None = None,
                ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The group table and its sidecar (nothing written): the testable core of the level.

    ``card`` is ``--model``'s card when the caller has loaded it already (else it is loaded
    here, unless ``--bias-reference`` makes it unnecessary).
    """
    from brainage_bids.templates import TEMPLATE

    images, without_record = find_records(settings)
    records = read_records([record_path(settings.output_dir, image) for image in images],
                           skip_unreadable=settings.skip_unreadable)
    if not records:
        who = (" for " + ", ".join(f"sub-{s}" for s in settings.participant_label)
               if settings.participant_label else "")
        raise GroupError(f"no brain-age records{who} in {settings.output_dir}: run the "
                         "participant level first")
    table, qc_names = records_table(records)
    participants, described = read_participants(settings.bids_dir)

    models = sorted({(str(n), str(s)) for n, s in zip(table["model_name"],
                                                     table["model_sha256"], strict=True)})
    if len(models) > 1:
        LOG.warning("the records come from %d different models: %s", len(models),
                    ", ".join(n for n, _ in models))
    reference = None
    if settings.bias_reference:
        card = None
        if participants.columns.tolist() == ["participant_id"]:
            raise GroupError(f"--bias-reference {settings.bias_reference} needs a "
                             f"participants.tsv in {settings.bids_dir}")
        reference = reference_rows(table, participants, settings.bias_reference)
    else:
        card = card if card is not None else load_card(settings.model)
        card_sha = card.get("sha256")
        mismatched = sorted(n for n, s in models if card_sha and s not in (card_sha, "None"))
        if mismatched:
            raise GroupError(f"the records were made with model(s) {', '.join(mismatched)}, "
                             f"not with --model {settings.model} ({card.get('name')}): pass "
                             "the participant level's --model, or --bias-reference")
    coefficients = bias_coefficients(table, card=card, reference=reference,
                                     reference_spec=settings.bias_reference,
                                     model_spec=settings.model)
    table = apply_corrections(table, coefficients)
    metrics = group_metrics(table)

    order = ["participant_id", "session_id", "run", "age", "predicted_age", "brain_age_gap",
             *[f"brain_age_gap_{m}" for m in BIAS_METHODS], "predicted_age_cole",
             "uncertainty_sd", "qc_pass", *[f"qc_{n}" for n in qc_names], "model_name",
             "model_sha256"]
    table = table[order]
    table, participant_columns = merge_participants(table, participants, described)
    sidecar = describe_columns(list(table.columns), qc_names, participant_columns)
    with_age = np.isfinite(table["age"].to_numpy(float))
    sidecar["BrainAge"] = {
        "Description": "Summary of the group level: accuracy metrics over images with a known "
                       "age (uncorrected and after each bias correction) and the "
                       "bias-correction coefficients with their origin",
        "N": {"images": len(table), "participants": int(table["participant_id"].nunique()),
              "images_with_age": int(with_age.sum()),
              "images_qc_fail": int((table["qc_pass"] == QC_FALSE).sum()),
              "images_without_record": len(without_record)},
        "WithoutRecord": without_record,
        "Metrics": metrics,
        "MetricsDescription": {
            "N": "number of images with a known age", "MAE": "mean absolute error (years)",
            "RMSE": "root-mean-square error (years)",
            "r": "Pearson correlation of (corrected) predicted age with age",
            "R2": "coefficient of determination of (corrected) predicted age for age",
            "r_gap_age": "Pearson correlation of the (corrected) gap with age: the age bias",
            "mean_gap": "mean (corrected) brain-age gap (years)"},
        "PrimaryBiasCorrection": settings.bias_method,
        "BiasCorrection": coefficients,
        "BiasReference": settings.bias_reference,
        "Models": [{"Name": n, "SHA256": s} for n, s in models],
        # for the methods text (logs/CITATION.md): what the participant level ran
        "PreprocessingBackends": sorted({str((r.get("preprocessing") or {}).get("backend"))
                                         for r in records}),
        "UncertaintySamples": max((int((r.get("uncertainty") or {}).get("samples") or 0)
                                   for r in records), default=0),
        "SaliencyMaps": any(
            derivative_path(settings.output_dir, image.entities, suffix="saliency",
                            extension=".nii.gz", space=TEMPLATE, res="2",
                            desc="gradcam").is_file() for image in images),
        "GeneratedBy": {"Name": "brainage-bids", "Version": __version__},
    }
    return table, sidecar


def group_errors(settings: Settings,
                 without_record: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Images whose latest participant-level run failed (reason and crash file), and the
    other selected images that have no record yet."""
    from brainage_bids.cohort import last_failures

    errors, crashes = last_failures(settings.logs_dir)
    for name in without_record:
        errors.setdefault(name, "no brain-age record: not processed yet (run the participant "
                                "level for it), or its record was removed")
    return [{"image": name, "error": error, "crash": crashes.get(name)}
            for name, error in sorted(errors.items())]


def group_methods_text(settings: Settings, sidecar: dict[str, Any],
                       card: dict[str, Any] | None = None):
    """The methods of the whole analysis (participant level, then this bias correction);
    ``card`` is ``--model``'s card when the caller has loaded it."""
    from brainage_bids.citation import group_methods

    summary = sidecar["BrainAge"]
    primary = summary["BiasCorrection"].get(settings.bias_method) or {}
    backends = summary.get("PreprocessingBackends") or ["ants"]
    return group_methods(backend=backends[0],
                         card=records_card(settings, summary["Models"], card),
                         mc_samples=summary.get("UncertaintySamples") or 0,
                         bias_method=settings.bias_method,
                         bias_source=primary.get("Source"),
                         saliency=bool(summary.get("SaliencyMaps")),
                         corrections=summary["BiasCorrection"], group=summary["N"])


def records_card(settings: Settings, models: list[dict[str, Any]],
                 card: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card of the model that made the records, for the methods text: ``card`` or
    ``--model``'s, or (with ``--bias-reference``, where ``--model`` may be left at its
    default) the shipped model the records name; else what the records say of it (name and
    checksum)."""
    shas = {m.get("SHA256") for m in models}
    if card is not None and card.get("sha256") in shas:
        return card
    for spec in dict.fromkeys([settings.model, *(str(m.get("Name")) for m in models)]):
        try:
            card = load_card(spec)
        except GroupError:
            continue
        if card.get("sha256") in shas:
            return card
    return {"name": models[0].get("Name"), "sha256": models[0].get("SHA256")} if len(
        models) == 1 else {}


def run_group(settings: Settings) -> int:
    """The ``group`` analysis level: table, sidecar and HTML report under OUTPUT_DIR."""
    from brainage_bids.citation import write_citation

    card = None if settings.bias_reference else load_card(settings.model)  # loaded once
    table, sidecar = build_group(settings, card=card)
    out = Path(settings.output_dir)
    tsv = write_table(table, out / f"{TABLE_NAME}.tsv")
    atomic_write_json(out / f"{TABLE_NAME}.json", sidecar)
    summary = sidecar["BrainAge"]
    LOG.info("group table: %s (%d image(s), %d participant(s))", tsv,
             summary["N"]["images"], summary["N"]["participants"])
    for name, metrics in summary["Metrics"].items():
        LOG.info("%-11s MAE %.2f years, r(gap, age) %s", name, metrics.get("MAE", math.nan),
                 metrics.get("r_gap_age"))
    methods = group_methods_text(settings, sidecar, card)
    LOG.info("methods boilerplate: %s", write_citation(settings.logs_dir, methods))
    if settings.reports:
        from brainage_bids.reports.render import write_group_report

        LOG.info("group report: %s", write_group_report(out, table, sidecar,
                                                        errors=group_errors(
                                                            settings, summary["WithoutRecord"]),
                                                        methods=methods))
    return 0

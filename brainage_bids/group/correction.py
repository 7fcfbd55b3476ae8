"""Bias correction of the brain-age gap (DESIGN.md §4).

Beheshti and de Lange & Cole use the model card's coefficients (fitted on the training run's
held-out predictions: out of fold for an ensemble, the validation set for a single model)
unless a reference group is given (``--bias-reference group=control``), in which case every
method is fitted on the reference participants. Smith's correction is a residualisation of
the gap on age, so it is always fitted on this data set (the reference group, or every image
with a known age).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd

from brainage_bids.config import BIAS_METHODS, parse_reference
from brainage_bids.derivatives import QC_FALSE
from brainage_bids.group.records import GroupError
from brainage_bids.metrics import ADVISED_FIT, card_fit_warning

LOG = logging.getLogger(__name__)

#: Smallest number of images with ages for fitting a bias correction on the data.
MIN_FIT = 3
#: A de Lange & Cole slope below this multiplies the errors by more than 2.
LOW_COLE_SLOPE = 0.5
#: How the sidecar names regression_metrics' keys.
METRIC_NAMES = {"n": "N", "mae": "MAE", "rmse": "RMSE", "r": "r", "r2": "R2",
                "r_gap_age": "r_gap_age", "mean_gap": "mean_gap"}


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

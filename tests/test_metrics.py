"""Accuracy metrics and brain-age-gap bias correction (DESIGN §4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainage_bids.metrics import apply_bias, bias_report, fit_bias, regression_metrics


def _r(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


# --------------------------------------------------------------------------- metrics

def test_regression_metrics_hand_computed():
    # errors 2, -1, 3; SS_tot of ages 20/30/40 is 200; r from centred sums 210/sqrt(200*228.67)
    m = regression_metrics([20, 30, 40], [22, 29, 43])
    assert m["n"] == 3
    assert m["mae"] == pytest.approx(2.0)
    assert m["rmse"] == pytest.approx(math.sqrt(14 / 3))
    assert m["mean_gap"] == pytest.approx(4 / 3)
    assert m["r2"] == pytest.approx(1 - 14 / 200)
    assert m["r"] == pytest.approx(210 / math.sqrt(200 * (686 / 3)))
    assert m["r_gap_age"] == pytest.approx(_r(np.array([20, 30, 40]), np.array([2, -1, 3])))


def test_regression_metrics_skip_nan_pairs():
    m = regression_metrics([20, np.nan, 40, 50], [22, 30, np.nan, 49])
    assert m["n"] == 2
    assert m["mae"] == pytest.approx(1.5)


def test_regression_metrics_constant_predictions_give_nan_r():
    m = regression_metrics([20, 30, 40], [35, 35, 35])
    assert math.isnan(m["r"])
    assert m["mae"] == pytest.approx(25 / 3)  # errors 15, 5, -5
    assert m["r2"] == pytest.approx(1 - 275 / 200)  # worse than the mean: negative R^2


def test_regression_metrics_empty_and_bad_shapes():
    assert regression_metrics([np.nan], [1.0])["n"] == 0
    with pytest.raises(ValueError, match="differ in length"):
        regression_metrics([1, 2, 3], [1, 2])


# --------------------------------------------------------------------------- bias fits

AGE = np.linspace(20, 80, 61)


def test_beheshti_recovers_linear_bias_exactly():
    pred = AGE + (-0.3 * AGE + 15.0)
    coefs = fit_bias("beheshti", AGE, pred)
    assert coefs["slope"] == pytest.approx(-0.3, abs=1e-10)
    assert coefs["intercept"] == pytest.approx(15.0, abs=1e-8)
    np.testing.assert_allclose(apply_bias("beheshti", coefs, AGE, pred), 0.0, atol=1e-9)


def test_beheshti_decorrelates_gap_from_age_on_fitting_data():
    rng = np.random.default_rng(0)
    pred = 0.6 * AGE + 20 + rng.normal(0, 4, AGE.size)  # regression to the mean
    assert _r(AGE, pred - AGE) < -0.8
    corrected = apply_bias("beheshti", fit_bias("beheshti", AGE, pred), AGE, pred)
    assert abs(_r(AGE, corrected)) < 1e-10
    assert abs(corrected.mean()) < 1e-10


def test_cole_recovers_linear_bias_exactly():
    pred = 0.7 * AGE + 15.0
    coefs = fit_bias("cole", AGE, pred)
    assert coefs["slope"] == pytest.approx(0.7, abs=1e-12)
    assert coefs["intercept"] == pytest.approx(15.0, abs=1e-9)
    np.testing.assert_allclose(apply_bias("cole", coefs, AGE, pred), 0.0, atol=1e-9)


def test_hand_computed_small_case():
    # gap = [5, 0, -5] = -0.5 Y + 10; P = 0.5 Y + 10
    age, pred = [10, 20, 30], [15, 20, 25]
    beheshti = fit_bias("beheshti", age, pred)
    cole = fit_bias("cole", age, pred)
    assert (beheshti["slope"], beheshti["intercept"]) == pytest.approx((-0.5, 10.0))
    assert (cole["slope"], cole["intercept"]) == pytest.approx((0.5, 10.0))
    # a new participant aged 40 predicted 40: raw gap 0
    assert apply_bias("beheshti", beheshti, [40], [40])[0] == pytest.approx(10.0)  # 0-(-20+10)
    assert apply_bias("cole", cole, [40], [40])[0] == pytest.approx(20.0)  # (40-10)/0.5 - 40


def test_smith_linear_equals_beheshti_and_cubic_is_exact():
    rng = np.random.default_rng(1)
    pred = 0.6 * AGE + 20 + rng.normal(0, 3, AGE.size)
    smith = apply_bias("smith", fit_bias("smith", AGE, pred), AGE, pred)
    beheshti = apply_bias("beheshti", fit_bias("beheshti", AGE, pred), AGE, pred)
    np.testing.assert_allclose(smith, beheshti, atol=1e-9)

    cubic_gap = 1e-4 * (AGE - 50) ** 3 - 0.01 * AGE ** 2 + 0.2 * AGE - 3
    coefs = fit_bias("smith", AGE, AGE + cubic_gap, degree=3)
    np.testing.assert_allclose(apply_bias("smith", coefs, AGE, AGE + cubic_gap), 0, atol=1e-8)
    # a linear fit cannot remove a cubic bias
    linear = fit_bias("smith", AGE, AGE + cubic_gap)
    assert np.abs(apply_bias("smith", linear, AGE, AGE + cubic_gap)).max() > 1.0


def test_smith_with_confounds():
    sex = np.tile([0.0, 1.0], AGE.size // 2 + 1)[:AGE.size]
    pred = AGE + (-0.2 * AGE + 3.0 * sex + 1.0)
    coefs = fit_bias("smith", AGE, pred, confounds=sex)
    assert coefs["n_confounds"] == 1
    np.testing.assert_allclose(apply_bias("smith", coefs, AGE, pred, confounds=sex), 0,
                               atol=1e-9)
    with pytest.raises(ValueError, match="confound columns"):
        apply_bias("smith", coefs, AGE, pred)
    with pytest.raises(ValueError, match="rank deficient"):
        fit_bias("smith", AGE, pred, confounds=np.ones(AGE.size))
    with pytest.raises(ValueError, match="only used by the smith"):
        fit_bias("beheshti", AGE, pred, confounds=sex)


def test_nan_ages_are_left_out_of_fits_and_give_nan():
    age = np.array([10, 20, np.nan, 30])
    pred = np.array([15, 20, 50, 25])
    coefs = fit_bias("beheshti", age, pred)
    assert coefs["n"] == 3
    assert coefs["slope"] == pytest.approx(-0.5)
    for method in ("beheshti", "cole", "smith"):
        out = apply_bias(method, fit_bias(method, age, pred), age, pred)
        assert np.isnan(out[2]) and np.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.parametrize("method", ["beheshti", "cole", "smith"])
def test_fit_errors_are_clear(method):
    with pytest.raises(ValueError, match="at least 3"):
        fit_bias(method, [20, 30, np.nan], [25, 28, 40])
    with pytest.raises(ValueError, match="ages that vary"):
        fit_bias(method, [40, 40, 40, 40], [35, 38, 41, 44])


def test_cole_refuses_age_independent_predictions_and_mismatched_methods():
    with pytest.raises(ValueError, match="divide by zero"):
        fit_bias("cole", [20, 40, 60], [45, 45, 45])
    coefs = fit_bias("beheshti", [20, 40, 60], [30, 40, 50])
    with pytest.raises(ValueError, match="fitted for 'beheshti'"):
        apply_bias("cole", coefs, [20], [30])
    with pytest.raises(ValueError, match="unknown bias-correction method"):
        fit_bias("lange", [20, 40, 60], [30, 40, 50])


def test_bias_report_records_or_raises():
    rng = np.random.default_rng(2)
    pred = 0.5 * AGE + 25 + rng.normal(0, 2, AGE.size)
    report = bias_report(AGE, pred)
    assert report["uncorrected"]["r_gap_age"] < -0.9
    assert abs(report["corrected"]["beheshti"]["r_gap_age"]) < 1e-9
    assert report["coefficients"]["cole"]["slope"] == pytest.approx(0.5, abs=0.05)
    recorded = bias_report([20, 30], [25, 30], errors="record")
    assert "at least 3" in recorded["coefficients"]["beheshti"]["error"]
    with pytest.raises(ValueError):
        bias_report([20, 30], [25, 30])


def test_card_fit_warning_names_the_smallest_fit():
    from brainage_bids.metrics import ADVISED_FIT, card_fit_warning

    card = {"name": "site-ft", "bias_correction": {
        "fitted_on": "out-of-fold predictions", "beheshti": {"n": 12, "slope": -0.3},
        "cole": {"n": 12, "slope": 0.7}}}
    warning = card_fit_warning(card)
    assert warning.startswith("model site-ft: its bias correction was fitted on out-of-fold "
                              "predictions, only 12 image(s); with fewer than")
    assert f"fewer than about {ADVISED_FIT}" in warning
    card["bias_correction"]["beheshti"]["n"] = card["bias_correction"]["cole"]["n"] = 40
    assert card_fit_warning(card) is None
    assert card_fit_warning({"name": "x"}) is None
    assert card_fit_warning({"bias_correction": {"cole": {"error": "too few"}}}) is None


def test_card_fit_warning_names_a_model_that_has_not_learned():
    """A 2-epoch ensemble's out-of-fold predictions: one age for all, Cole slope 0.0014."""
    from brainage_bids.metrics import MIN_COLE_SLOPE, card_fit_warning

    card = {"name": "quick", "bias_correction": {
        "fitted_on": "out-of-fold predictions", "beheshti": {"n": 150, "slope": -0.9986},
        "cole": {"n": 150, "slope": 0.0014}}}
    warning = card_fit_warning(card)
    assert warning.startswith("model quick: its held-out predictions barely follow age (de "
                              "Lange & Cole slope 0.001 on out-of-fold predictions)")
    assert "bias-corrected gaps are meaningless" in warning
    card["bias_correction"]["cole"]["slope"] = MIN_COLE_SLOPE  # v2's is 0.695
    assert card_fit_warning(card) is None

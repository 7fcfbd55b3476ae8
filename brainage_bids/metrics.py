"""Accuracy of age predictions and bias correction of the brain-age gap (DESIGN §4).

Pure numpy so that training (coefficients fitted on the validation set go in the model card)
and the group level (coefficients fitted on a chosen reference group) share one definition.

Notation: ``Y`` chronological age, ``P`` predicted age, ``gap = P - Y``. Brain-age models
regress towards the mean of their training ages, so the raw gap correlates negatively with
age; the corrections below remove that dependence:

- ``beheshti`` (Beheshti et al. 2019): fit ``gap = aY + b``; corrected gap
  ``gap - (aY + b)``.
- ``cole`` (de Lange & Cole 2020): fit ``P = aY + b``; corrected prediction ``(P - b) / a``;
  corrected gap ``(P - b) / a - Y``.
- ``smith`` (Smith et al. 2019): fit ``gap`` on ``Y`` (optionally ``Y^2``, ``Y^3`` and
  confound columns) by least squares; the corrected gap is the residual.

Missing values (NaN ages, predictions or confounds) are left out of fits and give NaN
corrected gaps, so one participant without an age never sinks a whole group table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

BIAS_METHODS: tuple[str, ...] = ("beheshti", "cole", "smith")
#: The fewest complete (age, prediction) pairs a bias fit accepts.
MIN_FIT_POINTS = 3
#: Below this many images a fitted correction's slope is unstable: fitted on three subsets
#: each of 10, 20 and 40 IXI participants, the de Lange & Cole slope ranged 0.19-0.49,
#: 0.47-0.70 and 0.60-0.64 (docs/fine-tuning.md), so fits on fewer are warned about.
ADVISED_FIT = 40
#: A de Lange & Cole slope (predicted on chronological age, held out) below this means the
#: predictions barely follow age: networks still on the mean-age plateau had 0.001-0.01
#: (a 2-epoch ensemble, the ablation's plateau run), v1 and v2 0.70-0.72. The correction
#: divides by it, multiplying every error by more than 5.
MIN_COLE_SLOPE = 0.2


def card_fit_warning(card: dict[str, Any]) -> str | None:
    """One line when a model card's bias coefficients cannot be trusted; None otherwise.

    Either its held-out predictions barely follow age (de Lange & Cole slope below
    :data:`MIN_COLE_SLOPE`: a model that has not learned, e.g. trained for 2 epochs), or the
    coefficients were fitted on fewer than :data:`ADVISED_FIT` images (a small validation
    split, or fine-tuning on a few controls). None, too, when the card has none.
    """
    bias = card.get("bias_correction") or {}
    cole = bias.get("cole")
    slope = cole.get("slope") if isinstance(cole, dict) else None
    if isinstance(slope, (int, float)) and slope < MIN_COLE_SLOPE:
        return (f"model {card.get('name')}: its held-out predictions barely follow age (de "
                f"Lange & Cole slope {slope:.3f} on "
                f"{bias.get('fitted_on', 'held-out predictions')}): it predicts nearly one "
                "age for everyone, as a network that has not left the mean-age plateau does "
                "(too few epochs?); its bias-corrected gaps are meaningless and its "
                "uncorrected ones mostly each age's distance from the training mean")
    sizes = [entry.get("n") for entry in bias.values()
             if isinstance(entry, dict) and isinstance(entry.get("n"), int)]
    if not sizes or min(sizes) >= ADVISED_FIT:
        return None
    return (f"model {card.get('name')}: its bias correction was fitted on "
            f"{bias.get('fitted_on', 'held-out predictions')}, only {min(sizes)} image(s); "
            f"with fewer than "
            f"about {ADVISED_FIT} the slope is unstable and corrected gaps can be further off "
            "than uncorrected ones: report uncorrected gaps beside them, or fit the correction "
            f"on at least {ADVISED_FIT} of your own controls (group --bias-reference)")


def _as_1d(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    return array


def _pair(age: Any, pred: Any) -> tuple[np.ndarray, np.ndarray]:
    age = _as_1d(age, "age")
    pred = _as_1d(pred, "pred")
    if age.shape != pred.shape:
        raise ValueError(f"age ({age.size}) and pred ({pred.size}) differ in length")
    return age, pred


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r, NaN (not a warning) when either side is constant or too short."""
    if x.size < 2:
        return float("nan")
    dx = x - x.mean()
    dy = y - y.mean()
    denom = float(np.sqrt((dx * dx).sum() * (dy * dy).sum()))
    if denom == 0.0:
        return float("nan")
    return float(np.clip((dx * dy).sum() / denom, -1.0, 1.0))


def regression_metrics(age: Sequence[float] | np.ndarray,
                       pred: Sequence[float] | np.ndarray) -> dict[str, float]:
    """MAE, RMSE, Pearson r, R^2, r(gap, age) and mean gap over the complete pairs.

    ``r2`` is the coefficient of determination ``1 - SS_res / SS_tot`` (it can be negative:
    a biased model is worse than predicting the mean age), not ``r**2``. ``r_gap_age`` is the
    age dependence that bias correction is meant to remove. Pairs with a NaN are skipped
    and ``n`` says how many were used.
    """
    age, pred = _pair(age, pred)
    keep = np.isfinite(age) & np.isfinite(pred)
    age, pred = age[keep], pred[keep]
    n = int(age.size)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mae": nan, "rmse": nan, "r": nan, "r2": nan,
                "r_gap_age": nan, "mean_gap": nan}
    gap = pred - age
    ss_tot = float(((age - age.mean()) ** 2).sum())
    return {
        "n": n,
        "mae": float(np.abs(gap).mean()),
        "rmse": float(np.sqrt((gap * gap).mean())),
        "r": _pearson(age, pred),
        "r2": 1.0 - float((gap * gap).sum()) / ss_tot if ss_tot > 0 else nan,
        "r_gap_age": _pearson(age, gap),
        "mean_gap": float(gap.mean()),
    }


def _confounds(confounds: Any, n: int) -> np.ndarray:
    if confounds is None:
        return np.empty((n, 0))
    array = np.asarray(confounds, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] != n:
        raise ValueError(f"confounds must have shape ({n}, k), got {array.shape}")
    return array


def _check_method(method: str) -> str:
    if method not in BIAS_METHODS:
        raise ValueError(f"unknown bias-correction method {method!r}; use one of {BIAS_METHODS}")
    return method


def _smith_design(age: np.ndarray, coefs: dict[str, Any], confounds: np.ndarray) -> np.ndarray:
    # Centred, scaled age keeps Y^2 and Y^3 from making the least-squares problem
    # ill-conditioned (ages of 20-80 cubed span five orders of magnitude).
    scaled = (age - coefs["age_mean"]) / coefs["age_scale"]
    columns = [np.ones_like(age)] + [scaled ** k for k in range(1, coefs["degree"] + 1)]
    if confounds.shape[1]:
        columns.extend((confounds - np.asarray(coefs["confound_means"])).T)
    return np.column_stack(columns)


def fit_bias(method: str, age: Sequence[float] | np.ndarray, pred: Sequence[float] | np.ndarray,
             *, degree: int = 1, confounds: Any = None) -> dict[str, Any]:
    """Fit the coefficients of a brain-age bias correction.

    Parameters
    ----------
    method:
        ``"beheshti"``, ``"cole"`` or ``"smith"`` (see the module docstring).
    age, pred:
        Chronological and predicted ages of a healthy reference group (at training time,
        the validation set). Pairs with a NaN (or a NaN confound) are left out.
    degree:
        ``smith`` only: fit the gap on ``Y`` up to ``Y^degree`` (1 to 3).
    confounds:
        ``smith`` only: an ``(n, k)`` array of confound columns (sex, site, head size...);
        the same columns must be given to :func:`apply_bias`.

    Returns
    -------
    dict
        JSON-serialisable coefficients with ``method``, ``n`` and ``age_range``, to be passed
        to :func:`apply_bias` (and stored in model cards).

    Raises
    ------
    ValueError
        Fewer than 3 complete pairs, ages without variance, or (``cole``) predictions that
        do not depend on age, where the correction would divide by zero.
    """
    _check_method(method)
    age, pred = _pair(age, pred)
    conf = _confounds(confounds, age.size)
    if method != "smith" and conf.shape[1]:
        raise ValueError(f"confounds are only used by the smith correction, not {method!r}")
    if method == "smith" and degree not in (1, 2, 3):
        raise ValueError(f"degree must be 1, 2 or 3, got {degree!r}")
    keep = np.isfinite(age) & np.isfinite(pred) & np.isfinite(conf).all(axis=1)
    age, pred, conf = age[keep], pred[keep], conf[keep]
    n = int(age.size)
    if n < MIN_FIT_POINTS:
        raise ValueError(f"bias correction needs at least {MIN_FIT_POINTS} participants with "
                         f"both an age and a prediction, got {n}")
    if float(np.ptp(age)) == 0.0:
        raise ValueError("bias correction needs ages that vary; all reference ages are equal")
    common: dict[str, Any] = {"method": method, "n": n,
                              "age_range": [float(age.min()), float(age.max())]}
    if method in ("beheshti", "cole"):
        target = pred - age if method == "beheshti" else pred
        slope, intercept = np.polyfit(age, target, 1)
        if method == "cole" and abs(slope) < 1e-6:
            raise ValueError("predictions do not depend on age (slope ~ 0): the de Lange & "
                             "Cole correction would divide by zero")
        return {**common, "slope": float(slope), "intercept": float(intercept)}
    scale = float(age.std())
    coefs = {**common, "degree": degree, "age_mean": float(age.mean()), "age_scale": scale,
             "n_confounds": int(conf.shape[1]),
             "confound_means": conf.mean(axis=0).tolist()}
    design = _smith_design(age, coefs, conf)
    if n <= design.shape[1]:
        raise ValueError(f"the smith fit has {design.shape[1]} coefficients and needs more "
                         f"than that many participants, got {n}")
    beta, _, rank, _ = np.linalg.lstsq(design, pred - age, rcond=None)
    if rank < design.shape[1]:
        raise ValueError("the smith design is rank deficient (a confound is constant or "
                         "collinear with age)")
    coefs["coef"] = beta.tolist()
    return coefs


def apply_bias(method: str, coefs: dict[str, Any], age: Sequence[float] | np.ndarray,
               pred: Sequence[float] | np.ndarray, confounds: Any = None) -> np.ndarray:
    """The bias-corrected brain-age gap for each participant (NaN where an input is NaN).

    ``coefs`` comes from :func:`fit_bias` with the same ``method`` (a mismatch is an error,
    not a silent misuse of another method's slope).
    """
    _check_method(method)
    if coefs.get("method", method) != method:
        raise ValueError(f"coefficients were fitted for {coefs['method']!r}, not {method!r}")
    age, pred = _pair(age, pred)
    if method == "beheshti":
        gap = pred - age
        return gap - (coefs["slope"] * age + coefs["intercept"])
    if method == "cole":
        return (pred - coefs["intercept"]) / coefs["slope"] - age
    conf = _confounds(confounds, age.size)
    if conf.shape[1] != coefs["n_confounds"]:
        raise ValueError(f"the smith coefficients expect {coefs['n_confounds']} confound "
                         f"columns, got {conf.shape[1]}")
    design = _smith_design(age, coefs, conf)
    return (pred - age) - design @ np.asarray(coefs["coef"])


def bias_report(age: Sequence[float] | np.ndarray, pred: Sequence[float] | np.ndarray,
                methods: Sequence[str] = ("beheshti", "cole"),
                errors: str = "raise") -> dict[str, Any]:
    """Fit each method on ``(age, pred)`` and report the metrics before and after.

    Used for model cards: ``coefficients[method]`` can be applied later to new data, and
    ``corrected[method]`` shows what the correction does on the data it was fitted on
    (optimistic by construction, since fit and evaluation share the data).
    ``errors="record"`` stores a method's failure as ``{"error": message}`` instead of
    raising, so that a finished training run is not lost to a degenerate validation set.
    """
    if errors not in ("raise", "record"):
        raise ValueError(f"errors must be 'raise' or 'record', got {errors!r}")
    age, pred = _pair(age, pred)
    report: dict[str, Any] = {"uncorrected": regression_metrics(age, pred),
                              "coefficients": {}, "corrected": {}}
    for method in methods:
        try:
            coefs = fit_bias(method, age, pred)
        except ValueError as exc:
            if errors == "raise":
                raise
            report["coefficients"][method] = {"method": method, "error": str(exc)}
            report["corrected"][method] = {"error": str(exc)}
            continue
        corrected_pred = age + apply_bias(method, coefs, age, pred)
        report["coefficients"][method] = coefs
        report["corrected"][method] = regression_metrics(age, corrected_pred)
    return report

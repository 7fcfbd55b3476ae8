"""From raw spreads to an uncertainty in years, calibrated on held-out predictions.

Neither spread of a prediction is an error in years: MC dropout (Gal & Ghahramani 2016)
measures the sensitivity of one network to its dropout masks, and the ensemble's member SD the
disagreement of networks trained on different folds or seeds. Both are turned into a
standard deviation in years by one scale ``k`` fitted on predictions the model never trained
on (the out-of-fold predictions of a cross-validated ensemble, or a single model's
validation set), so that the standardised errors ``(P - Y) / sd`` have unit root mean square;
never on a test set.

What can be calibrated depends on what is observable out of fold. For a participant in fold
``f``, only the members trained without fold ``f`` are honest: with one member per fold that
is one network, so only its MC-dropout SD is observable and ``k`` scales ``mc_sd`` (the card
says ``"scaled": "mc_sd"``); the members' spread is then added as it is,
``sd = sqrt((k * mc_sd)**2 + member_sd**2)``. With several seeds per fold the seeds' spread
is observable too, ``k`` scales the combined ``raw_sd`` (``"scaled": "raw_sd"``) and
``sd = k * raw_sd``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SCALED_COMPONENTS = ("mc_sd", "raw_sd")


def fit_scale(errors: Sequence[float], spreads: Sequence[float]) -> float | None:
    """The ``k`` giving ``(errors / (k * spreads))`` unit RMS; None when it cannot be fitted."""
    errors, spreads = np.asarray(errors, dtype=float), np.asarray(spreads, dtype=float)
    ok = np.isfinite(errors) & np.isfinite(spreads) & (spreads > 0)
    if ok.sum() < 3:
        return None
    return float(np.sqrt(np.mean((errors[ok] / spreads[ok]) ** 2)))


def calibrated_sd(prediction: dict[str, Any], calibration: dict[str, Any] | None) -> dict:
    """The record's uncertainty for a :func:`~brainage_bids.model.predict.predict_brain_age`
    result and a card's ``uncertainty`` entry (a v1 card: ``calibration_scale`` of mc_sd).

    Returns ``sd`` (years if ``calibrated``), the scale and what it scaled.
    """
    calibration = calibration or {}
    scale = calibration.get("calibration_scale")
    scaled = calibration.get("scaled", "mc_sd")
    mc_sd = float(prediction["mc_sd"])
    member_sd = float(prediction.get("member_sd", 0.0))
    raw_sd = float(np.hypot(mc_sd, member_sd))
    calibrated = isinstance(scale, int | float) and scale > 0 and scaled in SCALED_COMPONENTS
    if not calibrated:
        sd = raw_sd
    elif scaled == "raw_sd":
        sd = float(scale) * raw_sd
    else:
        sd = float(np.hypot(float(scale) * mc_sd, member_sd))
    return {"sd": sd, "raw_sd": raw_sd, "calibrated": bool(calibrated),
            "calibration_scale": float(scale) if calibrated else None,
            "scaled": scaled if calibrated else None}


def coverage(errors: Sequence[float], sds: Sequence[float]) -> dict[str, float | None]:
    """How the SDs describe real errors: r(SD, |error|) and the share within 1 and 2 SD."""
    errors, sds = np.abs(np.asarray(errors, dtype=float)), np.asarray(sds, dtype=float)
    ok = np.isfinite(errors) & np.isfinite(sds) & (sds > 0)
    if ok.sum() < 3:
        return {"n": int(ok.sum()), "r_sd_abs_error": None, "within_1sd": None,
                "within_2sd": None}
    e, s = errors[ok], sds[ok]
    r = float(np.corrcoef(s, e)[0, 1]) if s.std() > 0 and e.std() > 0 else None
    return {"n": int(ok.sum()), "r_sd_abs_error": r, "within_1sd": float(np.mean(e <= s)),
            "within_2sd": float(np.mean(e <= 2 * s))}

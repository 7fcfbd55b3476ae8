"""Held-out evaluation of a brain-age model: accuracy, bias correction, baseline, uncertainty.

Used by ``evaluation/evaluate.py`` (the shipped model's numbers in ``docs/model-card.md``) and
``evaluation/ablation.py``. Predictions go through the participant level's own steps
(:func:`~brainage_bids.model.intensity.normalise_intensity`, then
:func:`~brainage_bids.model.predict.predict_age`) on the participant level's preprocessed
images, so the figures describe what users get.

Uncertainty calibration: MC-dropout spreads are not errors in years. On the validation set
(never the test set) the scale ``k`` that makes the standardised errors ``(P - Y) / sd``
have unit root-mean-square is fitted; ``k * sd`` is then the calibrated standard deviation,
and its coverage (how often the test error falls within 1 and 2 calibrated SDs; 68 % and
95 % for a well-calibrated Gaussian) is reported on the test set.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainage_bids.metrics import apply_bias, regression_metrics


@dataclass(frozen=True)
class EvalItem:
    """One preprocessed image with its chronological age."""

    id: str
    image: str
    mask: str
    age: float
    #: ``(brain, mask, transform, backend)`` on the input grid, for grid-jitter inference
    native: tuple[str, str, str, str] | None = None


def preprocessed_items(output_dir: str | Path, bids_dir: str | Path,
                       subjects: Iterable[str]) -> list[EvalItem]:
    """The participant level's model inputs (``desc-preproc`` T1w and brain mask) by subject.

    Ages come from the dataset's ``participants.tsv``. A subject without an age or without
    preprocessed outputs is an error: a silently shorter test set would flatter nobody
    knowingly, but it would change the numbers.
    """
    from brainage_bids.bids import read_ages
    from brainage_bids.derivatives import derivative_path, native_outputs
    from brainage_bids.training import MASK, PREPROC

    ages = read_ages(Path(bids_dir))
    items, problems = [], []
    for subject in subjects:
        subject = subject.removeprefix("sub-")
        age = ages.get((subject, None))
        image = derivative_path(Path(output_dir), {"subject": subject}, **PREPROC)
        mask = derivative_path(Path(output_dir), {"subject": subject}, **MASK)
        if age is None:
            problems.append(f"sub-{subject}: no age in participants.tsv")
        elif not (image.is_file() and mask.is_file()):
            problems.append(f"sub-{subject}: not preprocessed ({image} missing)")
        else:
            items.append(EvalItem(subject, str(image), str(mask), float(age),
                                  native_outputs(Path(output_dir), {"subject": subject})))
    if problems:
        raise ValueError("; ".join(problems))
    return items


def predict_items(model: Any, items: Sequence[EvalItem], *, mc_samples: int = 1,
                  seed: int = 0, device: str = "cpu", flip_tta: bool = False,
                  jitter: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(predicted ages, MC-dropout SDs)`` for each item, exactly as the participant level.

    With ``mc_samples=1`` the SDs are 0 (no uncertainty estimate), which is much faster.
    """
    rows = predict_records(model, items, mc_samples=mc_samples, seed=seed, device=device,
                           flip_tta=flip_tta, jitter=jitter)
    return (np.asarray([r["predicted_age"] for r in rows], dtype=np.float64),
            np.asarray([r["mc_sd"] for r in rows], dtype=np.float64))


def predict_records(model: Any, items: Sequence[EvalItem], *, mc_samples: int = 20,
                    seed: int = 0, device: str = "cpu", flip_tta: bool = False,
                    calibration: dict[str, Any] | None = None,
                    jitter: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The participant level's prediction of each item (single model or ensemble).

    ``jitter`` (a card's grid-jitter settings, :func:`~brainage_bids.model.jitter.
    jitter_settings`) adds the grid-jitter views from each item's native outputs, as the
    participant level does; an item without them is an error, not a silent fallback. Each row
    is :func:`~brainage_bids.model.predict.predict_brain_age`'s result plus ``sd``
    (calibrated with the card's ``calibration`` when given, as the records are).
    """
    import nibabel as nib

    from brainage_bids.model.intensity import normalise_intensity
    from brainage_bids.model.jitter import jitter_views
    from brainage_bids.model.predict import predict_brain_age
    from brainage_bids.model.uncertainty import calibrated_sd

    rows = []
    for item in items:
        brain = np.asanyarray(nib.load(item.image).dataobj)
        mask = np.asanyarray(nib.load(item.mask).dataobj) > 0
        views = []
        if jitter is not None:
            if item.native is None:
                raise ValueError(f"sub-{item.id}: grid jitter needs the native brain, mask and "
                                 "transform; rerun the participant level with this version")
            views = jitter_views(*item.native, jitter)
        result = predict_brain_age(model, normalise_intensity(brain, mask),
                                   mc_samples=mc_samples, seed=seed, device=device,
                                   flip_tta=flip_tta, views=views)
        result.update(calibrated_sd(result, calibration))
        rows.append(result)
    return rows


def fit_uncertainty_scale(age: Sequence[float], pred: Sequence[float],
                          sd: Sequence[float]) -> float:
    """``k`` with ``mean(((P - Y) / (k * sd))^2) = 1``: the MC-dropout SD's scale in years."""
    age, pred, sd = (np.asarray(v, dtype=np.float64) for v in (age, pred, sd))
    if age.shape != pred.shape or age.shape != sd.shape or age.size < 2:
        raise ValueError("age, pred and sd must be equally long, with at least two values")
    if not (np.isfinite(sd).all() and (sd > 0).all()):
        raise ValueError("every MC-dropout SD must be positive: was dropout active?")
    return float(np.sqrt(np.mean(((pred - age) / sd) ** 2)))


def uncertainty_report(age: Sequence[float], pred: Sequence[float], sd: Sequence[float],
                       scale: float) -> dict[str, float]:
    """How well ``scale * sd`` describes the errors: coverage, and r(sd, |error|)."""
    age, pred, sd = (np.asarray(v, dtype=np.float64) for v in (age, pred, sd))
    error = np.abs(pred - age)
    calibrated = scale * sd
    return {
        "scale": float(scale),
        "mean_mc_sd": float(sd.mean()),
        "mean_calibrated_sd": float(calibrated.mean()),
        "coverage_1sd": float(np.mean(error <= calibrated)),
        "coverage_2sd": float(np.mean(error <= 2 * calibrated)),
        "coverage_1sd_uncalibrated": float(np.mean(error <= sd)),
        "r_sd_abs_error": float(np.corrcoef(sd, error)[0, 1]) if sd.std() > 0 else float("nan"),
        "rms_z": float(np.sqrt(np.mean((error / calibrated) ** 2))),
    }


def evaluate(age: Sequence[float], pred: Sequence[float], card: dict[str, Any],
             train_mean_age: float) -> dict[str, Any]:
    """Metrics before and after the card's bias correction, and the mean-age baseline.

    The corrections use the coefficients in the card (fitted on the validation set), never
    coefficients fitted on the test set, which would flatter them.
    """
    age, pred = np.asarray(age, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    report: dict[str, Any] = {
        "n": int(age.size),
        "uncorrected": regression_metrics(age, pred),
        "baseline": {"train_mean_age": float(train_mean_age),
                     "mae": float(np.abs(age - train_mean_age).mean()),
                     "rmse": float(np.sqrt(((age - train_mean_age) ** 2).mean()))},
        "corrected": {},
    }
    for method, coefs in (card.get("bias_correction") or {}).items():
        if not isinstance(coefs, dict) or "error" in coefs or "slope" not in coefs:
            continue
        corrected_pred = age + apply_bias(method, coefs, age, pred)
        report["corrected"][method] = regression_metrics(age, corrected_pred)
    report["mae_over_baseline"] = report["uncorrected"]["mae"] / report["baseline"]["mae"]
    return report


def scatter_plot(path: str | Path, age: Sequence[float], pred: Sequence[float], *,
                 title: str, sd: Sequence[float] | None = None) -> None:
    """Predicted against chronological age with the identity line (SVG, reproducible)."""
    import matplotlib
    from matplotlib.figure import Figure

    from brainage_bids.io import atomic_path

    age, pred = np.asarray(age, dtype=np.float64), np.asarray(pred, dtype=np.float64)
    fig = Figure(figsize=(4.8, 4.6), layout="constrained")
    ax = fig.subplots()
    low = float(min(age.min(), pred.min())) - 3
    high = float(max(age.max(), pred.max())) + 3
    ax.plot([low, high], [low, high], color="grey", linestyle="--", linewidth=1,
            label="identity")
    if sd is not None:
        ax.errorbar(age, pred, yerr=np.asarray(sd), fmt="none", ecolor="tab:blue",
                    alpha=0.35, linewidth=1)
    ax.scatter(age, pred, s=18, color="tab:blue", zorder=3, label="test participant")
    metrics = regression_metrics(age, pred)
    ax.set(xlim=(low, high), ylim=(low, high), xlabel="chronological age (years)",
           ylabel="predicted age (years)",
           title=f"{title}\nMAE {metrics['mae']:.2f} y, r {metrics['r']:.3f}, n {metrics['n']}")
    ax.set_aspect("equal")
    ax.legend(loc="upper left", frameon=False)
    with matplotlib.rc_context({"svg.hashsalt": "brainage-bids", "svg.fonttype": "none"}), \
            atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="svg", metadata={"Date": None})


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Indented JSON, written atomically."""
    from brainage_bids.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps(data, indent=2, sort_keys=False) + "\n")

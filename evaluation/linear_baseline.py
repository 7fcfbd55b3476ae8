"""A linear baseline beside the shipped ensemble, out of fold on the ensemble's own folds.

Kernel ridge regression (linear kernel) on the model's inputs, the normalised 2 mm MNI
brains, averaged in blocks of ``--block`` voxels, is trained and scored on exactly the folds
of a cross-validated ensemble's card: for each fold, fitted on the other folds (its ridge
penalty chosen by leave-one-out on those folds only) and scored on that fold. The test split
is never read. It prints, beside the ensemble's out-of-fold predictions (with grid jitter,
from ``docs/evaluation/grid-jitter-oof.json``):

- MAE, RMSE, r and the errors above 15 years of both, and of their fixed-weight blends;
- r between the two models' errors, as they are and after removing each error's linear
  trend with age (the regression to the mean both share): how much of the error two
  unrelated models share. Participants that both get wrong are more likely to be real
  deviations from their age group, or data problems, than the network's variance.

::

    python evaluation/linear_baseline.py --derivatives /work/runs/ixi3 --block 2 3 4 \\
        --json docs/evaluation/linear-baseline-oof.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from brainage_bids import evaluation as ev
from brainage_bids.metrics import regression_metrics
from brainage_bids.model.data import read_volume
from brainage_bids.model.weights import ModelError, load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import DEFAULT_BIDS, subjects_of  # noqa: E402

#: Ridge penalties tried, relative to the mean squared norm of the centred features.
ALPHAS = np.logspace(-7, 1, 17)
#: Weights of the ensemble in the blends reported (the rest is the linear model's).
BLEND_WEIGHTS = (0.5, 0.7, 0.8)


def block_means(volumes: np.ndarray, block: int) -> np.ndarray:
    """``(n, x, y, z)`` volumes averaged over ``block``-voxel cubes (edges that do not fill a
    cube are dropped), flattened to ``(n, features)``."""
    n, *shape = volumes.shape
    x, y, z = (s // block * block for s in shape)
    cut = volumes[:, :x, :y, :z]
    cubes = cut.reshape(n, x // block, block, y // block, block, z // block, block)
    return cubes.mean(axis=(2, 4, 6)).reshape(n, -1)


def _centred_eigen(train_x: np.ndarray, train_y: np.ndarray) -> dict:
    """The centred Gram matrix's eigen-decomposition, and what the fits share."""
    centre = train_x.mean(axis=0)
    a = train_x - centre
    gram = a @ a.T
    eigval, eigvec = np.linalg.eigh(gram)
    y = train_y - train_y.mean()
    return {"centre": centre, "a": a, "eigval": eigval, "eigvec": eigvec, "y": y,
            "proj": eigvec.T @ y, "scale": float(np.trace(gram)) / len(a),
            "offset": float(train_y.mean())}


def loo_mae(train_x: np.ndarray, train_y: np.ndarray, alphas: np.ndarray = ALPHAS,
            fit: dict | None = None) -> np.ndarray:
    """Leave-one-out MAE on the training rows for each relative penalty, by the hat-matrix
    shortcut (with the fitted intercept's leverage ``1/n`` in each row's): equal to refitting
    without each row in turn."""
    fit = fit or _centred_eigen(train_x, train_y)
    eigval, eigvec, y = fit["eigval"], fit["eigvec"], fit["y"]
    maes = []
    for alpha in alphas:
        shrink = eigval / (eigval + alpha * fit["scale"])
        hat_diag = 1.0 / len(y) + (eigvec**2) @ shrink  # the intercept is fitted too
        loo = (y - eigvec @ (shrink * fit["proj"])) / (1.0 - hat_diag)
        maes.append(float(np.mean(np.abs(loo))))
    return np.array(maes)


def ridge_fit_predict(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                      alphas: np.ndarray = ALPHAS) -> tuple[np.ndarray, float]:
    """Kernel ridge (linear kernel) predictions for ``test_x`` and the relative penalty chosen.

    The penalty minimises :func:`loo_mae` on the training rows, so nothing outside
    ``train_x`` decides it.
    """
    fit = _centred_eigen(train_x, train_y)
    alpha = float(alphas[int(np.argmin(loo_mae(train_x, train_y, alphas, fit)))])
    dual = fit["eigvec"] @ (fit["proj"] / (fit["eigval"] + alpha * fit["scale"]))
    return (test_x - fit["centre"]) @ (fit["a"].T @ dual) + fit["offset"], alpha


def out_of_fold(features: np.ndarray, ages: np.ndarray,
                folds: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Each row predicted by the ridge fitted on the other folds; the penalty per fold."""
    pred = np.full(len(ages), np.nan)
    alphas = []
    for fold in np.unique(folds):
        held = folds == fold
        pred[held], alpha = ridge_fit_predict(features[~held], ages[~held], features[held])
        alphas.append(alpha)
    return pred, alphas


def error_correlation(ages: np.ndarray, first: np.ndarray, second: np.ndarray,
                      detrend: bool = False) -> float:
    """r between two models' errors; with ``detrend``, of what is left of each error after
    its linear trend with age (the regression to the mean that both models share)."""
    errors = [first - ages, second - ages]
    if detrend:
        design = np.column_stack([ages, np.ones_like(ages)])
        errors = [e - design @ np.linalg.lstsq(design, e, rcond=None)[0] for e in errors]
    return float(np.corrcoef(*errors)[0, 1])


def _row(ages: np.ndarray, pred: np.ndarray) -> dict:
    metrics = regression_metrics(ages, pred)
    return {"mae": metrics["mae"], "rmse": metrics["rmse"], "r": metrics["r"],
            "errors_above_15": int(np.sum(np.abs(pred - ages) > 15))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--derivatives", type=Path, required=True,
                        help="participant-level output directory with preprocessed images")
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--model", default="ixi-2mm-v2",
                        help="the cross-validated ensemble whose folds are used")
    parser.add_argument("--oof", type=Path,
                        default=HERE.parent / "docs/evaluation/grid-jitter-oof.json",
                        help="the ensemble's out-of-fold predictions (grid_jitter.py's JSON)")
    parser.add_argument("--block", type=int, nargs="+", default=[2, 4],
                        help="block sizes in voxels (2 mm each) to average over")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    try:
        _, card = load_model(args.model)
        members = (card.get("ensemble") or {}).get("members") or []
        fold_of = {s: int(m["fold"]) for m in members for s in subjects_of(m["validation_ids"])}
        if not fold_of:
            raise ValueError(f"{args.model} is not a cross-validated ensemble")
        subjects = sorted(fold_of)
        items = ev.preprocessed_items(args.derivatives, args.bids, subjects)
        oof = json.loads(args.oof.read_text())
        ensemble = {p["participant_id"].removeprefix("sub-"): p["with"]
                    for p in oof["per_participant"]}
        missing = [s for s in subjects if s not in ensemble]
        if missing:
            raise ValueError(f"{args.oof} lacks {len(missing)} participants, e.g. {missing[0]}")
        volumes = np.stack([read_volume(it.image, it.mask) for it in items])
    except (ModelError, ValueError, OSError, KeyError) as exc:
        print(f"linear_baseline: {exc}", file=sys.stderr)
        return 1
    ages = np.array([it.age for it in items])
    folds = np.array([fold_of[it.id] for it in items])
    cnn = np.array([ensemble[it.id] for it in items])

    results: dict = {"model": card.get("name"), "n": len(items), "kind": "out-of-fold",
                     "ensemble": _row(ages, cnn), "linear": []}
    print(f"{'':34s} {'MAE':>6s} {'RMSE':>6s} {'r':>6s} {'>15 y':>6s}")

    def show(name: str, row: dict) -> None:
        print(f"{name:34s} {row['mae']:6.2f} {row['rmse']:6.2f} {row['r']:6.3f} "
              f"{row['errors_above_15']:6d}")

    show(f"{card.get('name')} (grid jitter)", results["ensemble"])
    for block in args.block:
        features = block_means(volumes, block)
        features = features[:, features.std(axis=0) > 1e-6]
        pred, alphas = out_of_fold(features, ages, folds)
        entry = {"block_voxels": block, "block_mm": 2 * block, "features": features.shape[1],
                 "alphas": alphas, **_row(ages, pred),
                 "r_errors_with_ensemble": error_correlation(ages, pred, cnn),
                 "r_errors_with_ensemble_age_detrended": error_correlation(ages, pred, cnn,
                                                                           detrend=True),
                 # would the two models' disagreement rank the ensemble's errors (an
                 # uncertainty that the ensemble's own spreads do not give)?
                 "r_disagreement_with_ensemble_abs_error": float(np.corrcoef(
                     np.abs(cnn - pred), np.abs(cnn - ages))[0, 1]),
                 "blends": {str(w): _row(ages, w * cnn + (1 - w) * pred)
                            for w in BLEND_WEIGHTS}}
        results["linear"].append(entry)
        show(f"ridge, {2 * block} mm blocks ({features.shape[1]} features)", entry)
        for weight, row in entry["blends"].items():
            show(f"  {weight} ensemble + {1 - float(weight):.1f} ridge", row)
        print(f"  r(ensemble error, ridge error) = {entry['r_errors_with_ensemble']:.2f}; "
              f"after each error's trend with age: "
              f"{entry['r_errors_with_ensemble_age_detrended']:.2f}")
        print(f"  r(|ensemble - ridge|, |ensemble error|) = "
              f"{entry['r_disagreement_with_ensemble_abs_error']:.2f}")
    if args.json:
        ev.write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())

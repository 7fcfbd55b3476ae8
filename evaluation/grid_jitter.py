"""Choose grid-jitter test-time augmentation for a cross-validated ensemble, out of fold.

Every training participant is predicted by the members of its own validation fold (the only
honest ones), with and without ``--n`` grid-jitter views (:mod:`brainage_bids.model.jitter`),
and the script prints MAE, RMSE, r, the errors above 15 years and the uncertainty's coverage
for both. The test split is never read. With ``--write-card`` it writes the model card with
the jitter switched on (``inference.grid_jitter``) and the out-of-fold fits redone on the
jittered predictions, as the train level would have fitted them: the bias-correction
coefficients and the uncertainty scale.

Inputs are the participant level's derivatives of the training participants, made by this
version (they include the native-space brain the views are resampled from)::

    python evaluation/preprocess.py ../shared/data/ixi-hh-t1w-2mm /work/runs/ixi3 \\
        -w /work/runs/work3 --participant-label $(python evaluation/split_ids.py trainval)
    python evaluation/grid_jitter.py --model ixi-2mm-v2 --derivatives /work/runs/ixi3 \\
        --json docs/evaluation/grid-jitter-oof.json \\
        --write-card brainage_bids/data/models/ixi-2mm-v2.json
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

from brainage_bids import evaluation as ev
from brainage_bids.io import atomic_write_json
from brainage_bids.metrics import bias_report
from brainage_bids.model.ensemble import BrainAgeEnsemble, members_of
from brainage_bids.model.jitter import GRID_JITTER_KEY
from brainage_bids.model.uncertainty import coverage, fit_scale
from brainage_bids.model.weights import ModelError, load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import DEFAULT_BIDS, subjects_of  # noqa: E402

#: MC-dropout samples per prediction, as the participant level's default.
MC_SAMPLES = 20


def _folds(card: dict) -> dict[int, tuple[list[int], list[str]]]:
    """``{fold: (member indices, validation subjects)}`` from the card's member list."""
    members = (card.get("ensemble") or {}).get("members") or []
    if len(members) < 2:
        raise ValueError("the model is not a cross-validated ensemble (no members in its card)")
    folds: dict[int, tuple[list[int], list[str]]] = {}
    for member in members:
        indices, ids = folds.setdefault(int(member["fold"]), ([], []))
        indices.append(int(member["index"]))
        if not ids:
            ids += subjects_of(member["validation_ids"])
    return folds


def _summary(age: np.ndarray, rows: list[dict]) -> dict:
    pred = np.array([r["predicted_age"] for r in rows])
    errors = pred - age
    mc_sd = np.array([r["mc_sd"] for r in rows])
    view_sd = np.array([r["view_sd"] for r in rows])
    scale = fit_scale(errors, mc_sd)
    report = bias_report(age, pred, errors="record")
    return {
        **report["uncorrected"],
        "errors_above_15": int((np.abs(errors) > 15).sum()),
        "worst": sorted(((round(float(e), 2)) for e in errors), key=abs, reverse=True)[:5],
        "calibration_scale": scale,
        "calibrated_coverage": coverage(errors, scale * mc_sd) if scale else None,
        "r_view_sd_abs_error": (float(np.corrcoef(view_sd, np.abs(errors))[0, 1])
                                if view_sd.std() > 0 else None),
        "_report": report, "_errors": errors, "_mc_sd": mc_sd,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--derivatives", type=Path, required=True)
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--n", type=int, default=8, help="grid-jitter views (default 8)")
    parser.add_argument("--max-mm", type=float, default=1.0,
                        help="largest offset per axis in mm (default 1, half a voxel)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    parser.add_argument("--write-card", type=Path,
                        help="write the card with grid jitter on and the OOF fits redone")
    args = parser.parse_args(argv)
    try:
        model, card = load_model(args.model)
        folds = _folds(card)
        members = members_of(model)
        flip = bool((card.get("inference") or {}).get("flip_tta"))
        jitter = {"n": args.n, "max_mm": args.max_mm, "seed": args.seed}
        ages, plain, jittered, ids = [], [], [], []
        for fold, (indices, subjects) in sorted(folds.items()):
            fold_model = BrainAgeEnsemble([members[i] for i in indices])
            items = ev.preprocessed_items(args.derivatives, args.bids, subjects)
            print(f"fold {fold}: {len(items)} participants", file=sys.stderr, flush=True)
            for settings, rows in ((None, plain), (jitter, jittered)):
                rows += ev.predict_records(fold_model, items, mc_samples=MC_SAMPLES,
                                           flip_tta=flip, jitter=settings)
            ages += [it.age for it in items]
            ids += [it.id for it in items]
    except (ModelError, ValueError, OSError, KeyError) as exc:
        print(f"grid_jitter: {exc}", file=sys.stderr)
        return 1
    age = np.array(ages)
    results = {"without": _summary(age, plain), "with": _summary(age, jittered)}
    for name, res in results.items():
        print(f"{name:>7} grid jitter: MAE {res['mae']:.3f}  RMSE {res['rmse']:.3f}  "
              f"r {res['r']:.3f}  errors > 15 y: {res['errors_above_15']}  "
              f"worst {res['worst']}  k {res['calibration_scale']:.2f}  "
              f"within 1 SD {res['calibrated_coverage']['within_1sd']:.2f}  "
              f"r(view SD, |err|) {res['r_view_sd_abs_error']}")
    public = {name: {k: v for k, v in res.items() if not k.startswith("_")}
              for name, res in results.items()}
    out = {"model": card.get("name"), "sha256": card.get("sha256"), "n": len(age),
           "grid_jitter": jitter, "flip_tta": flip, "mc_samples": MC_SAMPLES,
           "kind": "out-of-fold (each participant by the members of its own fold)",
           **public,
           "per_participant": [
               {"participant_id": f"sub-{i}", "age": a,
                "without": round(float(p["predicted_age"]), 3),
                "with": round(float(j["predicted_age"]), 3),
                "view_sd": round(float(j["view_sd"]), 3)}
               for i, a, p, j in zip(ids, ages, plain, jittered, strict=True)]}
    if args.json:
        ev.write_json(args.json, out)
    if args.write_card:
        where = args.json.name if args.json else None
        atomic_write_json(args.write_card, _card_with_jitter(card, results, jitter, where))
        print(f"wrote {args.write_card}", file=sys.stderr)
    return 0


def _card_with_jitter(card: dict, results: dict, jitter: dict, predictions: str | None) -> dict:
    """The card with the jitter on and its OOF fits (bias, uncertainty scale) redone;
    ``predictions`` names the file with every participant's prediction with and without."""
    new = copy.deepcopy(card)
    new.pop("weights_path", None)  # added by load_model, not part of the stored card
    res, before = results["with"], results["without"]
    new["inference"][GRID_JITTER_KEY] = {
        **jitter, "chosen_by": ("for invariance to how a head is stored, not for accuracy; "
                                "measured out of fold by evaluation/grid_jitter.py"),
        "oof_mae_without": before["mae"], "oof_mae_with": res["mae"],
        **({"predictions_file": predictions} if predictions else {})}
    report = res["_report"]
    validation = {**new["cross_validation"], **report["uncorrected"],
                  "corrected": report["corrected"], "mae_without_grid_jitter": before["mae"]}
    new["cross_validation"] = new["validation"] = validation
    new["bias_correction"] = {"fitted_on": "out-of-fold predictions, with grid jitter",
                              **report["coefficients"]}
    scale = res["calibration_scale"]
    new["uncertainty"] = {
        **new["uncertainty"], "calibration_scale": scale,
        "fitted_on": ("out-of-fold predictions with grid jitter (each image by the members "
                      "of its own fold)"),
        "raw_coverage_oof": coverage(res["_errors"], res["_mc_sd"]),
        "calibrated_coverage_oof": res["calibrated_coverage"]}
    return new


if __name__ == "__main__":
    sys.exit(main())

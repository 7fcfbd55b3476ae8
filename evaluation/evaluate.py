"""Evaluate a brain-age model on the held-out IXI test split.

Prints MAE, RMSE, Pearson r, R^2 and r(gap, age) before and after the model card's bias
correction, the MAE of predicting the training mean age (the baseline), and how calibrated
the MC-dropout uncertainty is; writes the numbers as JSON and a scatter plot as SVG.

The test participants are never used for training, early stopping or model selection: the
script refuses a model whose card lists any of them among its training or validation images.

Inputs are the participant level's preprocessed images (``desc-preproc`` T1w and brain
mask) in ``--derivatives``; create them with, for example::

    brainage-bids ../shared/data/ixi-hh-t1w-2mm /work/runs/ixi participant \\
        --participant-label $(python evaluation/split_ids.py test) --no-reports

Example (the numbers in docs/model-card.md)::

    python evaluation/evaluate.py --model default --derivatives /work/runs/ixi \\
        --json docs/evaluation/ixi-test.json --plot docs/img/ixi-test-scatter.svg
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from brainage_bids import evaluation as ev
from brainage_bids.bids import read_ages
from brainage_bids.io import atomic_write_text
from brainage_bids.model.jitter import jitter_settings
from brainage_bids.model.uncertainty import coverage
from brainage_bids.model.weights import ModelError, load_model

HERE = Path(__file__).resolve().parent
DEFAULT_BIDS = HERE.parent.parent / "shared" / "data" / "ixi-hh-t1w-2mm"


def subjects_of(names: list[str]) -> list[str]:
    """Subject labels of a card's image ids: ``sub-IXI012_ses-1`` -> ``IXI012``."""
    return [name.split("_")[0].removeprefix("sub-") for name in names]


def split_subjects(card: dict, split: dict) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) subject labels; refuses any overlap with the test split."""
    data = card.get("training_data") or {}
    if not isinstance(data, dict) or "train_ids" not in data:
        raise ValueError("the model card does not list its training images "
                         "(training_data.train_ids): cannot prove the test split is unseen")

    train, val = subjects_of(data["train_ids"]), subjects_of(data.get("validation_ids", []))
    test = [s.removeprefix("sub-") for s in split["test"]]
    leaked = sorted(set(test) & (set(train) | set(val)))
    if leaked:
        raise ValueError(f"test participants were used in training or validation: {leaked}")
    return train, val, test


def table(report: dict) -> str:
    """The report as a Markdown table (what docs/model-card.md shows)."""
    rows = [("uncorrected", report["uncorrected"])]
    rows += [(f"{m} corrected (card coefficients)", v) for m, v in report["corrected"].items()]
    lines = ["| | MAE | RMSE | r | R² | r(gap, age) |", "|---|---|---|---|---|---|"]
    for name, m in rows:
        lines.append(f"| {name} | {m['mae']:.2f} | {m['rmse']:.2f} | {m['r']:.3f} | "
                     f"{m['r2']:.3f} | {m['r_gap_age']:.3f} |")
    base = report["baseline"]
    lines.append(f"| baseline: training mean age ({base['train_mean_age']:.1f}) | "
                 f"{base['mae']:.2f} | {base['rmse']:.2f} | | | |")
    return "\n".join(lines)


def _evaluate_model(spec: str, args: argparse.Namespace, split: dict) -> dict:
    """Predict the test split with one model and build its report (no printing)."""
    model, card = load_model(spec)
    train, val, test = split_subjects(card, split)
    all_ages = read_ages(args.bids)
    train_mean = float(np.mean([all_ages[(s, None)] for s in train]))
    test_items = ev.preprocessed_items(args.derivatives, args.bids, test)
    flip = bool((card.get("inference") or {}).get("flip_tta"))
    jitter = jitter_settings(card)
    rows = ev.predict_records(model, test_items, mc_samples=args.mc_samples, flip_tta=flip,
                              calibration=card.get("uncertainty"), jitter=jitter)
    age = np.array([it.age for it in test_items])
    pred = np.array([r["predicted_age"] for r in rows])
    report = ev.evaluate(age, pred, card, train_mean)
    name = card.get("name", str(spec))
    report["model"] = {"name": name, "sha256": card["sha256"],
                       "n_members": rows[0]["n_members"] if rows else 1, "flip_tta": flip,
                       "grid_jitter": jitter,
                       "n_train": len(train), "n_val": len(val)}
    report["predictions"] = [
        {"participant_id": f"sub-{it.id}", "age": it.age,
         "predicted_age": round(float(r["predicted_age"]), 3),
         "error": round(float(r["predicted_age"] - it.age), 3),
         "member_predictions": [round(p, 3) for p in r["member_predictions"]],
         "mc_sd": round(float(r["mc_sd"]), 3), "member_sd": round(float(r["member_sd"]), 3),
         "view_sd": round(float(r["view_sd"]), 3),
         "sd": round(float(r["sd"]), 3), "calibrated": r["calibrated"]}
        for it, r in zip(test_items, rows, strict=True)]
    if args.mc_samples > 1 and rows and rows[0]["calibrated"]:
        report["uncertainty"] = {
            "method": rows[0]["uncertainty_method"], "samples": args.mc_samples,
            "calibration": {k: v for k, v in (card.get("uncertainty") or {}).items()
                            if k in ("calibration_scale", "scaled", "fitted_on", "formula")},
            "test": coverage(pred - age, [r["sd"] for r in rows]),
        }
    report["_internal"] = {"model": model, "card": card, "val": val, "age": age, "pred": pred,
                           "rows": rows}
    return report


def _worst(report: dict, n: int = 5) -> str:
    worst = sorted(report["predictions"], key=lambda r: -abs(r["error"]))[:n]
    return ", ".join(f"{r['participant_id']} {r['error']:+.1f} (age {r['age']:.1f})"
                     for r in worst)


def _print_report(report: dict) -> None:
    model = report["model"]
    print(f"\n## {model['name']} ({model['sha256'][:12]}; {model['n_members']} member(s), "
          f"flip TTA {'on' if model['flip_tta'] else 'off'})")
    print(table(report))
    print(f"\nMAE / baseline MAE = {report['mae_over_baseline']:.3f}")
    print(f"worst errors: {_worst(report)}")
    errors = np.abs([r["error"] for r in report["predictions"]])
    print(f"errors above 15 years: {int((errors > 15).sum())}")
    if "uncertainty" in report:
        t = report["uncertainty"]["test"]
        print(f"uncertainty ({report['uncertainty']['method']}, calibrated on "
              f"{report['uncertainty']['calibration'].get('fitted_on')}): on test "
              f"r(SD, |error|) {t['r_sd_abs_error']:.2f}; |error| within 1 SD "
              f"{t['within_1sd']:.0%}, within 2 SD {t['within_2sd']:.0%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="registry name, file or directory")
    parser.add_argument("--compare", default=None, metavar="MODEL",
                        help="also evaluate this model (e.g. the previous version) on the "
                             "same participants and print both")
    parser.add_argument("--derivatives", type=Path, required=True,
                        help="participant-level output directory with preprocessed images")
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS,
                        help="the BIDS dataset (for participants.tsv ages)")
    parser.add_argument("--split", type=Path, default=HERE / "ixi_split.json")
    parser.add_argument("--mc-samples", type=int, default=20,
                        help="MC-dropout samples per image (1: no uncertainty, faster)")
    parser.add_argument("--json", type=Path, help="write the full report here")
    parser.add_argument("--plot", type=Path, help="write the scatter plot (SVG) here")
    parser.add_argument("--write-calibration", action="store_true",
                        help="single models: store the uncertainty scale fitted on the "
                             "validation set in the model's card (ensembles are calibrated "
                             "out of fold by the train level)")
    args = parser.parse_args(argv)

    try:
        split = json.loads(args.split.read_text())
        report = _evaluate_model(args.model, args, split)
        other = _evaluate_model(args.compare, args, split) if args.compare else None
    except (ModelError, ValueError, OSError, KeyError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1
    internal = report.pop("_internal")
    card, model, val = internal["card"], internal["model"], internal["val"]
    age, pred = internal["age"], internal["pred"]
    print(f"{len(age)} test participants", file=sys.stderr)

    single = report["model"]["n_members"] == 1
    if single and val and args.mc_samples > 1:  # a single model: calibrate on validation
        val_items = ev.preprocessed_items(args.derivatives, args.bids, val)
        val_age = np.array([it.age for it in val_items])
        flip = report["model"]["flip_tta"]
        val_pred, val_sd = ev.predict_items(model, val_items, mc_samples=args.mc_samples,
                                            flip_tta=flip, jitter=report["model"]["grid_jitter"])
        sd = np.array([r["mc_sd"] for r in internal["rows"]])
        scale = ev.fit_uncertainty_scale(val_age, val_pred, val_sd)
        report["uncertainty_validation_fit"] = {
            "method": "mc-dropout", "samples": args.mc_samples,
            "calibration": {"fitted_on": f"validation set ({len(val_items)} images)",
                            "scale": scale},
            "validation": ev.uncertainty_report(val_age, val_pred, val_sd, scale),
            "test": ev.uncertainty_report(age, pred, sd, scale),
        }
    _print_report(report)
    if other is not None:
        other.pop("_internal")
        _print_report(other)
        report["compared_with"] = {k: other[k] for k in ("model", "uncorrected", "corrected",
                                                         "baseline", "predictions")
                                   if k in other}
        print(f"\nsame {len(age)} participants: MAE {report['uncorrected']['mae']:.2f} "
              f"({report['model']['name']}) vs {other['uncorrected']['mae']:.2f} "
              f"({other['model']['name']})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        ev.write_json(args.json, report)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        sds = [r["sd"] for r in report["predictions"]] if "uncertainty" in report else None
        ev.scatter_plot(args.plot, age, pred, title=f"{report['model']['name']} on the IXI "
                        "test split", sd=sds)
    if args.write_calibration:
        fit = report.get("uncertainty_validation_fit")
        if fit is None:
            print("evaluate: --write-calibration needs a single model with a validation set "
                  "and --mc-samples > 1", file=sys.stderr)
            return 1
        card_path = Path(card["weights_path"]).with_suffix(".json")
        stored = json.loads(card_path.read_text())
        stored["uncertainty"] = {
            "method": "mc-dropout", "samples": fit["samples"],
            "calibration_scale": round(fit["calibration"]["scale"], 4),
            "scaled": "mc_sd", "fitted_on": fit["calibration"]["fitted_on"],
            "validation_coverage_1sd": round(fit["validation"]["coverage_1sd"], 3),
            "test_coverage_1sd": round(fit["test"]["coverage_1sd"], 3),
            "test_coverage_2sd": round(fit["test"]["coverage_2sd"], 3),
        }
        atomic_write_text(card_path, json.dumps(stored, indent=2) + "\n")
        print(f"calibration written to {card_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

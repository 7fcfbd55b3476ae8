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
from brainage_bids.model.weights import ModelError, load_model

HERE = Path(__file__).resolve().parent
DEFAULT_BIDS = HERE.parent.parent / "shared" / "data" / "ixi-hh-t1w-2mm"


def split_subjects(card: dict, split: dict) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) subject labels; refuses any overlap with the test split."""
    data = card.get("training_data") or {}
    if not isinstance(data, dict) or "train_ids" not in data:
        raise ValueError("the model card does not list its training images "
                         "(training_data.train_ids): cannot prove the test split is unseen")

    def subjects(names: list[str]) -> list[str]:
        return [name.split("_")[0].removeprefix("sub-") for name in names]

    train, val = subjects(data["train_ids"]), subjects(data.get("validation_ids", []))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="registry name, file or directory")
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
                        help="store the uncertainty scale fitted on the validation set in "
                             "the model's card (the participant level then reports "
                             "calibrated SDs)")
    args = parser.parse_args(argv)

    try:
        model, card = load_model(args.model)
        split = json.loads(args.split.read_text())
        train, val, test = split_subjects(card, split)
        all_ages = read_ages(args.bids)
        train_mean = float(np.mean([all_ages[(s, None)] for s in train]))
        test_items = ev.preprocessed_items(args.derivatives, args.bids, test)
        val_items = (ev.preprocessed_items(args.derivatives, args.bids, val)
                     if args.mc_samples > 1 else [])
    except (ModelError, ValueError, OSError, KeyError) as exc:
        print(f"evaluate: {exc}", file=sys.stderr)
        return 1

    name = card.get("name", str(args.model))
    print(f"model {name} ({card['sha256'][:12]}): {len(train)} train, {len(val)} validation, "
          f"{len(test_items)} test participants", file=sys.stderr)
    age = np.array([it.age for it in test_items])
    pred, sd = ev.predict_items(model, test_items, mc_samples=args.mc_samples)
    report = ev.evaluate(age, pred, card, train_mean)
    report["model"] = {"name": name, "sha256": card["sha256"]}
    report["predictions"] = [
        {"participant_id": f"sub-{it.id}", "age": it.age, "predicted_age": round(float(p), 3),
         "mc_sd": round(float(s), 3)} for it, p, s in zip(test_items, pred, sd, strict=True)]

    if val_items:
        val_age = np.array([it.age for it in val_items])
        val_pred, val_sd = ev.predict_items(model, val_items, mc_samples=args.mc_samples)
        scale = ev.fit_uncertainty_scale(val_age, val_pred, val_sd)
        report["uncertainty"] = {
            "method": "mc-dropout", "samples": args.mc_samples,
            "calibration": {"fitted_on": f"validation set ({len(val_items)} images)",
                            "scale": scale},
            "validation": ev.uncertainty_report(val_age, val_pred, val_sd, scale),
            "test": ev.uncertainty_report(age, pred, sd, scale),
        }

    print(table(report))
    print(f"\nMAE / baseline MAE = {report['mae_over_baseline']:.3f} (goal <= 0.5)")
    if "uncertainty" in report:
        unc = report["uncertainty"]
        t = unc["test"]
        print(f"MC dropout ({unc['samples']} samples): scale k = "
              f"{unc['calibration']['scale']:.2f} fitted on validation; on test: mean SD "
              f"{t['mean_mc_sd']:.2f} y raw, {t['mean_calibrated_sd']:.2f} y calibrated; "
              f"|error| within 1 SD {t['coverage_1sd']:.0%}, within 2 SD "
              f"{t['coverage_2sd']:.0%} (68 %/95 % if calibrated); r(SD, |error|) "
              f"{t['r_sd_abs_error']:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        ev.write_json(args.json, report)
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        ev.scatter_plot(args.plot, age, pred, title=f"{name} on the IXI test split",
                        sd=sd * report["uncertainty"]["calibration"]["scale"]
                        if "uncertainty" in report else None)
    if args.write_calibration:
        if "uncertainty" not in report:
            print("evaluate: --write-calibration needs --mc-samples > 1", file=sys.stderr)
            return 1
        card_path = Path(card["weights_path"]).with_suffix(".json")
        stored = json.loads(card_path.read_text())
        unc = report["uncertainty"]
        stored["uncertainty"] = {
            "method": "mc-dropout", "samples": unc["samples"],
            "calibration_scale": round(unc["calibration"]["scale"], 4),
            "fitted_on": unc["calibration"]["fitted_on"],
            "validation_coverage_1sd": round(unc["validation"]["coverage_1sd"], 3),
            "test_coverage_1sd": round(unc["test"]["coverage_1sd"], 3),
            "test_coverage_2sd": round(unc["test"]["coverage_2sd"], 3),
        }
        atomic_write_text(card_path, json.dumps(stored, indent=2) + "\n")
        print(f"calibration written to {card_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

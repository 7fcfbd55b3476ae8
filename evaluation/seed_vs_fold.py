"""Seed ensemble on one split against a cross-validated ensemble, from networks already trained.

The train level builds two kinds of ensemble: ``--folds K`` (member *k* trains on the other
folds and is early-stopped on fold *k*) and ``--ensemble N`` (N seeds on one split, each
early-stopped on the same validation participants). Both have been trained at the shipped
recipe without training anything for this comparison: v2's five fold members, and the
ablation's three seeds of the shared module (``evaluation/ablation.py``), whose seed 42 *is*
v2's member 0 and whose seeds 43 and 44 trained on member 0's split. So

- the **seed ensemble** is those three networks: N = 3 seeds, one split (96 train, 24
  validation);
- the **fold ensemble** of equal size is any three of v2's five members (three splits, each
  member 96 train, 24 validation), averaged over all ten choices of three so that no choice
  is picked; and v2 itself is all five.

Every network predicts the 30 test participants of ``evaluation/ixi_split.json`` once, as the
participant level does (flip and grid jitter from v2's card, no MC dropout), and an
ensemble's prediction is the mean of its members' (exactly what the participant level
averages). It prints MAE, RMSE, r, r(gap, age), the largest error and r(member SD, |error|)
for each, beside the single networks. This is a report on the test split, not a choice made
on it: v2 was shipped before these numbers were computed, and no fit uses them.

    python evaluation/seed_vs_fold.py --derivatives OUT \\
        --seed-members training-runs/ixi-2mm-v2/members/ixi-2mm-v2-m0.json \\
            ABLATION/models/ablation-shared-seed43 ABLATION/models/ablation-shared-seed44 \\
        --json docs/evaluation/seed-vs-fold.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path

import numpy as np

from brainage_bids import evaluation as ev
from brainage_bids.metrics import regression_metrics
from brainage_bids.model.ensemble import BrainAgeEnsemble, members_of
from brainage_bids.model.jitter import jitter_settings
from brainage_bids.model.weights import ModelError, load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import DEFAULT_BIDS, split_subjects  # noqa: E402


def check_networks(fold_card: dict, seed_cards: list[dict], split: dict) -> list[str]:
    """The test participants, after refusing networks that are not what the docstring says.

    Every card must prove the test participants unseen (``evaluate.split_subjects``); the
    fold model must be a cross-validated ensemble, and the seed members must share one
    training and validation split.
    """
    members = (fold_card.get("ensemble") or {}).get("members") or []
    if len(members) < 3 or len({m.get("fold") for m in members}) != len(members):
        raise ValueError("--fold-model must be a cross-validated ensemble of at least 3 members")
    splits = set()
    for card in seed_cards:
        train, val, _ = split_subjects(card, split)
        splits.add((tuple(sorted(train)), tuple(sorted(val))))
    if len(seed_cards) < 2 or len(splits) != 1:
        raise ValueError("--seed-members must be at least 2 networks trained on one split "
                         "(the same training and validation participants in their cards)")
    return split_subjects(fold_card, split)[2]


def scores(age: np.ndarray, pred: np.ndarray, member_preds: np.ndarray) -> dict:
    """Accuracy of one ensemble (``member_preds``: members x participants) on the test split."""
    metrics = regression_metrics(age, pred)
    err = np.abs(pred - age)
    row = {**{key: metrics[key] for key in ("mae", "rmse", "r", "r_gap_age")},
           "max_error": float(err.max()), "n_over_15": int((err > 15).sum())}
    if len(member_preds) > 1:
        spread = member_preds.std(axis=0, ddof=1)
        row["r_member_sd_abs_error"] = float(np.corrcoef(spread, err)[0, 1])
        row["mean_member_sd"] = float(spread.mean())
    return row


def paired_difference(err_a: np.ndarray, err_b: np.ndarray) -> dict:
    """Mean of ``|error| a - |error| b`` over the same participants, with its standard error."""
    diff = np.asarray(err_a) - np.asarray(err_b)
    return {"mean": float(diff.mean()), "se": float(diff.std(ddof=1) / np.sqrt(diff.size))}


def compare(age: np.ndarray, fold_preds: np.ndarray, seed_preds: np.ndarray) -> dict:
    """Every comparison of the report from the networks' predictions (networks x participants)."""
    n = len(seed_preds)
    choices = [list(c) for c in itertools.combinations(range(len(fold_preds)), n)]
    subset_means = [fold_preds[c].mean(axis=0) for c in choices]
    subsets = [scores(age, mean, fold_preds[c])
               for mean, c in zip(subset_means, choices, strict=True)]
    seed_mean, fold_mean = seed_preds.mean(axis=0), fold_preds.mean(axis=0)
    seed_err = np.abs(seed_mean - age)
    subset_err = np.mean([np.abs(mean - age) for mean in subset_means], axis=0)
    keys = [key for key in subsets[0] if key != "n_over_15"]
    return {
        "seed_ensemble": scores(age, seed_mean, seed_preds),
        "fold_subsets": {
            "size": n, "count": len(subsets),
            "mean": {key: float(np.mean([s[key] for s in subsets])) for key in keys},
            "min_mae": float(min(s["mae"] for s in subsets)),
            "max_mae": float(max(s["mae"] for s in subsets)),
        },
        "fold_ensemble": scores(age, fold_mean, fold_preds),
        "paired_mae_difference": {
            "seed_minus_fold_subsets": paired_difference(seed_err, subset_err),
            "seed_minus_fold_ensemble": paired_difference(seed_err, np.abs(fold_mean - age)),
        },
        "single_fold_members": [scores(age, p, p[None]) for p in fold_preds],
        "single_seed_members": [scores(age, p, p[None]) for p in seed_preds],
    }


def _line(name: str, row: dict) -> str:
    sd = row.get("r_member_sd_abs_error")
    sd_text = f"{sd:6.2f}" if sd is not None else "     -"
    return (f"{name:<40} {row['mae']:6.2f} {row['rmse']:6.2f} {row['r']:6.3f} "
            f"{row['r_gap_age']:7.2f} {row['max_error']:6.1f} {sd_text}")


def table(report: dict) -> str:
    lines = [f"{'':<40} {'MAE':>6} {'RMSE':>6} {'r':>6} {'r(gap)':>7} {'max':>6} "
             f"{'r(sd,|e|)':>6}"]
    seed = report["seed_ensemble"]
    n = report["fold_subsets"]["size"]
    lines.append(_line(f"seed ensemble: {n} seeds, one split", seed))
    subsets = report["fold_subsets"]
    lines.append(_line(f"fold ensemble: {n} of the folds, mean of {subsets['count']}",
                       subsets["mean"]))
    lines.append(f"{'':<40} (MAE range {subsets['min_mae']:.2f}-{subsets['max_mae']:.2f})")
    lines.append(_line(f"fold ensemble: all {len(report['single_fold_members'])} (shipped)",
                       report["fold_ensemble"]))
    for name, diff in report["paired_mae_difference"].items():
        lines.append(f"MAE difference {name.replace('_', ' ')}: {diff['mean']:+.2f} "
                     f"(SE {diff['se']:.2f}, paired over the same participants)")
    for i, row in enumerate(report["single_seed_members"]):
        lines.append(_line(f"  single: seed member {i}", row))
    for i, row in enumerate(report["single_fold_members"]):
        lines.append(_line(f"  single: fold member {i}", row))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--derivatives", type=Path, required=True,
                        help="participant-level output directory with preprocessed images")
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--split", type=Path, default=HERE / "ixi_split.json")
    parser.add_argument("--fold-model", default="default",
                        help="the cross-validated ensemble (registry name, file or directory)")
    parser.add_argument("--seed-members", nargs="+", required=True,
                        help="single networks trained with different seeds on one split")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    try:
        fold_model, fold_card = load_model(args.fold_model)
        seeds = [load_model(spec) for spec in args.seed_members]
        test_ids = check_networks(fold_card, [card for _, card in seeds],
                                  json.loads(args.split.read_text()))
        items = ev.preprocessed_items(args.derivatives, args.bids, test_ids)
    except (ModelError, ValueError, OSError) as exc:
        print(f"seed_vs_fold: {exc}", file=sys.stderr)
        return 1
    fold_members = members_of(fold_model)
    networks = BrainAgeEnsemble(fold_members + [model for model, _ in seeds])
    jitter = jitter_settings(fold_card)
    logging.info("%d test images, %d fold members, %d seed members, grid jitter %s",
                 len(items), len(fold_members), len(seeds), jitter)
    rows = ev.predict_records(networks, items, mc_samples=1, flip_tta=True, jitter=jitter)
    preds = np.array([r["member_predictions"] for r in rows]).T  # networks x participants
    fold_preds, seed_preds = preds[:len(fold_members)], preds[len(fold_members):]
    age = np.array([item.age for item in items])
    report = compare(age, fold_preds, seed_preds)
    print(table(report))
    if args.json:
        ev.write_json(args.json, {
            "fold_model": fold_card.get("name"), "seed_members": args.seed_members,
            "test_participants": [item.id for item in items], "ages": age.tolist(),
            "predictions": {"fold_members": fold_preds.tolist(),
                            "seed_members": seed_preds.tolist()},
            "flip_tta": True, "grid_jitter": jitter, "mc_samples": 1, **report})
    return 0


if __name__ == "__main__":
    sys.exit(main())

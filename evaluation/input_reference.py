"""The intensity QC reference of a trained model, and what it says about other images.

A model card's ``input_reference`` (:mod:`brainage_bids.model.input_reference`) holds the
normalised intensity percentiles of the model's training inputs and a threshold set from them
alone. The train level writes it for every model it trains. This script makes it for a model
trained before that existed, from the participant level's derivatives of the model's training
participants (every member's training and validation participants for an ensemble). With
``--check BIDS_DIR OUTPUT_DIR`` it prints each image of another dataset's participant-level
outputs: its distance, whether it passes, and its predicted age where a record exists.

::

    python evaluation/input_reference.py --model ixi-2mm-v2 --derivatives /work/runs/ixi3 \\
        --write-card brainage_bids/data/models/ixi-2mm-v2.json --check BIDS1 OUT1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from brainage_bids import evaluation as ev
from brainage_bids.bids import BIDSError
from brainage_bids.io import atomic_write_json
from brainage_bids.model.input_reference import distance, fit_reference, image_quantiles
from brainage_bids.model.weights import ModelError, load_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from evaluate import DEFAULT_BIDS, subjects_of  # noqa: E402


def training_subjects(card: dict) -> list[str]:
    """Every participant the model's networks were trained or early-stopped on."""
    members = (card.get("ensemble") or {}).get("members") or []
    data = card.get("training_data") or {}
    names = [*data.get("train_ids", []), *data.get("validation_ids", [])]
    for member in members:
        names += member.get("validation_ids", [])
    subjects = sorted(set(subjects_of(names)))
    if not subjects:
        raise ValueError(f"the card of {card.get('name')} lists no training participants")
    return subjects


def check_outputs(bids_dir: Path, output_dir: Path, reference: dict) -> list[dict]:
    """Distance, pass/fail and (when recorded) predicted age of every T1w image of the BIDS
    dataset whose model input the participant level wrote into ``output_dir``.

    Images are found through pybids and their outputs through the participant level's own
    naming (:func:`~brainage_bids.derivatives.derivative_path`), never by globbing.
    """
    from brainage_bids.bids import collect_t1w, load_layout
    from brainage_bids.derivatives import derivative_path
    from brainage_bids.training import MASK, PREPROC

    rows = []
    for image in collect_t1w(load_layout(bids_dir, validate=False, index_metadata=False)):
        model_input = derivative_path(output_dir, image.entities, **PREPROC)
        if not model_input.is_file():
            continue  # not processed there (failed, or not selected)
        mask = derivative_path(output_dir, image.entities, **MASK)
        record_file = derivative_path(output_dir, image.entities, suffix="brainage",
                                      extension=".json")
        record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        value = distance(image_quantiles(model_input, mask), reference["quantiles"])
        qc = record.get("qc") or {}
        registration = [v for k, v in qc.items()
                        if k.endswith("_ok") and k != "intensity_distance_ok"]
        rows.append({"image": image.name, "intensity_distance": round(value, 4),
                     "passes": value <= reference["threshold"],
                     "predicted_age": record.get("predicted_age"),
                     "age": record.get("chronological_age"),
                     "registration_qc_pass": all(registration) if registration else None})
    if not rows:
        raise ValueError(f"{output_dir}: no model inputs of {bids_dir}'s T1w images there")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ixi-2mm-v2")
    parser.add_argument("--derivatives", type=Path, required=True,
                        help="participant-level outputs holding the training participants")
    parser.add_argument("--bids", type=Path, default=DEFAULT_BIDS)
    parser.add_argument("--write-card", type=Path,
                        help="write the model's card with the reference added here")
    parser.add_argument("--check", type=Path, nargs=2, action="append", default=[],
                        metavar=("BIDS_DIR", "OUTPUT_DIR"),
                        help="check the images of a BIDS dataset in its participant-level "
                             "outputs (repeatable)")
    parser.add_argument("--json", type=Path, help="write the reference and the checks here")
    args = parser.parse_args(argv)
    try:
        _, card = load_model(args.model)
        items = ev.preprocessed_items(args.derivatives, args.bids, training_subjects(card))
        reference = fit_reference([image_quantiles(it.image, it.mask) for it in items],
                                  groups=[it.id for it in items])
        checks = {str(out): check_outputs(bids, out, reference) for bids, out in args.check}
    except (ModelError, BIDSError, ValueError, OSError) as exc:
        print(f"input_reference: {exc}", file=sys.stderr)
        return 1
    loo = reference["distance_leave_one_out"]
    print(f"{card.get('name')}: {reference['n_images']} training inputs; leave-one-out "
          f"distance median {loo['median']:.3f}, p95 {loo['p95']:.3f}, max {loo['max']:.3f}; "
          f"threshold {reference['threshold']:.3f}")
    for directory, rows in checks.items():
        print(f"\n{directory}\n| image | distance | passes | predicted age | age |")
        print("|---|---|---|---|---|")
        for row in rows:
            predicted = row["predicted_age"]
            age = row["age"]
            print(f"| {row['image']} | {row['intensity_distance']:.3f} | "
                  f"{'yes' if row['passes'] else 'no'} | "
                  f"{'-' if predicted is None else f'{predicted:.1f}'} | "
                  f"{'-' if age is None else f'{age:.1f}'} |")
    if args.write_card:
        stored = {k: v for k, v in card.items() if k != "weights_path"}  # added by load_model
        atomic_write_json(args.write_card, {**stored, "input_reference": reference})
        print(f"wrote {args.write_card}", file=sys.stderr)
    if args.json:
        ev.write_json(args.json, {"model": card.get("name"), "reference": reference,
                                  "checks": checks})
    return 0


if __name__ == "__main__":
    sys.exit(main())

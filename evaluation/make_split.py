"""Define the held-out test split of the IXI training cohort (run once; the JSON is committed).

The test participants are never used for training, early stopping or model selection. The
split is stratified by age (participants sorted by age, cut into ``n_test`` consecutive strata,
one drawn per stratum with a fixed seed) and the four participants of the shipped sample
(examples/ixi-sample) are forced into the test set, so the README's demo shows held-out
predictions.

    python evaluation/make_split.py ../shared/data/ixi-hh-t1w-2mm evaluation/ixi_split.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np

SAMPLE = ("IXI012", "IXI013", "IXI252", "IXI254")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=20261123)
    args = parser.parse_args()

    with open(args.bids_dir / "participants.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    ages = {}
    for row in rows:
        try:
            ages[row["participant_id"].removeprefix("sub-")] = float(row["age"])
        except ValueError:
            continue  # n/a: unusable for training and for evaluation
    ordered = sorted(ages, key=lambda s: (ages[s], s))
    n_test = round(args.test_fraction * len(ordered))
    rng = np.random.default_rng(args.seed)
    test = []
    for stratum in np.array_split(np.array(ordered, dtype=object), n_test):
        forced = [s for s in stratum if s in SAMPLE]
        test.extend(forced or [stratum[rng.integers(len(stratum))]])
    test = sorted(test)
    trainval = sorted(set(ordered) - set(test))
    split = {
        "description": "IXI-HH 2 mm held-out test split for the shipped brainage-bids model. "
                       "'test' is never used for training, early stopping or model selection.",
        "dataset": "IXI Hammersmith T1w, 2 mm (../shared/data/ixi-hh-t1w-2mm)",
        "seed": args.seed,
        "method": "age-sorted strata, one participant drawn per stratum; the shipped sample "
                  "participants forced into test",
        "n_test": len(test),
        "n_trainval": len(trainval),
        "test": test,
        "trainval": trainval,
        "test_age_range": [min(ages[s] for s in test), max(ages[s] for s in test)],
        "trainval_age_range": [min(ages[s] for s in trainval), max(ages[s] for s in trainval)],
    }
    args.out.write_text(json.dumps(split, indent=2) + "\n")
    print(f"test {len(test)} (ages {split['test_age_range']}), "
          f"train+validation {len(trainval)} (ages {split['trainval_age_range']})")


if __name__ == "__main__":
    main()

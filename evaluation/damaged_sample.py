"""Damaged copies of real heads, for measuring what the intensity QC catches.

Each head of a BIDS dataset (the shipped sample by default) is rescaled to 0-255 and
written four times into a new BIDS dataset:

- ``sub-X``: the head itself (uint8);
- ``sub-Xgamma2``: another contrast, ``255 * (x / max)**2``: white matter brighter relative
  to grey matter, as on some other scanners;
- ``sub-Xpost8``: posterised to 8 grey levels, as a careless export would;
- ``sub-Xspeckle``: 1 % of the voxels (seeded) set to the maximum, bright speckle.

Then run the participant level on it and compare::

    python evaluation/damaged_sample.py /work/runs/damaged-bids
    brainage-bids /work/runs/damaged-bids /work/runs/damaged-out participant --no-reports
    python evaluation/input_reference.py --derivatives /work/runs/ixi3 \\
        --check /work/runs/damaged-bids /work/runs/damaged-out \\
        --json docs/evaluation/input-reference-v2.json
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
SAMPLE = HERE.parent / "examples" / "ixi-sample"


def damaged(values: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """The head (0-255) and its three damaged copies, as uint8 arrays by label suffix."""
    low, high = float(values.min()), float(values.max())
    head = np.round((values - low) / (high - low) * 255)  # negative stored values too
    speckle = head.copy()
    speckle[np.random.default_rng(seed).random(head.shape) < 0.01] = 255
    copies = {"": head, "gamma2": np.round(255 * (head / 255) ** 2),
              "post8": np.floor(head / 32) * 32 + 16, "speckle": speckle}
    return {k: v.astype(np.uint8) for k, v in copies.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the new BIDS dataset (must not exist)")
    parser.add_argument("--bids", type=Path, default=SAMPLE)
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"damaged_sample: {args.out} exists", file=sys.stderr)
        return 1
    rows = ["participant_id\tage"]
    with open(args.bids / "participants.tsv", newline="") as table:
        ages = {row["participant_id"]: row.get("age", "n/a")
                for row in csv.DictReader(table, delimiter="\t")}
    args.out.mkdir(parents=True)
    shutil.copy(args.bids / "dataset_description.json", args.out)
    sources = sorted(args.bids.glob("sub-*/anat/sub-*_T1w.nii.gz"))  # no sessions, one run
    subjects = [source.name.split("_")[0] for source in sources]
    if len(set(subjects)) != len(subjects):
        print("damaged_sample: one T1w per participant (no sessions, no runs), please",
              file=sys.stderr)
        return 1
    for source, subject in zip(sources, subjects, strict=True):
        img = nib.load(source)
        for suffix, data in damaged(np.asanyarray(img.dataobj, dtype=np.float64)).items():
            label = f"{subject}{suffix}"
            anat = args.out / label / "anat"
            anat.mkdir(parents=True)
            nib.save(nib.Nifti1Image(data, img.affine, img.header), anat / f"{label}_T1w.nii.gz")
            rows.append(f"{label}\t{ages.get(subject, 'n/a')}")
    (args.out / "participants.tsv").write_text("\n".join(rows) + "\n")
    print(f"wrote {len(rows) - 1} heads to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
